// Shared by every kernel source: the CUDA / interpreted-mode switch, dtype loads and stores with
// f32 accumulation, warp and block reductions, and the online log-sum-exp.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include "interp/cuda_interp.h"
#endif
#include "include/params.h"
#include "interp/export.h"

namespace contra {

// f32 operands that the kernel multiplies on the TF32 tensor cores (the `_tf32` instantiations):
// the storage is f32, the type only picks the engine.
struct tf32 {
    float value;
};

// Every kernel computes in f32; these read and write the storage type.
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const tf32* p, long long i) { return p[i].value; }
__device__ __forceinline__ float load(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

// Bytes of dynamic shared memory the launch gave this block (PTX %dynamic_smem_size).
__device__ __forceinline__ unsigned dynamic_shared_size() {
#if defined(CONTRA_INTERP)
    return static_cast<unsigned>(interp::dynamic_shared_bytes());
#elif defined(__CUDA_ARCH__)
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
#else
    return 0;
#endif
}

// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum / max over groups of `width` consecutive lanes (width a power of two <= 32).
template <int width>
__device__ __forceinline__ float group_sum(float v) {
    for (int offset = width / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
    return v;
}
template <int width>
__device__ __forceinline__ float group_max(float v) {
    for (int offset = width / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset, width));
    return v;
}

// log2(e) and ln(2): the softmax kernels work in log2 units (logit * log2(e)) so that every
// exponential is one exp2 (MUFU.EX2) with the temperature folded into the same multiply.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Running log2-sum-exp2: `max` and `sum` of 2^(x - max) over the values (log2 units) seen so far.
struct OnlineLse {
    float running_max;
    float running_sum;
    __device__ __forceinline__ void init() {
        running_max = -INFINITY;
        running_sum = 0.0f;
    }
    // Folds in a block of values already reduced to (block_max, sum of 2^(x - block_max)).
    __device__ __forceinline__ void merge(float block_max, float block_sum) {
        if (block_max == -INFINITY) return;
        float new_max = fmaxf(running_max, block_max);
        running_sum = running_sum * exp2f(running_max - new_max) + block_sum * exp2f(block_max - new_max);
        running_max = new_max;
    }
    // log2 of the sum of 2^x.
    __device__ __forceinline__ float value() const { return running_max + log2f(running_sum); }
};

// Folds a partial (max, sum of 2^(x - max)), log2 units, into a running state shared by blocks:
// a {max, sum} float pair packed in 64 bits, updated with compare-and-swap.
__device__ __forceinline__ void merge_lse_state(unsigned long long* state, float block_max, float block_sum) {
    if (block_max == -INFINITY) return;
    unsigned long long seen = atomicCAS(state, 0ull, 0ull);  // an atomic read
    unsigned long long expected;
    do {
        expected = seen;
        const float old_max = __uint_as_float((unsigned)(expected & 0xffffffffull));
        const float old_sum = __uint_as_float((unsigned)(expected >> 32));
        const float new_max = fmaxf(old_max, block_max);
        const float new_sum = old_sum * exp2f(old_max - new_max) + block_sum * exp2f(block_max - new_max);
        const unsigned long long desired =
            (unsigned long long)__float_as_uint(new_max) | ((unsigned long long)__float_as_uint(new_sum) << 32);
        seen = atomicCAS(state, expected, desired);
    } while (seen != expected);
}

}  // namespace contra

// Defines the f32, bf16 and f16 instantiations `name_f32`, `name_bf16`, `name_f16` of the kernel
// body `contra::name<T>` (T: the storage type of the operands it reads), each exported to the
// interpreted mode too. The bounds are parenthesized __launch_bounds__ argument lists, one per
// instantiation.
#define CONTRA_TYPED_KERNELS_EACH(name, Params, f32_bounds, bf16_bounds, f16_bounds)                           \
    extern "C" __global__ void __launch_bounds__ f32_bounds name##_f32(const Params p) { contra::name<float>(p); } \
    extern "C" __global__ void __launch_bounds__ bf16_bounds name##_bf16(const Params p) {                     \
        contra::name<__nv_bfloat16>(p);                                                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__ f16_bounds name##_f16(const Params p) { contra::name<__half>(p); } \
    INTERP_EXPORT(name##_f32, Params)                                                                        \
    INTERP_EXPORT(name##_bf16, Params)                                                                       \
    INTERP_EXPORT(name##_f16, Params)
// The three above and a fourth, `name_tf32` (contra::name<contra::tf32>): f32 operands on the TF32
// tensor cores.
#define CONTRA_TYPED_KERNELS_TF32(name, Params, f32_bounds, bf16_bounds, f16_bounds, tf32_bounds)             \
    CONTRA_TYPED_KERNELS_EACH(name, Params, f32_bounds, bf16_bounds, f16_bounds)                               \
    extern "C" __global__ void __launch_bounds__ tf32_bounds name##_tf32(const Params p) {                   \
        contra::name<contra::tf32>(p);                                                                       \
    }                                                                                                        \
    INTERP_EXPORT(name##_tf32, Params)
#define CONTRA_TYPED_KERNELS_BOUNDED(name, Params, bounds) CONTRA_TYPED_KERNELS_EACH(name, Params, bounds, bounds, bounds)
#define CONTRA_TYPED_KERNELS(name, Params, threads) CONTRA_TYPED_KERNELS_BOUNDED(name, Params, (threads))
