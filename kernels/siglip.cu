// SigLIP's pairwise sigmoid loss, forward and backward, over the tiles of a b^T (never
// materialized): logit_ij = scale s_ij + bias, loss = (1/N) sum_ij softplus(-z_ij logit_ij)
// with z = +1 on the diagonal and -1 elsewhere.
//
// No pair depends on another (no row statistics), so one sweep does everything: each block owns
// 64 rows of a and walks the 64-column tiles of b. The dot products of a tile come from the
// operand type's engine (CUDA cores for f32, tensor cores for bf16 / f16) into a shared tile;
// each element then gives its loss term and, in the backward, its gradient
// G_ij = grad_weight (sigmoid(logit_ij) - [i = j]), turned in place into scale G_ij for the
// second products: grad_a rows of the block (own rows, plain writes) and grad_b rows of the tile
// (atomic adds), as the InfoNCE family's backward does. The loss is 1 GEMM-equivalent of
// N N D multiply-adds; the backward recomputes it and adds 2: 3 in all for the one-call form.
//
// Numerics: softplus and sigmoid both come from e = exp(-|m|) in (0, 1], so neither overflows
// for logits of any size (scale 100 and bias -10 put them near +-110), and a positive's gradient
// -sigmoid(-logit) keeps its digits where 1 - sigmoid(logit) would round to 0. Row sums of the
// loss and the scalar gradients accumulate per tile in f32, across tiles in f64.
#include "grad_product.cuh"

namespace contra {

// softplus(m) = log(1 + exp(m)) and sigmoid(m), neither of which overflows.
struct SigmoidTerms {
    float softplus;
    float sigmoid;
};

__device__ __forceinline__ SigmoidTerms sigmoid_terms(float m) {
    const float e = expf(-fabsf(m));
    const float inv = 1.0f / (1.0f + e);
    return {fmaxf(m, 0.0f) + log1pf(e), m >= 0.0f ? inv : e * inv};
}

template <typename T>
__device__ void siglip_sweep(const ContraSiglipParams& p) {
    __shared__ float g[kTile][kTilePad];  // the tile's dot products, then scale G
    __shared__ __align__(16) float staged[kTile][kTilePad];  // the second products' source rows
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const int r0 = blockIdx.x * kTile;
    const float scale = p.log_scale ? expf(*p.log_scale) : p.scale;
    const float bias = p.bias_value ? *p.bias_value : p.bias;
    const bool backward = p.grad_a != nullptr;  // uniform over the grid
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    double row_loss[kPerThread] = {0.0, 0.0, 0.0, 0.0};  // rows ty + 16 i, this thread's columns
    double log_scale_acc = 0.0, bias_acc = 0.0;
    // Under a key split the block takes its range of column tiles, and its rows' loss and dA
    // are shares, added atomically.
    const bool split = p.split_tiles > 0;
    const int first = split ? blockIdx.y * p.split_tiles : 0, tiles = (p.cols + kTile - 1) / kTile;
    const int steps = split ? min(p.split_tiles, tiles - first) : tiles;
    // Block b starts at column tile b (mod its tiles), so that the blocks' atomic adds to dB do
    // not all land on the same rows at once.
    const int rotation = steps > 0 ? blockIdx.x % steps : 0;
    for (int step = 0; step < steps; ++step) {
        const int c0 = (first + (step + rotation) % steps) * kTile;
        dot_tile_to_shared(a, p.rows, r0, b, p.cols, c0, p.dim, g);
        __syncthreads();
        float tile_log_scale = 0.0f, tile_bias = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int r = ty + 16 * i, row = r0 + r;
            float tile_loss = 0.0f;
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int c = tx + 16 * j, col = c0 + c;
                float value = 0.0f;
                if (row < p.rows && col < p.cols) {
                    const float scaled = scale * g[r][c];
                    const float logit = scaled + bias;
                    const bool positive = p.positives && row == col;
                    const SigmoidTerms terms = sigmoid_terms(positive ? -logit : logit);
                    tile_loss += terms.softplus;
                    // sigmoid(logit) - 1 = -sigmoid(-logit) for the positive.
                    const float dlogit = p.grad_weight * (positive ? -terms.sigmoid : terms.sigmoid);
                    tile_log_scale += dlogit * scaled;
                    tile_bias += dlogit;
                    value = dlogit * scale;
                }
                g[r][c] = value;  // each thread rewrites only the elements it read
            }
            row_loss[i] += tile_loss;
        }
        log_scale_acc += tile_log_scale;
        bias_acc += tile_bias;
        if (backward) {
            const Write own = split ? Write::kAtomicAdd : step == 0 ? Write::kOverwrite : Write::kAdd;
            grad_product_for<false>(g, staged, b, p.cols, c0, p.dim, p.grad_a, r0, p.rows, own);
            grad_product_for<true>(g, staged, a, p.rows, r0, p.dim, p.grad_b, c0, p.cols, Write::kAtomicAdd);
        }
        __syncthreads();  // g and the staged rows are rewritten by the next tile
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        // The 16 lanes holding row ty + 16 i.
        const float total = group_sum<16>((float)row_loss[i]);
        const int row = r0 + ty + 16 * i;
        if (tx == 0 && row < p.rows) write_grad(p.row_loss + row, total, split ? Write::kAtomicAdd : Write::kOverwrite);
    }
    if (backward) {
        // One partial of each scalar gradient per block (summed in f64 by loss_finish), block
        // (x, y) at y * gridDim.x + x.
        __shared__ float warp_partial[2][8];
        const float log_scale_warp = warp_sum((float)log_scale_acc), bias_warp = warp_sum((float)bias_acc);
        if (tid % 32 == 0) {
            warp_partial[0][tid / 32] = log_scale_warp;
            warp_partial[1][tid / 32] = bias_warp;
        }
        __syncthreads();
        if (tid == 0) {
            float log_scale_total = 0.0f, bias_total = 0.0f;
            for (int w = 0; w < 8; ++w) {
                log_scale_total += warp_partial[0][w];
                bias_total += warp_partial[1][w];
            }
            const long long block = (long long)blockIdx.y * gridDim.x + blockIdx.x;
            p.log_scale_partial[block] = log_scale_total;
            p.bias_partial[block] = bias_total;
        }
    }
}

}  // namespace contra

CONTRA_TYPED_KERNELS_TF32(siglip_sweep, ContraSiglipParams, (256, 2), (256, 2), (256, 2), (256, 2))
