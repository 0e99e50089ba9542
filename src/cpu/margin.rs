//! The Hadsell-Chopra-LeCun contrastive margin loss over pairs of rows, forward and backward,
//! accumulated in f64. Rows run in parallel.
//!
//! Overflow: a squared distance that overflows f64 (f64 pairs more than ~1.3e154 apart) needs no
//! rescaling: such a pair is beyond any valid margin (the op requires `margin^2` to be an f64), so
//! a dissimilar one costs 0 and has no gradient, and a similar one's loss `d^2 / 2` is truly beyond
//! f64: it comes out infinite, which the op turns into an error. The mean and the differences
//! `x1 - x2` are taken so that they overflow only where their exact values do.

use rayon::prelude::*;

use super::simd::dispatched;
use super::Real;
use crate::shared::{mean, DIST_EPS};

/// `||a - b||^2` accumulated in f64 (infinite when it overflows f64).
fn squared_distance<T: Real>(a: &[T], b: &[T]) -> f64 {
    squared_distance_lanes(a, b)
}

dispatched! {
    /// `||a - b||^2` over eight f64 lanes (vectorizes; a fixed order, so deterministic).
    fn squared_distance_lanes<T: Real>(a: &[T], b: &[T]) -> f64 {
        let mut lanes = [0.0f64; 8];
        let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f64 = a_chunks
            .remainder()
            .iter()
            .zip(b_chunks.remainder())
            .map(|(&u, &v)| (u.f64() - v.f64()) * (u.f64() - v.f64()))
            .sum();
        for (ca, cb) in a_chunks.zip(b_chunks) {
            for ((lane, &u), &v) in lanes.iter_mut().zip(ca).zip(cb) {
                let t = u.f64() - v.f64();
                *lane += t * t;
            }
        }
        lanes.iter().sum::<f64>() + tail
    }

    /// `g1 = k (a - b)` and `g2 = -g1` for one pair of rows.
    fn pair_row_grads<T: Real>(k: f64, a: &[T], b: &[T], g1: &mut [T], g2: &mut [T]) {
        for (((o1, o2), &u), &v) in g1.iter_mut().zip(g2.iter_mut()).zip(a).zip(b) {
            let t = u.f64() - v.f64();
            // A difference beyond f64 (f64 rows near f64::MAX) is taken halved.
            let g = if t.is_finite() {
                k * t
            } else {
                2.0 * (k * (u.f64() / 2.0 - v.f64() / 2.0))
            };
            *o1 = T::of(g);
            *o2 = T::of(-g);
        }
    }
}

fn pair_loss(sq: f64, similar: bool, margin: f64) -> f64 {
    let d2 = sq.max(DIST_EPS);
    if similar {
        d2 / 2.0
    } else {
        let gap = (margin - d2.sqrt()).max(0.0);
        gap * gap / 2.0
    }
}

/// `k` such that `d loss / d x1 = k (x1 - x2)` (and `d loss / d x2 = -k (x1 - x2)`).
fn pair_coef(sq: f64, similar: bool, margin: f64) -> f64 {
    if sq < DIST_EPS {
        return 0.0;
    }
    if similar {
        1.0
    } else {
        let d = sq.sqrt();
        if d < margin {
            -(margin - d) / d
        } else {
            0.0
        }
    }
}

/// The mean loss over the rows of `x1`, `x2` (rows of length `dim`); `y[i] == 0` marks a similar
/// pair, anything else a dissimilar one (the caller checks `y` is 0 or 1).
pub fn forward<T: Real>(x1: &[T], x2: &[T], y: &[i64], dim: usize, margin: f64) -> f64 {
    let losses: Vec<f64> = x1
        .par_chunks(dim)
        .zip(x2.par_chunks(dim))
        .zip(y.par_iter())
        .map(|((a, b), &yi)| pair_loss(squared_distance(a, b), yi == 0, margin))
        .collect();
    mean(&losses)
}

/// The loss and the gradients of `grad_loss * loss` with respect to `x1` and `x2`, each pair's
/// distance computed once.
pub fn forward_backward<T: Real>(
    x1: &[T],
    x2: &[T],
    y: &[i64],
    dim: usize,
    margin: f64,
    grad_loss: f64,
) -> (f64, Vec<T>, Vec<T>) {
    let scale = grad_loss / y.len() as f64;
    let (losses, g1, g2) = pair_pass(x1, x2, y, dim, |sq, yi| {
        let similar = yi == 0;
        (
            scale * pair_coef(sq, similar, margin),
            pair_loss(sq, similar, margin),
        )
    });
    (mean(&losses), g1, g2)
}

/// Gradients of `grad_loss * loss` with respect to `x1` and `x2`.
pub fn backward<T: Real>(
    x1: &[T],
    x2: &[T],
    y: &[i64],
    dim: usize,
    margin: f64,
    grad_loss: f64,
) -> (Vec<T>, Vec<T>) {
    let scale = grad_loss / y.len() as f64;
    pair_grads(x1, x2, y, dim, |sq, yi| {
        scale * pair_coef(sq, yi == 0, margin)
    })
}

/// `d / d x1 = k (x1 - x2)` and `d / d x2 = -k (x1 - x2)` per pair, `k = coef(sq, y)` of the
/// pair's squared distance and label.
fn pair_grads<T: Real>(
    x1: &[T],
    x2: &[T],
    y: &[i64],
    dim: usize,
    coef: impl Fn(f64, i64) -> f64 + Sync,
) -> (Vec<T>, Vec<T>) {
    let (_, g1, g2) = pair_pass(x1, x2, y, dim, |sq, yi| (coef(sq, yi), 0.0));
    (g1, g2)
}

/// One parallel pass over the pairs: `per_pair(sq, y)` gives the pair's gradient coefficient `k`
/// (`d / d x1 = k (x1 - x2)`, `d / d x2 = -k (x1 - x2)`) and a value, collected per pair.
fn pair_pass<T: Real>(
    x1: &[T],
    x2: &[T],
    y: &[i64],
    dim: usize,
    per_pair: impl Fn(f64, i64) -> (f64, f64) + Sync,
) -> (Vec<f64>, Vec<T>, Vec<T>) {
    let mut g1 = vec![T::zero(); x1.len()];
    let mut g2 = vec![T::zero(); x2.len()];
    let values = g1
        .par_chunks_mut(dim)
        .zip(g2.par_chunks_mut(dim))
        .zip(x1.par_chunks(dim).zip(x2.par_chunks(dim)))
        .zip(y.par_iter())
        .map(|(((g1_row, g2_row), (a, b)), &yi)| {
            let (k, value) = per_pair(squared_distance(a, b), yi);
            pair_row_grads(k, a, b, g1_row, g2_row);
            value
        })
        .collect();
    (values, g1, g2)
}

/// pytorch-metric-learning's `ContrastiveLoss` (pos_margin 0, neg_margin `margin`,
/// `AvgNonZeroReducer` on each group): the mean of the similar pairs' distances `d > 0` plus
/// the mean of the dissimilar pairs' `margin - d > 0`, an empty group adding 0. A pair closer
/// than the clamp (`d^2 < 1e-12`) is at distance 0. Returns the loss and the two groups' `1 / n`.
pub fn pml_forward<T: Real>(
    x1: &[T],
    x2: &[T],
    y: &[i64],
    dim: usize,
    margin: f64,
) -> (f64, [f64; 2]) {
    let terms: Vec<(usize, f64)> = x1
        .par_chunks(dim)
        .zip(x2.par_chunks(dim))
        .zip(y.par_iter())
        .map(|((a, b), &yi)| {
            let sq = squared_distance(a, b);
            let d = if sq < DIST_EPS { 0.0 } else { sq.sqrt() };
            match yi {
                0 => (0, d),
                _ => (1, margin - d),
            }
        })
        .collect();
    let mut loss = 0.0;
    let mut scales = [0.0; 2];
    for (group, scale) in scales.iter_mut().enumerate() {
        let positive: Vec<f64> = terms
            .iter()
            .filter(|&&(g, t)| g == group && t > 0.0)
            .map(|&(_, t)| t)
            .collect();
        if !positive.is_empty() {
            loss += mean(&positive);
            *scale = 1.0 / positive.len() as f64;
        }
    }
    (loss, scales)
}

/// Gradients of `grad_loss * loss` of [`pml_forward`] with respect to `x1` and `x2`.
pub fn pml_backward<T: Real>(
    x1: &[T],
    x2: &[T],
    y: &[i64],
    dim: usize,
    margin: f64,
    grad_loss: f64,
) -> (Vec<T>, Vec<T>) {
    let (_, scales) = pml_forward(x1, x2, y, dim, margin);
    // d d / d x1 = (x1 - x2) / d; 0 for a pair at the clamp.
    pair_grads(x1, x2, y, dim, |sq, yi| {
        if sq < DIST_EPS {
            return 0.0;
        }
        let d = sq.sqrt();
        match yi {
            0 => grad_loss * scales[0] / d,
            _ if d < margin => -grad_loss * scales[1] / d,
            _ => 0.0,
        }
    })
}
