// A deliberately broken kernel for the interpreted mode's own tests: thread i writes y[i + 1], so
// the launch writes one element past the end of `y` and leaves y[0] unwritten. The guard bands
// must catch it.
#include "common.cuh"

extern "C" __global__ void oob_test_f32(const ContraNormalizeParams p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)p.rows * p.dim;
    if (i < n) static_cast<float*>(p.y)[i + 1] = 1.0f;
}
INTERP_EXPORT(oob_test_f32, ContraNormalizeParams)
