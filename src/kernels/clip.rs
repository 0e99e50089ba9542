//! Launch sequence of CLIP: a and b normalized; one sweep of the fused InfoNCE forward over the
//! tiles of `exp(log_scale) a' b'^T` yields the row log-sum-exp and, through a per-column
//! compare-and-swap state, the column log-sum-exp; the one-pass backward uses both softmaxes
//! and also returns the gradient of `log_scale`.

use super::infonce::{empty_lse_states, fused_forward, row_dots, BackwardPass, Softmax};
use super::{blocks_for, host_sum, normalize, Backend};
use crate::Result;

/// Rows per block of the InfoNCE kernels.
const TILE: usize = 64;

/// One CLIP problem: paired rows of a and b (rows x dim), raw.
pub(crate) struct Clip<'a, B: Backend> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    /// `i -> i` (i32): the positive of row i is column i.
    pub diagonal: &'a B::Buf,
    pub rows: usize,
    pub dim: usize,
    pub log_scale: f64,
}

/// The forward's saved state: row and column log-sum-exp.
pub(crate) struct ClipLse<Buf> {
    pub rows: Buf,
    pub cols: Vec<f32>,
}

impl<B: Backend> Clip<'_, B> {
    fn scale(&self) -> f32 {
        self.log_scale.exp() as f32
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
            symmetric: false,
            rows: self.rows,
            cols: self.rows,
            dim: self.dim,
        }
    }

    /// The loss `(CE(logits, diag) + CE(logits^T, diag)) / 2` and both log-sum-exps.
    pub fn forward(&self, b: &B) -> Result<(f64, ClipLse<B::Buf>)> {
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
        let row_mean = host_sum(b, &row_loss)? / self.rows as f64;
        let state = b.download(&col_state)?;
        // The kernels keep the column states in log2 units.
        let cols: Vec<f32> = state
            .chunks(2)
            .map(|pair| (pair[0] + pair[1].log2()) * std::f32::consts::LN_2)
            .collect();
        // sum_i (row_lse_i - l_ii) = rows * row_mean, and the diagonal logits follow from it:
        // sum_i l_ii = sum_i row_lse_i - rows * row_mean.
        let n = self.rows as f64;
        let row_lse_sum: f64 = b.download(&row_lse)?.iter().map(|&v| v as f64).sum();
        let diagonal_sum = row_lse_sum - n * row_mean;
        let col_lse_sum: f64 = cols.iter().map(|&v| v as f64).sum();
        let loss = (n * row_mean + col_lse_sum - diagonal_sum) / (2.0 * n);
        Ok((
            loss,
            ClipLse {
                rows: row_lse,
                cols,
            },
        ))
    }

    /// Gradients of `grad_loss * loss` with respect to a, b and `log_scale`.
    pub fn backward(
        &self,
        b: &B,
        row_lse: &B::Buf,
        col_lse: &[f32],
        grad_loss: f64,
    ) -> Result<(B::Buf, B::Buf, f64)> {
        let (an, bn) = self.normalized(b)?;
        let col_lse = b.upload("col_lse", col_lse)?;
        let softmax = self.softmax(&an, &bn, Some(&col_lse));
        let grad_scale = (grad_loss / (2 * self.rows) as f64) as f32;
        let partial = b.output("log_scale_partial", blocks_for(self.rows, TILE))?;
        let diag_dot = row_dots(b, &an, &bn, self.rows, self.dim)?;
        let grad_an = b.output("grad_a", self.rows * self.dim)?;
        let grad_bn = b.zeros("grad_b", self.rows * self.dim)?;
        let pass = BackwardPass {
            lse: row_lse,
            scale: self.scale(),
            grad_scale,
            self_mask: false,
            log_scale_partial: Some((&partial, &diag_dot)),
        };
        pass.both_sides(b, &softmax, &grad_an, &grad_bn)?;
        let grad_log_scale: f64 = b.download(&partial)?.iter().map(|&v| v as f64).sum();
        Ok((
            normalize::backward(b, self.a, &grad_an, self.rows, self.dim)?,
            normalize::backward(b, self.b, &grad_bn, self.rows, self.dim)?,
            grad_log_scale,
        ))
    }
}
