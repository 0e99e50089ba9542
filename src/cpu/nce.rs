//! Noise-contrastive estimation, forward and backward, accumulated in f64 with a stable
//! softplus / sigmoid. Rows run in parallel.

use rayon::prelude::*;

use super::{sigmoid, softplus, Real};

/// One NCE batch: `s_pos` and `logq_pos` hold `rows` values, `s_neg` and `logq_neg` hold
/// `rows x k`. Sizes are validated by the caller.
#[derive(Clone, Copy)]
pub struct Problem<'a, T> {
    pub s_pos: &'a [T],
    pub s_neg: &'a [T],
    pub logq_pos: &'a [T],
    pub logq_neg: &'a [T],
    pub rows: usize,
    pub k: usize,
}

impl<T: Real> Problem<'_, T> {
    fn log_k(&self) -> f64 {
        (self.k as f64).ln()
    }

    /// `mean_b [ softplus(-delta_pos_b) + sum_j softplus(delta_neg_bj) ]` with
    /// `delta = s - log k - logq`.
    pub fn forward(&self) -> f64 {
        let log_k = self.log_k();
        let per_row: Vec<f64> = (0..self.rows)
            .into_par_iter()
            .map(|b| {
                let delta_pos = self.s_pos[b].f64() - log_k - self.logq_pos[b].f64();
                let row = b * self.k..(b + 1) * self.k;
                let neg: f64 = self.s_neg[row.clone()]
                    .iter()
                    .zip(&self.logq_neg[row])
                    .map(|(&s, &q)| softplus(s.f64() - log_k - q.f64()))
                    .sum();
                softplus(-delta_pos) + neg
            })
            .collect();
        per_row.iter().sum::<f64>() / self.rows as f64
    }

    /// Gradients of `grad_loss * loss` with respect to `s_pos` and `s_neg`:
    /// `-sigmoid(-delta_pos) / B` and `sigmoid(delta_neg) / B`, times `grad_loss`.
    pub fn backward(&self, grad_loss: f64) -> (Vec<T>, Vec<T>) {
        let log_k = self.log_k();
        let scale = grad_loss / self.rows as f64;
        let grad_pos: Vec<T> = self
            .s_pos
            .par_iter()
            .zip(self.logq_pos.par_iter())
            .map(|(&s, &q)| T::of(-scale * sigmoid(-(s.f64() - log_k - q.f64()))))
            .collect();
        let grad_neg: Vec<T> = self
            .s_neg
            .par_iter()
            .zip(self.logq_neg.par_iter())
            .map(|(&s, &q)| T::of(scale * sigmoid(s.f64() - log_k - q.f64())))
            .collect();
        (grad_pos, grad_neg)
    }
}
