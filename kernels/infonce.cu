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
    __shared__ float exchange[kTile][kTilePad];  // the tensor-core engine's result tile
    __shared__ float col_max[16][kTile];  // CLIP: per-ty partial column statistics
    __shared__ float col_sum[16][kTile];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r0 = blockIdx.x * kTile;
    int row[kPerThread], positive[kPerThread], label[kPerThread];
    float positive_logit[kPerThread], target_weight[kPerThread];
    OnlineLse state[kPerThread];
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        row[i] = r0 + ty + 16 * i;
        positive[i] = (row[i] < p.rows && p.positives) ? p.positives[row[i]] : -1;
        label[i] = (row[i] < p.rows && p.labels) ? p.labels[row[i]] : 0;
        target_weight[i] = (row[i] < p.rows && p.labels) ? p.target_weight[row[i]] : 0.0f;
        positive_logit[i] = 0.0f;
        state[i].init();
        if (p.extra_key) {
            // MoCo's positive: scale * q_i . extra_key_i, from the 16 lanes that share row i.
            const T* extra = static_cast<const T*>(p.extra_key);
            float dot = 0.0f;
            if (row[i] < p.rows)
                for (int d = tx; d < p.dim; d += 16)
                    dot += load(q, (long long)row[i] * p.dim + d) * load(extra, (long long)row[i] * p.dim + d);
            const float logit = __fmul_rn(group_sum<16>(dot), p.scale);
            state[i].merge(logit, 1.0f);
            if (tx == 0) positive_logit[i] = logit;  // summed over the 16 lanes below
        }
    }
    float acc[kPerThread][kPerThread], unused_a[kPerThread], unused_b[kPerThread];
    for (int c0 = 0; c0 < p.cols; c0 += kTile) {
        tile_dot<T, false>(q, p.rows, r0, static_cast<const T*>(p.k), p.cols, c0, p.dim, exchange, acc, unused_a,
                           unused_b);
    #pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
            float logit[kPerThread], local_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int col = c0 + tx + 16 * j;
                const bool masked = col >= p.cols || (p.self_mask && col == row[i]);
                logit[j] = masked ? -INFINITY : __fmul_rn(acc[i][j], p.scale);
                if (p.labels) {
                    // SupCon: every other row with the same label, weighted 1 / |P(i)|.
                    if (!masked && p.labels[col] == label[i]) positive_logit[i] += logit[j] * target_weight[i];
                } else if (col == positive[i]) {
                    positive_logit[i] += logit[j];
                }
                local_max = fmaxf(local_max, logit[j]);
            }
            // The 16 lanes holding row i agree on its tile max and sum (all lanes shuffle).
            const float tile_max = group_max<16>(local_max);
            float local_sum = 0.0f;
            if (tile_max != -INFINITY)
#pragma unroll
                for (int j = 0; j < kPerThread; ++j) local_sum += expf(logit[j] - tile_max);
            state[i].merge(tile_max, group_sum<16>(local_sum));
        }
        if (p.col_state) {
            // CLIP's column log-sum-exp from the same logits: reduce this block's 64 rows per
            // column (4 per thread, then the 16 ty's through shared memory), then fold into the
            // column's global state.
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                float logit[kPerThread], local_max = -INFINITY, local_sum = 0.0f;
#pragma unroll
                for (int i = 0; i < kPerThread; ++i) {
                    logit[i] = row[i] < p.rows ? __fmul_rn(acc[i][j], p.scale) : -INFINITY;
                    local_max = fmaxf(local_max, logit[i]);
                }
                if (local_max != -INFINITY)
#pragma unroll
                    for (int i = 0; i < kPerThread; ++i) local_sum += expf(logit[i] - local_max);
                col_max[ty][tx + 16 * j] = local_max;
                col_sum[ty][tx + 16 * j] = local_sum;
            }
            __syncthreads();
            if (ty == 0) {
                for (int j = 0; j < kPerThread; ++j) {
                    const int c = tx + 16 * j;
                    if (c0 + c >= p.cols) continue;
                    float m = -INFINITY, s = 0.0f;
                    for (int k = 0; k < 16; ++k) m = fmaxf(m, col_max[k][c]);
                    if (m != -INFINITY)
                        for (int k = 0; k < 16; ++k)
                            if (col_max[k][c] != -INFINITY) s += col_sum[k][c] * expf(col_max[k][c] - m);
                    merge_lse_state(p.col_state + c0 + c, m, s);
                }
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const float pos = group_sum<16>(positive_logit[i]);
        if (tx == 0 && row[i] < p.rows) {
            // A row with every key masked (a lone SupCon view) has an empty softmax: its loss is 0
            // and its saved lse 0 (as on the CPU), never -inf.
            const float lse = state[i].running_sum > 0.0f ? state[i].value() : 0.0f;
            p.lse[row[i]] = lse;
            // A SupCon anchor without positives adds 0 (it still counts in the mean).
            p.row_loss[row[i]] = (p.labels && target_weight[i] == 0.0f) ? 0.0f : lse - pos;
        }
    }
}

// The backward's second product: grad[o0 + r] (+)= sum_t g[r][t] * other[t0 + t] over the 64 x
// 64 tile g, in 64-feature chunks (overwrite: the first tile of a non-accumulating pass).
// CUDA cores, f32: thread (ty, tx) owns rows ty + 16 i and features tx + 16 j of each chunk.
template <typename T>
__device__ void grad_product(const float (*g)[kTilePad], const T* other_rows, int n_other, int t0, int dim, int o0,
                             int n_owner, float* grad, bool overwrite) {
    __shared__ float other[kTile][kTilePad];  // 64 other rows x 64 features
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    for (int d0 = 0; d0 < dim; d0 += kTile) {
        __syncthreads();  // g is complete / the previous chunk of `other` is consumed
        for (int e = tid; e < kTile * kTile; e += 256) {
            const int t = e / kTile, d = e % kTile;
            other[t][d] = (t0 + t < n_other && d0 + d < dim) ? load(other_rows, (long long)(t0 + t) * dim + d0 + d) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int o = o0 + ty + 16 * i;
            float out[kPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int t = 0; t < kTile; ++t) {
                const float gv = g[ty + 16 * i][t];
#pragma unroll
                for (int j = 0; j < kPerThread; ++j) out[j] = fmaf(gv, other[t][tx + 16 * j], out[j]);
            }
            if (o >= n_owner) continue;
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int d = d0 + tx + 16 * j;
                if (d >= dim) continue;
                float* dst = grad + (long long)o * dim + d;
                *dst = overwrite ? out[j] : *dst + out[j];
            }
        }
    }
}

// bf16 packed pair of two f32 values (round to nearest even), the lower index in the low half.
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

// grad_product on the tensor cores (bf16 inputs): G rounded to bf16 as the A operand (its range
// is f32's, so small probabilities do not underflow; f16 inputs keep the f32 path for that
// reason), the other rows' 64-feature chunk staged transposed as the "col" B operand, f32
// accumulators written straight to grad (each element by exactly one lane).
__device__ void grad_product_tc(const float (*g)[kTilePad], const __nv_bfloat16* other_rows, int n_other, int t0,
                                int dim, int o0, int n_owner, float* grad, bool overwrite) {
    constexpr int kStride = kTile + 8;  // other_t row: 64 other rows, padded
    __shared__ __align__(16) unsigned short other_t[kTile][kStride];  // [feature][other row]
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gr = lane / 4, tq = lane % 4;
    const int m0 = 16 * (warp % 4), n0 = 32 * (warp / 4);  // owner rows, features of this warp
    const unsigned short* bits = reinterpret_cast<const unsigned short*>(other_rows);
    for (int d0 = 0; d0 < dim; d0 += kTile) {
        __syncthreads();  // g is complete / the previous chunk is consumed
        for (int e = tid; e < kTile * kTile; e += 256) {
            const int t = e / kTile, d = e % kTile;  // consecutive threads read consecutive features
            other_t[d][t] = (t0 + t < n_other && d0 + d < dim) ? bits[(long long)(t0 + t) * dim + d0 + d] : 0;
        }
        __syncthreads();
        float out[4][4];
        for (int nt = 0; nt < 4; ++nt)
            for (int e = 0; e < 4; ++e) out[nt][e] = 0.0f;
        for (int k0 = 0; k0 < kTile; k0 += 16) {
            const unsigned af[4] = {bf16_pair(g[m0 + gr][k0 + 2 * tq], g[m0 + gr][k0 + 2 * tq + 1]),
                                    bf16_pair(g[m0 + gr + 8][k0 + 2 * tq], g[m0 + gr + 8][k0 + 2 * tq + 1]),
                                    bf16_pair(g[m0 + gr][k0 + 2 * tq + 8], g[m0 + gr][k0 + 2 * tq + 9]),
                                    bf16_pair(g[m0 + gr + 8][k0 + 2 * tq + 8], g[m0 + gr + 8][k0 + 2 * tq + 9])};
            for (int nt = 0; nt < 4; ++nt) {
                const int n = n0 + 8 * nt + gr;
                const unsigned bf[2] = {pair_at(&other_t[n][k0 + 2 * tq]), pair_at(&other_t[n][k0 + 2 * tq + 8])};
                mma_16816<__nv_bfloat16>(out[nt], af, bf);
            }
        }
        for (int nt = 0; nt < 4; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int o = o0 + m0 + gr + 8 * (e / 2), d = d0 + n0 + 8 * nt + 2 * tq + e % 2;
                if (o >= n_owner || d >= dim) continue;
                float* dst = grad + (long long)o * dim + d;
                *dst = overwrite ? out[nt][e] : *dst + out[nt][e];
            }
    }
}

template <typename T>
__device__ void infonce_bwd(const ContraInfonceBwdParams& p) {
    __shared__ float g[kTile][kTilePad];  // G restricted to this (owner, other) tile
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const int o0 = blockIdx.x * kTile;
    const T* owner_rows = static_cast<const T*>(p.owner);
    const T* other_rows = static_cast<const T*>(p.other);
    float* grad = static_cast<float*>(p.grad_owner);
    float acc[kPerThread][kPerThread], unused_a[kPerThread], unused_b[kPerThread];
    float log_scale_acc = 0.0f;  // CLIP: this thread's share of sum_ij dlogit_ij * logit_ij
    for (int t0 = 0; t0 < p.other_rows; t0 += kTile) {
        tile_dot<T, false>(owner_rows, p.owner_rows, o0, other_rows, p.other_rows, t0, p.dim, g, acc, unused_a,
                           unused_b);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int o = o0 + ty + 16 * i;
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int t = t0 + tx + 16 * j;
                const int qi = p.owner_is_query ? o : t, kj = p.owner_is_query ? t : o;
                float value = 0.0f;
                if (o < p.owner_rows && t < p.other_rows && !(p.self_mask && qi == kj)) {
                    const float prob = expf(__fmul_rn(acc[i][j], p.scale) - p.lse[qi]);
                    float target = (p.positives && p.positives[qi] == kj) ? 1.0f : 0.0f, weight = 1.0f;
                    float prob_total = prob;
                    if (p.col_lse) {
                        // CLIP: the column softmax of the same logit, with the same target.
                        prob_total += expf(__fmul_rn(acc[i][j], p.scale) - p.col_lse[kj]);
                        target *= 2.0f;
                    }
                    if (p.labels) {
                        target = p.labels[qi] == p.labels[kj] ? p.target_weight[qi] : 0.0f;
                        weight = p.target_weight[qi] > 0.0f ? 1.0f : 0.0f;
                    }
                    const float dlogit = p.grad_scale * weight * (prob_total - target);
                    log_scale_acc += dlogit * __fmul_rn(acc[i][j], p.scale);
                    value = dlogit * p.scale;
                }
                g[ty + 16 * i][tx + 16 * j] = value;
            }
        }
        const bool overwrite = t0 == 0 && !p.accumulate;
        if constexpr (std::is_same<T, __nv_bfloat16>::value) {
            grad_product_tc(g, other_rows, p.other_rows, t0, p.dim, o0, p.owner_rows, grad, overwrite);
        } else {
            grad_product(g, other_rows, p.other_rows, t0, p.dim, o0, p.owner_rows, grad, overwrite);
        }
        __syncthreads();  // g and other are rewritten by the next tile
    }
    if (p.log_scale_partial) {
        // One partial per block (summed on the host in f64): warp sums, then the 8 warps.
        const float warp_total = warp_sum(log_scale_acc);
        __shared__ float warp_partial[8];
        if (tid % 32 == 0) warp_partial[tid / 32] = warp_total;
        __syncthreads();
        if (tid == 0) {
            float total = 0.0f;
            for (int w = 0; w < 8; ++w) total += warp_partial[w];
            p.log_scale_partial[blockIdx.x] = total;
        }
    }
}

// MoCo's extra logit in the backward: one warp per query row adds
// grad_scale * scale * (softmax of the extra logit - 1) * extra_key_i to grad_q_i.
template <typename T>
__device__ void infonce_extra_bwd(const ContraInfonceExtraBwdParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * 8 + threadIdx.x / 32;
    if (row >= p.rows) return;
    const T* q = static_cast<const T*>(p.q) + row * p.dim;
    const T* extra = static_cast<const T*>(p.extra_key) + row * p.dim;
    float dot = 0.0f;
    for (int d = lane; d < p.dim; d += 32) dot += load(q, d) * load(extra, d);
    const float logit = __fmul_rn(warp_sum(dot), p.scale);
    const float coef = p.grad_scale * p.scale * (expf(logit - p.lse[row]) - 1.0f);
    for (int d = lane; d < p.dim; d += 32) p.grad_q[row * p.dim + d] += coef * load(extra, d);
}

}  // namespace contra

CONTRA_TYPED_KERNELS(infonce_fwd, ContraInfonceFwdParams, 256)
CONTRA_TYPED_KERNELS(infonce_bwd, ContraInfonceBwdParams, 256)
CONTRA_TYPED_KERNELS(infonce_extra_bwd, ContraInfonceExtraBwdParams, 256)
