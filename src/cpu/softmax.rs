//! The tiled softmax core shared by every temperature-softmax loss (InfoNCE, NT-Xent, CLIP, MoCo,
//! SupCon). Logits are `logit_ij = scale * q_i . k_j` for queries `q` (rows x dim) and keys `k`
//! (cols x dim). Row tiles run in parallel; within a row tile, key tiles are visited in order with
//! a running max and sum of exponentials, so memory is O(sweep_rows x KEY_TILE) per thread and never
//! rows x cols. The backward recomputes each score tile from the saved per-row log-sum-exp.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::MatRef;
use super::simd::{self, dispatched};
use super::{lane_sum, sweep_rows, Real, KEY_TILE};

/// Queries, keys and how their scores become logits.
#[derive(Clone, Copy)]
pub struct Scores<'a, T> {
    pub queries: &'a [T],
    pub keys: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
    /// Multiplies every score: `1 / tau`, or `exp(log_scale)` for CLIP.
    pub scale: f64,
    /// Drops the logit `(i, i)` (a row never contrasts with itself).
    pub self_mask: bool,
}

/// Per-row results of the forward sweep.
pub struct RowStats {
    /// `LSE_j logit_ij` over the unmasked keys (and the row's extra logit, if any).
    pub lse: Vec<f64>,
    /// `sum_j target(i, j) * logit_ij`: the positive logit (or mean of positive logits).
    pub target_logit: Vec<f64>,
    /// `LSE_i logit_ij` per column, when the sweep was asked for it (else empty).
    pub col_lse: Vec<f64>,
}

/// Gradients of `sum_i row_weight_i * (lse_i - target_logit_i)`.
pub struct Grads<T> {
    pub queries: Vec<T>,
    /// `None` when the caller did not ask for key gradients.
    pub keys: Option<Vec<T>>,
    /// `sum_ij dlogit_ij * logit_ij`: the gradient with respect to `log(scale)` (CLIP only).
    pub log_scale: f64,
}

impl<T: Real> Scores<'_, T> {
    fn query_tile(&self, start: usize, len: usize) -> MatRef<'_, T> {
        MatRef::row_major(
            &self.queries[start * self.dim..(start + len) * self.dim],
            len,
            self.dim,
        )
    }

    fn key_tile(&self, start: usize, len: usize) -> MatRef<'_, T> {
        MatRef::row_major(
            &self.keys[start * self.dim..(start + len) * self.dim],
            len,
            self.dim,
        )
    }

    /// One logit recomputed in f64 (for the few target entries).
    fn logit(&self, i: usize, j: usize) -> f64 {
        let q = &self.queries[i * self.dim..(i + 1) * self.dim];
        let k = &self.keys[j * self.dim..(j + 1) * self.dim];
        self.scale * super::dot(q, k)
    }

    /// Fills `tile` (row_len x key_len) with logits of rows `r0..` against keys `k0..`; masked
    /// entries become -inf.
    fn logits(&self, r0: usize, row_len: usize, k0: usize, key_len: usize, tile: &mut [T]) {
        let tile = &mut tile[..row_len * key_len];
        T::gemm(
            T::of(self.scale),
            self.query_tile(r0, row_len),
            self.key_tile(k0, key_len).t(),
            T::zero(),
            tile,
        );
        if self.self_mask {
            for r in 0..row_len {
                let i = r0 + r;
                if (k0..k0 + key_len).contains(&i) {
                    tile[r * key_len + (i - k0)] = T::neg_infinity();
                }
            }
        }
    }
}

/// The least number of row tiles a rayon job takes so that there is one job per worker thread:
/// each job of a backward owns a key-gradient accumulator (cols x dim), so their count must not
/// grow with the batch (rayon's adaptive splitting alone makes many more).
pub(super) fn tiles_per_job(rows: usize, tile: usize) -> usize {
    rows.div_ceil(tile)
        .div_ceil(rayon::current_num_threads())
        .max(1)
}

fn tiles(total: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..total)
        .step_by(size)
        .map(move |start| (start, size.min(total - start)))
}

/// The target distribution of each row: which logits count as positives, with what weight.
/// Sparse, because a row has few positives among many keys.
pub trait Targets: Sync {
    /// Calls `f(j, weight)` for every key `j` in `cols` with a non-zero target weight in row `i`.
    fn visit(&self, i: usize, cols: Range<usize>, f: &mut dyn FnMut(usize, f64));
}

/// No positive among the keys (MoCo: the positive is the extra logit).
pub struct NoTargets;

impl Targets for NoTargets {
    fn visit(&self, _: usize, _: Range<usize>, _: &mut dyn FnMut(usize, f64)) {}
}

/// One positive key per row, by index (InfoNCE, NT-Xent).
pub struct IndexTargets<'a>(pub &'a [usize]);

impl Targets for IndexTargets<'_> {
    fn visit(&self, i: usize, cols: Range<usize>, f: &mut dyn FnMut(usize, f64)) {
        if cols.contains(&self.0[i]) {
            f(self.0[i], 1.0);
        }
    }
}

/// Row `i`'s positive is key `i` (CLIP).
pub struct Diagonal;

impl Targets for Diagonal {
    fn visit(&self, i: usize, cols: Range<usize>, f: &mut dyn FnMut(usize, f64)) {
        if cols.contains(&i) {
            f(i, 1.0);
        }
    }
}

/// The forward sweep: per-row log-sum-exp and target logit. `extra` adds one more logit to row
/// `i`'s softmax (MoCo's positive); `targets` weights logits in `target_logit`. With `columns`
/// the same logits also give every column's log-sum-exp (CLIP's column pass, without a second
/// GEMM): each rayon job keeps a running (max, sum) per column, and the jobs' are merged.
pub fn forward<T: Real>(
    s: &Scores<'_, T>,
    extra: Option<&[f64]>,
    targets: &impl Targets,
    columns: bool,
) -> RowStats {
    let mut lse = vec![0.0f64; s.rows];
    let mut target_logit = vec![0.0f64; s.rows];
    let col_len = if columns { s.cols } else { 0 };
    let tile_rows = sweep_rows(s.rows);
    let col_stats = lse
        .par_chunks_mut(tile_rows)
        .zip(target_logit.par_chunks_mut(tile_rows))
        .enumerate()
        .with_min_len(if columns {
            tiles_per_job(s.rows, tile_rows)
        } else {
            1
        })
        .fold(
            || ColumnStats::new(col_len),
            |mut col_stats, (t, (lse_tile, tgt_tile))| {
                let r0 = t * tile_rows;
                let row_len = lse_tile.len();
                let mut tile = vec![T::zero(); row_len * KEY_TILE];
                // Running max and sum of exp(logit - max) per row.
                let mut max = vec![f64::NEG_INFINITY; row_len];
                let mut sum = vec![0.0f64; row_len];
                if let Some(extra) = extra {
                    for r in 0..row_len {
                        max[r] = extra[r0 + r];
                        sum[r] = 1.0;
                    }
                }
                for (k0, key_len) in tiles(s.cols, KEY_TILE) {
                    s.logits(r0, row_len, k0, key_len, &mut tile);
                    let tile = &mut tile[..row_len * key_len];
                    if columns {
                        col_stats.add_tile(k0, key_len, tile);
                    }
                    for r in 0..row_len {
                        let row = &tile[r * key_len..(r + 1) * key_len];
                        let tile_max = simd::row_max(row).f64();
                        if tile_max == f64::NEG_INFINITY {
                            continue;
                        }
                        targets.visit(r0 + r, k0..k0 + key_len, &mut |j, w| {
                            tgt_tile[r] += w * row[j - k0].f64()
                        });
                        let new_max = max[r].max(tile_max);
                        let row = &mut tile[r * key_len..(r + 1) * key_len];
                        let row_sum = simd::exp_shifted_sum(row, T::of(new_max)).f64();
                        sum[r] = sum[r] * (max[r] - new_max).exp() + row_sum;
                        max[r] = new_max;
                    }
                }
                for r in 0..row_len {
                    lse_tile[r] = max[r] + sum[r].ln();
                }
                col_stats
            },
        )
        .reduce(|| ColumnStats::new(col_len), ColumnStats::merge);
    RowStats {
        lse,
        target_logit,
        col_lse: col_stats.lse(),
    }
}

/// A running max and sum of `exp(logit - max)` per column, over the row tiles seen so far.
struct ColumnStats {
    max: Vec<f64>,
    sum: Vec<f64>,
}

/// `sum * exp(max - new_max)`, which is 0 for an empty sum (max = -inf).
fn rescaled(sum: f64, max: f64, new_max: f64) -> f64 {
    if max == f64::NEG_INFINITY {
        0.0
    } else {
        sum * (max - new_max).exp()
    }
}

impl ColumnStats {
    fn new(cols: usize) -> Self {
        ColumnStats {
            max: vec![f64::NEG_INFINITY; cols],
            sum: vec![0.0; cols],
        }
    }

    /// Adds the columns `k0..k0 + key_len` of a `rows x key_len` logit tile.
    fn add_tile<T: Real>(&mut self, k0: usize, key_len: usize, tile: &[T]) {
        let mut tile_max = vec![T::neg_infinity(); key_len];
        simd::column_max(tile, &mut tile_max);
        let max = &mut self.max[k0..k0 + key_len];
        let shift: Vec<T> = max
            .iter()
            .zip(&tile_max)
            .map(|(&old, &new)| T::of(old.max(new.f64())))
            .collect();
        let mut tile_sum = vec![T::zero(); key_len];
        simd::column_exp_sums(tile, &shift, &mut tile_sum);
        let sum = &mut self.sum[k0..k0 + key_len];
        for c in 0..key_len {
            let new_max = shift[c].f64();
            if new_max == f64::NEG_INFINITY {
                continue;
            }
            sum[c] = rescaled(sum[c], max[c], new_max) + tile_sum[c].f64();
            max[c] = new_max;
        }
    }

    fn merge(mut self, other: Self) -> Self {
        for c in 0..self.max.len() {
            let new_max = self.max[c].max(other.max[c]);
            self.sum[c] = rescaled(self.sum[c], self.max[c], new_max)
                + rescaled(other.sum[c], other.max[c], new_max);
            self.max[c] = new_max;
        }
        self
    }

    fn lse(self) -> Vec<f64> {
        self.max
            .iter()
            .zip(&self.sum)
            .map(|(m, s)| m + s.ln())
            .collect()
    }
}

/// Key counts up to which [`forward_backward`] keeps a whole row strip of logits
/// (`sweep_rows x cols` per thread: 64 MiB of f32 at this bound) instead of sweeping twice.
pub const STRIP_MAX_COLS: usize = 65_536;

/// Forward and backward in one sweep, for the one-call losses: each row tile computes its whole
/// strip of logits (`sweep_rows x cols`, never `rows x cols`) with one GEMM, takes the row
/// log-sum-exp from it, turns it into `dlogit` in place and multiplies it out. That saves the
/// backward's recomputation of the logits and its second pass of exponentials: three GEMMs
/// instead of four (two instead of three without key gradients). `extra` adds one more logit to
/// row `i`'s softmax (MoCo's positive; its gradient is the caller's, from the returned lse).
/// Needs `cols <= STRIP_MAX_COLS`; no `d log_scale`.
pub fn forward_backward<T: Real>(
    s: &Scores<'_, T>,
    extra: Option<&[f64]>,
    row_weight: &[f64],
    targets: &impl Targets,
    want_keys: bool,
) -> (RowStats, Grads<T>) {
    let (rows, cols, dim) = (s.rows, s.cols, s.dim);
    debug_assert!(cols <= STRIP_MAX_COLS);
    let mut lse = vec![0.0f64; rows];
    let mut target_logit = vec![0.0f64; rows];
    let mut dq = vec![T::zero(); rows * dim];
    let key_len_total = if want_keys { cols * dim } else { 0 };
    let scale = T::of(s.scale);
    let all_keys = s.key_tile(0, cols);
    let strip_rows = sweep_rows(rows);
    let dk = dq
        .par_chunks_mut(strip_rows * dim)
        .zip(lse.par_chunks_mut(strip_rows))
        .zip(target_logit.par_chunks_mut(strip_rows))
        .enumerate()
        .with_min_len(tiles_per_job(rows, strip_rows))
        .fold(
            || vec![T::zero(); key_len_total],
            |mut dk, (t, ((dq_tile, lse_tile), tgt_tile))| {
                let r0 = t * strip_rows;
                let row_len = lse_tile.len();
                let mut strip = vec![T::zero(); row_len * cols];
                s.logits(r0, row_len, 0, cols, &mut strip);
                for r in 0..row_len {
                    let i = r0 + r;
                    let row = &mut strip[r * cols..(r + 1) * cols];
                    targets.visit(i, 0..cols, &mut |j, w| tgt_tile[r] += w * row[j].f64());
                    let row_max = simd::row_max(row);
                    let max = match extra {
                        Some(extra) => T::of(row_max.f64().max(extra[i])),
                        None => row_max,
                    };
                    if max == T::neg_infinity() {
                        // Every key masked: no softmax, and nothing to differentiate.
                        lse_tile[r] = f64::NEG_INFINITY;
                        row.fill(T::zero());
                        continue;
                    }
                    let extra_exp = extra.map_or(0.0, |extra| (extra[i] - max.f64()).exp());
                    let sum = simd::exp_shifted_sum(row, max).f64() + extra_exp;
                    lse_tile[r] = max.f64() + sum.ln();
                    // dlogit = w * softmax - w * target.
                    let w = row_weight[i];
                    let factor = T::of(w / sum);
                    for x in row.iter_mut() {
                        *x *= factor;
                    }
                    targets.visit(i, 0..cols, &mut |j, target| row[j] -= T::of(w * target));
                }
                let g = MatRef::row_major(&strip, row_len, cols);
                T::gemm(scale, g, all_keys, T::zero(), dq_tile);
                if want_keys {
                    T::gemm(scale, g.t(), s.query_tile(r0, row_len), T::one(), &mut dk);
                }
                dk
            },
        )
        .reduce(
            || vec![T::zero(); key_len_total],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += *y;
                }
                a
            },
        );
    (
        RowStats {
            lse,
            target_logit,
            col_lse: Vec::new(),
        },
        Grads {
            queries: dq,
            keys: want_keys.then_some(dk),
            log_scale: 0.0,
        },
    )
}

dispatched! {
    /// `row[c] <- w * (exp(row[c] - lse) + exp(row[c] - col_lse[c]))`, returning CLIP's share of
    /// `d loss / d log(scale)` from this row when `centres` (the diagonal logits) are given, else 0.
    ///
    /// That derivative is `sum_ij dlogit_ij * logit_ij`, where `dlogit` sums to zero along every
    /// row (row softmax minus its target) and every column (column softmax minus its target). Summed
    /// as is, it cancels catastrophically when the logits cluster (early training): terms of size
    /// `scale` cancel to a result of size `scale * spread`. Each softmax is therefore taken against
    /// its own target's logit, `P_ij (l_ij - l_ii) + Q_ij (l_ij - l_jj)`: the same sum in exact
    /// arithmetic, with the targets' terms exactly zero and no large terms left to cancel.
    fn two_softmax_terms<T: Real>(
        row: &mut [T],
        w: T,
        lse: T,
        col_lse: &[T],
        centres: Option<(T, &[T], &mut [T])>,
    ) -> f64 {
        let Some((row_centre, col_centres, terms)) = centres else {
            for (x, &col) in row.iter_mut().zip(col_lse) {
                *x = w * ((*x - lse).exp_fast() + (*x - col).exp_fast());
            }
            return 0.0;
        };
        // The terms go to a scratch row and are summed after: a loop without a running sum
        // vectorizes.
        for (((x, &col), &col_centre), term) in row
            .iter_mut()
            .zip(col_lse)
            .zip(col_centres)
            .zip(terms.iter_mut())
        {
            let (row_softmax, col_softmax) = ((*x - lse).exp_fast(), (*x - col).exp_fast());
            *term = row_softmax * (*x - row_centre) + col_softmax * (*x - col_centre);
            *x = w * (row_softmax + col_softmax);
        }
        w.f64() * lane_sum(&terms[..row.len()]).f64()
    }
}

/// CLIP's column pass, folded into the row pass's backward sweep.
#[derive(Clone, Copy)]
pub struct ClipColumns<'a> {
    /// The column log-sum-exp.
    pub col_lse: &'a [f64],
    /// Also return `d loss / d log(scale)`.
    pub want_log_scale: bool,
}

/// The backward sweep for the loss `sum_i row_weight_i * (lse_i - target_logit_i)`:
/// `dlogit_ij = row_weight_i * (softmax_ij - target_ij)`, `dq = scale * dlogit k`,
/// `dk = scale * dlogit^T q`.
///
/// With `clip` (CLIP's symmetric loss: the column log-sum-exp, and whether `d loss / d
/// log(scale)` is wanted) the column softmax of the same logits joins in one sweep:
/// `dlogit_ij = row_weight_i * (softmax_ij + colsoftmax_ij - 2 target_ij)`, which is the row
/// pass plus the transposed column pass (the column loss's weight must equal the row's); the
/// targets must be the diagonal.
pub fn backward<T: Real>(
    s: &Scores<'_, T>,
    lse: &[f64],
    clip: Option<ClipColumns<'_>>,
    row_weight: &[f64],
    targets: &impl Targets,
    want_keys: bool,
) -> Grads<T> {
    let (rows, cols, dim) = (s.rows, s.cols, s.dim);
    // CLIP's log-scale derivative is taken against the diagonal logits (see two_softmax_terms).
    let centres: Option<Vec<T>> = clip
        .filter(|c| c.want_log_scale)
        .map(|_| (0..rows).map(|i| T::of(s.logit(i, i))).collect());
    // The column log-sum-exp in the compute type, converted once.
    let col_lse: Vec<T> = clip
        .map(|c| c.col_lse.iter().map(|&v| T::of(v)).collect())
        .unwrap_or_default();
    let mut dq = vec![T::zero(); rows * dim];
    // Each rayon job (one per thread) owns a dK accumulator (cols x dim, never rows x cols);
    // the jobs' accumulators are summed.
    let key_len_total = if want_keys { cols * dim } else { 0 };
    let scale = T::of(s.scale);
    let tile_rows = sweep_rows(rows);
    let (dk, log_scale) = dq
        .par_chunks_mut(tile_rows * dim)
        .enumerate()
        .with_min_len(tiles_per_job(rows, tile_rows))
        .fold(
            || (vec![T::zero(); key_len_total], 0.0f64),
            |(mut dk, mut log_scale), (t, dq_tile)| {
                let r0 = t * tile_rows;
                let row_len = dq_tile.len() / dim;
                let mut tile = vec![T::zero(); row_len * KEY_TILE];
                let mut terms = vec![T::zero(); if centres.is_some() { KEY_TILE } else { 0 }];
                for (k0, key_len) in tiles(cols, KEY_TILE) {
                    s.logits(r0, row_len, k0, key_len, &mut tile);
                    for r in 0..row_len {
                        let i = r0 + r;
                        let (lse_i, w) = (T::of(lse[i]), T::of(row_weight[i]));
                        let row = &mut tile[r * key_len..(r + 1) * key_len];
                        // dlogit = w * softmax (masked logits are -inf: exp gives 0).
                        match clip {
                            Some(_) => {
                                let col = &col_lse[k0..k0 + key_len];
                                let centres = centres
                                    .as_deref()
                                    .map(|c| (c[i], &c[k0..k0 + key_len], &mut terms[..key_len]));
                                log_scale += two_softmax_terms(row, w, lse_i, col, centres);
                            }
                            None => simd::weighted_exp(row, lse_i, w),
                        }
                        // The targets' own log-scale terms are zero against their centres.
                        let target_count = if clip.is_some() { 2.0 } else { 1.0 };
                        targets.visit(i, k0..k0 + key_len, &mut |j, target| {
                            row[j - k0] -= T::of(row_weight[i] * target * target_count);
                        });
                    }
                    // The scale is folded into the GEMMs' alpha.
                    let g = MatRef::row_major(&tile[..row_len * key_len], row_len, key_len);
                    // dq_tile += scale g k_tile
                    T::gemm(scale, g, s.key_tile(k0, key_len), T::one(), dq_tile);
                    if want_keys {
                        // dk[k0..] += scale g^T q_tile
                        T::gemm(
                            scale,
                            g.t(),
                            s.query_tile(r0, row_len),
                            T::one(),
                            &mut dk[k0 * dim..(k0 + key_len) * dim],
                        );
                    }
                }
                (dk, log_scale)
            },
        )
        .reduce(
            || (vec![T::zero(); key_len_total], 0.0f64),
            |(mut a, la), (b, lb)| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += *y;
                }
                (a, la + lb)
            },
        );
    Grads {
        queries: dq,
        keys: want_keys.then_some(dk),
        log_scale,
    }
}
