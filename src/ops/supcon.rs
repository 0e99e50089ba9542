//! Supervised contrastive loss (Khosla et al., contrast_mode "all"): features N x V x D,
//! normalized inside; every view is an anchor; positives are the other views with its label.

use super::infonce::{SoftmaxForward, SoftmaxSaved};
use crate::{Result, Tensor};

/// Options of [`supcon`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SupConOptions {
    pub temperature: f64,
    /// The loss is scaled by `temperature / base_temperature`.
    pub base_temperature: f64,
}

impl Default for SupConOptions {
    fn default() -> Self {
        SupConOptions { temperature: 0.07, base_temperature: 0.07 }
    }
}

/// Loss and gradient of [`supcon`].
#[derive(Clone, Debug)]
pub struct SupConOutput {
    pub loss: f64,
    pub grad_features: Tensor,
}

/// SupCon forward: the mean loss over the N·V anchors and the per-anchor log-sum-exp.
pub fn supcon_forward(features: &Tensor, labels: &[i64], opts: &SupConOptions) -> Result<SoftmaxForward> {
    let _ = (features, labels, opts);
    todo!()
}

/// SupCon backward: the gradient of `grad_loss * loss` with respect to the features.
pub fn supcon_backward(
    features: &Tensor,
    labels: &[i64],
    opts: &SupConOptions,
    saved: &SoftmaxSaved,
    grad_loss: f64,
) -> Result<Tensor> {
    let _ = (features, labels, opts, saved, grad_loss);
    todo!()
}

/// SupCon loss and gradient in one call.
pub fn supcon(features: &Tensor, labels: &[i64], opts: &SupConOptions) -> Result<SupConOutput> {
    let _ = (features, labels, opts);
    todo!()
}
