// What the InfoNCE family's backward computes per logit (G_ij, CLIP's log-scale term) and the
// parts of its key sweep that the fused backward (infonce.cu) and Hopper's (infonce_sm90a.cu)
// share: the order of a block's key tiles, and G on a warp's 16 x 16 part of a score tile.
#pragma once
#include "infonce_tc.cuh"

namespace contra {

// What the softmax gradient reads of one index, as a query (row) or as a key (column), loaded
// once: a kernel that meets the same index many times (the fused backward's rows for the whole
// sweep, its columns for a tile) keeps it in registers. Only the inputs p has are read.
struct LogitEnd {
    float lse2;           // the row softmax's lse, log2 units
    float col_lse2;       // CLIP: the column softmax's lse, log2 units
    float diag;           // CLIP's log-scale term: the index's own (positive) dot product
    float target_weight;  // SupCon: 1 / |P(i)|, 0 without positives
    int positive;         // the positive key, -1 for none
    int label;            // SupCon

    template <typename Loss = AnyLoss>
    __device__ __forceinline__ static LogitEnd load(const ContraInfonceBwdParams& p, int i) {
        LogitEnd end;
        end.lse2 = __fmul_rn(p.lse[i], kLog2e);
        end.col_lse2 = Loss::column_softmax(p) ? __fmul_rn(p.col_lse[i], kLog2e) : 0.0f;
        end.diag = Loss::log_scale(p) ? p.diag_dot[i] : 0.0f;
        end.target_weight = Loss::labels(p) ? p.target_weight[i] : 0.0f;
        end.positive = p.positives ? p.positives[i] : -1;
        end.label = Loss::labels(p) ? p.labels[i] : 0;
        return end;
    }
};

// d(grad_scale * loss) / d logit_ij for query i and key j, from u = logit_ij log2(e).
template <typename Loss>
__device__ __forceinline__ float dlogit(const ContraInfonceBwdParams& p, int qi, const LogitEnd& q, int kj,
                                        const LogitEnd& k, float u) {
    float prob = exp2f(u - q.lse2);
    float target = q.positive == kj ? 1.0f : 0.0f, weight = 1.0f;
    if (Loss::column_softmax(p)) {
        // CLIP: the column softmax of the same logit, with the same target.
        prob += exp2f(u - k.col_lse2);
        target *= 2.0f;
    }
    if (Loss::labels(p)) {
        // SupCon: every other row with the anchor's label, weighted 1 / |P(i)|.
        target = q.label == k.label ? q.target_weight : 0.0f;
        weight = q.target_weight > 0.0f ? 1.0f : 0.0f;
    }
    // A select, not an early return: no divergent branch around each element's exponentials.
    return (p.self_mask && qi == kj) ? 0.0f : p.grad_scale * weight * (prob - target);
}

// CLIP's share of d(grad_scale * loss) / d log_scale at logit (i, j), centred: the row softmax
// minus its target against row i's own logit, the column softmax minus its target against column
// j's. Each sums to zero along its row (column), so the centring changes only the rounding; the
// plain sum of dlogit * logit cancels terms of size `scale` down to `scale * spread` when the
// embeddings cluster, and got the sign wrong.
__device__ __forceinline__ float clip_log_scale_term(const ContraInfonceBwdParams& p, float scale, const LogitEnd& q,
                                                      int kj, const LogitEnd& k, float u, float dot) {
    const float target = q.positive == kj ? 1.0f : 0.0f;
    const float row = exp2f(u - q.lse2) - target;
    const float col = exp2f(u - k.col_lse2) - target;
    return p.grad_scale * scale * (row * (dot - q.diag) + col * (dot - k.diag));
}

// G at logit (i, j) (both directions of a symmetric sweep: logit_ji == logit_ij), and CLIP's
// log-scale term there (0 without it).
template <typename Loss = AnyLoss>
__device__ __forceinline__ float softmax_grad(const ContraInfonceBwdParams& p, float scale, int qi, const LogitEnd& q,
                                              int kj, const LogitEnd& k, float dot, float& log_scale_term) {
    const float u = __fmul_rn(dot, scale * kLog2e);
    float dl = dlogit<Loss>(p, qi, q, kj, k, u);
    if (Loss::symmetric(p)) dl += dlogit<Loss>(p, kj, k, qi, q, u);
    log_scale_term = Loss::log_scale(p) ? clip_log_scale_term(p, scale, q, kj, k, u, dot) : 0.0f;
    return dl * scale;
}

// CLIP: one partial of sum_ij dlogit_ij * logit_ij per block, row tile x and key range y at
// y * gridDim.x + x (summed in f64 after): warp sums, then the block's kWarps warps. Every thread
// of the block calls it.
template <int kWarps = 8>
__device__ __forceinline__ void write_log_scale_partial(const ContraInfonceBwdParams& p, float acc) {
    if (!p.log_scale_partial) return;
    const int tid = threadIdx.y * 16 + threadIdx.x;
    const float warp_total = warp_sum(acc);
    __shared__ float warp_partial[kWarps];
    if (tid % 32 == 0) warp_partial[tid / 32] = warp_total;
    __syncthreads();
    if (tid == 0) {
        float total = 0.0f;
        for (int w = 0; w < kWarps; ++w) total += warp_partial[w];
        p.log_scale_partial[(long long)blockIdx.y * gridDim.x + blockIdx.x] = total;
    }
}

// The key tiles of a backward block: its key range (all keys, or range blockIdx.y of a split),
// and their order. With dK, block b starts at key tile b (mod the tiles), so that the blocks'
// atomic adds land on different keys' rows; each next tile is one on, wrapping round (no
// division).
struct BackwardKeys {
    bool split;
    int c_begin, c_end, steps;
    __device__ __forceinline__ explicit BackwardKeys(const ContraInfonceBwdParams& p)
        : split(p.split_tiles > 0),
          c_begin(split ? blockIdx.y * p.split_tiles * kTile : 0),
          c_end(split ? min(p.cols, c_begin + p.split_tiles * kTile) : p.cols),
          steps((c_end - c_begin + kTile - 1) / kTile) {}
    __device__ __forceinline__ int first_column(const ContraInfonceBwdParams& p) const {
        return c_begin + ((p.grad_k && steps > 0) ? blockIdx.x % steps : 0) * kTile;
    }
    __device__ __forceinline__ int next_column(int c) const { return c + kTile < c_end ? c + kTile : c_begin; }
};

// 2^e for e in [-126, 127] (a normal f32, exactly).
__device__ __forceinline__ float power_of_two(int e) { return __int_as_float((127 + e) << 23); }

// The exponent e that brings x (> 0) into [1, 2) as 2^e x, within [-126, 126] so that 2^e and
// 2^-e are normal f32 values; 0 for x zero, negative, inf or NaN.
__device__ __forceinline__ int normalizing_exponent(float x) {
    const int biased = (__float_as_int(x) >> 23) & 0xff;
    if (!(x > 0.0f) || biased == 0xff) return 0;
    return min(max(127 - biased, -126), 126);
}

// G on a warp's 16 x 16 part of a score tile, from S's accumulator fragments: this lane's two
// rows (row0 and row0 + 8: fragment elements 0, 1 and 2, 3), what G reads of them loaded once
// for the sweep, and its share of CLIP's log-scale sum.
//
// G is handed on times g_scale, the power of two that brings scale |grad_scale| into [1, 2):
// G's largest values are then a few units, and f16, whose smallest normal value is 6e-5, keeps
// the small probabilities' share (grad_scale = 1 / N would put them far below it). bf16 and tf32
// have f32's exponents, so the factor changes no bit of theirs. The products' sums are multiplied
// back by g_unscale, exactly.
template <typename Loss>
struct GradRows {
    int rows_at[2];
    LogitEnd row_end[2];
    int g_exponent;
    float g_scale, g_unscale;
    mutable float log_scale_acc = 0.0f;  // CLIP: this thread's share of sum_ij dlogit_ij * logit_ij

    __device__ __forceinline__ GradRows(const ContraInfonceBwdParams& p, float scale, int row0)
        : rows_at{row0, row0 + 8},
          row_end{LogitEnd::load<Loss>(p, min(row0, p.rows - 1)), LogitEnd::load<Loss>(p, min(row0 + 8, p.rows - 1))},
          g_exponent(normalizing_exponent(scale * fabsf(p.grad_scale))),
          g_scale(power_of_two(g_exponent)),
          g_unscale(power_of_two(-g_exponent)) {}

    // G of the part whose fragment element (nt, 2 h + e) is key col0 + 8 nt + e of row h:
    // store(h, nt, g_scale G at e = 0, g_scale G at e = 1) per row and n8 tile. Each column's
    // end is loaded once for its two rows; indices past the matrix read the last row / column
    // and the value is zeroed, so the loop has no branch around its loads and exponentials.
    template <typename Store>
    __device__ __forceinline__ void tile(const ContraInfonceBwdParams& p, float scale, int col0,
                                         const float d[kFusedTiles][4], Store store) const {
#pragma unroll
        for (int nt = 0; nt < kFusedTiles; ++nt) {
            float value[4];  // (2 h + e)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = col0 + 8 * nt + e;
                const LogitEnd key = LogitEnd::load<Loss>(p, min(col, p.cols - 1));
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float term;
                    const float v = softmax_grad<Loss>(p, scale, rows_at[h], row_end[h], col, key, d[nt][2 * h + e], term);
                    const bool inside = rows_at[h] < p.rows && col < p.cols;
                    value[2 * h + e] = inside ? v * g_scale : 0.0f;
                    log_scale_acc += inside ? term : 0.0f;
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) store(h, nt, value[2 * h], value[2 * h + 1]);
        }
    }
};

}  // namespace contra
