// What lets an op leave its results on the device and still refuse bad numbers: the scan that
// marks the first non-finite row of a buffer in a status word (read with the loss, not scanned
// on the host), and the loss's reduction, which writes the mean next to the status words so
// that one small copy reads both.
#include "common.cuh"
#include "loss_words.cuh"

namespace contra {

// Finite: |v| <= FLT_MAX (false for NaN and both infinities).
__device__ __forceinline__ bool finite(float v) { return fabsf(v) <= 3.402823466e38f; }

template <typename T>
__device__ void nonfinite_rows(const ContraScanParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const long long stride = (long long)gridDim.x * blockDim.x;
    // Each thread walks its elements in increasing order: its first hit is its lowest row.
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.len; i += stride) {
        if (!finite(load(x, i))) {
            atomicMin(p.status + p.slot, (int)(i / p.row_len));
            return;
        }
    }
}

__device__ void index_scan(const ContraIndexScanParams& p) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.len; i += stride) {
        const long long v = p.values[i];
        if (v < p.lo || v >= p.hi || (p.forbid_self && v == i)) {
            atomicMin(p.status + p.slot, (int)i);
            return;
        }
    }
}

constexpr int kLossThreads = 256;

// Row i's term of the loss: the value itself, or the margin loss of a pair's scaled distance.
__device__ __forceinline__ double row_value(const ContraLossParams& p, int i) {
    const double v = (double)p.values[i];
    if (p.labels == nullptr) return v;
    const double d = ldexp(v, p.dist_exp);
    const double gap = p.labels[i] == 0 ? d : fmax(p.margin - d, 0.0);
    return 0.5 * gap * gap;
}

// One block; the additions run in a fixed order, so the loss is the same from run to run.
__device__ void loss_finish(const ContraLossParams& p) {
    __shared__ double partial[kLossThreads];
    double sum = 0.0;
    for (int i = threadIdx.x; i < p.n; i += kLossThreads) sum += row_value(p, i);
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int width = kLossThreads / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
        __syncthreads();
    }
    write_loss_words(p.out, p.status, p.slots, partial[0] / p.divisor);
}

}  // namespace contra

CONTRA_TYPED_KERNELS(nonfinite_rows, ContraScanParams, 256)
extern "C" __global__ void __launch_bounds__(256) index_scan(const ContraIndexScanParams p) { contra::index_scan(p); }
INTERP_EXPORT(index_scan, ContraIndexScanParams)
extern "C" __global__ void __launch_bounds__(contra::kLossThreads) loss_finish(const ContraLossParams p) { contra::loss_finish(p); }
INTERP_EXPORT(loss_finish, ContraLossParams)
