// Fused row-wise L2 normalization, forward and backward. One warp per row: the lanes stride over
// the row, reduce with shuffles, and write the result in the same pass over registers-free data
// (the row is read twice; for D <= a few thousand it stays in L1).
//
// Overflow: the sum of squares runs in f32, which overflows once a row's norm passes ~1.8e19
// (and would make y = x * (1 / inf) = 0). The fast path keeps that sum; a row whose sum reaches
// kHugeSquares (the sum is the warp's, so whole warps take one path) is summed again scaled by
// 2^-80 (a power of two: exact), which cannot overflow, so every finite row comes out right.
#include "common.cuh"

namespace contra {

constexpr int kNormalizeWarps = 8;  // rows per 256-thread block

// Sums of squares from here on take the scaled path: 2^126, so a sum below it is finite with a
// finite square root and reciprocal, and a product of two such norms (x . dy) stays finite.
constexpr float kHugeSquares = 0x1p126f;
// The scale of the slow path. Any f32 is below 2^128, so a scaled entry is below 2^48 and a row of
// up to 2^31 scaled squares sums below 2^127. A row on the slow path has a norm of at least 2^63;
// the entries whose scaled squares underflow are below 2^17, under 2^-46 of that norm: they do not
// change it (nor any output beyond f32's resolution).
constexpr float kRowScale = 0x1p-80f;
constexpr float kRowUnscale = 0x1p80f;

// The scaled sum of squares of a row, on every lane: sum (x 2^-80)^2.
template <typename T>
__device__ float scaled_squares(const T* x, int dim, int lane) {
    float sq = 0.0f;
    for (int d = lane; d < dim; d += 32) {
        const float v = load(x, d) * kRowScale;
        sq += v * v;
    }
    return warp_sum(sq);
}

template <typename T>
__device__ void normalize_fwd(const ContraNormalizeParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * kNormalizeWarps + threadIdx.x / 32;
    if (row >= p.rows) return;  // whole warps leave together: no shuffle sees a missing lane
    const T* x = static_cast<const T*>(p.x) + row * p.dim;
    T* y = static_cast<T*>(p.y) + row * p.dim;
    float sq = 0.0f;
    for (int d = lane; d < p.dim; d += 32) {
        float v = load(x, d);
        sq += v * v;
    }
    sq = warp_sum(sq);
    // y = (x s) / ||x s||: with s = 2^-80 on the slow path (its norm is far above eps).
    float scale = 1.0f;
    if (!(sq < kHugeSquares)) {
        sq = scaled_squares(x, p.dim, lane);
        scale = kRowScale;
    }
    const float inv = 1.0f / fmaxf(sqrtf(sq), p.eps);
    for (int d = lane; d < p.dim; d += 32) store(y, d, load(x, d) * scale * inv);
}

template <typename T>
__device__ void normalize_bwd(const ContraNormalizeParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * kNormalizeWarps + threadIdx.x / 32;
    if (row >= p.rows) return;
    const T* x = static_cast<const T*>(p.x) + row * p.dim;
    // Gradients are f32 whatever T is (T only says how x is stored).
    const float* gy = static_cast<const float*>(p.grad_y) + row * p.dim;
    float* gx = static_cast<float*>(p.grad_x) + row * p.dim;
    float sq = 0.0f, gy_sq = 0.0f, x_dot_gy = 0.0f;
    for (int d = lane; d < p.dim; d += 32) {
        const float v = load(x, d), g = load(gy, d);
        sq += v * v;
        gy_sq += g * g;
        x_dot_gy += v * g;
    }
    sq = warp_sum(sq);
    gy_sq = warp_sum(gy_sq);
    x_dot_gy = warp_sum(x_dot_gy);
    // Both sums below 2^126: nothing overflowed (|x . dy| <= ||x|| ||dy|| < 2^126).
    float x_scale = 1.0f, gy_scale = 1.0f;
    if (!(sq < kHugeSquares && gy_sq < kHugeSquares)) {
        // Slow path: x and / or dy scaled by 2^-80, each only if its own sum overflowed (a small
        // dy scaled would underflow). dx = (dy - y (y . dy)) / ||x|| is formed in the units of
        // dy' = dy s_g from y = x' / ||x'|| (x' = x s_x), and taken back by s_x / s_g at the end.
        if (!(sq < kHugeSquares)) x_scale = kRowScale;
        if (!(gy_sq < kHugeSquares)) gy_scale = kRowScale;
        sq = 0.0f;
        x_dot_gy = 0.0f;
        for (int d = lane; d < p.dim; d += 32) {
            const float v = load(x, d) * x_scale;
            sq += v * v;
            x_dot_gy += v * (load(gy, d) * gy_scale);
        }
        sq = warp_sum(sq);
        x_dot_gy = warp_sum(x_dot_gy);
    }
    const float norm = fmaxf(sqrtf(sq), p.eps * x_scale);
    const float inv = 1.0f / norm;
    // y . dy = (x . dy) / norm, and dx = (dy - y (y . dy)) / norm.
    const float y_dot_gy = x_dot_gy * inv;
    if (x_scale == 1.0f && gy_scale == 1.0f) {
        for (int d = lane; d < p.dim; d += 32) store(gx, d, (load(gy, d) - load(x, d) * inv * y_dot_gy) * inv);
    } else {
        // s_x / s_g is 2^-80, 1 or 2^80; applied last, so only a dx beyond f32 overflows.
        const float back = x_scale == gy_scale ? 1.0f : (x_scale < gy_scale ? kRowScale : kRowUnscale);
        for (int d = lane; d < p.dim; d += 32) {
            const float g = load(gy, d) * gy_scale, v = load(x, d) * x_scale;
            store(gx, d, (g - v * inv * y_dot_gy) * inv * back);
        }
    }
}

}  // namespace contra

CONTRA_TYPED_KERNELS(normalize_fwd, ContraNormalizeParams, 256)
CONTRA_TYPED_KERNELS(normalize_bwd, ContraNormalizeParams, 256)
