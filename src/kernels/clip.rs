//! Launch sequence of CLIP: a and b normalized; one sweep of the fused InfoNCE forward over the
//! tiles of `exp(log_scale) a' b'^T` yields the row log-sum-exp and, through a per-column
//! compare-and-swap state, the column log-sum-exp; the one-pass backward uses both softmaxes
//! and also returns the gradient of `log_scale`.

use super::infonce::{empty_lse_states, fused_forward, row_dots, BackwardPass, Softmax};
use super::params::ContraClipColumnsParams;
use super::{blocks_for, extent, handles, normalize, Backend, Launch, ScalarArg};
use crate::Result;

/// One CLIP problem: paired rows of a and b (rows x dim), raw.
pub(crate) struct Clip<'a, B: Backend> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    /// `i -> i` (i32): the positive of row i is column i.
    pub diagonal: &'a B::Buf,
    pub rows: usize,
    pub dim: usize,
    /// The learnable log of the logit scale: a value, or one f32 on the device.
    pub log_scale: ScalarArg<'a, B::Buf>,
}

/// What the forward leaves on the device.
pub(crate) struct ClipForward<Buf> {
    /// Per-row shares of the loss: the loss is their sum over `2 rows`.
    pub row_value: Buf,
    pub row_lse: Buf,
    pub col_lse: Buf,
}

impl<B: Backend> Clip<'_, B> {
    /// The logit scale passed by value (unused when the log-scale is on the device).
    fn scale(&self) -> f32 {
        self.log_scale.passed(f64::exp, 1.0)
    }

    fn device_log_scale(&self) -> Option<&B::Buf> {
        self.log_scale.device()
    }

    fn normalized(&self, b: &B) -> Result<(B::Buf, B::Buf)> {
        Ok((
            normalize::forward(b, self.a, self.rows, self.dim)?,
            normalize::forward(b, self.b, self.rows, self.dim)?,
        ))
    }

    fn softmax<'s>(
        &'s self,
        an: &'s B::Buf,
        bn: &'s B::Buf,
        col_lse: Option<&'s B::Buf>,
    ) -> Softmax<'s, B::Buf> {
        Softmax {
            q: an,
            k: bn,
            positives: Some(self.diagonal),
            labels: None,
            col_lse,
            log_scale: self.device_log_scale(),
            symmetric: false,
            split_keys: false,
            rows: self.rows,
            cols: self.rows,
            dim: self.dim,
        }
    }

    /// The loss `(CE(logits, diag) + CE(logits^T, diag)) / 2` (as per-row shares) and both
    /// log-sum-exps.
    pub fn forward(&self, b: &B) -> Result<ClipForward<B::Buf>> {
        let (an, bn) = self.normalized(b)?;
        let col_state = empty_lse_states(b, self.rows)?;
        let (row_loss, row_lse) = fused_forward(
            b,
            self.softmax(&an, &bn, None),
            self.scale(),
            false,
            None,
            Some(&col_state),
        )?;
        let col_lse = b.output("col_lse", self.rows)?;
        let row_value = b.output("row_value", self.rows)?;
        let params = ContraClipColumnsParams {
            col_state: b.ptr(&col_state).cast(),
            row_lse: b.ptr(&row_lse).cast(),
            row_loss: b.ptr(&row_loss).cast(),
            col_lse: b.ptr(&col_lse).cast(),
            row_value: b.ptr(&row_value).cast(),
            rows: extent("rows", self.rows)?,
        };
        b.launch(
            handles::CLIP_COLUMNS,
            Launch::linear(blocks_for(self.rows, 256), 256),
            &params,
            &[&col_lse, &row_value],
        )?;
        Ok(ClipForward {
            row_value,
            row_lse,
            col_lse,
        })
    }

    /// What the sum of the per-row shares is divided by.
    pub fn divisor(&self) -> f64 {
        2.0 * self.rows as f64
    }

    /// Gradients of `grad_loss * loss` with respect to a and b, and the per-block partials of
    /// the gradient of `log_scale` (it is their sum).
    pub fn backward(
        &self,
        b: &B,
        row_lse: &B::Buf,
        col_lse: &B::Buf,
        grad_loss: f64,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let (an, bn) = self.normalized(b)?;
        let softmax = self.softmax(&an, &bn, Some(col_lse));
        let grad_scale = (grad_loss / (2 * self.rows) as f64) as f32;
        let diag_dot = row_dots(b, &an, &bn, self.rows, self.dim)?;
        let pass = BackwardPass {
            lse: row_lse,
            scale: self.scale(),
            grad_scale,
            self_mask: false,
        };
        let (grad_an, grad_bn, partial) = pass.both_sides_and_log_scale(b, &softmax, &diag_dot)?;
        Ok((
            normalize::backward(b, self.a, &grad_an, self.rows, self.dim)?,
            normalize::backward(b, self.b, &grad_bn, self.rows, self.dim)?,
            partial,
        ))
    }
}
