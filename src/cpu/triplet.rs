//! Triplet margin losses over a labelled batch with batch-all, batch-hard and semi-hard mining,
//! forward and backward, computed in f64.
//!
//! The forward builds the N x N matrix of pairwise distances (one GEMM; O(N^2) memory, which
//! triplet mining needs anyway) and then walks the anchors in parallel. Batch-hard takes each
//! anchor's farthest positive and nearest negative in one walk (O(N)); batch-all and the
//! semi-hard minings sort the anchor's negatives by distance once, so their sums take
//! O(N log N) per anchor instead of O(N^2). The whole forward is O(N^2 (D + log N)) time and
//! never O(N^3) memory. The hard / semi-hard / easy counts are a separate pass
//! ([`Problem::stats`], O(N^2 log P) with P positives per anchor), run when they are read.
//!
//! The loss is a linear combination of pairwise distances (the relu terms that are active), so the
//! forward keeps, per ordered pair (i, j) that occurs in an active term, the coefficient of its
//! distance in the loss: an N x N matrix when most pairs occur (batch-all), a list of pairs
//! otherwise (batch-hard: at most 2 per anchor). The backward chains those coefficients through
//! the distances to the rows.
//!
//! Ties (equal distances) pick the lowest row index: the hardest positive is the first row with
//! the largest distance, the hardest negative the first with the smallest, and the semi-hard
//! negative the first with the smallest distance above `d_ap` (or, when there is none, the first
//! with the largest distance).

use rayon::prelude::*;

use super::gemm::{Gemm, MatRef};
use super::{exponent, normalize, row_norm, Real, ROW_TILE};
use crate::shared::{ldexp, scaled_margin, Distance, Mining, TripletReduction, TripletStats};
pub use crate::shared::{Coefs, PairCoef, DIST_EPS};

/// One triplet problem; sizes are validated by the caller.
#[derive(Clone, Copy)]
pub struct Problem<'a> {
    /// Embeddings, `rows x dim`, row-major.
    pub x: &'a [f64],
    pub rows: usize,
    pub dim: usize,
    /// One label per row.
    pub labels: &'a [i64],
    pub distance: Distance,
    pub mining: Mining,
    pub margin: f64,
    pub reduction: TripletReduction,
}

/// `k > 0` such that the rows of `x` scaled by `2^-k` have a largest norm in
/// `[2^(limit_exp - 1), 2^limit_exp)`, or 0 when the largest norm is below `2^limit_exp` already
/// (then nothing is scaled). Norms are exact at any scale ([`row_norm`]).
pub(crate) fn prescale_exponent<T: Real>(x: &[T], dim: usize, limit_exp: i32) -> i32 {
    let max = x.par_chunks(dim).map(row_norm).reduce(|| 0.0, f64::max);
    if max.is_finite() && max < ldexp(1.0, limit_exp) {
        return 0;
    }
    if !max.is_finite() {
        // Only an f64 norm can pass f64::MAX: 2^1024 sqrt(dim).
        return 1024 + (dim as f64).log2().ceil() as i32 / 2 + 1 - limit_exp;
    }
    exponent(max) - limit_exp
}

/// Rows of f64 norm from 2^400 on are mined scaled (squared distances and batch-all sums then
/// stay far below f64::MAX).
const F64_ROW_NORM_EXP: i32 = 400;

/// Result of [`Problem::forward`].
#[derive(Clone, Debug)]
pub struct Forward {
    pub loss: f64,
    pub count: u64,
    /// What the backward needs.
    pub coefs: Coefs,
}

/// What one anchor contributes.
#[derive(Default)]
struct Anchor {
    sum: f64,
    /// Its mined terms, and those of them that are positive.
    mined: u64,
    active: u64,
}

/// The hard, semi-hard and easy counts of one anchor's valid triplets, from its positive
/// distances and its negative ones. A triplet is hard when `d_an < d_ap`, semi-hard when
/// `d_ap <= d_an < d_ap + m`, easy otherwise. The positives' thresholds `d_ap` and `d_ap + m`
/// (few) are sorted once with running counts of each kind, and each negative finds how many of
/// each lie at or below it with one binary search: O((P + N) log P), not a sort of the N
/// negatives.
fn triplet_stats(
    positive_d: &[f64],
    negative_d: impl Iterator<Item = f64>,
    m: f64,
) -> TripletStats {
    let mut thresholds: Vec<(f64, bool)> = positive_d
        .iter()
        .flat_map(|&dp| [(dp, true), (dp + m, false)])
        .collect();
    thresholds.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));
    let values: Vec<f64> = thresholds.iter().map(|t| t.0).collect();
    // at_or_below[k]: how many `d_ap` and how many `d_ap + m` are among the first k thresholds.
    let mut at_or_below = Vec::with_capacity(values.len() + 1);
    at_or_below.push((0u64, 0u64));
    for &(_, is_distance) in &thresholds {
        let (d, t) = at_or_below[at_or_below.len() - 1];
        at_or_below.push(if is_distance { (d + 1, t) } else { (d, t + 1) });
    }
    let p = positive_d.len() as u64;
    let (mut hard, mut within, mut count) = (0u64, 0u64, 0u64);
    for dn in negative_d {
        let (distances, margins) = at_or_below[values.partition_point(|&t| t <= dn)];
        hard += p - distances;
        within += p - margins;
        count += 1;
    }
    // m >= 0, so d_ap + m >= d_ap and "within the margin" includes "hard".
    TripletStats {
        hard,
        semi_hard: within - hard,
        easy: p * count - within,
    }
}

impl Problem<'_> {
    fn cosine(&self) -> bool {
        self.distance == Distance::Cosine
    }

    /// The N x N matrix of raw pair quantities: squared distances (exactly 0 on the diagonal), or
    /// for the cosine distance the cosine similarities.
    fn raw_matrix(&self) -> Vec<f64> {
        let (n, dim) = (self.rows, self.dim);
        let normed;
        let x = if self.cosine() {
            normed = normalize::forward(self.x, dim);
            &normed[..]
        } else {
            self.x
        };
        let sq: Vec<f64> = if self.cosine() {
            Vec::new()
        } else {
            x.par_chunks(dim)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect()
        };
        let all_t = MatRef::row_major(x, n, dim).t();
        let mut raw = vec![0.0; n * n];
        raw.par_chunks_mut(ROW_TILE * n)
            .enumerate()
            .for_each(|(tile, block)| {
                let r0 = tile * ROW_TILE;
                let len = block.len() / n;
                let rows = MatRef::row_major(&x[r0 * dim..(r0 + len) * dim], len, dim);
                f64::gemm(1.0, rows, all_t, 0.0, block);
                if sq.is_empty() {
                    return;
                }
                for (ii, row) in block.chunks_mut(n).enumerate() {
                    let i = r0 + ii;
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = if i == j {
                            0.0
                        } else {
                            (sq[i] + sq[j] - 2.0 * *v).max(0.0)
                        };
                    }
                }
            });
        raw
    }

    /// The distance from a raw pair quantity (`eps`: the euclidean clamp, [`DIST_EPS`] in the
    /// units of the rows).
    fn dist(&self, raw: f64, eps: f64) -> f64 {
        match self.distance {
            Distance::Euclidean => raw.max(eps).sqrt(),
            Distance::SquaredEuclidean => raw,
            Distance::Cosine => 1.0 - raw,
        }
    }

    /// `d dist / d raw`.
    fn dist_grad(&self, raw: f64, eps: f64) -> f64 {
        match self.distance {
            Distance::Euclidean => {
                if raw >= eps {
                    0.5 / raw.sqrt()
                } else {
                    0.0
                }
            }
            Distance::SquaredEuclidean => 1.0,
            Distance::Cosine => -1.0,
        }
    }

    /// Mined sums and loss coefficients of anchor `a` (before the division by the count), from its
    /// row of raw pair quantities: `(j, coefficient of raw_aj)` by `j`, each `j` once, zeros
    /// dropped.
    fn anchor(&self, a: usize, row: &[f64], eps: f64) -> (Anchor, Vec<(usize, f64)>) {
        let (anchor, terms) = self.mine(a, row, eps);
        // Chain each distance coefficient to its raw quantity, then add the terms of each row
        // in the order they were mined.
        let mut grads: Vec<(usize, f64)> = terms
            .iter()
            .map(|&(j, c)| (j, c * self.dist_grad(row[j], eps)))
            .collect();
        grads.sort_by_key(|&(j, _)| j);
        let mut merged: Vec<(usize, f64)> = Vec::with_capacity(grads.len());
        for (j, g) in grads {
            match merged.last_mut() {
                Some((last, sum)) if *last == j => *sum += g,
                _ => merged.push((j, g)),
            }
        }
        merged.retain(|&(_, c)| c != 0.0);
        (anchor, merged)
    }

    /// The stats of anchor `a`'s valid triplets, whose raw row is `raw_row`.
    fn anchor_stats(&self, a: usize, raw_row: &[f64], eps: f64) -> TripletStats {
        let ya = self.labels[a];
        let d = |j: usize| self.dist(raw_row[j], eps);
        let positive_d: Vec<f64> = (0..self.rows)
            .filter(|&j| j != a && self.labels[j] == ya)
            .map(d)
            .collect();
        if positive_d.is_empty() {
            return TripletStats::default();
        }
        let negative_d = (0..self.rows).filter(|&j| self.labels[j] != ya).map(d);
        triplet_stats(&positive_d, negative_d, self.margin)
    }

    /// Mined terms of anchor `a`, whose raw row is `raw_row`: the anchor's sums and the
    /// coefficients `(j, dloss/dd_aj)` of its terms (a row may occur more than once).
    fn mine(&self, a: usize, raw_row: &[f64], eps: f64) -> (Anchor, Vec<(usize, f64)>) {
        let n = self.rows;
        let m = self.margin;
        let ya = self.labels[a];
        let d = |j: usize| self.dist(raw_row[j], eps);
        let positives: Vec<usize> = (0..n).filter(|&j| j != a && self.labels[j] == ya).collect();
        // The negatives are most rows: walked in place rather than collected.
        let negatives = || (0..n).filter(move |&j| self.labels[j] != ya);
        let mut out = Anchor::default();
        let mut coefs = Vec::new();
        if positives.is_empty() || negatives().next().is_none() {
            return (out, coefs);
        }
        let positive_d: Vec<f64> = positives.iter().map(|&p| d(p)).collect();
        // By distance, then by index (so unique keys): among equal distances the lowest index
        // comes first.
        let sorted_negatives = || {
            let mut negs: Vec<(f64, usize)> = negatives().map(|j| (d(j), j)).collect();
            negs.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            negs
        };
        match self.mining {
            Mining::BatchHard => {
                // The first of the largest positive distances, and the first of the smallest
                // negative ones (one walk: no sort).
                let nearest =
                    negatives()
                        .map(|j| (d(j), j))
                        .reduce(|best, x| if x.0 < best.0 { x } else { best });
                let Some((dn_min, nearest)) = nearest else {
                    return (out, coefs);
                };
                let p = (1..positive_d.len()).fold(0, |best, i| {
                    if positive_d[i] > positive_d[best] {
                        i
                    } else {
                        best
                    }
                });
                out.mined = 1;
                let term = positive_d[p] - dn_min + m;
                if term > 0.0 {
                    out.active = 1;
                    out.sum = term;
                    coefs.push((positives[p], 1.0));
                    coefs.push((nearest, -1.0));
                }
            }
            Mining::BatchAll | Mining::SemiHardAll => {
                let negs = sorted_negatives();
                let len = negs.len();
                let semi_hard_only = self.mining == Mining::SemiHardAll;
                let mut prefix = Vec::with_capacity(len + 1);
                prefix.push(0.0);
                for &(dn, _) in &negs {
                    prefix.push(prefix[prefix.len() - 1] + dn);
                }
                // Each positive's active negatives are the sorted ranks lo..hi (lo = 0 unless
                // only semi-hard triplets count); `starts` and `ends` count the ranges.
                let mut starts = vec![0u64; len + 1];
                let mut ends = vec![0u64; len + 1];
                for &p in &positives {
                    let dp = d(p);
                    let lo = match semi_hard_only {
                        true => negs.partition_point(|&(dn, _)| dn <= dp),
                        false => 0,
                    };
                    let hi = negs.partition_point(|&(dn, _)| dp - dn + m > 0.0).max(lo);
                    out.mined += match semi_hard_only {
                        true => negs.partition_point(|&(dn, _)| dp - dn + m >= 0.0).max(lo) - lo,
                        false => len,
                    } as u64;
                    if hi == lo {
                        continue;
                    }
                    let k = hi - lo;
                    out.sum += k as f64 * (dp + m) - (prefix[hi] - prefix[lo]);
                    out.active += k as u64;
                    coefs.push((p, k as f64));
                    starts[lo] += 1;
                    ends[hi] += 1;
                }
                // The negative at sorted rank r is in the terms of every range holding r.
                let mut open = 0u64;
                for r in 0..len {
                    open = open + starts[r] - ends[r];
                    if open > 0 {
                        coefs.push((negs[r].1, -(open as f64)));
                    }
                }
            }
            Mining::SemiHard => {
                let negs = sorted_negatives();
                let len = negs.len();
                let d_max = negs[len - 1].0;
                let farthest = negs[negs.partition_point(|&(dn, _)| dn < d_max)];
                for &p in &positives {
                    let dp = d(p);
                    let i = negs.partition_point(|&(dn, _)| dn <= dp);
                    let (dn, chosen) = if i < len { negs[i] } else { farthest };
                    out.mined += 1;
                    let term = dp - dn + m;
                    if term > 0.0 {
                        out.active += 1;
                        out.sum += term;
                        coefs.push((p, 1.0));
                        coefs.push((chosen, -1.0));
                    }
                }
            }
        }
        (out, coefs)
    }

    /// The loss (0 when nothing counts), its count and the pair coefficients for [`backward`].
    ///
    /// Overflow: the raw matrix holds squared distances, which overflow f64 for rows of norm
    /// above ~1e154. Rows whose largest norm `M` passes 2^400 are therefore mined scaled by
    /// `s = 2^-k` (exact), with `M s` in [2^399, 2^400): every distance scales by `s`
    /// (euclidean) or `s^2` (squared), so with the margin and the clamp scaled alike the same
    /// triplets are active and the loss is the scaled problem's times `s^-1` or `s^-2`
    /// (infinite when that exceeds f64); the coefficients come back in the rows' units, so
    /// [`backward`] needs no scale. The cosine distance is scale-invariant already.
    pub fn forward(&self) -> Forward {
        let (mut fwd, k, p) = self.as_mined(|problem, eps| problem.forward_eps(eps));
        if k != 0 {
            fwd.loss = ldexp(fwd.loss, k * p);
            // d loss / d raw = 2^(kp) (d loss' / d raw') 2^(-2k).
            fwd.coefs.scale_exp(k * (p - 2));
        }
        fwd
    }

    /// The hard / semi-hard / easy split of every valid triplet (a second pass over the
    /// distances: the forward leaves it out, so a training step that does not read it does not
    /// pay for it). Counts are scale-invariant, so the rows are scaled as [`Problem::forward`]
    /// scales them.
    pub fn stats(&self) -> TripletStats {
        self.as_mined(|problem, eps| {
            let raw = problem.raw_matrix();
            raw.par_chunks(problem.rows)
                .enumerate()
                .map(|(a, row)| problem.anchor_stats(a, row, eps))
                .reduce(TripletStats::default, |x, y| TripletStats {
                    hard: x.hard + y.hard,
                    semi_hard: x.semi_hard + y.semi_hard,
                    easy: x.easy + y.easy,
                })
        })
        .0
    }

    /// Runs `f` on the problem as it is mined, with its distance clamp: the rows scaled by
    /// `2^-k` when their norms need it (see [`Problem::forward`]), the margin and the clamp
    /// scaled alike. Returns `f`'s result, `k` and the power `p` the distances scale with.
    fn as_mined<R>(&self, f: impl FnOnce(&Problem<'_>, f64) -> R) -> (R, i32, i32) {
        let k = match self.distance {
            Distance::Cosine => 0,
            _ => prescale_exponent(self.x, self.dim, F64_ROW_NORM_EXP),
        };
        let p = if self.distance == Distance::SquaredEuclidean {
            2
        } else {
            1
        };
        if k == 0 {
            return (f(self, DIST_EPS), 0, p);
        }
        let x: Vec<f64> = self.x.iter().map(|&v| ldexp(v, -k)).collect();
        let scaled = Problem {
            x: &x,
            margin: scaled_margin(self.margin, -k * p, f64::MIN_POSITIVE),
            ..*self
        };
        let eps = ldexp(DIST_EPS, -2 * k).max(f64::MIN_POSITIVE);
        (f(&scaled, eps), k, p)
    }

    fn forward_eps(&self, eps: f64) -> Forward {
        let n = self.rows;
        let mut w = self.raw_matrix();
        let anchors: Vec<(Anchor, Vec<(usize, f64)>)> = w
            .par_chunks(n)
            .enumerate()
            .map(|(a, row)| self.anchor(a, row, eps))
            .collect();
        let (mut sum, mut count, mut nonzero) = (0.0, 0u64, 0usize);
        let nonzero_only = self.reduction.nonzero_only(self.mining);
        for (an, coefs) in &anchors {
            nonzero += coefs.len();
            sum += an.sum;
            count += if nonzero_only { an.active } else { an.mined };
        }
        let (loss, scale) = if count > 0 {
            (sum / count as f64, 1.0 / count as f64)
        } else {
            (0.0, 0.0)
        };
        // A sparse entry takes three words, a dense one one.
        let coefs = if nonzero.saturating_mul(3) >= n * n {
            // The raw matrix's memory becomes the dense coefficients.
            w.par_chunks_mut(n)
                .zip(&anchors)
                .for_each(|(row, (_, coefs))| {
                    row.fill(0.0);
                    for &(j, c) in coefs {
                        row[j] = c * scale;
                    }
                });
            Coefs::Dense(w)
        } else {
            Coefs::Sparse(
                anchors
                    .iter()
                    .enumerate()
                    .flat_map(|(i, (_, coefs))| {
                        coefs.iter().map(move |&(j, c)| PairCoef {
                            i,
                            j,
                            coef: c * scale,
                        })
                    })
                    .collect(),
            )
        };
        Forward { loss, count, coefs }
    }
}

/// The gradient of `grad_loss * loss` with respect to `x` (rows x dim), from the pair coefficients
/// of [`Problem::forward`].
///
/// With `S` the symmetric matrix of coefficients (each pair adds its coefficient at (i, j) and
/// (j, i)), the squared distances give `dx_r = 2 (sum_o S_ro x_r - (S x)_r)` and the cosine
/// distance `dn_r = (S n)_r` through the normalize backward. Sparse coefficients (batch-hard,
/// semi-hard) walk the pairs of each row; dense ones use GEMMs.
pub fn backward(
    x: &[f64],
    rows: usize,
    dim: usize,
    distance: Distance,
    coefs: &Coefs,
    grad_loss: f64,
) -> Vec<f64> {
    let cosine = distance == Distance::Cosine;
    let normed;
    let y = if cosine {
        normed = normalize::forward(x, dim);
        &normed[..]
    } else {
        x
    };
    // s_r = sum_o S_ro and p_r = (S y)_r.
    let mut s = vec![0.0; rows];
    let mut p = vec![0.0; rows * dim];
    if let Coefs::Dense(w) = coefs {
        // S = W + W^T: row sums plus column sums, and S y = W y + W^T y.
        for (sr, row) in s.iter_mut().zip(w.chunks(rows)) {
            *sr = row.iter().sum();
        }
        for row in w.chunks(rows) {
            for (sr, &c) in s.iter_mut().zip(row) {
                *sr += c;
            }
        }
        let y_mat = MatRef::row_major(y, rows, dim);
        p.par_chunks_mut(ROW_TILE * dim)
            .enumerate()
            .for_each(|(tile, block)| {
                let r0 = tile * ROW_TILE;
                let len = block.len() / dim;
                let w_rows = MatRef::row_major(&w[r0 * rows..(r0 + len) * rows], len, rows);
                f64::gemm(1.0, w_rows, y_mat, 0.0, block);
                // Rows r0.. of W^T are columns r0.. of W.
                let w_cols = MatRef {
                    data: &w[r0..],
                    rows: len,
                    cols: rows,
                    row_stride: 1,
                    col_stride: rows,
                };
                f64::gemm(1.0, w_cols, y_mat, 1.0, block);
            });
    } else if let Coefs::Sparse(pairs) = coefs {
        // Incidence lists: every pair appears in the list of both of its rows.
        let mut offsets = vec![0usize; rows + 1];
        for e in pairs {
            offsets[e.i + 1] += 1;
            offsets[e.j + 1] += 1;
        }
        for r in 0..rows {
            offsets[r + 1] += offsets[r];
        }
        let mut cursor = offsets.clone();
        let mut edges = vec![(0usize, 0.0f64); 2 * pairs.len()];
        for e in pairs {
            edges[cursor[e.i]] = (e.j, e.coef);
            cursor[e.i] += 1;
            edges[cursor[e.j]] = (e.i, e.coef);
            cursor[e.j] += 1;
        }
        p.par_chunks_mut(dim)
            .zip(s.par_iter_mut())
            .enumerate()
            .for_each(|(r, (p_row, s_r))| {
                for &(o, c) in &edges[offsets[r]..offsets[r + 1]] {
                    *s_r += c;
                    for (acc, &v) in p_row.iter_mut().zip(&y[o * dim..(o + 1) * dim]) {
                        *acc += c * v;
                    }
                }
            });
    }
    let mut grad = vec![0.0; rows * dim];
    grad.par_chunks_mut(dim).enumerate().for_each(|(r, g)| {
        let (x_r, p_r) = (&x[r * dim..(r + 1) * dim], &p[r * dim..(r + 1) * dim]);
        if cosine {
            let dn: Vec<f64> = p_r.iter().map(|&v| grad_loss * v).collect();
            normalize::backward_row(x_r, &dn, g);
        } else {
            for ((out, &xv), &pv) in g.iter_mut().zip(x_r).zip(p_r) {
                *out = 2.0 * grad_loss * (s[r] * xv - pv);
            }
        }
    });
    grad
}
