// The MoCo queue enqueue: L2-normalized key rows written into a ring buffer of queue_len rows at
// (ptr + i) mod queue_len. One warp per key row. With more keys than slots only the last
// queue_len keys write, so every slot has exactly one writer and the result is deterministic.
#include "common.cuh"

namespace contra {

constexpr int kQueueWarps = 8;  // key rows per 256-thread block

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
    const float inv = 1.0f / fmaxf(sqrtf(warp_sum(sq)), p.eps);
    for (int d = lane; d < p.dim; d += 32) store(y, d, load(x, d) * inv);
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) queue_enqueue_f32(const ContraQueueParams p) { contra::queue_enqueue<float>(p); }
INTERP_EXPORT(queue_enqueue_f32, ContraQueueParams)
