// Tensor-core building blocks for sm_80+: the warp-wide mma.sync m16n8k16 (bf16 / f16 operands,
// f32 accumulators), ldmatrix (shared memory -> fragments) and the cp.async global -> shared
// copies with their commit / wait groups.
//
// On the GPU these are the PTX instructions. In the interpreted mode they are emulated with the
// semantics the PTX ISA documents, so that CI checks the callers' fragment indexing and pipeline
// discipline:
//   * mma: every lane contributes the fragment registers of the documented layout (below) and
//     receives its elements of D; the emulation gathers the A rows and B columns it needs from
//     the other lanes with warp shuffles, so a caller that loads a fragment from the wrong place
//     gets a wrong product.
//   * ldmatrix: each lane reads its elements through the row addresses the other lanes hold
//     (shuffled), so a lane giving the wrong row gets another lane's elements wrong.
//   * cp.async: on the GPU a copy lands at some time between its issue and the
//     cp.async.wait_group that covers it. The emulation takes both extremes: the copies of
//     even warps land at the wait (so reading a stage before waiting for it reads stale data),
//     those of odd warps at once (so refilling a stage that other warps still read, without a
//     barrier in between, corrupts their operands).
//
// Fragment layout of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two 16-bit elements, the lower
// column (or row, for B) in the low half:
//   A (16 x 16, row-major): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//                           a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, "col"):      b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8, f32):     c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
//
// and of m16n8k8 with tf32 operands ("Matrix Fragments for mma.m16n8k8", .tf32), one element per
// 32-bit register, C and D as above:
//   A (16 x 8, row-major):  a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
//   B (8 x 8, "col"):       b[0] = B[t][g], b[1] = B[t+4][g]
#pragma once
#include <type_traits>

#include "common.cuh"

#if defined(CONTRA_INTERP)
#include <cstring>
#include <vector>
#endif

namespace contra {

// The f32 value of one 16-bit element of type T given by its bits.
template <typename T>
__device__ __forceinline__ float half_bits_to_float(unsigned bits) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
    } else {
        return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
}

#if defined(CONTRA_INTERP)
// Two-element dot product of packed pairs.
template <typename T>
inline float pair_dot(unsigned a, unsigned b) {
    return half_bits_to_float<T>(a & 0xffffu) * half_bits_to_float<T>(b & 0xffffu) +
           half_bits_to_float<T>(a >> 16) * half_bits_to_float<T>(b >> 16);
}
#endif

// d += A B for one 16 x 8 x 16 tile; every lane of the warp must call it together.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
#if defined(CONTRA_INTERP)
    const unsigned full = 0xffffffffu;
    const int lane = (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32;
    const int g = lane / 4, t = lane % 4;
    // Lane 4 r + p holds columns 2p, 2p+1 (and 2p+8, 2p+9) of A rows r and r + 8; lane 4 c + p
    // holds rows 2p, 2p+1 (and 2p+8, 2p+9) of B column c.
    for (int p = 0; p < 4; ++p) {
        const unsigned a_top_lo = __shfl_sync(full, a[0], 4 * g + p), a_bot_lo = __shfl_sync(full, a[1], 4 * g + p);
        const unsigned a_top_hi = __shfl_sync(full, a[2], 4 * g + p), a_bot_hi = __shfl_sync(full, a[3], 4 * g + p);
        for (int c = 0; c < 2; ++c) {
            const int col = 2 * t + c;
            const unsigned b_lo = __shfl_sync(full, b[0], 4 * col + p), b_hi = __shfl_sync(full, b[1], 4 * col + p);
            d[c] += pair_dot<T>(a_top_lo, b_lo) + pair_dot<T>(a_top_hi, b_hi);
            d[2 + c] += pair_dot<T>(a_bot_lo, b_lo) + pair_dot<T>(a_bot_hi, b_hi);
        }
    }
#elif defined(__CUDA_ARCH__)
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

// x rounded to tf32 (8-bit exponent, 10-bit mantissa; PTX cvt.rna.tf32.f32: to nearest, ties
// away from zero), as the 32-bit word mma_1688_tf32 takes: the low 13 bits are zero.
__device__ __forceinline__ unsigned to_tf32(float x) {
#if defined(CONTRA_INTERP)
    const unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) return bits;  // inf and NaN stay what they are
    // Half of the dropped unit added to the magnitude carries into the kept bits exactly when
    // the dropped part is at least half: nearest, ties away (a carry into the exponent is right).
    return (bits + 0x1000u) & 0xffffe000u;
#elif defined(__CUDA_ARCH__)
    unsigned word;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(word) : "f"(x));
    return word;
#else
    return __float_as_uint(x);
#endif
}

#if defined(CONTRA_INTERP)
// The value the tensor core reads from a tf32 operand register: its low 13 bits are not part of
// the format (a caller that skips to_tf32 gets its operands truncated).
inline float tf32_operand(unsigned word) {
    return __uint_as_float((word & 0x7f800000u) == 0x7f800000u ? word : word & 0xffffe000u);
}
#endif

// d += A B for one 16 x 8 x 8 tile of tf32 operands (to_tf32 words), f32 accumulation; every
// lane of the warp must call it together.
__device__ __forceinline__ void mma_1688_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
#if defined(CONTRA_INTERP)
    const unsigned full = 0xffffffffu;
    const int lane = (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32;
    const int g = lane / 4, t = lane % 4;
    // Lane 4 r + p holds columns p and p + 4 of A rows r and r + 8; lane 4 c + p holds rows p and
    // p + 4 of B column c. A product of two tf32 values is exact in f32.
    for (int p = 0; p < 4; ++p) {
        const float a_top = tf32_operand(__shfl_sync(full, a[0], 4 * g + p));
        const float a_bot = tf32_operand(__shfl_sync(full, a[1], 4 * g + p));
        const float a_top_hi = tf32_operand(__shfl_sync(full, a[2], 4 * g + p));
        const float a_bot_hi = tf32_operand(__shfl_sync(full, a[3], 4 * g + p));
        for (int c = 0; c < 2; ++c) {
            const int col = 2 * t + c;
            const float b_lo = tf32_operand(__shfl_sync(full, b[0], 4 * col + p));
            const float b_hi = tf32_operand(__shfl_sync(full, b[1], 4 * col + p));
            d[c] += a_top * b_lo + a_top_hi * b_hi;
            d[2 + c] += a_bot * b_lo + a_bot_hi * b_hi;
        }
    }
#elif defined(__CUDA_ARCH__)
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Loads `count` (1, 2 or 4) 8 x 8 matrices of 16-bit elements from shared memory, one register
// per matrix; every lane of the warp calls it together (PTX ldmatrix.sync.aligned.m8n8.x{count}
// [.trans].shared.b16). Lane 8 i + r gives the address of row r of matrix i (8 contiguous
// elements, 16-byte aligned); the other lanes' addresses are not read. With g = lane / 4 and
// t = lane % 4, lane receives in d[i] elements (g, 2t) and (g, 2t + 1) of matrix i, the first in
// the low half: the A / B fragment layout of mma_16816 above. `transposed` delivers those of the
// transposed matrix, elements (2t, g) and (2t + 1, g): a B operand from a row-major K x N tile.
template <int count, bool transposed>
__device__ __forceinline__ void ldmatrix(unsigned d[count], const void* row_address) {
    static_assert(count == 1 || count == 2 || count == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(CONTRA_INTERP)
    const unsigned full = 0xffffffffu;
    const int lane = (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32;
    const int g = lane / 4, t = lane % 4;
    const unsigned long long mine = reinterpret_cast<unsigned long long>(row_address);
    if (lane < 8 * count && mine % 16 != 0) {
        __trap();  // the hardware faults on a misaligned row too
    }
    // Every lane joins every shuffle, as the warp does the one instruction together.
    for (int i = 0; i < count; ++i) {
        if (!transposed) {
            const auto row = reinterpret_cast<const unsigned char*>(__shfl_sync(full, mine, 8 * i + g));
            std::memcpy(&d[i], row + 4 * t, 4);
        } else {
            const auto top = reinterpret_cast<const unsigned char*>(__shfl_sync(full, mine, 8 * i + 2 * t));
            const auto bottom = reinterpret_cast<const unsigned char*>(__shfl_sync(full, mine, 8 * i + 2 * t + 1));
            unsigned short low = 0, high = 0;
            std::memcpy(&low, top + 2 * g, 2);
            std::memcpy(&high, bottom + 2 * g, 2);
            d[i] = static_cast<unsigned>(low) | (static_cast<unsigned>(high) << 16);
        }
    }
#elif defined(__CUDA_ARCH__)
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
    if constexpr (count == 1 && !transposed) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(d[0]) : "r"(a) : "memory");
    } else if constexpr (count == 1) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(d[0]) : "r"(a) : "memory");
    } else if constexpr (count == 2 && !transposed) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(d[0]), "=r"(d[1]) : "r"(a) : "memory");
    } else if constexpr (count == 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(d[0]), "=r"(d[1]) : "r"(a) : "memory");
    } else if constexpr (!transposed) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(a) : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(a) : "memory");
    }
#endif
}

#if defined(CONTRA_INTERP)
// The emulation of an asynchronous operation with commit groups (cp.async here, wgmma in
// wgmma.cuh): per CUDA thread, the committed groups not yet waited for (oldest first) and the
// open group, of the block whose serial they carry. An Op lands by op.land().
template <typename Op>
struct AsyncGroups {
    unsigned long long block = 0;
    std::vector<std::vector<Op>> committed;
    std::vector<Op> open;

    // This thread's groups: one table per worker thread, i.e. per running block, indexed by the
    // thread's linear id; what a block that ended left (never waited for) is dropped.
    static AsyncGroups& of_this_thread() {
        static thread_local AsyncGroups states[1024];
        AsyncGroups& s = states[threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)];
        if (s.block != interp::tls_block_serial) {
            s = AsyncGroups();
            s.block = interp::tls_block_serial;
        }
        return s;
    }
    void commit() {
        committed.push_back(open);
        open.clear();
    }
    // Lands the oldest groups until at most `pending` are in flight.
    void wait(size_t pending) {
        while (committed.size() > pending) {
            for (const Op& op : committed.front()) op.land();
            committed.erase(committed.begin());
        }
    }
};

namespace async_copy {
struct Copy {
    void* dst;
    unsigned char bytes[16];
    void land() const { std::memcpy(dst, bytes, 16); }
};
inline AsyncGroups<Copy>& state() { return AsyncGroups<Copy>::of_this_thread(); }
}  // namespace async_copy
#endif

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
#if defined(CONTRA_INTERP)
    const int linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if ((linear / 32) % 2 == 1) {  // an odd warp: the copy lands at issue
        std::memcpy(dst, src, 16);
        return;
    }
    async_copy::Copy copy;
    copy.dst = dst;
    std::memcpy(copy.bytes, src, 16);
    async_copy::state().open.push_back(copy);
#elif defined(__CUDA_ARCH__)
    const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    // "memory": the compiler must not move shared-memory accesses across the copy's issue,
    // its commit or its wait (a barrier follows each wait today; this keeps it correct without).
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address), "l"(src) : "memory");
#endif
}

// Closes the group of the copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(CONTRA_INTERP)
    async_copy::state().commit();
#elif defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` of this thread's committed groups are still in flight (the most
// recent ones). Other threads see the data after a following __syncthreads.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(CONTRA_INTERP)
    async_copy::state().wait(pending);
#elif defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

}  // namespace contra
