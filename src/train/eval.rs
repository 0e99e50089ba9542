//! The evaluation protocol of learned features: k-nearest-neighbour accuracy under cosine
//! similarity and a linear probe (multinomial logistic regression trained here), on all the
//! training labels and on 10 labels per class.
//!
//! Features are row-major `n x dim` slices with one `i64` label per row. Scores are fractions in
//! [0, 1].
//!
//! ```
//! use contra::train::eval::knn_accuracy;
//! // Two well separated clusters.
//! let train = [1.0f32, 0.1, 0.9, 0.0, -1.0, 0.1, -0.9, -0.1];
//! let test = [0.8f32, 0.2, -0.7, 0.1];
//! let acc = knn_accuracy(&train, &[0, 0, 1, 1], &test, &[0, 1], 2, 1)?;
//! assert_eq!(acc, 1.0);
//! # Ok::<(), contra::Error>(())
//! ```

use rayon::prelude::*;
use serde_json::{json, Value};

use super::split::labels_per_class;
use crate::cpu::gemm::{Gemm, MatRef};
use crate::{Error, Result};

/// Checks `x` is `y.len() x dim`, non-empty and finite; returns the row count.
fn check_features(
    op: &'static str,
    x_arg: &'static str,
    x: &[f32],
    y: &[i64],
    dim: usize,
) -> Result<usize> {
    if dim == 0 {
        return Err(Error::invalid(op, "dim", "must be at least 1"));
    }
    let n = y.len();
    if n == 0 {
        return Err(Error::Empty {
            op,
            arg: x_arg,
            what: "no rows".into(),
        });
    }
    if n.checked_mul(dim) != Some(x.len()) {
        return Err(Error::shape(
            op,
            x_arg,
            &[x.len()],
            format!("{n} x {dim} elements (one row per label)"),
        ));
    }
    if let Some(k) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            op,
            arg: x_arg,
            row: k / dim,
            value: x[k] as f64,
        });
    }
    Ok(n)
}

/// Rows scaled to unit L2 norm (`x / max(||x||, 1e-12)`).
fn l2_normalized(x: &[f32], dim: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(dim).for_each(|row| {
        let norm = row
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        let inv = 1.0 / norm.max(1e-12);
        for v in row.iter_mut() {
            *v = (*v as f64 * inv) as f32;
        }
    });
    out
}

/// The majority label among `neighbours` (sorted by decreasing similarity); ties go to the label
/// with the larger summed similarity, then to the smaller label.
fn vote(neighbours: &[(f32, usize)], train_y: &[i64]) -> i64 {
    let mut tally: Vec<(i64, usize, f64)> = Vec::with_capacity(neighbours.len());
    for &(s, j) in neighbours {
        let l = train_y[j];
        match tally.iter_mut().find(|t| t.0 == l) {
            Some(t) => {
                t.1 += 1;
                t.2 += s as f64;
            }
            None => tally.push((l, 1, s as f64)),
        }
    }
    tally
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)).then(b.0.cmp(&a.0)))
        .map_or(0, |t| t.0)
}

/// kNN accuracies for several `ks` at once (one similarity pass): each test row is L2-normalized
/// and compared with the normalized training rows by cosine similarity; the prediction is the
/// majority label of the `k` most similar training rows, ties broken by the summed similarity.
pub fn knn_accuracies(
    train_x: &[f32],
    train_y: &[i64],
    test_x: &[f32],
    test_y: &[i64],
    dim: usize,
    ks: &[usize],
) -> Result<Vec<f64>> {
    const OP: &str = "knn_accuracy";
    let n_train = check_features(OP, "train_x", train_x, train_y, dim)?;
    let n_test = check_features(OP, "test_x", test_x, test_y, dim)?;
    if let Some(&k) = ks.iter().find(|&&k| k == 0 || k > n_train) {
        return Err(Error::invalid(
            OP,
            "k",
            format!("{k} neighbours, expected 1..={n_train} (the training rows)"),
        ));
    }
    let Some(&kmax) = ks.iter().max() else {
        return Ok(Vec::new());
    };
    let train = l2_normalized(train_x, dim);
    let test = l2_normalized(test_x, dim);
    const CHUNK: usize = 64;
    let correct: Vec<usize> = test
        .par_chunks(CHUNK * dim)
        .zip(test_y.par_chunks(CHUNK))
        .map(|(q, qy)| {
            let m = qy.len();
            let mut sims = vec![0.0f32; m * n_train];
            f32::gemm(
                1.0,
                MatRef::row_major(q, m, dim),
                MatRef::row_major(&train, n_train, dim).t(),
                0.0,
                &mut sims,
            );
            let mut correct = vec![0usize; ks.len()];
            let mut top: Vec<(f32, usize)> = Vec::with_capacity(kmax + 1);
            for (row, &label) in sims.chunks(n_train).zip(qy) {
                top.clear();
                for (j, &s) in row.iter().enumerate() {
                    if top.len() < kmax || s > top[top.len() - 1].0 {
                        let at = top.partition_point(|t| t.0 >= s);
                        top.insert(at, (s, j));
                        top.truncate(kmax);
                    }
                }
                for (c, &k) in correct.iter_mut().zip(ks) {
                    if vote(&top[..k], train_y) == label {
                        *c += 1;
                    }
                }
            }
            correct
        })
        .reduce(
            || vec![0; ks.len()],
            |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
        );
    Ok(correct.iter().map(|&c| c as f64 / n_test as f64).collect())
}

/// kNN accuracy with cosine similarity and `k` neighbours; see [`knn_accuracies`].
pub fn knn_accuracy(
    train_x: &[f32],
    train_y: &[i64],
    test_x: &[f32],
    test_y: &[i64],
    dim: usize,
    k: usize,
) -> Result<f64> {
    Ok(knn_accuracies(train_x, train_y, test_x, test_y, dim, &[k])?[0])
}

/// Settings of the linear probe.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeOptions {
    /// L2 penalty `l2 / 2 * ||W||^2` added to the mean cross-entropy (the bias is not
    /// penalized).
    pub l2: f64,
    /// Most L-BFGS iterations.
    pub max_iter: usize,
    /// Stop when the largest gradient component falls below this.
    pub grad_tol: f64,
    /// L-BFGS history length.
    pub history: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            l2: 1e-3,
            max_iter: 100,
            grad_tol: 1e-5,
            history: 10,
        }
    }
}

/// A multinomial logistic regression on standardized features.
#[derive(Clone, Debug)]
pub struct LinearProbe {
    pub dim: usize,
    pub classes: usize,
    /// Training mean of each feature.
    pub mean: Vec<f32>,
    /// `1 / std` of each feature on the training set (1 for a constant feature).
    pub inv_std: Vec<f32>,
    /// `classes x dim`, row-major.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    /// L-BFGS iterations run and the final objective.
    pub iterations: usize,
    pub loss: f64,
}

/// Rows standardized with `mean` and `inv_std`.
fn standardized(x: &[f32], mean: &[f32], inv_std: &[f32]) -> Vec<f32> {
    let dim = mean.len();
    let mut out = x.to_vec();
    out.par_chunks_mut(dim).for_each(|row| {
        for ((v, m), s) in row.iter_mut().zip(mean).zip(inv_std) {
            *v = (*v - m) * s;
        }
    });
    out
}

/// Logits `x W^T + b` of standardized rows.
fn logits(x: &[f32], m: usize, dim: usize, w: &[f32], b: &[f32]) -> Vec<f32> {
    let classes = b.len();
    let mut out = Vec::with_capacity(m * classes);
    for _ in 0..m {
        out.extend_from_slice(b);
    }
    f32::gemm(
        1.0,
        MatRef::row_major(x, m, dim),
        MatRef::row_major(w, classes, dim).t(),
        1.0,
        &mut out,
    );
    out
}

/// The objective (mean cross-entropy + l2 / 2 ||W||^2) and its gradient at `theta`
/// (`classes x dim` weights then `classes` biases).
fn objective(
    x: &[f32],
    y: &[usize],
    dim: usize,
    classes: usize,
    l2: f64,
    theta: &[f64],
) -> (f64, Vec<f64>) {
    let n = y.len();
    let nw = classes * dim;
    let w: Vec<f32> = theta[..nw].iter().map(|&v| v as f32).collect();
    let b: Vec<f32> = theta[nw..].iter().map(|&v| v as f32).collect();
    const CHUNK: usize = 1024;
    let inv_n = 1.0 / n as f64;
    let (loss, mut grad) = x
        .par_chunks(CHUNK * dim)
        .zip(y.par_chunks(CHUNK))
        .map(|(xc, yc)| {
            let m = yc.len();
            let mut g = logits(xc, m, dim, &w, &b);
            let mut loss = 0.0f64;
            let mut db = vec![0.0f64; classes];
            for (row, &label) in g.chunks_mut(classes).zip(yc) {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                let lse = max + sum.ln();
                loss += lse - row[label] as f64;
                for (c, v) in row.iter_mut().enumerate() {
                    let p = (*v as f64 - lse).exp() - if c == label { 1.0 } else { 0.0 };
                    db[c] += p;
                    *v = (p * inv_n) as f32;
                }
            }
            let mut dw = vec![0.0f32; nw];
            f32::gemm(
                1.0,
                MatRef::row_major(&g, m, classes).t(),
                MatRef::row_major(xc, m, dim),
                0.0,
                &mut dw,
            );
            let mut grad: Vec<f64> = dw.iter().map(|&v| v as f64).collect();
            grad.extend(db.iter().map(|&v| v * inv_n));
            (loss, grad)
        })
        .reduce(
            || (0.0, vec![0.0; nw + classes]),
            |(la, mut ga), (lb, gb)| {
                for (a, b) in ga.iter_mut().zip(&gb) {
                    *a += b;
                }
                (la + lb, ga)
            },
        );
    let mut f = loss * inv_n;
    for (g, &t) in grad[..nw].iter_mut().zip(&theta[..nw]) {
        *g += l2 * t;
        f += 0.5 * l2 * t * t;
    }
    (f, grad)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimizes `f` from `x` with L-BFGS and a backtracking (Armijo) line search; returns the
/// iterations run and the final value.
fn lbfgs(
    f: impl Fn(&[f64]) -> (f64, Vec<f64>),
    x: &mut [f64],
    opts: &ProbeOptions,
) -> (usize, f64) {
    let (mut fx, mut g) = f(x);
    let mut hist: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    let mut iter = 0;
    while iter < opts.max_iter {
        let gmax = g.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        if gmax <= opts.grad_tol {
            break;
        }
        iter += 1;
        // Two-loop recursion: d = -H g.
        let mut d: Vec<f64> = g.iter().map(|v| -v).collect();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, y, rho) in hist.iter().rev() {
            let a = rho * dot(s, &d);
            for (di, yi) in d.iter_mut().zip(y) {
                *di -= a * yi;
            }
            alphas.push(a);
        }
        if let Some((s, y, _)) = hist.back() {
            let gamma = dot(s, y) / dot(y, y);
            d.iter_mut().for_each(|v| *v *= gamma);
        }
        for ((s, y, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &d);
            for (di, si) in d.iter_mut().zip(s) {
                *di += (a - b) * si;
            }
        }
        let mut gd = dot(&g, &d);
        if gd >= 0.0 {
            hist.clear();
            d = g.iter().map(|v| -v).collect();
            gd = dot(&g, &d);
        }
        let mut t = if hist.is_empty() {
            1.0 / dot(&g, &g).sqrt().max(1e-12)
        } else {
            1.0
        };
        let mut accepted = None;
        for _ in 0..40 {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(a, b)| a + t * b).collect();
            let (fn_, gn) = f(&xn);
            if fn_.is_finite() && fn_ <= fx + 1e-4 * t * gd {
                accepted = Some((xn, fn_, gn));
                break;
            }
            t *= 0.5;
        }
        let Some((xn, fn_, gn)) = accepted else {
            break;
        };
        let s: Vec<f64> = xn.iter().zip(x.iter()).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).max(1e-300) {
            if hist.len() == opts.history.max(1) {
                hist.pop_front();
            }
            hist.push_back((s, y, 1.0 / sy));
        }
        x.copy_from_slice(&xn);
        let converged = (fx - fn_).abs() <= 1e-10 * fx.abs().max(fn_.abs()).max(1.0);
        fx = fn_;
        g = gn;
        if converged {
            break;
        }
    }
    (iter, fx)
}

/// Checks labels are in `0..classes`; returns them as indices.
fn class_indices(
    op: &'static str,
    arg: &'static str,
    y: &[i64],
    classes: usize,
) -> Result<Vec<usize>> {
    y.iter()
        .map(|&l| {
            if l >= 0 && (l as usize) < classes {
                Ok(l as usize)
            } else {
                Err(Error::invalid(
                    op,
                    arg,
                    format!("label {l} outside 0..{classes}"),
                ))
            }
        })
        .collect()
}

impl LinearProbe {
    /// Fits the probe to `x` (`y.len() x dim`) with labels in `0..classes`: features are
    /// standardized with their training mean and std, then the penalized mean cross-entropy is
    /// minimized by full-batch L-BFGS (the gradient is computed in parallel over row chunks).
    pub fn fit(
        x: &[f32],
        y: &[i64],
        dim: usize,
        classes: usize,
        opts: &ProbeOptions,
    ) -> Result<Self> {
        const OP: &str = "LinearProbe::fit";
        let n = check_features(OP, "x", x, y, dim)?;
        if classes < 2 {
            return Err(Error::invalid(
                OP,
                "classes",
                format!("{classes}, need at least 2"),
            ));
        }
        if !(opts.l2.is_finite() && opts.l2 >= 0.0) {
            return Err(Error::invalid(OP, "l2", format!("{} is not >= 0", opts.l2)));
        }
        let labels = class_indices(OP, "y", y, classes)?;
        // Two passes (mean, then squared deviations) so that a constant feature has a zero
        // variance, not a rounding residue.
        let mut sum = vec![0.0f64; dim];
        for row in x.chunks(dim) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        let mean64: Vec<f64> = sum.iter().map(|&s| s / n as f64).collect();
        let mut sq = vec![0.0f64; dim];
        for row in x.chunks(dim) {
            for ((q, &v), &m) in sq.iter_mut().zip(row).zip(&mean64) {
                *q += (v as f64 - m) * (v as f64 - m);
            }
        }
        let mean: Vec<f32> = mean64.iter().map(|&m| m as f32).collect();
        let inv_std: Vec<f32> = sq
            .iter()
            .map(|&q| {
                let std = (q / n as f64).sqrt();
                if std > 1e-12 {
                    (1.0 / std) as f32
                } else {
                    1.0
                }
            })
            .collect();
        let xs = standardized(x, &mean, &inv_std);
        let mut theta = vec![0.0f64; classes * dim + classes];
        let (iterations, loss) = lbfgs(
            |t| objective(&xs, &labels, dim, classes, opts.l2, t),
            &mut theta,
            opts,
        );
        let nw = classes * dim;
        Ok(LinearProbe {
            dim,
            classes,
            mean,
            inv_std,
            weights: theta[..nw].iter().map(|&v| v as f32).collect(),
            bias: theta[nw..].iter().map(|&v| v as f32).collect(),
            iterations,
            loss,
        })
    }

    /// The predicted class of each row of `x` (`n x dim`).
    pub fn predict(&self, x: &[f32]) -> Result<Vec<i64>> {
        const OP: &str = "LinearProbe::predict";
        if x.len() % self.dim != 0 {
            return Err(Error::shape(
                OP,
                "x",
                &[x.len()],
                format!("a multiple of dim = {}", self.dim),
            ));
        }
        let n = x.len() / self.dim;
        let fake = vec![0i64; n];
        if n > 0 {
            check_features(OP, "x", x, &fake, self.dim)?;
        }
        let xs = standardized(x, &self.mean, &self.inv_std);
        Ok(xs
            .par_chunks(1024 * self.dim)
            .flat_map_iter(|xc| {
                let m = xc.len() / self.dim;
                let l = logits(xc, m, self.dim, &self.weights, &self.bias);
                l.chunks(self.classes)
                    .map(|row| {
                        row.iter()
                            .enumerate()
                            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                            .map_or(0, |(c, _)| c as i64)
                    })
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    /// The fraction of rows of `x` predicted as their label in `y`.
    pub fn accuracy(&self, x: &[f32], y: &[i64]) -> Result<f64> {
        check_features("LinearProbe::accuracy", "x", x, y, self.dim)?;
        let pred = self.predict(x)?;
        let hits = pred.iter().zip(y).filter(|(p, l)| p == l).count();
        Ok(hits as f64 / y.len() as f64)
    }
}

/// Test accuracy of a linear probe fitted on the training features.
pub fn probe_accuracy(
    train_x: &[f32],
    train_y: &[i64],
    test_x: &[f32],
    test_y: &[i64],
    dim: usize,
    classes: usize,
    opts: &ProbeOptions,
) -> Result<f64> {
    LinearProbe::fit(train_x, train_y, dim, classes, opts)?.accuracy(test_x, test_y)
}

/// Mean and population standard deviation of repeated scores, with the scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
    pub values: Vec<f64>,
}

impl Spread {
    /// The spread of `values` (NaN mean and std when empty).
    pub fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        Spread {
            mean,
            std: var.sqrt(),
            values: values.to_vec(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({ "mean": self.mean, "std": self.std, "values": self.values })
    }
}

/// The scores of [`evaluate`], fractions in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct EvalScores {
    /// kNN accuracy (cosine similarity) with k = 1 and k = 5, all training labels.
    pub knn1: f64,
    pub knn5: f64,
    /// Linear probe trained on all training labels.
    pub probe_full: f64,
    /// Linear probe trained on 10 labels per class, one draw per seed, tested on the full test
    /// set.
    pub probe_10_per_class: Spread,
    /// 1-NN with the same 10 labels per class as the reference set.
    pub knn1_10_per_class: Spread,
}

impl EvalScores {
    /// The scores as a JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "knn1": self.knn1,
            "knn5": self.knn5,
            "probe_full": self.probe_full,
            "probe_10_per_class": self.probe_10_per_class.to_json(),
            "knn1_10_per_class": self.knn1_10_per_class.to_json(),
        })
    }
}

/// The full protocol with the default [`ProbeOptions`]; see [`evaluate_with`].
pub fn evaluate(
    train_x: &[f32],
    train_y: &[i64],
    test_x: &[f32],
    test_y: &[i64],
    dim: usize,
    classes: usize,
    seeds: &[u64],
) -> Result<EvalScores> {
    evaluate_with(
        train_x,
        train_y,
        test_x,
        test_y,
        dim,
        classes,
        seeds,
        &ProbeOptions::default(),
    )
}

/// The full protocol: kNN (k = 1, 5) and a linear probe on all training labels, then for each
/// seed a linear probe and 1-NN on 10 labels per class drawn with that seed (needs at least one
/// seed and 10 training rows of each class).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    train_x: &[f32],
    train_y: &[i64],
    test_x: &[f32],
    test_y: &[i64],
    dim: usize,
    classes: usize,
    seeds: &[u64],
    opts: &ProbeOptions,
) -> Result<EvalScores> {
    const OP: &str = "evaluate";
    if seeds.is_empty() {
        return Err(Error::invalid(OP, "seeds", "need at least one seed"));
    }
    check_features(OP, "train_x", train_x, train_y, dim)?;
    check_features(OP, "test_x", test_x, test_y, dim)?;
    class_indices(OP, "train_y", train_y, classes)?;
    class_indices(OP, "test_y", test_y, classes)?;
    let knn = knn_accuracies(train_x, train_y, test_x, test_y, dim, &[1, 5])?;
    let probe_full = probe_accuracy(train_x, train_y, test_x, test_y, dim, classes, opts)?;
    let (mut probe, mut nn) = (Vec::new(), Vec::new());
    for &seed in seeds {
        let idx = labels_per_class(train_y, 10, seed)?;
        let mut x = Vec::with_capacity(idx.len() * dim);
        for &i in &idx {
            x.extend_from_slice(&train_x[i * dim..(i + 1) * dim]);
        }
        let y: Vec<i64> = idx.iter().map(|&i| train_y[i]).collect();
        probe.push(probe_accuracy(&x, &y, test_x, test_y, dim, classes, opts)?);
        nn.push(knn_accuracy(&x, &y, test_x, test_y, dim, 1)?);
    }
    Ok(EvalScores {
        knn1: knn[0],
        knn5: knn[1],
        probe_full,
        probe_10_per_class: Spread::of(&probe),
        knn1_10_per_class: Spread::of(&nn),
    })
}
