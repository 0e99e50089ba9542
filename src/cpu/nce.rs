//! Noise-contrastive estimation, forward and backward, with a stable softplus / sigmoid: each
//! `delta` formed in f64, the per-element softplus and sigmoid in the compute type (vectorized for
//! f32, exact for f64), the row sums accumulated in f64. Rows run in parallel.

use rayon::prelude::*;

use super::simd::dispatched;
use super::{lane_sum, sigmoid, softplus, Real};

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
                let neg =
                    negative_softplus_sum(&self.s_neg[row.clone()], &self.logq_neg[row], log_k);
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
        let mut grad_neg = vec![T::zero(); self.s_neg.len()];
        grad_neg
            .par_chunks_mut(self.k)
            .zip(self.s_neg.par_chunks(self.k))
            .zip(self.logq_neg.par_chunks(self.k))
            .for_each(|((g, s), q)| negative_sigmoids(s, q, log_k, scale, g));
        (grad_pos, grad_neg)
    }
}

impl<T: Real> Problem<'_, T> {
    /// The loss and the gradients of `grad_loss * loss` in one pass: each element's softplus and
    /// sigmoid come from the same exponential.
    pub fn forward_backward(&self, grad_loss: f64) -> (f64, Vec<T>, Vec<T>) {
        let log_k = self.log_k();
        let scale = grad_loss / self.rows as f64;
        let mut grad_pos = vec![T::zero(); self.rows];
        let mut grad_neg = vec![T::zero(); self.s_neg.len()];
        let per_row: Vec<f64> = grad_neg
            .par_chunks_mut(self.k)
            .zip(grad_pos.par_iter_mut())
            .enumerate()
            .map(|(b, (g, g_pos))| {
                let delta_pos = self.s_pos[b].f64() - log_k - self.logq_pos[b].f64();
                *g_pos = T::of(-scale * sigmoid(-delta_pos));
                let row = b * self.k..(b + 1) * self.k;
                let (s, q) = (&self.s_neg[row.clone()], &self.logq_neg[row]);
                softplus(-delta_pos) + negative_terms(s, q, log_k, scale, g)
            })
            .collect();
        let loss = per_row.iter().sum::<f64>() / self.rows as f64;
        (loss, grad_pos, grad_neg)
    }
}

/// Elements of a row taken at a time by the loops below (on the stack).
const BLOCK: usize = 256;

dispatched! {
    /// `sum_j softplus(s_j - log_k - q_j)`: each delta formed in f64 and rounded once to the
    /// compute type, the softplus in the compute type (vectorized for f32), the sums in order.
    fn negative_softplus_sum<T: Real>(s: &[T], q: &[T], log_k: f64) -> f64 {
        let mut terms = [T::zero(); BLOCK];
        let mut total = 0.0;
        for (s, q) in s.chunks(BLOCK).zip(q.chunks(BLOCK)) {
            let terms = &mut terms[..s.len()];
            for ((t, &s), &q) in terms.iter_mut().zip(s).zip(q) {
                *t = T::of(s.f64() - log_k - q.f64()).softplus();
            }
            total += lane_sum(terms).f64();
        }
        total
    }

    /// `sum_j softplus(delta_j)` and `g_j = scale * sigmoid(delta_j)` with
    /// `delta_j = s_j - log_k - q_j`, as [`negative_softplus_sum`] and [`negative_sigmoids`]
    /// compute them, in one pass.
    fn negative_terms<T: Real>(s: &[T], q: &[T], log_k: f64, scale: f64, g: &mut [T]) -> f64 {
        let scale = T::of(scale);
        let mut terms = [T::zero(); BLOCK];
        let mut total = 0.0;
        for ((s, q), g) in s.chunks(BLOCK).zip(q.chunks(BLOCK)).zip(g.chunks_mut(BLOCK)) {
            let terms = &mut terms[..s.len()];
            for (((t, g), &s), &q) in terms.iter_mut().zip(g.iter_mut()).zip(s).zip(q) {
                let (softplus, sigmoid) = T::of(s.f64() - log_k - q.f64()).softplus_sigmoid();
                *t = softplus;
                *g = scale * sigmoid;
            }
            total += lane_sum(terms).f64();
        }
        total
    }

    /// `g_j = scale * sigmoid(s_j - log_k - q_j)`, likewise in the compute type.
    fn negative_sigmoids<T: Real>(s: &[T], q: &[T], log_k: f64, scale: f64, g: &mut [T]) {
        let scale = T::of(scale);
        for ((g, &s), &q) in g.iter_mut().zip(s).zip(q) {
            *g = scale * T::of(s.f64() - log_k - q.f64()).softplus_sigmoid().1;
        }
    }
}
