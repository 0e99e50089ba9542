//! The machinery of `tests/properties.rs`: case generation, running an op guarded against panics
//! and hangs, the precision model that sizes every tolerance, naive f64 formulas the reference is
//! checked against, and the verdict of one case.
//!
//! # What one case checks
//!
//! Every op runs on the generated inputs (already rounded to the case's dtype) on the case's device
//! and dtype, in each of its public forms (one call, forward + backward), and once more as the
//! reference: the same rounded values in f64 on `Device::Cpu`. Then:
//!
//! - (a) no call panics or runs longer than `CONTRA_PROPTEST_HANG_S` seconds (default 60);
//! - (c) every `Err` names an argument (a backquoted name) or the op;
//! - an `Err` is allowed only when the case is out of range for the compute precision: a reference
//!   output that the output dtype (or the f32 the kernels compute in) cannot represent, softmax
//!   logits too large for the compute type to resolve to one nat (`u_c * L >= 1`, which includes
//!   logits that overflow; only raw InfoNCE and MoCo's raw queue reach it), or an input value
//!   beyond f32 on a device that computes in f32. Anything else,
//!   in particular every "moderate" case (norms 1e-3..1e3, temperature 0.05..10), must be `Ok`;
//! - (b) every output of an `Ok` is finite and within the tolerance below of the reference.
//!
//! # The tolerance model
//!
//! An output `got` (a tensor flattened, or a scalar) passes against the reference `want` when
//!
//! ```text
//! ||got - want||_2  <=  rel * ||want||_2  +  coef(kappa, D) * ||S||_2  +  sqrt(n) * tiny / 2
//! ```
//!
//! - `rel` is the relative-norm tolerance of the precision: 1e-3 when the op computes in f32
//!   (f32 inputs, or anything on `Device::Interp`), 3e-2 when the output dtype is bf16 / f16
//!   (rounding the output alone costs up to 2^-9 resp. 2^-12 per element; the bf16 tensor-core
//!   backward also rounds the softmax-gradient tile to bf16), 1e-9 when both sides compute in f64.
//! - `S` is the magnitude of the output's terms: what the output would be if every term of its
//!   defining sum were added with its absolute value (for a softmax gradient `(P - Y) K / tau`,
//!   `(|P| + |Y|) |K| / tau`; for a dot product `||a|| ||b||`; for `||a||^2 + ||b||^2 - 2 a.b`,
//!   `(||a|| + ||b||)^2`). Floating-point error is proportional to `S`, not to the result: where the
//!   terms cancel (a gradient near the optimum, near-equal rows, a clustered batch) the result is
//!   legitimately less accurate than `rel` relative to itself, and the floor accepts exactly that
//!   much. It never exceeds what the precision guarantees for the terms themselves.
//! - `coef(kappa, D) = 8 sqrt(D + 1) u_c kappa + 2 u_o`: `u_c` the unit roundoff of the compute type
//!   (2^-24 for f32, 2^-53 for f64), `sqrt(D + 1)` the usual growth of rounding error in a length-D
//!   dot product (errors of independent roundings add like a random walk; 8 is the safety factor),
//!   `u_o` the roundoff of the output dtype. `kappa` is the condition number of the output with
//!   respect to those roundings: for softmax losses the largest logit magnitude `L` the logits can
//!   reach (`scale * max ||q|| * max ||k||`: an absolute error `e` in a logit is a relative error `e`
//!   in its probability, and logits are computed with an absolute error of about `u_c L`), so the
//!   tolerance grows as `max(1, 1/tau)` for cosine losses, as the issue asks; 1 for the other ops,
//!   except that distances between near-equal rows have `kappa = ((|a| + |b|) / d)^2`.
//! - `tiny` is the smallest subnormal of the output dtype: a result the dtype cannot resolve
//!   (below its subnormal spacing) is not an error.
//!
//! Losses are f64 scalars: `|got - want| <= rel |want| + coef(kappa, D) * S` with `S` the
//! magnitude of the loss's terms (for softmax losses `2 L + ln(keys + 1) + 1`).
//!
//! Discontinuous outputs (triplet mining, counts and statistics) are compared only where the
//! reference's decisions are robust: every pair of distances a decision compares differs by more
//! than the distance error bound. Cases where they do not are counted as "ill-conditioned"; they
//! still check (a), (c) and finiteness.
#![allow(dead_code)]

use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use contra::{DType, Device, Error, Tensor};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use rand::{rngs::StdRng, Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// Case budget and the property runner
// ---------------------------------------------------------------------------------------------

/// Cases per CPU property (raise with `CONTRA_PROPTEST_CASES`).
pub const DEFAULT_CPU_CASES: u32 = 128;
/// Cases per interpreted-kernel property (`CONTRA_PROPTEST_INTERP_CASES`, else a quarter of
/// `CONTRA_PROPTEST_CASES`): the interpreted mode runs every CUDA thread on the CPU.
pub const DEFAULT_INTERP_CASES: u32 = 32;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

pub fn cases_for(device: Device) -> u32 {
    match device {
        Device::Cpu => env_u64("CONTRA_PROPTEST_CASES")
            .map(|n| n as u32)
            .unwrap_or(DEFAULT_CPU_CASES),
        _ => env_u64("CONTRA_PROPTEST_INTERP_CASES")
            .map(|n| n as u32)
            .or_else(|| env_u64("CONTRA_PROPTEST_CASES").map(|n| (n as u32).div_ceil(4)))
            .unwrap_or(DEFAULT_INTERP_CASES),
    }
    .max(1)
}

fn hang_limit() -> Duration {
    Duration::from_secs(env_u64("CONTRA_PROPTEST_HANG_S").unwrap_or(60))
}

/// What a passing case did, summed over a property's cases.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Calls whose outputs were compared with the reference.
    pub compared: u64,
    /// Calls that returned an allowed `Err` (out of range for the compute precision).
    pub allowed_err: u64,
    /// Calls on documented-invalid inputs that returned the documented `Err`.
    pub expected_err: u64,
    /// Calls whose reference result the dtype cannot represent (not compared).
    pub unrepresentable: u64,
    /// Calls not compared because the reference's discrete decisions are not robust.
    pub ill_conditioned: u64,
    /// Finite-difference checks of the f64 reference's gradients that ran.
    pub fd_checked: u64,
    /// Finite-difference checks skipped because the loss has a kink within the step.
    pub fd_kinks: u64,
}

impl Tally {
    /// Records a finite-difference check (`true`) or one skipped at a kink (`false`).
    pub fn fd(&mut self, checked: bool) {
        if checked {
            self.fd_checked += 1;
        } else {
            self.fd_kinks += 1;
        }
    }

    fn add(&mut self, o: &Tally) {
        self.compared += o.compared;
        self.allowed_err += o.allowed_err;
        self.expected_err += o.expected_err;
        self.unrepresentable += o.unrepresentable;
        self.ill_conditioned += o.ill_conditioned;
        self.fd_checked += o.fd_checked;
        self.fd_kinks += o.fd_kinks;
    }
}

/// The class of a failure: its tag, the public form that failed and the first output it names
/// (`[MISMATCH] ... infonce_forward + infonce_backward: `grad_q`: ...` gives
/// `MISMATCH / infonce_forward + infonce_backward / grad_q`). Device and dtype are not part of it:
/// shrinking may move the dtype.
pub fn failure_class(msg: &str) -> String {
    let tag = msg
        .strip_prefix('[')
        .and_then(|m| m.split(']').next())
        .unwrap_or("?");
    let variant = match msg.split_once("regime), ") {
        Some((_, rest)) => rest.split(':').next().unwrap_or(""),
        // [FD_MISMATCH] infonce: ...
        None => msg
            .split_once("] ")
            .and_then(|(_, rest)| rest.split(':').next())
            .unwrap_or(""),
    };
    let output = msg.split('`').nth(1).unwrap_or("");
    format!("{tag} / {variant} / {output}")
}

fn reason_of(e: &TestCaseError) -> String {
    match e {
        TestCaseError::Fail(r) | TestCaseError::Reject(r) => r.message().to_string(),
    }
}

/// Failure classes shrunk and reported per property (further classes are only counted).
const MAX_CLASSES: usize = 4;

/// Runs `body` on `cases_for(device)` generated cases of `strategy` (all of them, even after a
/// failure), groups the failures by [`failure_class`], shrinks the first case of each class with
/// proptest's shrinking (a simpler case counts only if it fails with the same class, so distinct
/// bugs are not merged), prints how many cases ran and what they did, and panics listing every
/// class with its minimal input.
pub fn property<S>(
    name: &str,
    device: Device,
    strategy: S,
    body: impl Fn(S::Value) -> Result<Tally, TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let cases = cases_for(device);
    let seed = env_u64("CONTRA_PROPTEST_SEED").unwrap_or(0x5eed_c0de);
    let shrink_s = env_u64("CONTRA_PROPTEST_SHRINK_S").unwrap_or(match device {
        Device::Cpu => 5,
        _ => 10,
    });
    let config = Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let mut tally = Tally::default();
    // (class, failing cases, minimal input, its message, shrink steps)
    let mut classes: Vec<(String, u64, String, String, u64)> = Vec::new();
    let mut unshrunk = 0u64;
    let start = Instant::now();
    for _ in 0..cases {
        let mut tree = match strategy.new_tree(&mut runner) {
            Ok(t) => t,
            Err(reason) => panic!("property {name}: cannot generate a case: {reason}"),
        };
        let err = match body(tree.current()) {
            Ok(t) => {
                tally.add(&t);
                continue;
            }
            Err(e) => reason_of(&e),
        };
        let class = failure_class(&err);
        if let Some(c) = classes.iter_mut().find(|c| c.0 == class) {
            c.1 += 1;
            continue;
        }
        if classes.len() >= MAX_CLASSES {
            unshrunk += 1;
            continue;
        }
        // Shrink within the class.
        let deadline = Instant::now() + Duration::from_secs(shrink_s);
        let mut best = (format!("{:#?}", tree.current()), err);
        let mut steps = 0u64;
        if tree.simplify() {
            while steps < 500 && Instant::now() < deadline {
                steps += 1;
                let candidate = tree.current();
                let shown = format!("{candidate:#?}");
                match body(candidate) {
                    Err(e) if failure_class(&reason_of(&e)) == class => {
                        best = (shown, reason_of(&e));
                        if !tree.simplify() {
                            break;
                        }
                    }
                    _ => {
                        if !tree.complicate() {
                            break;
                        }
                    }
                }
            }
        }
        classes.push((class, 1, best.0, best.1, steps));
    }
    let failed: u64 = classes.iter().map(|c| c.1).sum::<u64>() + unshrunk;
    println!(
        "property {name} [{device}]: {cases} cases, {failed} failed ({} classes) ({} calls compared, \
         {} allowed Err, {} documented Err, {} unrepresentable, {} ill-conditioned; {} finite-difference \
         checks, {} at kinks) in {:.1} s",
        classes.len(),
        tally.compared,
        tally.allowed_err,
        tally.expected_err,
        tally.unrepresentable,
        tally.ill_conditioned,
        tally.fd_checked,
        tally.fd_kinks,
        start.elapsed().as_secs_f64()
    );
    if classes.is_empty() {
        return;
    }
    let mut report = format!("property {name} [{device}]: {failed} of {cases} cases failed\n");
    for (i, (class, count, input, msg, steps)) in classes.iter().enumerate() {
        report += &format!(
            "\n#{} class {class}: {count} failing cases; minimal (after {steps} shrink steps):\n  {msg}\n  input: {input}\n",
            i + 1
        );
    }
    if unshrunk > 0 {
        report += &format!("\n(+{unshrunk} failing cases of further classes, not shrunk)\n");
    }
    panic!("{report}");
}

// ---------------------------------------------------------------------------------------------
// Running an op: panics and hangs become outcomes
// ---------------------------------------------------------------------------------------------

pub enum Outcome<T> {
    Ok(T),
    Err(Error),
    Panic(String),
    Hang(Duration),
}

/// Runs `f` on its own thread inside `catch_unwind`; gives up waiting after the hang limit (the
/// thread is left behind; the case fails).
pub fn guarded<T: Send + 'static>(
    f: impl FnOnce() -> contra::Result<T> + Send + 'static,
) -> Outcome<T> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("contra-op".into())
        .spawn(move || {
            let result = panic::catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Outcome::Panic(format!("could not spawn the op's thread: {e}"));
    }
    let limit = hang_limit();
    match rx.recv_timeout(limit) {
        Ok(Ok(Ok(v))) => Outcome::Ok(v),
        Ok(Ok(Err(e))) => Outcome::Err(e),
        Ok(Err(payload)) => Outcome::Panic(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic payload".into()),
        ),
        Err(mpsc::RecvTimeoutError::Timeout) => Outcome::Hang(limit),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Outcome::Panic("the op's thread died without a result".into())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum Val {
    /// A loss or another f64 scalar.
    Scalar(f64),
    /// A tensor output: values, shape, dtype.
    Tensor(Vec<f64>, Vec<usize>, DType),
    /// A count or an index: compared exactly.
    Int(u64),
}

pub type Outs = Vec<(&'static str, Val)>;

/// An output read to the host: an error found on the device surfaces here, as the op's error.
pub fn tv(name: &'static str, t: &Tensor) -> contra::Result<(&'static str, Val)> {
    Ok((
        name,
        Val::Tensor(t.to_vec_f64()?, t.shape().to_vec(), t.dtype()),
    ))
}

pub fn get<'a>(outs: &'a Outs, name: &str) -> &'a Val {
    &outs
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .1
}

pub fn get_t<'a>(outs: &'a Outs, name: &str) -> &'a [f64] {
    match get(outs, name) {
        Val::Tensor(v, _, _) => v,
        other => panic!("{name} is not a tensor: {other:?}"),
    }
}

pub fn get_s(outs: &Outs, name: &str) -> f64 {
    match get(outs, name) {
        Val::Scalar(v) => *v,
        other => panic!("{name} is not a scalar: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The precision model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
pub struct Prec {
    pub rel: f64,
    /// Unit roundoff of the type the op computes in.
    pub u_c: f64,
    /// Unit roundoff of the output dtype.
    pub u_o: f64,
    /// Largest finite value of the output dtype.
    pub out_max: f64,
    /// Smallest positive subnormal of the output dtype.
    pub out_tiny: f64,
    /// Largest finite value of the compute type.
    pub compute_max: f64,
    /// Roundoff of operands the kernels re-round to the dtype before their products: bf16 / f16
    /// inputs are normalized into bf16 / f16 copies that feed the tensor cores (`u_o` there; 0
    /// where the op computes on the inputs as given).
    pub u_in: f64,
}

pub const U_F32: f64 = 5.960464477539063e-8; // 2^-24
pub const U_F64: f64 = 1.1102230246251565e-16; // 2^-53

pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => U_F64,
        DType::F32 => U_F32,
        DType::Bf16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
    }
}

pub fn dtype_max(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MAX,
        DType::F32 => f32::MAX as f64,
        DType::Bf16 => half::bf16::MAX.to_f64(),
        DType::F16 => half::f16::MAX.to_f64(),
    }
}

pub fn dtype_tiny(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 4.9e-324,
        DType::F32 => 1.401298464324817e-45,
        DType::Bf16 => 9.183549615799121e-41,
        DType::F16 => 5.960464477539063e-8,
    }
}

/// The precision of `dtype` on `device`. `cpu_f64`: the op's CPU path computes in f64 whatever
/// the dtype (triplet, momentum); otherwise the CPU computes f64 in f64 and the rest in f32, and
/// the kernels compute everything in f32.
pub fn prec(device: Device, dtype: DType, cpu_f64: bool) -> Prec {
    let compute_f64 = device == Device::Cpu && (dtype == DType::F64 || cpu_f64);
    let u_c = if compute_f64 { U_F64 } else { U_F32 };
    let rel = match dtype {
        DType::Bf16 | DType::F16 => 3e-2,
        DType::F64 if compute_f64 => 1e-9,
        _ => 1e-3,
    };
    Prec {
        rel,
        u_c,
        u_o: unit_roundoff(dtype),
        out_max: dtype_max(dtype),
        out_tiny: dtype_tiny(dtype),
        compute_max: if compute_f64 {
            f64::MAX
        } else {
            f32::MAX as f64
        },
        u_in: match (device, dtype) {
            (Device::Cpu, _) | (_, DType::F32 | DType::F64) => 0.0,
            _ => unit_roundoff(dtype),
        },
    }
}

impl Prec {
    /// `8 sqrt(D + 1) u_c max(1, kappa) + 2 u_o`: the relative error of a term of an output whose
    /// computation involves length-D dot products and has condition number `kappa`.
    pub fn coef(&self, kappa: f64, dim: usize) -> f64 {
        // The error of a term's inputs (a logit, a dot product): accumulation in the compute type
        // plus the re-rounding of both operands; `expm1` because an error `e` in a logit is a
        // factor `e^e` in its probability (linear while `e` is small; once it reaches a few nats
        // nothing is resolved and the bound accepts anything finite).
        let e = (8.0 * ((dim + 1) as f64).sqrt() * self.u_c + 2.0 * self.u_in) * kappa.max(1.0);
        e.exp_m1() + 2.0 * self.u_o
    }

    /// [`Prec::coef`] without the output rounding: for quantities the op keeps internally
    /// (distances it compares, logits).
    pub fn coef_compute(&self, kappa: f64, dim: usize) -> f64 {
        (8.0 * ((dim + 1) as f64).sqrt() * self.u_c + 2.0 * self.u_in) * kappa.max(1.0)
    }

    /// The smallest magnitude the result resolves: the output dtype's smallest subnormal, and
    /// where the op computes in f32, f32's smallest normal (values below it underflow inside).
    pub fn tiny(&self) -> f64 {
        if self.computes_f32() {
            self.out_tiny.max(f32::MIN_POSITIVE as f64)
        } else {
            self.out_tiny
        }
    }

    pub fn computes_f32(&self) -> bool {
        self.u_c > U_F64
    }
}

/// The tolerance of one output: `rel * ||want|| + abs` (plus the dtype's resolution).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rel: f64,
    pub abs: f64,
}

pub fn norm(v: &[f64]) -> f64 {
    // Scaled so that huge and tiny values neither overflow nor underflow.
    let m = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if m == 0.0 || !m.is_finite() {
        return m;
    }
    m * v.iter().map(|x| (x / m) * (x / m)).sum::<f64>().sqrt()
}

// ---------------------------------------------------------------------------------------------
// Case generation
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    /// Norms 1e-3..1e3, temperatures 0.05..10: every call must succeed and agree.
    Moderate,
    /// Tiny and huge norms (1e-30..1e25), temperatures 1e-3..1e3, clustered batches.
    Extreme,
    /// Values whose squares or products overflow f32 (and f16 / beyond-f32 f64): a result the
    /// dtype cannot represent must be an `Err`, everything else must still be right.
    Overflow,
}

/// How the rows of a matrix are laid out before scaling.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// Entries uniform in [-1, 1).
    Uniform,
    /// A shared centre (the same for every matrix of the case) plus `10^log_spread` noise.
    Clustered { log_spread: f64 },
    /// Signed basis vectors (rows repeat once there are more rows than features).
    Axis,
}

/// One row that differs from the others.
#[derive(Clone, Copy, Debug)]
pub enum Outlier {
    /// That row is scaled by `10^log_scale` instead.
    Scale(f64),
    /// That row is all zeros.
    Zero,
}

/// How to fill a matrix: every row's entries have magnitude up to `10^log_scale`.
#[derive(Clone, Copy, Debug)]
pub struct Values {
    pub log_scale: f64,
    pub outlier: Option<(usize, Outlier)>,
    pub layout: Layout,
}

/// Batch sizes and feature dimensions 1..=70, favouring sizes that are not multiples of tiles.
pub fn extent() -> BoxedStrategy<usize> {
    prop_oneof![
        3 => 1usize..=70,
        1 => prop::sample::select(vec![1usize, 2, 3, 5, 17, 31, 33, 63, 65, 67, 70]),
    ]
    .boxed()
}

/// A small extent for the kernels' slow interpreted mode and the O(N^3) triplet references.
pub fn extent_upto(max: usize) -> BoxedStrategy<usize> {
    let specials: Vec<usize> = [1usize, 2, 3, 5, 17, 31, 33, 63, 65, 67, 70]
        .into_iter()
        .filter(|&v| v <= max)
        .collect();
    prop_oneof![3 => 1usize..=max, 1 => prop::sample::select(specials)].boxed()
}

pub fn dtype() -> BoxedStrategy<DType> {
    prop::sample::select(vec![DType::F32, DType::Bf16, DType::F16, DType::F64]).boxed()
}

/// log10 of an entry's magnitude.
pub fn log_scale(regime: Regime) -> BoxedStrategy<f64> {
    match regime {
        Regime::Moderate => (-3.0f64..3.0).boxed(),
        Regime::Extreme => prop_oneof![
            (-3.0f64..3.0),
            prop::sample::select(vec![
                -30.0, -20.0, -15.0, -10.0, 10.0, 15.0, 18.0, 18.5, 19.0, 19.3, 19.6, 20.0, 25.0
            ]),
        ]
        .boxed(),
        Regime::Overflow => prop::sample::select(vec![19.3, 19.6, 20.0, 25.0, 30.0, 36.0]).boxed(),
    }
}

pub fn layout(regime: Regime) -> BoxedStrategy<Layout> {
    let spread = match regime {
        Regime::Moderate => -3.0f64..-1.0,
        _ => -7.0f64..-1.0,
    };
    prop_oneof![
        4 => Just(Layout::Uniform),
        1 => spread.prop_map(|log_spread| Layout::Clustered { log_spread }),
        1 => Just(Layout::Axis),
    ]
    .boxed()
}

pub fn values(regime: Regime) -> BoxedStrategy<Values> {
    let outlier = prop_oneof![
        Just(Outlier::Zero),
        log_scale(regime).prop_map(Outlier::Scale),
    ];
    (
        log_scale(regime),
        prop::option::weighted(0.3, (0usize..1000, outlier)),
        layout(regime),
    )
        .prop_map(|(log_scale, outlier, layout)| Values {
            log_scale,
            outlier,
            layout,
        })
        .boxed()
}

/// log10 of a temperature.
pub fn log_tau(regime: Regime) -> BoxedStrategy<f64> {
    match regime {
        Regime::Moderate => ((0.05f64).log10()..1.0).boxed(),
        Regime::Extreme => prop_oneof![
            (-3.0f64..3.0),
            prop::sample::select(vec![-3.0, 3.0, -2.5, 2.0])
        ]
        .boxed(),
        Regime::Overflow => (-3.0f64..0.0).boxed(),
    }
}

/// The log10 magnitudes a dtype can hold comfortably: f16 tops out at 65504 and its subnormals
/// start at 6e-5, so its scales are clamped to [-4, 4.3]. f64 on a device that computes in f32
/// keeps the f32 limits except in the overflow regime (which tests inputs beyond f32 there).
pub fn clamp_log(log: f64, dtype: DType, regime: Regime) -> f64 {
    match dtype {
        DType::F16 => log.clamp(-4.0, 4.3),
        DType::F64 if regime == Regime::Overflow => {
            // 1e39 and 1e45 do not fit f32.
            // (Beyond ~1e154 the squares overflow f64 as well; that f64 analogue is left out:
            // the f64 reference itself would be what is under test.)
            match log {
                l if l >= 30.0 => 45.0,
                l if l >= 25.0 => 39.0,
                l => l,
            }
        }
        _ => log,
    }
}

/// `values` rounded to `dtype` (as f64).
pub fn round_to(values: Vec<f64>, dtype: DType) -> Vec<f64> {
    if dtype == DType::F64 {
        return values;
    }
    let n = values.len();
    Tensor::from_vec(values, &[n], Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

fn pow10(log: f64) -> f64 {
    10f64.powf(log)
}

/// A `rows x dim` matrix for `spec`, deterministic in `(seed, stream)`, rounded to `dtype`.
/// Clustered matrices of one case share their centre (it depends on `seed` only).
pub fn matrix(
    seed: u64,
    stream: u64,
    rows: usize,
    dim: usize,
    spec: &Values,
    dtype: DType,
    regime: Regime,
) -> Vec<f64> {
    let mut centre_rng = StdRng::seed_from_u64(seed ^ 0xc1u64.rotate_left(40));
    let centre: Vec<f64> = (0..dim)
        .map(|_| centre_rng.random_range(-1.0..1.0))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream);
    let base = clamp_log(spec.log_scale, dtype, regime);
    let mut out = Vec::with_capacity(rows * dim);
    for i in 0..rows {
        let scale = match spec.outlier {
            Some((at, Outlier::Zero)) if at % rows == i => 0.0,
            Some((at, Outlier::Scale(l))) if at % rows == i => pow10(clamp_log(l, dtype, regime)),
            _ => pow10(base),
        };
        for (j, &centre_j) in centre.iter().enumerate().take(dim) {
            let unit = match spec.layout {
                Layout::Uniform => rng.random_range(-1.0..1.0),
                Layout::Clustered { log_spread } => {
                    centre_j + pow10(log_spread) * rng.random_range(-1.0..1.0)
                }
                Layout::Axis => {
                    let axis = (i + stream as usize) % dim;
                    if j == axis {
                        if (i / dim) % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                    } else {
                        0.0
                    }
                }
            };
            out.push(unit * scale);
        }
    }
    round_to(out, dtype)
}

/// Labels for SupCon / triplet batches.
#[derive(Clone, Copy, Debug)]
pub enum Labels {
    /// Uniform over `classes` classes.
    Random { classes: i64 },
    /// Every row the same class.
    AllSame,
    /// Every row its own class.
    AllDistinct,
    /// Rows 2i and 2i + 1 share a class.
    Pairs,
    /// Two classes labelled i64::MIN and i64::MAX.
    Extremes,
}

pub fn labels_mode() -> BoxedStrategy<Labels> {
    prop_oneof![
        3 => (2i64..6).prop_map(|classes| Labels::Random { classes }),
        1 => Just(Labels::AllSame),
        1 => Just(Labels::AllDistinct),
        1 => Just(Labels::Pairs),
        1 => Just(Labels::Extremes),
    ]
    .boxed()
}

pub fn make_labels(mode: Labels, n: usize, seed: u64) -> Vec<i64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1abe1);
    (0..n)
        .map(|i| match mode {
            Labels::Random { classes } => rng.random_range(0..classes),
            Labels::AllSame => 7,
            Labels::AllDistinct => i as i64 * 3 - 5,
            Labels::Pairs => (i / 2) as i64,
            Labels::Extremes => {
                if rng.random::<bool>() {
                    i64::MIN
                } else {
                    i64::MAX
                }
            }
        })
        .collect()
}

/// A tensor of `dtype` on `device` holding `values` (already representable in `dtype`).
pub fn tensor(values: &[f64], shape: &[usize], dtype: DType, device: Device) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// The f64 reference copy of `values` on the CPU.
pub fn host_f64(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, Device::Cpu).unwrap()
}

/// Directions for finite differences: entries uniform in [-1, 1) times their row's norm / sqrt(D).
pub fn direction(x: &[f64], dim: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xd1ec);
    x.chunks(dim)
        .flat_map(|row| {
            let s = norm(row) / (dim as f64).sqrt();
            (0..row.len())
                .map(|_| s * rng.random_range(-1.0..1.0))
                .collect::<Vec<_>>()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Naive f64 formulas
// ---------------------------------------------------------------------------------------------

/// `x / max(||x||, 1e-12)` row by row, and the clamped norms.
pub fn unit_rows(x: &[f64], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = Vec::with_capacity(x.len());
    let mut norms = Vec::new();
    for row in x.chunks(dim) {
        let n = norm(row).max(1e-12);
        norms.push(n);
        y.extend(row.iter().map(|v| v / n));
    }
    (y, norms)
}

pub fn row_norms(x: &[f64], dim: usize) -> Vec<f64> {
    x.chunks(dim).map(norm).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A softmax cross-entropy problem as the losses define it, in f64, with the magnitudes the
/// tolerance model needs.
pub struct SoftmaxTerms<'a> {
    /// Query rows as they enter the logits (normalized where the op normalizes).
    pub q: &'a [f64],
    /// Key rows as they enter the logits.
    pub k: &'a [f64],
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
    pub scale: f64,
    pub self_mask: bool,
    /// MoCo: one extra logit per row, `scale q_i . extra_i`, which is the row's target.
    pub extra: Option<&'a [f64]>,
    /// Per row: (key, weight) of the target distribution (ignored with `extra`).
    pub targets: &'a [Vec<(usize, f64)>],
    pub row_weight: &'a [f64],
}

pub struct SoftmaxMags {
    /// `sum_i w_i (lse_i - sum_j target_ij logit_ij)`.
    pub loss: f64,
    /// Per query row: `w_i scale sum_j (P_ij + T_ij) ||k_j||` (the terms of d loss / d q_i).
    pub q: Vec<f64>,
    /// Per key row: `sum_i w_i scale (P_ij + T_ij) ||q_i||`.
    pub k: Vec<f64>,
    /// `sum_i w_i sum_j (P_ij + T_ij) (|logit_ij| + 1)` (the terms of d loss / d log scale).
    pub log_scale: f64,
    /// `sum_i w_i sum_j (P_ij + T_ij) |logit_ij - target_logit_i|`: the same terms centred on the
    /// row's target logit (`d loss / d log scale = sum_i w_i sum_j (P_ij - T_ij) (logit_ij -
    /// target_logit_i)`, since both P and T sum to 1 per row).
    pub log_scale_centred: f64,
    /// `scale max ||q|| max ||k||`: the largest logit magnitude the inputs allow.
    pub logit_bound: f64,
}

impl SoftmaxTerms<'_> {
    pub fn eval(&self) -> SoftmaxMags {
        let d = self.dim;
        let qn = row_norms(self.q, d);
        let kn = row_norms(self.k, d);
        let en = self.extra.map(|e| row_norms(e, d));
        let mut out = SoftmaxMags {
            loss: 0.0,
            q: vec![0.0; self.rows],
            k: vec![0.0; self.cols],
            log_scale: 0.0,
            log_scale_centred: 0.0,
            logit_bound: 0.0,
        };
        let qmax = qn.iter().fold(0.0f64, |m, &v| m.max(v));
        let kmax = kn
            .iter()
            .chain(en.iter().flatten())
            .fold(0.0f64, |m, &v| m.max(v));
        out.logit_bound = self.scale * qmax * kmax;
        let mut logits = Vec::with_capacity(self.cols + 1);
        for i in 0..self.rows {
            let w = self.row_weight[i];
            let qi = &self.q[i * d..(i + 1) * d];
            logits.clear();
            for j in 0..self.cols {
                if self.self_mask && i == j {
                    continue;
                }
                logits.push((j, self.scale * dot(qi, &self.k[j * d..(j + 1) * d])));
            }
            let extra = self
                .extra
                .map(|e| self.scale * dot(qi, &e[i * d..(i + 1) * d]));
            let m = logits
                .iter()
                .map(|&(_, l)| l)
                .chain(extra)
                .fold(f64::NEG_INFINITY, f64::max);
            if !m.is_finite() {
                continue; // no logit at all (a single masked row)
            }
            let sum: f64 = logits
                .iter()
                .map(|&(_, l)| (l - m).exp())
                .chain(extra.map(|l| (l - m).exp()))
                .sum();
            let lse = m + sum.ln();
            let target_logit = match extra {
                Some(l) => l,
                None => self.targets[i]
                    .iter()
                    .map(|&(j, t)| t * self.scale * dot(qi, &self.k[j * d..(j + 1) * d]))
                    .sum(),
            };
            if w != 0.0 {
                out.loss += w * (lse - target_logit);
            }
            let target = |j: usize| -> f64 {
                if extra.is_some() {
                    0.0
                } else {
                    self.targets[i]
                        .iter()
                        .filter(|&&(t, _)| t == j)
                        .map(|&(_, t)| t)
                        .sum()
                }
            };
            let mut qmag = 0.0;
            for &(j, l) in &logits {
                let c = (l - lse).exp() + target(j);
                qmag += c * kn[j];
                out.k[j] += w.abs() * self.scale * c * qn[i];
                out.log_scale += w.abs() * c * (l.abs() + 1.0);
                out.log_scale_centred += w.abs() * c * (l - target_logit).abs();
            }
            if let (Some(l), Some(en)) = (extra, &en) {
                let c = (l - lse).exp() + 1.0;
                qmag += c * en[i];
                out.log_scale += w.abs() * c * (l.abs() + 1.0);
            }
            out.q[i] = w.abs() * self.scale * qmag;
        }
        out
    }
}

/// `||(m_i / n_i)_i||`: row magnitudes of a normalized input's gradient mapped back through the
/// normalization (`||(I - y y^T) g|| / n <= ||g|| / n`).
pub fn through_norm(mags: &[f64], norms: &[f64]) -> f64 {
    let v: Vec<f64> = mags.iter().zip(norms).map(|(m, n)| m / n).collect();
    norm(&v)
}

// ---------------------------------------------------------------------------------------------
// The verdict of one case
// ---------------------------------------------------------------------------------------------

/// What the op's documentation says about the case's inputs.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// Valid inputs: the call must succeed unless out of range for the compute precision.
    Valid,
    /// Documented-invalid inputs: every call (the reference too) must return an `Err` whose
    /// message names one of these arguments in backquotes.
    Invalid(&'static [&'static str]),
}

/// What an op's test knows about one case once the reference has run.
pub struct Judgement {
    /// Tolerance per compared output.
    pub tol: Vec<(&'static str, Tol)>,
    /// Why an `Err` is acceptable here (logits overflow f32, ...), if it is.
    pub err_allowed: Option<String>,
    /// Not to compare any output, and why (discrete decisions that are not robust).
    pub skip_compare: Option<String>,
    /// Outputs not to compare (their own decisions are not robust; the rest are).
    pub skip_outputs: Vec<&'static str>,
}

impl Judgement {
    pub fn new(tol: Vec<(&'static str, Tol)>) -> Self {
        Judgement {
            tol,
            err_allowed: None,
            skip_compare: None,
            skip_outputs: Vec::new(),
        }
    }

    /// The usual judgement: every listed output within the precision's `rel` of the reference
    /// plus its own absolute floor (only the floors differ between ops), and an `Err` excused by
    /// `err_allowed`.
    pub fn within(
        prec: &Prec,
        floors: &[(&'static str, f64)],
        err_allowed: Option<String>,
    ) -> Self {
        let tol = floors
            .iter()
            .map(|&(name, abs)| (name, Tol { rel: prec.rel, abs }))
            .collect();
        Judgement {
            err_allowed,
            ..Judgement::new(tol)
        }
    }
}

/// The context of one case, for messages.
pub struct Ctx {
    pub op: &'static str,
    pub device: Device,
    pub dtype: DType,
    pub regime: Regime,
    pub prec: Prec,
    /// A one-line description of the inputs (shapes, scales, options).
    pub desc: String,
}

impl Ctx {
    fn fail(&self, class: &str, variant: &str, detail: String) -> TestCaseError {
        TestCaseError::fail(format!(
            "[{class}] {} on {} {} ({:?} regime), {variant}: {detail}\n  case: {}",
            self.op, self.device, self.dtype, self.regime, self.desc
        ))
    }
}

/// True when `msg` holds a backquoted identifier (like `x`, `temperature`, `saved.lse`).
pub fn has_backquoted_name(msg: &str) -> bool {
    msg.split('`').skip(1).step_by(2).any(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.[]:".contains(c))
    })
}

/// (c): an error message names an argument or option (backquoted) or the op.
pub fn names_argument(err: &Error, op: &str) -> bool {
    let msg = err.to_string();
    has_backquoted_name(&msg) || msg.starts_with(&format!("{op}:"))
}

fn describe_outcome<T>(o: &Outcome<T>) -> String {
    match o {
        Outcome::Ok(_) => "Ok".into(),
        Outcome::Err(e) => format!("Err({e})"),
        Outcome::Panic(m) => format!("panic({m})"),
        Outcome::Hang(d) => format!("hang (> {d:?})"),
    }
}

/// Checks `got` against `want` with `tol` plus `tiny` per element (the precision's resolution:
/// below it values underflow, are flushed or clamped); `Err` describes the mismatch.
pub fn close(got: &[f64], want: &[f64], tol: Tol, tiny: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} values, reference has {}",
            got.len(),
            want.len()
        ));
    }
    let diff: Vec<f64> = got.iter().zip(want).map(|(g, w)| g - w).collect();
    let err = norm(&diff);
    let wn = norm(want);
    let allowed = tol.rel * wn + tol.abs + (got.len() as f64).sqrt() * tiny;
    if err <= allowed {
        return Ok(());
    }
    let (worst, _) = diff
        .iter()
        .enumerate()
        .fold((0usize, -1.0f64), |(bi, bv), (i, d)| {
            if d.abs() > bv {
                (i, d.abs())
            } else {
                (bi, bv)
            }
        });
    let sample = |v: &[f64]| -> String {
        let s: Vec<String> = v.iter().take(6).map(|x| format!("{x:.6e}")).collect();
        format!(
            "[{}{}]",
            s.join(", "),
            if v.len() > 6 { ", ..." } else { "" }
        )
    };
    Err(format!(
        "||got - want|| = {err:.3e} > allowed {allowed:.3e} (rel {:.1e} * ||want|| {wn:.3e} + abs {:.3e}); \
         relative error {:.3e}; worst at [{worst}]: got {:.6e}, want {:.6e}; got {} want {}",
        tol.rel,
        tol.abs,
        err / wn.max(f64::MIN_POSITIVE),
        got[worst],
        want[worst],
        sample(got),
        sample(want)
    ))
}

/// The verdict of one case: `reference` is the f64 CPU run, `variants` the runs under test (each
/// public form of the op on the case's device and dtype). `judge` sees the reference's outputs.
pub fn verdict(
    ctx: &Ctx,
    expect: Expect,
    reference: Outcome<Outs>,
    variants: Vec<(&'static str, Outcome<Outs>)>,
    judge: impl FnOnce(&Outs) -> Result<Judgement, String>,
) -> Result<Tally, TestCaseError> {
    let mut tally = Tally::default();
    // (a) for every run, the reference included.
    for (name, o) in std::iter::once(("f64 cpu reference", &reference))
        .chain(variants.iter().map(|(n, o)| (*n, o)))
    {
        match o {
            Outcome::Panic(m) => return Err(ctx.fail("PANIC", name, m.clone())),
            Outcome::Hang(d) => {
                return Err(ctx.fail("HANG", name, format!("no result after {d:?}")))
            }
            Outcome::Err(e) if !names_argument(e, ctx.op) => {
                return Err(ctx.fail(
                    "ERR_UNNAMED",
                    name,
                    format!("error names no argument: {e} ({e:?})"),
                ))
            }
            _ => {}
        }
    }
    if let Expect::Invalid(args) = expect {
        for (name, o) in std::iter::once(("f64 cpu reference", &reference))
            .chain(variants.iter().map(|(n, o)| (*n, o)))
        {
            match o {
                Outcome::Err(e) => {
                    let msg = e.to_string();
                    if !args.iter().any(|a| msg.contains(&format!("`{a}`"))) {
                        return Err(ctx.fail(
                            "ERR_WRONG_ARG",
                            name,
                            format!("documented-invalid input: the error should name one of {args:?}: {msg}"),
                        ));
                    }
                    tally.expected_err += 1;
                }
                other => {
                    return Err(ctx.fail(
                        "EXPECTED_ERR",
                        name,
                        format!(
                            "documented-invalid input (bad {args:?}) returned {}",
                            describe_outcome(other)
                        ),
                    ))
                }
            }
        }
        return Ok(tally);
    }
    let want = match reference {
        Outcome::Ok(w) => w,
        other => {
            return Err(ctx.fail(
                "REF_ERR",
                "f64 cpu reference",
                format!("valid input, but {}", describe_outcome(&other)),
            ))
        }
    };
    for (name, v) in &want {
        let finite = match v {
            Val::Scalar(s) => s.is_finite(),
            Val::Tensor(t, _, _) => t.iter().all(|x| x.is_finite()),
            Val::Int(_) => true,
        };
        if !finite {
            return Err(ctx.fail(
                "REF_NONFINITE",
                "f64 cpu reference",
                format!("output `{name}` is not finite on valid input: {v:?}"),
            ));
        }
    }
    // The judge also checks the reference itself against naive f64 formulas; its messages carry
    // their own class tag ([REF_MISMATCH]).
    let judgement = judge(&want).map_err(|m| ctx.fail("REF", "f64 cpu reference", m))?;
    // A reference tensor the output dtype (or the f32 the op computes in) cannot hold.
    let limit = ctx.prec.out_max.min(ctx.prec.compute_max);
    let unrepresentable = want.iter().find_map(|(name, v)| match v {
        Val::Tensor(t, _, _) => t
            .iter()
            .find(|x| x.abs() > limit)
            .map(|x| format!("reference `{name}` holds {x:e}, beyond {limit:e}")),
        _ => None,
    });
    // Or a result whose tolerance band reaches beyond that limit: the precision model says a
    // correct computation may legitimately produce a value the dtype cannot hold (a gradient of
    // 0 in f64 made of cancelling terms, amplified 1e12 times through a zero row's
    // normalization, is that much rounding error away from overflowing f16).
    let unrepresentable = unrepresentable.or_else(|| {
        want.iter().find_map(|(name, v)| match v {
            Val::Tensor(t, _, _) => {
                let tol = judgement.tol.iter().find(|(n, _)| n == name)?.1;
                let max = t.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let band = max * (1.0 + tol.rel) + tol.abs;
                (band > limit).then(|| {
                    format!("reference `{name}` (max {max:e}) plus its tolerance ({band:e}) reaches beyond {limit:e}")
                })
            }
            _ => None,
        })
    });
    // In the moderate regime only an unrepresentable result excuses an `Err` (f16 gradients of
    // small-norm rows at tau = 0.05 can exceed 65504); the op-specific excuses do not apply there.
    let err_allowed = unrepresentable
        .clone()
        .or(if ctx.regime == Regime::Moderate {
            None
        } else {
            judgement.err_allowed.clone()
        });
    for (variant, o) in variants {
        let got = match o {
            Outcome::Ok(got) => got,
            Outcome::Err(e) => {
                if err_allowed.is_none() {
                    return Err(ctx.fail(
                        "ERR_IN_RANGE",
                        variant,
                        format!(
                            "input is in range for {} but the call failed: {e}",
                            ctx.dtype
                        ),
                    ));
                }
                tally.allowed_err += 1;
                continue;
            }
            _ => unreachable!(),
        };
        if let Some(why) = &unrepresentable {
            if ctx.regime != Regime::Overflow {
                tally.unrepresentable += 1;
                continue;
            }
            // The overflow regime: (b) holds even here. The result cannot be represented, so
            // an `Ok` cannot be right; it must at least not be inf / NaN.
            for (name, v) in &got {
                if let Val::Tensor(t, _, _) = v {
                    if let Some(x) = t.iter().find(|x| !x.is_finite()) {
                        return Err(ctx.fail(
                            "OK_UNREPRESENTABLE",
                            variant,
                            format!("{why}; the call returned Ok with `{name}` holding {x} instead of an Err"),
                        ));
                    }
                }
            }
        }
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            // Finiteness, shape and dtype.
            match (g, w) {
                (Val::Scalar(g), _) if !g.is_finite() => {
                    return Err(ctx.fail("NONFINITE", variant, format!("`{name}` = {g}")))
                }
                (Val::Tensor(t, shape, dt), Val::Tensor(_, wshape, _)) => {
                    if let Some((i, x)) = t.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                        let bad = t.iter().filter(|x| !x.is_finite()).count();
                        return Err(ctx.fail(
                            "NONFINITE",
                            variant,
                            format!(
                                "`{name}`[{i}] = {x} ({bad} of {} values non-finite)",
                                t.len()
                            ),
                        ));
                    }
                    if shape != wshape {
                        return Err(ctx.fail(
                            "SHAPE",
                            variant,
                            format!("`{name}` has shape {shape:?}, reference {wshape:?}"),
                        ));
                    }
                    if *dt != ctx.dtype {
                        return Err(ctx.fail(
                            "DTYPE",
                            variant,
                            format!("`{name}` is {dt}, inputs are {}", ctx.dtype),
                        ));
                    }
                }
                _ => {}
            }
        }
        if unrepresentable.is_some() {
            tally.unrepresentable += 1;
            continue;
        }
        if let Some(why) = &judgement.skip_compare {
            let _ = why;
            tally.ill_conditioned += 1;
            continue;
        }
        for ((name, g), (wname, w)) in got.iter().zip(&want) {
            assert_eq!(name, wname, "outputs in the same order");
            if judgement.skip_outputs.contains(name) {
                continue;
            }
            let tol = judgement
                .tol
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t);
            let result = match (g, w) {
                (Val::Int(a), Val::Int(b)) => {
                    if a == b {
                        Ok(())
                    } else {
                        Err(format!("got {a}, want {b}"))
                    }
                }
                (Val::Scalar(a), Val::Scalar(b)) => match tol {
                    // An f64 loss computed from f32 quantities resolves nothing below f32's
                    // smallest normal either.
                    Some(tol) => close(
                        &[*a],
                        &[*b],
                        tol,
                        if ctx.prec.computes_f32() {
                            f32::MIN_POSITIVE as f64
                        } else {
                            0.0
                        },
                    ),
                    None => continue,
                },
                (Val::Tensor(a, _, _), Val::Tensor(b, _, _)) => match tol {
                    Some(tol) => close(a, b, tol, ctx.prec.tiny()),
                    None => continue,
                },
                _ => Err(format!("output kinds differ: {g:?} vs {w:?}")),
            };
            if let Err(detail) = result {
                return Err(ctx.fail("MISMATCH", variant, format!("`{name}`: {detail}")));
            }
        }
        tally.compared += 1;
    }
    Ok(tally)
}

/// Fails when `a` and `b` (two f64 computations of the same quantity) differ by more than
/// `rel * max(|a|, |b|) + abs`.
pub fn agree(what: &str, a: f64, b: f64, rel: f64, abs: f64) -> Result<(), String> {
    if (a - b).abs() <= rel * a.abs().max(b.abs()) + abs && a.is_finite() == b.is_finite() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {a:.12e} vs {b:.12e} (difference {:.3e})",
            (a - b).abs()
        ))
    }
}
