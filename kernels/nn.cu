// The trainer's encoder layers on the device: a tiled GEMM (the fallback when cuBLAS cannot be
// loaded, and the GEMM of the interpreted mode), bias + ReLU, the ReLU backward, column sums and
// BatchNorm1d forward / backward. Row-major f32 throughout; parameters in params.h.
//
// BatchNorm runs one thread per feature: consecutive threads read consecutive columns of a row,
// so each row read is coalesced, and every sum is a fixed-order double loop (deterministic, and
// equal to the CPU layer's f64 sums up to rounding).
#include "common.cuh"

namespace contra {

constexpr int kGemmTile = 16;

// op(a)[row, t]: the stored element, transposed or not.
__device__ __forceinline__ float gemm_load(const float* m, int ld, bool trans, int row, int col) {
    return trans ? m[(long long)col * ld + row] : m[(long long)row * ld + col];
}

// One 16 x 16 tile of c per block, k walked in 16-wide slices staged through shared memory.
__device__ void gemm(const ContraGemmParams& p) {
    __shared__ float a_tile[kGemmTile][kGemmTile + 1];
    __shared__ float b_tile[kGemmTile][kGemmTile + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * kGemmTile + ty, col = blockIdx.x * kGemmTile + tx;
    float acc = 0.0f;
    for (int t0 = 0; t0 < p.k; t0 += kGemmTile) {
        // Thread (ty, tx) stages op(a)[row, t0 + tx] and op(b)[t0 + ty, col].
        const int ta = t0 + tx, tb = t0 + ty;
        a_tile[ty][tx] = (row < p.m && ta < p.k) ? gemm_load(p.a, p.lda, p.trans_a, row, ta) : 0.0f;
        b_tile[ty][tx] = (tb < p.k && col < p.n) ? gemm_load(p.b, p.ldb, p.trans_b, tb, col) : 0.0f;
        __syncthreads();
        for (int t = 0; t < kGemmTile; ++t) acc = fmaf(a_tile[ty][t], b_tile[t][tx], acc);
        __syncthreads();
    }
    if (row < p.m && col < p.n) {
        float* c = p.c + (long long)row * p.ldc + col;
        // beta == 0 must not read c: it may be uninitialised (NaN * 0 is NaN).
        *c = p.beta == 0.0f ? p.alpha * acc : p.alpha * acc + p.beta * *c;
    }
}

__device__ void bias_relu(const ContraBiasReluParams& p) {
    const long long len = (long long)p.rows * p.cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (long long)gridDim.x * blockDim.x) {
        float v = p.x[i];
        if (p.bias) v += p.bias[i % p.cols];
        // `v <= 0` is false for NaN, so a NaN passes through, as on the CPU.
        if (p.relu && v <= 0.0f) v = 0.0f;
        p.y[i] = v;
    }
}

__device__ void relu_bwd(const ContraReluBwdParams& p) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.len; i += (long long)gridDim.x * blockDim.x)
        p.dx[i] = p.y[i] > 0.0f ? p.dy[i] : 0.0f;
}

__device__ void column_sum(const ContraColumnSumParams& p) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.cols) return;
    double sum = 0.0;
    for (int i = 0; i < p.rows; ++i) sum += p.x[(long long)i * p.cols + j];
    p.out[j] = (float)sum;
}

__device__ void batchnorm_fwd(const ContraBatchNormFwdParams& p) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.cols) return;
    const int n = p.rows, d = p.cols;
    float mean, inv_std;
    if (p.train) {
        double sum = 0.0;
        for (int i = 0; i < n; ++i) sum += p.x[(long long)i * d + j];
        const double mu = sum / n;
        double sq = 0.0;
        for (int i = 0; i < n; ++i) {
            const double c = p.x[(long long)i * d + j] - mu;
            sq += c * c;
        }
        const double m = p.momentum;
        mean = (float)mu;
        inv_std = (float)(1.0 / sqrt(sq / n + (double)p.eps));
        p.running_mean[j] = (float)((1.0 - m) * p.running_mean[j] + m * mu);
        p.running_var[j] = (float)((1.0 - m) * p.running_var[j] + m * (sq / (n - 1)));
    } else {
        mean = p.running_mean[j];
        inv_std = (float)(1.0 / sqrt((double)p.running_var[j] + (double)p.eps));
    }
    p.inv_std[j] = inv_std;
    const float scale = p.weight ? p.weight[j] : 1.0f, shift = p.bias ? p.bias[j] : 0.0f;
    for (int i = 0; i < n; ++i) {
        const long long at = (long long)i * d + j;
        const float h = (p.x[at] - mean) * inv_std;
        p.x_hat[at] = h;
        p.y[at] = p.weight ? scale * h + shift : h;
    }
}

__device__ void batchnorm_bwd(const ContraBatchNormBwdParams& p) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.cols) return;
    const int n = p.rows, d = p.cols;
    double sum_dy = 0.0, sum_dy_xhat = 0.0;
    for (int i = 0; i < n; ++i) {
        const long long at = (long long)i * d + j;
        sum_dy += p.dy[at];
        sum_dy_xhat += (double)p.dy[at] * p.x_hat[at];
    }
    if (p.grad_weight) p.grad_weight[j] = (float)sum_dy_xhat;
    if (p.grad_bias) p.grad_bias[j] = (float)sum_dy;
    const float gamma = p.weight ? p.weight[j] : 1.0f;
    const float inv_std = p.inv_std[j];
    const double inv_n = 1.0 / n;
    for (int i = 0; i < n; ++i) {
        const long long at = (long long)i * d + j;
        if (p.train) {
            const double centered = p.dy[at] - sum_dy * inv_n - p.x_hat[at] * sum_dy_xhat * inv_n;
            p.dx[at] = (float)((double)gamma * inv_std * centered);
        } else {
            p.dx[at] = p.dy[at] * gamma * inv_std;
        }
    }
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) nn_gemm_f32(const ContraGemmParams p) { contra::gemm(p); }
extern "C" __global__ void __launch_bounds__(256) nn_bias_relu_f32(const ContraBiasReluParams p) { contra::bias_relu(p); }
extern "C" __global__ void __launch_bounds__(256) nn_relu_bwd_f32(const ContraReluBwdParams p) { contra::relu_bwd(p); }
extern "C" __global__ void __launch_bounds__(256) nn_column_sum_f32(const ContraColumnSumParams p) { contra::column_sum(p); }
extern "C" __global__ void __launch_bounds__(256) nn_batchnorm_fwd_f32(const ContraBatchNormFwdParams p) { contra::batchnorm_fwd(p); }
extern "C" __global__ void __launch_bounds__(256) nn_batchnorm_bwd_f32(const ContraBatchNormBwdParams p) { contra::batchnorm_bwd(p); }
INTERP_EXPORT(nn_gemm_f32, ContraGemmParams)
INTERP_EXPORT(nn_bias_relu_f32, ContraBiasReluParams)
INTERP_EXPORT(nn_relu_bwd_f32, ContraReluBwdParams)
INTERP_EXPORT(nn_column_sum_f32, ContraColumnSumParams)
INTERP_EXPORT(nn_batchnorm_fwd_f32, ContraBatchNormFwdParams)
INTERP_EXPORT(nn_batchnorm_bwd_f32, ContraBatchNormBwdParams)
