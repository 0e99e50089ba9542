// The InfoNCE family's forward on Hopper's warpgroup MMA (sm_90a only: build.rs compiles the
// *_sm90a.cu modules for compute_90a alone, and the host loads this one on compute capability
// 9.0). The kernel is infonce_fwd_tensor_cores with the key sweep of infonce_wgmma.cuh: query rows
// resident in swizzled panels, keys streamed by cp.async, scores by wgmma m64n32k16 straight from
// shared memory, the statistics from the accumulators as on the other tensor-core paths. One
// kernel per loss of the family, as infonce_fwd_resident_* (infonce.cu), and for bf16 / f16
// operands: the f32 instantiations stop (the host never picks them).
#include "infonce_wgmma.cuh"

namespace contra {

template <typename T, typename Loss>
__device__ void infonce_fwd_wgmma_for(const ContraInfonceFwdParams& p) {
    if constexpr (kIsHalf<T>) {
        if (!Loss::matches(p)) __trap();
        infonce_fwd_tensor_cores<T, false, true, Loss, WgmmaSweep>(p);
    } else {
        __trap();
    }
}
// infonce_fwd_wgmma_<loss><T>, the name the kernel macros instantiate per operand type.
#define CONTRA_WGMMA_FORWARD_OF(loss, Loss)                                      \
    template <typename T>                                                        \
    __device__ void infonce_fwd_wgmma_##loss(const ContraInfonceFwdParams& p) { \
        infonce_fwd_wgmma_for<T, Loss>(p);                                       \
    }
CONTRA_WGMMA_FORWARD_OF(ntxent, NtXentLoss)
CONTRA_WGMMA_FORWARD_OF(clip, ClipLoss)
CONTRA_WGMMA_FORWARD_OF(supcon, SupConLoss)
CONTRA_WGMMA_FORWARD_OF(infonce, InfoNceLoss)

}  // namespace contra

// 57 KB of dynamic shared memory at D = 256: three blocks per SM, as the resident forward.
CONTRA_TYPED_KERNELS_BOUNDED(infonce_fwd_wgmma_ntxent, ContraInfonceFwdParams, (256, 3))
CONTRA_TYPED_KERNELS_BOUNDED(infonce_fwd_wgmma_clip, ContraInfonceFwdParams, (256, 3))
CONTRA_TYPED_KERNELS_BOUNDED(infonce_fwd_wgmma_supcon, ContraInfonceFwdParams, (256, 3))
CONTRA_TYPED_KERNELS_BOUNDED(infonce_fwd_wgmma_infonce, ContraInfonceFwdParams, (256, 3))
