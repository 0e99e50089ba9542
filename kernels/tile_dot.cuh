// A 64 x 64 block of dot products between rows of two row-major matrices, on one of two
// engines:
//   * tile_dot (CUDA cores; f32 operands, and the similarity kernel, which also needs the row
//     norms): 256 threads as 16 x 16, thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j
//     (i, j < 4), so a row's 64 values sit in 16 lanes of one warp and row reductions are
//     16-lane shuffles; FMAs over 16-wide feature slices staged through shared memory as f32.
//   * tile_mma (tensor cores; bf16 / f16 operands, and f32 ones as tf32): each of the 8 warps
//     computes a 16 x 32 part of the tile with mma.sync m16n8k16 (m16n8k8 for tf32; f32
//     accumulators) from slices that cp.async streams into a two-stage shared-memory pipeline
//     (the next slice loads while the current one multiplies), and keeps it as mma fragments.
#pragma once
#include <stdint.h>

#include "common.cuh"
#include "tensor_core.cuh"

namespace contra {

constexpr int kTile = 64;      // rows and columns of a block tile
constexpr int kSlice = 16;     // features per shared-memory slice
constexpr int kPerThread = 4;  // rows (and columns) per thread
constexpr int kTilePad = kTile + 1;  // pad so column-wise stores do not hit one bank

// Loads rows [row0, row0 + 64) x features [k0, k0 + 16) of `m` transposed into `s[kk][r]`,
// zero outside the matrix. With a `row_scale` (shared memory, one factor per tile row), each row
// is multiplied by its factor as it is staged.
template <typename T>
__device__ __forceinline__ void load_slice(const T* m, int rows, int dim, int row0, int k0, float (*s)[kTilePad],
                                           const float* row_scale = nullptr) {
    const int tid = threadIdx.y * 16 + threadIdx.x;
    for (int e = tid; e < kTile * kSlice; e += 256) {
        const int r = e / kSlice, kk = e % kSlice;
        const int row = row0 + r, col = k0 + kk;
        float v = (row < rows && col < dim) ? load(m, (long long)row * dim + col) : 0.0f;
        if (row_scale != nullptr) v *= row_scale[r];
        s[kk][r] = v;
    }
}

template <typename T>
constexpr bool kIsHalf = std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value;
template <typename T>
constexpr bool kIsTf32 = std::is_same<T, tf32>::value;
// Operands of type T run on the tensor cores (tile_mma), not on CUDA cores (tile_dot).
template <typename T>
constexpr bool kOnTensorCores = kIsHalf<T> || kIsTf32<T>;

// A staged operand element as raw bits: 16-bit halves, or f32 words for tf32.
template <typename T>
using StageWord = typename std::conditional<kIsTf32<T>, unsigned, unsigned short>::type;
// Elements per 16-byte cp.async chunk.
template <typename T>
constexpr int kChunkElems = 16 / static_cast<int>(sizeof(StageWord<T>));
// The mma's k: 16 for bf16 / f16 (m16n8k16), 8 for tf32 (m16n8k8).
template <typename T>
constexpr int kMmaK = kIsTf32<T> ? 8 : 16;

// Features per slice of the tensor-core pipeline (the default; 16 bytes x 2 per staged row), and
// the padded row length of a staged slice: one chunk more, so the 8 rows a fragment load touches
// start in different banks.
template <typename T>
constexpr int kTcSlice = kIsTf32<T> ? 8 : 16;
template <typename T, int features>
constexpr int kStageStride = features + kChunkElems<T>;

// Copies the 16 bytes of row `row`, features [col, col + kChunkElems) of the rows x dim matrix
// `m` to shared `dst`: one cp.async when the chunk is whole and aligned, else element by element
// with zeros outside the matrix.
template <typename T>
__device__ __forceinline__ void stage_16_bytes(const T* m, int rows, int dim, int row, int col, StageWord<T>* dst) {
    constexpr int per = kChunkElems<T>;
    const StageWord<T>* bits = reinterpret_cast<const StageWord<T>*>(m);
    const long long at = (long long)row * dim + col;
    const bool whole =
        row < rows && col + per <= dim && dim % per == 0 && reinterpret_cast<uintptr_t>(bits) % 16 == 0;
    if (whole) {
        cp_async_16(dst, bits + at);
    } else {
        for (int e = 0; e < per; ++e) dst[e] = (row < rows && col + e < dim) ? bits[at + e] : 0;
    }
}

// Stages 16-byte chunk `chunk` (row chunk / (features / kChunkElems), then the chunk's features)
// of rows [row0, row0 + 64) x features [k0, k0 + features) of `m` into `s`.
template <int features, typename T>
__device__ __forceinline__ void stage_chunk(const T* m, int rows, int dim, int row0, int k0, int chunk,
                                            StageWord<T> (*s)[kStageStride<T, features>]) {
    constexpr int per = kChunkElems<T>, chunks_per_row = features / per;
    const int r = chunk / chunks_per_row, c = per * (chunk % chunks_per_row);
    stage_16_bytes(m, rows, dim, row0 + r, k0 + c, &s[r][c]);
}

// Two consecutive 16-bit elements as one fragment register (the lower index in the low half).
__device__ __forceinline__ unsigned pair_at(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }
// One staged f32 element as a tf32 fragment register.
__device__ __forceinline__ unsigned tf32_at(const unsigned* p) { return to_tf32(__uint_as_float(*p)); }

// One k-step of a warp's 16 x 32 part of the tile from the staged slices `as` / `bs` at feature
// kk (tensor_core.cuh gives the fragment layouts).
template <typename T, int stride>
__device__ __forceinline__ void mma_step(const StageWord<T> (*as)[stride], const StageWord<T> (*bs)[stride], int m0,
                                         int n0, int kk, float d[4][4]) {
    const int lane = (threadIdx.y * 16 + threadIdx.x) % 32, g = lane / 4, t = lane % 4;
    if constexpr (kIsTf32<T>) {
        const unsigned af[4] = {tf32_at(&as[m0 + g][kk + t]), tf32_at(&as[m0 + g + 8][kk + t]),
                                tf32_at(&as[m0 + g][kk + t + 4]), tf32_at(&as[m0 + g + 8][kk + t + 4])};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int n = n0 + 8 * nt + g;  // b row n is column n of the product
            const unsigned bf[2] = {tf32_at(&bs[n][kk + t]), tf32_at(&bs[n][kk + t + 4])};
            mma_1688_tf32(d[nt], af, bf);
        }
    } else {
        const unsigned af[4] = {pair_at(&as[m0 + g][kk + 2 * t]), pair_at(&as[m0 + g + 8][kk + 2 * t]),
                                pair_at(&as[m0 + g][kk + 2 * t + 8]), pair_at(&as[m0 + g + 8][kk + 2 * t + 8])};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int n = n0 + 8 * nt + g;
            const unsigned bf[2] = {pair_at(&bs[n][kk + 2 * t]), pair_at(&bs[n][kk + 2 * t + 8])};
            mma_16816<T>(d[nt], af, bf);
        }
    }
}

// The warp-level part of the tensor-core engine (T: bf16, f16 or tf32): warp w computes rows
// m0 = 16 (w % 4) .. +16 and columns n0 = 32 (w / 4) .. +32 of the 64 x 64 tile of dot products
// a_{a0 + r} . b_{b0 + c}, and returns them in the mma D-fragment layout: d[nt] holds columns
// n0 + 8 nt .. +8 (tensor_core.cuh). The operands stream through two shared-memory stages of
// `features` features each (wider: fewer barriers per tile, more shared memory:
// 2 x 2 x 64 x (features + kChunkElems) x sizeof(StageWord) bytes). Every thread of the block
// must call it (it synchronizes).
template <int features, typename T>
__device__ void tile_mma(const T* a, int a_rows, int a0, const T* b, int b_rows, int b0, int dim, float d[4][4]) {
    static_assert(features % kMmaK<T> == 0 && features % kChunkElems<T> == 0, "a slice is whole mma k-steps");
    constexpr int stride = kStageStride<T, features>;
    constexpr int chunks = kTile * features / kChunkElems<T>;  // 16-byte chunks per operand and slice
    __shared__ __align__(16) StageWord<T> a_stage[2][kTile][stride];
    __shared__ __align__(16) StageWord<T> b_stage[2][kTile][stride];
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32;
    const int m0 = 16 * (warp % 4), n0 = 32 * (warp / 4);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[nt][e] = 0.0f;
    auto stage = [&](int slice) {
        const int k0 = slice * features, buffer = slice % 2;
        for (int c = tid; c < 2 * chunks; c += 256) {
            if (c < chunks)
                stage_chunk<features>(a, a_rows, dim, a0, k0, c, a_stage[buffer]);
            else
                stage_chunk<features>(b, b_rows, dim, b0, k0, c - chunks, b_stage[buffer]);
        }
        cp_async_commit();
    };
    const int slices = (dim + features - 1) / features;
    stage(0);
    for (int slice = 0; slice < slices; ++slice) {
        if (slice + 1 < slices) {
            stage(slice + 1);    // into the other buffer, freed by the last iteration's barrier
            cp_async_wait<1>();  // this slice's group has landed; the next one may be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < features; kk += kMmaK<T>)
            mma_step<T, stride>(a_stage[slice % 2], b_stage[slice % 2], m0, n0, kk, d);
        __syncthreads();  // this buffer is refilled two slices on
    }
}

// Writes a warp's tile_mma fragments to their places in the 64 x 65 f32 shared tile.
__device__ __forceinline__ void store_fragments(const float d[4][4], float (*tile)[kTilePad]) {
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int m0 = 16 * (warp % 4), n0 = 32 * (warp / 4);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
        const int col = n0 + 8 * nt + 2 * t;
        tile[m0 + g][col] = d[nt][0];
        tile[m0 + g][col + 1] = d[nt][1];
        tile[m0 + g + 8][col] = d[nt][2];
        tile[m0 + g + 8][col + 1] = d[nt][3];
    }
}

// acc[i][j] = a_{a0 + ty + 16 i} . b_{b0 + tx + 16 j} on CUDA cores. With `norms`, also
// a_sq[i] = ||a row||^2 and b_sq[j] = ||b row||^2. With a_scale and b_scale (shared memory, one
// factor per row of the tile, written before a barrier that precedes the call), every row is
// first multiplied by its factor: the similarity kernel's overflow path. Every thread of the block
// must call it (it synchronizes).
template <typename T, bool norms>
__device__ void tile_dot(const T* a, int a_rows, int a0, const T* b, int b_rows, int b0, int dim,
                         float acc[kPerThread][kPerThread], float a_sq[kPerThread], float b_sq[kPerThread],
                         const float* a_scale = nullptr, const float* b_scale = nullptr) {
    __shared__ float as[kSlice][kTilePad];
    __shared__ float bs[kSlice][kTilePad];
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int i = 0; i < kPerThread; ++i) {
        if (norms) a_sq[i] = b_sq[i] = 0.0f;
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0.0f;
    }
    for (int k0 = 0; k0 < dim; k0 += kSlice) {
        load_slice(a, a_rows, dim, a0, k0, as, a_scale);
        load_slice(b, b_rows, dim, b0, k0, bs, b_scale);
        __syncthreads();
        for (int kk = 0; kk < kSlice; ++kk) {
            float av[kPerThread], bv[kPerThread];
            for (int i = 0; i < kPerThread; ++i) {
                av[i] = as[kk][ty + 16 * i];
                bv[i] = bs[kk][tx + 16 * i];
                if (norms) {
                    a_sq[i] += av[i] * av[i];
                    b_sq[i] += bv[i] * bv[i];
                }
            }
            for (int i = 0; i < kPerThread; ++i)
                for (int j = 0; j < kPerThread; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();  // the next slice overwrites as / bs
    }
}

// The 64 x 64 tile of dot products a_{a0 + r} . b_{b0 + c} written to the shared tile `tile`
// (row r, column c), on the operand type's engine: tile_mma for bf16 / f16 / tf32, tile_dot for
// f32.
// Every thread of the block must call it; the caller synchronizes before reading the tile.
template <typename T>
__device__ __forceinline__ void dot_tile_to_shared(const T* a, int a_rows, int a0, const T* b, int b_rows, int b0,
                                                   int dim, float (*tile)[kTilePad]) {
    if constexpr (kOnTensorCores<T>) {
        float d[4][4];
        tile_mma<kTcSlice<T>>(a, a_rows, a0, b, b_rows, b0, dim, d);
        store_fragments(d, tile);
    } else {
        const int tx = threadIdx.x, ty = threadIdx.y;
        float acc[kPerThread][kPerThread], unused_a[kPerThread], unused_b[kPerThread];
        tile_dot<T, false>(a, a_rows, a0, b, b_rows, b0, dim, acc, unused_a, unused_b);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i)
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) tile[ty + 16 * i][tx + 16 * j] = acc[i][j];
    }
}

}  // namespace contra
