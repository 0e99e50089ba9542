//! Property tests of every public op over shapes (1..=70, odd sizes, 33, 65, 67), dtypes (f32, f64,
//! bf16, f16), devices (`Cpu`, `Interp`) and value ranges (issue 13, part 7).
//!
//! Each op has a property per regime and device:
//!
//! - `moderate`: norms 1e-3..1e3, temperatures 0.05..10, plus clustered and axis-aligned batches
//!   and degenerate labels; every call must succeed and agree with the f64 CPU reference;
//! - `extreme`: norms from 1e-30 to 1e25 (one outlier row or zero row too), temperatures 1e-3..1e3,
//!   clusters down to a spread of 1e-7; an `Err` is allowed only where the result cannot be
//!   represented (those cases are counted, not compared);
//! - `overflow`: entries whose squares or products overflow f32 (1e19.3..1e38.2; 2e4 for f16; f64
//!   beyond f32 on the interpreted kernels): a result that cannot be represented must be an `Err`
//!   (not inf / NaN), and everything that can be represented must still be right.
//!
//! Every case checks (a) no panic, crash or hang, (b) finite outputs within the tolerance of
//! `properties/support.rs` (its module docs derive it) of the f64 CPU reference, (c) every `Err`
//! names an argument or the op. On the CPU in the moderate regime the f64 reference is also
//! checked against itself: its loss against a naive f64 formula of the loss, its gradients against
//! central finite differences of its loss.
//!
//! Run: `cargo test --release --test properties -- --nocapture` (each property prints its case
//! count). `CONTRA_PROPTEST_CASES=N` sets the cases of each CPU property (default 128) and,
//! divided by 4, of each interpreted-kernel property (default 32; `CONTRA_PROPTEST_INTERP_CASES` sets it
//! alone); `CONTRA_PROPTEST_SEED`, `CONTRA_PROPTEST_SHRINK_S` (seconds of shrinking per failure
//! class; default 5 on the CPU, 10 interpreted) and `CONTRA_PROPTEST_HANG_S` (seconds before a call counts as hung) tune the rest.

use contra::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::result::Result;

#[path = "properties/support.rs"]
mod support;
use support::*;

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

fn ctx(
    op: &'static str,
    device: Device,
    dtype: DType,
    regime: Regime,
    cpu_f64: bool,
    desc: String,
) -> Ctx {
    Ctx {
        op,
        device,
        dtype,
        regime,
        prec: prec(device, dtype, cpu_f64),
        desc,
    }
}

/// An `Err` is acceptable when an input does not fit the f32 the op computes in.
fn input_beyond_compute(prec: &Prec, inputs: &[&[f64]]) -> Option<String> {
    let max = inputs
        .iter()
        .flat_map(|v| v.iter())
        .fold(0.0f64, |m, x| m.max(x.abs()));
    (max > prec.compute_max).then(|| format!("an input ({max:e}) is beyond the compute type"))
}

/// A softmax loss is out of range for its compute precision when its logits (up to `l` in
/// magnitude) cannot be resolved to within one nat: their rounding error `u * l` (`u` the compute
/// type's roundoff, or the 16-bit operands' on the tensor-core path) reaches 1, so
/// the probabilities are undetermined by a factor of e or more (and the backward's recomputed
/// logits may exceed the forward's log-sum-exp by enough to overflow `exp`). That is also the case
/// when the logits or the unscaled scores overflow. The cosine losses (`l <= 1 / tau <= 1e3`)
/// never get here; raw InfoNCE and MoCo's unnormalized queue do.
fn softmax_out_of_range(prec: &Prec, l: f64) -> Option<String> {
    let u = prec.u_c.max(prec.u_in);
    (u * l >= 1.0).then(|| {
        format!(
            "logits up to {l:e}: their rounding error in the compute type ({:.1e} nats) exceeds one nat",
            u * l
        )
    })
}

fn tau_of(log_tau: f64) -> f64 {
    10f64.powf(log_tau)
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// `b`'s values laid out as `a`'s, for the second input of a pairwise loss (CLIP, margin): so
/// clustered batches are clustered on both sides, yet the values differ.
fn laid_out_as(a: &Values, b: &Values) -> Values {
    Values {
        layout: a.layout,
        ..*b
    }
}

/// The inputs as the f64 reference takes them (f64 on the CPU) and as the op under test does (the
/// case's dtype on its device): every op builds both from the same rounded values.
fn inputs<const N: usize>(
    parts: [(&[f64], &[usize]); N],
    dtype: DType,
    device: Device,
) -> ([Tensor; N], [Tensor; N]) {
    (
        parts.map(|(v, shape)| host_f64(v, shape)),
        parts.map(|(v, shape)| tensor(v, shape, dtype, device)),
    )
}

/// The reference's run (the single call `one` on the f64 inputs `refs`) and the runs under test:
/// both public forms of a loss, `one` and `split` (forward + backward), on the inputs under test
/// `devs`, named by `names` in messages.
fn one_and_split<I: Clone>(
    names: [&'static str; 2],
    refs: &I,
    devs: I,
    one: impl Fn(I) -> Outcome<Outs>,
    split: impl Fn(I) -> Outcome<Outs>,
) -> (Outcome<Outs>, Vec<(&'static str, Outcome<Outs>)>) {
    let reference = one(refs.clone());
    let variants = vec![(names[0], one(devs.clone())), (names[1], split(devs))];
    (reference, variants)
}

/// A loss and its tensor gradients as outputs (the loss first, as every loss op returns them).
fn loss_outs(loss: &Tensor, grads: &[(&'static str, &Tensor)]) -> contra::Result<Outs> {
    // Reading the loss is where an error found on the device surfaces.
    let mut outs = vec![("loss", Val::Scalar(loss.to_scalar()?))];
    for &(name, g) in grads {
        outs.push(tv(name, g)?);
    }
    Ok(outs)
}

/// The f64 reference's output `name` against a naive f64 formula of it (`what` names both), within
/// `rel` of it plus `abs`.
fn ref_close(
    want: &Outs,
    name: &str,
    naive: &[f64],
    rel: f64,
    abs: f64,
    what: &str,
) -> Result<(), String> {
    close(get_t(want, name), naive, Tol { rel, abs }, 0.0)
        .map_err(|m| format!("[REF_MISMATCH] f64 {what}: {m}"))
}

/// The f64 reference's loss against a naive f64 formula of it: agreement to 1e-10 relative, or to
/// 1e3 f64 roundings of terms of magnitude `loss_mag` over length-`dim` dot products (`dim` 0 for
/// terms that are plain scalars).
fn loss_vs_naive(
    op: &str,
    want: &Outs,
    naive: f64,
    dim: usize,
    loss_mag: f64,
) -> Result<(), String> {
    let abs = 1e3 * U_F64 * ((dim + 1) as f64).sqrt() * loss_mag;
    agree("loss", get_s(want, "loss"), naive, 1e-10, abs)
        .map_err(|e| format!("[REF_MISMATCH] f64 {op} loss vs naive formula: {e}"))
}

/// What the softmax losses (InfoNCE, NT-Xent, CLIP, MoCo, SupCon) judge alike, given the bound `L`
/// of their logits: the magnitude of the loss's terms, `ratio (2 L + ln(keys) + 1)`; the f64 loss
/// against its naive formula; the loss within `coef(1, D)` of that magnitude, each gradient within
/// `coef(L, D)` of its terms' magnitude; an `Err` excused by an input beyond the compute type or
/// by logits out of range.
struct SoftmaxLoss {
    op: &'static str,
    prec: Prec,
    dim: usize,
    logit_bound: f64,
    /// The magnitude of the loss's terms (also the scale of the finite-difference check's noise).
    mag: f64,
}

impl SoftmaxLoss {
    fn new(ctx: &Ctx, dim: usize, logit_bound: f64, keys: usize, ratio: f64) -> Self {
        let mag = ratio * (2.0 * logit_bound + (keys as f64).ln() + 1.0);
        SoftmaxLoss {
            op: ctx.op,
            prec: ctx.prec,
            dim,
            logit_bound,
            mag,
        }
    }

    fn check(&self, want: &Outs, naive: f64) -> Result<(), String> {
        loss_vs_naive(self.op, want, naive, self.dim, self.mag)
    }

    /// `grads`: each gradient and the magnitude of its terms.
    fn judgement(&self, grads: &[(&'static str, f64)], beyond: Option<String>) -> Judgement {
        let (prec, l, dim) = (&self.prec, self.logit_bound, self.dim);
        let mut floors = vec![("loss", prec.coef(1.0, dim) * self.mag)];
        floors.extend(grads.iter().map(|&(name, s)| (name, prec.coef(l, dim) * s)));
        Judgement::within(
            prec,
            &floors,
            beyond.or_else(|| softmax_out_of_range(prec, l)),
        )
    }
}

/// Central finite differences of the f64 reference's loss `f` along a random direction against
/// the reference's gradient. Skips points where `f` has a kink or jump within the step (mining,
/// relu, clamps): there one-sided slopes differ. `wrt`: each input of `f` with the reference's
/// gradient for it and its row length.
fn fd_check(
    what: &str,
    desc: &str,
    f: &dyn Fn(&[Vec<f64>]) -> contra::Result<f64>,
    wrt: &[(&[f64], &Tensor, usize)],
    seed: u64,
    loss_scale: f64,
) -> Result<bool, TestCaseError> {
    let x: Vec<Vec<f64>> = wrt.iter().map(|(x, _, _)| x.to_vec()).collect();
    let grads: Vec<Vec<f64>> = wrt
        .iter()
        .map(|(_, g, _)| g.to_vec_f64().unwrap())
        .collect();
    let v: Vec<Vec<f64>> = x
        .iter()
        .zip(wrt)
        .enumerate()
        .map(|(i, (xi, &(_, _, d)))| direction(xi, d, seed.wrapping_add(i as u64)))
        .collect();
    let h = 1e-6;
    let at = |t: f64| -> Result<f64, TestCaseError> {
        let xs: Vec<Vec<f64>> = x
            .iter()
            .zip(&v)
            .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + t * b).collect())
            .collect();
        f(&xs).map_err(|e| {
            fail(format!(
                "[FD_ERR] {what}: f64 loss failed near the point: {e}\n  case: {desc}"
            ))
        })
    };
    let (f0, fp, fm) = (at(0.0)?, at(h)?, at(-h)?);
    let fd = (fp - fm) / (2.0 * h);
    let gv: f64 = grads
        .iter()
        .zip(&v)
        .map(|(g, v)| g.iter().zip(v).map(|(g, v)| g * v).sum::<f64>())
        .sum();
    let gabs: f64 = grads
        .iter()
        .zip(&v)
        .map(|(g, v)| g.iter().zip(v).map(|(g, v)| (g * v).abs()).sum::<f64>())
        .sum();
    // Rounding noise of a difference quotient of f64 losses of magnitude `loss_scale`.
    let noise = 1e-12 * (f0.abs() + loss_scale + 1.0) / h;
    // The one-sided slopes differ by more than half the tolerance: a kink or jump within the
    // step (mining switching rows, a relu or clamp boundary), where the central difference is no
    // derivative. Smooth losses differ by h v^T H v, far below it.
    let tol = 1e-4 * gabs + noise;
    let curvature = ((fp - f0) - (f0 - fm)).abs() / h;
    if curvature > 0.5 * tol {
        return Ok(false);
    }
    if (fd - gv).abs() <= tol {
        Ok(true)
    } else {
        Err(fail(format!(
            "[FD_MISMATCH] {what}: the f64 gradient disagrees with finite differences of the f64 \
             loss: directional derivative {fd:.9e} (central differences), <grad, v> = {gv:.9e} \
             (sum of |terms| {gabs:.3e})\n  case: {desc}"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// normalize / normalize_backward
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct NormCase {
    dtype: DType,
    rows: usize,
    dim: usize,
    x: Values,
    grad_y: Values,
    seed: u64,
}

/// A dtype, two extents, two matrices' values and a seed: the cases of normalize (x and grad_y of
/// one shape) and of NCE (scores and log q of one shape).
fn two_matrices(
    regime: Regime,
) -> impl Strategy<Value = (DType, usize, usize, Values, Values, u64)> {
    (
        dtype(),
        extent(),
        extent(),
        values(regime),
        values(regime),
        any::<u64>(),
    )
}

fn norm_strategy(regime: Regime) -> impl Strategy<Value = NormCase> {
    two_matrices(regime).prop_map(|(dtype, rows, dim, x, grad_y, seed)| NormCase {
        dtype,
        rows,
        dim,
        x,
        grad_y,
        seed,
    })
}

fn normalize_case(regime: Regime, device: Device, c: NormCase) -> Result<Tally, TestCaseError> {
    let (rows, dim) = (c.rows, c.dim);
    let xv = matrix(c.seed, 1, rows, dim, &c.x, c.dtype, regime);
    let run = |[x]: [Tensor; 1]| guarded(move || Ok(vec![tv("y", &normalize(&x)?)?]));
    let (refs, devs) = inputs([(&xv, &[rows, dim])], c.dtype, device);
    let reference = run(refs);
    let variants = vec![("normalize", run(devs))];
    let desc = format!("{c:?}");
    let ctx = ctx("normalize", device, c.dtype, regime, false, desc);
    let beyond = input_beyond_compute(&ctx.prec, &[&xv]);
    let prec = ctx.prec;
    verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (naive, _) = unit_rows(&xv, dim);
        let what = "normalize vs x / max(||x||, 1e-12)";
        ref_close(want, "y", &naive, 1e-12, 0.0, what)?;
        let y = get_t(want, "y");
        Ok(Judgement::within(
            &prec,
            &[("y", prec.coef(1.0, dim) * norm(y))],
            beyond,
        ))
    })
}

fn normalize_backward_case(
    regime: Regime,
    device: Device,
    c: NormCase,
) -> Result<Tally, TestCaseError> {
    let (rows, dim) = (c.rows, c.dim);
    let xv = matrix(c.seed, 1, rows, dim, &c.x, c.dtype, regime);
    let gv = matrix(c.seed, 2, rows, dim, &c.grad_y, c.dtype, regime);
    let run = |[x, g]: [Tensor; 2]| {
        guarded(move || Ok(vec![tv("grad_x", &normalize_backward(&x, &g)?)?]))
    };
    let (refs, devs) = inputs([(&xv, &[rows, dim]), (&gv, &[rows, dim])], c.dtype, device);
    let reference = run(refs);
    let variants = vec![("normalize_backward", run(devs))];
    let desc = format!("{c:?}");
    let ctx = ctx("normalize", device, c.dtype, regime, false, desc);
    let beyond = input_beyond_compute(&ctx.prec, &[&xv, &gv]);
    let prec = ctx.prec;
    verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (y, n) = unit_rows(&xv, dim);
        let mut naive = Vec::with_capacity(xv.len());
        let mut mags = Vec::with_capacity(rows);
        for i in 0..rows {
            let (yi, gi) = (&y[i * dim..(i + 1) * dim], &gv[i * dim..(i + 1) * dim]);
            let ydg = dot(yi, gi);
            naive.extend(yi.iter().zip(gi).map(|(y, g)| (g - y * ydg) / n[i]));
            // |dy| + |y| |y . dy| <= 2 |dy|: the terms of row i before the division by n_i.
            mags.push(2.0 * norm(gi) / n[i]);
        }
        let s = norm(&mags);
        let what = "normalize_backward vs (dy - y (y.dy)) / n";
        ref_close(want, "grad_x", &naive, 1e-12, 1e-12 * s, what)?;
        Ok(Judgement::within(
            &prec,
            &[("grad_x", prec.coef(1.0, dim) * s)],
            beyond,
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// similarity
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SimCase {
    dtype: DType,
    kind: Similarity,
    rows: usize,
    cols: usize,
    dim: usize,
    a: Values,
    b: Values,
    seed: u64,
}

fn sim_strategy(regime: Regime) -> impl Strategy<Value = SimCase> {
    (
        dtype(),
        prop::sample::select(vec![
            Similarity::Dot,
            Similarity::Cosine,
            Similarity::SquaredEuclidean,
            Similarity::Euclidean,
        ]),
        (extent(), extent(), extent()),
        values(regime),
        values(regime),
        any::<u64>(),
    )
        .prop_map(|(dtype, kind, (rows, cols, dim), a, b, seed)| SimCase {
            dtype,
            kind,
            rows,
            cols,
            dim,
            a,
            b,
            seed,
        })
}

fn similarity_case(regime: Regime, device: Device, c: SimCase) -> Result<Tally, TestCaseError> {
    let (rows, cols, dim, kind) = (c.rows, c.cols, c.dim, c.kind);
    let av = matrix(c.seed, 1, rows, dim, &c.a, c.dtype, regime);
    let bv = matrix(c.seed, 2, cols, dim, &c.b, c.dtype, regime);
    let run = |[a, b]: [Tensor; 2]| guarded(move || Ok(vec![tv("s", &similarity(&a, &b, kind)?)?]));
    let (refs, devs) = inputs([(&av, &[rows, dim]), (&bv, &[cols, dim])], c.dtype, device);
    let reference = run(refs);
    let variants = vec![("similarity", run(devs))];
    let desc = format!("{c:?}");
    let ctx = ctx("similarity", device, c.dtype, regime, false, desc);
    let beyond = input_beyond_compute(&ctx.prec, &[&av, &bv]);
    let prec = ctx.prec;
    verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (an, bn) = (row_norms(&av, dim), row_norms(&bv, dim));
        let (au, _) = unit_rows(&av, dim);
        let (bu, _) = unit_rows(&bv, dim);
        let c1 = prec.coef(1.0, dim);
        let c64 = prec_f64().coef(1.0, dim);
        let mut naive = Vec::with_capacity(rows * cols);
        let mut bound = Vec::with_capacity(rows * cols);
        let mut bound64 = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            let ai = &av[i * dim..(i + 1) * dim];
            for j in 0..cols {
                let bj = &bv[j * dim..(j + 1) * dim];
                let sq = || -> f64 { ai.iter().zip(bj).map(|(x, y)| (x - y) * (x - y)).sum() };
                let (value, mag) = match kind {
                    Similarity::Dot => (dot(ai, bj), an[i] * bn[j]),
                    Similarity::Cosine => (
                        dot(&au[i * dim..(i + 1) * dim], &bu[j * dim..(j + 1) * dim]),
                        norm(&au[i * dim..(i + 1) * dim]) * norm(&bu[j * dim..(j + 1) * dim]),
                    ),
                    // The documented formula |a|^2 + |b|^2 - 2 a.b cancels for near rows.
                    Similarity::SquaredEuclidean | Similarity::Euclidean => {
                        (sq(), (an[i] + bn[j]) * (an[i] + bn[j]))
                    }
                };
                match kind {
                    Similarity::Euclidean => {
                        let d = value.max(1e-12).sqrt();
                        naive.push(d);
                        // An error e in d^2 moves d by at most min(sqrt(e), e / (2 d)).
                        let e = |c: f64| (c * mag).sqrt().min(c * mag / (2.0 * d));
                        bound.push(e(c1));
                        bound64.push(e(c64));
                    }
                    _ => {
                        naive.push(value);
                        bound.push(c1 * mag);
                        bound64.push(c64 * mag);
                    }
                }
            }
        }
        let what = "similarity vs naive loops";
        ref_close(want, "s", &naive, 1e-12, 4.0 * norm(&bound64), what)?;
        Ok(Judgement::within(&prec, &[("s", norm(&bound))], beyond))
    })
}

fn prec_f64() -> Prec {
    prec(Device::Cpu, DType::F64, false)
}

// ---------------------------------------------------------------------------------------------
// InfoNCE
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Positives {
    Random,
    /// `i -> i mod cols` (without the self mask: the matching key).
    Diagonal,
    /// Some query's positive is itself under the self mask: a documented error.
    MaskedSelf,
}

#[derive(Clone, Debug)]
struct InfoNceCase {
    dtype: DType,
    rows: usize,
    cols: usize,
    dim: usize,
    q: Values,
    k: Values,
    log_tau: f64,
    normalize: bool,
    self_mask: bool,
    positives: Positives,
    seed: u64,
}

fn infonce_strategy(regime: Regime) -> impl Strategy<Value = InfoNceCase> {
    (
        dtype(),
        (extent(), extent(), extent()),
        values(regime),
        values(regime),
        log_tau(regime),
        (any::<bool>(), any::<bool>()),
        prop_oneof![
            6 => Just(Positives::Random),
            2 => Just(Positives::Diagonal),
            1 => Just(Positives::MaskedSelf)
        ],
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (rows, cols, dim), q, k, log_tau, (normalize, self_mask), positives, seed)| {
                InfoNceCase {
                    dtype,
                    rows,
                    cols,
                    dim,
                    q,
                    k,
                    log_tau,
                    normalize,
                    self_mask,
                    positives,
                    seed,
                }
            },
        )
}

fn infonce_case(regime: Regime, device: Device, c: InfoNceCase) -> Result<Tally, TestCaseError> {
    use rand::{Rng, SeedableRng};
    let (rows, dim) = (c.rows, c.dim);
    let cols = if c.self_mask { rows } else { c.cols };
    let qv = matrix(c.seed, 1, rows, dim, &c.q, c.dtype, regime);
    let kv = matrix(c.seed, 2, cols, dim, &c.k, c.dtype, regime);
    let mut rng = rand::rngs::StdRng::seed_from_u64(c.seed ^ 0x9051);
    let mut expect = Expect::Valid;
    let positives: Vec<usize> = (0..rows)
        .map(|i| match c.positives {
            _ if c.self_mask && cols == 1 => {
                expect = Expect::Invalid(&["positives"]);
                0
            }
            Positives::Random | Positives::MaskedSelf if c.self_mask => {
                let p = rng.random_range(0..cols - 1);
                p + usize::from(p >= i)
            }
            Positives::Random | Positives::MaskedSelf => rng.random_range(0..cols),
            Positives::Diagonal if c.self_mask => (i + 1) % cols,
            Positives::Diagonal => i % cols,
        })
        .collect();
    let mut positives = positives;
    if let (Positives::MaskedSelf, true) = (c.positives, c.self_mask) {
        let i = (c.seed as usize) % rows;
        positives[i] = i;
        expect = Expect::Invalid(&["positives"]);
    }
    let opts = InfoNceOptions {
        temperature: tau_of(c.log_tau),
        normalize: c.normalize,
        self_mask: c.self_mask,
    };
    let (refs, devs) = inputs([(&qv, &[rows, dim]), (&kv, &[cols, dim])], c.dtype, device);
    let (reference, variants) = one_and_split(
        ["infonce", "infonce_forward + infonce_backward"],
        &refs,
        devs,
        |[q, k]: [Tensor; 2]| {
            let p = positives.clone();
            guarded(move || {
                let o = infonce(&q, &k, &p, &opts)?;
                loss_outs(&o.loss, &[("grad_q", &o.grad_q), ("grad_k", &o.grad_k)])
            })
        },
        |[q, k]: [Tensor; 2]| {
            let p = positives.clone();
            guarded(move || {
                let f = infonce_forward(&q, &k, &p, &opts)?;
                let (gq, gk) = infonce_backward(&q, &k, &p, &opts, &f.saved, 1.0)?;
                loss_outs(&f.loss, &[("grad_q", &gq), ("grad_k", &gk)])
            })
        },
    );
    let desc = format!("{c:?} (cols used {cols}, tau {:e})", opts.temperature);
    let ctx = ctx("infonce", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&qv, &kv]);
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, expect, reference, variants, |want| {
        let (qu, qn) = unit_rows(&qv, dim);
        let (ku, kn) = unit_rows(&kv, dim);
        let (q, k) = if c.normalize { (&qu, &ku) } else { (&qv, &kv) };
        let targets: Vec<Vec<(usize, f64)>> = positives.iter().map(|&p| vec![(p, 1.0)]).collect();
        let weights = vec![1.0 / rows as f64; rows];
        let m = SoftmaxTerms {
            q,
            k,
            rows,
            cols,
            dim,
            scale: 1.0 / opts.temperature,
            self_mask: c.self_mask,
            extra: None,
            targets: &targets,
            row_weight: &weights,
        }
        .eval();
        let loss = SoftmaxLoss::new(&ctx, dim, m.logit_bound, cols + 1, 1.0);
        loss_mag = loss.mag;
        loss.check(want, m.loss)?;
        let (sq, sk) = if c.normalize {
            (through_norm(&m.q, &qn), through_norm(&m.k, &kn))
        } else {
            (norm(&m.q), norm(&m.k))
        };
        Ok(loss.judgement(&[("grad_q", sq), ("grad_k", sk)], beyond))
    })?;
    if regime == Regime::Moderate && device == Device::Cpu && matches!(expect, Expect::Valid) {
        // The f64 reference's gradients are the gradients of its loss.
        let out = infonce(&refs[0], &refs[1], &positives, &opts).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            let q = host_f64(&x[0], &[rows, dim]);
            let k = host_f64(&x[1], &[cols, dim]);
            infonce_forward(&q, &k, &positives, &opts)?.loss.to_scalar()
        };
        let wrt = [(&qv[..], &out.grad_q, dim), (&kv[..], &out.grad_k, dim)];
        tally.fd(fd_check("infonce", &desc, &f, &wrt, c.seed, loss_mag)?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// NT-Xent
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct NtXentCase {
    dtype: DType,
    samples: usize,
    dim: usize,
    z: Values,
    log_tau: f64,
    seed: u64,
}

fn ntxent_strategy(regime: Regime) -> impl Strategy<Value = NtXentCase> {
    (
        dtype(),
        extent_upto(35),
        extent(),
        values(regime),
        log_tau(regime),
        any::<u64>(),
    )
        .prop_map(|(dtype, samples, dim, z, log_tau, seed)| NtXentCase {
            dtype,
            samples,
            dim,
            z,
            log_tau,
            seed,
        })
}

fn ntxent_case(regime: Regime, device: Device, c: NtXentCase) -> Result<Tally, TestCaseError> {
    let (rows, dim) = (2 * c.samples, c.dim);
    let zv = matrix(c.seed, 1, rows, dim, &c.z, c.dtype, regime);
    let opts = NtXentOptions {
        temperature: tau_of(c.log_tau),
    };
    let (refs, devs) = inputs([(&zv, &[rows, dim])], c.dtype, device);
    let (reference, variants) = one_and_split(
        ["ntxent", "ntxent_forward + ntxent_backward"],
        &refs,
        devs,
        |[z]: [Tensor; 1]| {
            guarded(move || {
                let o = ntxent(&z, &opts)?;
                loss_outs(&o.loss, &[("grad_z", &o.grad_z)])
            })
        },
        |[z]: [Tensor; 1]| {
            guarded(move || {
                let f = ntxent_forward(&z, &opts)?;
                let g = ntxent_backward(&z, &opts, &f.saved, 1.0)?;
                loss_outs(&f.loss, &[("grad_z", &g)])
            })
        },
    );
    let desc = format!("{c:?} (rows {rows}, tau {:e})", opts.temperature);
    let ctx = ctx("ntxent", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&zv]);
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (zu, zn) = unit_rows(&zv, dim);
        let targets: Vec<Vec<(usize, f64)>> = (0..rows)
            .map(|i| vec![((i + c.samples) % rows, 1.0)])
            .collect();
        let weights = vec![1.0 / rows as f64; rows];
        let m = SoftmaxTerms {
            q: &zu,
            k: &zu,
            rows,
            cols: rows,
            dim,
            scale: 1.0 / opts.temperature,
            self_mask: true,
            extra: None,
            targets: &targets,
            row_weight: &weights,
        }
        .eval();
        let loss = SoftmaxLoss::new(&ctx, dim, m.logit_bound, rows, 1.0);
        loss_mag = loss.mag;
        loss.check(want, m.loss)?;
        let mags: Vec<f64> = m.q.iter().zip(&m.k).map(|(a, b)| a + b).collect();
        Ok(loss.judgement(&[("grad_z", through_norm(&mags, &zn))], beyond))
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let out = ntxent(&refs[0], &opts).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            ntxent_forward(&host_f64(&x[0], &[rows, dim]), &opts)?
                .loss
                .to_scalar()
        };
        let wrt = [(&zv[..], &out.grad_z, dim)];
        tally.fd(fd_check("ntxent", &desc, &f, &wrt, c.seed, loss_mag)?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// CLIP
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ClipCase {
    dtype: DType,
    rows: usize,
    dim: usize,
    a: Values,
    b: Values,
    /// `log_scale = -ln(tau)`.
    log_tau: f64,
    seed: u64,
}

fn clip_strategy(regime: Regime) -> impl Strategy<Value = ClipCase> {
    // Now and then a batch of a few hundred rows (the scale gradient's error grows with N x N
    // terms), with few features to keep the interpreted kernels quick.
    let shape = prop_oneof![
        12 => (extent(), extent()),
        1 => (prop::sample::select(vec![128usize, 257, 333]), extent_upto(17)),
    ];
    (
        dtype(),
        shape,
        values(regime),
        values(regime),
        log_tau(regime),
        any::<u64>(),
    )
        .prop_map(|(dtype, (rows, dim), a, b, log_tau, seed)| ClipCase {
            dtype,
            rows,
            dim,
            a,
            b,
            log_tau,
            seed,
        })
}

fn clip_outs(loss: &Tensor, g: &ClipGrads) -> contra::Result<Outs> {
    let mut outs = loss_outs(loss, &[("grad_a", &g.grad_a), ("grad_b", &g.grad_b)])?;
    outs.push(("grad_log_scale", Val::Scalar(g.grad_log_scale.to_scalar()?)));
    Ok(outs)
}

fn clip_case(regime: Regime, device: Device, c: ClipCase) -> Result<Tally, TestCaseError> {
    let (rows, dim) = (c.rows, c.dim);
    let av = matrix(c.seed, 1, rows, dim, &c.a, c.dtype, regime);
    let bv = matrix(
        c.seed,
        2,
        rows,
        dim,
        &laid_out_as(&c.a, &c.b),
        c.dtype,
        regime,
    );
    let log_scale = -c.log_tau * std::f64::consts::LN_10;
    let (refs, devs) = inputs([(&av, &[rows, dim]), (&bv, &[rows, dim])], c.dtype, device);
    let [ar, br] = &refs;
    let (reference, variants) = one_and_split(
        ["clip", "clip_forward + clip_backward"],
        &refs,
        devs,
        |[a, b]: [Tensor; 2]| {
            guarded(move || {
                let o = clip(&a, &b, log_scale)?;
                let g = ClipGrads {
                    grad_a: o.grad_a,
                    grad_b: o.grad_b,
                    grad_log_scale: o.grad_log_scale,
                };
                clip_outs(&o.loss, &g)
            })
        },
        |[a, b]: [Tensor; 2]| {
            guarded(move || {
                let f = clip_forward(&a, &b, log_scale)?;
                let g = clip_backward(&a, &b, log_scale, &f.saved, 1.0)?;
                clip_outs(&f.loss, &g)
            })
        },
    );
    let desc = format!("{c:?} (b laid out as a; log_scale {log_scale})");
    let ctx = ctx("clip", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&av, &bv]);
    let prec = ctx.prec;
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (au, an) = unit_rows(&av, dim);
        let (bu, bn) = unit_rows(&bv, dim);
        let targets: Vec<Vec<(usize, f64)>> = (0..rows).map(|i| vec![(i, 1.0)]).collect();
        let weights = vec![0.5 / rows as f64; rows];
        let pass = |q: &[f64], k: &[f64]| {
            SoftmaxTerms {
                q,
                k,
                rows,
                cols: rows,
                dim,
                scale: log_scale.exp(),
                self_mask: false,
                extra: None,
                targets: &targets,
                row_weight: &weights,
            }
            .eval()
        };
        let (r, cl) = (pass(&au, &bu), pass(&bu, &au));
        let l = r.logit_bound;
        let loss = SoftmaxLoss::new(&ctx, dim, l, rows + 1, 1.0);
        loss_mag = loss.mag;
        loss.check(want, r.loss + cl.loss)?;
        let ma: Vec<f64> = r.q.iter().zip(&cl.k).map(|(x, y)| x + y).collect();
        let mb: Vec<f64> = r.k.iter().zip(&cl.q).map(|(x, y)| x + y).collect();
        // d loss / d log_scale = sum_i w_i sum_j (P_ij - T_ij) (l_ij - l_ii) is a small difference
        // of large terms for clustered batches (every l_ij close to l_ii): its error bound is
        // centred on the positive logit. An absolute error of c L in the logits moves it by at
        // most 2 c L (the logit terms) + 2 c L * centred (the probabilities' relative error times
        // the centred terms), plus the rounding of its N x N-term reduction.
        let centred = r.log_scale_centred + cl.log_scale_centred;
        let ls_abs = prec.coef(1.0, dim) * 2.0 * l * (1.0 + centred)
            + prec.coef_compute(1.0, rows * rows) * centred;
        let grads = [
            ("grad_a", through_norm(&ma, &an)),
            ("grad_b", through_norm(&mb, &bn)),
        ];
        let mut j = loss.judgement(&grads, beyond);
        let ls_tol = Tol {
            rel: prec.rel,
            abs: ls_abs,
        };
        j.tol.push(("grad_log_scale", ls_tol));
        Ok(j)
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let out = clip(ar, br, log_scale).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            clip_forward(
                &host_f64(&x[0], &[rows, dim]),
                &host_f64(&x[1], &[rows, dim]),
                log_scale,
            )?
            .loss
            .to_scalar()
        };
        let wrt = [(&av[..], &out.grad_a, dim), (&bv[..], &out.grad_b, dim)];
        tally.fd(fd_check("clip (a, b)", &desc, &f, &wrt, c.seed, loss_mag)?);
        // d loss / d log_scale, the scalar the issue saw with the wrong sign.
        let g = |ls: f64| clip_forward(ar, br, ls).and_then(|f| f.loss.to_scalar());
        let h = 1e-6;
        let (fp, fm, f0) = (
            g(log_scale + h).unwrap(),
            g(log_scale - h).unwrap(),
            out.loss.to_scalar().unwrap(),
        );
        let fd = (fp - fm) / (2.0 * h);
        let noise = 1e-12 * (f0.abs() + loss_mag) / h;
        if (fd - out.grad_log_scale.to_scalar().unwrap()).abs()
            > 1e-5 * fd.abs().max(out.grad_log_scale.to_scalar().unwrap().abs()) + noise
        {
            return Err(fail(format!(
                "[FD_MISMATCH] clip grad_log_scale {:.9e} but central differences of the f64 loss give {fd:.9e}\n  case: {desc}",
                out.grad_log_scale.to_scalar().unwrap()
            )));
        }
        tally.fd_checked += 1;
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// SigLIP
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SigLipCase {
    dtype: DType,
    rows: usize,
    dim: usize,
    a: Values,
    b: Values,
    /// `log_scale = -ln(10) log_tau`: logit scales 1 to 20 (moderate), 1e-3 to 1e3 (extreme).
    log_tau: f64,
    bias: f64,
    seed: u64,
}

fn siglip_strategy(regime: Regime) -> impl Strategy<Value = SigLipCase> {
    let shape = prop_oneof![
        12 => (extent(), extent()),
        1 => (prop::sample::select(vec![128usize, 257]), extent_upto(17)),
    ];
    let bias = match regime {
        Regime::Moderate => (-10.0f64..2.0).boxed(),
        Regime::Extreme => {
            prop_oneof![(-60.0f64..60.0), prop::sample::select(vec![-50.0, 50.0])].boxed()
        }
        Regime::Overflow => (-10.0f64..0.0).boxed(),
    };
    (
        dtype(),
        shape,
        values(regime),
        values(regime),
        log_tau(regime),
        bias,
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (rows, dim), a, b, log_tau, bias, seed)| SigLipCase {
                dtype,
                rows,
                dim,
                a,
                b,
                log_tau,
                bias,
                seed,
            },
        )
}

fn siglip_outs(loss: &Tensor, g: &SigLipGrads) -> contra::Result<Outs> {
    let mut outs = loss_outs(loss, &[("grad_a", &g.grad_a), ("grad_b", &g.grad_b)])?;
    outs.push(("grad_log_scale", Val::Scalar(g.grad_log_scale.to_scalar()?)));
    outs.push(("grad_bias", Val::Scalar(g.grad_bias.to_scalar()?)));
    Ok(outs)
}

fn siglip_case(regime: Regime, device: Device, c: SigLipCase) -> Result<Tally, TestCaseError> {
    let (rows, dim, bias) = (c.rows, c.dim, c.bias);
    let av = matrix(c.seed, 1, rows, dim, &c.a, c.dtype, regime);
    let bv = matrix(
        c.seed,
        2,
        rows,
        dim,
        &laid_out_as(&c.a, &c.b),
        c.dtype,
        regime,
    );
    let log_scale = -c.log_tau * std::f64::consts::LN_10;
    let opts = SigLipOptions::default();
    let (refs, devs) = inputs([(&av, &[rows, dim]), (&bv, &[rows, dim])], c.dtype, device);
    let [ar, br] = &refs;
    let (reference, variants) = one_and_split(
        ["siglip", "siglip_forward + siglip_backward"],
        &refs,
        devs,
        |[a, b]: [Tensor; 2]| {
            guarded(move || {
                let o = siglip(&a, &b, log_scale, bias, &opts)?;
                let g = SigLipGrads {
                    grad_a: o.grad_a,
                    grad_b: o.grad_b,
                    grad_log_scale: o.grad_log_scale,
                    grad_bias: o.grad_bias,
                };
                siglip_outs(&o.loss, &g)
            })
        },
        |[a, b]: [Tensor; 2]| {
            guarded(move || {
                let loss = siglip_forward(&a, &b, log_scale, bias, &opts)?;
                let g = siglip_backward(&a, &b, log_scale, bias, &opts, 1.0)?;
                siglip_outs(&loss, &g)
            })
        },
    );
    let desc = format!("{c:?} (b laid out as a; log_scale {log_scale})");
    let ctx = ctx("siglip", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&av, &bv]);
    let prec = ctx.prec;
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (au, an) = unit_rows(&av, dim);
        let (bu, bn) = unit_rows(&bv, dim);
        let scale = log_scale.exp();
        // Per pair: the loss term, the gradient G = (sigmoid(l) - [i = j]) / N, and the size of
        // what an error of coef(1, D) (scale + |l| + 1) in the logit moves: the term (by at most
        // that much) and G (by sigmoid' <= 1/4 of it).
        let (mut naive, mut mag, mut ls_mag, mut bias_mag) = (0.0, 0.0, 0.0, 0.0);
        let (mut mag_a, mut mag_b) = (vec![0.0; rows], vec![0.0; rows]);
        for i in 0..rows {
            for j in 0..rows {
                let cos: f64 = (0..dim).map(|d| au[i * dim + d] * bu[j * dim + d]).sum();
                let l = scale * cos + bias;
                let positive = i == j;
                naive += softplus(if positive { -l } else { l });
                let m = scale + l.abs() + 1.0;
                let g = (sigmoid(l) - if positive { 1.0 } else { 0.0 }) / rows as f64;
                let h = m * sigmoid(l) * sigmoid(-l) / rows as f64 + g.abs();
                mag += m;
                ls_mag += h * m;
                bias_mag += h;
                mag_a[i] += scale * h;
                mag_b[j] += scale * h;
            }
        }
        naive /= rows as f64;
        loss_mag = mag / rows as f64;
        loss_vs_naive("siglip", want, naive, dim, loss_mag)?;
        let c1 = prec.coef(1.0, dim) + prec.coef_compute(1.0, rows * rows);
        let floors = [
            ("loss", c1 * loss_mag),
            ("grad_a", c1 * through_norm(&mag_a, &an)),
            ("grad_b", c1 * through_norm(&mag_b, &bn)),
            ("grad_log_scale", c1 * ls_mag),
            ("grad_bias", c1 * bias_mag),
        ];
        Ok(Judgement::within(&prec, &floors, beyond))
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let out = siglip(ar, br, log_scale, bias, &opts).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            let (a, b) = (host_f64(&x[0], &[rows, dim]), host_f64(&x[1], &[rows, dim]));
            siglip_forward(&a, &b, log_scale, bias, &opts)?.to_scalar()
        };
        let wrt = [(&av[..], &out.grad_a, dim), (&bv[..], &out.grad_b, dim)];
        tally.fd(fd_check(
            "siglip (a, b)",
            &desc,
            &f,
            &wrt,
            c.seed,
            loss_mag,
        )?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// MoCo
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MocoCase {
    dtype: DType,
    rows: usize,
    queue_len: usize,
    dim: usize,
    q: Values,
    k: Values,
    queue: Values,
    log_tau: f64,
    seed: u64,
}

fn moco_strategy(regime: Regime) -> impl Strategy<Value = MocoCase> {
    (
        dtype(),
        (extent(), extent(), extent()),
        (values(regime), values(regime), values(regime)),
        log_tau(regime),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (rows, queue_len, dim), (q, k, queue), log_tau, seed)| MocoCase {
                dtype,
                rows,
                queue_len,
                dim,
                q,
                k,
                queue,
                log_tau,
                seed,
            },
        )
}

fn moco_case(regime: Regime, device: Device, c: MocoCase) -> Result<Tally, TestCaseError> {
    let (rows, kq, dim) = (c.rows, c.queue_len, c.dim);
    let qv = matrix(c.seed, 1, rows, dim, &c.q, c.dtype, regime);
    let kv = matrix(c.seed, 2, rows, dim, &c.k, c.dtype, regime);
    let uv = matrix(c.seed, 3, kq, dim, &c.queue, c.dtype, regime);
    let opts = MocoOptions {
        temperature: tau_of(c.log_tau),
    };
    let (refs, devs) = inputs(
        [(&qv, &[rows, dim]), (&kv, &[rows, dim]), (&uv, &[kq, dim])],
        c.dtype,
        device,
    );
    let [qr, kr, ur] = &refs;
    let (reference, variants) = one_and_split(
        ["moco", "moco_forward + moco_backward"],
        &refs,
        devs,
        |[q, k, u]: [Tensor; 3]| {
            guarded(move || {
                let o = moco(&q, &k, &u, &opts)?;
                loss_outs(&o.loss, &[("grad_q", &o.grad_q)])
            })
        },
        |[q, k, u]: [Tensor; 3]| {
            guarded(move || {
                let f = moco_forward(&q, &k, &u, &opts)?;
                let g = moco_backward(&q, &k, &u, &opts, &f.saved, 1.0)?;
                loss_outs(&f.loss, &[("grad_q", &g)])
            })
        },
    );
    let desc = format!("{c:?} (tau {:e})", opts.temperature);
    let ctx = ctx("moco", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&qv, &kv, &uv]);
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (qu, qn) = unit_rows(&qv, dim);
        let (ku, _) = unit_rows(&kv, dim);
        let weights = vec![1.0 / rows as f64; rows];
        let m = SoftmaxTerms {
            q: &qu,
            k: &uv,
            rows,
            cols: kq,
            dim,
            scale: 1.0 / opts.temperature,
            self_mask: false,
            extra: Some(&ku),
            targets: &[],
            row_weight: &weights,
        }
        .eval();
        let loss = SoftmaxLoss::new(&ctx, dim, m.logit_bound, kq + 2, 1.0);
        loss_mag = loss.mag;
        loss.check(want, m.loss)?;
        Ok(loss.judgement(&[("grad_q", through_norm(&m.q, &qn))], beyond))
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let out = moco(qr, kr, ur, &opts).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            moco_forward(&host_f64(&x[0], &[rows, dim]), kr, ur, &opts)?
                .loss
                .to_scalar()
        };
        let wrt = [(&qv[..], &out.grad_q, dim)];
        tally.fd(fd_check("moco", &desc, &f, &wrt, c.seed, loss_mag)?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// moco_enqueue
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct EnqueueCase {
    dtype: DType,
    queue_len: usize,
    rows: usize,
    dim: usize,
    queue: Values,
    k: Values,
    ptr: usize,
    /// `ptr` is `queue_len + ptr % 3`: a documented error.
    bad_ptr: bool,
    seed: u64,
}

fn enqueue_strategy(regime: Regime) -> impl Strategy<Value = EnqueueCase> {
    (
        dtype(),
        (extent(), extent(), extent()),
        values(regime),
        values(regime),
        0usize..1000,
        prop::bool::weighted(0.1),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (queue_len, rows, dim), queue, k, ptr, bad_ptr, seed)| EnqueueCase {
                dtype,
                queue_len,
                rows,
                dim,
                queue,
                k,
                ptr,
                bad_ptr,
                seed,
            },
        )
}

fn enqueue_case(regime: Regime, device: Device, c: EnqueueCase) -> Result<Tally, TestCaseError> {
    let (kq, rows, dim) = (c.queue_len, c.rows, c.dim);
    let uv = matrix(c.seed, 1, kq, dim, &c.queue, c.dtype, regime);
    let kv = matrix(c.seed, 2, rows, dim, &c.k, c.dtype, regime);
    let ptr = if c.bad_ptr {
        kq + c.ptr % 3
    } else {
        c.ptr % kq
    };
    let run = |[mut queue, k]: [Tensor; 2]| {
        guarded(move || {
            let next = moco_enqueue(&mut queue, &k, ptr)?;
            Ok(vec![tv("queue", &queue)?, ("ptr", Val::Int(next as u64))])
        })
    };
    let (refs, devs) = inputs([(&uv, &[kq, dim]), (&kv, &[rows, dim])], c.dtype, device);
    let reference = run(refs);
    let variants = vec![("moco_enqueue", run(devs))];
    let desc = format!("{c:?} (ptr {ptr})");
    let ctx = ctx("moco_enqueue", device, c.dtype, regime, false, desc);
    let beyond = input_beyond_compute(&ctx.prec, &[&uv, &kv]);
    let prec = ctx.prec;
    let expect = if c.bad_ptr {
        Expect::Invalid(&["ptr"])
    } else {
        Expect::Valid
    };
    verdict(&ctx, expect, reference, variants, |want| {
        let (ku, _) = unit_rows(&kv, dim);
        let mut naive = uv.clone();
        for i in 0..rows {
            let slot = (ptr + i) % kq;
            naive[slot * dim..(slot + 1) * dim].copy_from_slice(&ku[i * dim..(i + 1) * dim]);
        }
        let what = "moco_enqueue vs naive ring buffer";
        ref_close(want, "queue", &naive, 1e-12, 0.0, what)?;
        match get(want, "ptr") {
            Val::Int(p) if *p as usize == (ptr + rows) % kq => {}
            other => {
                return Err(format!(
                    "[REF_MISMATCH] f64 moco_enqueue returned ptr {other:?}, want {}",
                    (ptr + rows) % kq
                ))
            }
        }
        let written = rows.min(kq) as f64;
        Ok(Judgement::within(
            &prec,
            &[("queue", prec.coef(1.0, dim) * written.sqrt())],
            beyond,
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// momentum_update
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MomentumCase {
    dtype: DType,
    shape: Vec<usize>,
    theta_k: Values,
    theta_q: Values,
    /// `m`; outside [0, 1] (or NaN) is a documented error.
    m: f64,
    seed: u64,
}

fn momentum_strategy(regime: Regime) -> impl Strategy<Value = MomentumCase> {
    let shape = prop_oneof![
        4 => (1usize..=300).prop_map(|n| vec![n]),
        4 => (extent(), extent()).prop_map(|(a, b)| vec![a, b]),
        1 => (1usize..=9, 1usize..=9, 1usize..=9).prop_map(|(a, b, c)| vec![a, b, c]),
        1 => prop::sample::select(vec![vec![0usize], vec![3, 0], vec![0, 5, 2]]),
    ];
    let m = prop_oneof![
        6 => 0.0f64..=1.0,
        2 => prop::sample::select(vec![0.0, 1.0, 0.5, 0.999, 1.0 - 1e-12, 1e-300]),
        1 => prop::sample::select(vec![-1e-9, 1.0 + 1e-9, 2.0, f64::NAN, f64::INFINITY]),
    ];
    (
        dtype(),
        shape,
        values(regime),
        values(regime),
        m,
        any::<u64>(),
    )
        .prop_map(|(dtype, shape, theta_k, theta_q, m, seed)| MomentumCase {
            dtype,
            shape,
            theta_k,
            theta_q,
            m,
            seed,
        })
}

fn momentum_case(regime: Regime, device: Device, c: MomentumCase) -> Result<Tally, TestCaseError> {
    let numel: usize = c.shape.iter().product();
    let rows = c.shape.first().copied().unwrap_or(1).max(1);
    let dim = numel / rows;
    let (kv, qv) = if numel == 0 {
        (vec![], vec![])
    } else {
        (
            matrix(c.seed, 1, rows, dim, &c.theta_k, c.dtype, regime),
            matrix(c.seed, 2, rows, dim, &c.theta_q, c.dtype, regime),
        )
    };
    let m = c.m;
    let run = |[mut k, q]: [Tensor; 2]| {
        guarded(move || {
            momentum_update(&mut k, &q, m)?;
            Ok(vec![tv("theta_k", &k)?])
        })
    };
    let (refs, devs) = inputs([(&kv, &c.shape), (&qv, &c.shape)], c.dtype, device);
    let reference = run(refs);
    let variants = vec![("momentum_update", run(devs))];
    let desc = format!("{c:?}");
    let ctx = ctx("momentum_update", device, c.dtype, regime, true, desc);
    let beyond = input_beyond_compute(&ctx.prec, &[&kv, &qv]);
    let prec = ctx.prec;
    let expect = if (0.0..=1.0).contains(&m) {
        Expect::Valid
    } else {
        Expect::Invalid(&["m"])
    };
    verdict(&ctx, expect, reference, variants, |want| {
        let naive: Vec<f64> = kv
            .iter()
            .zip(&qv)
            .map(|(k, q)| m * k + (1.0 - m) * q)
            .collect();
        let mags: Vec<f64> = kv
            .iter()
            .zip(&qv)
            .map(|(k, q)| m * k.abs() + (1.0 - m) * q.abs())
            .collect();
        let what = "momentum_update vs m k + (1 - m) q";
        ref_close(
            want,
            "theta_k",
            &naive,
            0.0,
            4.0 * U_F64 * norm(&mags),
            what,
        )?;
        Ok(Judgement::within(
            &prec,
            &[("theta_k", prec.coef(1.0, 1) * norm(&mags))],
            beyond,
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// SupCon
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SupConCase {
    dtype: DType,
    samples: usize,
    views: usize,
    dim: usize,
    features: Values,
    labels: Labels,
    log_tau: f64,
    /// `base_temperature = temperature * 10^log_base_ratio`.
    log_base_ratio: f64,
    seed: u64,
}

fn supcon_strategy(regime: Regime) -> impl Strategy<Value = SupConCase> {
    (
        dtype(),
        (extent_upto(35), 1usize..=3, extent()),
        values(regime),
        labels_mode(),
        log_tau(regime),
        -1.0f64..1.0,
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (samples, views, dim), features, labels, log_tau, log_base_ratio, seed)| {
                SupConCase {
                    dtype,
                    samples,
                    views,
                    dim,
                    features,
                    labels,
                    log_tau,
                    log_base_ratio,
                    seed,
                }
            },
        )
}

fn supcon_case(regime: Regime, device: Device, c: SupConCase) -> Result<Tally, TestCaseError> {
    let (n, v, dim) = (c.samples, c.views, c.dim);
    let rows = n * v;
    let fv = matrix(c.seed, 1, rows, dim, &c.features, c.dtype, regime);
    let labels = make_labels(c.labels, n, c.seed);
    let tau = tau_of(c.log_tau);
    let opts = SupConOptions {
        temperature: tau,
        base_temperature: tau * 10f64.powf(c.log_base_ratio),
        ..Default::default()
    };
    let shape = [n, v, dim];
    let (refs, devs) = inputs([(&fv, &shape)], c.dtype, device);
    let (reference, variants) = one_and_split(
        ["supcon", "supcon_forward + supcon_backward"],
        &refs,
        devs,
        |[f]: [Tensor; 1]| {
            let l = labels.clone();
            guarded(move || {
                let o = supcon(&f, &l, &opts)?;
                loss_outs(&o.loss, &[("grad_features", &o.grad_features)])
            })
        },
        |[f]: [Tensor; 1]| {
            let l = labels.clone();
            guarded(move || {
                let fw = supcon_forward(&f, &l, &opts)?;
                let g = supcon_backward(&f, &l, &opts, &fw.saved, 1.0)?;
                loss_outs(&fw.loss, &[("grad_features", &g)])
            })
        },
    );
    let desc = format!("{c:?} (labels {labels:?}, {opts:?})");
    let ctx = ctx("supcon", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&fv]);
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (fu, fnorm) = unit_rows(&fv, dim);
        let class = |r: usize| labels[r / v];
        let mut targets = Vec::with_capacity(rows);
        let mut weights = Vec::with_capacity(rows);
        let w = opts.temperature / opts.base_temperature / rows as f64;
        for a in 0..rows {
            let pos: Vec<usize> = (0..rows)
                .filter(|&j| j != a && class(j) == class(a))
                .collect();
            let t = 1.0 / pos.len().max(1) as f64;
            weights.push(if pos.is_empty() { 0.0 } else { w });
            targets.push(pos.into_iter().map(|j| (j, t)).collect::<Vec<_>>());
        }
        let m = SoftmaxTerms {
            q: &fu,
            k: &fu,
            rows,
            cols: rows,
            dim,
            scale: 1.0 / opts.temperature,
            self_mask: true,
            extra: None,
            targets: &targets,
            row_weight: &weights,
        }
        .eval();
        let ratio = opts.temperature / opts.base_temperature;
        let loss = SoftmaxLoss::new(&ctx, dim, m.logit_bound, rows, ratio);
        loss_mag = loss.mag;
        loss.check(want, m.loss)?;
        let mags: Vec<f64> = m.q.iter().zip(&m.k).map(|(a, b)| a + b).collect();
        Ok(loss.judgement(&[("grad_features", through_norm(&mags, &fnorm))], beyond))
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let out = supcon(&refs[0], &labels, &opts).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            supcon_forward(&host_f64(&x[0], &shape), &labels, &opts)?
                .loss
                .to_scalar()
        };
        let wrt = [(&fv[..], &out.grad_features, dim)];
        tally.fd(fd_check("supcon", &desc, &f, &wrt, c.seed, loss_mag)?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// Triplet
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct TripletCase {
    dtype: DType,
    rows: usize,
    dim: usize,
    x: Values,
    labels: Labels,
    distance: Distance,
    mining: Mining,
    /// `margin = 10^log_margin`, or 0.
    log_margin: Option<f64>,
    seed: u64,
}

fn triplet_strategy(regime: Regime) -> impl Strategy<Value = TripletCase> {
    (
        dtype(),
        (extent(), extent()),
        values(regime),
        labels_mode(),
        prop::sample::select(vec![
            Distance::Euclidean,
            Distance::SquaredEuclidean,
            Distance::Cosine,
        ]),
        prop::sample::select(vec![Mining::BatchAll, Mining::BatchHard, Mining::SemiHard]),
        prop::option::weighted(0.9, -3.0f64..1.0),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (rows, dim), x, labels, distance, mining, log_margin, seed)| TripletCase {
                dtype,
                rows,
                dim,
                x,
                labels,
                distance,
                mining,
                log_margin,
                seed,
            },
        )
}

fn triplet_outs(
    loss: &Tensor,
    count: u64,
    stats: TripletStats,
    g: &Tensor,
) -> contra::Result<Outs> {
    Ok(vec![
        ("loss", Val::Scalar(loss.to_scalar()?)),
        ("count", Val::Int(count)),
        ("hard", Val::Int(stats.hard)),
        ("semi_hard", Val::Int(stats.semi_hard)),
        ("easy", Val::Int(stats.easy)),
        tv("grad_x", g)?,
    ])
}

/// Pairwise distances as the op defines them, in f64 (direct differences).
fn distances(x: &[f64], n: usize, dim: usize, kind: Distance) -> Vec<f64> {
    let (u, _) = unit_rows(x, dim);
    let mut d = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let (a, b) = (&x[i * dim..(i + 1) * dim], &x[j * dim..(j + 1) * dim]);
            let sq: f64 = a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum();
            d[i * n + j] = match kind {
                Distance::Euclidean => sq.max(1e-12).sqrt(),
                Distance::SquaredEuclidean => sq,
                Distance::Cosine => {
                    1.0 - dot(&u[i * dim..(i + 1) * dim], &u[j * dim..(j + 1) * dim])
                }
            };
        }
    }
    d
}

fn triplet_case(regime: Regime, device: Device, c: TripletCase) -> Result<Tally, TestCaseError> {
    let (n, dim) = (c.rows, c.dim);
    let xv = matrix(c.seed, 1, n, dim, &c.x, c.dtype, regime);
    let labels = make_labels(c.labels, n, c.seed);
    let scale = 10f64.powf(clamp_log(c.x.log_scale, c.dtype, regime));
    // The margin lives on the distances' scale.
    let margin = c.log_margin.map_or(0.0, |l| {
        let s = match c.distance {
            Distance::Euclidean => scale,
            Distance::SquaredEuclidean => scale * scale,
            Distance::Cosine => 1.0,
        };
        10f64.powf(l) * s
    });
    let opts = TripletOptions {
        distance: c.distance,
        mining: c.mining,
        margin,
        ..Default::default()
    };
    let (refs, devs) = inputs([(&xv, &[n, dim])], c.dtype, device);
    let (reference, variants) = one_and_split(
        ["triplet", "triplet_forward + triplet_backward"],
        &refs,
        devs,
        |[x]: [Tensor; 1]| {
            let l = labels.clone();
            guarded(move || {
                let o = triplet(&x, &l, &opts)?;
                triplet_outs(&o.loss, o.counts.count()?, o.counts.stats()?, &o.grad_x)
            })
        },
        |[x]: [Tensor; 1]| {
            let l = labels.clone();
            guarded(move || {
                let f = triplet_forward(&x, &l, &opts)?;
                let g = triplet_backward(&x, &l, &opts, &f.saved, 1.0)?;
                triplet_outs(&f.loss, f.counts.count()?, f.counts.stats()?, &g)
            })
        },
    );
    let desc = format!("{c:?} (labels {labels:?}, margin {margin:e})");
    let ctx = ctx("triplet", device, c.dtype, regime, true, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&xv, &[margin]]);
    let prec = ctx.prec;
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |_want| {
        let d = distances(&xv, n, dim, c.distance);
        let xn = row_norms(&xv, dim);
        let c1 = prec.coef_compute(1.0, dim);
        // The error bound of each computed distance (|a|^2 + |b|^2 - 2 a.b cancels for near rows).
        let eps = |i: usize, j: usize| -> f64 {
            let sq_err = c1 * (xn[i] + xn[j]) * (xn[i] + xn[j]);
            match c.distance {
                Distance::SquaredEuclidean => sq_err,
                Distance::Euclidean => sq_err.sqrt().min(sq_err / (2.0 * d[i * n + j])),
                Distance::Cosine => 4.0 * c1,
            }
        };
        let mut eps_max = 0.0f64;
        let mut kappa = 1.0f64;
        let mut g_max = 0.0f64;
        let min_norm = xn.iter().fold(f64::INFINITY, |m, &v| m.min(v.max(1e-12)));
        for i in 0..n {
            for j in 0..n {
                if i == j {
                    continue;
                }
                eps_max = eps_max.max(eps(i, j));
                let dij = d[i * n + j];
                let sep = (xn[i] + xn[j]) / dij.max(1e-300);
                match c.distance {
                    Distance::Euclidean => {
                        g_max = 1.0;
                        if dij > 1e-6 {
                            kappa = kappa.max(0.5 * sep * sep);
                        }
                    }
                    Distance::SquaredEuclidean => {
                        g_max = g_max.max(2.0 * dij.sqrt());
                        kappa = kappa.max((xn[i] + xn[j]) / dij.sqrt().max(1e-300));
                    }
                    Distance::Cosine => {
                        g_max = 2.0 / min_norm;
                        kappa = 4.0;
                    }
                }
            }
        }
        // Robust decisions: every pair of distances a decision compares (positive vs negative and
        // positive + margin vs negative for the statistics and the terms; the best two candidates
        // of every mining selection) differs by more than their error bounds.
        // An exact tie of the f64 distances is robust only where the op computes them in f64 like
        // the reference (the CPU path): f32 kernels round the two sides of a tie differently
        // (1 - x.x / |x|^2 is not exactly 0 in f32), so there a tie is as fragile as a near-tie.
        let exact_ties_hold = !prec.computes_f32();
        let near = |u: f64, eu: f64, w: f64, ew: f64| {
            let gap = (u - w).abs();
            (gap > 0.0 || !exact_ties_hold) && gap <= eu + ew + 1e-12 * u.abs().max(w.abs())
        };
        // `fragile_stats`: a positive / negative pair within error of a statistics boundary
        // (d_an vs d_ap, d_an vs d_ap + m): every valid triplet is classified, so with many
        // triplets the f32 counts legitimately differ. `fragile_loss`: a decision the loss, count
        // and gradient depend on is within error.
        let mut fragile_stats = None;
        let mut fragile_loss = None;
        for a in 0..n {
            let dd = |j: usize| d[a * n + j];
            let pos: Vec<usize> = (0..n)
                .filter(|&j| j != a && labels[j] == labels[a])
                .collect();
            let neg: Vec<usize> = (0..n).filter(|&j| labels[j] != labels[a]).collect();
            let check = |what: &str, i: usize, si: f64, j: usize, fragile: &mut Option<String>| {
                if fragile.is_none() && near(dd(i) + si, eps(a, i), dd(j), eps(a, j)) {
                    *fragile = Some(format!(
                        "anchor {a}, {what}: d(a, {i}) = {:e}, d(a, {j}) = {:e}",
                        dd(i),
                        dd(j)
                    ));
                }
            };
            for &p in &pos {
                for &q in &neg {
                    check("hard / semi-hard boundary", p, 0.0, q, &mut fragile_stats);
                    check(
                        "semi-hard / easy boundary",
                        p,
                        margin,
                        q,
                        &mut fragile_stats,
                    );
                    if c.mining == Mining::BatchAll {
                        check("relu", p, margin, q, &mut fragile_loss);
                    }
                }
            }
            // The mining selections: the best candidate against the runner-up, and the relu of
            // the selected triplet.
            let sorted = |set: &[usize], largest: bool| -> Vec<usize> {
                let mut v = set.to_vec();
                v.sort_by(|&i, &j| dd(i).total_cmp(&dd(j)));
                if largest {
                    v.reverse();
                }
                v
            };
            match c.mining {
                Mining::BatchAll | Mining::SemiHardAll => {}
                Mining::BatchHard if !pos.is_empty() && !neg.is_empty() => {
                    let (sp, sn) = (sorted(&pos, true), sorted(&neg, false));
                    if sp.len() > 1 {
                        check("hardest positive", sp[0], 0.0, sp[1], &mut fragile_loss);
                    }
                    if sn.len() > 1 {
                        check("hardest negative", sn[0], 0.0, sn[1], &mut fragile_loss);
                    }
                    check("relu", sp[0], margin, sn[0], &mut fragile_loss);
                }
                Mining::BatchHard => {}
                Mining::SemiHard if !neg.is_empty() => {
                    for &p in &pos {
                        let (above, below): (Vec<usize>, Vec<usize>) =
                            neg.iter().partition(|&&q| dd(q) > dd(p));
                        let (sa, sb) = (sorted(&above, false), sorted(&below, true));
                        // Which negatives are above d_ap near the boundary.
                        if let Some(&q) = sa.first() {
                            check("semi-hard partition", p, 0.0, q, &mut fragile_loss);
                        }
                        if let Some(&q) = sb.first() {
                            check("semi-hard partition", p, 0.0, q, &mut fragile_loss);
                        }
                        let chosen = if sa.is_empty() {
                            &sorted(&neg, true)
                        } else {
                            &sa
                        };
                        if chosen.len() > 1 {
                            check(
                                "semi-hard selection",
                                chosen[0],
                                0.0,
                                chosen[1],
                                &mut fragile_loss,
                            );
                        }
                        check("relu", p, margin, chosen[0], &mut fragile_loss);
                    }
                }
                Mining::SemiHard => {}
            }
        }
        loss_mag = d.iter().fold(0.0f64, |m, &v| m.max(v)) + margin;
        let grad_floor = if g_max == 0.0 {
            0.0
        } else {
            prec.coef(kappa, dim) * 4.0 * g_max
        };
        // (No gradient term at all when every distance is 0: then nothing can be wrong by
        // rounding.)
        let floors = [("loss", 4.0 * eps_max), ("grad_x", grad_floor)];
        let mut j = Judgement::within(&prec, &floors, beyond);
        if fragile_loss.is_some() {
            j.skip_compare = fragile_loss;
        } else if fragile_stats.is_some() {
            j.skip_outputs = vec!["hard", "semi_hard", "easy"];
        }
        Ok(j)
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let out = triplet(&refs[0], &labels, &opts).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            triplet_forward(&host_f64(&x[0], &[n, dim]), &labels, &opts)?
                .loss
                .to_scalar()
        };
        let wrt = [(&xv[..], &out.grad_x, dim)];
        tally.fd(fd_check("triplet", &desc, &f, &wrt, c.seed, loss_mag)?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// Margin loss
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MarginCase {
    dtype: DType,
    rows: usize,
    dim: usize,
    x1: Values,
    x2: Values,
    /// 0: random, 1: all similar, 2: all dissimilar.
    y_mode: u8,
    log_margin: Option<f64>,
    seed: u64,
}

fn margin_strategy(regime: Regime) -> impl Strategy<Value = MarginCase> {
    (
        dtype(),
        (extent(), extent()),
        values(regime),
        values(regime),
        0u8..3,
        prop::option::weighted(0.9, -2.0f64..1.0),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, (rows, dim), x1, x2, y_mode, log_margin, seed)| MarginCase {
                dtype,
                rows,
                dim,
                x1,
                x2,
                y_mode,
                log_margin,
                seed,
            },
        )
}

fn margin_case(regime: Regime, device: Device, c: MarginCase) -> Result<Tally, TestCaseError> {
    use rand::{Rng, SeedableRng};
    let (n, dim) = (c.rows, c.dim);
    let x1 = matrix(c.seed, 1, n, dim, &c.x1, c.dtype, regime);
    let x2 = matrix(
        c.seed,
        2,
        n,
        dim,
        &laid_out_as(&c.x1, &c.x2),
        c.dtype,
        regime,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(c.seed ^ 0x3a);
    let y: Vec<i64> = (0..n)
        .map(|_| match c.y_mode {
            1 => 0,
            2 => 1,
            _ => rng.random_range(0..2),
        })
        .collect();
    let scale = 10f64.powf(clamp_log(c.x1.log_scale, c.dtype, regime));
    let margin = c.log_margin.map_or(0.0, |l| 10f64.powf(l) * scale);
    let opts = MarginOptions {
        margin,
        ..Default::default()
    };
    let (refs, devs) = inputs([(&x1, &[n, dim]), (&x2, &[n, dim])], c.dtype, device);
    let (reference, variants) = one_and_split(
        ["margin_loss", "margin_forward + margin_backward"],
        &refs,
        devs,
        |[a, b]: [Tensor; 2]| {
            let y = y.clone();
            guarded(move || {
                let o = margin_loss(&a, &b, &y, &opts)?;
                loss_outs(&o.loss, &[("grad_x1", &o.grad_x1), ("grad_x2", &o.grad_x2)])
            })
        },
        |[a, b]: [Tensor; 2]| {
            let y = y.clone();
            guarded(move || {
                let fwd = margin_forward(&a, &b, &y, &opts)?;
                let (g1, g2) = margin_backward(&a, &b, &y, &opts, &fwd.saved, 1.0)?;
                loss_outs(&fwd.loss, &[("grad_x1", &g1), ("grad_x2", &g2)])
            })
        },
    );
    let desc = format!("{c:?} (y {y:?}, margin {margin:e})");
    let ctx = ctx("margin_loss", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&x1, &x2, &[margin]]);
    let prec = ctx.prec;
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let (n1, n2) = (row_norms(&x1, dim), row_norms(&x2, dim));
        let mut naive = 0.0;
        let mut lmag = 0.0;
        let mut gmag = Vec::with_capacity(n);
        for i in 0..n {
            let sq: f64 = x1[i * dim..(i + 1) * dim]
                .iter()
                .zip(&x2[i * dim..(i + 1) * dim])
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
            let d = sq.max(1e-12).sqrt();
            naive += if y[i] == 0 {
                sq.max(1e-12) / 2.0
            } else {
                (margin - d).max(0.0).powi(2) / 2.0
            };
            let s = n1[i] + n2[i];
            lmag += (s + margin) * (s + margin);
            gmag.push(s * (1.0 + margin / d.max(1e-6)));
        }
        naive /= n as f64;
        loss_mag = lmag / n as f64;
        loss_vs_naive("margin", want, naive, dim, loss_mag)?;
        let gnorm = norm(&gmag) / n as f64;
        let c1 = prec.coef(1.0, dim);
        let floors = [
            ("loss", c1 * loss_mag),
            ("grad_x1", c1 * gnorm),
            ("grad_x2", c1 * gnorm),
        ];
        Ok(Judgement::within(&prec, &floors, beyond))
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let out = margin_loss(&refs[0], &refs[1], &y, &opts).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            margin_forward(
                &host_f64(&x[0], &[n, dim]),
                &host_f64(&x[1], &[n, dim]),
                &y,
                &opts,
            )?
            .loss
            .to_scalar()
        };
        let wrt = [(&x1[..], &out.grad_x1, dim), (&x2[..], &out.grad_x2, dim)];
        tally.fd(fd_check("margin_loss", &desc, &f, &wrt, c.seed, loss_mag)?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// NCE
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct NceCase {
    dtype: DType,
    batch: usize,
    k: usize,
    scores: Values,
    logq: Values,
    seed: u64,
}

fn nce_strategy(regime: Regime) -> impl Strategy<Value = NceCase> {
    two_matrices(regime).prop_map(|(dtype, batch, k, scores, logq, seed)| NceCase {
        dtype,
        batch,
        k,
        scores,
        logq,
        seed,
    })
}

fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn nce_case(regime: Regime, device: Device, c: NceCase) -> Result<Tally, TestCaseError> {
    let (b, k) = (c.batch, c.k);
    let sp = matrix(c.seed, 1, b, 1, &c.scores, c.dtype, regime);
    let sn = matrix(c.seed, 2, b, k, &c.scores, c.dtype, regime);
    let qp = matrix(c.seed, 3, b, 1, &c.logq, c.dtype, regime);
    let qn = matrix(c.seed, 4, b, k, &c.logq, c.dtype, regime);
    let (refs, devs) = inputs(
        [(&sp, &[b]), (&sn, &[b, k]), (&qp, &[b]), (&qn, &[b, k])],
        c.dtype,
        device,
    );
    let (reference, variants) = one_and_split(
        ["nce", "nce_forward + nce_backward"],
        &refs,
        devs,
        |t: [Tensor; 4]| {
            guarded(move || {
                let o = nce(&t[0], &t[1], &t[2], &t[3])?;
                let grads = [("grad_s_pos", &o.grad_s_pos), ("grad_s_neg", &o.grad_s_neg)];
                loss_outs(&o.loss, &grads)
            })
        },
        |t: [Tensor; 4]| {
            guarded(move || {
                let fwd = nce_forward(&t[0], &t[1], &t[2], &t[3])?;
                let (gp, gn) = nce_backward(&t[0], &t[1], &t[2], &t[3], &fwd.saved, 1.0)?;
                loss_outs(&fwd.loss, &[("grad_s_pos", &gp), ("grad_s_neg", &gn)])
            })
        },
    );
    let desc = format!("{c:?}");
    let ctx = ctx("nce", device, c.dtype, regime, false, desc.clone());
    let beyond = input_beyond_compute(&ctx.prec, &[&sp, &sn, &qp, &qn]);
    let prec = ctx.prec;
    let mut loss_mag = 1.0;
    let mut tally = verdict(&ctx, Expect::Valid, reference, variants, |want| {
        let lk = (k as f64).ln();
        let mut naive = 0.0;
        let mut lmag = 0.0;
        let mut gp = Vec::new();
        let mut gn = Vec::new();
        for i in 0..b {
            let dp = sp[i] - lk - qp[i];
            naive += softplus(-dp);
            let m = sp[i].abs() + qp[i].abs() + lk + 1.0;
            lmag += m;
            gp.push(m * sigmoid(dp) * sigmoid(-dp) / b as f64);
            for j in 0..k {
                let (s, q) = (sn[i * k + j], qn[i * k + j]);
                let dn = s - lk - q;
                naive += softplus(dn);
                let m = s.abs() + q.abs() + lk + 1.0;
                lmag += m;
                gn.push(m * sigmoid(dn) * sigmoid(-dn) / b as f64);
            }
        }
        naive /= b as f64;
        loss_mag = lmag / b as f64;
        // Dimension 0: the scores are scalars, not dot products.
        loss_vs_naive("nce", want, naive, 0, loss_mag)?;
        let c1 = prec.coef(1.0, 1);
        let floors = [
            ("loss", c1 * loss_mag),
            ("grad_s_pos", c1 * norm(&gp)),
            ("grad_s_neg", c1 * norm(&gn)),
        ];
        Ok(Judgement::within(&prec, &floors, beyond))
    })?;
    if regime == Regime::Moderate && device == Device::Cpu {
        let [sp_r, sn_r, qp_r, qn_r] = &refs;
        let out = nce(sp_r, sn_r, qp_r, qn_r).unwrap();
        let f = |x: &[Vec<f64>]| -> contra::Result<f64> {
            nce_forward(
                &host_f64(&x[0], &[b]),
                &host_f64(&x[1], &[b, k]),
                qp_r,
                qn_r,
            )?
            .loss
            .to_scalar()
        };
        let wrt = [(&sp[..], &out.grad_s_pos, 1), (&sn[..], &out.grad_s_neg, k)];
        tally.fd(fd_check("nce", &desc, &f, &wrt, c.seed, loss_mag)?);
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// The properties: one per op, regime and device
// ---------------------------------------------------------------------------------------------

macro_rules! properties {
    ($($name:ident: $strategy:ident, $case:ident, $regime:ident, $device:ident;)*) => {
        $(
            #[test]
            fn $name() {
                let (regime, device) = (Regime::$regime, Device::$device);
                property(stringify!($name), device, $strategy(regime), |c| $case(regime, device, c));
            }
        )*
    };
}

properties! {
    normalize_moderate_cpu: norm_strategy, normalize_case, Moderate, Cpu;
    normalize_moderate_interp: norm_strategy, normalize_case, Moderate, Interp;
    normalize_extreme_cpu: norm_strategy, normalize_case, Extreme, Cpu;
    normalize_extreme_interp: norm_strategy, normalize_case, Extreme, Interp;
    normalize_overflow_cpu: norm_strategy, normalize_case, Overflow, Cpu;
    normalize_overflow_interp: norm_strategy, normalize_case, Overflow, Interp;

    normalize_backward_moderate_cpu: norm_strategy, normalize_backward_case, Moderate, Cpu;
    normalize_backward_moderate_interp: norm_strategy, normalize_backward_case, Moderate, Interp;
    normalize_backward_extreme_cpu: norm_strategy, normalize_backward_case, Extreme, Cpu;
    normalize_backward_extreme_interp: norm_strategy, normalize_backward_case, Extreme, Interp;
    normalize_backward_overflow_cpu: norm_strategy, normalize_backward_case, Overflow, Cpu;
    normalize_backward_overflow_interp: norm_strategy, normalize_backward_case, Overflow, Interp;

    similarity_moderate_cpu: sim_strategy, similarity_case, Moderate, Cpu;
    similarity_moderate_interp: sim_strategy, similarity_case, Moderate, Interp;
    similarity_extreme_cpu: sim_strategy, similarity_case, Extreme, Cpu;
    similarity_extreme_interp: sim_strategy, similarity_case, Extreme, Interp;
    similarity_overflow_cpu: sim_strategy, similarity_case, Overflow, Cpu;
    similarity_overflow_interp: sim_strategy, similarity_case, Overflow, Interp;

    infonce_moderate_cpu: infonce_strategy, infonce_case, Moderate, Cpu;
    infonce_moderate_interp: infonce_strategy, infonce_case, Moderate, Interp;
    infonce_extreme_cpu: infonce_strategy, infonce_case, Extreme, Cpu;
    infonce_extreme_interp: infonce_strategy, infonce_case, Extreme, Interp;
    infonce_overflow_cpu: infonce_strategy, infonce_case, Overflow, Cpu;
    infonce_overflow_interp: infonce_strategy, infonce_case, Overflow, Interp;

    ntxent_moderate_cpu: ntxent_strategy, ntxent_case, Moderate, Cpu;
    ntxent_moderate_interp: ntxent_strategy, ntxent_case, Moderate, Interp;
    ntxent_extreme_cpu: ntxent_strategy, ntxent_case, Extreme, Cpu;
    ntxent_extreme_interp: ntxent_strategy, ntxent_case, Extreme, Interp;
    ntxent_overflow_cpu: ntxent_strategy, ntxent_case, Overflow, Cpu;
    ntxent_overflow_interp: ntxent_strategy, ntxent_case, Overflow, Interp;

    clip_moderate_cpu: clip_strategy, clip_case, Moderate, Cpu;
    clip_moderate_interp: clip_strategy, clip_case, Moderate, Interp;
    clip_extreme_cpu: clip_strategy, clip_case, Extreme, Cpu;
    clip_extreme_interp: clip_strategy, clip_case, Extreme, Interp;
    clip_overflow_cpu: clip_strategy, clip_case, Overflow, Cpu;
    clip_overflow_interp: clip_strategy, clip_case, Overflow, Interp;

    siglip_moderate_cpu: siglip_strategy, siglip_case, Moderate, Cpu;
    siglip_moderate_interp: siglip_strategy, siglip_case, Moderate, Interp;
    siglip_extreme_cpu: siglip_strategy, siglip_case, Extreme, Cpu;
    siglip_extreme_interp: siglip_strategy, siglip_case, Extreme, Interp;
    siglip_overflow_cpu: siglip_strategy, siglip_case, Overflow, Cpu;
    siglip_overflow_interp: siglip_strategy, siglip_case, Overflow, Interp;

    moco_moderate_cpu: moco_strategy, moco_case, Moderate, Cpu;
    moco_moderate_interp: moco_strategy, moco_case, Moderate, Interp;
    moco_extreme_cpu: moco_strategy, moco_case, Extreme, Cpu;
    moco_extreme_interp: moco_strategy, moco_case, Extreme, Interp;
    moco_overflow_cpu: moco_strategy, moco_case, Overflow, Cpu;
    moco_overflow_interp: moco_strategy, moco_case, Overflow, Interp;

    moco_enqueue_moderate_cpu: enqueue_strategy, enqueue_case, Moderate, Cpu;
    moco_enqueue_moderate_interp: enqueue_strategy, enqueue_case, Moderate, Interp;
    moco_enqueue_extreme_cpu: enqueue_strategy, enqueue_case, Extreme, Cpu;
    moco_enqueue_extreme_interp: enqueue_strategy, enqueue_case, Extreme, Interp;
    moco_enqueue_overflow_cpu: enqueue_strategy, enqueue_case, Overflow, Cpu;
    moco_enqueue_overflow_interp: enqueue_strategy, enqueue_case, Overflow, Interp;

    momentum_update_moderate_cpu: momentum_strategy, momentum_case, Moderate, Cpu;
    momentum_update_moderate_interp: momentum_strategy, momentum_case, Moderate, Interp;
    momentum_update_extreme_cpu: momentum_strategy, momentum_case, Extreme, Cpu;
    momentum_update_extreme_interp: momentum_strategy, momentum_case, Extreme, Interp;
    momentum_update_overflow_cpu: momentum_strategy, momentum_case, Overflow, Cpu;
    momentum_update_overflow_interp: momentum_strategy, momentum_case, Overflow, Interp;

    supcon_moderate_cpu: supcon_strategy, supcon_case, Moderate, Cpu;
    supcon_moderate_interp: supcon_strategy, supcon_case, Moderate, Interp;
    supcon_extreme_cpu: supcon_strategy, supcon_case, Extreme, Cpu;
    supcon_extreme_interp: supcon_strategy, supcon_case, Extreme, Interp;
    supcon_overflow_cpu: supcon_strategy, supcon_case, Overflow, Cpu;
    supcon_overflow_interp: supcon_strategy, supcon_case, Overflow, Interp;

    triplet_moderate_cpu: triplet_strategy, triplet_case, Moderate, Cpu;
    triplet_moderate_interp: triplet_strategy, triplet_case, Moderate, Interp;
    triplet_extreme_cpu: triplet_strategy, triplet_case, Extreme, Cpu;
    triplet_extreme_interp: triplet_strategy, triplet_case, Extreme, Interp;
    triplet_overflow_cpu: triplet_strategy, triplet_case, Overflow, Cpu;
    triplet_overflow_interp: triplet_strategy, triplet_case, Overflow, Interp;

    margin_loss_moderate_cpu: margin_strategy, margin_case, Moderate, Cpu;
    margin_loss_moderate_interp: margin_strategy, margin_case, Moderate, Interp;
    margin_loss_extreme_cpu: margin_strategy, margin_case, Extreme, Cpu;
    margin_loss_extreme_interp: margin_strategy, margin_case, Extreme, Interp;
    margin_loss_overflow_cpu: margin_strategy, margin_case, Overflow, Cpu;
    margin_loss_overflow_interp: margin_strategy, margin_case, Overflow, Interp;

    nce_moderate_cpu: nce_strategy, nce_case, Moderate, Cpu;
    nce_moderate_interp: nce_strategy, nce_case, Moderate, Interp;
    nce_extreme_cpu: nce_strategy, nce_case, Extreme, Cpu;
    nce_extreme_interp: nce_strategy, nce_case, Extreme, Interp;
    nce_overflow_cpu: nce_strategy, nce_case, Overflow, Cpu;
    nce_overflow_interp: nce_strategy, nce_case, Overflow, Interp;
}

// ---------------------------------------------------------------------------------------------
// Tensor construction: element counts that overflow usize are errors, never wrapped products
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn expect_shape_err<T: std::fmt::Debug>(what: &str, result: contra::Result<T>) {
    match result {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("shape") && has_backquoted_name(&msg),
                "{what}: the error should name the shape argument: {msg}"
            );
        }
        Ok(v) => panic!("{what}: an overflowing shape was accepted: {v:?}"),
    }
}

#[test]
fn from_vec_rejects_a_shape_whose_element_count_wraps() {
    // 2 * (2^63 + 1) wraps to 2 = values.len().
    let shape = [2, (1usize << 63) + 1];
    let r = std::panic::catch_unwind(|| Tensor::from_vec(vec![3.0f32, 4.0], &shape, Device::Cpu));
    expect_shape_err("Tensor::from_vec", r.expect("Tensor::from_vec panicked"));
    let r = std::panic::catch_unwind(|| Tensor::from_slice(&[3.0f64, 4.0], &shape, Device::Interp));
    expect_shape_err(
        "Tensor::from_slice",
        r.expect("Tensor::from_slice panicked"),
    );
}

#[test]
fn zeros_rejects_a_shape_whose_element_count_overflows() {
    for shape in [
        vec![2, (1usize << 63) + 1],
        vec![usize::MAX, 2],
        vec![1 << 32, 1 << 32],
        vec![1 << 62, 1, 4],
    ] {
        for dtype in [DType::F32, DType::F64, DType::Bf16, DType::F16] {
            let r = std::panic::catch_unwind(|| Tensor::zeros(&shape, dtype, Device::Cpu));
            expect_shape_err(
                &format!("Tensor::zeros({shape:?}, {dtype})"),
                r.unwrap_or_else(|_| panic!("Tensor::zeros({shape:?}, {dtype}) panicked")),
            );
        }
    }
}

#[test]
fn reshape_rejects_a_shape_whose_element_count_wraps() {
    let x = Tensor::from_vec(vec![3.0f32, 4.0], &[2], Device::Cpu).unwrap();
    for shape in [
        vec![2, (1usize << 63) + 1],
        vec![1 << 32, 1 << 32, 2],
        vec![usize::MAX, usize::MAX],
    ] {
        let y = x.clone();
        let r = std::panic::catch_unwind(move || y.reshape(&shape));
        expect_shape_err("Tensor::reshape", r.expect("Tensor::reshape panicked"));
    }
    // The legal reshapes still work.
    let y = x.reshape(&[1, 2]).unwrap();
    assert_eq!(y.shape(), &[1, 2]);
}
