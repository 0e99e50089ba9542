// The fused InfoNCE family (infonce, ntxent, clip, moco, supcon): logits_ij = scale * q_i . k_j,
// never materialized.
//
// Units: the kernels work with u_ij = logit_ij * log2(e), computed as acc * (scale * log2(e))
// and rounded once (__fmul_rn) identically in every pass, so each exponential is a single exp2
// with the temperature folded into the one multiply. lse is saved in natural units (the state
// the API exposes); the backward turns it back with one rounded multiply.
//
// Forward: one block per 64 query rows walks the key tiles, keeping a running max and sum of
// exponentials per row (OnlineLse); it writes only lse (N floats) and the per-row loss. When q
// and k are the same rows (NT-Xent, SupCon) the logits are symmetric and each pair of tiles is
// computed once, folded into the statistics of both its rows and its columns: half the work,
// then infonce_finish. f32
// operands run on CUDA cores (below); bf16 / f16 run on the tensor cores with the statistics
// taken straight from the mma fragments (infonce_tc.cuh).
//
// Backward: each block owns 64 rows of one side and recomputes its score tiles from lse, in
// GEMM-equivalents of N M D multiply-adds (the forward is 1):
//   * general (InfoNCE, CLIP): one query-owner pass recomputes S (1), adds G K to its own dQ rows
//     (1) and G^T Q to dK with atomic adds (1): 3, so 4 in all;
//   * symmetric (NT-Xent, SupCon, where q = k = z): dz = (G + G^T) z, with G_ij and G_ji taken
//     from the one recomputed logit: 2, so 3 in all, and no atomics;
//   * MoCo: the keys get no gradient: 2, so 3 in all.
// with G_ij = grad_scale * scale * (softmax_ij - target_ij).
#include "grad_product.cuh"
#include "infonce_grad.cuh"

// The logit is rounded once (__fmul_rn) and identically in both passes: left to itself, nvcc
// fuses `acc * scale - lse` into one FMA in the backward only, and a row whose softmax is a
// single key then gets 2^tiny - 1 != 0 instead of an exactly zero gradient.

namespace contra {

// Forward on CUDA cores: thread (ty, tx) holds rows ty + 16 i and columns tx + 16 j of a tile.
// kSplit: MoCo's key-split instantiation, which folds no column statistics (every forward takes
// the key range y of block (x, y) under a split; see params.h).
template <typename T, bool kSplit>
__device__ void infonce_fwd_cuda_cores(const ContraInfonceFwdParams& p) {
    __shared__ ColumnParts<16> columns;  // CLIP / symmetric sweep: per-ty partials
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r0 = blockIdx.x * kTile;
    const KeyTiles tiles(p, blockIdx.x, blockIdx.y);
    if (tiles.count == 0) return;  // a split symmetric row's empty last range
    const float scale_log2 = logit_scale(p) * kLog2e;
    const T* q = static_cast<const T*>(p.q);
    QueryRow query[kPerThread];
    OnlineLse state[kPerThread];
    float target[kPerThread];  // this thread's share of the row's target logit (log2 units)
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        query[i].load(p, r0 + ty + 16 * i);
        state[i].init();
        target[i] = 0.0f;
        if (p.extra_key && blockIdx.y == 0) {  // a key split adds it once
            const float u = extra_logit<16>(p, q, query[i].row, tx, scale_log2);
            state[i].merge(u, 1.0f);
            if (tx == 0) target[i] = u;  // summed over the 16 lanes of the row at the end
        }
    }
    float acc[kPerThread][kPerThread], unused_a[kPerThread], unused_b[kPerThread];
    for (int step = 0; step < tiles.count; ++step) {
        const int c0 = tiles.column(step);
        tile_dot<T, false>(q, p.rows, r0, static_cast<const T*>(p.k), p.cols, c0, p.dim, acc, unused_a,
                           unused_b);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            float u[kPerThread], local_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int col = c0 + tx + 16 * j;
                const bool masked = query[i].masked(p, col);
                u[j] = masked ? -INFINITY : __fmul_rn(acc[i][j], scale_log2);
                target[i] += query[i].target_share(p, col, masked, u[j]);
                local_max = fmaxf(local_max, u[j]);
            }
            // The 16 lanes holding row i agree on its tile max and sum (all lanes shuffle).
            const float tile_max = group_max<16>(local_max);
            float local_sum = 0.0f;
            if (tile_max != -INFINITY)
#pragma unroll
                for (int j = 0; j < kPerThread; ++j) local_sum += exp2f(u[j] - tile_max);
            state[i].merge(tile_max, group_sum<16>(local_sum));
        }
        if (!kSplit && tiles.folds_columns(p, c0, r0)) {
            // Column statistics from the same logits: this thread's 4 rows per column, then the
            // 16 ty's through shared memory.
#pragma unroll
            for (int j = 0; j < kPerThread; ++j) {
                const int c = tx + 16 * j;
                float u[kPerThread], local_max = -INFINITY, local_sum = 0.0f, local_target = 0.0f;
#pragma unroll
                for (int i = 0; i < kPerThread; ++i) {
                    u[i] = query[i].row < p.rows ? __fmul_rn(acc[i][j], scale_log2) : -INFINITY;
                    local_target += column_target_share(p, c0 + c, query[i].row, u[i]);
                    local_max = fmaxf(local_max, u[i]);
                }
                if (local_max != -INFINITY)
#pragma unroll
                    for (int i = 0; i < kPerThread; ++i) local_sum += exp2f(u[i] - local_max);
                columns.max[ty][c] = local_max;
                columns.sum[ty][c] = local_sum;
                columns.target[ty][c] = local_target;
            }
            __syncthreads();
            fold_columns(p, c0, columns);
            __syncthreads();
        }
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const float row_target = group_sum<16>(target[i]);
        if (tx == 0) query[i].finish(p, state[i], row_target);
    }
}

template <typename T, bool kSplit, bool kResident>
__device__ void infonce_fwd_engine(const ContraInfonceFwdParams& p) {
    if constexpr (kOnTensorCores<T>) {
        infonce_fwd_tensor_cores<T, kSplit, kResident>(p);
    } else {
        infonce_fwd_cuda_cores<T, kSplit>(p);
    }
}

template <typename T>
__device__ void infonce_fwd(const ContraInfonceFwdParams& p) {
    infonce_fwd_engine<T, false, false>(p);
}

// The key-split forward: its own instantiation, as the split's few extra registers make the
// plain forward spill at its 80-register bound.
template <typename T>
__device__ void infonce_fwd_split(const ContraInfonceFwdParams& p) {
    infonce_fwd_engine<T, true, false>(p);
}

// The tensor-core forward with the block's query rows resident in dynamic shared memory and the
// keys pipelined across tiles (infonce_tc.cuh); the launch gives it ResidentGeometry's bytes.
// Exact f32 has no such path: the launch layer picks this kernel for tensor-core operands only,
// and the f32 instantiation stops (a second copy of the CUDA-core forward made ptxas spill it).
// Instantiated per loss of the family (FixedLoss: the per-element and per-column code has no
// branch on the loss's optional inputs; in sm_90 SASS NT-Xent's kernel has 5 040 instructions,
// 298 global loads and 212 branches where the general one had 5 768, 372 and 303), each its own
// kernel: in one kernel the instantiations spilled together at the 80-register bound, and each
// adds its static shared memory. Any other mix of inputs (no loss of the crate makes one) takes
// infonce_fwd.
CONTRA_FIXED_FORWARDS(resident, ResidentSweep)

// The same with a key split (MoCo's few rows against a long queue).
template <typename T>
__device__ void infonce_fwd_split_resident(const ContraInfonceFwdParams& p) {
    if constexpr (kOnTensorCores<T>) {
        infonce_fwd_tensor_cores<T, true, true>(p);
    } else {
        __trap();
    }
}


// kResident: the S recompute from resident query rows and key slices pipelined across tiles
// (ResidentSweep, infonce_tc.cuh), in place of a re-staged tile_mma per tile.
template <typename T, bool kResident>
__device__ void infonce_bwd_engine(const ContraInfonceBwdParams& p) {
    __shared__ float g[kTile][kTilePad];  // G restricted to this (query, key) tile
    __shared__ __align__(16) float staged[kTile][kTilePad];  // the second products' source rows
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const int r0 = blockIdx.x * kTile;
    const float scale = logit_scale(p);
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    float log_scale_acc = 0.0f;  // CLIP: this thread's share of sum_ij dlogit_ij * logit_ij
    // bf16 with dim <= 256: dQ stays in registers for the whole sweep (grad_product_tc_resident).
    constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
    // A key split's blocks share their rows of grad_q: atomic adds, never resident.
    const bool split = p.split_tiles > 0;
    const int c_begin = split ? blockIdx.y * p.split_tiles * kTile : 0;
    const int c_end = split ? min(p.cols, c_begin + p.split_tiles * kTile) : p.cols;
    const bool keep_resident = kBf16 && !split && p.dim <= kResidentChunks * kTile;
    float resident[kBf16 ? kResidentChunks : 1][4][4] = {};
    // With dK, block b starts at key tile b (mod the tiles): the blocks' atomic adds then land
    // on different keys' rows instead of all on the same ones.
    const int steps = (c_end - c_begin + kTile - 1) / kTile;
    const int rotation = (p.grad_k && steps > 0) ? blockIdx.x % steps : 0;
    const auto column = [&](int step) { return c_begin + (step + rotation) % steps * kTile; };
    CONTRA_DYNAMIC_SHARED(StageWord<T>, resident_rows);
    const ResidentSweep<T, decltype(column)> sweep(resident_rows, k, p.cols, p.dim, steps, column);
    if constexpr (kResident) sweep.start(q, p.rows, r0);
    for (int step = 0; step < steps; ++step) {
        const int c0 = column(step);
        // The tile's dot products go to g, then g becomes G in a flat, not unrolled loop: the
        // loss-specific per-element code stays out of the register-heavy tile loop.
        if constexpr (kResident) {
            const int warp = tid / 32;
            float d[4][4];
            sweep.tile(step, 16 * (warp % 4), 32 * (warp / 4), d);
            store_fragments(d, g);
        } else {
            dot_tile_to_shared(q, p.rows, r0, k, p.cols, c0, p.dim, g);
        }
        __syncthreads();
        for (int e = tid; e < kTile * kTile; e += 256) {
            const int r = e / kTile, c = e % kTile, row = r0 + r, col = c0 + c;
            float value = 0.0f;
            if (row < p.rows && col < p.cols) {
                float term;
                value = softmax_grad(p, scale, row, LogitEnd::load(p, row), col, LogitEnd::load(p, col), g[r][c], term);
                log_scale_acc += term;
            }
            g[r][c] = value;
        }
        if (keep_resident) {
            if constexpr (kBf16) grad_product_tc_resident(g, staged, k, p.cols, c0, p.dim, resident);
        } else {
            const Write own = split ? Write::kAtomicAdd : step == 0 ? Write::kOverwrite : Write::kAdd;
            grad_product_for<false>(g, staged, k, p.cols, c0, p.dim, p.grad_q, r0, p.rows, own);
        }
        if (p.grad_k) grad_product_for<true>(g, staged, q, p.rows, r0, p.dim, p.grad_k, c0, p.cols, Write::kAtomicAdd);
        __syncthreads();  // g and the staged rows are rewritten by the next tile
    }
    if constexpr (kResident) sweep.finish();
    if constexpr (kBf16)
        if (keep_resident) write_resident(resident, p.grad_q, r0, p.rows, p.dim, Write::kOverwrite);
    write_log_scale_partial(p, log_scale_acc);
}

template <typename T>
__device__ void infonce_bwd(const ContraInfonceBwdParams& p) {
    infonce_bwd_engine<T, false>(p);
}

// The backward whose S recompute keeps the block's query rows resident (the launch gives it
// ResidentGeometry's bytes); for tensor-core operands only, as infonce_fwd_resident.
template <typename T>
__device__ void infonce_bwd_resident(const ContraInfonceBwdParams& p) {
    if constexpr (kOnTensorCores<T>) {
        infonce_bwd_engine<T, true>(p);
    } else {
        __trap();
    }
}

// The fused backward, bf16, f16 or tf32 (FusedGeometry in infonce_tc.cuh; the launch gives its bytes
// and kFusedThreads threads): per key tile, one wait and one barrier for the whole tile (staged
// while the previous tile was worked on); S from the resident rows and the tile by ldmatrix; G
// formed on S's accumulator fragments and stored once, as the operand type, for both products;
// dQ += G K kept in registers across the sweep (added at the end under a key split), dK += G^T Q
// added per tile with the tile's B operands read from the resident rows.
template <typename T, typename Loss>
__device__ void infonce_bwd_fused_for(const ContraInfonceBwdParams& p) {
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4, m0 = 16 * (warp % 4), n0 = kFusedWarpCols * (warp / 4);
    const int r0 = blockIdx.x * kTile;
    const float scale = logit_scale(p);
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const FusedGeometry<T> geo(p.dim);
    CONTRA_DYNAMIC_SHARED(StageWord<T>, shared);
    if (p.dim > kFusedMaxDim || geo.bytes() > dynamic_shared_size() || blockDim.x * blockDim.y != kFusedThreads)
        __trap();
    StageWord<T>* const q_rows = shared;
    StageWord<T>* const g_tile = shared + 3 * kTile * geo.stride;
    const auto key_tile = [&](int step) { return shared + (1 + step % 2) * kTile * geo.stride; };
    const BackwardKeys keys_of(p);
    int c0 = keys_of.first_column(p);
    // The rows and the first key tile form the first group.
    stage_rows<T, 0, kFusedThreads>(q, p.rows, p.dim, r0, 0, geo.padded, q_rows, geo.stride);
    const RowStager<T, kFusedThreads> stage_keys(k, p.cols, p.dim, geo.padded, geo.stride);
    if (keys_of.steps > 0) stage_keys.stage(c0, key_tile(0));
    cp_async_commit();
    float resident[kResidentChunks][kFusedTiles][4] = {};
    const GradRows<Loss> grad_rows(p, scale, r0 + m0 + g);
    for (int step = 0; step < keys_of.steps; ++step, c0 = keys_of.next_column(c0)) {
        const StageWord<T>* keys = key_tile(step);
        cp_async_wait<0>();
        __syncthreads();  // the tile landed for all; the previous tile's buffer and G are consumed
        if (step + 1 < keys_of.steps) stage_keys.stage(keys_of.next_column(c0), key_tile(step + 1));
        cp_async_commit();
        float d[kFusedTiles][4] = {};
        scores_from_rows<T, kFusedWarpCols>(q_rows, keys, geo.stride, geo.padded, m0, n0, d);
        grad_rows.tile(p, scale, c0 + n0 + 2 * t, d, [&](int h, int nt, float first, float second) {
            store_g_pair<T>(g_tile, m0 + g + 8 * h, n0 + 8 * nt + 2 * t, first, second);
        });
        __syncthreads();  // G is complete
        fused_dq_product<T>(g_tile, keys, geo.stride, p.dim, resident);
        if (p.grad_k) fused_dk_product<T>(g_tile, q_rows, geo.stride, p.grad_k, c0, p.cols, p.dim, grad_rows.g_unscale);
    }
    cp_async_wait<0>();
    scale_fragments(&resident[0][0][0], kResidentChunks * kFusedTiles * 4, grad_rows.g_unscale);
    write_resident<kFusedWarpCols>(resident, p.grad_q, r0, p.rows, p.dim,
                                   keys_of.split ? Write::kAtomicAdd : Write::kOverwrite);
    write_log_scale_partial<kFusedWarps>(p, grad_rows.log_scale_acc);
}

// The fused backward instantiated per loss of the family. The launch layer takes it for these
// four mixes of inputs only (src/kernels/infonce.rs, fused_loss): a fifth, general instantiation
// would cost every loss's registers nothing but the kernel its 128-register fit.
template <typename T>
__device__ void infonce_bwd_fused(const ContraInfonceBwdParams& p) {
    static_assert(kIsHalf<T> || kIsTf32<T>, "bf16, f16 or tf32 operands");
    with_fixed_loss(p, [&](auto loss) { infonce_bwd_fused_for<T, decltype(loss)>(p); });
}

// MoCo's extra logit in the backward: one warp per query row adds
// grad_scale * scale * (softmax of the extra logit - 1) * extra_key_i to grad_q_i.
template <typename T>
__device__ void infonce_extra_bwd(const ContraInfonceExtraBwdParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * 8 + threadIdx.x / 32;
    if (row >= p.rows) return;
    const T* q = static_cast<const T*>(p.q) + row * p.dim;
    const T* extra = static_cast<const T*>(p.extra_key) + row * p.dim;
    float dot = 0.0f;
    for (int d = lane; d < p.dim; d += 32) dot += load(q, d) * load(extra, d);
    const float u = __fmul_rn(warp_sum(dot), p.scale * kLog2e);
    const float coef = p.grad_scale * p.scale * (exp2f(u - __fmul_rn(p.lse[row], kLog2e)) - 1.0f);
    for (int d = lane; d < p.dim; d += 32) p.grad_q[row * p.dim + d] += coef * load(extra, d);
}

// out[i] = a_i . b_i, one warp per row.
template <typename T>
__device__ void infonce_row_dot(const ContraRowDotParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * 8 + threadIdx.x / 32;
    if (row >= p.rows) return;  // whole warps leave together
    const T* a = static_cast<const T*>(p.a) + row * p.dim;
    const T* b = static_cast<const T*>(p.b) + row * p.dim;
    float dot = 0.0f;
    for (int d = lane; d < p.dim; d += 32) dot += load(a, d) * load(b, d);
    dot = warp_sum(dot);
    if (lane == 0) p.out[row] = dot;
}

// A packed running state {max, sum} (log2 units): max in the low word, sum in the high word.
__device__ __forceinline__ float state_max(unsigned long long state) { return __uint_as_float((unsigned)(state & 0xffffffffull)); }
__device__ __forceinline__ float state_sum(unsigned long long state) { return __uint_as_float((unsigned)(state >> 32)); }

// A forward whose rows several blocks add to (symmetric, key split), second step: each row's lse
// and loss from the state and target term the sweep folded in (one thread per row).
__device__ void infonce_finish(const ContraInfonceFwdParams& p) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.rows) return;
    const unsigned long long state = p.row_state[row];
    QueryRow::write_row_loss(p, row, state_max(state), state_sum(state), p.row_target[row]);
}

// CLIP's forward, last step: each column's lse from its state, and each row's share of the loss.
__device__ void clip_columns(const ContraClipColumnsParams& p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.rows) return;
    const unsigned long long state = p.col_state[i];
    const float col_lse = (state_max(state) + log2f(state_sum(state))) * 0.69314718056f;
    p.col_lse[i] = col_lse;
    p.row_value[i] = 2.0f * p.row_loss[i] + col_lse - p.row_lse[i];
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) clip_columns(const ContraClipColumnsParams p) {
    contra::clip_columns(p);
}
INTERP_EXPORT(clip_columns, ContraClipColumnsParams)

extern "C" __global__ void __launch_bounds__(256) infonce_finish(const ContraInfonceFwdParams p) {
    contra::infonce_finish(p);
}
INTERP_EXPORT(infonce_finish, ContraInfonceFwdParams)

// At least 3 resident blocks per SM: ptxas then allows 80 registers on sm_80 and sm_90 alike
// (left alone it caps sm_90 at 64 and spills in the backward). The bf16 backward keeps dQ in
// registers (about 150): one block per SM, no spills.
CONTRA_TYPED_KERNELS_TF32(infonce_fwd, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 3))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_split, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 3))
// tf32's resident rows take 94 KB at D = 256, so 2 blocks per SM fit anyway: (256, 2) (at 80
// registers it spilled on sm_90).
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_resident_ntxent, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_resident_clip, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_resident_supcon, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_resident_infonce, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_split_resident, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_bwd, ContraInfonceBwdParams, (256, 3), (256, 1), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_bwd_resident, ContraInfonceBwdParams, (256, 3), (256, 1), (256, 2), (256, 2))
// The fused backward: one block of 16 warps per SM, so at most 128 registers (ptxas: bf16 112,
// tf32 128; the dQ product's k-steps and the dK product's chunks are loops, not unrolled, to fit).
extern "C" __global__ void __launch_bounds__(contra::kFusedThreads, 1) infonce_bwd_fused_bf16(const ContraInfonceBwdParams p) {
    contra::infonce_bwd_fused<__nv_bfloat16>(p);
}
INTERP_EXPORT(infonce_bwd_fused_bf16, ContraInfonceBwdParams)
extern "C" __global__ void __launch_bounds__(contra::kFusedThreads, 1) infonce_bwd_fused_f16(const ContraInfonceBwdParams p) {
    contra::infonce_bwd_fused<__half>(p);
}
INTERP_EXPORT(infonce_bwd_fused_f16, ContraInfonceBwdParams)
extern "C" __global__ void __launch_bounds__(contra::kFusedThreads, 1) infonce_bwd_fused_tf32(const ContraInfonceBwdParams p) {
    contra::infonce_bwd_fused<contra::tf32>(p);
}
INTERP_EXPORT(infonce_bwd_fused_tf32, ContraInfonceBwdParams)
CONTRA_TYPED_KERNELS(infonce_extra_bwd, ContraInfonceExtraBwdParams, 256)
CONTRA_TYPED_KERNELS(infonce_row_dot, ContraRowDotParams, 256)
