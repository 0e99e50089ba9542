// dynamic_shared.h — CONTRA_DYNAMIC_SHARED(T, name): portable access to the
// launch's dynamic shared memory. Safe to include from both nvcc and host builds.
//
// Use it as a statement inside a kernel (or device function) body:
//     CONTRA_DYNAMIC_SHARED(float, buf);   // float* buf -> dynamic shared memory
// Several uses in one kernel all alias the same memory, as in CUDA.
// (Do not write `extern __shared__ T x[];` directly: it cannot work on the host.)
#ifndef CONTRA_INTERP_DYNAMIC_SHARED_H
#define CONTRA_INTERP_DYNAMIC_SHARED_H

#if defined(__CUDACC__)
#define CONTRA_DYNAMIC_SHARED(T, name)                                  \
    extern __shared__ __align__(16) unsigned char name##_raw[];         \
    T* name = reinterpret_cast<T*>(name##_raw)
#else
// Host: per-block buffer of cfg.shared_bytes bytes, 128-byte aligned, filled
// with 0xFF (NaN for floats) before each block.
#include "cuda_interp.h"
#define CONTRA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::interp::dynamic_shared_ptr())
#endif

#endif  // CONTRA_INTERP_DYNAMIC_SHARED_H
