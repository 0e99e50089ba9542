// cuda_interp.h — compile CUDA C++ kernel sources as plain host C++ ("interpreted mode").
//
// Model: every CUDA thread is a fiber. All fibers of one block run on one OS
// worker thread, cooperatively: a fiber only gives up the CPU inside
// __syncthreads*(), a warp collective (__shfl*_sync, __ballot_sync, __any_sync,
// __all_sync, __syncwarp), __activemask() or when it returns. Blocks run in
// parallel on a small pool of worker threads (runtime.cpp). Consequences:
//   * `__shared__` is `static thread_local`: one copy per worker thread, i.e. per
//     running block, shared by that block's fibers.
//   * threadIdx & co. are thread-locals that the scheduler rewrites on each switch.
//   * Code between two synchronisation points runs without interleaving, so
//     warp-synchronous tricks without __syncwarp do not work (as on Volta+),
//     but a missing __syncthreads may go unnoticed (threads run in order).
//   * Misuse fails the launch with a message instead of hanging: divergent
//     __syncthreads, a warp mask naming exited / non-existent lanes or not the
//     caller, mismatched collectives, deadlock, __trap().
//   * __activemask() returns the lanes of the warp that reach it together (the
//     others have exited or block elsewhere), like a diverged warp on the GPU.
//
// Include this only when not compiling with nvcc (common.cuh does
// `#ifndef __CUDACC__ / #include "interp/cuda_interp.h" / #endif`).
#ifndef CONTRA_CUDA_INTERP_H
#define CONTRA_CUDA_INTERP_H

#if defined(__CUDACC__)
#error "cuda_interp.h is for host (interpreted) builds only"
#endif
#if __cplusplus < 201703L
#error "cuda_interp.h needs C++17 or later"
#endif

#define CONTRA_INTERP 1

#include <math.h>  // global float overloads (expf, sqrtf, ...) and INFINITY / NAN
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "abi.h"

// ---------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One instance per OS worker thread == per running block (see top of file).
// Note: never zeroed between blocks, like real (uninitialised) shared memory.
#define __shared__ static thread_local

// ---------------------------------------------------------------------------
// Built-in vector types and variables
// ---------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct __align__(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct int3 { int x, y, z; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(16) double2 { double x, y; };

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// Defined in runtime.cpp. `__thread` (not thread_local) so that access is a plain
// TLS load without C++ dynamic-initialisation wrapper calls.
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread dim3 blockDim;
extern __thread dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Runtime hooks (runtime.cpp). Everything that may switch fibers is an
// out-of-line call, so the compiler must assume it reads/writes any memory
// (shared arrays included) and cannot cache values across it.
// ---------------------------------------------------------------------------
namespace interp {

extern __thread unsigned char* tls_dynamic_shared;
extern __thread unsigned long long tls_dynamic_shared_bytes;
// Counts the blocks a worker thread has run: per-thread state kept across calls (the emulated
// asynchronous operations) knows by it that a block ended.
extern __thread unsigned long long tls_block_serial;
inline void* dynamic_shared_ptr() { return tls_dynamic_shared; }
inline unsigned long long dynamic_shared_bytes() { return tls_dynamic_shared_bytes; }

enum SyncOp { SYNC_PLAIN = 0, SYNC_COUNT = 1, SYNC_AND = 2, SYNC_OR = 3 };
int sync_block(int op, int pred);

enum ShflMode { SHFL_IDX = 0, SHFL_UP = 1, SHFL_DOWN = 2, SHFL_XOR = 3 };
std::uint64_t warp_shfl(unsigned mask, std::uint64_t bits, int mode, int arg, int width);
unsigned warp_ballot(unsigned mask, int pred);
void warp_sync(unsigned mask);
unsigned active_mask();
// Fails the launch with `what` and abandons the calling block.
[[noreturn]] void trap(const char* what);

template <class T>
inline T shfl(unsigned mask, T var, int mode, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move values of at most 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = warp_shfl(mask, bits, mode, arg, width);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

template <class To, class From>
inline To bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "size mismatch");
    To out;
    std::memcpy(&out, &v, sizeof(To));
    return out;
}

}  // namespace interp

// ---------------------------------------------------------------------------
// Block / warp synchronisation
// ---------------------------------------------------------------------------
inline void __syncthreads() { interp::sync_block(interp::SYNC_PLAIN, 0); }
inline int __syncthreads_count(int pred) { return interp::sync_block(interp::SYNC_COUNT, pred); }
inline int __syncthreads_and(int pred) { return interp::sync_block(interp::SYNC_AND, pred); }
inline int __syncthreads_or(int pred) { return interp::sync_block(interp::SYNC_OR, pred); }

inline void __syncwarp(unsigned mask = 0xffffffffu) { interp::warp_sync(mask); }
inline unsigned __activemask() { return interp::active_mask(); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return interp::warp_ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return interp::warp_ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return interp::warp_ballot(mask, pred) == mask; }

// Width subdivides the warp (power of two <= 32); see CUDA's shfl semantics.
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
    return interp::shfl(mask, var, interp::SHFL_IDX, srcLane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return interp::shfl(mask, var, interp::SHFL_UP, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return interp::shfl(mask, var, interp::SHFL_DOWN, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
    return interp::shfl(mask, var, interp::SHFL_XOR, laneMask, width);
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

[[noreturn]] inline void __trap() { interp::trap("__trap() called"); }

// ---------------------------------------------------------------------------
// Atomics: real atomics, because blocks run concurrently on several OS threads.
// All return the old value, like CUDA.
// ---------------------------------------------------------------------------
namespace interp {
// Read-modify-write through a CAS loop; `op` maps old value -> new value.
template <class T, class Op>
inline T atomic_rmw(T* addr, Op op) {
    T old;
    __atomic_load(addr, &old, __ATOMIC_RELAXED);
    T desired;
    do {
        desired = op(old);
    } while (!__atomic_compare_exchange(addr, &old, &desired, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED));
    return old;
}
}  // namespace interp

// Exactly CUDA's overload set, so that host builds do not accept what nvcc rejects.
#define INTERP_ATOMIC_FETCH(name, builtin, T) \
    inline T name(T* a, T v) { return builtin(a, v, __ATOMIC_SEQ_CST); }
#define INTERP_ATOMIC_CAS(T)                                                                    \
    inline T atomicCAS(T* a, T compare, T v) {                                                  \
        __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
        return compare; /* on failure updated to the current value */                          \
    }
#define INTERP_ATOMIC_MINMAX(T)                                                                         \
    inline T atomicMax(T* a, T v) { return interp::atomic_rmw(a, [v](T o) { return o > v ? o : v; }); } \
    inline T atomicMin(T* a, T v) { return interp::atomic_rmw(a, [v](T o) { return o < v ? o : v; }); }
INTERP_ATOMIC_FETCH(atomicAdd, __atomic_fetch_add, int)
INTERP_ATOMIC_FETCH(atomicAdd, __atomic_fetch_add, unsigned)
INTERP_ATOMIC_FETCH(atomicAdd, __atomic_fetch_add, unsigned long long)
INTERP_ATOMIC_FETCH(atomicSub, __atomic_fetch_sub, int)
INTERP_ATOMIC_FETCH(atomicSub, __atomic_fetch_sub, unsigned)
INTERP_ATOMIC_FETCH(atomicExch, __atomic_exchange_n, int)
INTERP_ATOMIC_FETCH(atomicExch, __atomic_exchange_n, unsigned)
INTERP_ATOMIC_FETCH(atomicExch, __atomic_exchange_n, unsigned long long)
INTERP_ATOMIC_FETCH(atomicAnd, __atomic_fetch_and, int)
INTERP_ATOMIC_FETCH(atomicAnd, __atomic_fetch_and, unsigned)
INTERP_ATOMIC_FETCH(atomicAnd, __atomic_fetch_and, unsigned long long)
INTERP_ATOMIC_FETCH(atomicOr, __atomic_fetch_or, int)
INTERP_ATOMIC_FETCH(atomicOr, __atomic_fetch_or, unsigned)
INTERP_ATOMIC_FETCH(atomicOr, __atomic_fetch_or, unsigned long long)
INTERP_ATOMIC_FETCH(atomicXor, __atomic_fetch_xor, int)
INTERP_ATOMIC_FETCH(atomicXor, __atomic_fetch_xor, unsigned)
INTERP_ATOMIC_FETCH(atomicXor, __atomic_fetch_xor, unsigned long long)
INTERP_ATOMIC_CAS(int)
INTERP_ATOMIC_CAS(unsigned)
INTERP_ATOMIC_CAS(unsigned long long)
INTERP_ATOMIC_CAS(unsigned short)
INTERP_ATOMIC_MINMAX(int)
INTERP_ATOMIC_MINMAX(unsigned)
INTERP_ATOMIC_MINMAX(long long)
INTERP_ATOMIC_MINMAX(unsigned long long)
#undef INTERP_ATOMIC_FETCH
#undef INTERP_ATOMIC_CAS
#undef INTERP_ATOMIC_MINMAX

inline float atomicAdd(float* a, float v) {
    return interp::atomic_rmw(a, [v](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
    return interp::atomic_rmw(a, [v](double o) { return o + v; });
}
inline float atomicExch(float* a, float v) {
    float old;
    __atomic_exchange(a, &v, &old, __ATOMIC_SEQ_CST);
    return old;
}
// CUDA wrap-around semantics.
inline unsigned atomicInc(unsigned* a, unsigned limit) {
    return interp::atomic_rmw(a, [limit](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
    return interp::atomic_rmw(a, [limit](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1; });
}

// ---------------------------------------------------------------------------
// Math. <math.h> already provides expf, logf, sqrtf, fmaxf, log1pf, powf, ...
// as global functions; below are the CUDA-only names.
// ---------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
// Clamp to [0, 1]; NaN -> 0.
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

inline float __int_as_float(int x) { return interp::bit_cast<float>(x); }
inline int __float_as_int(float x) { return interp::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return interp::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return interp::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return interp::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return interp::bit_cast<long long>(x); }

inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// CUDA's global min/max overload set (same mixed-signedness rules).
#define INTERP_MINMAX(R, A, B)                              \
    inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; } \
    inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
INTERP_MINMAX(int, int, int)
INTERP_MINMAX(unsigned, unsigned, unsigned)
INTERP_MINMAX(unsigned, int, unsigned)
INTERP_MINMAX(unsigned, unsigned, int)
INTERP_MINMAX(long, long, long)
INTERP_MINMAX(unsigned long, unsigned long, unsigned long)
INTERP_MINMAX(unsigned long, long, unsigned long)
INTERP_MINMAX(unsigned long, unsigned long, long)
INTERP_MINMAX(long long, long long, long long)
INTERP_MINMAX(unsigned long long, unsigned long long, unsigned long long)
INTERP_MINMAX(unsigned long long, long long, unsigned long long)
INTERP_MINMAX(unsigned long long, unsigned long long, long long)
#undef INTERP_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// Cache-hinted loads/stores: plain memory accesses here.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------
// __half (IEEE binary16) and __nv_bfloat16: 2-byte storage types. Conversions
// round to nearest even and keep NaNs NaN. Like cuda_fp16.h / cuda_bf16.h they
// convert implicitly to/from float and have their own + - * / and comparisons
// (so `h * 2.0f` is ambiguous here exactly as it is under nvcc). Each operator
// computes in float and rounds once, which is correctly rounded because float
// has more than 2p+2 mantissa bits. No __half2 / vector intrinsics.
// ---------------------------------------------------------------------------
namespace interp {

inline unsigned short float_to_half_bits(float f) {
    const std::uint32_t x = bit_cast<std::uint32_t>(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {  // inf or NaN; NaN stays (quiet) NaN, keeping top payload bits
        if (ax == 0x7f800000u) return static_cast<unsigned short>(sign | 0x7c00u);
        return static_cast<unsigned short>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520 -> inf
    const std::uint32_t e = ax >> 23;
    std::uint32_t r;
    if (e >= 113) {  // normal half: rebias exponent, round 13 dropped mantissa bits
        const std::uint32_t mant = ax & 0x7fffffu;
        r = ((e - 112) << 10) | (mant >> 13);
        const std::uint32_t rem = mant & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // carry may bump exponent: fine
    } else if (e >= 102) {  // subnormal half: value / 2^-24, rounded
        const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const std::uint32_t shift = 126 - e;  // 14..24
        r = m >> shift;
        const std::uint32_t rem = m & ((1u << shift) - 1);
        const std::uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) ++r;
    } else {
        r = 0;  // below half the smallest subnormal
    }
    return static_cast<unsigned short>(sign | r);
}

inline float half_bits_to_float(unsigned short h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t mant = h & 0x3ffu;
    std::uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN (payload kept)
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        int e = -14;
        while (!(mant & 0x400u)) { mant <<= 1; --e; }
        bits = sign | (static_cast<std::uint32_t>(e + 127) << 23) | ((mant & 0x3ffu) << 13);
    }
    return bit_cast<float>(bits);
}

inline unsigned short float_to_bf16_bits(float f) {
    const std::uint32_t x = bit_cast<std::uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((x >> 16) | 0x40u);  // quiet NaN
    const std::uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);  // ties to even
    return static_cast<unsigned short>((x + rounding) >> 16);
}

inline float bf16_bits_to_float(unsigned short b) {
    return bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace interp

struct __align__(2) __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(interp::float_to_half_bits(f)) {}
    operator float() const { return interp::half_bits_to_float(__x); }
};
struct __align__(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(interp::float_to_bf16_bits(f)) {}
    operator float() const { return interp::bf16_bits_to_float(__x); }
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

#define INTERP_HALF_OPS(H)                                                                   \
    inline H operator+(const H& a, const H& b) { return H(float(a) + float(b)); }           \
    inline H operator-(const H& a, const H& b) { return H(float(a) - float(b)); }           \
    inline H operator*(const H& a, const H& b) { return H(float(a) * float(b)); }           \
    inline H operator/(const H& a, const H& b) { return H(float(a) / float(b)); }           \
    inline H operator-(const H& a) { H r = a; r.__x ^= 0x8000u; return r; }                 \
    inline H operator+(const H& a) { return a; }                                            \
    inline H& operator+=(H& a, const H& b) { return a = a + b; }                            \
    inline H& operator-=(H& a, const H& b) { return a = a - b; }                            \
    inline H& operator*=(H& a, const H& b) { return a = a * b; }                            \
    inline H& operator/=(H& a, const H& b) { return a = a / b; }                            \
    inline bool operator==(const H& a, const H& b) { return float(a) == float(b); }         \
    inline bool operator!=(const H& a, const H& b) { return float(a) != float(b); }         \
    inline bool operator<(const H& a, const H& b) { return float(a) < float(b); }           \
    inline bool operator>(const H& a, const H& b) { return float(a) > float(b); }           \
    inline bool operator<=(const H& a, const H& b) { return float(a) <= float(b); }         \
    inline bool operator>=(const H& a, const H& b) { return float(a) >= float(b); }         \
    inline H __hadd(H a, H b) { return a + b; }                                             \
    inline H __hsub(H a, H b) { return a - b; }                                             \
    inline H __hmul(H a, H b) { return a * b; }                                             \
    inline H __hdiv(H a, H b) { return a / b; }                                             \
    inline H __hneg(H a) { return -a; }                                                     \
    inline H __habs(H a) { H r = a; r.__x &= 0x7fffu; return r; }                          \
    inline H __hmax(H a, H b) { return H(fmaxf(float(a), float(b))); }                     \
    inline H __hmin(H a, H b) { return H(fminf(float(a), float(b))); }                      \
    inline bool __hisnan(H a) { return float(a) != float(a); }
INTERP_HALF_OPS(__half)
INTERP_HALF_OPS(__nv_bfloat16)
#undef INTERP_HALF_OPS

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { __half h; h.__x = x; return h; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { __nv_bfloat16 b; b.__x = x; return b; }

#include "dynamic_shared.h"
#include "export.h"

#endif  // CONTRA_CUDA_INTERP_H
