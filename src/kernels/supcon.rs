//! Launch sequence of SupCon: the N·V views normalized by the normalize kernel, then the fused
//! InfoNCE kernels in label mode (positives = the other views with the anchor's label), self
//! excluded; one symmetric backward pass (the logits of the views with themselves are symmetric),
//! then the normalize backward.

use super::infonce::{fused_forward, BackwardPass, Softmax};
use super::{normalize, Backend};
use crate::Result;

/// One SupCon problem over `rows = N·V` flattened views (`rows x dim`).
pub(crate) struct SupCon<'a, B: Backend> {
    pub views: &'a B::Buf,
    /// The class of each view (i32).
    pub labels: &'a B::Buf,
    /// `1 / |P(a)|` per view (f32), 0 for an anchor without positives.
    pub target_weight: &'a B::Buf,
    pub rows: usize,
    /// The count the loss's sum is divided by (before the temperature ratio): the N·V rows, or
    /// the anchors with a positive; infinite for a loss that is 0.
    pub anchors: f64,
    pub dim: usize,
    pub temperature: f64,
    pub base_temperature: f64,
}

impl<B: Backend> SupCon<'_, B> {
    fn scale(&self) -> f32 {
        (1.0 / self.temperature) as f32
    }

    fn softmax<'s>(&'s self, zn: &'s B::Buf) -> Softmax<'s, B::Buf> {
        Softmax {
            q: zn,
            k: zn,
            positives: None,
            labels: Some((self.labels, self.target_weight)),
            col_lse: None,
            log_scale: None,
            symmetric: true,
            split_keys: false,
            rows: self.rows,
            cols: self.rows,
            dim: self.dim,
        }
    }

    /// The loss `(tau / base_tau) * mean_a loss_a` and the per-anchor log-sum-exp.
    pub fn forward(&self, b: &B) -> Result<(B::Buf, B::Buf)> {
        let zn = normalize::forward(b, self.views, self.rows, self.dim)?;
        fused_forward(b, self.softmax(&zn), self.scale(), true, None, None)
    }

    /// What the sum of the per-row losses is divided by: the loss is their mean over the
    /// anchors counted, scaled by `temperature / base_temperature`.
    pub fn divisor(&self) -> f64 {
        self.anchors * self.base_temperature / self.temperature
    }

    /// The gradient of `grad_loss * loss` with respect to the views.
    pub fn backward(&self, b: &B, lse: &B::Buf, grad_loss: f64) -> Result<B::Buf> {
        let zn = normalize::forward(b, self.views, self.rows, self.dim)?;
        let softmax = self.softmax(&zn);
        let grad_scale =
            (grad_loss * self.temperature / self.base_temperature / self.anchors) as f32;
        let pass = BackwardPass {
            lse,
            scale: self.scale(),
            grad_scale,
            self_mask: true,
        };
        let grad = pass.symmetric(b, &softmax)?;
        normalize::backward(b, self.views, &grad, self.rows, self.dim)
    }
}
