//! SigLIP's pairwise sigmoid loss, tiled: `logit_ij = exp(log_scale) s_ij + bias`, the loss
//! `(1/N) sum_ij softplus(-z_ij logit_ij)` with `z_ij = +1` on the diagonal and -1 elsewhere.
//!
//! No pair depends on another (no row statistics), so one sweep over the tiles of the pair
//! matrix gives the loss and, when asked, every gradient: `d loss / d logit_ij = (sigmoid(logit_ij)
//! - [i = j]) / N`. Row tiles run in parallel, key tiles in order; memory is one
//! `sweep_rows x KEY_TILE` tile per thread plus one b-gradient accumulator per job, never N x N.

use rayon::prelude::*;

use super::gemm::MatRef;
use super::simd::dispatched;
use super::softmax::tiles_per_job;
use super::{lane_sum, normalize, softplus, sweep_rows, Real, KEY_TILE};

/// One SigLIP problem: `a` (rows x dim) against `b` (cols x dim), the log of the logit scale
/// and the bias. With `positives`, `cols == rows` and pair `(i, i)` is a positive; without, every
/// pair is a negative (a block of another shard's `b`). Sizes are validated by the caller.
#[derive(Clone, Copy)]
pub struct Problem<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub positives: bool,
    pub dim: usize,
    pub log_scale: f64,
    pub bias: f64,
    /// Cosine similarity (a and b normalized first), else the dot product.
    pub normalize: bool,
}

/// Gradients of `grad_loss * loss`.
pub struct Grads<T> {
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub log_scale: f64,
    pub bias: f64,
}

/// What a job of the sweep adds up: the loss sum, the b gradient (pairs times a) and the two
/// scalar gradients.
struct Partial<T> {
    loss: f64,
    grad_b: Vec<T>,
    log_scale: f64,
    bias: f64,
}

impl<T: Real> Partial<T> {
    fn new(grad_b_len: usize) -> Self {
        Partial {
            loss: 0.0,
            grad_b: vec![T::zero(); grad_b_len],
            log_scale: 0.0,
            bias: 0.0,
        }
    }

    fn merge(mut self, other: Self) -> Self {
        for (x, y) in self.grad_b.iter_mut().zip(&other.grad_b) {
            *x += *y;
        }
        self.loss += other.loss;
        self.log_scale += other.log_scale;
        self.bias += other.bias;
        self
    }
}

impl<T: Real> Problem<'_, T> {
    /// The loss.
    pub fn forward(&self) -> f64 {
        self.sweep(None).0
    }

    /// The loss and the gradients of `grad_loss * loss`, from one sweep.
    pub fn forward_backward(&self, grad_loss: f64) -> (f64, Grads<T>) {
        let (loss, grads) = self.sweep(Some(grad_loss));
        (loss, grads.unwrap_or_else(|| unreachable!("asked for")))
    }

    /// The sweep over every tile: the loss, and the gradients when `grad_loss` is given.
    fn sweep(&self, grad_loss: Option<f64>) -> (f64, Option<Grads<T>>) {
        let (rows, cols, dim) = (self.rows, self.cols, self.dim);
        let (an, bn);
        let (a, b) = if self.normalize {
            an = normalize::forward(self.a, dim);
            bn = normalize::forward(self.b, dim);
            (&an[..], &bn[..])
        } else {
            (self.a, self.b)
        };
        let want = grad_loss.is_some();
        let weight = grad_loss.unwrap_or(0.0) / rows as f64;
        let scale = self.log_scale.exp();
        let (alpha, bias) = (T::of(scale), T::of(self.bias));
        let grad_alpha = T::of(scale * weight);
        let mut grad_a = vec![T::zero(); if want { rows * dim } else { 0 }];
        let tile_rows = sweep_rows(rows);
        let row_tiles = rows.div_ceil(tile_rows);
        let grad_a_tiles: Vec<&mut [T]> = if want {
            grad_a.chunks_mut(tile_rows * dim).collect()
        } else {
            (0..row_tiles).map(|_| &mut [][..]).collect()
        };
        let grad_b_len = if want { cols * dim } else { 0 };
        let total = grad_a_tiles
            .into_par_iter()
            .enumerate()
            .with_min_len(tiles_per_job(rows, tile_rows))
            .fold(
                || Partial::new(grad_b_len),
                |mut part, (t, grad_a_tile)| {
                    let r0 = t * tile_rows;
                    let row_len = tile_rows.min(rows - r0);
                    let a_tile =
                        MatRef::row_major(&a[r0 * dim..(r0 + row_len) * dim], row_len, dim);
                    // On the heap: up to 2 MiB, too much for a worker thread's stack.
                    #[allow(clippy::useless_vec)]
                    let mut tile = vec![T::zero(); row_len * KEY_TILE];
                    let mut scratch = Scratch::new(KEY_TILE);
                    for k0 in (0..cols).step_by(KEY_TILE) {
                        let key_len = KEY_TILE.min(cols - k0);
                        let b_tile =
                            MatRef::row_major(&b[k0 * dim..(k0 + key_len) * dim], key_len, dim);
                        let tile = &mut tile[..row_len * key_len];
                        // exp(log_scale) s_ij: the logit before its bias.
                        T::gemm(alpha, a_tile, b_tile.t(), T::zero(), tile);
                        for (r, row) in tile.chunks_mut(key_len).enumerate() {
                            let diagonal = (r0 + r)
                                .checked_sub(k0)
                                .filter(|&c| self.positives && c < key_len);
                            let pairs = scratch.row_terms(row, bias, diagonal, want);
                            part.loss += pairs.loss;
                            part.log_scale += pairs.log_scale;
                            part.bias += pairs.bias;
                        }
                        if want {
                            // The tile now holds dlogit; the scale and the weight join in alpha.
                            let g = MatRef::row_major(tile, row_len, key_len);
                            T::gemm(grad_alpha, g, b_tile, T::one(), grad_a_tile);
                            let grad_b = &mut part.grad_b[k0 * dim..(k0 + key_len) * dim];
                            T::gemm(grad_alpha, g.t(), a_tile, T::one(), grad_b);
                        }
                    }
                    part
                },
            )
            .reduce(|| Partial::new(grad_b_len), Partial::merge);
        let loss = total.loss / rows as f64;
        let (log_scale, bias) = (total.log_scale * weight, total.bias * weight);
        let grads = want.then(|| {
            let (grad_a, grad_b) = if self.normalize {
                (
                    normalize::backward(self.a, &grad_a, dim),
                    normalize::backward(self.b, &total.grad_b, dim),
                )
            } else {
                (grad_a, total.grad_b)
            };
            Grads {
                a: grad_a,
                b: grad_b,
                log_scale,
                bias,
            }
        });
        (loss, grads)
    }
}

/// A row's per-pair values before they are summed (one key tile wide): separate map and sum
/// loops vectorize where one fused loop does not.
struct Scratch<T> {
    loss: Vec<T>,
    log_scale: Vec<T>,
}

/// One row of a tile's sums: its loss terms, and (with gradients) the unweighted shares of the
/// scalar gradients.
struct PairTerms {
    loss: f64,
    log_scale: f64,
    bias: f64,
}

impl<T: Real> Scratch<T> {
    fn new(len: usize) -> Self {
        Scratch {
            loss: vec![T::zero(); len],
            log_scale: vec![T::zero(); len],
        }
    }

    /// Turns `row` (the scaled similarities of one row against a key tile) into its `dlogit`
    /// when `want` (left as is otherwise) and returns its sums. `diagonal` is the column of the
    /// row's positive, when the tile holds it.
    fn row_terms(
        &mut self,
        row: &mut [T],
        bias: T,
        diagonal: Option<usize>,
        want: bool,
    ) -> PairTerms {
        // Every pair as a negative first: the loss term softplus(logit), dlogit sigmoid(logit).
        let positive_scaled = diagonal.map(|c| {
            let scaled = row[c];
            // A logit so negative that its terms are exactly 0 (and 0 times it is 0, where
            // -inf would give NaN): out of the sums below; its own terms come after.
            row[c] = T::of(-1e30);
            (c, scaled)
        });
        let losses = &mut self.loss[..row.len()];
        let mut terms = PairTerms {
            loss: 0.0,
            log_scale: 0.0,
            bias: 0.0,
        };
        if want {
            let shares = &mut self.log_scale[..row.len()];
            negative_terms(row, losses, shares, bias);
            terms.log_scale = lane_sum(shares).f64();
            terms.bias = lane_sum(row).f64();
        } else {
            negative_losses(row, losses, bias);
        }
        terms.loss = lane_sum(losses).f64();
        if let Some((c, scaled)) = positive_scaled {
            // The positive: softplus(-logit), dlogit sigmoid(logit) - 1 = -sigmoid(-logit).
            let logit = scaled.f64() + bias.f64();
            terms.loss += softplus(-logit);
            let dlogit = -super::sigmoid(-logit);
            terms.log_scale += dlogit * scaled.f64();
            terms.bias += dlogit;
            row[c] = T::of(dlogit);
        }
        terms
    }
}

dispatched! {
    /// Every pair of `row` (scaled similarities) as a negative: `loss = softplus(x + bias)`,
    /// `share = sigmoid(x + bias) * x` (d logit / d log_scale is the scaled similarity) and
    /// `x <- sigmoid(x + bias)`, its dlogit.
    fn negative_terms<T: Real>(row: &mut [T], losses: &mut [T], shares: &mut [T], bias: T) {
        for ((x, loss), share) in row.iter_mut().zip(losses.iter_mut()).zip(shares.iter_mut()) {
            let (term, sigmoid) = (*x + bias).softplus_sigmoid();
            *loss = term;
            *share = sigmoid * *x;
            *x = sigmoid;
        }
    }

    /// `loss = softplus(x + bias)` for every pair of `row` as a negative.
    fn negative_losses<T: Real>(row: &[T], losses: &mut [T], bias: T) {
        for (x, loss) in row.iter().zip(losses.iter_mut()) {
            *loss = (*x + bias).softplus();
        }
    }
}
