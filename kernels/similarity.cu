// Similarity / distance matrix between the rows of a (rows x dim) and b (cols x dim), tiled
// 64 x 64 through shared memory. Cosine and the euclidean distances take the row norms from the
// same slices as the dot products, so each input is read once per tile.
//
// Overflow: the fast path sums in f32, right while every row of the tile has ||x||^2 < 2^126 (then
// no dot product or partial sum can overflow: |a.b| <= ||a|| ||b|| < 2^126). A block with a row
// beyond that (the decision is the block's: __syncthreads_or) computes its tile again with each
// such row scaled by 2^-80 (exact; a scaled squared norm stays below 2^127) and every score
// put together from the scaled parts:
//   cosine: unchanged (it is scale-invariant per row; a scaled norm is far above the 1e-12 clamp),
//   dot: a'.b' times 2^80 per scaled side (an infinity when the product is beyond f32),
//   distances: in the pair's common units 2^-80 (the unscaled side's terms brought over by
//     2^-160 and 2^-80), then back by 2^160 (squared) or 2^80 (euclidean).
// A result beyond f32 comes out infinite, which the host turns into an error.
#include "tile_dot.cuh"

namespace contra {

constexpr float kSimHugeSquares = 0x1p126f;
constexpr float kSimRowScale = 0x1p-80f;
constexpr float kSimRowUnscale = 0x1p80f;

template <typename T>
__device__ void similarity_fwd(const ContraSimilarityParams& p) {
    const int a0 = blockIdx.y * kTile, b0 = blockIdx.x * kTile;
    float acc[kPerThread][kPerThread], a_sq[kPerThread], b_sq[kPerThread];
    tile_dot<T, true>(static_cast<const T*>(p.a), p.rows, a0, static_cast<const T*>(p.b), p.cols, b0, p.dim,
                      acc, a_sq, b_sq);
    // Bit i: row ty + 16 i of a (column tx + 16 i of b) is scaled by 2^-80. Every thread of a tile
    // row has the same a_sq (each sums the whole row), so the bits agree across the block.
    unsigned a_huge = 0, b_huge = 0;
    for (int i = 0; i < kPerThread; ++i) {
        if (!(a_sq[i] < kSimHugeSquares)) a_huge |= 1u << i;
        if (!(b_sq[i] < kSimHugeSquares)) b_huge |= 1u << i;
    }
    if (__syncthreads_or((a_huge | b_huge) != 0)) {
        __shared__ float a_scale[kTile], b_scale[kTile];
        for (int i = 0; i < kPerThread; ++i) {
            if (threadIdx.x == 0) a_scale[threadIdx.y + 16 * i] = (a_huge >> i & 1) ? kSimRowScale : 1.0f;
            if (threadIdx.y == 0) b_scale[threadIdx.x + 16 * i] = (b_huge >> i & 1) ? kSimRowScale : 1.0f;
        }
        __syncthreads();
        tile_dot<T, true>(static_cast<const T*>(p.a), p.rows, a0, static_cast<const T*>(p.b), p.cols, b0, p.dim,
                          acc, a_sq, b_sq, a_scale, b_scale);
    }
    for (int i = 0; i < kPerThread; ++i) {
        const int row = a0 + threadIdx.y + 16 * i;
        if (row >= p.rows) continue;
        const bool ha = a_huge >> i & 1;
        for (int j = 0; j < kPerThread; ++j) {
            const int col = b0 + threadIdx.x + 16 * j;
            if (col >= p.cols) continue;
            const bool hb = b_huge >> j & 1;
            float dot = acc[i][j];
            float v;
            if (p.kind == CONTRA_SIM_COSINE) {
                v = dot / (fmaxf(sqrtf(a_sq[i]), 1e-12f) * fmaxf(sqrtf(b_sq[j]), 1e-12f));
            } else if (p.kind == CONTRA_SIM_SQUARED_EUCLIDEAN || p.kind == CONTRA_SIM_EUCLIDEAN) {
                float asq = a_sq[i], bsq = b_sq[j];
                if (ha != hb) {  // bring the unscaled side into the pair's units, 2^-80
                    if (ha) {
                        bsq = bsq * kSimRowScale * kSimRowScale;
                    } else {
                        asq = asq * kSimRowScale * kSimRowScale;
                    }
                    dot *= kSimRowScale;
                }
                const float sq = asq + bsq - 2.0f * dot;
                if (p.kind == CONTRA_SIM_SQUARED_EUCLIDEAN) {
                    v = fmaxf(sq, 0.0f);
                    if (ha || hb) v = v * kSimRowUnscale * kSimRowUnscale;
                } else if (ha || hb) {
                    // sqrt(max(d^2, 1e-12)) = max(d, 1e-6)
                    v = fmaxf(sqrtf(fmaxf(sq, 0.0f)) * kSimRowUnscale, 1e-6f);
                } else {
                    v = sqrtf(fmaxf(sq, 1e-12f));
                }
            } else {
                v = dot;
                if (ha) v *= kSimRowUnscale;
                if (hb) v *= kSimRowUnscale;
            }
            p.out[(long long)row * p.cols + col] = v;
        }
    }
}

}  // namespace contra

CONTRA_TYPED_KERNELS(similarity_fwd, ContraSimilarityParams, 256)
