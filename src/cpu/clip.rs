//! CLIP (symmetric InfoNCE with a learnable temperature) on the tiled softmax core.
//!
//! `logit_ij = exp(log_scale) * cos(a_i, b_j)`; the row pass is the softmax of `a'` against `b'`,
//! the column pass the softmax of `b'` against `a'` (the transposed logits), both targeting the
//! diagonal. Neither pass builds the N x N logit matrix.

use super::softmax::{self, ClipColumns, Diagonal, Scores};
use super::{normalize, Real};

/// One CLIP problem: paired embeddings `a`, `b` (rows x dim each) and the log of the logit
/// scale. Sizes are validated by the caller.
#[derive(Clone, Copy)]
pub struct Problem<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub rows: usize,
    pub dim: usize,
    pub log_scale: f64,
}

/// Gradients of `grad_loss * loss`.
pub struct Grads<T> {
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub log_scale: f64,
}

impl<T: Real> Problem<'_, T> {
    /// Runs `f` on the row pass's scores (`a'` against `b'`); the column pass's logits are
    /// their transpose.
    fn with_scores<R>(&self, f: impl FnOnce(&Scores<'_, T>) -> R) -> R {
        let an = normalize::forward(self.a, self.dim);
        let bn = normalize::forward(self.b, self.dim);
        f(&Scores {
            queries: &an,
            keys: &bn,
            rows: self.rows,
            cols: self.rows,
            dim: self.dim,
            scale: self.log_scale.exp(),
            self_mask: false,
        })
    }

    /// The loss and the per-row log-sum-exp of the row pass and of the column pass, from one
    /// sweep over the row pass's logits (the column pass's are the same, transposed).
    pub fn forward(&self) -> (f64, Vec<f64>, Vec<f64>) {
        let stats = self.with_scores(|row| softmax::forward(row, None, &Diagonal, true));
        // The column pass's target logits are the same diagonal.
        let total: f64 = stats
            .lse
            .iter()
            .zip(&stats.col_lse)
            .zip(&stats.target_logit)
            .map(|((row, col), t)| (row - t) + (col - t))
            .sum();
        (total / (2 * self.rows) as f64, stats.lse, stats.col_lse)
    }

    /// Gradients of `grad_loss * loss` with respect to `a`, `b` and `log_scale`.
    pub fn backward(&self, row_lse: &[f64], col_lse: &[f64], grad_loss: f64) -> Grads<T> {
        let weight = vec![grad_loss / (2 * self.rows) as f64; self.rows];
        // One sweep over the row pass's logits with both softmaxes: its queries are a', its keys
        // b', and the column pass's gradients are the same products transposed.
        let grads = self.with_scores(|row| {
            let clip = ClipColumns {
                col_lse,
                want_log_scale: true,
            };
            softmax::backward(row, row_lse, Some(clip), &weight, &Diagonal, true)
        });
        let db = grads.keys.unwrap_or_default();
        Grads {
            a: normalize::backward(self.a, &grads.queries, self.dim),
            b: normalize::backward(self.b, &db, self.dim),
            // d logit / d log_scale = logit, so the sweep reports it directly.
            log_scale: grads.log_scale,
        }
    }
}
