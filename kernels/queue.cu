// The MoCo queue enqueue: L2-normalized key rows written into a ring buffer of queue_len rows at
// (ptr + i) mod queue_len. One warp per key row. With more keys than slots only the last
// queue_len keys write, so every slot has exactly one writer and the result is deterministic.
//
// The normalization is normalize_fwd's (normalize.cu), overflow path included: a key whose f32 sum
// of squares reaches 2^126 is summed again scaled by 2^-80 (exact), so huge keys normalize right
// instead of to 0.
#include "common.cuh"

namespace contra {

constexpr int kQueueWarps = 8;  // key rows per 256-thread block
constexpr float kQueueHugeSquares = 0x1p126f;
constexpr float kQueueRowScale = 0x1p-80f;

template <typename T>
__device__ void queue_enqueue(const ContraQueueParams& p) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * kQueueWarps + threadIdx.x / 32;
    if (row >= p.rows || row < (long long)p.rows - p.queue_len) return;  // whole warps leave together
    const long long slot = ((long long)p.ptr + row) % p.queue_len;
    const T* x = static_cast<const T*>(p.k) + row * p.dim;
    T* y = static_cast<T*>(p.queue) + slot * p.dim;
    float sq = 0.0f;
    for (int d = lane; d < p.dim; d += 32) {
        const float v = load(x, d);
        sq += v * v;
    }
    sq = warp_sum(sq);
    float scale = 1.0f;
    if (!(sq < kQueueHugeSquares)) {  // warp-uniform: the sum is the warp's
        scale = kQueueRowScale;
        sq = 0.0f;
        for (int d = lane; d < p.dim; d += 32) {
            const float v = load(x, d) * scale;
            sq += v * v;
        }
        sq = warp_sum(sq);
    }
    const float inv = 1.0f / fmaxf(sqrtf(sq), p.eps);
    for (int d = lane; d < p.dim; d += 32) store(y, d, load(x, d) * scale * inv);
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) queue_enqueue_f32(const ContraQueueParams p) { contra::queue_enqueue<float>(p); }
INTERP_EXPORT(queue_enqueue_f32, ContraQueueParams)
