// The InfoNCE-family forward's key sweep on Hopper's warpgroup MMA (wgmma.cuh), for bf16 / f16
// operands and f32 ones as tf32: the same interface as ResidentSweep (infonce_tc.cuh), so
// infonce_fwd_tensor_cores runs it unchanged. Its two warpgroups (warps 0-3 and 4-7) each compute
// one 64 x 32 half of the 64 x 64 score tile, keys n0 = 0 and n0 = 32, with one wgmma m64n32k16
// (tf32: m64n32k8) per 32-byte k-step; the
// accumulators are mma_16816's fragments of the same 16 x 32 warp part (wgmma.cuh), so the
// kernel's epilogue is the resident one's.
//
// Dynamic shared memory, from the first 1024-aligned shared address (the launch adds a 1024-byte
// margin for that): the block's 64 query rows as kWgmmaPanelBytes panels of 64 features (tf32:
// 32; a panel row is 128 bytes), then
// kResidentStages stages of one 64-key x 64-feature slice each, every panel 128-byte swizzled.
// Keys stream through the stages as in ResidentSweep: cp.async, one unit per slice, a pipeline
// that runs on from tile to tile. src/kernels/infonce.rs computes the same size. wgmma takes tf32
// operands straight from shared memory as f32 words, with no rounding on the way (dropping their
// low 13 bits would truncate), so each thread rounds the words it copied to tf32 in place
// (cvt.rna, as the mma.sync kernels round each fragment they load) once its copy has landed,
// before the fence and barrier that publish the stage.
#pragma once
#include "infonce_grad.cuh"
#include "wgmma.cuh"

namespace contra {

// A panel's features: a 128-byte row of the operand's words (64 bf16 / f16, 32 tf32).
template <typename T>
constexpr int kPanelFeatures = static_cast<int>(kSwizzleRowBytes / sizeof(StageWord<T>));
constexpr int kWgmmaPanelFeatures = kPanelFeatures<__nv_bfloat16>;  // the backward's (16-bit)
constexpr int kWgmmaPanelBytes = kTile * kSwizzleRowBytes;         // 64 rows of one panel: 8 KB
constexpr int kWgmmaStepsPerPanel = kSwizzleRowBytes / 32;         // 32-byte k-steps

template <typename T>
struct WgmmaGeometry {
    int panels;  // query panels, = key slices per tile (zeros past dim)
    __device__ __forceinline__ explicit WgmmaGeometry(int dim)
        : panels((dim + kPanelFeatures<T> - 1) / kPanelFeatures<T>) {}
    __device__ __forceinline__ unsigned long long bytes() const {
        return kSwizzleAtomBytes + (unsigned long long)(panels + kResidentStages) * kWgmmaPanelBytes;
    }
};

// body(panel, row, chunk, offset) for the 16-byte chunks of `panels` swizzled 64-row panels that
// this thread of the block's kThreads stages (offset: the chunk's bytes from the first panel).
template <int kThreads, typename Body>
__device__ __forceinline__ void for_own_swizzled_chunks(int panels, Body body) {
    constexpr int chunks_per_row = kSwizzleRowBytes / 16;  // 8
    const int tid = threadIdx.y * 16 + threadIdx.x;
    for (int c = tid; c < panels * kTile * chunks_per_row; c += kThreads) {
        const int panel = c / (kTile * chunks_per_row), r = c / chunks_per_row % kTile, chunk = c % chunks_per_row;
        body(panel, r, chunk, panel * kWgmmaPanelBytes + swizzled_chunk(r, chunk));
    }
}

// Stages rows [row0, row0 + 64) x features [k0, k0 + panels panels) of `m` as `panels` swizzled
// panels at `dst` (zeros past the matrix) with the block's kThreads threads; no commit.
template <typename T, int kThreads = 256>
__device__ __forceinline__ void stage_swizzled(const T* m, int rows, int dim, int row0, int k0, int panels,
                                               unsigned char* dst) {
    for_own_swizzled_chunks<kThreads>(panels, [&](int panel, int r, int chunk, unsigned offset) {
        stage_16_bytes(m, rows, dim, row0 + r, k0 + panel * kPanelFeatures<T> + chunk * kChunkElems<T>,
                       reinterpret_cast<StageWord<T>*>(dst + offset));
    });
}

// tf32: rounds the words this thread staged into `panels` panels at `dst` (stage_swizzled's
// chunks, its copies landed) to tf32 in place; nothing for 16-bit operands.
template <typename T, int kThreads = 256>
__device__ __forceinline__ void round_own_chunks(int panels, unsigned char* dst) {
    if constexpr (kIsTf32<T>) {
        for_own_swizzled_chunks<kThreads>(panels, [&](int, int, int, unsigned offset) {
            uint4* words = reinterpret_cast<uint4*>(dst + offset);
            const uint4 w = *words;
            *words = make_uint4(to_tf32(__uint_as_float(w.x)), to_tf32(__uint_as_float(w.y)),
                                to_tf32(__uint_as_float(w.z)), to_tf32(__uint_as_float(w.w)));
        });
    }
}

template <typename T, typename Column>
struct WgmmaSweep {
    static_assert(kOnTensorCores<T>, "wgmma sweeps take bf16 / f16 or tf32 operands");
    const WgmmaGeometry<T> geo;
    unsigned char* const shared;  // the launch's dynamic shared memory (aligned in start)
    const T* const k;
    const int cols, dim, count;
    const Column column;

    __device__ __forceinline__ WgmmaSweep(StageWord<T>* dynamic, const T* keys, int n_keys, int features, int tiles,
                                          Column first_key)
        : geo(features),
          shared(reinterpret_cast<unsigned char*>(dynamic)),
          k(keys),
          cols(n_keys),
          dim(features),
          count(tiles),
          column(first_key) {}

    // The query panels: the first 1024-aligned shared address of the launch's memory.
    __device__ __forceinline__ unsigned char* rows() const {
        return shared + (kSwizzleAtomBytes - shared_window(shared) % kSwizzleAtomBytes) % kSwizzleAtomBytes;
    }
    __device__ __forceinline__ unsigned char* stage(int unit) const {
        return rows() + (geo.panels + unit % kResidentStages) * kWgmmaPanelBytes;
    }

    __device__ __forceinline__ void issue(int unit) const {
        if (unit < count * geo.panels) {
            const int k0 = unit % geo.panels * kPanelFeatures<T>;
            stage_swizzled(k, cols, dim, column(unit / geo.panels), k0, 1, stage(unit));
        }
        cp_async_commit();
    }

    // Stages the block's query rows from r0 (with the first unit's group) and the first units;
    // traps unless the launch gave the layout's dynamic shared memory.
    __device__ __forceinline__ void start(const T* q, int n_rows, int r0) const {
        if (geo.bytes() > dynamic_shared_size()) __trap();
        stage_swizzled(q, n_rows, dim, r0, 0, geo.panels, rows());
        for (int unit = 0; unit < kResidentStages - 1; ++unit) issue(unit);
    }

    // The step-th tile's dot products, this warp's 16 x 32 part (rows 16 (warp % 4).., keys n0..)
    // as mma D fragments. Every thread of the block must call it (it synchronizes).
    __device__ __forceinline__ void tile(int step, int /* m0: the warp's place in its warpgroup */, int n0,
                                         float d[4][4]) const {
        const unsigned query = shared_window(rows());
        for (int slice = 0; slice < geo.panels; ++slice) {
            const int unit = step * geo.panels + slice;
            cp_async_wait<kResidentStages - 2>();
            if (unit == 0) round_own_chunks<T>(geo.panels, rows());  // the rows came with the first unit
            round_own_chunks<T>(1, stage(unit));
            fence_async_shared();  // this thread's copies, to the proxy wgmma reads through
            __syncthreads();       // everyone's; and the stage refilled next is read by none
            issue(unit + kResidentStages - 1);
            const unsigned a = query + slice * kWgmmaPanelBytes;
            const unsigned b = shared_window(stage(unit)) + n0 / 8 * kSwizzleAtomBytes;
            // Whole panels (zeros past dim): a k-step count known at compile time keeps ptxas
            // from serializing the wgmmas behind a branch it cannot prove uniform.
            wgmma_fence(&d[0][0], 16);
#pragma unroll
            for (int ks = 0; ks < kWgmmaStepsPerPanel; ++ks)
                wgmma_k_step<T, 32>(&d[0][0], swizzled_operand(a + 32 * ks), swizzled_operand(b + 32 * ks),
                                    slice > 0 || ks > 0);
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_fence_operands(&d[0][0], 16);
        }
    }

    // No copy outlives the block.
    __device__ __forceinline__ void finish() const { cp_async_wait<0>(); }
};

}  // namespace contra
