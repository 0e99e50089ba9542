// A 64 x 64 block of dot products between rows of two row-major matrices, staged through shared
// memory in 16-wide slices of the feature dimension. 256 threads as 16 x 16; thread (ty, tx)
// owns rows ty + 16 i and columns tx + 16 j (i, j < 4), so a row's 64 values sit in 16 lanes of
// one warp (a half-warp) and row reductions are 16-lane shuffles.
#pragma once
#include "common.cuh"

namespace contra {

constexpr int kTile = 64;      // rows and columns of a block tile
constexpr int kSlice = 16;     // features per shared-memory slice
constexpr int kPerThread = 4;  // rows (and columns) per thread
constexpr int kTilePad = kTile + 1;  // pad so column-wise stores do not hit one bank

// Loads rows [row0, row0 + 64) x features [k0, k0 + 16) of `m` transposed into `s[kk][r]`,
// zero outside the matrix.
template <typename T>
__device__ __forceinline__ void load_slice(const T* m, int rows, int dim, int row0, int k0, float (*s)[kTilePad]) {
    const int tid = threadIdx.y * 16 + threadIdx.x;
    for (int e = tid; e < kTile * kSlice; e += 256) {
        const int r = e / kSlice, kk = e % kSlice;
        const int row = row0 + r, col = k0 + kk;
        s[kk][r] = (row < rows && col < dim) ? load(m, (long long)row * dim + col) : 0.0f;
    }
}

// acc[i][j] = a_{a0 + ty + 16 i} . b_{b0 + tx + 16 j}. With `norms`, also a_sq[i] = ||a row||^2
// and b_sq[j] = ||b row||^2. Every thread of the block must call it (it synchronizes).
template <typename T, bool norms>
__device__ void tile_dot(const T* a, int a_rows, int a0, const T* b, int b_rows, int b0, int dim,
                         float (*as)[kTilePad], float (*bs)[kTilePad], float acc[kPerThread][kPerThread],
                         float a_sq[kPerThread], float b_sq[kPerThread]) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int i = 0; i < kPerThread; ++i) {
        if (norms) a_sq[i] = b_sq[i] = 0.0f;
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0.0f;
    }
    for (int k0 = 0; k0 < dim; k0 += kSlice) {
        load_slice(a, a_rows, dim, a0, k0, as);
        load_slice(b, b_rows, dim, b0, k0, bs);
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

}  // namespace contra
