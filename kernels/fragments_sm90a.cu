// The warpgroup MMA of wgmma.cuh on known operands, built for sm_90a as well as the interpreted
// mode, for the test that the emulated descriptors, swizzle and accumulator layout are the
// hardware's (as fragments.cu does for ldmatrix and the tf32 mma).
#include "common.cuh"
#include "interp/dynamic_shared.h"
#include "wgmma.cuh"

// Small integers, exact in bf16, whose products and sums of 64 are exact in f32.
__device__ __forceinline__ float wgmma_test_a(int row, int k) { return static_cast<float>((7 * row + 3 * k) % 17 - 8); }
__device__ __forceinline__ float wgmma_test_b(int row, int k) { return static_cast<float>((5 * row + 11 * k) % 13 - 6); }

// Four k-steps of a 64 x N product by the warpgroup, k-step ks reading the operands a_of(ks) and
// b_of(ks), onto accumulators that hold NaN (the first op must overwrite them); thread tid's N / 2
// accumulators go to out[first + N / 2 tid + i] as f32 bits.
template <typename T, int N, bool kTransA = false, bool kTransB = false, typename A, typename B>
__device__ __forceinline__ void wgmma_test_product(unsigned* out, int first, A a_of, B b_of) {
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) d[i] = __int_as_float(0x7fc00000);
    contra::wgmma_fence(d, N / 2);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) contra::wgmma_k_step<T, N, kTransA, kTransB>(d, a_of(ks), b_of(ks), ks > 0);
    contra::wgmma_commit();
    contra::wgmma_wait<0>();
    contra::wgmma_fence_operands(d, N / 2);
    for (int i = 0; i < N / 2; ++i) out[first + N / 2 * threadIdx.x + i] = __float_as_uint(d[i]);
}

// One warpgroup (128 threads) and 1024 + 28 KB of dynamic shared memory: panels A and B of 64
// rows and 64 columns each, bf16, and A' (64 rows) and B' (32 rows) of 32 f32 columns, each
// 128-byte swizzled (written element by element with plain stores). Then three products
// (wgmma_test_product: four k-steps, onto NaN accumulators): D = A B[0..32)^T with both operands K-major (wgmma m64n32k16, a k-step 32 bytes
// into the rows), y[16 tid + i] receiving thread tid's d[i] (f32 bits); and E = A^T B with both
// MN-major (the panels' rows are K, a k-step 16 rows on; m64n64k16, as the wgmma backward's dQ
// and dK products), y[2048 + 32 tid + i] receiving e[i]; then F = A' B'^T, both K-major tf32
// (m64n32k8, a k-step 32 bytes into the rows), y[6144 + 16 tid + i] receiving f[i].
extern "C" __global__ void wgmma_test(const ContraNormalizeParams p) {
    CONTRA_DYNAMIC_SHARED(unsigned char, shared);
    using contra::kSwizzleAtomBytes;
    constexpr unsigned kPanel = 64 * contra::kSwizzleRowBytes;
    unsigned char* a = shared + (kSwizzleAtomBytes - contra::shared_window(shared) % kSwizzleAtomBytes) % kSwizzleAtomBytes;
    unsigned char* b = a + kPanel;
    unsigned char* a32 = b + kPanel;
    unsigned char* b32 = a32 + kPanel;
    const int tid = threadIdx.x;
    for (int e = tid; e < (64 + 32) * 32; e += blockDim.x) {
        const int row = e / 32 % 64, k = e % 32;
        const bool is_a = e < 64 * 32;
        const float value = is_a ? wgmma_test_a(row, k) : wgmma_test_b(row, k);
        const unsigned offset = contra::swizzled_chunk(row, k / 4) + 4 * (k % 4);
        *reinterpret_cast<float*>((is_a ? a32 : b32) + offset) = value;
    }
    for (int e = tid; e < 2 * 64 * 64; e += blockDim.x) {
        const int row = e / 64 % 64, k = e % 64;
        const bool is_a = e < 64 * 64;
        const float value = is_a ? wgmma_test_a(row, k) : wgmma_test_b(row, k);
        const unsigned offset = contra::swizzled_chunk(row, k / 8) + 2 * (k % 8);
        *reinterpret_cast<__nv_bfloat16*>((is_a ? a : b) + offset) = __float2bfloat16_rn(value);
    }
    contra::fence_async_shared();
    __syncthreads();
    unsigned* out = static_cast<unsigned*>(p.y);
    const unsigned a_address = contra::shared_window(a), b_address = contra::shared_window(b);
    const unsigned a32_address = contra::shared_window(a32), b32_address = contra::shared_window(b32);
    const auto k_major = [](unsigned address) {
        return [address](int ks) { return contra::swizzled_operand(address + 32 * ks); };
    };
    const auto mn_major = [kPanel](unsigned address) {
        return [address, kPanel](int ks) {
            return contra::swizzled_descriptor(address + 16 * contra::kSwizzleRowBytes * ks, kPanel);
        };
    };
    wgmma_test_product<__nv_bfloat16, 32>(out, 0, k_major(a_address), k_major(b_address));
    wgmma_test_product<__nv_bfloat16, 64, true, true>(out, 2048, mn_major(a_address), mn_major(b_address));
    wgmma_test_product<contra::tf32, 32>(out, 6144, k_major(a32_address), k_major(b32_address));
}
INTERP_EXPORT(wgmma_test, ContraNormalizeParams)
