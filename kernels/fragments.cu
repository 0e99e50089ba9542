// Test kernels of the building blocks, built for the GPU as well as the interpreted mode (unlike
// testing.cu's deliberately faulty ones): tests compare the interpreted emulation with the
// hardware through them.
#include "common.cuh"
#include "interp/dynamic_shared.h"
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

// mma_1688_tf32 and to_tf32 (tensor_core.cuh) on known operands, for the test that the
// interpreted layouts and rounding are the hardware's. One warp: A[i][k] = 1 + (8 i + k) / 128
// + 3 / 2^12 and B[k][n] = -(1 + (8 k + n) / 64 + 5 / 2^13), each a fraction of a tf32 unit off
// the grid so that the rounding shows; y[4 lane + e] receives lane's D fragment element e (D = A B,
// f32 bits), then y[128 + i] = to_tf32(x[i]) for 32 values x.
__device__ float tf32_test_a(int i, int k) { return 1.0f + (8 * i + k) / 128.0f + 3.0f / 4096.0f; }
__device__ float tf32_test_b(int k, int n) { return -(1.0f + (8 * k + n) / 64.0f + 5.0f / 8192.0f); }

extern "C" __global__ void tf32_mma_test(const ContraNormalizeParams p) {
    unsigned* out = static_cast<unsigned*>(p.y);
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    const unsigned a[4] = {contra::to_tf32(tf32_test_a(g, t)), contra::to_tf32(tf32_test_a(g + 8, t)),
                           contra::to_tf32(tf32_test_a(g, t + 4)), contra::to_tf32(tf32_test_a(g + 8, t + 4))};
    const unsigned b[2] = {contra::to_tf32(tf32_test_b(t, g)), contra::to_tf32(tf32_test_b(t + 4, g))};
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    contra::mma_1688_tf32(d, a, b);
    for (int e = 0; e < 4; ++e) out[4 * lane + e] = __float_as_uint(d[e]);
    out[128 + lane] = contra::to_tf32(static_cast<const float*>(p.x)[lane]);
}
INTERP_EXPORT(tf32_mma_test, ContraNormalizeParams)

// Dynamic shared memory beyond the default 48 KB: y[0] = the bytes the block has
// (dynamic_shared_size); every thread writes word i = i * 2654435761 of the whole buffer, then,
// after a barrier, reads back another thread's words: y[1] = how many words came back wrong.
// One block of 256 threads.
extern "C" __global__ void dynamic_shared_test(const ContraNormalizeParams p) {
    CONTRA_DYNAMIC_SHARED(unsigned, words);
    unsigned* out = static_cast<unsigned*>(p.y);
    const unsigned count = contra::dynamic_shared_size() / 4;
    for (unsigned i = threadIdx.x; i < count; i += blockDim.x) words[i] = i * 2654435761u;
    __syncthreads();
    __shared__ unsigned wrong;
    if (threadIdx.x == 0) wrong = 0;
    __syncthreads();
    unsigned mine = 0;
    for (unsigned i = blockDim.x - 1 - threadIdx.x; i < count; i += blockDim.x) mine += words[i] != i * 2654435761u;
    atomicAdd(&wrong, mine);
    __syncthreads();
    if (threadIdx.x == 0) {
        out[0] = count * 4;
        out[1] = wrong;
    }
}
INTERP_EXPORT(dynamic_shared_test, ContraNormalizeParams)
