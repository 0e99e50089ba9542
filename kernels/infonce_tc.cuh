// The tensor-core engine of the InfoNCE-family kernels (bf16 / f16 operands, and f32 ones as
// tf32; sm_80+).
//
// Forward: each warp holds a 16 x 32 part of the 64 x 64 score tile as mma D fragments
// (tile_mma) and folds it into its rows' running max and sum right there, in registers: a row's
// 8 values per lane, then the 4 lanes of its quad. The two column halves of a row (two warps)
// meet once, at the end. No score value goes through shared memory, and each exponential is
// one exp2 of a value the temperature was folded into.
//
// Backward (bf16): the second products G K and G^T Q on mma with G rounded to bf16 (its range
// is f32's, so small probabilities do not underflow; f16 keeps those products in f32 here). Up
// to 256 features, each lane keeps its fragments of the block's dQ in registers for the whole key
// sweep and writes them once at the end. There (and for tf32 where its layout fits) the fused
// backward (end of this file) stages each key tile once for S and both products; it takes f16
// too, with G scaled by a power of two into f16's range (GradRows, infonce_grad.cuh).
#pragma once
#include "infonce_rows.cuh"
#include "interp/dynamic_shared.h"

namespace contra {

// The forward streams 36 KB of stages: 64-feature slices of bf16 / f16 (16 mma per warp between
// barriers), 32 of tf32 (also 16); the backward, which also holds G and the product's staging
// buffer, keeps kTcSlice.
template <typename T>
constexpr int kForwardSlice = kIsTf32<T> ? 32 : 64;

// The resident data path (`infonce_fwd_resident`, and the S recompute of `infonce_bwd_resident`):
// the block's 64 query rows are staged once into dynamic shared memory, and the key tiles of the
// whole sweep stream through a
// kResidentStages-deep cp.async pipeline of kForwardSlice-feature slices that runs on from one tile
// into the next (no restart per tile, one barrier per slice); both operands reach the mma through
// ldmatrix.x4. Dynamic shared memory: the rows (64 x q_stride words), then the stages
// (kResidentStages x 64 x kKeyStride words). src/kernels/infonce.rs computes the same size.
constexpr int kResidentStages = 3;

template <typename T>
struct ResidentGeometry {
    // A staged key row: one slice and one 16-byte chunk, so that the 8 rows an ldmatrix phase
    // reads start in 8 different 16-byte bank groups.
    static constexpr int kKeyStride = kForwardSlice<T> + kChunkElems<T>;
    static constexpr int kStageWords = kTile * kKeyStride;
    int padded;    // features rounded up to whole mma k-steps (zeros past dim)
    int q_stride;  // words per resident query row: padded and one chunk (same reason)
    int slices;    // key slices per tile
    __device__ __forceinline__ explicit ResidentGeometry(int dim)
        : padded((dim + kMmaK<T> - 1) / kMmaK<T> * kMmaK<T>),
          q_stride(padded + kChunkElems<T>),
          slices((padded + kForwardSlice<T> - 1) / kForwardSlice<T>) {}
    __device__ __forceinline__ unsigned long long bytes() const {
        return ((unsigned long long)kTile * q_stride + kResidentStages * kStageWords) * sizeof(StageWord<T>);
    }
};

// Stages rows [row0, row0 + 64) x features [k0, k0 + width) of `m` (width: whole chunks) into
// `dst` (row stride `stride` words) with the block's kThreads threads; no commit. A width known at
// compile time (kWidth > 0, then `width` is ignored) turns the chunk's row and column into shifts.
template <typename T, int kWidth = 0, int kThreads = 256>
__device__ __forceinline__ void stage_rows(const T* m, int rows, int dim, int row0, int k0, int width,
                                           StageWord<T>* dst, int stride) {
    const int tid = threadIdx.y * 16 + threadIdx.x, per_row = (kWidth > 0 ? kWidth : width) / kChunkElems<T>;
    for (int c = tid; c < kTile * per_row; c += kThreads) {
        const int r = c / per_row, col = kChunkElems<T> * (c % per_row);
        stage_16_bytes(m, rows, dim, row0 + r, k0 + col, dst + r * stride + col);
    }
}

// stage_rows for a block that stages the same shape many times (the fused backward's key tiles):
// each thread's first chunk and its step from one chunk to its next are worked out once, and
// a chunk inside the matrix is one test and one cp.async when the matrix allows 16-byte copies
// (whole chunks per row, 16-byte aligned); the rest take stage_16_bytes' zero-filling path.
template <typename T, int kThreads>
struct RowStager {
    const T* m;
    int rows, dim, stride;
    int per_row;               // chunks per staged row
    int first_row, first_col;  // this thread's first chunk
    int row_step, col_step;    // from one of its chunks to the next (kThreads chunks on)
    bool vectors;

    __device__ __forceinline__ RowStager(const T* matrix, int n_rows, int features, int width, int dst_stride)
        : m(matrix), rows(n_rows), dim(features), stride(dst_stride), per_row(width / kChunkElems<T>) {
        const int tid = threadIdx.y * 16 + threadIdx.x;
        first_row = tid / per_row;
        first_col = tid % per_row;
        row_step = kThreads / per_row;
        col_step = kThreads % per_row;
        vectors = dim % kChunkElems<T> == 0 && reinterpret_cast<uintptr_t>(matrix) % 16 == 0;
    }

    // Rows [row0, row0 + 64) into `dst`; no commit.
    __device__ __forceinline__ void stage(int row0, StageWord<T>* dst) const {
        const StageWord<T>* bits = reinterpret_cast<const StageWord<T>*>(m);
        int r = first_row, c = first_col;
        for (int chunk = threadIdx.y * 16 + threadIdx.x; chunk < kTile * per_row; chunk += kThreads) {
            const int row = row0 + r, col = kChunkElems<T> * c;
            StageWord<T>* to = dst + r * stride + col;
            if (vectors && row < rows && col + kChunkElems<T> <= dim) {
                cp_async_16(to, bits + (long long)row * dim + col);
            } else {
                stage_16_bytes(m, rows, dim, row, col, to);
            }
            r += row_step;
            c += col_step;
            if (c >= per_row) {
                c -= per_row;
                ++r;
            }
        }
    }
};

// An ldmatrix.x4 of 16-bit pairs or of f32 words; tf32 operands are rounded once loaded.
template <typename T>
__device__ __forceinline__ void ldmatrix_operand(unsigned r[4], const StageWord<T>* row) {
    ldmatrix<4, false>(r, row);
    if constexpr (kIsTf32<T>)
#pragma unroll
        for (int i = 0; i < 4; ++i) r[i] = to_tf32(__uint_as_float(r[i]));
}

// One k-step's mma of T: m16n8k16 (bf16 / f16) or m16n8k8 (tf32).
template <typename T>
__device__ __forceinline__ void mma_k_step(float d[4], const unsigned a[4], const unsigned b[2]) {
    if constexpr (kIsTf32<T>) {
        mma_1688_tf32(d, a, b);
    } else {
        mma_16816<T>(d, a, b);
    }
}

// ldmatrix.x4 lane l's rows for a warp's 16 x 32 part of a score tile (rows m0.., keys n0..),
// both operands row-major: A row m0 + l % 16 at chunk l / 16 (the four 8 x 8 matrices are
// a[0..3]); B key n0 + l % 8 + 8 (l / 16) at chunk (l / 8) % 2 (b[0], b[1] of key tile 2 pair,
// then of 2 pair + 1, the pair's keys 16 rows further on).
template <typename T>
__device__ __forceinline__ const StageWord<T>* score_a_row(const StageWord<T>* rows, int stride, int m0) {
    const int lane = (threadIdx.y * 16 + threadIdx.x) % 32;
    return rows + (m0 + lane % 16) * stride + kChunkElems<T> * (lane / 16);
}
template <typename T>
__device__ __forceinline__ const StageWord<T>* score_b_row(const StageWord<T>* keys, int stride, int n0) {
    const int lane = (threadIdx.y * 16 + threadIdx.x) % 32;
    return keys + (n0 + lane % 8 + 8 * (lane / 16)) * stride + kChunkElems<T> * ((lane / 8) % 2);
}

// One k-step of that 16 x 32 part from the lane's rows (score_a_row / score_b_row) at the
// k-step's first feature; of a 16 x 16 part (its first key pair) with kPairs = 1.
template <typename T, int kPairs = 2>
__device__ __forceinline__ void score_k_step(const StageWord<T>* a_row, const StageWord<T>* b_row, int b_stride,
                                             float d[2 * kPairs][4]) {
    unsigned a[4];
    ldmatrix_operand<T>(a, a_row);
#pragma unroll
    for (int pair = 0; pair < kPairs; ++pair) {
        unsigned b[4];
        ldmatrix_operand<T>(b, b_row + 16 * pair * b_stride);
        mma_k_step<T>(d[2 * pair], a, b);
        mma_k_step<T>(d[2 * pair + 1], a, b + 2);
    }
}

// `steps` k-steps from feature k0 of this warp's 16 x 32 part (rows m0.., keys n0..): A from the
// resident rows, B from the staged key slice.
template <typename T>
__device__ __forceinline__ void mma_resident_slice(const StageWord<T>* q_rows, int q_stride, int k0, int steps,
                                                   const StageWord<T>* stage, int m0, int n0, float d[4][4]) {
    constexpr int stride = ResidentGeometry<T>::kKeyStride;
    const StageWord<T>* a_row = score_a_row<T>(q_rows, q_stride, m0) + k0;
    const StageWord<T>* b_row = score_b_row<T>(stage, stride, n0);
#pragma unroll
    for (int ks = 0; ks < kForwardSlice<T> / kMmaK<T>; ++ks)
        if (ks < steps) score_k_step<T>(a_row + ks * kMmaK<T>, b_row + ks * kMmaK<T>, stride, d);
}

// A resident sweep of a block over `count` key tiles, the step-th starting at key `column(step)`:
// unit u = slice u % slices of the (u / slices)-th tile, staged into stage u % kResidentStages.
// Every unit commits one group (an empty one past the end), so a wait for all but the newest
// kResidentStages - 2 groups is a wait for the unit about to be read. Between two tiles the
// caller may use any shared memory but the sweep's; the next tile's first units are in flight.
template <typename T, typename Column>
struct ResidentSweep {
    const ResidentGeometry<T> geo;
    StageWord<T>* const rows;  // the block's query rows (dynamic shared memory), then the stages
    const T* const k;
    const int cols, dim, count;
    const Column column;

    // Only geometry: a kernel that does not take the resident path may construct it for any dim.
    __device__ __forceinline__ ResidentSweep(StageWord<T>* shared, const T* keys, int n_keys, int features,
                                             int tiles, Column first_key)
        : geo(features), rows(shared), k(keys), cols(n_keys), dim(features), count(tiles), column(first_key) {}

    // (64-bit: the layout is only formed when the launch gave it, so no wider dim reaches here.)
    __device__ __forceinline__ StageWord<T>* stage(int unit) const {
        return rows + (long long)kTile * geo.q_stride + (unit % kResidentStages) * ResidentGeometry<T>::kStageWords;
    }

    __device__ __forceinline__ void issue(int unit) const {
        if (unit < count * geo.slices) {
            // Always a whole slice (zeros past dim; the mma reads only the padded features): its
            // width known at compile time keeps the index arithmetic to shifts.
            const int k0 = unit % geo.slices * kForwardSlice<T>;
            stage_rows<T, kForwardSlice<T>>(k, cols, dim, column(unit / geo.slices), k0, 0, stage(unit),
                                            ResidentGeometry<T>::kKeyStride);
        }
        cp_async_commit();
    }

    // Stages rows [r0, r0 + 64) of q (with the first unit's group) and the first units; traps
    // unless the launch gave the layout's dynamic shared memory.
    __device__ __forceinline__ void start(const T* q, int n_rows, int r0) const {
        if (geo.bytes() > dynamic_shared_size()) __trap();
        stage_rows(q, n_rows, dim, r0, 0, geo.padded, rows, geo.q_stride);
        for (int unit = 0; unit < kResidentStages - 1; ++unit) issue(unit);
    }

    // The step-th tile's 64 x 64 dot products, this warp's 16 x 32 part (rows m0.., keys n0..) as
    // mma D fragments. Every thread of the block must call it (it synchronizes).
    __device__ __forceinline__ void tile(int step, int m0, int n0, float d[4][4]) const {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) d[nt][e] = 0.0f;
        for (int slice = 0; slice < geo.slices; ++slice) {
            const int unit = step * geo.slices + slice, k0 = slice * kForwardSlice<T>;
            cp_async_wait<kResidentStages - 2>();
            __syncthreads();  // the unit is visible to all; the stage refilled next is read by none
            issue(unit + kResidentStages - 1);
            mma_resident_slice<T>(rows, geo.q_stride, k0, min(kForwardSlice<T>, geo.padded - k0) / kMmaK<T>,
                                  stage(unit), m0, n0, d);
        }
    }

    // No copy outlives the block.
    __device__ __forceinline__ void finish() const { cp_async_wait<0>(); }
};

// Loss: what the kernel knows of the loss at compile time (AnyLoss: nothing; FixedLoss is not
// for a key split). Sweep: the resident data path (ResidentSweep, or Hopper's WgmmaSweep).
template <typename T, bool kSplit, bool kResident, typename Loss = AnyLoss,
          template <typename, typename> class Sweep = ResidentSweep>
__device__ void infonce_fwd_tensor_cores(const ContraInfonceFwdParams& p) {
    __shared__ ColumnParts<4> columns;  // CLIP / symmetric sweep: per row-warp partials
    __shared__ float second_half[3][kTile];  // column half 1: each row's max, sum and target
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int m0 = 16 * (warp % 4), half = warp / 4, n0 = 32 * half;
    const int r0 = blockIdx.x * kTile;
    const KeyTiles tiles(p, blockIdx.x, blockIdx.y);
    if (tiles.count == 0) return;  // a split symmetric row's empty last range
    const float scale_log2 = logit_scale(p) * kLog2e;
    const T* q = static_cast<const T*>(p.q);
    // This lane's rows: m0 + g (fragment elements 0, 1) and m0 + g + 8 (elements 2, 3).
    QueryRow query[2];
    OnlineLse state[2];
    float target[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        query[h].template load<Loss>(p, r0 + m0 + g + 8 * h);
        state[h].init();
        target[h] = 0.0f;
        if (p.extra_key && half == 0 && blockIdx.y == 0) {  // warp-uniform; once per split
            const float u = extra_logit<4>(p, q, query[h].row, t, scale_log2);
            state[h].merge(u, 1.0f);
            if (t == 0) target[h] = u;
        }
    }
    float d[4][4];
    const T* k = static_cast<const T*>(p.k);
    CONTRA_DYNAMIC_SHARED(StageWord<T>, resident);
    const auto column = [&](int step) { return tiles.column(step); };
    const Sweep<T, decltype(column)> sweep(resident, k, p.cols, p.dim, tiles.count, column);
    if constexpr (kResident) sweep.start(q, p.rows, r0);
    for (int step = 0; step < tiles.count; ++step) {
        const int c0 = tiles.column(step);
        if constexpr (kResident) {
            sweep.tile(step, m0, n0, d);
        } else {
            tile_mma<kForwardSlice<T>>(q, p.rows, r0, k, p.cols, c0, p.dim, d);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float u[8], local_max = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = c0 + n0 + 8 * nt + 2 * t + e;
                    const bool masked = query[h].masked(p, col);
                    u[2 * nt + e] = masked ? -INFINITY : __fmul_rn(d[nt][2 * h + e], scale_log2);
                    target[h] += query[h].template target_share<Loss>(p, col, masked, u[2 * nt + e]);
                    local_max = fmaxf(local_max, u[2 * nt + e]);
                }
            const float tile_max = group_max<4>(local_max);
            float local_sum = 0.0f;
            if (tile_max != -INFINITY)
#pragma unroll
                for (int e = 0; e < 8; ++e) local_sum += exp2f(u[e] - tile_max);
            state[h].merge(tile_max, group_sum<4>(local_sum));
        }
        if (!kSplit && tiles.template folds_columns<Loss>(p, c0, r0)) {
            // Column statistics: this lane's 2 rows per column, the 8 lanes of the column (same
            // t) across the warp, then the 4 row-warps through shared memory.
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = n0 + 8 * nt + 2 * t + e;
                    const float u_top = query[0].row < p.rows ? __fmul_rn(d[nt][e], scale_log2) : -INFINITY;
                    const float u_bottom = query[1].row < p.rows ? __fmul_rn(d[nt][2 + e], scale_log2) : -INFINITY;
                    float m = fmaxf(u_top, u_bottom);
                    const KeyColumn<Loss> key(p, c0 + c);
                    float share = key.share(p, query[0].row, u_top) + key.share(p, query[1].row, u_bottom);
#pragma unroll
                    for (int offset = 4; offset < 32; offset <<= 1)
                        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
                    float s = m == -INFINITY ? 0.0f : exp2f(u_top - m) + exp2f(u_bottom - m);
#pragma unroll
                    for (int offset = 4; offset < 32; offset <<= 1) {
                        s += __shfl_xor_sync(0xffffffffu, s, offset);
                        share += __shfl_xor_sync(0xffffffffu, share, offset);
                    }
                    if (g == 0) {
                        columns.max[warp % 4][c] = m;
                        columns.sum[warp % 4][c] = s;
                        columns.target[warp % 4][c] = share;
                    }
                }
            __syncthreads();
            fold_columns(p, c0, columns);
            __syncthreads();
        }
    }
    if constexpr (kResident) sweep.finish();
#pragma unroll
    for (int h = 0; h < 2; ++h) target[h] = group_sum<4>(target[h]);
    if (half == 1 && t == 0)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = m0 + g + 8 * h;
            second_half[0][r] = state[h].running_max;
            second_half[1][r] = state[h].running_sum;
            second_half[2][r] = target[h];
        }
    __syncthreads();
    if (half == 0 && t == 0)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = m0 + g + 8 * h;
            state[h].merge(second_half[0][r], second_half[1][r]);
            query[h].finish(p, state[h], target[h] + second_half[2][r]);
        }
}

// The forward of one loss of the family with its data path Sweep, for tensor-core operands (the
// exact f32 instantiations stop: the host never picks them): the resident forward (infonce.cu)
// and Hopper's (infonce_sm90a.cu).
template <typename T, typename Loss, template <typename, typename> class Sweep>
__device__ void infonce_fwd_fixed(const ContraInfonceFwdParams& p) {
    if constexpr (kOnTensorCores<T>) {
        if (!Loss::matches(p)) __trap();
        infonce_fwd_tensor_cores<T, false, true, Loss, Sweep>(p);
    } else {
        __trap();
    }
}
// infonce_fwd_<path>_<loss><T> for each loss, the names the kernel macros instantiate per
// operand type.
#define CONTRA_FIXED_FORWARD_OF(path, loss, Loss, Sweep)                           \
    template <typename T>                                                          \
    __device__ void infonce_fwd_##path##_##loss(const ContraInfonceFwdParams& p) { \
        infonce_fwd_fixed<T, Loss, Sweep>(p);                                      \
    }
#define CONTRA_FIXED_FORWARDS(path, Sweep)                  \
    CONTRA_FIXED_FORWARD_OF(path, ntxent, NtXentLoss, Sweep) \
    CONTRA_FIXED_FORWARD_OF(path, clip, ClipLoss, Sweep)     \
    CONTRA_FIXED_FORWARD_OF(path, supcon, SupConLoss, Sweep) \
    CONTRA_FIXED_FORWARD_OF(path, infonce, InfoNceLoss, Sweep)

// bf16 packed pair of two f32 values (round to nearest even), the lower index in the low half.
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

// A packed pair of two f32 values as T, bf16 or f16 (round to nearest even), the lower index in
// the low half.
template <typename T>
__device__ __forceinline__ unsigned half_pair(float lo, float hi) {
    if constexpr (std::is_same<T, __half>::value) {
        return (unsigned)__half_as_ushort(__float2half_rn(lo)) | ((unsigned)__half_as_ushort(__float2half_rn(hi)) << 16);
    } else {
        return bf16_pair(lo, hi);
    }
}

// The backward's second products on the tensor cores (bf16 sources):
// out[dst0 + r] (+)= sum_t G'[r][t] src[src0 + t], G' = g or g^T (`transposed`), with G' rounded
// to bf16 as the A operand and the src rows' 64-feature chunks, staged as they are (row-major)
// by cp.async, read as the "col" B operand by ldmatrix.trans. Warp w owns output rows
// 16 (w % 4) .. +16 and features 32 (w / 4) .. +32 of each chunk.
constexpr int kSrcStride = kTile + 8;  // a staged src row: 64 features and 16 bytes of pad
static_assert(kTile * kSrcStride * 2 <= kTile * kTilePad * 4, "a staged chunk fits the staging buffer");

// This warp's A fragments of G' for the tile's four 16-wide k-steps (after a barrier that
// completes g).
template <bool transposed>
__device__ __forceinline__ void g_fragments(const float (*g)[kTilePad], unsigned af[4][4]) {
    const int lane = (threadIdx.y * 16 + threadIdx.x) % 32, warp = (threadIdx.y * 16 + threadIdx.x) / 32;
    const int r = 16 * (warp % 4) + lane / 4;
    auto g_at = [&](int row, int k) { return transposed ? g[k][row] : g[row][k]; };
#pragma unroll
    for (int step = 0; step < 4; ++step) {
        const int k = 16 * step + 2 * (lane % 4);
        af[step][0] = bf16_pair(g_at(r, k), g_at(r, k + 1));
        af[step][1] = bf16_pair(g_at(r + 8, k), g_at(r + 8, k + 1));
        af[step][2] = bf16_pair(g_at(r, k + 8), g_at(r, k + 9));
        af[step][3] = bf16_pair(g_at(r + 8, k + 8), g_at(r + 8, k + 9));
    }
}

// sum[nt] += A B for this warp's part of a 64-feature chunk (output rows 16 (w % 4) .. +16,
// features d0 + n0 .. + kWarpCols, n0 = kWarpCols (w / 4): 32 for 8 warps, 16 for 16) over
// k = 64: A given as the four k-steps' fragments, B the 64 source rows (k) x features (n) held
// row-major in shared memory, `stride` elements per row (an odd number of 16-byte chunks).
// B fragments by ldmatrix.x4.trans: lane l addresses source row 16 step + l % 8 + 8 ((l / 8) % 2)
// at feature d0 + n0 + 16 pair + 8 (l / 16), giving b[0], b[1] of feature tile 2 pair, then of
// 2 pair + 1.
// product_rows_step is one k-step of it (A: that step's fragment).
template <int kWarpCols = 32, typename T = __nv_bfloat16>
__device__ __forceinline__ void product_rows_step(const unsigned a[4], const unsigned short* src, int stride, int d0,
                                                  int step, float sum[kWarpCols / 8][4]) {
    const int tid = threadIdx.y * 16 + threadIdx.x, lane = tid % 32, n0 = kWarpCols * (tid / 32 / 4);
    const unsigned short* at = src + (16 * step + lane % 8 + 8 * ((lane / 8) % 2)) * stride + d0 + n0 + 8 * (lane / 16);
#pragma unroll
    for (int pair = 0; pair < kWarpCols / 16; ++pair) {
        unsigned b[4];
        ldmatrix<4, true>(b, at + 16 * pair);
        mma_16816<T>(sum[2 * pair], a, b);
        mma_16816<T>(sum[2 * pair + 1], a, b + 2);
    }
}
template <int kWarpCols = 32>
__device__ __forceinline__ void product_from_rows(const unsigned af[4][4], const unsigned short* src, int stride,
                                                  int d0, float sum[kWarpCols / 8][4]) {
#pragma unroll
    for (int step = 0; step < 4; ++step) product_rows_step<kWarpCols>(af[step], src, stride, d0, step, sum);
}

// One 64-feature chunk [d0, d0 + 64): stages the 64 src rows' features into `staged` (the
// caller's buffer, 9216 of its 16640 bytes; a row's 144 bytes put the 8 rows an ldmatrix phase
// reads in 8 different bank groups), then sum[nt] += G' src for this warp's part.
__device__ __forceinline__ void product_chunk(const unsigned af[4][4], float (*staged)[kTilePad],
                                              const __nv_bfloat16* src, int n_src, int src0, int dim, int d0,
                                              float sum[4][4]) {
    unsigned short(*src_rows)[kSrcStride] = reinterpret_cast<unsigned short(*)[kSrcStride]>(staged);
    const int tid = threadIdx.y * 16 + threadIdx.x;
    __syncthreads();  // the previous chunk is consumed
    for (int c = tid; c < kTile * kTile / 8; c += 256) {
        const int r = c / 8, col = 8 * (c % 8);
        stage_16_bytes(src, n_src, dim, src0 + r, d0 + col, &src_rows[r][col]);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    product_from_rows(af, &src_rows[0][0], kSrcStride, 0, sum);
}

// Multiplies `count` accumulators by `factor`.
__device__ __forceinline__ void scale_fragments(float* d, int count, float factor) {
#pragma unroll
    for (int i = 0; i < count; ++i) d[i] *= factor;
}

// Writes this warp's fragments of a kCols-feature part of the gradient, rows from dst0 (the
// warp's rows: dst0 + 16 (w % 4) ..) and features from feature0, inside the n_dst x dim output
// (`how`: the gradient's write mode): element e of feature tile nt is row
// dst0 + 16 (w % 4) + l / 4 + 8 (e / 2), feature feature0 + 8 nt + 2 (l % 4) + e % 2.
// A lane's elements come in pairs of adjacent features (e = 0, 1 and 2, 3), written together
// (one vector atomic on sm_90) when both are inside and the pair is 8-byte aligned (even dim).
// The bounds are tested as each tile's offset from the lane's first feature against the room
// left after it: one register for all the tests, not a feature per tile.
template <int kCols>
__device__ __forceinline__ void write_fragments(const float sum[kCols / 8][4], float* out, int dst0, int n_dst,
                                                int feature0, int dim, Write how) {
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int first_row = dst0 + 16 * (warp % 4) + lane / 4;
    const int first_feature = feature0 + 2 * (lane % 4);
    const int room = dim - first_feature;  // features from the lane's first one to the end
#pragma unroll
    for (int nt = 0; nt < kCols / 8; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = first_row + 8 * h, offset = 8 * nt;
            if (row >= n_dst) continue;
            float* dst = out + (long long)row * dim + first_feature + offset;
            const float first = sum[nt][2 * h], second = sum[nt][2 * h + 1];
            if (offset + 1 < room && dim % 2 == 0) {
                write_grad_pair(dst, first, second, how);
            } else {
                if (offset < room) write_grad(dst, first, how);
                if (offset + 1 < room) write_grad(dst + 1, second, how);
            }
        }
}

// Writes this warp's fragments of output chunk d0 in the layout of product_from_rows: warp w's
// kWarpCols features start at d0 + kWarpCols (w / 4).
template <int kWarpCols = 32>
__device__ __forceinline__ void write_chunk(const float sum[kWarpCols / 8][4], float* out, int dst0, int n_dst, int d0,
                                            int dim, Write how) {
    const int warp = (threadIdx.y * 16 + threadIdx.x) / 32;
    write_fragments<kWarpCols>(sum, out, dst0, n_dst, d0 + kWarpCols * (warp / 4), dim, how);
}

// The product written to global memory chunk by chunk (`how`: the gradient's write mode).
template <bool transposed>
__device__ void grad_product_tc(const float (*g)[kTilePad], float (*staged)[kTilePad], const __nv_bfloat16* src,
                                int n_src, int src0, int dim, float* out, int dst0, int n_dst, Write how) {
    __syncthreads();  // g is complete
    unsigned af[4][4];
    g_fragments<transposed>(g, af);
    for (int d0 = 0; d0 < dim; d0 += kTile) {
        float sum[4][4] = {};
        product_chunk(af, staged, src, n_src, src0, dim, d0, sum);
        write_chunk(sum, out, dst0, n_dst, d0, dim, how);
    }
}

// dQ held in registers across the whole key sweep when dim <= 64 kResidentChunks: each lane
// keeps its fragments of every chunk, so the query rows' gradient is written once, not read and
// rewritten in global memory for every key tile.
constexpr int kResidentChunks = 4;

__device__ __forceinline__ void grad_product_tc_resident(const float (*g)[kTilePad], float (*staged)[kTilePad],
                                                         const __nv_bfloat16* src, int n_src, int src0, int dim,
                                                         float resident[kResidentChunks][4][4]) {
    __syncthreads();  // g is complete
    unsigned af[4][4];
    g_fragments<false>(g, af);
#pragma unroll
    for (int chunk = 0; chunk < kResidentChunks; ++chunk)
        if (chunk * kTile < dim) product_chunk(af, staged, src, n_src, src0, dim, chunk * kTile, resident[chunk]);
}

// Writes the resident dQ of rows [dst0, dst0 + 64) (`how`: overwrite, or add under a key split).
template <int kWarpCols = 32>
__device__ __forceinline__ void write_resident(const float resident[kResidentChunks][kWarpCols / 8][4], float* out,
                                               int dst0, int n_dst, int dim, Write how) {
#pragma unroll
    for (int chunk = 0; chunk < kResidentChunks; ++chunk)
        if (chunk * kTile < dim) write_chunk<kWarpCols>(resident[chunk], out, dst0, n_dst, chunk * kTile, dim, how);
}

// The fused backward (`infonce_bwd_fused_bf16`, `_tf32`; up to kFusedMaxDim features: dQ stays
// in registers). Dynamic shared memory: the block's 64 query rows, two whole 64-key tiles (the
// one in use, the next one in flight), then the tile's G (bf16, or tf32-rounded f32 words:
// 64 x kGStride). A row holds the features rounded up to whole 64-feature chunks (zeros past
// dim, so every chunk's product reads staged values) and one 16-byte chunk of pad: an odd number
// of 16-byte chunks, so the 8 rows an ldmatrix phase reads start in 8 different bank groups.
// src/kernels/infonce.rs computes the same size.
constexpr int kFusedMaxDim = kResidentChunks * kTile;
// Its block: 16 warps, warp w the 16 x 16 part (rows 16 (w % 4), keys 16 (w / 4)) of each score
// tile, and of each 64-feature chunk of the products the rows 16 (w % 4) and features
// 16 (w / 4): at the same shared memory, twice the warps per SM of 8 warps with 16 x 32 parts,
// each holding half the registers (dQ: 32 a lane, not 64), so the kernel fits 128 registers.
constexpr int kFusedThreads = 512;
constexpr int kFusedWarps = kFusedThreads / 32;
constexpr int kFusedWarpCols = 16;
constexpr int kFusedTiles = kFusedWarpCols / 8;  // n8 tiles in a warp's part
template <typename T>
constexpr int kGStride = kTile + kChunkElems<T>;

template <typename T>
struct FusedGeometry {
    int padded;  // features rounded up to whole chunks
    int stride;  // words per staged row
    __device__ __forceinline__ explicit FusedGeometry(int dim)
        : padded((dim + kTile - 1) / kTile * kTile), stride(padded + kChunkElems<T>) {}
    __device__ __forceinline__ unsigned long long bytes() const {
        return (3ull * kTile * stride + (unsigned long long)kTile * kGStride<T>) * sizeof(StageWord<T>);
    }
};

// This warp's 16 x kWarpCols part of S (rows m0.., keys n0..) over `padded` features: A from the
// resident rows, B from the staged key tile, both row-major with `stride` words.
template <typename T, int kWarpCols>
__device__ __forceinline__ void scores_from_rows(const StageWord<T>* rows, const StageWord<T>* keys, int stride,
                                                 int padded, int m0, int n0, float d[kWarpCols / 8][4]) {
    const StageWord<T>* a_row = score_a_row<T>(rows, stride, m0);
    const StageWord<T>* b_row = score_b_row<T>(keys, stride, n0);
    for (int k0 = 0; k0 < padded; k0 += kMmaK<T>)
        score_k_step<T, kWarpCols / 16>(a_row + k0, b_row + k0, stride, d);
}

// G's k-steps over a tile's 64 keys (or queries): 4 of bf16's 16, 8 of tf32's 8.
template <typename T>
constexpr int kGSteps = kTile / kMmaK<T>;

// Stores G's two adjacent values (row, col even) as the operand type: a bf16 or f16 pair, or two
// tf32-rounded words.
template <typename T>
__device__ __forceinline__ void store_g_pair(StageWord<T>* g_tile, int row, int col, float first, float second) {
    if constexpr (kIsTf32<T>) {
        *reinterpret_cast<uint2*>(g_tile + row * kGStride<T> + col) = make_uint2(to_tf32(first), to_tf32(second));
    } else {
        *reinterpret_cast<unsigned*>(g_tile + row * kGStride<T> + col) = half_pair<T>(first, second);
    }
}

// A fragment of the tile's G ([query][key]) for k-step `step` of this warp's 16 output rows: of G
// itself (dQ = G K: rows are queries, k runs over keys; ldmatrix, lane l addresses query
// 16 (w % 4) + l % 16 at chunk l / 16 of the k-step), or with `transposed` of G^T (dK = G^T Q:
// rows are keys, k runs over queries). bf16 takes G^T by ldmatrix.trans (lane l addresses query
// 16 step + l % 8 + 8 (l / 16) at key 16 (w % 4) + 8 ((l / 8) % 2)); tf32, whose words ldmatrix
// cannot transpose, by single loads in the m16n8k8 layout (a0 = G^T(g, t), a1 = G^T(g + 8, t),
// a2 = G^T(g, t + 4), a3 = G^T(g + 8, t + 4)).
template <typename T, bool transposed>
__device__ __forceinline__ void g_step_fragment(const StageWord<T>* g_tile, int step, unsigned a[4]) {
    constexpr int stride = kGStride<T>, chunk = kChunkElems<T>;
    const int tid = threadIdx.y * 16 + threadIdx.x, lane = tid % 32, m0 = 16 * (tid / 32 % 4);
    const int g = lane / 4, t = lane % 4, k0 = kMmaK<T> * step;
    if constexpr (!transposed) {
        ldmatrix<4, false>(a, g_tile + (m0 + lane % 16) * stride + k0 + chunk * (lane / 16));
    } else if constexpr (kIsTf32<T>) {
        a[0] = g_tile[(k0 + t) * stride + m0 + g];
        a[1] = g_tile[(k0 + t) * stride + m0 + g + 8];
        a[2] = g_tile[(k0 + t + 4) * stride + m0 + g];
        a[3] = g_tile[(k0 + t + 4) * stride + m0 + g + 8];
    } else {
        ldmatrix<4, true>(a, g_tile + (k0 + lane % 8 + 8 * (lane / 16)) * stride + m0 + 8 * ((lane / 8) % 2));
    }
}

// One k-step of sum[nt] += A B for this warp's part of a 64-feature chunk (output rows
// 16 (w % 4) .. +16, features d0 + n0 .. + kFusedWarpCols, n0 = kFusedWarpCols (w / 4)) over the
// k-step's staged rows: bf16 / f16 by product_rows_step; tf32 with B by single loads in the m16n8k8
// layout (b0 = src(k0 + t, n), b1 = src(k0 + t + 4, n), n = feature n0 + 8 nt + g), rounded to tf32.
template <typename T>
__device__ __forceinline__ void fused_product_step(const unsigned a[4], const StageWord<T>* src, int stride, int d0,
                                                   int step, float sum[kFusedTiles][4]) {
    if constexpr (kIsTf32<T>) {
        const int tid = threadIdx.y * 16 + threadIdx.x, lane = tid % 32, n0 = kFusedWarpCols * (tid / 32 / 4);
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int nt = 0; nt < kFusedTiles; ++nt) {
            const StageWord<T>* at = src + (8 * step + t) * stride + d0 + n0 + 8 * nt + g;
            const unsigned b[2] = {to_tf32(__uint_as_float(at[0])), to_tf32(__uint_as_float(at[4 * stride]))};
            mma_1688_tf32(sum[nt], a, b);
        }
    } else {
        product_rows_step<kFusedWarpCols, T>(a, src, stride, d0, step, sum);
    }
}

// dQ += G K into the resident chunks (`dim` features): k-step by k-step, so that one step's A
// fragment is live at a time, not the tile's.
template <typename T>
__device__ __forceinline__ void fused_dq_product(const StageWord<T>* g_tile, const StageWord<T>* keys, int stride,
                                                 int dim, float resident[kResidentChunks][kFusedTiles][4]) {
#pragma unroll 1
    for (int step = 0; step < kGSteps<T>; ++step) {
        unsigned a[4];
        g_step_fragment<T, false>(g_tile, step, a);
#pragma unroll
        for (int chunk = 0; chunk < kResidentChunks; ++chunk)
            if (chunk * kTile < dim) fused_product_step<T>(a, keys, stride, chunk * kTile, step, resident[chunk]);
    }
}

// dK += G^T Q, added to grad_k (rows from key c0) chunk by chunk: the A fragments of the tile's
// k-steps are loaded once, each chunk's sum is written (times `unscale`, G's stored scale undone)
// before the next is formed.
template <typename T>
__device__ __forceinline__ void fused_dk_product(const StageWord<T>* g_tile, const StageWord<T>* q_rows, int stride,
                                                 float* grad_k, int c0, int cols, int dim, float unscale) {
    unsigned af[kGSteps<T>][4];
#pragma unroll
    for (int step = 0; step < kGSteps<T>; ++step) g_step_fragment<T, true>(g_tile, step, af[step]);
#pragma unroll 1
    for (int chunk = 0; chunk < kResidentChunks; ++chunk)
        if (chunk * kTile < dim) {
            float sum[kFusedTiles][4] = {};
#pragma unroll
            for (int step = 0; step < kGSteps<T>; ++step)
                fused_product_step<T>(af[step], q_rows, stride, chunk * kTile, step, sum);
            scale_fragments(&sum[0][0], 4 * kFusedTiles, unscale);
            write_chunk<kFusedWarpCols>(sum, grad_k, c0, cols, chunk * kTile, dim, Write::kAtomicAdd);
        }
}

}  // namespace contra
