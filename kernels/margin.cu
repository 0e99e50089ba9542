// The Hadsell-Chopra-LeCun contrastive margin loss over pairs of rows, forward and backward. One
// warp per pair: the lanes stride over the row, reduce ||x1 - x2||^2 with shuffles, and lane 0
// writes the row's distance (the forward; the host squares it and sums the rows' losses in f64)
// or every lane writes its share of both gradients (the backward).
//
// Overflow: the loss d^2 / 2 of a pair 1e20 apart (5e39) is beyond f32 but not f64, so the forward
// writes row_loss[i] = d_i 2^-64 (exact; d_i >= 1e-6 by the clamp, so never subnormal, and below
// 2^82 for any f32 rows) and the host forms the loss in f64. The f32 sum of squares is right while
// it stays below 2^126; a row beyond (a distance above 2^63) is summed again from the differences
// of x1 2^-80 and x2 2^-80 (exact scaling; the difference itself cannot overflow then).
#include "common.cuh"
#include "loss_words.cuh"

namespace contra {

constexpr int kMarginWarps = 8;  // rows per 256-thread block
constexpr float kMarginHugeSquares = 0x1p126f;
constexpr float kMarginScale = 0x1p-80f;
constexpr float kMarginUnscale = 0x1p80f;
constexpr float kMarginOutScale = 0x1p-64f;  // row_loss = d 2^-64

// ||(x1_i - x2_i) s||^2 of one row with s = `scale` applied to both operands before the
// difference, on every lane of the warp.
template <typename T>
__device__ __forceinline__ float pair_squared_distance(const T* a, const T* b, int dim, int lane, float scale) {
    float sq = 0.0f;
    for (int d = lane; d < dim; d += 32) {
        const float t = load(a, d) * scale - load(b, d) * scale;
        sq += t * t;
    }
    return warp_sum(sq);
}

// The row's squared distance in units of scale^2: the plain f32 sum (scale = 1), or, past 2^126,
// the sum scaled by 2^-80 (scale = 2^-80). Warp-uniform.
template <typename T>
__device__ __forceinline__ float row_squared_distance(const T* a, const T* b, int dim, int lane, float& scale) {
    scale = 1.0f;
    const float sq = pair_squared_distance(a, b, dim, lane, 1.0f);
    if (sq < kMarginHugeSquares) return sq;
    scale = kMarginScale;
    return pair_squared_distance(a, b, dim, lane, kMarginScale);
}

template <typename T>
__device__ void margin_fwd(const ContraMarginParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * kMarginWarps + threadIdx.x / 32;
    if (row >= p.rows) return;  // whole warps leave together
    const T* a = static_cast<const T*>(p.x1) + row * p.dim;
    const T* b = static_cast<const T*>(p.x2) + row * p.dim;
    float scale;
    const float sq = row_squared_distance(a, b, p.dim, lane, scale);
    if (lane != 0) return;
    // d = sqrt(max(sq, eps)); on the scaled path d > 2^63, far above the clamp.
    const float d_out = scale == 1.0f ? sqrtf(fmaxf(sq, p.eps)) * kMarginOutScale
                                      : sqrtf(sq) * (kMarginUnscale * kMarginOutScale);
    // PML's variant: a clamped pair is at distance 0 (it adds nothing to the nonzero means).
    const bool clamped = scale == 1.0f && sq < p.eps;
    p.row_loss[row] = p.pml && clamped ? 0.0f : d_out;
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
    float scale;
    const float sq = row_squared_distance(a, b, p.dim, lane, scale);
    // d loss / d x1 = c (x1 - x2): c = 1 for a similar pair, -relu(m - d) / d for a dissimilar one;
    // 0 where the 1e-12 clamp holds d constant. Formed from the differences in the units s of the
    // sum: similar, g = (grad_scale (x1 - x2) s) / s; dissimilar, g = k ((x1 - x2) s / (d s)) with
    // k = -grad_scale relu(m - d), the unit vector first. No factor overflows where the gradient
    // does not (a margin near f32's max over a small d, say).
    float k = 0.0f, inv_d = 1.0f, back = 1.0f;
    if (p.pml) {
        // PML: d loss / d x1 = +-scale_y (x1 - x2) / d, the unit vector first.
        if (scale != 1.0f || sq >= p.eps) {
            const float d_scaled = sqrtf(sq);
            const float d = d_scaled * (scale != 1.0f ? kMarginUnscale : 1.0f);
            if (p.y[row] == 0) {
                k = (float)(p.grad_scale * p.pml_scales[0]);
            } else if (d < p.margin) {
                k = (float)(-p.grad_scale * p.pml_scales[1]);
            }
            inv_d = 1.0f / d_scaled;
        }
    } else if (scale != 1.0f || sq >= p.eps) {
        if (scale != 1.0f) back = kMarginUnscale;
        if (p.y[row] == 0) {
            k = p.grad_scale;
        } else {
            const float d_scaled = sqrtf(sq);
            const float d = d_scaled * back;
            if (d < p.margin) {
                k = -p.grad_scale * (p.margin - d);
                inv_d = 1.0f / d_scaled;
                back = 1.0f;  // the unit vector carries no units
            }
        }
    }
    for (int d = lane; d < p.dim; d += 32) {
        const float g = k * ((load(a, d) * scale - load(b, d) * scale) * inv_d) * back;
        store(ga, d, g);
        store(gb, d, -g);
    }
}

constexpr int kFinishThreads = 256;

// One block; fixed-order sums (deterministic).
__device__ void margin_pml_finish(const ContraMarginFinishParams& p) {
    __shared__ double s_val[2][kFinishThreads];
    __shared__ long long s_num[2][kFinishThreads];
    // Per group (0: similar, 1: dissimilar): the sum and the number of positive terms.
    double sum0 = 0.0, sum1 = 0.0;
    long long num0 = 0, num1 = 0;
    for (int i = threadIdx.x; i < p.rows; i += kFinishThreads) {
        const double d = ldexp((double)p.dist[i], p.dist_exp);
        if (p.y[i] == 0) {
            if (d > 0.0) {
                sum0 += d;
                ++num0;
            }
        } else if (p.margin - d > 0.0) {
            sum1 += p.margin - d;
            ++num1;
        }
    }
    s_val[0][threadIdx.x] = sum0;
    s_val[1][threadIdx.x] = sum1;
    s_num[0][threadIdx.x] = num0;
    s_num[1][threadIdx.x] = num1;
    __syncthreads();
    for (int width = kFinishThreads / 2; width > 0; width /= 2) {
        if ((int)threadIdx.x < width) {
            for (int g = 0; g < 2; ++g) {
                s_val[g][threadIdx.x] += s_val[g][threadIdx.x + width];
                s_num[g][threadIdx.x] += s_num[g][threadIdx.x + width];
            }
        }
        __syncthreads();
    }
    double loss = 0.0;
    for (int g = 0; g < 2; ++g) {
        const long long n = s_num[g][0];
        if (n > 0) loss += s_val[g][0] / (double)n;
        if (threadIdx.x == 0) p.scales[g] = n > 0 ? 1.0 / (double)n : 0.0;
    }
    if (p.out != nullptr) write_loss_words(p.out, p.status, p.slots, loss);
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(contra::kFinishThreads) margin_pml_finish(const ContraMarginFinishParams p) { contra::margin_pml_finish(p); }
INTERP_EXPORT(margin_pml_finish, ContraMarginFinishParams)
extern "C" __global__ void __launch_bounds__(256) margin_fwd_f32(const ContraMarginParams p) { contra::margin_fwd<float>(p); }
extern "C" __global__ void __launch_bounds__(256) margin_bwd_f32(const ContraMarginParams p) { contra::margin_bwd<float>(p); }
INTERP_EXPORT(margin_fwd_f32, ContraMarginParams)
INTERP_EXPORT(margin_bwd_f32, ContraMarginParams)
