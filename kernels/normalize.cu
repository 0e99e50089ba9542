// Fused row-wise L2 normalization, forward and backward. One warp per row: the lanes stride over
// the row, reduce with shuffles, and write the result in the same pass over registers-free data
// (the row is read twice; for D <= a few thousand it stays in L1).
#include "common.cuh"

namespace contra {

constexpr int kNormalizeWarps = 8;  // rows per 256-thread block

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
    const float inv = 1.0f / fmaxf(sqrtf(warp_sum(sq)), p.eps);
    for (int d = lane; d < p.dim; d += 32) store(y, d, load(x, d) * inv);
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
    float sq = 0.0f, x_dot_gy = 0.0f;
    for (int d = lane; d < p.dim; d += 32) {
        float v = load(x, d);
        sq += v * v;
        x_dot_gy += v * load(gy, d);
    }
    const float norm = fmaxf(sqrtf(warp_sum(sq)), p.eps);
    const float inv = 1.0f / norm;
    // y . dy = (x . dy) / norm, and dx = (dy - y (y . dy)) / norm.
    const float y_dot_gy = warp_sum(x_dot_gy) * inv;
    for (int d = lane; d < p.dim; d += 32) store(gx, d, (load(gy, d) - load(x, d) * inv * y_dot_gy) * inv);
}

}  // namespace contra

CONTRA_TYPED_KERNELS(normalize_fwd, ContraNormalizeParams, 256)
CONTRA_TYPED_KERNELS(normalize_bwd, ContraNormalizeParams, 256)
