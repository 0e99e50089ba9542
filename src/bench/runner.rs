//! Running one case: inputs, the call, the timing loop and the peak-memory reading.
//!
//! A [`Runner`] owns `case.rotations()` input sets and runs the next one on every call, so that
//! consecutive timed calls do not find their inputs in cache. [`measure`] runs it once to read the
//! peak memory (that call is also the warm-up), then times calls until both a minimum count and a
//! minimum time are reached, and reports the median.

use std::time::Instant;

use serde_json::{json, Value};

use super::cases::{self, Case, Op, Pass, Precision};
use super::naive;
use crate::{with_f32_precision, Device, Error, Result, Tensor};

/// Which implementation a runner calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Impl {
    /// contra's public ops on tensors already on the device (each call reads its loss, as a
    /// training step does).
    Contra,
    /// contra's kernel launches alone on device buffers (kernel devices only): what the public
    /// ops cost without their checks, allocations and the read of the loss.
    Kernels,
    /// The eager-style Rust reference of [`super::naive`] (CPU only).
    Naive,
    /// The unfused kernel sequence of `src/bench/unfused.rs` (GEMM, then separate log-softmax and
    /// cross-entropy kernels; kernel devices only, NT-Xent and InfoNCE).
    Unfused,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Contra => "contra",
            Impl::Kernels => "kernels",
            Impl::Naive => "naive",
            Impl::Unfused => "unfused",
        }
    }

    pub fn parse(name: &str) -> Result<Impl> {
        match name {
            "contra" => Ok(Impl::Contra),
            "kernels" => Ok(Impl::Kernels),
            "naive" => Ok(Impl::Naive),
            "unfused" => Ok(Impl::Unfused),
            _ => Err(Error::invalid(
                "bench",
                "impl",
                format!("unknown implementation `{name}`"),
            )),
        }
    }
}

/// What one call returned, to compare implementations: the loss (or the sum of the first 64
/// outputs for normalize and similarity, of the updated parameters for momentum) and, for
/// fwd+bwd, the first 64 entries of the first input's gradient, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    pub check: f64,
    pub grad_check: Option<GradCheck>,
}

/// The first 64 entries of a gradient: their sum and the sum of their magnitudes. The signed
/// sum largely cancels (a softmax gradient sums to about zero), so two implementations are
/// compared to the scale of the magnitudes, not of the sum.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GradCheck {
    pub sum: f64,
    pub abs_sum: f64,
}

impl GradCheck {
    pub fn of(v: impl IntoIterator<Item = f64>) -> GradCheck {
        v.into_iter()
            .take(64)
            .fold(GradCheck::default(), |acc, x| GradCheck {
                sum: acc.sum + x,
                abs_sum: acc.abs_sum + x.abs(),
            })
    }

    /// The sums differ by at most `tol` times the larger magnitude sum (or 1e-7).
    pub fn agrees(&self, other: &GradCheck, tol: f64) -> bool {
        (self.sum - other.sum).abs() <= (tol * self.abs_sum.max(other.abs_sum)).max(1e-7)
    }
}

fn head_sum(v: &[f32]) -> f64 {
    v.iter().take(64).map(|&x| x as f64).sum()
}

fn grad_head(t: &Tensor) -> Result<GradCheck> {
    Ok(match t.host::<f32>() {
        Some(v) => GradCheck::of(v.iter().map(|&x| x as f64)),
        None => GradCheck::of(t.to_vec_f64()?),
    })
}

fn tensor_head(t: &Tensor) -> Result<f64> {
    match t.host::<f32>() {
        Some(v) => Ok(head_sum(v)),
        None => Ok(t.to_vec_f64()?.iter().take(64).sum()),
    }
}

/// The raw tensors of one input set, in the order the reference script builds them.
pub(crate) struct RawSet {
    pub tensors: Vec<Vec<f32>>,
    pub labels: Vec<i64>,
}

/// Builds input set `set` of `case`: tensor `t` is `uniform(len, seed(set, t))`.
pub(crate) fn raw_inputs(case: &Case, set: usize) -> RawSet {
    let u = |len: usize, t: usize| cases::uniform(len, cases::seed(set, t));
    let (n, d, k, v, c) = (case.n, case.d, case.k, case.v, case.c);
    let (tensors, labels) = match case.op {
        Op::Ntxent | Op::Triplet => (vec![u(n * d, 0)], cases::labels(n, c)),
        Op::Infonce | Op::Similarity => (vec![u(n * d, 0), u(k * d, 1)], vec![]),
        Op::Clip | Op::Siglip => (vec![u(n * d, 0), u(n * d, 1)], vec![]),
        Op::Moco => (vec![u(n * d, 0), u(n * d, 1), u(k * d, 2)], vec![]),
        Op::Supcon => (vec![u(n * v * d, 0)], cases::labels(n, c)),
        Op::Margin => (
            vec![u(n * d, 0), u(n * d, 1)],
            (0..n as i64).map(|i| i % 2).collect(),
        ),
        Op::Nce => (
            vec![
                u(n, 0),
                u(n * k, 1),
                cases::nce_logq(&u(n, 2), k),
                cases::nce_logq(&u(n * k, 3), k),
            ],
            vec![],
        ),
        Op::Normalize => match case.pass {
            Pass::Forward => (vec![u(n * d, 0)], vec![]),
            Pass::ForwardBackward => (vec![u(n * d, 0), u(n * d, 1)], vec![]),
        },
        Op::Momentum => (vec![u(n, 0), u(n, 1)], vec![]),
    };
    RawSet { tensors, labels }
}

/// The tensor shapes of `case`, in input order.
fn shapes(case: &Case) -> Vec<Vec<usize>> {
    let (n, d, k, v) = (case.n, case.d, case.k, case.v);
    match case.op {
        Op::Ntxent | Op::Triplet => vec![vec![n, d]],
        Op::Infonce | Op::Similarity => vec![vec![n, d], vec![k, d]],
        Op::Clip | Op::Siglip | Op::Margin => vec![vec![n, d], vec![n, d]],
        Op::Moco => vec![vec![n, d], vec![n, d], vec![k, d]],
        Op::Supcon => vec![vec![n, v, d]],
        Op::Nce => vec![vec![n], vec![n, k], vec![n], vec![n, k]],
        Op::Normalize => vec![vec![n, d]; 2],
        Op::Momentum => vec![vec![n], vec![n]],
    }
}

/// One implementation of one case, ready to run.
pub(crate) trait RunOnce {
    /// One call on the next input set; with `check`, also the checksums that need a transfer
    /// (kernel backends download the gradient's first values).
    fn run(&mut self, check: bool) -> Result<Outcome>;
    /// Peak device bytes allocated by the calls since the last reset (kernel backends only).
    fn device_peak(&mut self) -> Option<u64> {
        None
    }
    fn reset_device_peak(&mut self) {}
    /// One unchecked call on the next input set and its time in milliseconds: wall-clock here;
    /// kernel backends time the device (CUDA events on a GPU).
    fn run_timed(&mut self) -> Result<f64> {
        let start = Instant::now();
        std::hint::black_box(self.run(false)?);
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
}

/// A prepared case: inputs built, ready for timed calls.
pub struct Runner {
    case: Case,
    imp: Impl,
    device: Device,
    inner: Box<dyn RunOnce>,
}

impl Runner {
    /// Builds the inputs of `case` for `imp` on `device` (`Cpu` for both implementations;
    /// `Interp` or `Cuda(i)` for contra's kernels on device-resident buffers).
    pub fn new(case: &Case, imp: Impl, device: Device) -> Result<Runner> {
        if case.pass == Pass::ForwardBackward && !case.op.has_backward() {
            return Err(Error::invalid(
                "bench",
                "pass",
                format!("{} has no backward", case.op.name()),
            ));
        }
        if case.precision == Precision::Bf16 && imp == Impl::Naive {
            return Err(Error::invalid(
                "bench",
                "dtype",
                "the naive Rust reference runs f32 inputs",
            ));
        }
        let inner: Box<dyn RunOnce> = match (imp, device) {
            (Impl::Contra, _) => Box::new(ContraApi::new(case, device)?),
            (Impl::Naive, Device::Cpu) => Box::new(NaiveCpu::new(case)),
            (Impl::Kernels | Impl::Unfused, Device::Interp) => {
                super::kernel::runner_interp(case, imp)?
            }
            #[cfg(feature = "cuda")]
            (Impl::Kernels | Impl::Unfused, Device::Cuda(i)) => {
                super::kernel::runner_cuda(case, i, imp)?
            }
            #[cfg(not(feature = "cuda"))]
            (Impl::Kernels | Impl::Unfused, Device::Cuda(_)) => {
                return Err(Error::Device(
                    "this build has no `cuda` feature (cargo build --release --features cuda)"
                        .into(),
                ))
            }
            (Impl::Naive, _) => {
                return Err(Error::invalid(
                    "bench",
                    "device",
                    "the naive Rust reference runs on the CPU only",
                ))
            }
            (Impl::Unfused | Impl::Kernels, Device::Cpu) => {
                return Err(Error::invalid(
                    "bench",
                    "device",
                    format!(
                        "`{}` runs on kernel devices (cuda, interp); the CPU's eager-style \
                         reference is `naive`",
                        imp.name()
                    ),
                ))
            }
        };
        Ok(Runner {
            case: *case,
            imp,
            device,
            inner,
        })
    }

    pub fn case(&self) -> &Case {
        &self.case
    }
    pub fn implementation(&self) -> Impl {
        self.imp
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// One call on the next input set. On a kernel backend the gradient checksum is left out
    /// (it needs a transfer); [`Runner::run_checked`] includes it.
    pub fn run(&mut self) -> Result<Outcome> {
        let inner = &mut self.inner;
        with_f32_precision(self.case.precision.f32_precision(), || inner.run(false))
    }

    /// One call on the next input set, with every checksum.
    pub fn run_checked(&mut self) -> Result<Outcome> {
        let inner = &mut self.inner;
        with_f32_precision(self.case.precision.f32_precision(), || inner.run(true))
    }
}

/// contra's public ops on tensors on `device`, put there before the timed calls.
struct ContraApi {
    case: Case,
    device: Device,
    sets: Vec<(Vec<Tensor>, Vec<i64>)>,
    next: usize,
}

impl ContraApi {
    fn new(case: &Case, device: Device) -> Result<ContraApi> {
        let shapes = shapes(case);
        let sets = (0..case.rotations())
            .map(|set| {
                let raw = raw_inputs(case, set);
                let tensors = raw
                    .tensors
                    .into_iter()
                    .zip(&shapes)
                    .map(|(v, s)| {
                        let t = Tensor::from_vec(v, s, Device::Cpu)?;
                        let t = match case.precision {
                            Precision::Bf16 => t.to_dtype(crate::DType::Bf16)?,
                            Precision::F32 | Precision::Tf32 => t,
                        };
                        t.to_device(device)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((tensors, raw.labels))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ContraApi {
            case: *case,
            device,
            sets,
            next: 0,
        })
    }
}

impl RunOnce for ContraApi {
    fn run(&mut self, check: bool) -> Result<Outcome> {
        let set = self.next;
        self.next = (self.next + 1) % self.sets.len();
        let case = self.case;
        let device = self.device;
        let (tensors, labels) = &mut self.sets[set];
        let bwd = case.pass == Pass::ForwardBackward;
        let t = &*tensors;
        // Reading a gradient or an output from a device is a copy a training step does not
        // make: only the checked calls do; the others wait for the device instead.
        let read = check || device == Device::Cpu;
        let grad = |g: &Tensor| read.then(|| grad_head(g).ok()).flatten();
        let head = |out: &Tensor| match read {
            true => tensor_head(out),
            false => device.synchronize().map(|()| 0.0),
        };
        Ok(match case.op {
            Op::Ntxent => {
                let opts = crate::NtXentOptions {
                    temperature: cases::NTXENT_TAU,
                };
                if bwd {
                    let out = crate::ntxent(&t[0], &opts)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_z),
                    }
                } else {
                    Outcome {
                        check: crate::ntxent_forward(&t[0], &opts)?.loss.to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Infonce => {
                let positives: Vec<usize> = (0..case.n).collect();
                let opts = crate::InfoNceOptions {
                    temperature: cases::INFONCE_TAU,
                    normalize: true,
                    self_mask: false,
                };
                if bwd {
                    let out = crate::infonce(&t[0], &t[1], &positives, &opts)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_q),
                    }
                } else {
                    Outcome {
                        check: crate::infonce_forward(&t[0], &t[1], &positives, &opts)?
                            .loss
                            .to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Clip => {
                let s = cases::clip_log_scale();
                if bwd {
                    let out = crate::clip(&t[0], &t[1], s)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_a),
                    }
                } else {
                    Outcome {
                        check: crate::clip_forward(&t[0], &t[1], s)?.loss.to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Siglip => {
                let (s, bias) = (cases::SIGLIP_LOG_SCALE, cases::SIGLIP_BIAS);
                let opts = crate::SigLipOptions::default();
                if bwd {
                    let out = crate::siglip(&t[0], &t[1], s, bias, &opts)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_a),
                    }
                } else {
                    Outcome {
                        check: crate::siglip_forward(&t[0], &t[1], s, bias, &opts)?.to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Moco => {
                let opts = crate::MocoOptions {
                    temperature: cases::MOCO_TAU,
                };
                if bwd {
                    let out = crate::moco(&t[0], &t[1], &t[2], &opts)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_q),
                    }
                } else {
                    Outcome {
                        check: crate::moco_forward(&t[0], &t[1], &t[2], &opts)?
                            .loss
                            .to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Supcon => {
                let opts = crate::SupConOptions {
                    temperature: cases::SUPCON_TAU.0,
                    base_temperature: cases::SUPCON_TAU.1,
                    ..Default::default()
                };
                if bwd {
                    let out = crate::supcon(&t[0], labels, &opts)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_features),
                    }
                } else {
                    Outcome {
                        check: crate::supcon_forward(&t[0], labels, &opts)?
                            .loss
                            .to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Triplet => {
                let opts = crate::TripletOptions {
                    distance: crate::Distance::Euclidean,
                    mining: case.mining,
                    margin: cases::TRIPLET_MARGIN,
                    ..Default::default()
                };
                if bwd {
                    let out = crate::triplet(&t[0], labels, &opts)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_x),
                    }
                } else {
                    Outcome {
                        check: crate::triplet_forward(&t[0], labels, &opts)?
                            .loss
                            .to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Margin => {
                let opts = crate::MarginOptions {
                    margin: cases::MARGIN_MARGIN,
                    ..Default::default()
                };
                if bwd {
                    let out = crate::margin_loss(&t[0], &t[1], labels, &opts)?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_x1),
                    }
                } else {
                    Outcome {
                        check: crate::margin_forward(&t[0], &t[1], labels, &opts)?
                            .loss
                            .to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Nce => {
                if bwd {
                    let out = crate::nce(&t[0], &t[1], &t[2], &t[3])?;
                    Outcome {
                        check: out.loss.to_scalar()?,
                        grad_check: grad(&out.grad_s_pos),
                    }
                } else {
                    Outcome {
                        check: crate::nce_forward(&t[0], &t[1], &t[2], &t[3])?
                            .loss
                            .to_scalar()?,
                        grad_check: None,
                    }
                }
            }
            Op::Normalize => {
                let y = crate::normalize(&t[0])?;
                let check = head(&y)?;
                if bwd {
                    let gx = crate::normalize_backward(&t[0], &t[1])?;
                    Outcome {
                        check,
                        grad_check: grad(&gx),
                    }
                } else {
                    Outcome {
                        check,
                        grad_check: None,
                    }
                }
            }
            Op::Similarity => {
                let s = crate::similarity(&t[0], &t[1], crate::Similarity::Cosine)?;
                Outcome {
                    check: head(&s)?,
                    grad_check: None,
                }
            }
            Op::Momentum => {
                let (k, q) = tensors.split_at_mut(1);
                crate::momentum_update(&mut k[0], &q[0], cases::MOMENTUM_M)?;
                Outcome {
                    check: head(&k[0])?,
                    grad_check: None,
                }
            }
        })
    }
}

/// The eager-style Rust reference.
struct NaiveCpu {
    case: Case,
    sets: Vec<RawSet>,
    next: usize,
}

impl NaiveCpu {
    fn new(case: &Case) -> NaiveCpu {
        NaiveCpu {
            case: *case,
            sets: (0..case.rotations()).map(|s| raw_inputs(case, s)).collect(),
            next: 0,
        }
    }
}

impl RunOnce for NaiveCpu {
    fn run(&mut self, _check: bool) -> Result<Outcome> {
        let set = self.next;
        self.next = (self.next + 1) % self.sets.len();
        let case = self.case;
        let RawSet { tensors, labels } = &mut self.sets[set];
        let bwd = case.pass == Pass::ForwardBackward;
        let d = case.d;
        let t = &*tensors;
        let (check, grad) = match case.op {
            Op::Ntxent => naive::ntxent(&t[0], d, cases::NTXENT_TAU, bwd),
            Op::Infonce => naive::infonce(&t[0], &t[1], d, cases::INFONCE_TAU, bwd),
            Op::Clip => naive::clip(&t[0], &t[1], d, cases::clip_log_scale(), bwd),
            Op::Siglip => naive::siglip(
                &t[0],
                &t[1],
                d,
                (cases::SIGLIP_LOG_SCALE, cases::SIGLIP_BIAS),
                bwd,
            ),
            Op::Moco => naive::moco(&t[0], &t[1], &t[2], d, cases::MOCO_TAU, bwd),
            Op::Supcon => naive::supcon(&t[0], labels, case.v, d, cases::SUPCON_TAU, bwd),
            Op::Triplet => {
                naive::triplet(&t[0], labels, d, cases::TRIPLET_MARGIN, case.mining, bwd)
            }
            Op::Margin => naive::margin(&t[0], &t[1], labels, d, cases::MARGIN_MARGIN, bwd),
            Op::Nce => naive::nce(&t[0], &t[1], &t[2], &t[3], bwd),
            Op::Normalize => naive::normalize_op(&t[0], d, bwd.then(|| &t[1][..])),
            Op::Similarity => (naive::cosine_similarity(&t[0], &t[1], d).0, None),
            Op::Momentum => {
                let (k, q) = tensors.split_at_mut(1);
                naive::momentum(&mut k[0], &q[0], cases::MOMENTUM_M);
                (head_sum(&k[0]), None)
            }
        };
        Ok(Outcome {
            check,
            grad_check: grad.map(|g| GradCheck::of(g.iter().map(|&x| x as f64))),
        })
    }
}

/// How long to time a case.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Keep timing until this many seconds of calls have run...
    pub min_time_s: f64,
    /// ...and at least this many calls...
    pub min_reps: usize,
    /// ...but never more than this many.
    pub max_reps: usize,
}

impl Timing {
    pub fn quick() -> Timing {
        Timing {
            min_time_s: 0.5,
            min_reps: 3,
            max_reps: 50,
        }
    }
    pub fn full() -> Timing {
        Timing {
            min_time_s: 2.0,
            min_reps: 5,
            max_reps: 200,
        }
    }
    /// A single timed call (tests).
    pub fn once() -> Timing {
        Timing {
            min_time_s: 0.0,
            min_reps: 1,
            max_reps: 1,
        }
    }

    pub(crate) fn to_json(self) -> Value {
        json!({"min_time_s": self.min_time_s, "min_reps": self.min_reps, "max_reps": self.max_reps})
    }

    pub(crate) fn from_json(v: &Value) -> Option<Timing> {
        Some(Timing {
            min_time_s: v.get("min_time_s")?.as_f64()?,
            min_reps: v.get("min_reps")?.as_u64()? as usize,
            max_reps: v.get("max_reps")?.as_u64()? as usize,
        })
    }
}

/// The result of [`measure`].
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Median wall time of the timed calls, milliseconds.
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub reps: usize,
    /// Peak bytes the first call added: resident memory on the CPU (`VmHWM` after the call minus
    /// `VmRSS` before it, with the high-water mark reset), bytes allocated on the device for
    /// kernels. `None` where it could not be read.
    pub peak_bytes: Option<u64>,
    pub outcome: Outcome,
}

impl Measurement {
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "reps": self.reps,
            "peak_bytes": self.peak_bytes,
            "check": self.outcome.check,
            "grad_check": self.outcome.grad_check.map(|g| g.sum),
            "grad_abs": self.outcome.grad_check.map(|g| g.abs_sum),
        })
    }

    pub(crate) fn from_json(v: &Value) -> Option<Measurement> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Some(Measurement {
            median_ms: f("median_ms")?,
            min_ms: f("min_ms").unwrap_or(f64::NAN),
            max_ms: f("max_ms").unwrap_or(f64::NAN),
            reps: v.get("reps").and_then(Value::as_u64).unwrap_or(0) as usize,
            peak_bytes: v.get("peak_bytes").and_then(Value::as_u64),
            outcome: Outcome {
                check: f("check").unwrap_or(f64::NAN),
                grad_check: f("grad_check").map(|sum| GradCheck {
                    sum,
                    abs_sum: f("grad_abs").unwrap_or(sum.abs()),
                }),
            },
        })
    }
}

/// Runs `runner` once as the warm-up, once for the peak memory and the checksums, then times
/// calls per `timing`.
pub fn measure(runner: &mut Runner, timing: &Timing) -> Result<Measurement> {
    let precision = runner.case.precision.f32_precision();
    with_f32_precision(precision, || measure_at_precision(runner, timing))
}

fn measure_at_precision(runner: &mut Runner, timing: &Timing) -> Result<Measurement> {
    // Start the worker threads (and touch their stacks) before anything is measured.
    rayon::broadcast(|_| std::hint::black_box(0u8));
    runner.inner.run(false)?;
    let (outcome, peak_bytes) = if runner.device == Device::Cpu {
        release_free_memory();
        let reset = memory::reset_peak();
        let before = memory::rss_bytes();
        let outcome = runner.inner.run(true)?;
        let peak = match (reset, before, memory::peak_rss_bytes()) {
            (true, Some(before), Some(peak)) => Some(peak.saturating_sub(before)),
            _ => None,
        };
        (outcome, peak)
    } else {
        runner.inner.reset_device_peak();
        let outcome = runner.inner.run(true)?;
        (outcome, runner.inner.device_peak())
    };
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < timing.max_reps.max(1)
        && (times.len() < timing.min_reps.max(1)
            || started.elapsed().as_secs_f64() < timing.min_time_s)
    {
        times.push(runner.inner.run_timed()?);
    }
    times.sort_by(f64::total_cmp);
    Ok(Measurement {
        median_ms: median(&times),
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        reps: times.len(),
        peak_bytes,
        outcome,
    })
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Gives memory freed by earlier cases back to the system, so that a case's first call cannot
/// reuse it without raising the resident size (glibc keeps freed blocks below its mmap threshold).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only returns unused heap pages to the kernel; it takes no
        // pointers and is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Resident-memory readings of this process (Linux `/proc`).
pub(crate) mod memory {
    fn status_kib(key: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        status
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Current resident set size.
    pub fn rss_bytes() -> Option<u64> {
        status_kib("VmRSS:").map(|k| k * 1024)
    }

    /// Resident high-water mark since the process started or the last [`reset_peak`].
    pub fn peak_rss_bytes() -> Option<u64> {
        status_kib("VmHWM:").map(|k| k * 1024)
    }

    /// Resets the high-water mark to the current resident size (Linux >= 4.0); false if the
    /// kernel refused.
    pub fn reset_peak() -> bool {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }

    /// `MemAvailable` of `/proc/meminfo`.
    pub fn available_bytes() -> Option<u64> {
        meminfo_kib("MemAvailable:").map(|k| k * 1024)
    }

    /// `MemTotal` of `/proc/meminfo`.
    pub fn total_bytes() -> Option<u64> {
        meminfo_kib("MemTotal:").map(|k| k * 1024)
    }

    fn meminfo_kib(key: &str) -> Option<u64> {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        info.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

/// The line a child process prints before its result.
pub(crate) const CHILD_MARKER: &str = "CONTRA_BENCH_RESULT ";

/// The `--child` argument for running `case` with `imp` on `device` in a fresh process.
pub fn child_spec(case: &Case, imp: Impl, device: Device, timing: &Timing) -> String {
    json!({
        "case": case.to_json(),
        "impl": imp.name(),
        "device": device.to_string(),
        "timing": timing.to_json(),
    })
    .to_string()
}

/// The work of a child process: runs the case of `spec` ([`child_spec`]) and returns the line to
/// print (the marker and the measurement as JSON, or the error).
pub fn child_main(spec: &str) -> Result<String> {
    let bad = |what: &str| Error::invalid("bench", "--child", format!("{what}: {spec}"));
    let v: Value = serde_json::from_str(spec).map_err(|e| bad(&e.to_string()))?;
    let case = Case::from_json(v.get("case").ok_or_else(|| bad("no case"))?)?;
    let imp = Impl::parse(v.get("impl").and_then(Value::as_str).unwrap_or("contra"))?;
    let device = Device::parse(v.get("device").and_then(Value::as_str).unwrap_or("cpu"))?;
    let timing = v
        .get("timing")
        .and_then(Timing::from_json)
        .ok_or_else(|| bad("no timing"))?;
    let mut runner = Runner::new(&case, imp, device)?;
    let m = measure(&mut runner, &timing)?;
    Ok(format!("{CHILD_MARKER}{}", m.to_json()))
}

/// Parses the output of a child process: the measurement after the marker.
pub(crate) fn parse_child_output(stdout: &str) -> Option<Measurement> {
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(CHILD_MARKER))?;
    Measurement::from_json(&serde_json::from_str(line).ok()?)
}

/// Runs `case` with `imp` in a child process `exe args.. <spec>` and returns its measurement;
/// an error carries the end of its stderr (e.g. an out-of-memory kill).
pub(crate) fn measure_in_child(
    exe: &std::path::Path,
    args: &[String],
    case: &Case,
    imp: Impl,
    device: Device,
    timing: &Timing,
) -> Result<Measurement> {
    let spec = child_spec(case, imp, device, timing);
    let out = std::process::Command::new(exe)
        .args(args)
        .arg(&spec)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io(exe, e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(m) = parse_child_output(&stdout) {
        return Ok(m);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" / ");
    Err(Error::Device(format!(
        "{} of `{case}` failed in its child process ({}){}",
        imp.name(),
        out.status,
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    )))
}
