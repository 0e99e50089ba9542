//! CLIP: symmetric InfoNCE with a learnable temperature.
//! `logits = exp(log_scale) * cos(a_i, b_j)`, `loss = (CE(logits, diag) + CE(logits^T, diag)) / 2`.

use crate::{Result, Tensor};

/// What the backward needs: the row and column log-sum-exp (N values each).
#[derive(Clone, Debug)]
pub struct ClipSaved {
    pub row_lse: Tensor,
    pub col_lse: Tensor,
}

/// Loss and saved state of [`clip_forward`].
#[derive(Clone, Debug)]
pub struct ClipForward {
    pub loss: f64,
    pub saved: ClipSaved,
}

/// Gradients of the CLIP loss.
#[derive(Clone, Debug)]
pub struct ClipGrads {
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    pub grad_log_scale: f64,
}

/// Loss and gradients of [`clip`].
#[derive(Clone, Debug)]
pub struct ClipOutput {
    pub loss: f64,
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    pub grad_log_scale: f64,
}

/// Forward of the CLIP loss for paired embeddings `a`, `b` (N x D each).
pub fn clip_forward(a: &Tensor, b: &Tensor, log_scale: f64) -> Result<ClipForward> {
    let _ = (a, b, log_scale);
    todo!()
}

/// Backward of the CLIP loss: gradients of `grad_loss * loss`.
pub fn clip_backward(a: &Tensor, b: &Tensor, log_scale: f64, saved: &ClipSaved, grad_loss: f64) -> Result<ClipGrads> {
    let _ = (a, b, log_scale, saved, grad_loss);
    todo!()
}

/// CLIP loss and gradients in one call.
pub fn clip(a: &Tensor, b: &Tensor, log_scale: f64) -> Result<ClipOutput> {
    let _ = (a, b, log_scale);
    todo!()
}
