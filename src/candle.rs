//! contra's losses as candle ops (feature `candle`): a function from candle tensors to a 0-d loss
//! tensor whose `backward()` gives the inputs' gradients through candle's autograd. The forward
//! keeps what the backward needs (the per-row log-sum-exp), so the backward does not run the
//! forward again.
//!
//! Covered so far: NT-Xent, InfoNCE, SupCon, triplet, the margin loss and CLIP on candle's CPU
//! storage (f32, f64, bf16, f16; contiguous inputs; labels and indices as u8, u32 or i64
//! tensors) and MoCo with [`MocoQueue`]; CUDA storage follows.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use contra::NtXentOptions;
//!
//! let z = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 4), &Device::Cpu)?)?;
//! let loss = contra::candle::ntxent(z.as_tensor(), &NtXentOptions::default())?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(z.as_tensor()).unwrap().dims(), &[8, 4]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape};

use crate::{ntxent_backward, ntxent_forward, NtXentOptions, SoftmaxSaved};

/// A contra error as a candle error (its message names the op and what was wrong).
fn candle_error(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The contiguous values of a CPU storage as a contra host tensor of `layout`'s shape.
fn host_tensor(
    op: &str,
    storage: &CpuStorage,
    layout: &Layout,
) -> candle_core::Result<crate::Tensor> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "contra::candle::{op}: the input is not contiguous (call .contiguous() first)"
        ))
    })?;
    let dims = layout.shape().dims();
    let cpu = crate::Device::Cpu;
    let t = match storage {
        CpuStorage::F32(v) => crate::Tensor::from_slice(&v[start..end], dims, cpu),
        CpuStorage::F64(v) => crate::Tensor::from_slice(&v[start..end], dims, cpu),
        CpuStorage::BF16(v) => crate::Tensor::from_slice(&v[start..end], dims, cpu),
        CpuStorage::F16(v) => crate::Tensor::from_slice(&v[start..end], dims, cpu),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "contra::candle::{op}: {:?} inputs are not supported (f32, f64, bf16, f16)",
                other.dtype()
            )))
        }
    };
    t.map_err(candle_error)
}

/// A value as a one-element CPU storage of `like`'s dtype.
fn scalar_like(like: &CpuStorage, value: f64) -> CpuStorage {
    match like {
        CpuStorage::F64(_) => CpuStorage::F64(vec![value]),
        CpuStorage::BF16(_) => CpuStorage::BF16(vec![half::bf16::from_f64(value)]),
        CpuStorage::F16(_) => CpuStorage::F16(vec![half::f16::from_f64(value)]),
        _ => CpuStorage::F32(vec![value as f32]),
    }
}

/// A candle tensor (CPU) holding a contra tensor's values, of `like`'s dtype and shape.
fn to_candle(
    t: &crate::Tensor,
    like: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let values = t.to_vec_f64().map_err(candle_error)?;
    candle_core::Tensor::from_vec(values, like.shape(), like.device())?.to_dtype(like.dtype())
}

/// One input of a loss as contra takes it: values (a host tensor), or integer labels / indices.
enum Input {
    Values(crate::Tensor),
    Indices(Vec<i64>),
}

impl Input {
    fn values(&self, what: &'static str) -> crate::Result<&crate::Tensor> {
        match self {
            Input::Values(t) => Ok(t),
            Input::Indices(_) => Err(crate::Error::invalid(
                "contra::candle",
                what,
                "must be a float tensor (f32, f64, bf16, f16), not integers",
            )),
        }
    }

    fn indices(&self, what: &'static str) -> crate::Result<&[i64]> {
        match self {
            Input::Indices(v) => Ok(v),
            Input::Values(_) => Err(crate::Error::invalid(
                "contra::candle",
                what,
                "must be an integer tensor (u8, u32, i64)",
            )),
        }
    }
}

/// A contra loss as a candle op: its forward (the loss and what the backward needs) and its
/// backward (one gradient per input; `None` for labels).
trait Loss: Send + Sync + 'static {
    const NAME: &'static str;
    type Saved: Send + 'static;
    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, Self::Saved)>;
    fn backward(
        &self,
        inputs: &[Input],
        saved: &Self::Saved,
        grad_loss: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>>;
}

/// A loss with the state its forward left for its backward.
struct Op<L: Loss> {
    loss: L,
    saved: Mutex<Option<L::Saved>>,
}

impl<L: Loss> Op<L> {
    fn new(loss: L) -> Self {
        Op {
            loss,
            saved: Mutex::new(None),
        }
    }

    fn name(&self) -> &'static str {
        L::NAME
    }

    /// The forward on CPU storages: the loss in the first input's dtype, shape `()`.
    fn cpu_forward(
        &self,
        args: &[(&CpuStorage, &Layout)],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = args
            .iter()
            .map(|(s, l)| input_of(L::NAME, s, l))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (loss, saved) = self.loss.forward(&inputs).map_err(candle_error)?;
        *self.lock()? = Some(saved);
        Ok((scalar_like(args[0].0, loss), Shape::from(())))
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<L::Saved>>> {
        self.saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: state poisoned", L::NAME)))
    }

    /// The gradients of `grad_res * loss` for `args`, as candle tensors like them.
    fn backward(
        &self,
        args: &[&candle_core::Tensor],
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Vec<Option<candle_core::Tensor>>> {
        let grad_loss = grad_res
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let inputs = args
            .iter()
            .map(|t| {
                let (storage, layout) = t.storage_and_layout();
                match &*storage {
                    candle_core::Storage::Cpu(cpu) => input_of(L::NAME, cpu, layout),
                    _ => Err(candle_core::Error::Msg(format!(
                        "{}: contra::candle runs on CPU storage so far",
                        L::NAME
                    ))),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let guard = self.lock()?;
        let saved = guard.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: backward before forward", L::NAME))
        })?;
        let grads = self
            .loss
            .backward(&inputs, saved, grad_loss)
            .map_err(candle_error)?;
        grads
            .iter()
            .zip(args)
            .map(|(g, like)| g.as_ref().map(|g| to_candle(g, like)).transpose())
            .collect()
    }
}

/// A CPU storage as a loss input: float values as a contra host tensor, integers as labels.
fn input_of(op: &str, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Input> {
    let ints = |v: Vec<i64>| Ok(Input::Indices(v));
    let range = || {
        layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "contra::candle::{op}: the input is not contiguous (call .contiguous() first)"
            ))
        })
    };
    match storage {
        CpuStorage::U8(v) => {
            let (a, b) = range()?;
            ints(v[a..b].iter().map(|&x| x as i64).collect())
        }
        CpuStorage::U32(v) => {
            let (a, b) = range()?;
            ints(v[a..b].iter().map(|&x| x as i64).collect())
        }
        CpuStorage::I64(v) => {
            let (a, b) = range()?;
            ints(v[a..b].to_vec())
        }
        _ => host_tensor(op, storage, layout).map(Input::Values),
    }
}

macro_rules! custom_op {
    ($trait:ident, $fwd:ident ( $($s:ident, $l:ident),+ ), bwd ( $($a:ident),+ ) -> $out:ty, $pick:expr) => {
        impl<L: Loss> candle_core::$trait for Op<L> {
            fn name(&self) -> &'static str {
                Op::name(self)
            }

            fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> candle_core::Result<(CpuStorage, Shape)> {
                self.cpu_forward(&[$(($s, $l)),+])
            }

            fn bwd(
                &self,
                $($a: &candle_core::Tensor,)+
                _res: &candle_core::Tensor,
                grad_res: &candle_core::Tensor,
            ) -> candle_core::Result<$out> {
                let grads = self.backward(&[$($a),+], grad_res)?;
                Ok($pick(grads))
            }
        }
    };
}

fn take<const N: usize>(
    grads: Vec<Option<candle_core::Tensor>>,
) -> [Option<candle_core::Tensor>; N] {
    let mut out: [Option<candle_core::Tensor>; N] = std::array::from_fn(|_| None);
    for (slot, g) in out.iter_mut().zip(grads) {
        *slot = g;
    }
    out
}

custom_op!(CustomOp1, cpu_fwd(s1, l1), bwd(a1) -> Option<candle_core::Tensor>, |g| {
    let [g1] = take::<1>(g);
    g1
});
custom_op!(CustomOp2, cpu_fwd(s1, l1, s2, l2), bwd(a1, a2) -> (Option<candle_core::Tensor>, Option<candle_core::Tensor>), |g| {
    let [g1, g2] = take::<2>(g);
    (g1, g2)
});
custom_op!(CustomOp3, cpu_fwd(s1, l1, s2, l2, s3, l3), bwd(a1, a2, a3) -> (Option<candle_core::Tensor>, Option<candle_core::Tensor>, Option<candle_core::Tensor>), |g| {
    let [g1, g2, g3] = take::<3>(g);
    (g1, g2, g3)
});

struct NtXentLoss(NtXentOptions);

impl Loss for NtXentLoss {
    const NAME: &'static str = "ntxent";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, SoftmaxSaved)> {
        let fwd = ntxent_forward(inputs[0].values("z")?, &self.0)?;
        Ok((fwd.loss.to_scalar()?, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        Ok(vec![Some(ntxent_backward(
            inputs[0].values("z")?,
            &self.0,
            saved,
            g,
        )?)])
    }
}

/// The NT-Xent loss of `z` (2N x D: rows i and i + N are two views of sample i) as a 0-d tensor
/// of z's dtype; `loss.backward()` gives z's gradient. CPU storage; a non-contiguous `z` is an
/// error (call `.contiguous()`).
pub fn ntxent(
    z: &candle_core::Tensor,
    opts: &NtXentOptions,
) -> candle_core::Result<candle_core::Tensor> {
    z.apply_op1(Op::new(NtXentLoss(*opts)))
}

struct InfoNceLoss(crate::InfoNceOptions);

fn usizes(v: &[i64], what: &'static str) -> crate::Result<Vec<usize>> {
    v.iter()
        .enumerate()
        .map(|(i, &p)| {
            usize::try_from(p).map_err(|_| {
                crate::Error::invalid(
                    "infonce",
                    "positives",
                    format!("{what}[{i}] = {p} is negative"),
                )
            })
        })
        .collect()
}

impl Loss for InfoNceLoss {
    const NAME: &'static str = "infonce";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, SoftmaxSaved)> {
        let positives = usizes(inputs[2].indices("positives")?, "positives")?;
        let fwd = crate::infonce_forward(
            inputs[0].values("q")?,
            inputs[1].values("k")?,
            &positives,
            &self.0,
        )?;
        Ok((fwd.loss.to_scalar()?, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let positives = usizes(inputs[2].indices("positives")?, "positives")?;
        let (q, k) = (inputs[0].values("q")?, inputs[1].values("k")?);
        let (dq, dk) = crate::infonce_backward(q, k, &positives, &self.0, saved, g)?;
        Ok(vec![Some(dq), Some(dk), None])
    }
}

/// InfoNCE of queries `q` (N x D) against keys `k` (M x D) with one positive key index per
/// query (`positives`, an integer tensor of N); gradients for q and k.
pub fn infonce(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    positives: &candle_core::Tensor,
    opts: &crate::InfoNceOptions,
) -> candle_core::Result<candle_core::Tensor> {
    q.apply_op3(k, positives, Op::new(InfoNceLoss(*opts)))
}

struct SupConLoss(crate::SupConOptions);

impl Loss for SupConLoss {
    const NAME: &'static str = "supcon";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, SoftmaxSaved)> {
        let labels = inputs[1].indices("labels")?;
        let fwd = crate::supcon_forward(inputs[0].values("features")?, labels, &self.0)?;
        Ok((fwd.loss.to_scalar()?, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let labels = inputs[1].indices("labels")?;
        let grad =
            crate::supcon_backward(inputs[0].values("features")?, labels, &self.0, saved, g)?;
        Ok(vec![Some(grad), None])
    }
}

/// SupCon of `features` (N x V x D) with one label per sample (`labels`, an integer tensor of
/// N); the gradient for the features.
pub fn supcon(
    features: &candle_core::Tensor,
    labels: &candle_core::Tensor,
    opts: &crate::SupConOptions,
) -> candle_core::Result<candle_core::Tensor> {
    features.apply_op2(labels, Op::new(SupConLoss(*opts)))
}

struct TripletLoss {
    opts: crate::TripletOptions,
    /// The forward's counts, for the caller.
    counts: std::sync::Arc<Mutex<Option<crate::TripletCounts>>>,
}

impl Loss for TripletLoss {
    const NAME: &'static str = "triplet";
    type Saved = crate::TripletSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, crate::TripletSaved)> {
        let fwd = crate::triplet_forward(
            inputs[0].values("x")?,
            inputs[1].indices("labels")?,
            &self.opts,
        )?;
        if let Ok(mut counts) = self.counts.lock() {
            *counts = Some(fwd.counts.clone());
        }
        Ok((fwd.loss.to_scalar()?, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &crate::TripletSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let (x, labels) = (inputs[0].values("x")?, inputs[1].indices("labels")?);
        Ok(vec![
            Some(crate::triplet_backward(x, labels, &self.opts, saved, g)?),
            None,
        ])
    }
}

/// The triplet loss of `x` (N x D) with one label per row (`labels`, an integer tensor of N),
/// and its counts (what the mean is over, and the hard / semi-hard / easy split); the loss's
/// backward gives the gradient for x.
pub fn triplet(
    x: &candle_core::Tensor,
    labels: &candle_core::Tensor,
    opts: &crate::TripletOptions,
) -> candle_core::Result<(candle_core::Tensor, crate::TripletCounts)> {
    let counts = std::sync::Arc::new(Mutex::new(None));
    let op = TripletLoss {
        opts: *opts,
        counts: counts.clone(),
    };
    let loss = x.apply_op2(labels, Op::new(op))?;
    let counts = counts
        .lock()
        .ok()
        .and_then(|mut c| c.take())
        .ok_or_else(|| candle_core::Error::Msg("contra::candle::triplet: no counts".into()))?;
    Ok((loss, counts))
}

struct MarginLoss(crate::MarginOptions);

impl Loss for MarginLoss {
    const NAME: &'static str = "margin_loss";
    type Saved = crate::MarginSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, crate::MarginSaved)> {
        let (x1, x2, y) = (
            inputs[0].values("x1")?,
            inputs[1].values("x2")?,
            inputs[2].indices("y")?,
        );
        let fwd = crate::margin_forward(x1, x2, y, &self.0)?;
        Ok((fwd.loss.to_scalar()?, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &crate::MarginSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let (x1, x2, y) = (
            inputs[0].values("x1")?,
            inputs[1].values("x2")?,
            inputs[2].indices("y")?,
        );
        let (g1, g2) = crate::margin_backward(x1, x2, y, &self.0, saved, g)?;
        Ok(vec![Some(g1), Some(g2), None])
    }
}

/// The contrastive margin loss of pairs `x1`, `x2` (N x D) with labels `y` (an integer tensor
/// of N, 0 similar, 1 dissimilar); gradients for x1 and x2.
pub fn margin_loss(
    x1: &candle_core::Tensor,
    x2: &candle_core::Tensor,
    y: &candle_core::Tensor,
    opts: &crate::MarginOptions,
) -> candle_core::Result<candle_core::Tensor> {
    x1.apply_op3(x2, y, Op::new(MarginLoss(*opts)))
}

struct ClipLoss;

impl Loss for ClipLoss {
    const NAME: &'static str = "clip";
    type Saved = crate::ClipSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, crate::ClipSaved)> {
        let (a, b, s) = (
            inputs[0].values("a")?,
            inputs[1].values("b")?,
            inputs[2].values("log_scale")?,
        );
        let fwd = crate::clip_forward(a, b, s)?;
        Ok((fwd.loss.to_scalar()?, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &crate::ClipSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let (a, b, s) = (
            inputs[0].values("a")?,
            inputs[1].values("b")?,
            inputs[2].values("log_scale")?,
        );
        let grads = crate::clip_backward(a, b, s, saved, g)?;
        let grad_s = crate::Tensor::from_vec(
            vec![grads.grad_log_scale.to_scalar()?],
            s.shape(),
            crate::Device::Cpu,
        )?;
        Ok(vec![Some(grads.grad_a), Some(grads.grad_b), Some(grad_s)])
    }
}

/// The CLIP loss of paired rows `a`, `b` (N x D) with a learnable `log_scale` (a one-element
/// tensor, a `Var` that learns); gradients for a, b and log_scale.
pub fn clip(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    log_scale: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    a.apply_op3(b, log_scale, Op::new(ClipLoss))
}

struct MocoLoss(crate::MocoOptions);

impl Loss for MocoLoss {
    const NAME: &'static str = "moco";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(f64, SoftmaxSaved)> {
        let (q, k, queue) = (
            inputs[0].values("q")?,
            inputs[1].values("k")?,
            inputs[2].values("queue")?,
        );
        let fwd = crate::moco_forward(q, k, queue, &self.0)?;
        Ok((fwd.loss.to_scalar()?, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let (q, k, queue) = (
            inputs[0].values("q")?,
            inputs[1].values("k")?,
            inputs[2].values("queue")?,
        );
        // MoCo's keys come from the momentum encoder: no gradient for them or the queue.
        Ok(vec![
            Some(crate::moco_backward(q, k, queue, &self.0, saved, g)?),
            None,
            None,
        ])
    }
}

/// MoCo's queue of negatives as a candle tensor (K x D) with its write pointer: the loss of a
/// batch against it, and the enqueue of that batch's keys.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use contra::candle::MocoQueue;
///
/// let mut queue = MocoQueue::new(Tensor::randn(0f32, 1.0, (16, 4), &Device::Cpu)?)?;
/// let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu)?)?;
/// let k = Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu)?;
/// let loss = queue.loss(q.as_tensor(), &k, &contra::MocoOptions::default())?;
/// let grad_q = loss.backward()?.remove(q.as_tensor()).unwrap();
/// queue.enqueue(&k)?;
/// assert_eq!((grad_q.dims(), queue.ptr()), (&[3usize, 4][..], 3));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct MocoQueue {
    queue: candle_core::Tensor,
    ptr: usize,
}

impl MocoQueue {
    /// A queue holding `initial` (K x D; MoCo starts from random unit vectors), pointer 0.
    pub fn new(initial: candle_core::Tensor) -> candle_core::Result<Self> {
        if initial.rank() != 2 {
            return Err(candle_core::Error::Msg(format!(
                "contra::candle::MocoQueue: the queue must be K x D, not {:?}",
                initial.dims()
            )));
        }
        Ok(MocoQueue {
            queue: initial.detach(),
            ptr: 0,
        })
    }

    /// The queue (K x D), detached: no gradient flows into it.
    pub fn queue(&self) -> &candle_core::Tensor {
        &self.queue
    }

    /// The row the next key goes to.
    pub fn ptr(&self) -> usize {
        self.ptr
    }

    /// MoCo's loss of queries `q` (N x D) with positive keys `k` (N x D) against the queue's
    /// negatives; `loss.backward()` gives q's gradient (the keys get none).
    pub fn loss(
        &self,
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        opts: &crate::MocoOptions,
    ) -> candle_core::Result<candle_core::Tensor> {
        q.apply_op3(&k.detach(), &self.queue, Op::new(MocoLoss(*opts)))
    }

    /// Writes the L2-normalized keys `k` (N x D) at rows `(ptr + i) mod K` and moves the pointer
    /// ([`crate::moco_enqueue`]: the ring wraps around).
    pub fn enqueue(&mut self, k: &candle_core::Tensor) -> candle_core::Result<()> {
        let as_host = |t: &candle_core::Tensor| -> candle_core::Result<crate::Tensor> {
            let values: Vec<f64> = t
                .to_dtype(candle_core::DType::F64)?
                .flatten_all()?
                .to_vec1()?;
            crate::Tensor::from_vec(values, t.dims(), crate::Device::Cpu).map_err(candle_error)
        };
        let mut queue = as_host(&self.queue)?;
        self.ptr = crate::moco_enqueue(&mut queue, &as_host(&k.detach())?, self.ptr)
            .map_err(candle_error)?;
        self.queue = to_candle(&queue, &self.queue)?;
        Ok(())
    }
}
