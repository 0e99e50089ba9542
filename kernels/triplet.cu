// Triplet mining over the N x N matrix of pair quantities (squared distances or cosine
// similarities, from similarity_fwd), and the backward that chains the mined pair coefficients to
// the rows.
//
// triplet_mine runs one block per anchor a. Each thread owns the columns j = tid, tid + 256, ...
// of the anchor's row:
//   - a positive j (same label, j != a) walks every negative of the row once: it counts its hard /
//     semi-hard / easy triplets, and per mining its active terms (batch-all, semi-hard-all), or its chosen
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
// Rows whose norm passes 2^40 are mined scaled by 2^-k (exact; the squared distances stay far
// inside f32): triplet_row_norms finds the largest norm, triplet_scale_rows writes the scaled rows,
// and every later kernel reads k from the call's summary, so no value crosses to the host.
// triplet_finish reduces the anchors' sums and counts into the loss and the summary's counts.
//
// Ties pick the lowest column, as the CPU reference does: comparisons are strict while the columns
// are walked in increasing order, and the block reductions prefer the lower index.
#include "common.cuh"
#include "loss_words.cuh"

namespace contra {

constexpr int kMineThreads = 256;
constexpr int kRowNormExp = 40;               // rows from 2^40 in norm are mined scaled
constexpr float kFloatMinNormal = 1.17549435e-38f;

// The row scale exponent k of a call (ContraTripletSummary): 0 while the largest row norm is
// below 2^40, else frexp's exponent of that norm minus 40.
__device__ __forceinline__ int triplet_row_exp(const unsigned long long* summary) {
    const double norm = sqrt(__longlong_as_double((long long)summary[CONTRA_SUMMARY_MAX_SQ_NORM]));
    if (!(norm >= 1099511627776.0 && norm <= 1.7976931348623157e308)) return 0;
    int e;
    frexp(norm, &e);
    return e - kRowNormExp;
}

// 2 for the squared euclidean distance (it scales with the rows squared), else 1.
__device__ __forceinline__ int triplet_power(int distance) {
    return distance == CONTRA_TRIPLET_SQUARED_EUCLIDEAN ? 2 : 1;
}

// One warp per row: the squared norm in double, the largest raised into the summary (the bits
// of nonnegative doubles order as the values do).
__device__ void triplet_row_norms(const ContraTripletScaleParams& p) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    double largest = 0.0;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < p.rows; r += warps) {
        double sum = 0.0;
        for (int d = lane; d < p.dim; d += 32) {
            const double v = p.x[r * p.dim + d];
            sum += v * v;
        }
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        largest = fmax(largest, sum);
    }
    if (lane == 0 && largest > 0.0)
        atomicMax(p.summary + CONTRA_SUMMARY_MAX_SQ_NORM, (unsigned long long)__double_as_longlong(largest));
}

__device__ void triplet_scale_rows(const ContraTripletScaleParams& p) {
    // 2^-k is a normal float for any f32 row (k <= 128 + 16 - 40): the product is exact.
    const float scale = ldexpf(1.0f, -triplet_row_exp(p.summary));
    const long long len = (long long)p.rows * p.dim;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (long long)gridDim.x * blockDim.x)
        p.out[i] = p.x[i] * scale;
}

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
    const int* labels = p.labels;
    const int distance = p.distance;
    // The margin and the clamp in the scaled rows' units, kept at least f32's smallest normal (a
    // margin that underflows still keeps ties out of the hard triplets).
    const int row_exp = triplet_row_exp(p.summary);
    const float m = row_exp == 0 || !(p.margin > 0.0)
                        ? (float)p.margin
                        : fmaxf((float)ldexp(p.margin, -row_exp * triplet_power(distance)), kFloatMinNormal);
    const float eps = fmaxf((float)ldexp(p.eps, -2 * row_exp), kFloatMinNormal);
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

    // batch-all and semi-hard-all take every eligible triplet (semi-hard-all: d_an > d_ap).
    const bool every_triplet = p.mining == CONTRA_TRIPLET_BATCH_ALL || p.mining == CONTRA_TRIPLET_SEMI_HARD_ALL;
    const bool beyond_only = p.mining == CONTRA_TRIPLET_SEMI_HARD_ALL;
    float sum = 0.0f;
    // mined: the anchor's mined terms; terms: those of them that are positive.
    unsigned int mined = 0, terms = 0, hard = 0, semi = 0, easy = 0;
    if (has_pos && has_neg) {
        // Positive columns: stats, the every-triplet terms and the semi-hard choice.
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
                if (every_triplet) {
                    const float t = triplet_term(dp, dn, m);
                    if (!beyond_only || dn > dp) {
                        mined += !beyond_only || t >= 0.0f;
                        if (t > 0.0f) {
                            ++active;
                            sum += t;
                        }
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
            if (every_triplet) {
                terms += active;
                count[j] = (int)active;
            } else if (p.mining == CONTRA_TRIPLET_SEMI_HARD) {
                const int chosen = nearest_k >= 0 ? nearest_k : farthest_k;
                const float t = triplet_term(dp, nearest_k >= 0 ? nearest_beyond : farthest, m);
                ++mined;
                if (t > 0.0f) {
                    ++terms;
                    sum += t;
                    count[j] = 1;
                    atomicAdd(&count[chosen], -1);
                }
            }
        }
        if (every_triplet) {
            // Negative columns: minus the number of positives whose term with them is active.
            for (int j = threadIdx.x; j < n; j += kMineThreads) {
                if (!is_negative(j)) continue;
                const float dn = dist(j);
                int active = 0;
                for (int k = 0; k < n; ++k) {
                    if (!is_positive(k)) continue;
                    const float dp = dist(k);
                    if ((!beyond_only || dn > dp) && triplet_term(dp, dn, m) > 0.0f) ++active;
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
                mined = 1;
                const float t = triplet_term(dp, dn, m);
                if (t > 0.0f) {
                    terms = 1;
                    sum = t;
                    count[hardest_p] = 1;
                    count[hardest_n] = -1;
                }
            }
        }
    }
    sum = block_sum(sum);
    mined = block_sum(mined);
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
        p.anchor_count[2 * a] = mined;
        p.anchor_count[2 * a + 1] = terms;
        p.anchor_stats[3 * a] = hard;
        p.anchor_stats[3 * a + 1] = semi;
        p.anchor_stats[3 * a + 2] = easy;
    }
}

constexpr int kFinishThreads = 256;

// Sums in double and counts in u64 over the anchors, in a fixed order (deterministic).
__device__ void triplet_finish(const ContraTripletFinishParams& p) {
    __shared__ double s_sum[kFinishThreads];
    __shared__ unsigned long long s_counts[4][kFinishThreads];
    double sum = 0.0;
    unsigned long long counts[4] = {0, 0, 0, 0};
    for (int a = threadIdx.x; a < p.rows; a += kFinishThreads) {
        sum += (double)p.anchor_sum[a];
        counts[0] += p.anchor_count[2LL * a + (p.nonzero_only ? 1 : 0)];
        for (int i = 0; i < 3; ++i) counts[1 + i] += p.anchor_stats[3LL * a + i];
    }
    s_sum[threadIdx.x] = sum;
    for (int i = 0; i < 4; ++i) s_counts[i][threadIdx.x] = counts[i];
    __syncthreads();
    for (int width = kFinishThreads / 2; width > 0; width /= 2) {
        if ((int)threadIdx.x < width) {
            s_sum[threadIdx.x] += s_sum[threadIdx.x + width];
            for (int i = 0; i < 4; ++i) s_counts[i][threadIdx.x] += s_counts[i][threadIdx.x + width];
        }
        __syncthreads();
    }
    const unsigned long long count = s_counts[0][0];
    // loss = loss' 2^(k p): the scaled problem's mean in the rows' own units.
    const double loss = count == 0 ? 0.0 : ldexp(s_sum[0] / (double)count, triplet_row_exp(p.summary) * p.power);
    write_loss_words(p.out, p.status, p.slots, loss);
    if (threadIdx.x == 0) {
        p.summary[CONTRA_SUMMARY_COUNT] = count;
        p.summary[CONTRA_SUMMARY_HARD] = s_counts[1][0];
        p.summary[CONTRA_SUMMARY_SEMI_HARD] = s_counts[2][0];
        p.summary[CONTRA_SUMMARY_EASY] = s_counts[3][0];
    }
}

constexpr int kBwdRows = 4;       // rows r per block
constexpr int kBwdThreads = 128;  // one feature column per thread; grid.y covers dim

// One block: rows r0..r0+4 x features d0..d0+128. The coefficients S_ro = coef_ro + coef_or of
// its rows are staged through shared memory 128 columns o at a time.
__device__ void triplet_bwd(const ContraTripletBwdParams& p) {
    __shared__ float s_tile[kBwdRows][kBwdThreads];
    const int n = p.rows;
    const int r0 = blockIdx.x * kBwdRows;
    const int d = blockIdx.y * kBwdThreads + threadIdx.x;
    // The rows in the units the coefficients were mined in (exact: a power of two), and the
    // factor that brings the gradient back to the rows' own units: L(x) = L'(x 2^-k) 2^(kp).
    const int k = p.summary != nullptr ? triplet_row_exp(p.summary) : p.k;
    const float row_scale = ldexpf(1.0f, -k);
    double g = ldexp(p.grad_loss, k * (p.power - 1));
    if (p.summary != nullptr) {
        const unsigned long long count = p.summary[CONTRA_SUMMARY_COUNT];
        g = count == 0 ? 0.0 : g * (1.0 / (double)count);
    }
    const float grad_scale = (float)g;
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
        for (int j = 0; j < span; ++j) {
            const float y_od = d < p.dim ? p.x[(long long)(o0 + j) * p.dim + d] * row_scale : 0.0f;
            for (int i = 0; i < kBwdRows; ++i) {
                const float s = s_tile[i][j];
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
        const float gr = p.cosine ? acc[i] : 2.0f * (row_sum[i] * (p.x[at] * row_scale) - acc[i]);
        p.out[at] = grad_scale * gr;
    }
}

}  // namespace contra

// (256, 4): without a blocks-per-SM hint ptxas held the mining loop to 32 registers and spilled.
extern "C" __global__ void __launch_bounds__(256, 4) triplet_mine_f32(const ContraTripletMineParams p) { contra::triplet_mine(p); }
extern "C" __global__ void __launch_bounds__(128) triplet_bwd_f32(const ContraTripletBwdParams p) { contra::triplet_bwd(p); }
extern "C" __global__ void __launch_bounds__(256) triplet_row_norms(const ContraTripletScaleParams p) { contra::triplet_row_norms(p); }
extern "C" __global__ void __launch_bounds__(256) triplet_scale_rows(const ContraTripletScaleParams p) { contra::triplet_scale_rows(p); }
extern "C" __global__ void __launch_bounds__(contra::kFinishThreads) triplet_finish(const ContraTripletFinishParams p) { contra::triplet_finish(p); }
INTERP_EXPORT(triplet_mine_f32, ContraTripletMineParams)
INTERP_EXPORT(triplet_bwd_f32, ContraTripletBwdParams)
INTERP_EXPORT(triplet_row_norms, ContraTripletScaleParams)
INTERP_EXPORT(triplet_scale_rows, ContraTripletScaleParams)
INTERP_EXPORT(triplet_finish, ContraTripletFinishParams)
