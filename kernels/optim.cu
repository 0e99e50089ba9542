// The optimizers' steps on one parameter tensor, in place (SGD, LARS, AdamW), and the addition of
// a gradient into an accumulated one. Every f32 operation is written as its rounded intrinsic
// (no contraction into a fused multiply-add), so that a step gives the host optimizers' values
// bit for bit; only LARS's two norms are summed in another order (in double).
#include "common.cuh"

namespace contra {

constexpr int kOptimThreads = 256;

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }

#define CONTRA_GRID_STRIDE(i, len) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (len); i += (long long)gridDim.x * blockDim.x)

__device__ void optim_sgd(const ContraOptimParams& p) {
    CONTRA_GRID_STRIDE(i, p.len) {
        const float w = p.value[i];
        const float g = add(p.grad[i], mul(p.weight_decay, w));
        const float buf = add(mul(p.momentum, p.state0[i]), g);
        p.state0[i] = buf;
        const float step = p.nesterov ? add(g, mul(p.momentum, buf)) : buf;
        p.value[i] = __fsub_rn(w, mul(p.lr, step));
    }
}

// One block: the squared norms of the value and of the decayed gradient, in a fixed order.
__device__ void optim_lars_norms(const ContraOptimParams& p) {
    __shared__ double s_w[kOptimThreads], s_g[kOptimThreads];
    double w2 = 0.0, g2 = 0.0;
    for (long long i = threadIdx.x; i < p.len; i += kOptimThreads) {
        const float w = p.value[i];
        const double g = add(p.grad[i], mul(p.weight_decay, w));
        w2 += (double)w * (double)w;
        g2 += g * g;
    }
    s_w[threadIdx.x] = w2;
    s_g[threadIdx.x] = g2;
    __syncthreads();
    for (int width = kOptimThreads / 2; width > 0; width /= 2) {
        if ((int)threadIdx.x < width) {
            s_w[threadIdx.x] += s_w[threadIdx.x + width];
            s_g[threadIdx.x] += s_g[threadIdx.x + width];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        p.norms[0] = s_w[0];
        p.norms[1] = s_g[0];
    }
}

__device__ void optim_lars(const ContraOptimParams& p) {
    float lr = p.lr;
    if (p.norms != nullptr) {
        const double w_norm = sqrt(p.norms[0]), g_norm = sqrt(p.norms[1]);
        if (w_norm > 0.0 && g_norm > 0.0) lr = (float)((double)p.lr * (double)p.trust * w_norm / g_norm);
    }
    CONTRA_GRID_STRIDE(i, p.len) {
        const float w = p.value[i];
        const float g = add(p.grad[i], mul(p.weight_decay, w));
        const float v = add(mul(p.momentum, p.state0[i]), mul(lr, g));
        p.state0[i] = v;
        p.value[i] = __fsub_rn(w, v);
    }
}

__device__ void optim_adamw(const ContraOptimParams& p) {
    CONTRA_GRID_STRIDE(i, p.len) {
        const float g = p.grad[i];
        const float w = mul(p.value[i], p.shrink);
        const float m = add(mul(p.beta1, p.state0[i]), mul(p.one_minus_beta1, g));
        const float v = add(mul(p.beta2, p.state1[i]), mul(mul(p.one_minus_beta2, g), g));
        p.state0[i] = m;
        p.state1[i] = v;
        const float denom = add((float)(sqrt((double)v) / p.bc2_sqrt), p.eps);
        p.value[i] = __fsub_rn(w, __fdiv_rn(mul(p.step_size, m), denom));
    }
}

__device__ void optim_accumulate(const ContraOptimParams& p) {
    CONTRA_GRID_STRIDE(i, p.len) p.value[i] = add(p.value[i], p.grad[i]);
}

#undef CONTRA_GRID_STRIDE

}  // namespace contra

extern "C" __global__ void __launch_bounds__(contra::kOptimThreads) optim_sgd(const ContraOptimParams p) { contra::optim_sgd(p); }
extern "C" __global__ void __launch_bounds__(contra::kOptimThreads) optim_lars_norms(const ContraOptimParams p) { contra::optim_lars_norms(p); }
extern "C" __global__ void __launch_bounds__(contra::kOptimThreads) optim_lars(const ContraOptimParams p) { contra::optim_lars(p); }
extern "C" __global__ void __launch_bounds__(contra::kOptimThreads) optim_adamw(const ContraOptimParams p) { contra::optim_adamw(p); }
extern "C" __global__ void __launch_bounds__(contra::kOptimThreads) optim_accumulate(const ContraOptimParams p) { contra::optim_accumulate(p); }
INTERP_EXPORT(optim_sgd, ContraOptimParams)
INTERP_EXPORT(optim_lars_norms, ContraOptimParams)
INTERP_EXPORT(optim_lars, ContraOptimParams)
INTERP_EXPORT(optim_adamw, ContraOptimParams)
INTERP_EXPORT(optim_accumulate, ContraOptimParams)
