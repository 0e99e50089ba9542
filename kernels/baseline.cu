// The unfused baseline of the benchmarks: what PyTorch eager runs after the logits GEMM
// (cuBLAS), as three separate kernels over the materialized rows x cols matrix: log-softmax,
// the negative log-likelihood gather, and the softmax cross-entropy gradient. It exists to be
// measured next to the fused kernels; it reads and writes the N x N matrix the fused kernels
// never build.
#include "common.cuh"

namespace contra {

constexpr int kBaselineThreads = 256;

// Block-wide reduction (max or sum) through shared memory; every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (int stride = kBaselineThreads / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            const float other = scratch[threadIdx.x + stride];
            scratch[threadIdx.x] = kMax ? fmaxf(scratch[threadIdx.x], other) : scratch[threadIdx.x] + other;
        }
        __syncthreads();
    }
    const float result = scratch[0];
    __syncthreads();
    return result;
}

__device__ void log_softmax(const ContraBaselineParams& p) {
    __shared__ float scratch[kBaselineThreads];
    const int i = blockIdx.x;
    float* row = p.logits + (long long)i * p.cols;
    const bool masked_row = p.self_mask && i < p.cols;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < p.cols; j += kBaselineThreads)
        if (!(masked_row && j == i)) m = fmaxf(m, row[j]);
    m = block_reduce<true>(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < p.cols; j += kBaselineThreads)
        if (!(masked_row && j == i)) sum += expf(row[j] - m);
    const float lse = m + logf(block_reduce<false>(sum, scratch));
    for (int j = threadIdx.x; j < p.cols; j += kBaselineThreads)
        row[j] = (masked_row && j == i) ? -INFINITY : row[j] - lse;
}

__device__ void nll(const ContraBaselineParams& p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.rows) return;
    p.loss_rows[i] = -p.logits[(long long)i * p.cols + p.targets[i]];
}

__device__ void nll_grad(const ContraBaselineParams& p) {
    const long long len = (long long)p.rows * p.cols;
    for (long long at = (long long)blockIdx.x * blockDim.x + threadIdx.x; at < len; at += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(at / p.cols), j = (int)(at % p.cols);
        const float target = j == p.targets[i] ? 1.0f : 0.0f;
        p.logits[at] = p.grad_scale * (expf(p.logits[at]) - target);
    }
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) baseline_log_softmax_f32(const ContraBaselineParams p) { contra::log_softmax(p); }
extern "C" __global__ void __launch_bounds__(256) baseline_nll_f32(const ContraBaselineParams p) { contra::nll(p); }
extern "C" __global__ void __launch_bounds__(256) baseline_nll_grad_f32(const ContraBaselineParams p) { contra::nll_grad(p); }
INTERP_EXPORT(baseline_log_softmax_f32, ContraBaselineParams)
INTERP_EXPORT(baseline_nll_f32, ContraBaselineParams)
INTERP_EXPORT(baseline_nll_grad_f32, ContraBaselineParams)
