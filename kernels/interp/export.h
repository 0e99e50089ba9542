// export.h — INTERP_EXPORT(kernel, Params): makes a kernel callable from Rust in
// interpreted mode. Safe to include from both nvcc and host builds.
//
// Every exported kernel must have exactly the signature
//     extern "C" __global__ void kernel(const Params p)
// and be followed (at namespace scope, no semicolon needed) by
//     INTERP_EXPORT(kernel, Params)
// In host builds this defines
//     extern "C" int interp_kernel(const InterpLaunchConfig* cfg, const Params* p,
//                                  char* err, unsigned long err_len);
// which runs the whole grid on the CPU (see abi.h for the return convention).
// Under nvcc it expands to nothing. build.rs reads these lines (and CONTRA_TYPED_KERNELS*, which
// expand to them) at line start to generate the Rust handles: one `Kernel<Params>` per export,
// so a launch with another params struct does not compile.
#ifndef CONTRA_INTERP_EXPORT_H
#define CONTRA_INTERP_EXPORT_H

#if defined(__CUDACC__)
#define INTERP_EXPORT(kernel, Params)
#else
#include "abi.h"
#define INTERP_EXPORT(kernel, Params)                                                   \
    extern "C" int interp_##kernel(const InterpLaunchConfig* cfg, const Params* p,      \
                                   char* err, unsigned long err_len) {                  \
        if (p == nullptr) {                                                             \
            return interp_run(cfg, nullptr, nullptr, err, err_len);                     \
        }                                                                               \
        return interp_run(                                                              \
            cfg, [](const void* pp) { kernel(*static_cast<const Params*>(pp)); }, p,    \
            err, err_len);                                                              \
    }
#endif

#endif  // CONTRA_INTERP_EXPORT_H
