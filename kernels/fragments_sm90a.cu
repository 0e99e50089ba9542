// The warpgroup MMA of wgmma.cuh on known operands, built for sm_90a as well as the interpreted
// mode, for the test that the emulated descriptors, swizzle and accumulator layout are the
// hardware's (as fragments.cu does for ldmatrix and the tf32 mma).
#include "common.cuh"
#include "interp/dynamic_shared.h"
#include "wgmma.cuh"

// Small integers, exact in bf16, whose products and sums of 64 are exact in f32.
__device__ __forceinline__ float wgmma_test_a(int row, int k) { return static_cast<float>((7 * row + 3 * k) % 17 - 8); }
__device__ __forceinline__ float wgmma_test_b(int col, int k) { return static_cast<float>((5 * col + 11 * k) % 13 - 6); }

// One warpgroup (128 threads) and 1024 + 12 KB of dynamic shared memory: panels A (64 rows) and
// B (32 rows) of 64 columns each, bf16, 128-byte swizzled (written element by element with plain
// stores). Then five products by four k-steps each, each first op overwriting accumulators that
// hold NaN: D = A B^T with both K-major (wgmma m64n32k16), y[16 tid + i] receiving thread tid's
// d[i] (f32 bits); and for o = 0..3, E_o = A^T A[:, 16 o..16 o + 16), both MN-major (the panel's
// rows are K; the second operand starts 32 o bytes into the panel's rows, as the fused backward's
// warpgroups do; m64n16k16), y[2048 + 32 tid + 8 o + i] receiving e[i].
extern "C" __global__ void wgmma_test(const ContraNormalizeParams p) {
    CONTRA_DYNAMIC_SHARED(unsigned char, shared);
    using contra::kSwizzleAtomBytes;
    unsigned char* a = shared + (kSwizzleAtomBytes - contra::shared_window(shared) % kSwizzleAtomBytes) % kSwizzleAtomBytes;
    unsigned char* b = a + 64 * contra::kSwizzleRowBytes;
    const int tid = threadIdx.x;
    for (int e = tid; e < (64 + 32) * 64; e += blockDim.x) {
        const int row = e / 64 % 64, k = e % 64;
        const bool is_a = e < 64 * 64;
        const float value = is_a ? wgmma_test_a(row, k) : wgmma_test_b(e / 64 - 64, k);
        unsigned char* panel = is_a ? a : b;
        const int r = is_a ? row : e / 64 - 64;
        const unsigned offset = contra::swizzled_chunk(r, k / 8) + 2 * (k % 8);
        *reinterpret_cast<__nv_bfloat16*>(panel + offset) = __float2bfloat16_rn(value);
    }
    contra::fence_async_shared();
    __syncthreads();
    unsigned* out = static_cast<unsigned*>(p.y);
    float d[16];
    for (int i = 0; i < 16; ++i) d[i] = __int_as_float(0x7fc00000);
    const unsigned a_address = contra::shared_window(a), b_address = contra::shared_window(b);
    contra::wgmma_fence(d, 16);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
        contra::wgmma_64xNx16<__nv_bfloat16, 32>(d, contra::swizzled_operand(a_address + 32 * ks),
                                              contra::swizzled_operand(b_address + 32 * ks), ks > 0);
    contra::wgmma_commit();
    contra::wgmma_wait<0>();
    contra::wgmma_fence_operands(d, 16);
    for (int i = 0; i < 16; ++i) out[16 * tid + i] = __float_as_uint(d[i]);
    constexpr unsigned kPanel = 64 * contra::kSwizzleRowBytes;
#pragma unroll
    for (int o = 0; o < 4; ++o) {
        float e[8];
        for (int i = 0; i < 8; ++i) e[i] = __int_as_float(0x7fc00000);
        contra::wgmma_fence(e, 8);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            const unsigned rows = 16 * contra::kSwizzleRowBytes * ks;
            contra::wgmma_64xNx16<__nv_bfloat16, 16, true, true>(
                e, contra::swizzled_descriptor(a_address + rows, kPanel),
                contra::swizzled_descriptor(a_address + rows + 2 * 16 * o, kPanel), ks > 0);
        }
        contra::wgmma_commit();
        contra::wgmma_wait<0>();
        contra::wgmma_fence_operands(e, 8);
        for (int i = 0; i < 8; ++i) out[2048 + 32 * tid + 8 * o + i] = __float_as_uint(e[i]);
    }
}
INTERP_EXPORT(wgmma_test, ContraNormalizeParams)
