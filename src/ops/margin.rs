//! The contrastive margin loss of Hadsell, Chopra and LeCun (2006): pairs `x1, x2`, `y = 0`
//! similar, `y = 1` dissimilar, `d = sqrt(max(||x1 - x2||^2, 1e-12))`,
//! `loss = mean((1 - y) d^2 / 2 + y relu(m - d)^2 / 2)`.

use crate::{Result, Tensor};

/// Options of [`margin_loss`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MarginOptions {
    /// Margin `m >= 0` dissimilar pairs are pushed beyond.
    pub margin: f64,
}

impl Default for MarginOptions {
    fn default() -> Self {
        MarginOptions { margin: 1.0 }
    }
}

/// Loss and gradients of [`margin_loss`].
#[derive(Clone, Debug)]
pub struct MarginOutput {
    pub loss: f64,
    pub grad_x1: Tensor,
    pub grad_x2: Tensor,
}

/// The mean margin loss (forward only).
pub fn margin_forward(x1: &Tensor, x2: &Tensor, y: &[i64], opts: &MarginOptions) -> Result<f64> {
    let _ = (x1, x2, y, opts);
    todo!()
}

/// Gradients of `grad_loss * loss` with respect to x1 and x2.
pub fn margin_backward(x1: &Tensor, x2: &Tensor, y: &[i64], opts: &MarginOptions, grad_loss: f64) -> Result<(Tensor, Tensor)> {
    let _ = (x1, x2, y, opts, grad_loss);
    todo!()
}

/// Margin loss and gradients in one call.
pub fn margin_loss(x1: &Tensor, x2: &Tensor, y: &[i64], opts: &MarginOptions) -> Result<MarginOutput> {
    let _ = (x1, x2, y, opts);
    todo!()
}
