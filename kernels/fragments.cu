// Test kernels of the building blocks, built for the GPU as well as the interpreted mode (unlike
// testing.cu's deliberately faulty ones): tests compare the interpreted emulation with the
// hardware through them.
#include "common.cuh"
#include "tensor_core.cuh"

// ldmatrix's six forms (tensor_core.cuh) on a known tile, for the test that the interpreted
// layouts are the hardware's: four 8 x 8 matrices, element (i, r, c) = i * 64 + r * 8 + c + 1,
// stored with their rows in reverse order (a lane reading its own address instead of the
// row's owner gets another row). `y` receives, per form (x1, x2, x4, then .trans), 32 lanes x 4
// registers as raw words, 0 past the form's count. One warp.
template <int count, bool transposed>
__device__ void ldmatrix_form(unsigned* out) {
    __shared__ __align__(16) unsigned short tile[4][8][8];
    for (int k = threadIdx.x; k < 256; k += 32) tile[k / 64][7 - (k / 8) % 8][k % 8] = static_cast<unsigned short>(k + 1);
    __syncwarp();
    const int lane = threadIdx.x;
    unsigned d[4] = {0, 0, 0, 0};
    contra::ldmatrix<count, transposed>(d, &tile[lane / 8][7 - lane % 8][0]);
    for (int k = 0; k < 4; ++k) out[lane * 4 + k] = d[k];
    __syncwarp();
}

extern "C" __global__ void ldmatrix_test(const ContraNormalizeParams p) {
    unsigned* out = static_cast<unsigned*>(p.y);
    ldmatrix_form<1, false>(out);
    ldmatrix_form<2, false>(out + 128);
    ldmatrix_form<4, false>(out + 256);
    ldmatrix_form<1, true>(out + 384);
    ldmatrix_form<2, true>(out + 512);
    ldmatrix_form<4, true>(out + 640);
}
INTERP_EXPORT(ldmatrix_test, ContraNormalizeParams)
