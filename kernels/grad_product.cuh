// The backward's second products of a 64 x 64 gradient tile G (in shared memory) with a block
// of source rows, on the engine of the operand type: shared by the InfoNCE family and SigLIP.
#pragma once
#include "infonce_tc.cuh"

namespace contra {

// The backward's second products, on CUDA cores (f32 accumulation):
// out[dst0 + r] (how)= sum_t G'[r][t] src[src0 + t] over the 64 x 64 tile G' (g, or g^T with
// `transposed`), in 64-feature chunks staged in `staged` (64 src rows x 64 features). Thread
// (ty, tx) owns rows ty + 16 i and features tx + 16 j of each chunk.
template <bool transposed, typename T>
__device__ void grad_product(const float (*g)[kTilePad], float (*staged)[kTilePad], const T* src, int n_src, int src0,
                             int dim, float* out, int dst0, int n_dst, Write how) {
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    for (int d0 = 0; d0 < dim; d0 += kTile) {
        __syncthreads();  // g is complete / the previous chunk is consumed
        for (int e = tid; e < kTile * kTile; e += 256) {
            const int t = e / kTile, d = e % kTile;
            staged[t][d] = (src0 + t < n_src && d0 + d < dim) ? load(src, (long long)(src0 + t) * dim + d0 + d) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int r = ty + 16 * i;
            float sum[kPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int t = 0; t < kTile; ++t) {
                const float gv = transposed ? g[t][r] : g[r][t];  // resolved at compile time
#pragma unroll
                for (int j = 0; j < kPerThread; ++j) sum[j] = fmaf(gv, staged[t][tx + 16 * j], sum[j]);
            }
            if (dst0 + r >= n_dst) continue;
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int d = d0 + tx + 16 * j;
                if (d < dim) write_grad(out + (long long)(dst0 + r) * dim + d, sum[j], how);
            }
        }
    }
}

// The second products on the TF32 tensor cores: the same product as grad_product, with G' and
// the src chunk rounded to tf32 as the mma operands (G keeps f32's range, so small
// probabilities do not underflow). Warp w owns output rows 16 (w % 4) .. +16 and features
// 32 (w / 4) .. +32 of each chunk. The chunk is staged row-major (cp.async) in the first 64 x 64
// floats of `staged`, each row's 8-feature groups permuted (feature d of src row s at d ^ 8 (s % 4)), so
// that the B fragment's 32 loads (rows s .. s + 3, 8 features each) hit 32 different banks.
__device__ __forceinline__ int tf32_staged_at(int s, int d) { return s * kTile + (d ^ (8 * (s % 4))); }

template <bool transposed>
__device__ void grad_product_tf32(const float (*g)[kTilePad], float (*staged)[kTilePad], const tf32* src, int n_src,
                                  int src0, int dim, float* out, int dst0, int n_dst, Write how) {
    float* chunk = &staged[0][0];
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gr = lane / 4, t = lane % 4, m0 = 16 * (warp % 4), n0 = 32 * (warp / 4);
    auto g_at = [&](int row, int k) { return to_tf32(transposed ? g[k][row] : g[row][k]); };
    for (int d0 = 0; d0 < dim; d0 += kTile) {
        __syncthreads();  // g is complete / the previous chunk is consumed
        // 16-byte copies: the permutation moves whole 8-feature groups, so 4 features stay together.
        for (int c = tid; c < kTile * kTile / 4; c += 256) {
            const int s = c / (kTile / 4), d = 4 * (c % (kTile / 4));
            stage_16_bytes(src, n_src, dim, src0 + s, d0 + d, reinterpret_cast<unsigned*>(chunk) + tf32_staged_at(s, d));
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        float sum[4][4] = {};
#pragma unroll
        for (int k0 = 0; k0 < kTile; k0 += 8) {
            const int k = k0 + t;
            const unsigned af[4] = {g_at(m0 + gr, k), g_at(m0 + gr + 8, k), g_at(m0 + gr, k + 4),
                                    g_at(m0 + gr + 8, k + 4)};
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int n = n0 + 8 * nt + gr;
                const unsigned bf[2] = {to_tf32(chunk[tf32_staged_at(k, n)]), to_tf32(chunk[tf32_staged_at(k + 4, n)])};
                mma_1688_tf32(sum[nt], af, bf);
            }
        }
        write_chunk(sum, out, dst0, n_dst, d0, dim, how);
    }
}

// The second products on the engine of the operand type: tensor cores for bf16 (see
// grad_product_tc) and tf32, CUDA cores otherwise (f16's G would underflow as an mma operand).
template <bool transposed, typename T>
__device__ void grad_product_for(const float (*g)[kTilePad], float (*staged)[kTilePad], const T* src, int n_src,
                                 int src0, int dim, float* out, int dst0, int n_dst, Write how) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        grad_product_tc<transposed>(g, staged, src, n_src, src0, dim, out, dst0, n_dst, how);
    } else if constexpr (kIsTf32<T>) {
        grad_product_tf32<transposed>(g, staged, src, n_src, src0, dim, out, dst0, n_dst, how);
    } else {
        grad_product<transposed>(g, staged, src, n_src, src0, dim, out, dst0, n_dst, how);
    }
}

}  // namespace contra
