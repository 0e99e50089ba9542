//! Noise-contrastive estimation (Gutmann & Hyvärinen; Mnih & Teh): data scores `s_pos` (B),
//! noise scores `s_neg` (B x k), noise log-probabilities `logq_pos` (B), `logq_neg` (B x k);
//! `delta = s - log k - logq`, `loss = mean_b [ softplus(-delta_pos) + sum_j softplus(delta_neg_j) ]`.

use crate::{Result, Tensor};

/// Loss and gradients of [`nce`].
#[derive(Clone, Debug)]
pub struct NceOutput {
    pub loss: f64,
    pub grad_s_pos: Tensor,
    pub grad_s_neg: Tensor,
}

/// The mean NCE loss (forward only).
pub fn nce_forward(s_pos: &Tensor, s_neg: &Tensor, logq_pos: &Tensor, logq_neg: &Tensor) -> Result<f64> {
    let _ = (s_pos, s_neg, logq_pos, logq_neg);
    todo!()
}

/// Gradients of `grad_loss * loss` with respect to `s_pos` and `s_neg`.
pub fn nce_backward(s_pos: &Tensor, s_neg: &Tensor, logq_pos: &Tensor, logq_neg: &Tensor, grad_loss: f64) -> Result<(Tensor, Tensor)> {
    let _ = (s_pos, s_neg, logq_pos, logq_neg, grad_loss);
    todo!()
}

/// NCE loss and gradients in one call.
pub fn nce(s_pos: &Tensor, s_neg: &Tensor, logq_pos: &Tensor, logq_neg: &Tensor) -> Result<NceOutput> {
    let _ = (s_pos, s_neg, logq_pos, logq_neg);
    todo!()
}
