// The InfoNCE family's forward and fused backward on Hopper's warpgroup MMA (sm_90a only:
// build.rs compiles the *_sm90a.cu modules for compute_90a alone, and the host loads this one on
// compute capability 9.0).
//
// The forward is infonce_fwd_tensor_cores with the key sweep of infonce_wgmma.cuh: query rows
// resident in swizzled panels, keys streamed by cp.async, scores by wgmma m64n32k16 (tf32:
// m64n32k8) straight from shared memory, the statistics from the accumulators as on the other tensor-core paths. One
// kernel per loss of the family, as infonce_fwd_resident_* (infonce.cu), for bf16 / f16 operands
// and f32 ones as tf32 (rounded in shared memory); the exact f32 instantiations stop (the host
// never picks them).
#include "infonce_wgmma.cuh"

namespace contra {

CONTRA_FIXED_FORWARDS(wgmma, WgmmaSweep)

// The fused backward on Hopper's warpgroup MMA, bf16 or f16 (G scaled into f16's range as in
// the fused backward: GradRows), up to kPanels * 64 features (the host
// picks the narrowest that holds dim): the fused backward's sweep (infonce.cu, same 512 threads,
// the same G and key order) with every product on wgmma from 128-byte-swizzled panels. Dynamic
// shared memory, from the first 1024-aligned address (the launch adds 1024 bytes for that): the
// block's query rows, two key tiles (the one in use and the next in flight), G; each kPanels
// panels of 8 KB but G, one.
//   S = Q K^T   m64n16k16: warpgroup w (warps 4 w .. 4 w + 3) owns keys 16 w .. +16, A the query
//               panels, B the tile's key rows 16 w .. (both K-major), so each warp holds the
//               fused backward's 16 x 16 part of S and computes G on it as that kernel does.
//   dQ += G K   m64n64k16: A = G (K-major: rows x keys), B = one panel of the key tile (MN-major:
//               its rows are the k dimension), accumulated in registers for the whole sweep;
//   dK += G^T Q m64n64k16: A = G^T (MN-major: G's rows are the k dimension), B = one query panel
//               (MN-major), added to grad_k per tile.
// The products take whole panels, N = 64: each k-step reads its 2 KB A once per 64 features,
// not once per 16 (the shared-memory bound of m64n16, docs/kernels.md), and every operand starts
// at a row of its panel. Warpgroup w takes panel w % kPanels and part w / kPanels of the
// reduction (keys for dQ, queries for dK): at 1 and 2 panels the four warpgroups split the 64
// keys, and their dQ parts meet in shared memory at the end; at 3 the fourth warpgroup only
// computes S and G.
template <typename T, typename Loss, int kPanels>
__device__ void infonce_bwd_wgmma_for(const ContraInfonceBwdParams& p) {
    constexpr unsigned kPanelBytes = kWgmmaPanelBytes, kTileBytes = kPanels * kPanelBytes;
    constexpr unsigned kRowsBytes = 16 * kSwizzleRowBytes;  // a k-step of an MN-major operand
    constexpr int kGroups = kFusedThreads / 128;
    constexpr int kParts = kPanels == 3 ? 1 : kGroups / kPanels;  // of a product's 64-long reduction
    constexpr int kPartSteps = kWgmmaStepsPerPanel / kParts;
    const int tid = threadIdx.y * 16 + threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4, m0 = 16 * (warp % 4), n0 = kFusedWarpCols * (warp / 4);
    const int panel = warp / 4 % kPanels, part = warp / 4 / kPanels;
    const bool products = part < kParts;  // the same for the whole warpgroup
    const int r0 = blockIdx.x * kTile;
    const float scale = logit_scale(p);
    CONTRA_DYNAMIC_SHARED(unsigned char, shared);
    const unsigned long long bytes = kSwizzleAtomBytes + (3ull * kPanels + 1) * kPanelBytes;
    if (p.dim > kPanels * kWgmmaPanelFeatures || bytes > dynamic_shared_size() ||
        blockDim.x * blockDim.y != kFusedThreads)
        __trap();
    unsigned char* const q_rows =
        shared + (kSwizzleAtomBytes - shared_window(shared) % kSwizzleAtomBytes) % kSwizzleAtomBytes;
    unsigned char* const g_tile = q_rows + 3 * kTileBytes;
    const auto key_tile = [&](int step) { return q_rows + (1 + step % 2) * kTileBytes; };
    const unsigned rows_at = shared_window(q_rows), g_tile_at = shared_window(g_tile);
    const BackwardKeys keys_of(p);
    int c0 = keys_of.first_column(p);
    // The rows and the first key tile form the first group.
    const T* k = static_cast<const T*>(p.k);
    stage_swizzled<T, kFusedThreads>(static_cast<const T*>(p.q), p.rows, p.dim, r0, 0, kPanels, q_rows);
    if (keys_of.steps > 0) stage_swizzled<T, kFusedThreads>(k, p.cols, p.dim, c0, 0, kPanels, key_tile(0));
    cp_async_commit();
    float dq[kWgmmaPanelFeatures / 8][4] = {};  // this warpgroup's part of dQ: 64 rows x its panel
    const GradRows<Loss> grad_rows(p, scale, r0 + m0 + g);
    for (int step = 0; step < keys_of.steps; ++step, c0 = keys_of.next_column(c0)) {
        const unsigned keys_at = shared_window(key_tile(step)), q_at = opaque(rows_at), g_at = opaque(g_tile_at);
        cp_async_wait<0>();
        fence_async_shared();  // this thread's copies and G stores, to the proxy wgmma reads through
        __syncthreads();       // the tile landed for all; the previous tile's buffer and G are consumed
        if (step + 1 < keys_of.steps)
            stage_swizzled<T, kFusedThreads>(k, p.cols, p.dim, keys_of.next_column(c0), 0, kPanels,
                                             key_tile(step + 1));
        cp_async_commit();
        float d[kFusedTiles][4];
        wgmma_fence(&d[0][0], 8);
#pragma unroll
        for (int slice = 0; slice < kPanels; ++slice)
#pragma unroll
            for (int ks = 0; ks < kWgmmaStepsPerPanel; ++ks)
                wgmma_k_step<T, 16>(&d[0][0], swizzled_operand(q_at + slice * kPanelBytes + 32 * ks),
                                     swizzled_operand(keys_at + slice * kPanelBytes + n0 / 8 * kSwizzleAtomBytes + 32 * ks),
                                     slice > 0 || ks > 0);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(&d[0][0], 8);
        grad_rows.tile(p, scale, c0 + n0 + 2 * t, d, [&](int h, int nt, float first, float second) {
            const int row = m0 + g + 8 * h, col = n0 + 8 * nt + 2 * t;
            *reinterpret_cast<unsigned*>(g_tile + swizzled_chunk(row, col / 8) + 2 * (col % 8)) =
                half_pair<T>(first, second);
        });
        fence_async_shared();
        __syncthreads();  // G is complete
        if (!products) continue;
        wgmma_fence(&dq[0][0], 32);
#pragma unroll
        for (int ks = 0; ks < kPartSteps; ++ks) {
            const int key_step = part * kPartSteps + ks;
            wgmma_k_step<T, 64, false, true>(
                &dq[0][0], swizzled_operand(g_at + 32 * key_step),
                swizzled_descriptor(keys_at + panel * kPanelBytes + key_step * kRowsBytes, kPanelBytes), true);
        }
        wgmma_commit();
        if (p.grad_k) {
            float dk[kWgmmaPanelFeatures / 8][4];
            wgmma_fence(&dk[0][0], 32);
#pragma unroll
            for (int ks = 0; ks < kPartSteps; ++ks) {
                const int query_step = part * kPartSteps + ks;
                wgmma_k_step<T, 64, true, true>(
                    &dk[0][0], swizzled_descriptor(g_at + query_step * kRowsBytes, kPanelBytes),
                    swizzled_descriptor(q_at + panel * kPanelBytes + query_step * kRowsBytes, kPanelBytes), ks > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_fence_operands(&dk[0][0], 32);
            scale_fragments(&dk[0][0], 32, grad_rows.g_unscale);
            write_fragments<kWgmmaPanelFeatures>(dk, p.grad_k, c0, p.cols, panel * kWgmmaPanelFeatures, p.dim,
                                                 Write::kAtomicAdd);
        }
        wgmma_wait<0>();  // dQ's products are done with G and the tile
        wgmma_fence_operands(&dq[0][0], 32);
    }
    cp_async_wait<0>();
    if constexpr (kParts > 1) {
        // The parts of each panel's dQ meet in f32 in the (now free) panels, one part at a time.
        float* const partial = reinterpret_cast<float*>(q_rows);
        const auto each_element = [&](auto body) {
#pragma unroll
            for (int nt = 0; nt < kWgmmaPanelFeatures / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    body(dq[nt][e], partial[(panel * kTile + m0 + g + 8 * (e / 2)) * kWgmmaPanelFeatures + 8 * nt +
                                            2 * t + e % 2]);
        };
        __syncthreads();  // no warpgroup reads the panels any more
        for (int from = 1; from < kParts; ++from) {
            if (part == from) each_element([&](float mine, float& sum) { sum = (from == 1 ? 0.0f : sum) + mine; });
            __syncthreads();
        }
        if (part == 0) each_element([](float& mine, float sum) { mine += sum; });
    }
    scale_fragments(&dq[0][0], 32, grad_rows.g_unscale);
    if (part == 0)
        write_fragments<kWgmmaPanelFeatures>(dq, p.grad_q, r0, p.rows, panel * kWgmmaPanelFeatures, p.dim,
                                             keys_of.split ? Write::kAtomicAdd : Write::kOverwrite);
    write_log_scale_partial<kFusedWarps>(p, grad_rows.log_scale_acc);
}

// The wgmma backward instantiated per loss of the family, as infonce_bwd_fused.
template <typename T, int kPanels>
__device__ void infonce_bwd_wgmma(const ContraInfonceBwdParams& p) {
    with_fixed_loss(p, [&](auto loss) { infonce_bwd_wgmma_for<T, decltype(loss), kPanels>(p); });
}

}  // namespace contra

// infonce_bwd_wgmma_<features>_<type>: up to 64, 128, 192 and 256 features, bf16 and f16.
#define CONTRA_WGMMA_BACKWARD(features, type, T)                                            \
    extern "C" __global__ void __launch_bounds__(contra::kFusedThreads, 1)                 \
        infonce_bwd_wgmma_##features##_##type(const ContraInfonceBwdParams p) {             \
        contra::infonce_bwd_wgmma<T, features / contra::kWgmmaPanelFeatures>(p);            \
    }
#define CONTRA_WGMMA_BACKWARDS(features)                   \
    CONTRA_WGMMA_BACKWARD(features, bf16, __nv_bfloat16) \
    CONTRA_WGMMA_BACKWARD(features, f16, __half)
CONTRA_WGMMA_BACKWARDS(64)
CONTRA_WGMMA_BACKWARDS(128)
CONTRA_WGMMA_BACKWARDS(192)
CONTRA_WGMMA_BACKWARDS(256)
INTERP_EXPORT(infonce_bwd_wgmma_64_bf16, ContraInfonceBwdParams)
INTERP_EXPORT(infonce_bwd_wgmma_128_bf16, ContraInfonceBwdParams)
INTERP_EXPORT(infonce_bwd_wgmma_192_bf16, ContraInfonceBwdParams)
INTERP_EXPORT(infonce_bwd_wgmma_256_bf16, ContraInfonceBwdParams)
INTERP_EXPORT(infonce_bwd_wgmma_64_f16, ContraInfonceBwdParams)
INTERP_EXPORT(infonce_bwd_wgmma_128_f16, ContraInfonceBwdParams)
INTERP_EXPORT(infonce_bwd_wgmma_192_f16, ContraInfonceBwdParams)
INTERP_EXPORT(infonce_bwd_wgmma_256_f16, ContraInfonceBwdParams)

// 57 KB of dynamic shared memory at D = 256: three blocks per SM, as the resident forward; tf32
// 89 KB, two.
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_wgmma_ntxent, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_wgmma_clip, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_wgmma_supcon, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
CONTRA_TYPED_KERNELS_TF32(infonce_fwd_wgmma_infonce, ContraInfonceFwdParams, (256, 3), (256, 3), (256, 3), (256, 2))
