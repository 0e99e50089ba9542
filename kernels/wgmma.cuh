// Hopper's warpgroup MMA (sm_90a): wgmma.mma_async with both operands in shared memory, each
// described by a 64-bit matrix descriptor, and the fences, commit groups and waits around it.
// Only the sm_90a build (kernels/*_sm90a.cu) has the instructions; the host picks those kernels
// on compute capability 9.0 alone.
//
// Operand layouts (PTX ISA, "Shared Memory Matrix Layout", 128-byte swizzle): the crate's
// matrices are staged as panels of 64 columns (bf16 / f16; 32 of tf32), one 128-byte row per
// matrix row; 8
// rows make a 1024-byte atom, which starts at a shared address that is a multiple of 1024. In a
// row, 16-byte chunk c is stored at chunk c ^ (row % 8): the swizzle is a function of the
// address, bits 4-6 XOR bits 7-9, so a K-major operand's k-step may start 32, 64 or 96 bytes
// into an atom's first row and the hardware finds the swizzled chunks itself (as CUTLASS steps
// its K-major descriptors). The crate's MN-major operands start at a row: a whole panel's 64
// columns (N = 64) or 16-row k-steps on, never a few columns into the rows.
//   * K-major (a panel's rows are the operand's M or N, its columns K): element (mn, k) of a
//     k-step at start + (mn / 8) SBO + (mn % 8) 128 + e k (e: the element's 2 or 4 bytes);
//     SBO = 1024, LBO unused (the k-step's 32 bytes fit the row). A k-step is the panel's
//     address plus 32 bytes per step.
//   * MN-major ("transposed": a panel's rows are K, its columns M or N): element (mn, k) at
//     start + (mn / 64) LBO + 2 (mn % 64) + (k / 8) SBO + (k % 8) 128; SBO = 1024 (8 rows of K),
//     LBO the step from one 64-column panel to the next. A k-step is 2048 bytes (16 rows) on.
//
// Descriptor ("Matrix Descriptor Format"): bits 0-13 start address >> 4; 16-29 leading byte
// offset >> 4; 32-45 stride byte offset >> 4; 49-51 base offset (0: atoms 1024-aligned); 62-63
// swizzle (1: 128 bytes).
//
// Accumulators of m64nNk16 with f32 D ("Register Fragment" of wgmma D): warp w of the warpgroup
// holds rows 16 w .. 16 w + 15; with g = lane / 4 and t = lane % 4, d[i] is row
// 16 w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2 t + i % 2. That is mma_16816's C layout
// (tensor_core.cuh) repeated along N: d[4 nt + e] is mma_16816's d[nt][e] for 8-column tile nt.
//
// Interpreted mode: each thread computes its own accumulator elements, reading A and B through
// the descriptors and the swizzle of the shared address, so a wrong start, stride or panel
// offset, or an atom off its 1024-byte alignment, reads wrong elements. (The emulated shared
// window starts at kInterpSharedWindow, deliberately not a multiple of 1024.) Like cp.async in
// tensor_core.cuh, an mma_async lands at one of its extremes: the ops of odd warps at issue
// (operands not yet staged and made visible are read wrong), those of even warps at the
// wgmma_wait that covers them (reading D before the wait, or refilling an operand's stage
// before it, gives wrong results).
#pragma once
#include <type_traits>

#include "common.cuh"
#include "tensor_core.cuh"

namespace contra {

#if defined(CONTRA_INTERP)
// The emulated shared-window address of the dynamic shared memory's first byte.
constexpr unsigned kInterpSharedWindow = 0x480;
#endif

// The shared-window address of `p`, a pointer into the block's dynamic shared memory.
__device__ __forceinline__ unsigned shared_window(const void* p) {
#if defined(CONTRA_INTERP)
    const auto* base = static_cast<const unsigned char*>(interp::dynamic_shared_ptr());
    const auto* at = static_cast<const unsigned char*>(p);
    if (at < base || at >= base + interp::dynamic_shared_bytes()) __trap();  // not in dynamic shared memory
    return kInterpSharedWindow + static_cast<unsigned>(at - base);
#elif defined(__CUDA_ARCH__)
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
#else
    return 0;
#endif
}

constexpr unsigned kSwizzleAtomBytes = 1024;  // 8 rows of 128 bytes
constexpr unsigned kSwizzleRowBytes = 128;

// `address`, opaque to the compiler from here on: the descriptors built from it in a loop are
// computed there (an add each), not hoisted out of it into 64-bit registers held for the whole
// loop, which a kernel at its register bound cannot spare.
__device__ __forceinline__ unsigned opaque(unsigned address) {
#if defined(__CUDA_ARCH__)
    asm volatile("" : "+r"(address));
#endif
    return address;
}

// The descriptor of a 128-byte-swizzled operand starting at shared address `address`, its
// atoms of 8 rows 1024 bytes apart and its 64-column panels `panel_bytes` apart.
__device__ __forceinline__ unsigned long long swizzled_descriptor(unsigned address, unsigned panel_bytes) {
    const unsigned long long start = (address & 0x3ffffu) >> 4, leading = (panel_bytes & 0x3ffffu) >> 4;
    const unsigned long long stride = kSwizzleAtomBytes >> 4, swizzle_128 = 1;
    return start | (leading << 16) | (stride << 32) | (swizzle_128 << 62);
}
// A K-major operand (its leading byte offset unused: 1 by convention).
__device__ __forceinline__ unsigned long long swizzled_operand(unsigned address) {
    return swizzled_descriptor(address, 16);
}

// The byte offset, in a panel of 128-byte-swizzled rows that starts on a 1024-byte boundary, of
// 16-byte chunk `chunk` (0..7) of row `row`.
__device__ __forceinline__ unsigned swizzled_chunk(int row, int chunk) {
    return row * kSwizzleRowBytes + 16 * (chunk ^ (row % 8));
}

#if defined(CONTRA_INTERP)
namespace warpgroup_mma {
struct Op {
    float* d;
    unsigned long long a, b;
    bool accumulate;
    void (*run)(const Op&);  // the shape, operand type and majors' arithmetic
    void land() const { run(*this); }
};
inline AsyncGroups<Op>& state() { return AsyncGroups<Op>::of_this_thread(); }

// Element (mn, k) of the 128-byte-swizzled operand `desc`, K-major or MN-major (16-bit only),
// k within one 32-byte k-step. tf32 reads the 19 bits the format keeps (the kernels round the
// staged words first).
template <typename T, bool kMnMajor>
inline float operand(unsigned long long desc, int mn, int k) {
    constexpr unsigned kBytes = std::is_same<T, tf32>::value ? 4 : 2;
    const unsigned start = static_cast<unsigned>(desc & 0x3fffu) << 4;
    const unsigned leading = static_cast<unsigned>((desc >> 16) & 0x3fffu) << 4;
    const unsigned stride = static_cast<unsigned>((desc >> 32) & 0x3fffu) << 4;
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) __trap();  // only the layout this file makes
    const unsigned logical = kMnMajor ? start + (mn / 64) * leading + 2 * (mn % 64) + (k / 8) * stride +
                                            (k % 8) * kSwizzleRowBytes
                                      : start + (mn / 8) * stride + (mn % 8) * kSwizzleRowBytes + kBytes * k;
    const unsigned address = logical ^ (((logical >> 7) & 7) << 4);
    const unsigned long long bytes = interp::dynamic_shared_bytes();
    if (address < kInterpSharedWindow || address + kBytes > kInterpSharedWindow + bytes) __trap();
    const unsigned char* at = static_cast<const unsigned char*>(interp::dynamic_shared_ptr()) + (address - kInterpSharedWindow);
    if constexpr (kBytes == 4) {
        unsigned word;
        std::memcpy(&word, at, 4);
        return __uint_as_float(word & 0xffffe000u);
    } else {
        unsigned short bits;
        std::memcpy(&bits, at, 2);
        return half_bits_to_float<T>(bits);
    }
}

// This thread's accumulators of one m64nNk16 (tf32: m64nNk8).
template <typename T, int N, bool kTransA, bool kTransB>
inline void run(const Op& op) {
    constexpr int kSteps = std::is_same<T, tf32>::value ? 8 : 16;
    const int linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int lane = linear % 32, g = lane / 4, t = lane % 4, row0 = 16 * ((linear / 32) % 4);
    for (int i = 0; i < N / 2; ++i) {
        const int row = row0 + g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * t + i % 2;
        float sum = op.accumulate ? op.d[i] : 0.0f;
        for (int k = 0; k < kSteps; ++k) sum += operand<T, kTransA>(op.a, row, k) * operand<T, kTransB>(op.b, col, k);
        op.d[i] = sum;
    }
}
}  // namespace warpgroup_mma
#endif

// Pins `count` accumulators here: each is redefined at this point as far as the compiler knows,
// so no access to it moves across. After the wgmma_wait that completes them no read moves above
// the wait, and in wgmma_fence no earlier access moves below the fence (the asm of neither names
// a register).
__device__ __forceinline__ void wgmma_fence_operands(float* d, int count) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
    for (int i = 0; i < count; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// Orders this thread's accesses to the `count` accumulators at d (pinned first) before the
// warpgroup's next mma_async on them: before the first one, and after they were read or written
// by other instructions (PTX: otherwise undefined).
__device__ __forceinline__ void wgmma_fence(float* d, int count) {
    wgmma_fence_operands(d, count);
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Makes this thread's shared-memory writes (plain stores, and cp.async copies it has waited for)
// visible to the async proxy that wgmma reads operands through; a barrier then publishes them.
__device__ __forceinline__ void fence_async_shared() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Closes the group of the mma_async ops issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#if defined(CONTRA_INTERP)
    warpgroup_mma::state().commit();
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most `pending` of the warpgroup's committed groups are in flight (the newest);
// their accumulators may be read, and their operands' shared memory reused, after it.
template <int pending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(CONTRA_INTERP)
    warpgroup_mma::state().wait(pending);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(pending) : "memory");
#endif
}

// d (+)= A B for the warpgroup's 64 x N step over one 32-byte k-step of the operands' rows:
// 16 bf16 / f16 elements (m64nNk16, N = 16, 32 or 64), or 8 tf32 ones (T = tf32: f32 words
// already rounded to tf32; m64n32k8, K-major only). A (64 x k) and B (k x N) 128-byte swizzled in
// shared memory, given by their descriptors, K-major unless kTransA / kTransB (MN-major);
// `accumulate` false overwrites d. Every thread of the warpgroup calls it
// together. Asynchronous: d is this thread's N / 2 accumulators, valid after the wgmma_wait
// covering the op's commit group.
template <typename T, int N, bool kTransA = false, bool kTransB = false>
__device__ __forceinline__ void wgmma_k_step(float* d, unsigned long long a, unsigned long long b, bool accumulate) {
    constexpr bool kTf32 = std::is_same<T, tf32>::value;
    static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value || kTf32,
                  "bf16, f16 or tf32 operands");
    static_assert(N == 16 || N == 32 || N == 64, "the shapes the crate's kernels use");
    static_assert(!kTf32 || (N == 32 && !kTransA && !kTransB), "tf32: K-major m64n32k8 (the forward's)");
#if defined(CONTRA_INTERP)
    const warpgroup_mma::Op op{d, a, b, accumulate, warpgroup_mma::run<T, N, kTransA, kTransB>};
    const int linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if ((linear / 32) % 2 == 1) {  // an odd warp: the op lands at issue
        op.run(op);
    } else {
        warpgroup_mma::state().open.push_back(op);
    }
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#define CONTRA_WGMMA_TYPES(shape, kind) "wgmma.mma_async.sync.aligned." shape ".f32." kind "." kind " "
#define CONTRA_WGMMA_16(kind)                                                                                      \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n" CONTRA_WGMMA_TYPES("m64n16k16", kind)               \
                 "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, %12;\n}\n"                                 \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
                 : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)))
#define CONTRA_WGMMA_32(kind)                                                                                       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" CONTRA_WGMMA_TYPES("m64n32k16", kind)               \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),         \
                   "+f"(d[15])                                                                                      \
                 : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)))
#define CONTRA_WGMMA_64(kind)                                                                                       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" CONTRA_WGMMA_TYPES("m64n64k16", kind)               \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "          \
                 "%32, %33, p, 1, 1, %35, %36;\n}\n"                                                  \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
                 : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)))
    if constexpr (kTf32) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                       "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
                       "+f"(d[15])
                     : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
    } else if constexpr (N == 16 && kBf16) {
        CONTRA_WGMMA_16("bf16");
    } else if constexpr (N == 16) {
        CONTRA_WGMMA_16("f16");
    } else if constexpr (N == 32 && kBf16) {
        CONTRA_WGMMA_32("bf16");
    } else if constexpr (N == 32) {
        CONTRA_WGMMA_32("f16");
    } else if constexpr (kBf16) {
        CONTRA_WGMMA_64("bf16");
    } else {
        CONTRA_WGMMA_64("f16");
    }
#undef CONTRA_WGMMA_64
#undef CONTRA_WGMMA_32
#undef CONTRA_WGMMA_16
#undef CONTRA_WGMMA_TYPES
#elif defined(__CUDA_ARCH__)
    __trap();  // no wgmma below sm_90a: the host never launches these kernels there
#endif
}

}  // namespace contra
