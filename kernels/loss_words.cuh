// The layout of a loss buffer, shared by the kernels that finish a loss (loss_finish,
// triplet_finish): the double loss in two words (low first), the call's status words after it,
// then the loss's own status word, so that one small copy reads the loss and every check.
#pragma once
#include "common.cuh"

namespace contra {

constexpr int kAllFinite = 0x7fffffff;

// Called by every thread of the block; thread 0 writes the loss and its status.
__device__ __forceinline__ void write_loss_words(unsigned* out, const int* status, int slots, double loss) {
    for (int i = threadIdx.x; i < slots; i += blockDim.x) out[2 + i] = (unsigned)status[i];
    if (threadIdx.x == 0) {
        const unsigned long long bits = (unsigned long long)__double_as_longlong(loss);
        out[0] = (unsigned)bits;
        out[1] = (unsigned)(bits >> 32);
        out[2 + slots] = fabs(loss) <= 1.7976931348623157e308 ? kAllFinite : 0;
    }
}

}  // namespace contra
