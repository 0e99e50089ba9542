//! MoCo on the tiled softmax core, and the queue enqueue.
//!
//! Queries `q` and keys `k` are L2-normalized; the positive logit `l_pos_i = q'_i . k'_i / tau`
//! joins row `i`'s softmax as its extra logit, the negatives are `q'_i . queue_j / tau` with the
//! queue used as given. `k` and the queue get no gradient.

use super::softmax::{self, NoTargets, Scores, STRIP_MAX_COLS};
use super::{dot, normalize, Real};
use crate::tensor::Element;

/// One MoCo problem. Sizes are validated by the caller.
#[derive(Clone, Copy)]
pub struct Problem<'a, T> {
    /// Queries, rows x dim.
    pub q: &'a [T],
    /// Positive keys, rows x dim.
    pub k: &'a [T],
    /// Negatives, queue_len x dim.
    pub queue: &'a [T],
    pub rows: usize,
    pub queue_len: usize,
    pub dim: usize,
    pub temperature: f64,
}

impl<T: Real> Problem<'_, T> {
    /// Runs `f` on the score setup (normalized queries against the queue), the normalized keys
    /// and the positive logits.
    fn with_scores<R>(&self, f: impl FnOnce(&Scores<'_, T>, &[T], &[f64]) -> R) -> R {
        let qn = normalize::forward(self.q, self.dim);
        let kn = normalize::forward(self.k, self.dim);
        let l_pos: Vec<f64> = qn
            .chunks(self.dim)
            .zip(kn.chunks(self.dim))
            .map(|(q, k)| dot(q, k) / self.temperature)
            .collect();
        let scores = Scores {
            queries: &qn,
            keys: self.queue,
            rows: self.rows,
            cols: self.queue_len,
            dim: self.dim,
            scale: 1.0 / self.temperature,
            self_mask: false,
        };
        f(&scores, &kn, &l_pos)
    }

    /// The mean loss and the per-query log-sum-exp over `[l_pos, l_neg]`.
    pub fn forward(&self) -> (f64, Vec<f64>) {
        self.with_scores(|s, _, l_pos| {
            let stats = softmax::forward(s, Some(l_pos), &NoTargets, false);
            let total: f64 = stats.lse.iter().zip(l_pos).map(|(l, p)| l - p).sum();
            (total / self.rows as f64, stats.lse)
        })
    }

    /// The gradient of `grad_loss * loss` with respect to `q`.
    pub fn backward(&self, lse: &[f64], grad_loss: f64) -> Vec<T> {
        let weight = vec![grad_loss / self.rows as f64; self.rows];
        self.with_scores(|s, kn, l_pos| {
            let dqn = softmax::backward(s, lse, None, &weight, &NoTargets, false).queries;
            self.input_grad(dqn, kn, l_pos, lse, grad_loss)
        })
    }

    /// Loss, lse and the gradient of `grad_loss * loss` with respect to `q` in one sweep (see
    /// [`softmax::forward_backward`]); two sweeps when the queue is too long for a row strip.
    pub fn forward_backward(&self, grad_loss: f64) -> (f64, Vec<f64>, Vec<T>) {
        if self.queue_len > STRIP_MAX_COLS {
            let (loss, lse) = self.forward();
            let grad = self.backward(&lse, grad_loss);
            return (loss, lse, grad);
        }
        let weight = vec![grad_loss / self.rows as f64; self.rows];
        self.with_scores(|s, kn, l_pos| {
            let (stats, grads) =
                softmax::forward_backward(s, Some(l_pos), &weight, &NoTargets, false);
            let total: f64 = stats.lse.iter().zip(l_pos).map(|(l, p)| l - p).sum();
            let grad = self.input_grad(grads.queries, kn, l_pos, &stats.lse, grad_loss);
            (total / self.rows as f64, stats.lse, grad)
        })
    }

    /// The gradient with respect to `q` from the queue part of the normalized queries'
    /// gradient, `dqn`: adds the positive part and goes through the normalization.
    fn input_grad(
        &self,
        mut dqn: Vec<T>,
        kn: &[T],
        l_pos: &[f64],
        lse: &[f64],
        grad_loss: f64,
    ) -> Vec<T> {
        let w = grad_loss / self.rows as f64;
        let dim = self.dim;
        // The positive part: w * (softmax_i,pos - 1) / tau * k'_i.
        for (i, (dq, k)) in dqn.chunks_mut(dim).zip(kn.chunks(dim)).enumerate() {
            // exp_m1: the positive's softmax minus 1 keeps its digits when it is dominant.
            let c = w * (l_pos[i] - lse[i]).exp_m1() / self.temperature;
            for (g, &kv) in dq.iter_mut().zip(k) {
                *g += T::of(c * kv.f64());
            }
        }
        normalize::backward(self.q, &dqn, dim)
    }
}

/// Writes the L2-normalized rows of `k` (rows x dim) into `queue` (queue_len x dim) at rows
/// `(ptr + i) mod queue_len` and returns `(ptr + rows) mod queue_len`. When `rows > queue_len`
/// the later keys overwrite the earlier ones, so only the last `queue_len` keys are written.
pub fn enqueue<T: Real, E: Element>(
    queue: &mut [E],
    k: &[T],
    rows: usize,
    dim: usize,
    ptr: usize,
) -> usize {
    let queue_len = queue.len() / dim;
    for i in rows.saturating_sub(queue_len)..rows {
        let normalized = normalize::forward(&k[i * dim..(i + 1) * dim], dim);
        let slot = (ptr + i) % queue_len;
        for (dst, &v) in queue[slot * dim..(slot + 1) * dim]
            .iter_mut()
            .zip(&normalized)
        {
            *dst = E::from_f64(v.f64());
        }
    }
    (ptr + rows) % queue_len
}
