/* The parameter structs passed by value to every kernel: the one ABI shared by the CUDA C++
 * sources and Rust (mirrored into src/kernels/params.rs by bindgen). Plain C: pointers, sizes,
 * scalars. Element pointers are `void*` so one struct serves every dtype; the kernel's name
 * (`{op}_{pass}_{dtype}`) says how to read them. Sizes are 32-bit; offsets are computed in 64-bit
 * inside the kernels. */
#ifndef CONTRA_PARAMS_H
#define CONTRA_PARAMS_H

#ifdef __cplusplus
extern "C" {
#endif

/* normalize_fwd: y = x / max(||x||, eps) per row.
 * normalize_bwd: grad_x = (grad_y - y (y . grad_y)) / max(||x||, eps). */
typedef struct ContraNormalizeParams {
    const void* x;
    const void* grad_y; /* backward only */
    void* y;            /* forward only */
    void* grad_x;       /* backward only */
    int rows;
    int dim;
    float eps;
} ContraNormalizeParams;

/* Pairwise score kinds of similarity_fwd. */
enum ContraSimilarityKind {
    CONTRA_SIM_DOT = 0,
    CONTRA_SIM_COSINE = 1,
    CONTRA_SIM_SQUARED_EUCLIDEAN = 2,
    CONTRA_SIM_EUCLIDEAN = 3
};

/* similarity_fwd: out (rows x cols, f32) = kind(a_i, b_j). */
typedef struct ContraSimilarityParams {
    const void* a;
    const void* b;
    float* out;
    int rows;
    int cols;
    int dim;
    int kind;
} ContraSimilarityParams;

/* infonce_fwd: per query row i, lse[i] = LSE_j (scale * q_i . k_j) over the unmasked keys and
 * row_loss[i] = lse[i] - scale * q_i . k_{positives[i]}. q and k are already normalized when the
 * loss asks for cosine similarity. */
typedef struct ContraInfonceFwdParams {
    const void* q;
    const void* k;
    const int* positives;
    float* lse;
    float* row_loss;
    int rows;
    int cols;
    int dim;
    int self_mask;
    float scale;
} ContraInfonceFwdParams;

/* infonce_bwd: the gradient for one side. `owner` is the side whose gradient this launch writes
 * (q when owner_is_query, else k), `other` the opposite side. With
 * G_ij = grad_scale * (exp(scale q_i.k_j - lse_i) - [j == positives[i]]) * scale,
 * grad_q = G k and grad_k = G^T q. */
typedef struct ContraInfonceBwdParams {
    const void* owner;
    const void* other;
    const int* positives;
    const float* lse;
    void* grad_owner;
    int owner_rows;
    int other_rows;
    int dim;
    int self_mask;
    int owner_is_query;
    int accumulate; /* add to grad_owner instead of overwriting it (NT-Xent: dz = dq + dk) */
    float scale;
    float grad_scale;
} ContraInfonceBwdParams;

#ifdef __cplusplus
}
#endif

#endif
