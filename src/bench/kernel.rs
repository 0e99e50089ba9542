//! contra's kernels launched alone on device buffers (the `kernels` reference of a GPU run, next
//! to the public calls), and the unfused baseline; the same code runs on the interpreted backend,
//! which is how it is tested without a GPU.
//!
//! Inputs are uploaded once per input set; each call runs the kernel sequence of the op (the
//! same `crate::kernels` problems the public ops use, without their finiteness scans, output
//! tensors and loss reduction). A timed call is measured on the device (between two CUDA events
//! on a GPU, around the whole sequence). Device memory is counted by a wrapper backend: the peak of bytes allocated
//! during a call beyond what was allocated before it (the inputs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cases::{self, Case, Op, Pass, Precision};
use super::runner::{raw_inputs, GradCheck, Impl, Outcome, RunOnce};
use crate::kernels::nn::GemmShape;
use crate::kernels::storage::DeviceBuf;
use crate::kernels::{self, Backend, BufInfo, Kernel, KernelParams, Launch};
use crate::ops::triplet::{Distance, Mining};
use crate::shared::Classes;
use crate::{Result, Similarity};

#[derive(Default)]
struct Stats {
    live: AtomicU64,
    peak: AtomicU64,
    baseline: AtomicU64,
}

impl Stats {
    fn alloc(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }
    fn free(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A backend that forwards to `B` and counts the bytes of live buffers.
pub(crate) struct Counted<B: Backend> {
    inner: Arc<B>,
    stats: Arc<Stats>,
}

pub(crate) struct CountedBuf<B: Backend> {
    buf: B::Buf,
    bytes: u64,
    stats: Arc<Stats>,
}

impl<B: Backend> Drop for CountedBuf<B> {
    fn drop(&mut self) {
        self.stats.free(self.bytes);
    }
}

impl<B: Backend> Counted<B> {
    fn new(inner: Arc<B>) -> Self {
        Counted {
            inner,
            stats: Arc::default(),
        }
    }

    fn wrap(&self, buf: B::Buf, words: usize) -> CountedBuf<B> {
        let bytes = 4 * words as u64;
        self.stats.alloc(bytes);
        CountedBuf {
            buf,
            bytes,
            stats: self.stats.clone(),
        }
    }

    fn reset_peak(&self) {
        let live = self.stats.live.load(Ordering::Relaxed);
        self.stats.baseline.store(live, Ordering::Relaxed);
        self.stats.peak.store(live, Ordering::Relaxed);
    }

    fn peak(&self) -> u64 {
        self.stats.peak.load(Ordering::Relaxed) - self.stats.baseline.load(Ordering::Relaxed)
    }
}

impl<B: Backend> Backend for Counted<B> {
    type Buf = CountedBuf<B>;

    fn upload_words(&self, name: &'static str, words: &[u32], info: BufInfo) -> Result<Self::Buf> {
        let buf = self.inner.upload_words(name, words, info)?;
        Ok(self.wrap(buf, words.len().max(1)))
    }

    fn output_of(&self, name: &'static str, info: BufInfo) -> Result<Self::Buf> {
        let buf = self.inner.output_of(name, info)?;
        Ok(self.wrap(buf, info.elem.words(info.count).max(1)))
    }

    // The inner backend's zeros (on a GPU an allocation, no host copy), as the public ops get
    // them. The trait's default uploads a host vector: a 64 MiB host-to-device copy per call for
    // CLIP's dK at N = 65536, D = 256, the likely reason its kernel row measured 170 ms on the H200
    // against the public call's 114 (not measured again since).
    fn zeros(&self, name: &'static str, len: usize) -> Result<Self::Buf> {
        let buf = self.inner.zeros(name, len)?;
        Ok(self.wrap(buf, len.max(1)))
    }

    fn ptr(&self, buf: &Self::Buf) -> *mut std::ffi::c_void {
        self.inner.ptr(&buf.buf)
    }

    fn info(&self, buf: &Self::Buf) -> BufInfo {
        self.inner.info(&buf.buf)
    }

    fn download_words(&self, buf: &Self::Buf) -> Result<Vec<u32>> {
        self.inner.download_words(&buf.buf)
    }

    fn duplicate(&self, buf: &Self::Buf) -> Result<Self::Buf> {
        let copy = self.inner.duplicate(&buf.buf)?;
        Ok(self.wrap(copy, buf.bytes as usize / 4))
    }

    fn adopt(&self, buf: Self::Buf) -> Result<DeviceBuf> {
        // A counted buffer frees its count when dropped: the tensor gets a copy of its own.
        self.inner.adopt(self.inner.duplicate(&buf.buf)?)
    }

    fn resident<'a>(&self, _buf: &'a DeviceBuf) -> Option<&'a Self::Buf> {
        // Tensors hold the inner backend's buffers, not counted ones: always copied in.
        None
    }

    fn shared_bytes_per_block(&self) -> usize {
        self.inner.shared_bytes_per_block()
    }

    fn launch<P: KernelParams>(
        &self,
        kernel: Kernel<P>,
        launch: Launch,
        params: &P,
        written: &[&Self::Buf],
    ) -> Result<()> {
        let written: Vec<&B::Buf> = written.iter().map(|b| &b.buf).collect();
        self.inner.launch(kernel, launch, params, &written)
    }

    fn gemm(&self, shape: &GemmShape, a: &Self::Buf, b: &Self::Buf, c: &Self::Buf) -> Result<()> {
        self.inner.gemm(shape, &a.buf, &b.buf, &c.buf)
    }

    fn timed<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        self.inner.timed(work)
    }
}

/// The sum of per-row values, copied to the host and summed there in f64.
fn host_sum<B: Backend>(b: &B, values: &B::Buf) -> Result<f64> {
    Ok(b.download(values)?.iter().map(|&v| v as f64).sum())
}

/// One input set on the device.
struct DeviceSet<B: Backend> {
    /// The f32 tensors of the case, in input order.
    tensors: Vec<CountedBuf<B>>,
    /// Index buffers: positives, labels, diagonal, ... (per op).
    ints: Vec<CountedBuf<B>>,
    /// SupCon's per-row target weights.
    extra: Option<CountedBuf<B>>,
}

struct KernelRunner<B: Backend> {
    b: Counted<B>,
    case: Case,
    sets: Vec<DeviceSet<B>>,
    next: usize,
    /// Run the unfused baseline ([`super::unfused`]) instead of contra's fused kernels.
    unfused: bool,
}

fn i32s(v: impl IntoIterator<Item = usize>) -> Vec<i32> {
    v.into_iter().map(|x| x as i32).collect()
}

impl<B: Backend> KernelRunner<B> {
    fn new(inner: Arc<B>, case: &Case, imp: Impl) -> Result<Self> {
        let unfused = imp == Impl::Unfused;
        if unfused {
            super::unfused::check_supported(case)?;
        }
        let b = Counted::new(inner);
        let mut sets = Vec::new();
        for set in 0..case.rotations() {
            let raw = raw_inputs(case, set);
            let tensors = raw
                .tensors
                .iter()
                .map(|t| match case.precision {
                    Precision::Bf16 => {
                        let bits: Vec<u16> = t
                            .iter()
                            .map(|&v| half::bf16::from_f32(v).to_bits())
                            .collect();
                        b.upload_half("input", &bits, kernels::Elem::Bf16)
                    }
                    Precision::F32 | Precision::Tf32 => b.upload("input", t),
                })
                .collect::<Result<Vec<_>>>()?;
            let n = case.n;
            let mut extra = None;
            let ints = match case.op {
                Op::Ntxent => {
                    vec![b.upload_i32("positives", &i32s((0..n).map(|i| (i + n / 2) % n)))?]
                }
                Op::Infonce | Op::Clip => vec![b.upload_i32("diagonal", &i32s(0..n))?],
                Op::Supcon => {
                    let (class, weight) = Classes::new(&raw.labels, case.v).for_kernels();
                    extra = Some(b.upload("target_weight", &weight)?);
                    vec![b.upload_i32("labels", &class)?]
                }
                Op::Triplet => {
                    let (class, _) = Classes::new(&raw.labels, 1).for_kernels();
                    vec![b.upload_i32("labels", &class)?]
                }
                Op::Margin => vec![b.upload_i32(
                    "y",
                    &raw.labels.iter().map(|&y| y as i32).collect::<Vec<_>>(),
                )?],
                _ => vec![],
            };
            sets.push(DeviceSet {
                tensors,
                ints,
                extra,
            });
        }
        Ok(KernelRunner {
            b,
            case: *case,
            sets,
            next: 0,
            unfused,
        })
    }

    fn head(&self, buf: &CountedBuf<B>) -> Result<f64> {
        Ok(self
            .b
            .download(buf)?
            .iter()
            .take(64)
            .map(|&v| v as f64)
            .sum())
    }

    fn grad(&self, buf: &CountedBuf<B>, check: bool) -> Result<Option<GradCheck>> {
        if check {
            let values = self.b.download(buf)?;
            Ok(Some(GradCheck::of(values.iter().map(|&v| v as f64))))
        } else {
            Ok(None)
        }
    }
}

impl<B: Backend> RunOnce for KernelRunner<B> {
    fn run(&mut self, check: bool) -> Result<Outcome> {
        let set_index = self.next;
        self.next = (self.next + 1) % self.sets.len();
        self.run_set(set_index, check)
    }

    fn run_timed(&mut self) -> Result<f64> {
        let set_index = self.next;
        self.next = (self.next + 1) % self.sets.len();
        let (_, ms) = self.b.timed(|| self.run_set(set_index, false))?;
        Ok(ms)
    }

    fn device_peak(&mut self) -> Option<u64> {
        Some(self.b.peak())
    }

    fn reset_device_peak(&mut self) {
        self.b.reset_peak();
    }
}

impl<B: Backend> KernelRunner<B> {
    fn run_set(&self, set_index: usize, check: bool) -> Result<Outcome> {
        let b = &self.b;
        let c = self.case;
        let set = &self.sets[set_index];
        if self.unfused {
            return super::unfused::run(b, &c, &set.tensors, &set.ints[0], check);
        }
        let t = &set.tensors;
        let bwd = c.pass == Pass::ForwardBackward;
        let (n, d, k) = (c.n, c.d, c.k);
        let loss_only = |loss: f64| Outcome {
            check: loss,
            grad_check: None,
        };
        match c.op {
            Op::Ntxent | Op::Infonce => {
                let ntxent = c.op == Op::Ntxent;
                let problem = kernels::infonce::Problem::<Counted<B>> {
                    q: &t[0],
                    k: if ntxent { &t[0] } else { &t[1] },
                    positives: &set.ints[0],
                    rows: n,
                    cols: if ntxent { n } else { k },
                    dim: d,
                    temperature: if ntxent {
                        cases::NTXENT_TAU
                    } else {
                        cases::INFONCE_TAU
                    },
                    normalize: true,
                    self_mask: ntxent,
                    symmetric: ntxent,
                };
                let (row_loss, lse) = problem.forward(b)?;
                let loss = host_sum(b, &row_loss)? / n as f64;
                if !bwd {
                    return Ok(loss_only(loss));
                }
                let (dq, _) = problem.backward(b, &lse, 1.0)?;
                Ok(Outcome {
                    check: loss,
                    grad_check: self.grad(&dq, check)?,
                })
            }
            Op::Clip => {
                let problem = kernels::clip::Clip::<Counted<B>> {
                    a: &t[0],
                    b: &t[1],
                    diagonal: &set.ints[0],
                    rows: n,
                    dim: d,
                    log_scale: kernels::ScalarArg::Value(cases::clip_log_scale()),
                };
                let fwd = problem.forward(b)?;
                let loss = host_sum(b, &fwd.row_value)? / problem.divisor();
                if !bwd {
                    return Ok(loss_only(loss));
                }
                let (da, _, _) = problem.backward(b, &fwd.row_lse, &fwd.col_lse, 1.0)?;
                Ok(Outcome {
                    check: loss,
                    grad_check: self.grad(&da, check)?,
                })
            }
            Op::Siglip => {
                let problem = kernels::siglip::SigLip::<Counted<B>> {
                    a: &t[0],
                    b: &t[1],
                    rows: n,
                    cols: n,
                    positives: true,
                    dim: d,
                    normalize: true,
                    log_scale: kernels::ScalarArg::Value(cases::SIGLIP_LOG_SCALE),
                    bias: kernels::ScalarArg::Value(cases::SIGLIP_BIAS),
                };
                let (row_loss, grads) = problem.sweep(b, bwd.then_some(1.0))?;
                let loss = host_sum(b, &row_loss)? / problem.divisor();
                match grads {
                    None => Ok(loss_only(loss)),
                    Some(grads) => Ok(Outcome {
                        check: loss,
                        grad_check: self.grad(&grads.a, check)?,
                    }),
                }
            }
            Op::Moco => {
                let problem = kernels::moco::Moco::<Counted<B>> {
                    q: &t[0],
                    k: &t[1],
                    queue: &t[2],
                    rows: n,
                    queue_len: k,
                    dim: d,
                    temperature: cases::MOCO_TAU,
                };
                let (row_loss, lse) = problem.forward(b)?;
                let loss = host_sum(b, &row_loss)? / n as f64;
                if !bwd {
                    return Ok(loss_only(loss));
                }
                let dq = problem.backward(b, &lse, 1.0)?;
                Ok(Outcome {
                    check: loss,
                    grad_check: self.grad(&dq, check)?,
                })
            }
            Op::Supcon => {
                let weight = set
                    .extra
                    .as_ref()
                    .expect("supcon sets carry target weights");
                let problem = kernels::supcon::SupCon::<Counted<B>> {
                    views: &t[0],
                    labels: &set.ints[0],
                    target_weight: weight,
                    rows: n * c.v,
                    anchors: (n * c.v) as f64,
                    dim: d,
                    temperature: cases::SUPCON_TAU.0,
                    base_temperature: cases::SUPCON_TAU.1,
                };
                let (row_loss, lse) = problem.forward(b)?;
                let loss = host_sum(b, &row_loss)? / problem.divisor();
                if !bwd {
                    return Ok(loss_only(loss));
                }
                let grad = problem.backward(b, &lse, 1.0)?;
                Ok(Outcome {
                    check: loss,
                    grad_check: self.grad(&grad, check)?,
                })
            }
            Op::Triplet => {
                let problem = kernels::triplet::Problem::<Counted<B>> {
                    x: &t[0],
                    rows: n,
                    dim: d,
                    distance: Distance::Euclidean,
                    mining: Mining::BatchHard,
                    margin: cases::TRIPLET_MARGIN,
                    nonzero_only: false,
                };
                let mined = problem.forward(b, &set.ints[0])?;
                let (loss, _) = crate::checks::Recorder::new(b, "triplet")?.finish_with(
                    "loss",
                    "",
                    |status, slots| problem.finish(b, &mined, status, slots),
                )?;
                let loss = loss.to_scalar()?;
                if !bwd {
                    return Ok(loss_only(loss));
                }
                let source = kernels::triplet::CoefSource::Device {
                    coef: &mined.coef,
                    summary: &mined.summary,
                };
                let grad = problem.backward(b, source, 1.0)?;
                Ok(Outcome {
                    check: loss,
                    grad_check: self.grad(&grad, check)?,
                })
            }
            Op::Margin => {
                let problem = kernels::margin::Problem::<Counted<B>> {
                    x1: &t[0],
                    x2: &t[1],
                    y: &set.ints[0],
                    rows: n,
                    dim: d,
                    margin: cases::MARGIN_MARGIN,
                    pml: false,
                };
                let (row_dist, terms) = problem.forward(b)?;
                let (loss, _) = crate::checks::Recorder::new(b, "margin_loss")?
                    .finish_terms("loss", &row_dist, terms, n as f64, "")?;
                let loss = loss.to_scalar()?;
                if !bwd {
                    return Ok(loss_only(loss));
                }
                let (g1, _) = problem.backward(b, 1.0)?;
                Ok(Outcome {
                    check: loss,
                    grad_check: self.grad(&g1, check)?,
                })
            }
            Op::Nce => {
                let problem = kernels::nce::Problem::<Counted<B>> {
                    s_pos: &t[0],
                    s_neg: &t[1],
                    logq_pos: &t[2],
                    logq_neg: &t[3],
                    rows: n,
                    k,
                };
                let loss = host_sum(b, &problem.forward(b)?)? / n as f64;
                if !bwd {
                    return Ok(loss_only(loss));
                }
                let (gp, _) = problem.backward(b, 1.0)?;
                Ok(Outcome {
                    check: loss,
                    grad_check: self.grad(&gp, check)?,
                })
            }
            Op::Normalize => {
                let y = kernels::normalize::forward(b, &t[0], n, d)?;
                let head = if check { self.head(&y)? } else { 0.0 };
                if !bwd {
                    return Ok(loss_only(head));
                }
                let gx = kernels::normalize::backward(b, &t[0], &t[1], n, d)?;
                Ok(Outcome {
                    check: head,
                    grad_check: self.grad(&gx, check)?,
                })
            }
            Op::Similarity => {
                let s =
                    kernels::similarity::forward(b, &t[0], &t[1], (n, k, d), Similarity::Cosine)?;
                let head = if check { self.head(&s)? } else { 0.0 };
                Ok(loss_only(head))
            }
            Op::Momentum => {
                kernels::momentum::update(b, &t[0], &t[1], n, cases::MOMENTUM_M)?;
                let head = if check { self.head(&t[0])? } else { 0.0 };
                Ok(loss_only(head))
            }
        }
    }
}

/// `imp` (contra's kernels or the unfused baseline) on the interpreted backend (slow by
/// design: tests of this module).
pub(crate) fn runner_interp(case: &Case, imp: Impl) -> Result<Box<dyn RunOnce>> {
    let inner = Arc::new(kernels::interp::Interp);
    Ok(Box::new(KernelRunner::new(inner, case, imp)?))
}

/// `imp` (contra's kernels or the unfused baseline) on GPU `ordinal`.
#[cfg(feature = "cuda")]
pub(crate) fn runner_cuda(case: &Case, ordinal: usize, imp: Impl) -> Result<Box<dyn RunOnce>> {
    let inner = kernels::cuda::Cuda::get(ordinal)?;
    Ok(Box::new(KernelRunner::new(inner, case, imp)?))
}
