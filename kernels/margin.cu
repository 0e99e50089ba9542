// The Hadsell-Chopra-LeCun contrastive margin loss over pairs of rows, forward and backward. One
// warp per pair: the lanes stride over the row, reduce ||x1 - x2||^2 with shuffles, and lane 0
// writes the row's loss (the forward; the host sums the rows in f64) or every lane writes its
// share of both gradients (the backward).
#include "common.cuh"

namespace contra {

constexpr int kMarginWarps = 8;  // rows per 256-thread block

// ||x1_i - x2_i||^2 of one row, on every lane of the warp.
template <typename T>
__device__ __forceinline__ float pair_squared_distance(const T* a, const T* b, int dim, int lane) {
    float sq = 0.0f;
    for (int d = lane; d < dim; d += 32) {
        const float t = load(a, d) - load(b, d);
        sq += t * t;
    }
    return warp_sum(sq);
}

template <typename T>
__device__ void margin_fwd(const ContraMarginParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * kMarginWarps + threadIdx.x / 32;
    if (row >= p.rows) return;  // whole warps leave together
    const T* a = static_cast<const T*>(p.x1) + row * p.dim;
    const T* b = static_cast<const T*>(p.x2) + row * p.dim;
    const float d2 = fmaxf(pair_squared_distance(a, b, p.dim, lane), p.eps);
    if (lane != 0) return;
    float loss;
    if (p.y[row] == 0) {
        loss = 0.5f * d2;
    } else {
        const float gap = fmaxf(p.margin - sqrtf(d2), 0.0f);
        loss = 0.5f * gap * gap;
    }
    p.row_loss[row] = loss;
}

template <typename T>
__device__ void margin_bwd(const ContraMarginParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * kMarginWarps + threadIdx.x / 32;
    if (row >= p.rows) return;
    const T* a = static_cast<const T*>(p.x1) + row * p.dim;
    const T* b = static_cast<const T*>(p.x2) + row * p.dim;
    T* ga = static_cast<T*>(p.grad_x1) + row * p.dim;
    T* gb = static_cast<T*>(p.grad_x2) + row * p.dim;
    const float sq = pair_squared_distance(a, b, p.dim, lane);
    // d loss / d x1 = coef (x1 - x2): 1 for a similar pair, -relu(m - d) / d for a dissimilar one;
    // 0 where the 1e-12 clamp holds d constant.
    float coef = 0.0f;
    if (sq >= p.eps) {
        if (p.y[row] == 0) {
            coef = 1.0f;
        } else {
            const float d = sqrtf(sq);
            coef = d < p.margin ? -(p.margin - d) / d : 0.0f;
        }
    }
    coef *= p.grad_scale;
    for (int d = lane; d < p.dim; d += 32) {
        const float g = coef * (load(a, d) - load(b, d));
        store(ga, d, g);
        store(gb, d, -g);
    }
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) margin_fwd_f32(const ContraMarginParams p) { contra::margin_fwd<float>(p); }
extern "C" __global__ void __launch_bounds__(256) margin_bwd_f32(const ContraMarginParams p) { contra::margin_bwd<float>(p); }
INTERP_EXPORT(margin_fwd_f32, ContraMarginParams)
INTERP_EXPORT(margin_bwd_f32, ContraMarginParams)
