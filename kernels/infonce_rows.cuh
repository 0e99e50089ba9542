// Pieces of the InfoNCE-family kernels shared by the CUDA-core and tensor-core engines: what a
// query row needs in the forward, MoCo's extra logit, CLIP's column fold, and the ways the
// backward writes a gradient.
#pragma once
#include "tile_dot.cuh"

namespace contra {

// The logit scale: the value passed, or exp of the learnable log-scale left on the device.
template <typename Params>
__device__ __forceinline__ float logit_scale(const Params& p) {
    return p.log_scale ? expf(*p.log_scale) : p.scale;
}

// Which optional terms of the family a kernel computes: read from p at run time (AnyLoss, the
// general engines), or fixed at compile time (FixedLoss, the instantiations per loss of the fused
// backward and the resident forward), so that the per-element code has no branch on them. The
// forward's p marks CLIP's column softmax by col_state without symmetric (a symmetric sweep's
// columns are its rows).
struct AnyLoss {
    static __device__ __forceinline__ bool symmetric(const ContraInfonceBwdParams& p) { return p.symmetric; }
    static __device__ __forceinline__ bool column_softmax(const ContraInfonceBwdParams& p) { return p.col_lse; }
    static __device__ __forceinline__ bool labels(const ContraInfonceBwdParams& p) { return p.labels; }
    static __device__ __forceinline__ bool log_scale(const ContraInfonceBwdParams& p) { return p.log_scale_partial; }
    static __device__ __forceinline__ bool symmetric(const ContraInfonceFwdParams& p) { return p.symmetric; }
    static __device__ __forceinline__ bool column_softmax(const ContraInfonceFwdParams& p) {
        return p.col_state && !p.symmetric;
    }
    static __device__ __forceinline__ bool labels(const ContraInfonceFwdParams& p) { return p.labels; }
    // The forward folds column states (CLIP's column softmax, a symmetric sweep's rows).
    static __device__ __forceinline__ bool column_states(const ContraInfonceFwdParams& p) { return p.col_state; }
};
// NT-Xent (kSymmetric), CLIP (kColumnSoftmax: the column softmax and, when asked, the
// log-scale term), SupCon (kSymmetric, kLabels), InfoNCE and MoCo (none).
template <bool kSymmetric, bool kColumnSoftmax, bool kLabels>
struct FixedLoss {
    template <typename Params>
    static __device__ __forceinline__ bool symmetric(const Params&) { return kSymmetric; }
    template <typename Params>
    static __device__ __forceinline__ bool column_softmax(const Params&) { return kColumnSoftmax; }
    template <typename Params>
    static __device__ __forceinline__ bool labels(const Params&) { return kLabels; }
    static __device__ __forceinline__ bool column_states(const ContraInfonceFwdParams&) {
        return kSymmetric || kColumnSoftmax;
    }
    static __device__ __forceinline__ bool log_scale(const ContraInfonceBwdParams& p) {
        return kColumnSoftmax && p.log_scale_partial;
    }
    // p is one of these losses.
    template <typename Params>
    static __device__ __forceinline__ bool matches(const Params& p) {
        return AnyLoss::symmetric(p) == kSymmetric && AnyLoss::column_softmax(p) == kColumnSoftmax &&
               AnyLoss::labels(p) == kLabels;
    }
};
using NtXentLoss = FixedLoss<true, false, false>;
using ClipLoss = FixedLoss<false, true, false>;
using SupConLoss = FixedLoss<true, false, true>;
using InfoNceLoss = FixedLoss<false, false, false>;

// Runs `body(Loss{})` for the fixed loss that p is (a kernel instantiated per loss of the family
// behind one entry point); traps for any other mix of inputs (the host never sends one).
template <typename Params, typename Body>
__device__ __forceinline__ void with_fixed_loss(const Params& p, Body body) {
    if (NtXentLoss::matches(p)) {
        body(NtXentLoss{});
    } else if (ClipLoss::matches(p)) {
        body(ClipLoss{});
    } else if (SupConLoss::matches(p)) {
        body(SupConLoss{});
    } else if (InfoNceLoss::matches(p)) {
        body(InfoNceLoss{});
    } else {
        __trap();
    }
}

// One query row of the forward: its positive key (or SupCon label and weight). Loss: what the
// kernel knows of the loss at compile time (AnyLoss: nothing).
struct QueryRow {
    int row;
    int positive;         // the positive key, -1 for none (MoCo, SupCon)
    int label;            // SupCon
    float target_weight;  // SupCon: 1 / |P(row)|, 0 without positives

    template <typename Loss = AnyLoss>
    __device__ __forceinline__ void load(const ContraInfonceFwdParams& p, int r) {
        row = r;
        const bool valid = r < p.rows;
        positive = (valid && p.positives) ? p.positives[r] : -1;
        label = (valid && Loss::labels(p)) ? p.labels[r] : 0;
        target_weight = (valid && Loss::labels(p)) ? p.target_weight[r] : 0.0f;
    }

    // Key `col` is outside the matrix or is the row itself under the self mask.
    __device__ __forceinline__ bool masked(const ContraInfonceFwdParams& p, int col) const {
        return col >= p.cols || (p.self_mask && col == row);
    }

    // The share of logit `u` (log2 units) of key `col` in the row's target term.
    template <typename Loss = AnyLoss>
    __device__ __forceinline__ float target_share(const ContraInfonceFwdParams& p, int col, bool masked,
                                                  float u) const {
        if (Loss::labels(p)) return (!masked && p.labels[col] == label) ? u * target_weight : 0.0f;
        return col == positive ? u : 0.0f;
    }

    // Writes lse (natural units) and the row's loss from its softmax state and target term, or,
    // where several blocks add to the row (p.row_state: a symmetric sweep, a key split), folds
    // both into the row's shared state for infonce_finish.
    __device__ __forceinline__ void finish(const ContraInfonceFwdParams& p, const OnlineLse& state, float target) const {
        if (row >= p.rows) return;
        if (p.row_state) {
            merge_lse_state(p.row_state + row, state.running_max, state.running_sum);
            atomicAdd(p.row_target + row, target);
        } else {
            write_row_loss(p, row, state.running_max, state.running_sum, target);
        }
    }

    // lse and loss of `row` from its (max, sum) in log2 units and its target term.
    __device__ __forceinline__ static void write_row_loss(const ContraInfonceFwdParams& p, int row, float max,
                                                          float sum, float target) {
        // A row with every key masked (a lone SupCon view) has an empty softmax: its loss is 0
        // and its saved lse 0 (as on the CPU), never -inf.
        const float lse2 = sum > 0.0f ? max + log2f(sum) : 0.0f;
        p.lse[row] = __fmul_rn(lse2, kLn2);
        // A SupCon anchor without positives adds 0 (it still counts in the mean).
        const bool no_target = p.labels && p.target_weight[row] == 0.0f;
        p.row_loss[row] = no_target ? 0.0f : __fmul_rn(lse2 - target, kLn2);
    }
};

// The key tiles that the block of row tile `tile` and key range `range` visits. Full sweep: all
// of them, in order, starting at tile `tile` (mod tiles) when the sweep folds column states
// (CLIP), so that the blocks do not all compare-and-swap the same columns' states at once.
// Symmetric sweep: tile, tile + 1, ..., tile + tiles / 2 (mod tiles), and one fewer for the upper
// half when `tiles` is even, so that every unordered pair of tiles is visited exactly once and
// every block does about half a row of tiles. Under a split (p.split_tiles > 0: MoCo's long
// queue, or rows too few to fill the card) the block takes range `range` (grid y) of
// p.split_tiles of those tiles; a symmetric row of tiles one shorter may leave its last range
// empty (count 0).
struct KeyTiles {
    int first, count, tiles;
    __device__ __forceinline__ KeyTiles(const ContraInfonceFwdParams& p, int tile, int range) {
        tiles = (p.cols + kTile - 1) / kTile;
        first = (p.symmetric || p.col_state) ? tile : 0;
        const int half = tiles / 2;
        count = !p.symmetric ? tiles : (tiles % 2 == 0 && tile >= half) ? half : half + 1;
        if (p.split_tiles > 0) {
            const int skipped = range * p.split_tiles;
            first += skipped;
            count = max(0, min(p.split_tiles, count - skipped));
        }
    }
    // The first key (column) of the step-th visited tile.
    __device__ __forceinline__ int column(int step) const { return ((first + step) % tiles) * kTile; }
    // Whether the tile at key c0 also gives its columns statistics (CLIP's column softmax; in a
    // symmetric sweep the key rows' own, except on the diagonal tile, c0 = r0, whose rows are
    // the block's).
    template <typename Loss = AnyLoss>
    __device__ __forceinline__ bool folds_columns(const ContraInfonceFwdParams& p, int c0, int r0) const {
        return Loss::column_states(p) && !(Loss::symmetric(p) && c0 == r0);
    }
};

// MoCo's positive logit scale * q_row . extra_key_row in log2 units, from the `lanes` adjacent
// lanes that share the row (every lane of the warp must call it; all of a group get the value).
template <int lanes, typename T>
__device__ __forceinline__ float extra_logit(const ContraInfonceFwdParams& p, const T* q, int row, int lane_in_group,
                                             float scale_log2) {
    const T* extra = static_cast<const T*>(p.extra_key);
    float dot = 0.0f;
    if (row < p.rows)
        for (int d = lane_in_group; d < p.dim; d += lanes)
            dot += load(q, (long long)row * p.dim + d) * load(extra, (long long)row * p.dim + d);
    return __fmul_rn(group_sum<lanes>(dot), scale_log2);
}

// Partial statistics of a tile's 64 columns over disjoint sets of the block's rows (log2
// units): `parts` (max, sum of 2^(u - max)) pairs and, in a symmetric sweep, target terms.
template <int parts>
struct ColumnParts {
    float max[parts][kTile];
    float sum[parts][kTile];
    float target[parts][kTile];
};

// The share of logit u between row `row` and key `col` in the target term of the key's own row
// (symmetric sweep: logit_ij = logit_ji). The CUDA-core forward calls this per element: loading
// the key once per column (KeyColumn) makes ptxas spill there.
__device__ __forceinline__ float column_target_share(const ContraInfonceFwdParams& p, int col, int row, float u) {
    if (!p.symmetric || col >= p.cols || row >= p.rows) return 0.0f;
    QueryRow key;
    key.load(p, col);
    return key.target_share(p, row, false, u);
}

// A key column of a symmetric sweep as a row of its own: the shares of its target term that come
// from the logits with the block's rows (logit_ij = logit_ji). Loaded once per column and tile;
// outside a symmetric sweep every share is 0.
template <typename Loss = AnyLoss>
struct KeyColumn {
    QueryRow key;
    bool active;
    __device__ __forceinline__ KeyColumn(const ContraInfonceFwdParams& p, int col)
        : active(Loss::symmetric(p) && col < p.cols) {
        if (active) key.template load<Loss>(p, col);
    }
    __device__ __forceinline__ float share(const ContraInfonceFwdParams& p, int row, float u) const {
        return (active && row < p.rows) ? key.template target_share<Loss>(p, row, false, u) : 0.0f;
    }
};

// Folds the partial statistics of the tile's columns into the columns' global states (CLIP: the
// column softmax; symmetric sweep: the key rows' own softmax and target). Call between barriers.
template <int parts>
__device__ __forceinline__ void fold_columns(const ContraInfonceFwdParams& p, int c0, const ColumnParts<parts>& part) {
    const int c = threadIdx.y * 16 + threadIdx.x;
    if (c >= kTile || c0 + c >= p.cols) return;
    if (p.symmetric) {
        float target = 0.0f;
        for (int k = 0; k < parts; ++k) target += part.target[k][c];
        atomicAdd(p.col_target + c0 + c, target);
    }
    float m = -INFINITY, s = 0.0f;
    for (int k = 0; k < parts; ++k) m = fmaxf(m, part.max[k][c]);
    if (m == -INFINITY) return;
    for (int k = 0; k < parts; ++k)
        if (part.max[k][c] != -INFINITY) s += part.sum[k][c] * exp2f(part.max[k][c] - m);
    merge_lse_state(p.col_state + c0 + c, m, s);
}

// How the backward writes a product into a gradient: the first tile of a pass that owns the rows
// overwrites, later tiles add, and a pass that does not own the rows adds atomically.
enum class Write { kOverwrite, kAdd, kAtomicAdd };

__device__ __forceinline__ void write_grad(float* dst, float value, Write how) {
    if (how == Write::kOverwrite) {
        *dst = value;
    } else if (how == Write::kAdd) {
        *dst += value;
    } else {
        atomicAdd(dst, value);
    }
}

// Two adjacent values (dst 8-byte aligned) written as `how` says: on sm_90 an atomic add is one
// vector atomic (float2), elsewhere two.
__device__ __forceinline__ void write_grad_pair(float* dst, float first, float second, Write how) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(CONTRA_INTERP)
    if (how == Write::kAtomicAdd) {
        atomicAdd(reinterpret_cast<float2*>(dst), make_float2(first, second));
        return;
    }
#endif
    write_grad(dst, first, how);
    write_grad(dst + 1, second, how);
}

}  // namespace contra
