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

/* normalize_fwd: y = x / max(||x||, eps) per row; y has x's type.
 * normalize_bwd: grad_x = (grad_y - y (y . grad_y)) / max(||x||, eps); grad_y and grad_x are f32
 * in every instantiation (the kernel's type suffix is the type of x). */
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
 * loss asks for cosine similarity. MoCo: `positives` is NULL and `extra_key` (rows x dim) adds
 * the logit scale * q_i . extra_key_i to row i's softmax and makes it the target. */
typedef struct ContraInfonceFwdParams {
    const void* q;
    const void* k;
    const int* positives;  /* may be NULL: no positive among the keys */
    const void* extra_key; /* may be NULL */
    /* SupCon: with `labels` (one per row; q and k are the same rows) the positives of row i are
     * the other rows with its label, each weighted target_weight[i] = 1 / |P(i)| (0: no positive,
     * and the row's loss is 0). `positives` is then NULL. */
    const int* labels;
    const float* target_weight;
    /* Columns' softmax states (cols entries, each a packed {running max, running sum} pair of
     * floats, initialised to {-inf, 0}; log2 units: the natural lse is (max + log2(sum)) ln 2)
     * and target logit sums (log2 units, zeros on entry), folded in with a compare-and-swap and
     * an atomic add per block and column. CLIP: col_state is its column softmax (col_target
     * NULL). Symmetric forward (NT-Xent, SupCon: q and k are the same rows): each unordered pair
     * of 64-row tiles is computed once and folded into the statistics of both its row tile and
     * its column tile, so the columns are rows too: col_state and col_target are row_state and
     * row_target. NULL otherwise. */
    unsigned long long* col_state;
    int symmetric;
    float* col_target;
    /* Rows whose statistics several blocks add to (a symmetric sweep, a key split): each row's
     * state and target sum, as col_state and col_target (rows entries), merged there;
     * infonce_finish turns them into lse and row_loss. NULL when each block writes its rows'
     * lse and row_loss itself. */
    unsigned long long* row_state;
    float* row_target;
    float* lse;
    float* row_loss;
    int rows;
    int cols;
    int dim;
    int self_mask;
    float scale;
    /* CLIP's learnable scalar left on the device: when not NULL, the logit scale is
     * exp(*log_scale) and `scale` is unused. */
    const float* log_scale;
    /* Key split, 0 for none: block (x, y) sweeps range y of split_tiles of row tile x's key
     * tiles (KeyTiles in infonce_rows.cuh); the rows' states go to row_state / row_target, and
     * only blocks with y = 0 add extra_key's logit. MoCo's queue (infonce_fwd_split, not with
     * symmetric or a column softmax: no range empty), and against the wave tail any other
     * forward (a symmetric sweep's half-rows; the last range of a shorter one may be empty). */
    int split_tiles;
} ContraInfonceFwdParams;

/* infonce_bwd: the gradients, in one pass over blocks of 64 query rows. With
 * G_ij = grad_scale * (exp(scale q_i.k_j - lse_i) - [j == positives[i]]) * scale,
 * grad_q = G k (written) and grad_k = G^T q (added with atomic adds when grad_k is not NULL). */
typedef struct ContraInfonceBwdParams {
    const void* q;
    const void* k;
    const int* positives; /* may be NULL: no positive among the keys */
    const int* labels;           /* SupCon, as in ContraInfonceFwdParams; may be NULL */
    const float* target_weight;  /* with labels: 1 / |P(i)|, 0 for a row without positives */
    const float* lse;
    /* CLIP: the column log-sum-exp; then G also gets exp(logit - col_lse[j]) - [j == p_i], and
     * log_scale_partial[y * gridDim.x + x] receives sum of G_ij logit_ij / scale over block
     * (x, y)'s rows and keys. Both may be NULL. */
    const float* col_lse;
    float* log_scale_partial;
    /* CLIP with log_scale_partial: q_i . k_i per row. Each softmax's share of the log_scale sum
     * is taken against its own target's logit (row i: q_i . k_i, column j: q_j . k_j), which
     * changes only the rounding: the uncentred sum cancels catastrophically when logits cluster. */
    const float* diag_dot;
    float* grad_q;
    /* May be NULL (MoCo: the keys get no gradient; symmetric losses). Otherwise f32, cols x dim,
     * holding zeros (or the values to add to). */
    float* grad_k;
    int rows;
    int cols;
    int dim;
    int self_mask;
    /* q and k are the same rows (NT-Xent, SupCon): the logits are symmetric, so grad_q receives
     * dz = (G + G^T) z, with G_ij and G_ji taken from the one recomputed logit. */
    int symmetric;
    float scale;
    float grad_scale;
    /* As in ContraInfonceFwdParams: when not NULL, the logit scale is exp(*log_scale). */
    const float* log_scale;
    /* Key split (MoCo's queue; rows too few to fill the card): block (x, y) takes key tiles
     * y * split_tiles .. (y + 1) * split_tiles - 1 (none empty) and adds its share of grad_q
     * atomically (zeros on entry). 0: each block sweeps all keys and writes its rows of grad_q. */
    int split_tiles;
} ContraInfonceBwdParams;

/* infonce_extra_bwd: the gradient through MoCo's extra (positive) logit, added to grad_q:
 * grad_q_i += grad_scale * scale * (exp(scale q_i . extra_key_i - lse_i) - 1) * extra_key_i. */
typedef struct ContraInfonceExtraBwdParams {
    const void* q;
    const void* extra_key;
    const float* lse;
    float* grad_q;
    int rows;
    int dim;
    float scale;
    float grad_scale;
} ContraInfonceExtraBwdParams;

/* infonce_row_dot: out[i] = a_i . b_i for each of the rows (CLIP's diagonal dot products). */
typedef struct ContraRowDotParams {
    const void* a;
    const void* b;
    float* out;
    int rows;
    int dim;
} ContraRowDotParams;

/* margin_fwd: per pair row i, row_loss[i] = d_i * 2^-64, the clamped distance
 * d_i = sqrt(max(||x1_i - x2_i||^2, eps)) scaled so that it cannot overflow; the host forms
 * d_i^2 / 2 (y[i] == 0, similar) or relu(margin - d_i)^2 / 2 (y[i] == 1, dissimilar) in f64.
 * margin_bwd: grad_x1_i = grad_scale * c_i (x1_i - x2_i) and grad_x2_i = -grad_x1_i, with c_i = 1
 * (similar), -relu(margin - d_i) / d_i (dissimilar), and 0 where the clamp is active. */
typedef struct ContraMarginParams {
    const void* x1;
    const void* x2;
    const int* y;
    float* row_loss; /* forward only */
    void* grad_x1;   /* backward only */
    void* grad_x2;   /* backward only */
    int rows;
    int dim;
    float margin;
    float eps;
    float grad_scale; /* backward only: grad_loss / rows (with pml_scales: grad_loss) */
    /* pml: pytorch-metric-learning's ContrastiveLoss instead: the forward writes 0 for a
     * clamped pair; the backward's c_i is pml_scales[0] / d_i (similar, unclamped) or
     * -pml_scales[1] / d_i (dissimilar, d_i < margin), from margin_pml_finish. */
    int pml;
    const double* pml_scales;
} ContraMarginParams;

/* margin_pml_finish (one block): over the pairs' distances dist[i] 2^dist_exp, the similar
 * pairs with d > 0 (n0 of them, sum s0) and the dissimilar ones with margin - d > 0 (n1, sum
 * s1 of margin - d); scales = {1 / n0, 1 / n1} (0 for an empty group) and, when `out` is given,
 * the loss s0 / n0 + s1 / n1 laid out like loss_finish's, with the `slots` status words. */
typedef struct ContraMarginFinishParams {
    const float* dist;
    const int* y;
    const int* status;
    unsigned* out;
    double* scales;
    int rows;
    int slots;
    int dist_exp;
    double margin;
} ContraMarginFinishParams;

/* nce_fwd: per row b, with delta = s - log_k - logq,
 * row_loss[b] = softplus(-delta_pos_b) + sum_j softplus(delta_neg_bj).
 * nce_bwd: grad_s_pos[b] = -grad_scale * sigmoid(-delta_pos_b),
 * grad_s_neg[b, j] = grad_scale * sigmoid(delta_neg_bj). s_neg and logq_neg are rows x k. */
typedef struct ContraNceParams {
    const void* s_pos;
    const void* s_neg;
    const void* logq_pos;
    const void* logq_neg;
    float* row_loss;  /* forward only */
    void* grad_s_pos; /* backward only */
    void* grad_s_neg; /* backward only */
    int rows;
    int k;
    float log_k;
    float grad_scale; /* backward only: grad_loss / rows */
} ContraNceParams;

/* momentum_update: theta_k[i] = m theta_k[i] + one_minus_m theta_q[i] in place, for i < len.
 * `len` is 64-bit: the buffer is often a whole flattened parameter vector. */
typedef struct ContraMomentumParams {
    void* theta_k;
    const void* theta_q;
    long long len;
    float m;
    float one_minus_m;
} ContraMomentumParams;

/* The optimizers' in-place updates of one f32 parameter tensor of `len` elements (kernels/optim.cu),
 * in the host optimizers' exact f32 arithmetic:
 * optim_sgd: g = grad + weight_decay value, state0 = momentum state0 + g,
 *   value -= lr (nesterov ? g + momentum state0 : state0).
 * optim_lars_norms (one block): norms = {sum value^2, sum g^2} in double, g = grad + weight_decay value.
 * optim_lars: lr' = lr trust sqrt(norms[0] / norms[1]) when `norms` is given and both are
 *   positive (else lr); state0 = momentum state0 + lr' g, value -= state0.
 * optim_adamw: value *= shrink, state0 = beta1 state0 + one_minus_beta1 grad,
 *   state1 = beta2 state1 + one_minus_beta2 grad^2,
 *   value -= step_size state0 / (sqrt(state1) / bc2_sqrt + eps).
 * optim_accumulate: value += grad (a gradient added into another). */
typedef struct ContraOptimParams {
    float* value;
    const float* grad;
    float* state0;
    float* state1;
    double* norms;
    long long len;
    float lr;
    float momentum;
    float weight_decay;
    float trust;
    float beta1;
    float beta2;
    float one_minus_beta1;
    float one_minus_beta2;
    float eps;
    float step_size;
    float shrink;
    int nesterov;
    double bc2_sqrt;
} ContraOptimParams;

/* queue_enqueue: queue row (ptr + i) mod queue_len = k_i / max(||k_i||, eps) for the last
 * min(rows, queue_len) key rows i (with rows > queue_len the last keys win); other queue rows are
 * left as they are. */
typedef struct ContraQueueParams {
    const void* k;
    void* queue;
    int rows;
    int queue_len;
    int dim;
    int ptr;
    float eps;
} ContraQueueParams;

/* Triplet distances and minings. */
enum ContraTripletDistance {
    CONTRA_TRIPLET_EUCLIDEAN = 0,
    CONTRA_TRIPLET_SQUARED_EUCLIDEAN = 1,
    CONTRA_TRIPLET_COSINE = 2
};
enum ContraTripletMining {
    CONTRA_TRIPLET_BATCH_ALL = 0,
    CONTRA_TRIPLET_BATCH_HARD = 1,
    CONTRA_TRIPLET_SEMI_HARD = 2,
    CONTRA_TRIPLET_SEMI_HARD_ALL = 3
};

/* The words of a triplet call's summary (u64 each, low word first): what triplet_finish counts,
 * and the largest squared row norm (the bits of a nonnegative double; 0 before triplet_row_norms
 * raises it) that sets the row scale 2^-k of the euclidean distances: k = 0 while the largest
 * row norm is below 2^40, else frexp's exponent of that norm minus 40. */
enum ContraTripletSummary {
    CONTRA_SUMMARY_COUNT = 0,
    CONTRA_SUMMARY_HARD = 1,
    CONTRA_SUMMARY_SEMI_HARD = 2,
    CONTRA_SUMMARY_EASY = 3,
    CONTRA_SUMMARY_MAX_SQ_NORM = 4,
    CONTRA_SUMMARY_LEN = 5
};

/* triplet_row_norms: raises summary[MAX_SQ_NORM] to the largest squared row norm of x (rows x
 * dim, f32; summed in double). triplet_scale_rows: out = x 2^-k (f32, rows x dim), k read from
 * the summary. */
typedef struct ContraTripletScaleParams {
    const float* x;
    float* out;
    unsigned long long* summary;
    int rows;
    int dim;
} ContraTripletScaleParams;

/* triplet_mine: one block per anchor a over `raw` (rows x rows): squared distances of the rows
 * scaled by 2^-k (k from the summary), or for the cosine distance cosine similarities. The margin
 * and the euclidean clamp (dist = sqrt(max(raw, eps)), derivative 0 below eps) are scaled alike.
 * Writes coef row a: d(anchor terms) / d raw(a, j), i.e. the number of times d(a, j) occurs with
 * + (positives) or - (negatives) in the anchor's active relu terms times d dist / d raw;
 * anchor_sum[a], the sum of those terms; anchor_count[2a] and [2a + 1], the anchor's mined terms
 * and those of them that are positive; anchor_stats[3a..3a+3], its hard, semi-hard and easy
 * triplets. */
typedef struct ContraTripletMineParams {
    const float* raw;
    const int* labels;
    const unsigned long long* summary;
    float* coef;
    float* anchor_sum;
    unsigned int* anchor_count;
    unsigned int* anchor_stats;
    int rows;
    int distance;
    int mining;
    double margin; /* in the rows' own units */
    double eps;    /* in the rows' own units */
} ContraTripletMineParams;

/* triplet_finish (one block): sums the anchors' values in double and counts in u64 in a fixed
 * order (the count: their positive terms when nonzero_only, else every mined term); writes the
 * summary's counts and, like loss_finish, out[0..2) = the loss
 * (sum / count 2^(k p), 0 without a triplet; p = 2 for the squared euclidean distance, else 1),
 * out[2 + i] = status[i] for i < slots and out[2 + slots] = the loss's own status. */
typedef struct ContraTripletFinishParams {
    const float* anchor_sum;
    const unsigned int* anchor_count;
    const unsigned int* anchor_stats;
    const int* status;
    unsigned long long* summary;
    unsigned* out;
    int rows;
    int slots;
    int power;
    int nonzero_only;
} ContraTripletFinishParams;

/* triplet_bwd: with y = x 2^-k (euclidean) or y = x (cosine: x is then the normalized rows),
 * S = coef + coef^T (rows x rows), s_r = sum_o S_ro and p_r = sum_o S_ro y_o,
 * out_r = g 2 (s_r y_r - p_r) for the euclidean distances and out_r = g p_r for the cosine
 * distance (the caller chains the normalize backward), g = grad_loss 2^(k (power - 1)), divided
 * by the summary's count when `summary` is given (a kernel forward's coefficients, with k from
 * the summary); without it the coefficients are final and k is `k`. */
typedef struct ContraTripletBwdParams {
    const float* x;
    const float* coef;
    const unsigned long long* summary; /* may be NULL */
    float* out;
    int rows;
    int dim;
    int cosine;
    int power;
    int k;
    double grad_loss;
} ContraTripletBwdParams;

/* ---- The trainer's encoder layers (kernels/nn.cu). Matrices are row-major f32. ---- */

/* nn_gemm: c = alpha * op(a) * op(b) + beta * c, with op(a) m x k, op(b) k x n and c m x n.
 * lda / ldb / ldc are the row strides of the stored matrices; trans_a / trans_b nonzero means
 * the stored matrix is the transpose of the operand (a stored k x m, b stored n x k). With
 * beta == 0, c is not read (it may hold garbage). The fallback of the cuBLAS GEMM. */
typedef struct ContraGemmParams {
    const float* a;
    const float* b;
    float* c;
    int m;
    int n;
    int k;
    int lda;
    int ldb;
    int ldc;
    int trans_a;
    int trans_b;
    float alpha;
    float beta;
} ContraGemmParams;

/* nn_bias_relu: y[i, j] = x[i, j] + bias[j] (bias may be null), then max(., 0) when relu is
 * nonzero (NaN stays NaN). In place (y == x) is allowed. */
typedef struct ContraBiasReluParams {
    const float* x;
    const float* bias;
    float* y;
    int rows;
    int cols;
    int relu;
} ContraBiasReluParams;

/* nn_relu_bwd: dx = dy where y > 0, else 0 (y is the ReLU's output). */
typedef struct ContraReluBwdParams {
    const float* y;
    const float* dy;
    float* dx;
    long long len;
} ContraReluBwdParams;

/* nn_column_sum: out[j] = sum_i x[i, j] (a bias gradient), accumulated in double. */
typedef struct ContraColumnSumParams {
    const float* x;
    float* out;
    int rows;
    int cols;
} ContraColumnSumParams;

/* nn_batchnorm_fwd, one thread per feature (column). train: batch mean and biased variance
 * (two passes, double), inv_std = 1 / sqrt(var + eps), and the running statistics updated in
 * place as (1 - momentum) * running + momentum * batch (unbiased variance, rows >= 2);
 * eval: the running statistics. x_hat = (x - mean) * inv_std, y = weight * x_hat + bias
 * (weight and bias both null without affine). */
typedef struct ContraBatchNormFwdParams {
    const float* x;
    const float* weight;
    const float* bias;
    float* y;
    float* x_hat;
    float* inv_std;
    float* running_mean;
    float* running_var;
    int rows;
    int cols;
    int train;
    float eps;
    float momentum;
} ContraBatchNormFwdParams;

/* nn_batchnorm_bwd, one thread per feature: with g = dy * weight (weight null: 1),
 * train: dx = inv_std / n * (n g - sum g - x_hat sum(g x_hat)); eval: dx = g inv_std.
 * grad_weight[j] = sum dy x_hat and grad_bias[j] = sum dy (both written, not accumulated; null
 * without affine). Sums in double. */
typedef struct ContraBatchNormBwdParams {
    const float* dy;
    const float* x_hat;
    const float* inv_std;
    const float* weight;
    float* dx;
    float* grad_weight;
    float* grad_bias;
    int rows;
    int cols;
    int train;
} ContraBatchNormBwdParams;

/* ---- The unfused GPU baseline of the benchmarks (kernels/baseline.cu): PyTorch eager's
 * kernel sequence after the logits GEMM, over a materialized rows x cols matrix. ---- */

/* baseline_log_softmax (one block per row): logits[i, j] <- logits[i, j] - logsumexp_j, in
 * place; with self_mask the diagonal j == i is excluded (written as -inf).
 * baseline_nll (one thread per row): loss_rows[i] = -logits[i, targets[i]] (log-probabilities).
 * baseline_nll_grad (elementwise, in place): logits[i, j] <- grad_scale * (exp(logits[i, j]) -
 * [j == targets[i]]), the gradient of the mean loss with respect to the logits when grad_scale
 * is 1 / rows. */
typedef struct ContraBaselineParams {
    float* logits;
    const int* targets;
    float* loss_rows;
    int rows;
    int cols;
    int self_mask;
    float grad_scale;
} ContraBaselineParams;

/* clip_columns (one thread per row / column i < rows): col_lse[i] = the natural log-sum-exp of
 * column i from its packed {max, sum} state in log2 units (see ContraInfonceFwdParams), and
 * row_value[i] = 2 row_loss[i] + col_lse[i] - row_lse[i], whose sum over 2 rows is CLIP's loss
 * (row_lse[i] - row_loss[i] is the diagonal logit). */
typedef struct ContraClipColumnsParams {
    const unsigned long long* col_state;
    const float* row_lse;
    const float* row_loss;
    float* col_lse;
    float* row_value;
    int rows;
} ContraClipColumnsParams;

/* siglip_sweep: SigLIP's pairwise sigmoid loss over the tiles of a b^T (rows x cols, never
 * materialized), one block per 64 rows of a. logit_ij = scale s_ij + bias with s_ij = a_i . b_j
 * (a and b already normalized for the cosine form); scale = exp(*log_scale) when log_scale is
 * set, else `scale`; bias = *bias_value when set, else `bias`. Writes row_loss[i] =
 * sum_j softplus(-z_ij logit_ij) (z = +1 on the diagonal when `positives`, -1 elsewhere). With
 * grad_a set (the backward), also G_ij = grad_weight (sigmoid(logit_ij) - [z_ij = +1]): grad_a = scale G b
 * (overwritten), grad_b += scale G^T a (atomic; zeroed by the caller), and per block
 * log_scale_partial[block] = sum G_ij scale s_ij, bias_partial[block] = sum G_ij (block
 * y * gridDim.x + x under a key split). */
typedef struct ContraSiglipParams {
    const void* a;
    const void* b;
    const float* log_scale; /* may be NULL */
    const float* bias_value; /* may be NULL */
    float* row_loss;
    float* grad_a; /* NULL: the loss only */
    float* grad_b;
    float* log_scale_partial;
    float* bias_partial;
    int rows;
    int cols;
    int positives; /* 0: every pair is a negative (b another shard's block, cols rows) */
    int dim;
    float scale;
    float bias;
    float grad_weight;
    /* Key split, 0 for none: block (x, y) takes column tiles y * split_tiles ..
     * (y + 1) * split_tiles - 1 (none empty) of row tile x, and adds its rows' shares of row_loss
     * and grad_a atomically (both zeros on entry); the partials are per block, at
     * y * gridDim.x + x. */
    int split_tiles;
} ContraSiglipParams;

/* nonfinite_rows: status[slot] = min(status[slot], r) for the first row r of x (`row_len`
 * elements per row, `len` elements in all) holding a NaN or an infinity; status[slot] is left
 * as it is when every element is finite. x has the kernel's type (f32, bf16, f16). */
typedef struct ContraScanParams {
    const void* x;
    int* status;
    long long len;
    long long row_len;
    int slot;
} ContraScanParams;

/* index_scan: lowers status[slot] to the first i < len whose values[i] (i32) lies outside
 * [lo, hi), or equals i when forbid_self (a positive that is the query's own masked key). */
typedef struct ContraIndexScanParams {
    const int* values;
    int* status;
    long long len;
    long long lo;
    long long hi;
    int forbid_self;
    int slot;
} ContraIndexScanParams;

/* class_weights (SupCon, one thread per sample i of n): with `views` views per sample, row
 * r = i views + v gets row_labels[r] = labels[i] and row_weights[r] = 1 / |P(r)| (f32 of the
 * double; 0 without positives), |P(r)| = views * #{j : labels[j] = labels[i]} - 1. */
typedef struct ContraClassWeightsParams {
    const int* labels;
    int* row_labels;
    float* row_weights;
    int n;
    int views;
} ContraClassWeightsParams;

/* loss_finish (one block): out[0..2) = the bits of the double sum(v_i, i < n) / divisor (low
 * word first), out[2 + i] = status[i] for i < slots, and out[2 + slots] = the loss's own status
 * (INT_MAX when finite, 0 when not). v_i = values[i]; with `labels` (the margin loss) values[i]
 * is a pair's distance times 2^-dist_exp and v_i = d^2 / 2 (label 0) or relu(margin - d)^2 / 2
 * (label 1) with d = values[i] 2^dist_exp, in double (no overflow for any f32 distance). */
typedef struct ContraLossParams {
    const float* values;
    const int* status;
    unsigned* out;
    const int* labels; /* may be NULL */
    int n;
    int slots;
    int dist_exp;
    double divisor;
    double margin;
} ContraLossParams;

/* fill_words: out[i] = pattern[i % period] for i < len (period 1 to 4).
 * index_ring: out[i] = (i + shift) % len as int (len <= 2^31 - 1). */
typedef struct ContraFillParams {
    unsigned* out;
    long long len;
    unsigned pattern[4];
    int period;
    int shift;
} ContraFillParams;

/* swap_row_blocks (f32): `in` is outer x inner rows of `dim` floats; out row (j * outer + i) =
 * in row (i * inner + j): the first two axes of an (outer, inner, dim) array swapped (views and
 * samples of a SupCon batch). */
typedef struct ContraSwapParams {
    const float* in;
    float* out;
    int outer;
    int inner;
    int dim;
} ContraSwapParams;

/* The two halves of a batch of two views (32-bit words, `len` per half):
 * split_halves: first[i] = whole[i], second[i] = whole[len + i] for i < len;
 * join_halves: whole[i] = first[i] for i < len, whole[len + i] = second[i]. */
typedef struct ContraHalvesParams {
    unsigned* whole;
    unsigned* first;
    unsigned* second;
    long long len;
} ContraHalvesParams;

/* cast_from_f32_{f32,bf16,f16}: out[i] = in[i] (f32) rounded to the suffix's type;
 * cast_to_f32_{f32,bf16,f16}: out[i] (f32) = in[i] of the suffix's type;
 * cast_f64_to_f32 and cast_f32_to_f64 as named; i < len. */
typedef struct ContraCastParams {
    const void* in;
    void* out;
    long long len;
} ContraCastParams;

#ifdef __cplusplus
}
#endif

#endif
