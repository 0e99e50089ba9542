//! The naive reference: each loss written the way PyTorch eager runs it, in f32 on all cores.
//! The logit (or distance) matrix is materialized with one multithreaded GEMM, every step is a
//! separate pass that allocates its output (log-softmax, softmax-minus-target, ...), and the
//! backward goes through the materialized matrix with two more GEMMs. It uses the same GEMM as
//! contra (`crate::cpu::gemm`, rows split over the rayon pool), so the comparison measures the
//! fusion, not a different BLAS.
//!
//! Every function returns `(loss or checksum, first gradient)`; the unit tests check them against
//! contra's ops within 1e-4.

use rayon::prelude::*;

use crate::cpu::gemm::{Gemm, MatRef};
use crate::shared::Mining;

const EPS: f32 = 1e-12;

/// Rows of C per rayon task in [`par_gemm`].
fn gemm_chunk(m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (m.div_ceil(4 * threads)).clamp(16, 256)
}

/// `c = alpha * a * b + beta * c` (c dense row-major, `a.rows x b.cols`), rows of a and c split
/// over the rayon pool; each task is one single-threaded packed GEMM.
pub fn par_gemm(alpha: f32, a: MatRef<'_, f32>, b: MatRef<'_, f32>, beta: f32, c: &mut [f32]) {
    let (m, n) = (a.rows, b.cols);
    let c = &mut c[..m * n];
    if m == 0 || n == 0 {
        return;
    }
    let chunk = gemm_chunk(m);
    c.par_chunks_mut(chunk * n)
        .enumerate()
        .for_each(|(t, c_rows)| {
            let r0 = t * chunk;
            let rows = c_rows.len() / n;
            let sub = MatRef {
                data: &a.data[r0 * a.row_stride..],
                rows,
                cols: a.cols,
                row_stride: a.row_stride,
                col_stride: a.col_stride,
            };
            f32::gemm(alpha, sub, b, beta, c_rows);
        });
}

/// Row-wise `x / max(||x||, eps)` into a new matrix, and the clamped norms.
pub fn normalize(x: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / dim;
    let mut norms = vec![0.0f32; rows];
    norms
        .par_iter_mut()
        .zip(x.par_chunks(dim))
        .for_each(|(n, row)| *n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(EPS));
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(&norms)
        .for_each(|((yr, xr), &n)| {
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = v / n;
            }
        });
    (y, norms)
}

/// The gradient of `normalize` at x: `(gy - y (y . gy)) / norm`, a new matrix.
pub fn normalize_backward(y: &[f32], norms: &[f32], gy: &[f32], dim: usize) -> Vec<f32> {
    let mut gx = vec![0.0f32; y.len()];
    gx.par_chunks_mut(dim)
        .zip(y.par_chunks(dim).zip(gy.par_chunks(dim)))
        .zip(norms)
        .for_each(|((g, (yr, gr)), &n)| {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, &yv), &gv) in g.iter_mut().zip(yr).zip(gr) {
                *o = (gv - yv * dot) / n;
            }
        });
    gx
}

/// `scale * a b^T` (rows_a x rows_b), materialized.
fn scores(scale: f32, a: &[f32], b: &[f32], dim: usize) -> Vec<f32> {
    let (ra, rb) = (a.len() / dim, b.len() / dim);
    let mut s = vec![0.0f32; ra * rb];
    par_gemm(
        scale,
        MatRef::row_major(a, ra, dim),
        MatRef::row_major(b, rb, dim).t(),
        0.0,
        &mut s,
    );
    s
}

/// Row-wise log-softmax of a `rows x cols` matrix into a new matrix (masked entries are -inf).
fn log_softmax(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(o, row)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            for (o, &v) in o.iter_mut().zip(row) {
                *o = v - lse;
            }
        });
    out
}

/// `weight * (exp(logp) - onehot(target))` per row, a new matrix (the cross-entropy backward).
fn softmax_minus_target(logp: &[f32], cols: usize, targets: &[usize], weight: f32) -> Vec<f32> {
    let mut g = vec![0.0f32; logp.len()];
    g.par_chunks_mut(cols)
        .zip(logp.par_chunks(cols))
        .enumerate()
        .for_each(|(i, (g, row))| {
            for (o, &v) in g.iter_mut().zip(row) {
                *o = weight * v.exp();
            }
            g[targets[i]] -= weight;
        });
    g
}

fn mean_target(logp: &[f32], cols: usize, targets: &[usize]) -> f64 {
    let rows = targets.len();
    -(0..rows)
        .map(|i| logp[i * cols + targets[i]] as f64)
        .sum::<f64>()
        / rows as f64
}

/// `out = a^T-or-not * b` helpers for the backward: `scale * (g b)` (rows_g x dim) and
/// `scale * (g^T a)`.
fn g_times(scale: f32, g: &[f32], g_rows: usize, g_cols: usize, b: &[f32], dim: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; g_rows * dim];
    par_gemm(
        scale,
        MatRef::row_major(g, g_rows, g_cols),
        MatRef::row_major(b, g_cols, dim),
        0.0,
        &mut out,
    );
    out
}

fn gt_times(
    scale: f32,
    g: &[f32],
    g_rows: usize,
    g_cols: usize,
    a: &[f32],
    dim: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; g_cols * dim];
    par_gemm(
        scale,
        MatRef::row_major(g, g_rows, g_cols).t(),
        MatRef::row_major(a, g_rows, dim),
        0.0,
        &mut out,
    );
    out
}

fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_iter_mut().zip(b).for_each(|(x, &y)| *x += y);
}

/// The gradients of the queries and of the keys.
type QueryKeyGrads = (Vec<f32>, Vec<f32>);

/// InfoNCE of normalized q against normalized k with positives `targets`, optional self mask:
/// `(loss, dq, dk)`; the gradients only when `backward`.
fn softmax_ce(
    q: &[f32],
    k: &[f32],
    dim: usize,
    targets: &[usize],
    tau: f64,
    self_mask: bool,
    backward: bool,
) -> (f64, Option<QueryKeyGrads>) {
    let (rows, cols) = (q.len() / dim, k.len() / dim);
    let (qn, qnorm) = normalize(q, dim);
    let (kn, knorm) = normalize(k, dim);
    let scale = (1.0 / tau) as f32;
    let mut logits = scores(scale, &qn, &kn, dim);
    if self_mask {
        for i in 0..rows.min(cols) {
            logits[i * cols + i] = f32::NEG_INFINITY;
        }
    }
    let logp = log_softmax(&logits, cols);
    drop(logits);
    let loss = mean_target(&logp, cols, targets);
    if !backward {
        return (loss, None);
    }
    let g = softmax_minus_target(&logp, cols, targets, 1.0 / rows as f32);
    drop(logp);
    let dqn = g_times(scale, &g, rows, cols, &kn, dim);
    let dkn = gt_times(scale, &g, rows, cols, &qn, dim);
    drop(g);
    let dq = normalize_backward(&qn, &qnorm, &dqn, dim);
    let dk = normalize_backward(&kn, &knorm, &dkn, dim);
    (loss, Some((dq, dk)))
}

/// NT-Xent of z (rows x dim, rows i and i + rows/2 positives): loss and, with `backward`, dz.
pub fn ntxent(z: &[f32], dim: usize, tau: f64, backward: bool) -> (f64, Option<Vec<f32>>) {
    let rows = z.len() / dim;
    let targets: Vec<usize> = (0..rows).map(|i| (i + rows / 2) % rows).collect();
    // z is both the queries and the keys: normalize once, as `F.normalize(z) @ F.normalize(z).T`.
    let (zn, norm) = normalize(z, dim);
    let scale = (1.0 / tau) as f32;
    let mut logits = scores(scale, &zn, &zn, dim);
    for i in 0..rows {
        logits[i * rows + i] = f32::NEG_INFINITY;
    }
    let logp = log_softmax(&logits, rows);
    drop(logits);
    let loss = mean_target(&logp, rows, &targets);
    if !backward {
        return (loss, None);
    }
    let g = softmax_minus_target(&logp, rows, &targets, 1.0 / rows as f32);
    drop(logp);
    let mut dzn = g_times(scale, &g, rows, rows, &zn, dim);
    let dzn_t = gt_times(scale, &g, rows, rows, &zn, dim);
    drop(g);
    add_into(&mut dzn, &dzn_t);
    (loss, Some(normalize_backward(&zn, &norm, &dzn, dim)))
}

/// InfoNCE (cosine, positive of query i is key i, no self mask): loss and dq.
pub fn infonce(
    q: &[f32],
    k: &[f32],
    dim: usize,
    tau: f64,
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let targets: Vec<usize> = (0..q.len() / dim).collect();
    let (loss, grads) = softmax_ce(q, k, dim, &targets, tau, false, backward);
    (loss, grads.map(|(dq, _)| dq))
}

/// The backward of `scale an bn^T` (an, bn the normalized rows with their norms) from the
/// gradient of the logits `g`: da (db computed too, as autograd does, and dropped).
fn paired_backward(
    scale: f32,
    g: Vec<f32>,
    (an, anorm): (&[f32], &[f32]),
    (bn, bnorm): (&[f32], &[f32]),
    dim: usize,
) -> Vec<f32> {
    let rows = an.len() / dim;
    let dan = g_times(scale, &g, rows, rows, bn, dim);
    let dbn = gt_times(scale, &g, rows, rows, an, dim);
    drop(g);
    let _db = normalize_backward(bn, bnorm, &dbn, dim);
    normalize_backward(an, anorm, &dan, dim)
}

/// CLIP: `(CE(s an bn^T, diag) + CE((s an bn^T)^T, diag)) / 2` with `s = exp(log_scale)`: loss
/// and da.
pub fn clip(
    a: &[f32],
    b: &[f32],
    dim: usize,
    log_scale: f64,
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let rows = a.len() / dim;
    let (an, anorm) = normalize(a, dim);
    let (bn, bnorm) = normalize(b, dim);
    let scale = log_scale.exp() as f32;
    let logits = scores(scale, &an, &bn, dim);
    let logp_rows = log_softmax(&logits, rows);
    // logits.T is a view; log_softmax over it writes a new matrix (stored here transposed back).
    let mut logits_t = vec![0.0f32; rows * rows];
    logits_t
        .par_chunks_mut(rows)
        .enumerate()
        .for_each(|(j, out)| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = logits[i * rows + j];
            }
        });
    let logp_cols = log_softmax(&logits_t, rows);
    drop(logits_t);
    let diag: Vec<usize> = (0..rows).collect();
    let loss = 0.5 * (mean_target(&logp_rows, rows, &diag) + mean_target(&logp_cols, rows, &diag));
    if !backward {
        return (loss, None);
    }
    let w = 0.5 / rows as f32;
    let g_rows = softmax_minus_target(&logp_rows, rows, &diag, w);
    let g_cols = softmax_minus_target(&logp_cols, rows, &diag, w);
    drop((logp_rows, logp_cols));
    // g = g_rows + g_cols^T (the gradient of the logits).
    let mut g = g_rows;
    g.par_chunks_mut(rows).enumerate().for_each(|(i, row)| {
        for (j, x) in row.iter_mut().enumerate() {
            *x += g_cols[j * rows + i];
        }
    });
    drop(g_cols);
    // d log_scale = sum g * logits (computed, as autograd does, though only da is returned).
    let _grad_log_scale: f64 = g
        .par_iter()
        .zip(&logits)
        .map(|(&x, &l)| (x * l) as f64)
        .sum();
    drop(logits);
    let da = paired_backward(scale, g, (&an, &anorm), (&bn, &bnorm), dim);
    (loss, Some(da))
}

/// SigLIP as open_clip writes it: `logits = exp(log_scale) an bn^T + bias`, labels `2 I - 1`,
/// `loss = -sum(logsigmoid(labels * logits)) / N`, each step a materialized N x N matrix: loss
/// and da.
pub fn siglip(
    a: &[f32],
    b: &[f32],
    dim: usize,
    (log_scale, bias): (f64, f64),
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let rows = a.len() / dim;
    let (an, anorm) = normalize(a, dim);
    let (bn, bnorm) = normalize(b, dim);
    let scale = log_scale.exp() as f32;
    let mut logits = scores(scale, &an, &bn, dim);
    // open_clip adds the bias in place.
    logits.par_iter_mut().for_each(|l| *l += bias as f32);
    let label = |i: usize, j: usize| if i == j { 1.0f32 } else { -1.0 };
    // labels * logits, then -logsigmoid of it: two more matrices.
    let signed: Vec<f32> = logits
        .par_iter()
        .enumerate()
        .map(|(e, &l)| label(e / rows, e % rows) * l)
        .collect();
    let terms: Vec<f32> = signed.par_iter().map(|&x| softplus(-x)).collect();
    let loss = terms.par_iter().map(|&t| t as f64).sum::<f64>() / rows as f64;
    if !backward {
        return (loss, None);
    }
    drop(terms);
    // d loss / d logits = -labels * sigmoid(-labels * logits) / N.
    let w = 1.0 / rows as f32;
    let g: Vec<f32> = signed
        .par_iter()
        .enumerate()
        .map(|(e, &x)| -label(e / rows, e % rows) * sigmoid(-x) * w)
        .collect();
    drop(signed);
    // The scalar gradients, as autograd computes them (only da is returned).
    let _grad_bias: f64 = g.par_iter().map(|&x| x as f64).sum();
    let _grad_log_scale: f64 = g
        .par_iter()
        .zip(&logits)
        .map(|(&x, &l)| (x * (l - bias as f32)) as f64)
        .sum();
    drop(logits);
    let da = paired_backward(scale, g, (&an, &anorm), (&bn, &bnorm), dim);
    (loss, Some(da))
}

/// MoCo: `CE(cat([qn . kn, qn queue^T]) / tau, 0)`: loss and dq.
pub fn moco(
    q: &[f32],
    k: &[f32],
    queue: &[f32],
    dim: usize,
    tau: f64,
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let rows = q.len() / dim;
    let queue_len = queue.len() / dim;
    let (qn, qnorm) = normalize(q, dim);
    let (kn, _) = normalize(k, dim);
    let l_pos: Vec<f32> = qn
        .par_chunks(dim)
        .zip(kn.par_chunks(dim))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
        .collect();
    let l_neg = scores(1.0, &qn, queue, dim);
    let cols = queue_len + 1;
    let inv_tau = (1.0 / tau) as f32;
    let mut logits = vec![0.0f32; rows * cols];
    logits
        .par_chunks_mut(cols)
        .zip(l_neg.par_chunks(queue_len))
        .zip(&l_pos)
        .for_each(|((out, neg), &pos)| {
            out[0] = pos * inv_tau;
            for (o, &v) in out[1..].iter_mut().zip(neg) {
                *o = v * inv_tau;
            }
        });
    drop(l_neg);
    let logp = log_softmax(&logits, cols);
    drop(logits);
    let targets = vec![0usize; rows];
    let loss = mean_target(&logp, cols, &targets);
    if !backward {
        return (loss, None);
    }
    let g = softmax_minus_target(&logp, cols, &targets, 1.0 / rows as f32);
    drop(logp);
    // d qn = (g[:, 0] kn + g[:, 1:] queue) / tau
    let mut dqn = vec![0.0f32; rows * dim];
    par_gemm(
        inv_tau,
        MatRef {
            data: &g[1..],
            rows,
            cols: queue_len,
            row_stride: cols,
            col_stride: 1,
        },
        MatRef::row_major(queue, queue_len, dim),
        0.0,
        &mut dqn,
    );
    dqn.par_chunks_mut(dim)
        .zip(kn.par_chunks(dim))
        .enumerate()
        .for_each(|(i, (d, kr))| {
            let w = g[i * cols] * inv_tau;
            for (o, &kv) in d.iter_mut().zip(kr) {
                *o += w * kv;
            }
        });
    (loss, Some(normalize_backward(&qn, &qnorm, &dqn, dim)))
}

/// SupCon (Khosla et al., contrast_mode "all"), features sample-major (row n·V + v): loss and
/// dfeatures. Like the reference code it builds the R x R positive mask.
pub fn supcon(
    features: &[f32],
    labels: &[i64],
    views: usize,
    dim: usize,
    (tau, base_tau): (f64, f64),
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let rows = features.len() / dim;
    let (f, norm) = normalize(features, dim);
    let scale = (1.0 / tau) as f32;
    let mut logits = scores(scale, &f, &f, dim);
    for i in 0..rows {
        logits[i * rows + i] = f32::NEG_INFINITY;
    }
    let label = |r: usize| labels[r / views];
    // mask[a][p] = 1 for p != a with the same label, as a float matrix (the reference's `mask`).
    let mut mask = vec![0.0f32; rows * rows];
    mask.par_chunks_mut(rows).enumerate().for_each(|(a, row)| {
        for (p, m) in row.iter_mut().enumerate() {
            if p != a && label(p) == label(a) {
                *m = 1.0;
            }
        }
    });
    let positives: Vec<f32> = mask.par_chunks(rows).map(|r| r.iter().sum()).collect();
    let logp = log_softmax(&logits, rows);
    drop(logits);
    let ratio = tau / base_tau;
    let per_anchor: Vec<f64> = logp
        .par_chunks(rows)
        .zip(mask.par_chunks(rows))
        .zip(&positives)
        .map(|((lp, m), &count)| {
            let s: f64 = lp
                .iter()
                .zip(m)
                .filter(|(_, &w)| w != 0.0)
                .map(|(&l, _)| l as f64)
                .sum();
            -ratio * s / count as f64
        })
        .collect();
    let loss = per_anchor.iter().sum::<f64>() / rows as f64;
    if !backward {
        return (loss, None);
    }
    // dlogit[a][j] = ratio / R * (softmax[a][j] - mask[a][j] / |P(a)|)
    let w = (ratio / rows as f64) as f32;
    let mut g = vec![0.0f32; rows * rows];
    g.par_chunks_mut(rows)
        .zip(logp.par_chunks(rows).zip(mask.par_chunks(rows)))
        .zip(&positives)
        .for_each(|((g, (lp, m)), &count)| {
            for ((o, &l), &mv) in g.iter_mut().zip(lp).zip(m) {
                *o = w * (l.exp() - mv / count);
            }
        });
    drop((logp, mask));
    let mut df = g_times(scale, &g, rows, rows, &f, dim);
    let df_t = gt_times(scale, &g, rows, rows, &f, dim);
    drop(g);
    add_into(&mut df, &df_t);
    (loss, Some(normalize_backward(&f, &norm, &df, dim)))
}

/// One mined triplet term of an anchor: `(p, n, d_ap - d_an + m)`.
type Term = (usize, usize, f32);

/// The triplet loss with Euclidean distance `sqrt(max(d2, 1e-12))` from the Gram matrix, as the
/// common PyTorch code computes it: the distance matrix, the mined terms `(a, p, n)` of each
/// anchor (batch-hard: the farthest positive and nearest negative; batch-all: every valid
/// triplet; semi-hard: per positive the nearest negative farther than it, else the farthest),
/// the mean of the terms' relu over the mining's count, and dx by autograd through the distance
/// matrix (dense N x N gradient, two GEMMs).
pub fn triplet(
    x: &[f32],
    labels: &[i64],
    dim: usize,
    margin: f64,
    mining: Mining,
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let rows = x.len() / dim;
    let sq: Vec<f32> = x
        .par_chunks(dim)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect();
    let gram = scores(1.0, x, x, dim);
    // dist = sqrt(max(sq_i + sq_j - 2 x_i.x_j, 1e-12)), a new matrix.
    let mut dist = vec![0.0f32; rows * rows];
    dist.par_chunks_mut(rows).enumerate().for_each(|(i, row)| {
        for (j, o) in row.iter_mut().enumerate() {
            *o = (sq[i] + sq[j] - 2.0 * gram[i * rows + j]).max(EPS).sqrt();
        }
    });
    drop(gram);
    let m = margin as f32;
    // Each anchor's mined terms (p, n, d_ap - d_an + m), and how many count in the mean.
    let mined: Vec<(Vec<Term>, usize)> = dist
        .par_chunks(rows)
        .enumerate()
        .map(|(a, row)| {
            let positives: Vec<usize> = (0..rows)
                .filter(|&j| j != a && labels[j] == labels[a])
                .collect();
            let negatives: Vec<usize> = (0..rows).filter(|&j| labels[j] != labels[a]).collect();
            if positives.is_empty() || negatives.is_empty() {
                return (Vec::new(), 0);
            }
            let term = |p: usize, n: usize| (p, n, row[p] - row[n] + m);
            let first_best = |set: &[usize], better: fn(f32, f32) -> bool| {
                set.iter()
                    .copied()
                    .reduce(|best, j| if better(row[j], row[best]) { j } else { best })
                    .unwrap_or(a)
            };
            let nearest = first_best(&negatives, |x, best| x < best);
            let farthest = first_best(&negatives, |x, best| x > best);
            match mining {
                Mining::BatchHard => {
                    let p = first_best(&positives, |x, best| x > best);
                    (vec![term(p, nearest)], 1)
                }
                Mining::BatchAll | Mining::SemiHardAll => {
                    let semi_only = mining == Mining::SemiHardAll;
                    let terms: Vec<_> = positives
                        .iter()
                        .flat_map(|&p| negatives.iter().map(move |&n| term(p, n)))
                        .filter(|&(p, n, _)| !semi_only || row[n] > row[p])
                        .collect();
                    let active = terms.iter().filter(|t| t.2 > 0.0).count();
                    (terms, active)
                }
                Mining::SemiHard => {
                    let terms: Vec<_> = positives
                        .iter()
                        .map(|&p| {
                            let farther = negatives
                                .iter()
                                .copied()
                                .filter(|&n| row[n] > row[p])
                                .reduce(|best, n| if row[n] < row[best] { n } else { best });
                            term(p, farther.unwrap_or(farthest))
                        })
                        .collect();
                    let count = terms.len();
                    (terms, count)
                }
            }
        })
        .collect();
    let count = mined.iter().map(|(_, c)| c).sum::<usize>().max(1);
    let loss = mined
        .iter()
        .flat_map(|(terms, _)| terms)
        .map(|&(_, _, v)| v.max(0.0) as f64)
        .sum::<f64>()
        / count as f64;
    if !backward {
        return (loss, None);
    }
    // d loss / d dist (dense, as autograd's scatter), then through the sqrt into d loss / d d2,
    // a new matrix.
    let w = 1.0 / count as f32;
    let mut g = vec![0.0f32; rows * rows];
    g.par_chunks_mut(rows)
        .zip(&mined)
        .enumerate()
        .for_each(|(a, (row, (terms, _)))| {
            for &(p, n, v) in terms {
                if v > 0.0 {
                    row[p] += w / (2.0 * dist[a * rows + p]);
                    row[n] -= w / (2.0 * dist[a * rows + n]);
                }
            }
        });
    drop(dist);
    // d2 = sq_i + sq_j - 2 G: dx = 2 x (rowsum g + colsum g) - 2 (g + g^T) x.
    let row_sum: Vec<f32> = g.par_chunks(rows).map(|r| r.iter().sum()).collect();
    let mut col_sum = vec![0.0f32; rows];
    for r in g.chunks(rows) {
        for (c, &v) in col_sum.iter_mut().zip(r) {
            *c += v;
        }
    }
    let mut dx = g_times(-2.0, &g, rows, rows, x, dim);
    let dx_t = gt_times(-2.0, &g, rows, rows, x, dim);
    drop(g);
    add_into(&mut dx, &dx_t);
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .enumerate()
        .for_each(|(i, (d, xr))| {
            let w = 2.0 * (row_sum[i] + col_sum[i]);
            for (o, &v) in d.iter_mut().zip(xr) {
                *o += w * v;
            }
        });
    (loss, Some(dx))
}

/// The Hadsell margin loss, one pass per eager op: loss and dx1.
pub fn margin(
    x1: &[f32],
    x2: &[f32],
    y: &[i64],
    dim: usize,
    margin: f64,
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let rows = y.len();
    let mut diff = vec![0.0f32; x1.len()];
    diff.par_iter_mut()
        .zip(x1.par_iter().zip(x2))
        .for_each(|(o, (&a, &b))| *o = a - b);
    let d2: Vec<f32> = diff
        .par_chunks(dim)
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().max(EPS))
        .collect();
    let d: Vec<f32> = d2.par_iter().map(|v| v.sqrt()).collect();
    let m = margin as f32;
    let terms: Vec<f32> = (0..rows)
        .into_par_iter()
        .map(|i| {
            if y[i] == 0 {
                0.5 * d2[i]
            } else {
                0.5 * (m - d[i]).max(0.0).powi(2)
            }
        })
        .collect();
    let loss = terms.iter().map(|&t| t as f64).sum::<f64>() / rows as f64;
    if !backward {
        return (loss, None);
    }
    // d loss / d d, then d d / d x1 = diff / d (0 where the clamp is active).
    let gd: Vec<f32> = (0..rows)
        .into_par_iter()
        .map(|i| {
            let dd = if y[i] == 0 {
                d[i]
            } else {
                -(m - d[i]).max(0.0)
            };
            let active = diff[i * dim..(i + 1) * dim]
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                >= EPS;
            if active {
                dd / (rows as f32 * d[i])
            } else {
                0.0
            }
        })
        .collect();
    let mut dx1 = vec![0.0f32; x1.len()];
    dx1.par_chunks_mut(dim)
        .zip(diff.par_chunks(dim))
        .zip(&gd)
        .for_each(|((o, df), &w)| {
            for (o, &v) in o.iter_mut().zip(df) {
                *o = w * v;
            }
        });
    let _dx2: Vec<f32> = dx1.par_iter().map(|v| -v).collect();
    (loss, Some(dx1))
}

fn softplus(x: f32) -> f32 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// NCE, one pass per eager op: loss and d s_pos.
pub fn nce(
    s_pos: &[f32],
    s_neg: &[f32],
    logq_pos: &[f32],
    logq_neg: &[f32],
    backward: bool,
) -> (f64, Option<Vec<f32>>) {
    let rows = s_pos.len();
    let k = s_neg.len() / rows;
    let ln_k = (k as f64).ln() as f32;
    let delta_pos: Vec<f32> = s_pos
        .par_iter()
        .zip(logq_pos)
        .map(|(&s, &q)| s - ln_k - q)
        .collect();
    let delta_neg: Vec<f32> = s_neg
        .par_iter()
        .zip(logq_neg)
        .map(|(&s, &q)| s - ln_k - q)
        .collect();
    let sp_neg: Vec<f32> = delta_neg.par_iter().map(|&x| softplus(x)).collect();
    let row_sums: Vec<f32> = sp_neg.par_chunks(k).map(|r| r.iter().sum()).collect();
    let loss = delta_pos
        .iter()
        .zip(&row_sums)
        .map(|(&dp, &s)| (softplus(-dp) + s) as f64)
        .sum::<f64>()
        / rows as f64;
    if !backward {
        return (loss, None);
    }
    let inv = 1.0 / rows as f32;
    let ds_pos: Vec<f32> = delta_pos.par_iter().map(|&x| -sigmoid(-x) * inv).collect();
    let _ds_neg: Vec<f32> = delta_neg.par_iter().map(|&x| sigmoid(x) * inv).collect();
    (loss, Some(ds_pos))
}

/// `F.normalize(x)` and, with `grad_y`, its backward: (sum of the first 64 outputs, dx).
pub fn normalize_op(x: &[f32], dim: usize, grad_y: Option<&[f32]>) -> (f64, Option<Vec<f32>>) {
    let (y, norms) = normalize(x, dim);
    let check = y.iter().take(64).map(|&v| v as f64).sum();
    (
        check,
        grad_y.map(|gy| normalize_backward(&y, &norms, gy, dim)),
    )
}

/// Cosine similarity matrix (N x M): the sum of its first 64 entries.
pub fn cosine_similarity(a: &[f32], b: &[f32], dim: usize) -> (f64, Vec<f32>) {
    let (an, _) = normalize(a, dim);
    let (bn, _) = normalize(b, dim);
    let s = scores(1.0, &an, &bn, dim);
    (s.iter().take(64).map(|&v| v as f64).sum(), s)
}

/// MoCo's `k.mul_(m).add_(q, alpha = 1 - m)`: two passes in place.
pub fn momentum(theta_k: &mut [f32], theta_q: &[f32], m: f64) {
    let m32 = m as f32;
    let rest = (1.0 - m) as f32;
    theta_k.par_iter_mut().for_each(|x| *x *= m32);
    theta_k
        .par_iter_mut()
        .zip(theta_q)
        .for_each(|(x, &q)| *x += rest * q);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::cases::{labels, uniform};
    use crate::{Device, Tensor};

    fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
    }

    fn close(name: &str, got: f64, want: f64) {
        let err = (got - want).abs() / want.abs().max(1.0);
        assert!(
            err < 1e-4,
            "{name}: naive {got} vs contra {want} (rel {err:e})"
        );
    }

    fn close_vec(name: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: lengths");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{name}: max error {worst:e} relative to the largest entry"
        );
    }

    #[test]
    fn par_gemm_matches_serial_gemm() {
        let (m, k, n) = (300, 17, 45);
        let a = uniform(m * k, 1);
        let b = uniform(n * k, 2);
        let mut want = vec![0.0f32; m * n];
        f32::gemm(
            0.5,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, n, k).t(),
            0.0,
            &mut want,
        );
        let mut got = vec![1.0f32; m * n];
        par_gemm(
            0.5,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, n, k).t(),
            0.0,
            &mut got,
        );
        close_vec("gemm", &got, &want);
        // Transposed A.
        let mut want_t = vec![0.0f32; k * k];
        f32::gemm(
            1.0,
            MatRef::row_major(&a, m, k).t(),
            MatRef::row_major(&a, m, k),
            0.0,
            &mut want_t,
        );
        let mut got_t = vec![0.0f32; k * k];
        par_gemm(
            1.0,
            MatRef::row_major(&a, m, k).t(),
            MatRef::row_major(&a, m, k),
            0.0,
            &mut got_t,
        );
        close_vec("gemm a^T", &got_t, &want_t);
    }

    #[test]
    fn ntxent_matches_contra() {
        for (rows, dim) in [(64, 16), (300, 32)] {
            let z = uniform(rows * dim, 5);
            let (loss, grad) = ntxent(&z, dim, 0.1, true);
            let out = crate::ntxent(
                &tensor(&z, &[rows, dim]),
                &crate::NtXentOptions { temperature: 0.1 },
            )
            .unwrap();
            close("ntxent loss", loss, out.loss.to_scalar().unwrap());
            close_vec(
                "ntxent grad",
                &grad.unwrap(),
                &out.grad_z.to_vec::<f32>().unwrap(),
            );
            assert_eq!(ntxent(&z, dim, 0.1, false).0, loss);
        }
    }

    #[test]
    fn infonce_matches_contra() {
        let (n, m, d) = (40, 56, 16);
        let (q, k) = (uniform(n * d, 1), uniform(m * d, 2));
        let (loss, grad) = infonce(&q, &k, d, 0.1, true);
        let positives: Vec<usize> = (0..n).collect();
        let opts = crate::InfoNceOptions {
            temperature: 0.1,
            normalize: true,
            self_mask: false,
        };
        let out = crate::infonce(
            &tensor(&q, &[n, d]),
            &tensor(&k, &[m, d]),
            &positives,
            &opts,
        )
        .unwrap();
        close("infonce loss", loss, out.loss.to_scalar().unwrap());
        close_vec(
            "infonce dq",
            &grad.unwrap(),
            &out.grad_q.to_vec::<f32>().unwrap(),
        );
    }

    #[test]
    fn clip_matches_contra() {
        let (n, d) = (48, 16);
        let (a, b) = (uniform(n * d, 3), uniform(n * d, 4));
        let log_scale = (1.0f64 / 0.07).ln();
        let (loss, grad) = clip(&a, &b, d, log_scale, true);
        let out = crate::clip(&tensor(&a, &[n, d]), &tensor(&b, &[n, d]), log_scale).unwrap();
        close("clip loss", loss, out.loss.to_scalar().unwrap());
        close_vec(
            "clip da",
            &grad.unwrap(),
            &out.grad_a.to_vec::<f32>().unwrap(),
        );
    }

    #[test]
    fn siglip_matches_contra() {
        let (n, d) = (48, 16);
        let (a, b) = (uniform(n * d, 3), uniform(n * d, 4));
        let (log_scale, bias) = (10f64.ln(), -10.0);
        let (loss, grad) = siglip(&a, &b, d, (log_scale, bias), true);
        let opts = crate::SigLipOptions::default();
        let (ta, tb) = (tensor(&a, &[n, d]), tensor(&b, &[n, d]));
        let out = crate::siglip(&ta, &tb, log_scale, bias, &opts).unwrap();
        close("siglip loss", loss, out.loss.to_scalar().unwrap());
        close_vec(
            "siglip da",
            &grad.unwrap(),
            &out.grad_a.to_vec::<f32>().unwrap(),
        );
    }

    #[test]
    fn moco_matches_contra() {
        let (n, queue_len, d) = (24, 100, 16);
        let (q, k, queue) = (
            uniform(n * d, 5),
            uniform(n * d, 6),
            uniform(queue_len * d, 7),
        );
        let (loss, grad) = moco(&q, &k, &queue, d, 0.2, true);
        let out = crate::moco(
            &tensor(&q, &[n, d]),
            &tensor(&k, &[n, d]),
            &tensor(&queue, &[queue_len, d]),
            &crate::MocoOptions { temperature: 0.2 },
        )
        .unwrap();
        close("moco loss", loss, out.loss.to_scalar().unwrap());
        close_vec(
            "moco dq",
            &grad.unwrap(),
            &out.grad_q.to_vec::<f32>().unwrap(),
        );
    }

    #[test]
    fn supcon_matches_contra() {
        let (n, v, d, c) = (20, 2, 16, 4);
        let f = uniform(n * v * d, 8);
        let y = labels(n, c);
        let (loss, grad) = supcon(&f, &y, v, d, (0.1, 0.07), true);
        let opts = crate::SupConOptions {
            temperature: 0.1,
            base_temperature: 0.07,
            ..Default::default()
        };
        let out = crate::supcon(&tensor(&f, &[n, v, d]), &y, &opts).unwrap();
        close("supcon loss", loss, out.loss.to_scalar().unwrap());
        close_vec(
            "supcon grad",
            &grad.unwrap(),
            &out.grad_features.to_vec::<f32>().unwrap(),
        );
    }

    #[test]
    fn triplet_matches_contra() {
        let (n, d, c) = (40, 16, 4);
        let x = uniform(n * d, 9);
        let y = labels(n, c);
        for mining in [
            Mining::BatchHard,
            Mining::BatchAll,
            Mining::SemiHard,
            Mining::SemiHardAll,
        ] {
            let (loss, grad) = triplet(&x, &y, d, 0.2, mining, true);
            let opts = crate::TripletOptions {
                distance: crate::Distance::Euclidean,
                mining,
                margin: 0.2,
                ..Default::default()
            };
            let out = crate::triplet(&tensor(&x, &[n, d]), &y, &opts).unwrap();
            close(
                &format!("triplet {mining:?} loss"),
                loss,
                out.loss.to_scalar().unwrap(),
            );
            close_vec(
                &format!("triplet {mining:?} grad"),
                &grad.unwrap(),
                &out.grad_x.to_vec::<f32>().unwrap(),
            );
        }
    }

    #[test]
    fn elementwise_ops_match_contra() {
        let (n, d) = (30, 8);
        let (x1, x2) = (uniform(n * d, 10), uniform(n * d, 11));
        let y: Vec<i64> = (0..n as i64).map(|i| i % 2).collect();
        let (loss, grad) = margin(&x1, &x2, &y, d, 1.0, true);
        let out = crate::margin_loss(
            &tensor(&x1, &[n, d]),
            &tensor(&x2, &[n, d]),
            &y,
            &crate::MarginOptions {
                margin: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        close("margin loss", loss, out.loss.to_scalar().unwrap());
        close_vec(
            "margin dx1",
            &grad.unwrap(),
            &out.grad_x1.to_vec::<f32>().unwrap(),
        );

        let (b, k) = (12, 7);
        let (sp, sn) = (uniform(b, 12), uniform(b * k, 13));
        let (qp, qn) = (
            crate::bench::cases::nce_logq(&uniform(b, 14), k),
            crate::bench::cases::nce_logq(&uniform(b * k, 15), k),
        );
        let (loss, grad) = nce(&sp, &sn, &qp, &qn, true);
        let out = crate::nce(
            &tensor(&sp, &[b]),
            &tensor(&sn, &[b, k]),
            &tensor(&qp, &[b]),
            &tensor(&qn, &[b, k]),
        )
        .unwrap();
        close("nce loss", loss, out.loss.to_scalar().unwrap());
        close_vec(
            "nce ds_pos",
            &grad.unwrap(),
            &out.grad_s_pos.to_vec::<f32>().unwrap(),
        );

        let gy = uniform(n * d, 16);
        let (_, gx) = normalize_op(&x1, d, Some(&gy));
        let want = crate::normalize_backward(&tensor(&x1, &[n, d]), &tensor(&gy, &[n, d])).unwrap();
        close_vec(
            "normalize backward",
            &gx.unwrap(),
            &want.to_vec::<f32>().unwrap(),
        );
        let (y_naive, _) = normalize(&x1, d);
        close_vec(
            "normalize",
            &y_naive,
            &crate::normalize(&tensor(&x1, &[n, d]))
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
        );

        let (_, s) = cosine_similarity(&x1, &x2, d);
        let want = crate::similarity(
            &tensor(&x1, &[n, d]),
            &tensor(&x2, &[n, d]),
            crate::Similarity::Cosine,
        )
        .unwrap();
        close_vec("cosine similarity", &s, &want.to_vec::<f32>().unwrap());

        let mut k_naive = x1.clone();
        momentum(&mut k_naive, &x2, 0.9);
        let mut k_contra = tensor(&x1, &[n * d]);
        crate::momentum_update(&mut k_contra, &tensor(&x2, &[n * d]), 0.9).unwrap();
        close_vec("momentum", &k_naive, &k_contra.to_vec::<f32>().unwrap());
    }
}
