// The MoCo momentum (EMA) update theta_k <- m theta_k + (1 - m) theta_q, in place over a flat
// buffer. Grid-stride loop; when both pointers sit at the same offset from a 16-byte boundary,
// a scalar head reaches the boundary, the body moves float4s and a scalar tail finishes;
// otherwise every element goes scalar.
#include <stdint.h>

#include "common.cuh"

namespace contra {

__device__ __forceinline__ float ema(float k, float q, float m, float one_minus_m) { return m * k + one_minus_m * q; }

__device__ void momentum_update(const ContraMomentumParams& p) {
    float* k = static_cast<float*>(p.theta_k);
    const float* q = static_cast<const float*>(p.theta_q);
    const long long len = p.len;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const uintptr_t k_mis = reinterpret_cast<uintptr_t>(k) % 16;
    const uintptr_t q_mis = reinterpret_cast<uintptr_t>(q) % 16;
    // Elements before the first float4 boundary (all of them when the pointers cannot be
    // vectorized together).
    long long head = len;
    if (k_mis == q_mis && k_mis % sizeof(float) == 0) head = (long long)((16 - k_mis) % 16 / sizeof(float));
    if (head > len) head = len;
    const long long vectors = (len - head) / 4;
    for (long long i = start; i < head; i += stride) k[i] = ema(k[i], q[i], p.m, p.one_minus_m);
    float4* k4 = reinterpret_cast<float4*>(k + head);
    const float4* q4 = reinterpret_cast<const float4*>(q + head);
    for (long long i = start; i < vectors; i += stride) {
        float4 a = k4[i];
        const float4 b = q4[i];
        a.x = ema(a.x, b.x, p.m, p.one_minus_m);
        a.y = ema(a.y, b.y, p.m, p.one_minus_m);
        a.z = ema(a.z, b.z, p.m, p.one_minus_m);
        a.w = ema(a.w, b.w, p.m, p.one_minus_m);
        k4[i] = a;
    }
    for (long long i = head + vectors * 4 + start; i < len; i += stride) k[i] = ema(k[i], q[i], p.m, p.one_minus_m);
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) momentum_update_f32(const ContraMomentumParams p) { contra::momentum_update(p); }
INTERP_EXPORT(momentum_update_f32, ContraMomentumParams)
