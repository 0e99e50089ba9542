// Noise-contrastive estimation, forward and backward. The forward runs one warp per row (the
// lanes stride over the k noise scores, lane 0 adds the data term and writes the row's loss; the
// host sums the rows in f64). The backward is elementwise: one thread per score, grid-stride.
// Softplus and sigmoid never exponentiate a positive argument, so large scores cannot overflow.
#include "common.cuh"

namespace contra {

constexpr int kNceWarps = 8;  // rows per 256-thread block of the forward

// log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)).
__device__ __forceinline__ float stable_softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// 1 / (1 + exp(-x)), with exp of a non-positive argument only.
__device__ __forceinline__ float stable_sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

template <typename T>
__device__ void nce_fwd(const ContraNceParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * kNceWarps + threadIdx.x / 32;
    if (row >= p.rows) return;  // whole warps leave together
    const T* s_neg = static_cast<const T*>(p.s_neg) + row * p.k;
    const T* logq_neg = static_cast<const T*>(p.logq_neg) + row * p.k;
    float sum = 0.0f;
    for (int j = lane; j < p.k; j += 32) sum += stable_softplus(load(s_neg, j) - p.log_k - load(logq_neg, j));
    sum = warp_sum(sum);
    if (lane != 0) return;
    const float delta_pos = load(static_cast<const T*>(p.s_pos), row) - p.log_k - load(static_cast<const T*>(p.logq_pos), row);
    p.row_loss[row] = stable_softplus(-delta_pos) + sum;
}

template <typename T>
__device__ void nce_bwd(const ContraNceParams& p) {
    const long long negatives = (long long)p.rows * p.k;
    const long long total = negatives + p.rows;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        if (t < negatives) {
            const float delta = load(static_cast<const T*>(p.s_neg), t) - p.log_k - load(static_cast<const T*>(p.logq_neg), t);
            store(static_cast<T*>(p.grad_s_neg), t, p.grad_scale * stable_sigmoid(delta));
        } else {
            const long long b = t - negatives;
            const float delta = load(static_cast<const T*>(p.s_pos), b) - p.log_k - load(static_cast<const T*>(p.logq_pos), b);
            store(static_cast<T*>(p.grad_s_pos), b, -p.grad_scale * stable_sigmoid(-delta));
        }
    }
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) nce_fwd_f32(const ContraNceParams p) { contra::nce_fwd<float>(p); }
extern "C" __global__ void __launch_bounds__(256) nce_bwd_f32(const ContraNceParams p) { contra::nce_bwd<float>(p); }
INTERP_EXPORT(nce_fwd_f32, ContraNceParams)
INTERP_EXPORT(nce_bwd_f32, ContraNceParams)
