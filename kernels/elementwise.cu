// Small elementwise kernels that keep data on the device: constant fills (the softmax's empty
// running states, status words), the index ring of NT-Xent's positives, and dtype casts (a
// kernel's f32 gradient returned in the input's 16-bit type; f64 tensors read as f32).
#include "common.cuh"

namespace contra {

__device__ __forceinline__ long long first_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

__device__ void fill_words(const ContraFillParams& p) {
    for (long long i = first_index(); i < p.len; i += grid_stride()) {
        // Selected, not indexed: a dynamic index would put the pattern in local memory.
        const int k = (int)(i % p.period);
        p.out[i] = k == 0 ? p.pattern[0] : k == 1 ? p.pattern[1] : k == 2 ? p.pattern[2] : p.pattern[3];
    }
}

__device__ void index_ring(const ContraFillParams& p) {
    for (long long i = first_index(); i < p.len; i += grid_stride()) p.out[i] = (unsigned)((i + p.shift) % p.len);
}

template <typename T>
__device__ void cast_from_f32(const ContraCastParams& p) {
    const float* in = static_cast<const float*>(p.in);
    T* out = static_cast<T*>(p.out);
    for (long long i = first_index(); i < p.len; i += grid_stride()) store(out, i, in[i]);
}

template <typename T>
__device__ void cast_to_f32(const ContraCastParams& p) {
    const T* in = static_cast<const T*>(p.in);
    float* out = static_cast<float*>(p.out);
    for (long long i = first_index(); i < p.len; i += grid_stride()) out[i] = load(in, i);
}

__device__ void cast_f64_to_f32(const ContraCastParams& p) {
    const double* in = static_cast<const double*>(p.in);
    float* out = static_cast<float*>(p.out);
    for (long long i = first_index(); i < p.len; i += grid_stride()) out[i] = (float)in[i];
}

__device__ void cast_f32_to_f64(const ContraCastParams& p) {
    const float* in = static_cast<const float*>(p.in);
    double* out = static_cast<double*>(p.out);
    for (long long i = first_index(); i < p.len; i += grid_stride()) out[i] = (double)in[i];
}

__device__ void swap_row_blocks(const ContraSwapParams& p) {
    const long long len = (long long)p.outer * p.inner * p.dim;
    for (long long e = first_index(); e < len; e += grid_stride()) {
        const long long row = e / p.dim, c = e % p.dim;
        const long long i = row / p.inner, j = row % p.inner;
        p.out[(j * p.outer + i) * p.dim + c] = p.in[e];
    }
}

__device__ void split_halves(const ContraHalvesParams& p) {
    for (long long i = first_index(); i < p.len; i += grid_stride()) {
        p.first[i] = p.whole[i];
        p.second[i] = p.whole[p.len + i];
    }
}

__device__ void join_halves(const ContraHalvesParams& p) {
    for (long long i = first_index(); i < p.len; i += grid_stride()) {
        p.whole[i] = p.first[i];
        p.whole[p.len + i] = p.second[i];
    }
}

// O(n) per sample, O(n^2) in all: SupCon's batches are thousands of samples, not millions.
__device__ void class_weights(const ContraClassWeightsParams& p) {
    for (long long i = first_index(); i < p.n; i += grid_stride()) {
        const int label = p.labels[i];
        long long same = 0;
        for (int j = 0; j < p.n; ++j) same += p.labels[j] == label;
        const long long positives = same * p.views - 1;
        const float weight = positives == 0 ? 0.0f : (float)(1.0 / (double)positives);
        for (int v = 0; v < p.views; ++v) {
            p.row_labels[i * p.views + v] = label;
            p.row_weights[i * p.views + v] = weight;
        }
    }
}

}  // namespace contra

extern "C" __global__ void __launch_bounds__(256) class_weights(const ContraClassWeightsParams p) { contra::class_weights(p); }
INTERP_EXPORT(class_weights, ContraClassWeightsParams)
extern "C" __global__ void __launch_bounds__(256) fill_words(const ContraFillParams p) { contra::fill_words(p); }
INTERP_EXPORT(fill_words, ContraFillParams)
extern "C" __global__ void __launch_bounds__(256) index_ring(const ContraFillParams p) { contra::index_ring(p); }
INTERP_EXPORT(index_ring, ContraFillParams)
extern "C" __global__ void __launch_bounds__(256) split_halves(const ContraHalvesParams p) { contra::split_halves(p); }
INTERP_EXPORT(split_halves, ContraHalvesParams)
extern "C" __global__ void __launch_bounds__(256) join_halves(const ContraHalvesParams p) { contra::join_halves(p); }
INTERP_EXPORT(join_halves, ContraHalvesParams)
extern "C" __global__ void __launch_bounds__(256) swap_row_blocks(const ContraSwapParams p) { contra::swap_row_blocks(p); }
INTERP_EXPORT(swap_row_blocks, ContraSwapParams)
CONTRA_TYPED_KERNELS(cast_from_f32, ContraCastParams, 256)
CONTRA_TYPED_KERNELS(cast_to_f32, ContraCastParams, 256)
extern "C" __global__ void __launch_bounds__(256) cast_f64_to_f32(const ContraCastParams p) { contra::cast_f64_to_f32(p); }
INTERP_EXPORT(cast_f64_to_f32, ContraCastParams)
extern "C" __global__ void __launch_bounds__(256) cast_f32_to_f64(const ContraCastParams p) { contra::cast_f32_to_f64(p); }
INTERP_EXPORT(cast_f32_to_f64, ContraCastParams)
