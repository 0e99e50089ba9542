//! InfoNCE (one positive per query) and NT-Xent on the tiled softmax core.

use super::softmax::{self, IndexTargets, Scores, STRIP_MAX_COLS};
use super::{normalize, Real};

/// One InfoNCE problem: queries `q` (rows x dim), keys `k` (cols x dim), the positive key of each
/// query, and the options. Sizes are validated by the caller.
#[derive(Clone, Copy)]
pub struct Problem<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
    pub positives: &'a [usize],
    pub temperature: f64,
    pub normalize: bool,
    pub self_mask: bool,
}

impl<'a, T: Real> Problem<'a, T> {
    /// Runs `f` on the score setup, normalizing q and k first when asked.
    fn with_scores<R>(&self, f: impl FnOnce(&Scores<'_, T>) -> R) -> R {
        let (qn, kn);
        let (q, k) = if self.normalize {
            qn = normalize::forward(self.q, self.dim);
            kn = normalize::forward(self.k, self.dim);
            (&qn[..], &kn[..])
        } else {
            (self.q, self.k)
        };
        f(&Scores {
            queries: q,
            keys: k,
            rows: self.rows,
            cols: self.cols,
            dim: self.dim,
            scale: 1.0 / self.temperature,
            self_mask: self.self_mask,
        })
    }

    /// The mean of `lse_i - target_logit_i` over the rows.
    fn mean_loss(&self, stats: &softmax::RowStats) -> f64 {
        let total: f64 = stats
            .lse
            .iter()
            .zip(&stats.target_logit)
            .map(|(l, t)| l - t)
            .sum();
        total / self.rows as f64
    }

    /// Every row weighs `grad_loss / rows` in the gradient of the mean loss.
    fn row_weights(&self, grad_loss: f64) -> Vec<f64> {
        vec![grad_loss / self.rows as f64; self.rows]
    }

    /// The gradients with respect to the inputs: through the normalization when there is one.
    fn input_grads(&self, grads: softmax::Grads<T>) -> (Vec<T>, Vec<T>) {
        let (dq, dk) = (grads.queries, grads.keys.unwrap_or_default());
        if self.normalize {
            (
                normalize_backward(self.q, &dq, self.dim),
                normalize_backward(self.k, &dk, self.dim),
            )
        } else {
            (dq, dk)
        }
    }

    /// The mean loss and the per-row log-sum-exp the backward needs.
    pub fn forward(&self) -> (f64, Vec<f64>) {
        let stats =
            self.with_scores(|s| softmax::forward(s, None, &IndexTargets(self.positives), false));
        (self.mean_loss(&stats), stats.lse)
    }

    /// Gradients of `grad_loss * loss` with respect to q and k.
    pub fn backward(&self, lse: &[f64], grad_loss: f64) -> (Vec<T>, Vec<T>) {
        let weight = self.row_weights(grad_loss);
        self.input_grads(self.with_scores(|s| {
            softmax::backward(s, lse, None, &weight, &IndexTargets(self.positives), true)
        }))
    }

    /// Loss and the gradients of `grad_loss * loss` in one sweep (see
    /// [`softmax::forward_backward`]); two sweeps when the keys are too many for a row strip.
    pub fn forward_backward(&self, grad_loss: f64) -> (f64, Vec<T>, Vec<T>) {
        if self.cols > STRIP_MAX_COLS {
            let (loss, lse) = self.forward();
            let (dq, dk) = self.backward(&lse, grad_loss);
            return (loss, dq, dk);
        }
        let weight = self.row_weights(grad_loss);
        let (stats, grads) = self.with_scores(|s| {
            softmax::forward_backward(s, None, &weight, &IndexTargets(self.positives), true)
        });
        let (dq, dk) = self.input_grads(grads);
        (self.mean_loss(&stats), dq, dk)
    }
}

fn normalize_backward<T: Real>(x: &[T], grad_y: &[T], dim: usize) -> Vec<T> {
    normalize::backward(x, grad_y, dim)
}

/// NT-Xent positives: row `i` of 2N rows pairs with row `(i + N) mod 2N`.
pub fn ntxent_positives(rows: usize) -> Vec<usize> {
    let half = rows / 2;
    (0..rows).map(|i| (i + half) % rows).collect()
}

/// NT-Xent as InfoNCE of `z` against itself: cosine, self excluded.
pub fn ntxent_problem<'a, T>(
    z: &'a [T],
    rows: usize,
    dim: usize,
    positives: &'a [usize],
    temperature: f64,
) -> Problem<'a, T> {
    Problem {
        q: z,
        k: z,
        rows,
        cols: rows,
        dim,
        positives,
        temperature,
        normalize: true,
        self_mask: true,
    }
}

/// NT-Xent loss and gradient in one sweep: z is both the queries and the keys.
pub fn ntxent_forward_backward<T: Real>(p: &Problem<'_, T>, grad_loss: f64) -> (f64, Vec<T>) {
    let (loss, mut dq, dk) = p.forward_backward(grad_loss);
    for (a, b) in dq.iter_mut().zip(&dk) {
        *a += *b;
    }
    (loss, dq)
}

/// The NT-Xent gradient: z is both the queries and the keys.
pub fn ntxent_backward<T: Real>(p: &Problem<'_, T>, lse: &[f64], grad_loss: f64) -> Vec<T> {
    let (mut dq, dk) = p.backward(lse, grad_loss);
    for (a, b) in dq.iter_mut().zip(&dk) {
        *a += *b;
    }
    dq
}
