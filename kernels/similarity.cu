// Similarity / distance matrix between the rows of a (rows x dim) and b (cols x dim), tiled
// 64 x 64 through shared memory. Cosine and the euclidean distances take the row norms from the
// same slices as the dot products, so each input is read once per tile.
#include "tile_dot.cuh"

namespace contra {

template <typename T>
__device__ void similarity_fwd(const ContraSimilarityParams& p) {
    const int a0 = blockIdx.y * kTile, b0 = blockIdx.x * kTile;
    float acc[kPerThread][kPerThread], a_sq[kPerThread], b_sq[kPerThread];
    tile_dot<T, true>(static_cast<const T*>(p.a), p.rows, a0, static_cast<const T*>(p.b), p.cols, b0, p.dim,
                      acc, a_sq, b_sq);
    for (int i = 0; i < kPerThread; ++i) {
        const int row = a0 + threadIdx.y + 16 * i;
        if (row >= p.rows) continue;
        for (int j = 0; j < kPerThread; ++j) {
            const int col = b0 + threadIdx.x + 16 * j;
            if (col >= p.cols) continue;
            const float dot = acc[i][j];
            float v;
            switch (p.kind) {
                case CONTRA_SIM_COSINE:
                    v = dot / (fmaxf(sqrtf(a_sq[i]), 1e-12f) * fmaxf(sqrtf(b_sq[j]), 1e-12f));
                    break;
                case CONTRA_SIM_SQUARED_EUCLIDEAN:
                    v = fmaxf(a_sq[i] + b_sq[j] - 2.0f * dot, 0.0f);
                    break;
                case CONTRA_SIM_EUCLIDEAN:
                    v = sqrtf(fmaxf(a_sq[i] + b_sq[j] - 2.0f * dot, 1e-12f));
                    break;
                default:
                    v = dot;
            }
            p.out[(long long)row * p.cols + col] = v;
        }
    }
}

}  // namespace contra

CONTRA_TYPED_KERNELS(similarity_fwd, ContraSimilarityParams, 256)
