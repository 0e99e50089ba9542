/* abi.h — C ABI of the interpreted-mode runtime (runtime.cpp).
 *
 * Plain C so the Rust side can mirror it with #[repr(C)]:
 *   struct InterpLaunchConfig { grid: [u32; 3], block: [u32; 3], shared_bytes: u64 }  // 32 bytes
 */
#ifndef CONTRA_INTERP_ABI_H
#define CONTRA_INTERP_ABI_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct InterpLaunchConfig {
    unsigned grid[3];                /* gridDim.x, .y, .z   (all > 0) */
    unsigned block[3];               /* blockDim.x, .y, .z  (all > 0, product <= 1024) */
    unsigned long long shared_bytes; /* dynamic shared memory per block (<= 227 KiB) */
} InterpLaunchConfig;

/* Runs body(params) once for every thread of the grid, with threadIdx/blockIdx/...
 * set up, and waits for the whole grid. Returns 0 on success; on error returns
 * nonzero and writes a NUL-terminated message into err (capacity err_len; err may
 * be NULL). On success err (if given) is set to "". Thread-safe: independent
 * launches may run concurrently from different OS threads. */
int interp_run(const InterpLaunchConfig* cfg, void (*body)(const void* params),
               const void* params, char* err, unsigned long err_len);

#ifdef __cplusplus
}
#endif

#endif /* CONTRA_INTERP_ABI_H */
