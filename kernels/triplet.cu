// Triplet mining over the N x N matrix of pair quantities (squared distances or cosine
// similarities, from similarity_fwd), and the backward that chains the mined pair coefficients to
// the rows.
//
// triplet_mine runs one block per anchor a. Each thread owns the columns j = tid, tid + 256, ...
// of the anchor's row:
//   - a positive j (same label, j != a) walks every negative of the row once: it counts its hard /
//     semi-hard / easy triplets, and per mining its active terms (batch-all), or its chosen
//     negative (semi-hard: the nearest one beyond d_ap, else the farthest).
//   - batch-all needs, for each negative j, how many positives make (p, j) active: a second pass in
//     which negative columns walk the positives. No atomics, so the counts are exact and the
//     result deterministic.
//   - semi-hard adds -1 to its chosen negative with an integer atomic (exact, order-free).
//   - batch-hard reduces the hardest positive and the hardest negative over the block.
// The per-pair counts live as ints in the anchor's coef row until a last pass turns each into
// count * d dist / d raw. Time per anchor is O(P * N) for P positives (O(N^3) at worst over the
// batch), memory O(N^2) in all: never N^3.
//
// Ties pick the lowest column, as the CPU reference does: comparisons are strict while the columns
// are walked in increasing order, and the block reductions prefer the lower index.
#include "common.cuh"

namespace contra {

constexpr int kMineThreads = 256;

__device__ __forceinline__ float triplet_dist(float raw, int distance, float eps) {
    switch (distance) {
        case CONTRA_TRIPLET_EUCLIDEAN:
            return sqrtf(fmaxf(raw, eps));
        case CONTRA_TRIPLET_SQUARED_EUCLIDEAN:
            return raw;
        default:
            return 1.0f - raw;
    }
}

// d dist / d raw; 0 where the euclidean clamp holds the distance constant.
__device__ __forceinline__ float triplet_dist_grad(float raw, int distance, float eps) {
    switch (distance) {
        case CONTRA_TRIPLET_EUCLIDEAN:
            return raw >= eps ? 0.5f / sqrtf(raw) : 0.0f;
        case CONTRA_TRIPLET_SQUARED_EUCLIDEAN:
            return 1.0f;
        default:
            return -1.0f;
    }
}

// The relu argument of triplet (a, p, n); the same expression decides activity in every pass.
__device__ __forceinline__ float triplet_term(float dp, float dn, float margin) { return dp - dn + margin; }

// Sum over the block (deterministic tree order); every thread gets the result.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T partial[kMineThreads];
    partial[threadIdx.x] = v;
    __syncthreads();
    for (int stride = kMineThreads / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    const T total = partial[0];
    __syncthreads();
    return total;
}

// The block's best (value, index): the largest value when `largest`, else the smallest; equal
// values prefer the lower index; index -1 marks "none". Every thread gets the result.
__device__ __forceinline__ void block_best(float& value, int& index, bool largest) {
    __shared__ float values[kMineThreads];
    __shared__ int indices[kMineThreads];
    values[threadIdx.x] = value;
    indices[threadIdx.x] = index;
    __syncthreads();
    for (int stride = kMineThreads / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) {
            const float v = values[threadIdx.x + stride];
            const int i = indices[threadIdx.x + stride];
            const float mine = values[threadIdx.x];
            const int mine_i = indices[threadIdx.x];
            const bool better = largest ? v > mine : v < mine;
            if (i >= 0 && (mine_i < 0 || better || (v == mine && i < mine_i))) {
                values[threadIdx.x] = v;
                indices[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
    value = values[0];
    index = indices[0];
    __syncthreads();
}

__device__ void triplet_mine(const ContraTripletMineParams& p) {
    const int n = p.rows;
    const int a = blockIdx.x;
    const float* raw = p.raw + (long long)a * n;
    float* coef = p.coef + (long long)a * n;
    int* count = reinterpret_cast<int*>(coef);  // per-pair counts until the last pass
    const int ya = p.labels[a];
    const float m = p.margin;
    const int* labels = p.labels;
    const int distance = p.distance;
    const float eps = p.eps;
#define dist(j) triplet_dist(raw[j], distance, eps)
#define is_positive(j) ((j) != a && labels[j] == ya)
#define is_negative(j) (labels[j] != ya)

    bool mine_pos = false, mine_neg = false;
    for (int j = threadIdx.x; j < n; j += kMineThreads) {
        count[j] = 0;
        mine_pos |= is_positive(j);
        mine_neg |= is_negative(j);
    }
    const bool has_pos = __syncthreads_or(mine_pos);
    const bool has_neg = __syncthreads_or(mine_neg);

    float sum = 0.0f;
    unsigned int terms = 0, hard = 0, semi = 0, easy = 0;
    if (has_pos && has_neg) {
        // Positive columns: stats, batch-all terms and the semi-hard choice.
        for (int j = threadIdx.x; j < n; j += kMineThreads) {
            if (!is_positive(j)) continue;
            const float dp = dist(j);
            unsigned int active = 0;
            float nearest_beyond = INFINITY, farthest = -INFINITY;
            int nearest_k = -1, farthest_k = -1;
            for (int k = 0; k < n; ++k) {
                if (!is_negative(k)) continue;
                const float dn = dist(k);
                if (dn < dp) {
                    ++hard;
                } else if (dn < dp + m) {
                    ++semi;
                } else {
                    ++easy;
                }
                if (p.mining == CONTRA_TRIPLET_BATCH_ALL) {
                    const float t = triplet_term(dp, dn, m);
                    if (t > 0.0f) {
                        ++active;
                        sum += t;
                    }
                } else if (p.mining == CONTRA_TRIPLET_SEMI_HARD) {
                    if (dn > dp && dn < nearest_beyond) {
                        nearest_beyond = dn;
                        nearest_k = k;
                    }
                    if (dn > farthest) {
                        farthest = dn;
                        farthest_k = k;
                    }
                }
            }
            if (p.mining == CONTRA_TRIPLET_BATCH_ALL) {
                terms += active;
                count[j] = (int)active;
            } else if (p.mining == CONTRA_TRIPLET_SEMI_HARD) {
                const int chosen = nearest_k >= 0 ? nearest_k : farthest_k;
                const float t = triplet_term(dp, nearest_k >= 0 ? nearest_beyond : farthest, m);
                ++terms;
                if (t > 0.0f) {
                    sum += t;
                    count[j] = 1;
                    atomicAdd(&count[chosen], -1);
                }
            }
        }
        if (p.mining == CONTRA_TRIPLET_BATCH_ALL) {
            // Negative columns: minus the number of positives whose term with them is active.
            for (int j = threadIdx.x; j < n; j += kMineThreads) {
                if (!is_negative(j)) continue;
                const float dn = dist(j);
                int active = 0;
                for (int k = 0; k < n; ++k) {
                    if (is_positive(k) && triplet_term(dist(k), dn, m) > 0.0f) ++active;
                }
                count[j] = -active;
            }
        } else if (p.mining == CONTRA_TRIPLET_BATCH_HARD) {
            float dp = -INFINITY, dn = INFINITY;
            int hardest_p = -1, hardest_n = -1;
            for (int j = threadIdx.x; j < n; j += kMineThreads) {
                const float d = dist(j);
                if (is_positive(j) && d > dp) {
                    dp = d;
                    hardest_p = j;
                }
                if (is_negative(j) && d < dn) {
                    dn = d;
                    hardest_n = j;
                }
            }
            block_best(dp, hardest_p, true);
            block_best(dn, hardest_n, false);
            if (threadIdx.x == 0) {
                terms = 1;
                const float t = triplet_term(dp, dn, m);
                if (t > 0.0f) {
                    sum = t;
                    count[hardest_p] = 1;
                    count[hardest_n] = -1;
                }
            }
        }
    }
    sum = block_sum(sum);
    terms = block_sum(terms);
    hard = block_sum(hard);
    semi = block_sum(semi);
    easy = block_sum(easy);  // the barriers inside also order every count write before the pass below
    for (int j = threadIdx.x; j < n; j += kMineThreads) {
        const int c = count[j];
        coef[j] = c == 0 ? 0.0f : (float)c * triplet_dist_grad(raw[j], distance, eps);
    }
#undef dist
#undef is_positive
#undef is_negative
    if (threadIdx.x == 0) {
        p.anchor_sum[a] = sum;
        p.anchor_count[a] = terms;
        p.anchor_stats[3 * a] = hard;
        p.anchor_stats[3 * a + 1] = semi;
        p.anchor_stats[3 * a + 2] = easy;
    }
}

constexpr int kBwdRows = 4;       // rows r per block
constexpr int kBwdThreads = 128;  // one feature column per thread; grid.y covers dim

// One block: rows r0..r0+4 x features d0..d0+128. The coefficients S_ro = coef_ro + coef_or of
// its rows are staged through shared memory 128 columns o at a time.
template <typename T>
__device__ void triplet_bwd(const ContraTripletBwdParams& p) {
    __shared__ float s_tile[kBwdRows][kBwdThreads];
    const int n = p.rows;
    const int r0 = blockIdx.x * kBwdRows;
    const int d = blockIdx.y * kBwdThreads + threadIdx.x;
    const T* y = static_cast<const T*>(p.y);
    float row_sum[kBwdRows], acc[kBwdRows];
    for (int i = 0; i < kBwdRows; ++i) row_sum[i] = acc[i] = 0.0f;
    for (int o0 = 0; o0 < n; o0 += kBwdThreads) {
        const int o = o0 + threadIdx.x;
        for (int i = 0; i < kBwdRows; ++i) {
            const int r = r0 + i;
            s_tile[i][threadIdx.x] =
                (r < n && o < n) ? p.coef[(long long)r * n + o] + p.coef[(long long)o * n + r] : 0.0f;
        }
        __syncthreads();
        const int span = min(kBwdThreads, n - o0);
        for (int k = 0; k < span; ++k) {
            const float y_od = d < p.dim ? load(y, (long long)(o0 + k) * p.dim + d) : 0.0f;
            for (int i = 0; i < kBwdRows; ++i) {
                const float s = s_tile[i][k];
                row_sum[i] += s;
                acc[i] += s * y_od;
            }
        }
        __syncthreads();
    }
    if (d >= p.dim) return;
    for (int i = 0; i < kBwdRows; ++i) {
        const int r = r0 + i;
        if (r >= n) break;
        const long long at = (long long)r * p.dim + d;
        const float g = p.cosine ? acc[i] : 2.0f * (row_sum[i] * load(y, at) - acc[i]);
        store(static_cast<T*>(p.out), at, p.grad_scale * g);
    }
}

}  // namespace contra

// (256, 4): without a blocks-per-SM hint ptxas held the mining loop to 32 registers and spilled.
extern "C" __global__ void __launch_bounds__(256, 4) triplet_mine_f32(const ContraTripletMineParams p) { contra::triplet_mine(p); }
extern "C" __global__ void __launch_bounds__(128) triplet_bwd_f32(const ContraTripletBwdParams p) { contra::triplet_bwd<float>(p); }
INTERP_EXPORT(triplet_mine_f32, ContraTripletMineParams)
INTERP_EXPORT(triplet_bwd_f32, ContraTripletBwdParams)
