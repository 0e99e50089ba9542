// The fused InfoNCE family (infonce, ntxent): logits_ij = scale * q_i . k_j, never materialized.
//
// Forward: one block per 64 query rows walks the key tiles, keeping a running max and sum of
// exponentials per row (OnlineLse); it writes only lse (N floats) and the per-row loss.
//
// Backward, and the dK strategy: dQ = G K and dK = G^T Q with
// G_ij = grad_scale * scale * (softmax_ij - [j == p_i]). We run the same kernel twice, once with
// query rows as the "owner" (writes dQ) and once with key rows as the owner (writes dK); each
// block recomputes its score tiles from lse and owns its output rows exclusively. Cost: the score
// GEMM is recomputed in both passes (forward 1 + backward 2x2 = 5 GEMM-equivalents of N M D
// multiply-adds, against 3 for an N x M matrix kept in memory), in exchange for O(N + M) memory,
// no atomics, and a deterministic result. The tensor-core path may fuse the two passes.
#include "tile_dot.cuh"

// The logit is rounded once (__fmul_rn) and identically in both passes: left to itself, nvcc
// fuses `acc * scale - lse` into one FMA in the backward only, and a row whose softmax is a
// single key then gets exp(tiny) - 1 != 0 instead of an exactly zero gradient.

namespace contra {

template <typename T>
__device__ void infonce_fwd(const ContraInfonceFwdParams& p) {
    __shared__ float as[kSlice][kTilePad];
    __shared__ float bs[kSlice][kTilePad];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r0 = blockIdx.x * kTile;
    int row[kPerThread], positive[kPerThread];
    float positive_logit[kPerThread];
    OnlineLse state[kPerThread];
    for (int i = 0; i < kPerThread; ++i) {
        row[i] = r0 + ty + 16 * i;
        positive[i] = row[i] < p.rows ? p.positives[row[i]] : -1;
        positive_logit[i] = 0.0f;
        state[i].init();
    }
    float acc[kPerThread][kPerThread], unused_a[kPerThread], unused_b[kPerThread];
    for (int c0 = 0; c0 < p.cols; c0 += kTile) {
        tile_dot<T, false>(static_cast<const T*>(p.q), p.rows, r0, static_cast<const T*>(p.k), p.cols, c0, p.dim, as,
                           bs, acc, unused_a, unused_b);
        for (int i = 0; i < kPerThread; ++i) {
            float logit[kPerThread], local_max = -INFINITY;
            for (int j = 0; j < kPerThread; ++j) {
                const int col = c0 + tx + 16 * j;
                const bool masked = col >= p.cols || (p.self_mask && col == row[i]);
                logit[j] = masked ? -INFINITY : __fmul_rn(acc[i][j], p.scale);
                if (col == positive[i]) positive_logit[i] += logit[j];
                local_max = fmaxf(local_max, logit[j]);
            }
            // The 16 lanes holding row i agree on its tile max and sum (all lanes shuffle).
            const float tile_max = group_max<16>(local_max);
            float local_sum = 0.0f;
            if (tile_max != -INFINITY)
                for (int j = 0; j < kPerThread; ++j) local_sum += expf(logit[j] - tile_max);
            state[i].merge(tile_max, group_sum<16>(local_sum));
        }
    }
    for (int i = 0; i < kPerThread; ++i) {
        const float pos = group_sum<16>(positive_logit[i]);
        if (tx == 0 && row[i] < p.rows) {
            const float lse = state[i].value();
            p.lse[row[i]] = lse;
            p.row_loss[row[i]] = lse - pos;
        }
    }
}

template <typename T>
__device__ void infonce_bwd(const ContraInfonceBwdParams& p) {
    __shared__ float as[kSlice][kTilePad];
    __shared__ float bs[kSlice][kTilePad];
    __shared__ float g[kTile][kTilePad];      // G restricted to this (owner, other) tile
    __shared__ float other[kTile][kTilePad];  // 64 other rows x 64 features
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const int o0 = blockIdx.x * kTile;
    const T* owner_rows = static_cast<const T*>(p.owner);
    const T* other_rows = static_cast<const T*>(p.other);
    float* grad = static_cast<float*>(p.grad_owner);
    float acc[kPerThread][kPerThread], unused_a[kPerThread], unused_b[kPerThread];
    for (int t0 = 0; t0 < p.other_rows; t0 += kTile) {
        tile_dot<T, false>(owner_rows, p.owner_rows, o0, other_rows, p.other_rows, t0, p.dim, as, bs, acc, unused_a,
                           unused_b);
        for (int i = 0; i < kPerThread; ++i) {
            const int o = o0 + ty + 16 * i;
            for (int j = 0; j < kPerThread; ++j) {
                const int t = t0 + tx + 16 * j;
                const int qi = p.owner_is_query ? o : t, kj = p.owner_is_query ? t : o;
                float value = 0.0f;
                if (o < p.owner_rows && t < p.other_rows && !(p.self_mask && qi == kj)) {
                    const float prob = expf(__fmul_rn(acc[i][j], p.scale) - p.lse[qi]);
                    value = p.grad_scale * p.scale * (prob - (p.positives[qi] == kj ? 1.0f : 0.0f));
                }
                g[ty + 16 * i][tx + 16 * j] = value;
            }
        }
        for (int d0 = 0; d0 < p.dim; d0 += kTile) {
            __syncthreads();  // g is complete / the previous chunk of `other` is consumed
            for (int e = tid; e < kTile * kTile; e += 256) {
                const int t = e / kTile, d = e % kTile;
                other[t][d] = (t0 + t < p.other_rows && d0 + d < p.dim)
                                  ? load(other_rows, (long long)(t0 + t) * p.dim + d0 + d)
                                  : 0.0f;
            }
            __syncthreads();
            for (int i = 0; i < kPerThread; ++i) {
                const int o = o0 + ty + 16 * i;
                float out[kPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int t = 0; t < kTile; ++t) {
                    const float gv = g[ty + 16 * i][t];
                    for (int j = 0; j < kPerThread; ++j) out[j] = fmaf(gv, other[t][tx + 16 * j], out[j]);
                }
                if (o >= p.owner_rows) continue;
                for (int j = 0; j < kPerThread; ++j) {
                    const int d = d0 + tx + 16 * j;
                    if (d >= p.dim) continue;
                    float* dst = grad + (long long)o * p.dim + d;
                    *dst = (t0 == 0 && !p.accumulate) ? out[j] : *dst + out[j];
                }
            }
        }
        __syncthreads();  // g and other are rewritten by the next tile
    }
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) infonce_fwd_f32(const ContraInfonceFwdParams p) { contra::infonce_fwd<float>(p); }
extern "C" __global__ void __launch_bounds__(256) infonce_bwd_f32(const ContraInfonceBwdParams p) { contra::infonce_bwd<float>(p); }
INTERP_EXPORT(infonce_fwd_f32, ContraInfonceFwdParams)
INTERP_EXPORT(infonce_bwd_f32, ContraInfonceBwdParams)
