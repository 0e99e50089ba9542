//! contra's losses as candle ops (feature `candle`): a function from candle tensors to a 0-d loss
//! tensor whose `backward()` gives the inputs' gradients through candle's autograd. The forward
//! keeps what the backward needs (the per-row log-sum-exp), so the backward does not run the
//! forward again.
//!
//! The losses: [`ntxent`], [`infonce`], [`supcon`], [`triplet`] (with its counts),
//! [`margin_loss`], [`clip`] (its `log_scale` a one-element `Var` that learns), [`siglip`] (its
//! `log_scale` and `bias` too) and MoCo through
//! [`MocoQueue`]. Inputs are contiguous f32, f64, bf16 or f16 tensors; labels and indices are
//! u8, u32 or i64 tensors. On candle's CPU storage contra's CPU backend runs; with the feature
//! `candle-cuda`, on CUDA storage contra's kernels read candle's memory in place on candle's
//! stream and their gradients become candle storage without a copy (u32 and u8 labels and
//! indices are read on the GPU too; i64 ones on the host, one small copy). There the backward reads the inputs' memory as it is when
//! `backward()` runs: change an input in place (`Var::set`, an optimizer step) only after it,
//! as a training step does.
//!
//! A training step with a candle-nn model:
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{linear, seq, Activation, AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
//! use contra::NtXentOptions;
//!
//! let device = Device::Cpu; // or Device::new_cuda(0)? with the feature `candle-cuda`
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
//! let encoder = seq()
//!     .add(linear(64, 128, vb.pp("fc1"))?)
//!     .add(Activation::Relu)
//!     .add(linear(128, 32, vb.pp("fc2"))?);
//! let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
//! let batch = Tensor::randn(0f32, 1.0, (128, 64), &device)?;
//! let mut losses = Vec::new();
//! for _ in 0..30 {
//!     // Two noisy views of the batch: rows i and i + 128 are a positive pair.
//!     let view = || (&batch + batch.randn_like(0.0, 0.3)?);
//!     let z = encoder.forward(&Tensor::cat(&[view()?, view()?], 0)?)?;
//!     let loss = contra::candle::ntxent(&z, &NtXentOptions { temperature: 0.5 })?;
//!     opt.backward_step(&loss)?;
//!     losses.push(loss.to_scalar::<f32>()?);
//! }
//! assert!(losses[29] < losses[0]);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! `examples/candle_simclr/` trains a CNN this way on Fashion-MNIST.

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

/// A contra tensor as a candle tensor of `like`'s dtype and shape, on `like`'s device (through
/// the host for CPU storage, handed over on the GPU for CUDA storage).
fn to_candle(
    t: crate::Tensor,
    like: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    #[cfg(feature = "candle-cuda")]
    if let candle_core::Device::Cuda(device) = like.device() {
        return on_cuda::to_candle(t, like, device);
    }
    let values = t.to_vec_f64().map_err(candle_error)?;
    candle_core::Tensor::from_vec(values, like.shape(), like.device())?.to_dtype(like.dtype())
}

/// One input of a loss as contra takes it: values, or integer labels / indices.
enum Input {
    Values(crate::Tensor),
    Indices(crate::Indices),
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

    fn indices(&self, what: &'static str) -> crate::Result<&crate::Indices> {
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

/// The first `N` inputs as float tensors; `names` name them in errors.
fn values<'a, const N: usize>(
    inputs: &'a [Input],
    names: [&'static str; N],
) -> crate::Result<[&'a crate::Tensor; N]> {
    let mut out = Vec::with_capacity(N);
    for (input, name) in inputs.iter().zip(names) {
        out.push(input.values(name)?);
    }
    out.try_into().map_err(|_| {
        crate::Error::invalid(
            "contra::candle",
            names[0],
            format!("needs {N} float inputs"),
        )
    })
}

/// A contra loss as a candle op: its forward (the loss and what the backward needs) and its
/// backward (one gradient per input; `None` for labels).
trait Loss: Send + Sync + 'static {
    const NAME: &'static str;
    type Saved: Send + 'static;
    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, Self::Saved)>;
    fn backward(
        &self,
        inputs: &[Input],
        saved: &Self::Saved,
        grad_loss: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>>;
}

/// A loss with its inputs (candle tensors, which keep their storage alive while a contra
/// tensor reads it) and what its forward left for its backward: the inputs as contra took
/// them and the loss's saved state.
struct Op<L: Loss> {
    loss: L,
    args: Vec<candle_core::Tensor>,
    saved: Mutex<Option<Forwarded<L>>>,
}

/// The inputs as the forward took them and the state it saved.
type Forwarded<L> = (Vec<Input>, <L as Loss>::Saved);

impl<L: Loss> Op<L> {
    /// The op of `loss` on `args`, in the order `apply_op*` passes their storages.
    fn new(loss: L, args: &[&candle_core::Tensor]) -> Self {
        Op {
            loss,
            args: args.iter().map(|&t| t.clone()).collect(),
            saved: Mutex::new(None),
        }
    }

    fn name(&self) -> &'static str {
        L::NAME
    }

    /// Runs the forward on `inputs` and keeps them with the saved state; the loss.
    fn forward(&self, inputs: Vec<Input>) -> candle_core::Result<crate::Tensor> {
        let (loss, saved) = self.loss.forward(&inputs).map_err(candle_error)?;
        *self.lock()? = Some((inputs, saved));
        Ok(loss)
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
        let loss = self.forward(inputs)?.to_scalar().map_err(candle_error)?;
        Ok((scalar_like(args[0].0, loss), Shape::from(())))
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<Forwarded<L>>>> {
        self.saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: state poisoned", L::NAME)))
    }

    /// The gradients of `grad_res * loss` for the inputs, as candle tensors like them (on
    /// their device).
    fn backward(
        &self,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Vec<Option<candle_core::Tensor>>> {
        let grad_loss = grad_res
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let guard = self.lock()?;
        let (inputs, saved) = guard.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: backward before forward", L::NAME))
        })?;
        let grads = on_device_of(&self.args[0], || {
            self.loss
                .backward(inputs, saved, grad_loss)
                .map_err(candle_error)
        })?;
        grads
            .into_iter()
            .zip(&self.args)
            .map(|(g, like)| g.map(|g| to_candle(g, like)).transpose())
            .collect()
    }
}

/// Runs `f` (contra work on `like`'s device) ordered with candle's work there: on candle's
/// stream for CUDA storage.
fn on_device_of<R>(
    like: &candle_core::Tensor,
    f: impl FnOnce() -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match like.device() {
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(device) => on_cuda::on_stream(device, f),
        _ => f(),
    }
}

/// A CPU storage as a loss input: float values as a contra host tensor, integers as labels.
fn input_of(op: &str, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Input> {
    let ints = |v: Vec<i64>| {
        crate::Indices::new(&v, crate::Device::Cpu)
            .map(Input::Indices)
            .map_err(candle_error)
    };
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

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &Layout),+
            ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
                self.cuda_forward(&[$(($s, $l)),+])
            }

            fn bwd(
                &self,
                $($a: &candle_core::Tensor,)+
                _res: &candle_core::Tensor,
                grad_res: &candle_core::Tensor,
            ) -> candle_core::Result<$out> {
                let grads = self.backward(grad_res)?;
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

custom_op!(CustomOp1, cpu_fwd(s1, l1), bwd(_a1) -> Option<candle_core::Tensor>, |g| {
    let [g1] = take::<1>(g);
    g1
});
custom_op!(CustomOp2, cpu_fwd(s1, l1, s2, l2), bwd(_a1, _a2) -> (Option<candle_core::Tensor>, Option<candle_core::Tensor>), |g| {
    let [g1, g2] = take::<2>(g);
    (g1, g2)
});
custom_op!(CustomOp3, cpu_fwd(s1, l1, s2, l2, s3, l3), bwd(_a1, _a2, _a3) -> (Option<candle_core::Tensor>, Option<candle_core::Tensor>, Option<candle_core::Tensor>), |g| {
    let [g1, g2, g3] = take::<3>(g);
    (g1, g2, g3)
});

struct NtXentLoss(NtXentOptions);

impl Loss for NtXentLoss {
    const NAME: &'static str = "ntxent";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, SoftmaxSaved)> {
        let [z] = values(inputs, ["z"])?;
        let fwd = ntxent_forward(z, &self.0)?;
        Ok((fwd.loss, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let [z] = values(inputs, ["z"])?;
        Ok(vec![Some(ntxent_backward(z, &self.0, saved, g)?)])
    }
}

/// The NT-Xent loss of `z` (2N x D: rows i and i + N are two views of sample i) as a 0-d tensor
/// of z's dtype; `loss.backward()` gives z's gradient. CPU storage; a non-contiguous `z` is an
/// error (call `.contiguous()`).
pub fn ntxent(
    z: &candle_core::Tensor,
    opts: &NtXentOptions,
) -> candle_core::Result<candle_core::Tensor> {
    z.apply_op1(Op::new(NtXentLoss(*opts), &[z]))
}

struct InfoNceLoss(crate::InfoNceOptions);

impl Loss for InfoNceLoss {
    const NAME: &'static str = "infonce";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, SoftmaxSaved)> {
        let ([q, k], positives) = (values(inputs, ["q", "k"])?, inputs[2].indices("positives")?);
        let fwd = crate::infonce_forward(q, k, positives, &self.0)?;
        Ok((fwd.loss, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let ([q, k], positives) = (values(inputs, ["q", "k"])?, inputs[2].indices("positives")?);
        let (dq, dk) = crate::infonce_backward(q, k, positives, &self.0, saved, g)?;
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
    q.apply_op3(
        k,
        positives,
        Op::new(InfoNceLoss(*opts), &[q, k, positives]),
    )
}

struct SupConLoss(crate::SupConOptions);

impl Loss for SupConLoss {
    const NAME: &'static str = "supcon";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, SoftmaxSaved)> {
        let ([features], labels) = (values(inputs, ["features"])?, inputs[1].indices("labels")?);
        let fwd = crate::supcon_forward(features, labels, &self.0)?;
        Ok((fwd.loss, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let ([features], labels) = (values(inputs, ["features"])?, inputs[1].indices("labels")?);
        let grad = crate::supcon_backward(features, labels, &self.0, saved, g)?;
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
    features.apply_op2(labels, Op::new(SupConLoss(*opts), &[features, labels]))
}

struct TripletLoss {
    opts: crate::TripletOptions,
    /// The forward's counts, for the caller.
    counts: std::sync::Arc<Mutex<Option<crate::TripletCounts>>>,
}

impl Loss for TripletLoss {
    const NAME: &'static str = "triplet";
    type Saved = crate::TripletSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, crate::TripletSaved)> {
        let ([x], labels) = (values(inputs, ["x"])?, inputs[1].indices("labels")?);
        let fwd = crate::triplet_forward(x, labels, &self.opts)?;
        if let Ok(mut counts) = self.counts.lock() {
            *counts = Some(fwd.counts.clone());
        }
        Ok((fwd.loss, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &crate::TripletSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let ([x], labels) = (values(inputs, ["x"])?, inputs[1].indices("labels")?);
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
    let loss = x.apply_op2(labels, Op::new(op, &[x, labels]))?;
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

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, crate::MarginSaved)> {
        let ([x1, x2], y) = (values(inputs, ["x1", "x2"])?, inputs[2].indices("y")?);
        let fwd = crate::margin_forward(x1, x2, y, &self.0)?;
        Ok((fwd.loss, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &crate::MarginSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let ([x1, x2], y) = (values(inputs, ["x1", "x2"])?, inputs[2].indices("y")?);
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
    x1.apply_op3(x2, y, Op::new(MarginLoss(*opts), &[x1, x2, y]))
}

struct ClipLoss;

impl Loss for ClipLoss {
    const NAME: &'static str = "clip";
    type Saved = crate::ClipSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, crate::ClipSaved)> {
        let [a, b, s] = values(inputs, ["a", "b", "log_scale"])?;
        let fwd = crate::clip_forward(a, b, s)?;
        Ok((fwd.loss, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &crate::ClipSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let [a, b, s] = values(inputs, ["a", "b", "log_scale"])?;
        let grads = crate::clip_backward(a, b, s, saved, g)?;
        let grad_s = grads.grad_log_scale.reshape(s.shape())?;
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
    a.apply_op3(b, log_scale, Op::new(ClipLoss, &[a, b, log_scale]))
}

struct SigLipLoss(crate::SigLipOptions);

impl SigLipLoss {
    /// `log_scale` and `bias` from the op's two-element scalars input (read on the host: one
    /// small copy on a GPU).
    fn scalars(inputs: &[Input]) -> crate::Result<(f64, f64)> {
        let [scalars] = values(&inputs[2..], ["log_scale and bias"])?;
        match scalars.to_vec_f64()?[..] {
            [log_scale, bias] => Ok((log_scale, bias)),
            _ => Err(crate::Error::invalid(
                "contra::candle::siglip",
                "log_scale, bias",
                "each must hold one element",
            )),
        }
    }
}

impl Loss for SigLipLoss {
    const NAME: &'static str = "siglip";
    type Saved = ();

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, ())> {
        let ([a, b], (log_scale, bias)) = (values(inputs, ["a", "b"])?, Self::scalars(inputs)?);
        Ok((crate::siglip_forward(a, b, log_scale, bias, &self.0)?, ()))
    }

    fn backward(
        &self,
        inputs: &[Input],
        _: &(),
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let ([a, b], (log_scale, bias)) = (values(inputs, ["a", "b"])?, Self::scalars(inputs)?);
        let grads = crate::siglip_backward(a, b, log_scale, bias, &self.0, g)?;
        let [_, _, scalars] = values(inputs, ["a", "b", "log_scale and bias"])?;
        let pair = vec![
            grads.grad_log_scale.to_scalar()?,
            grads.grad_bias.to_scalar()?,
        ];
        let grad_scalars = crate::Tensor::from_vec(pair, &[2], scalars.device())?;
        Ok(vec![
            Some(grads.grad_a),
            Some(grads.grad_b),
            Some(grad_scalars),
        ])
    }
}

/// The SigLIP loss of paired rows `a`, `b` (N x D) with a learnable `log_scale` and `bias`
/// (one-element tensors, `Var`s that learn; `SigLipOptions::INIT_LOG_SCALE` and `INIT_BIAS`
/// are the paper's start); gradients for all four. The two scalars are read on the host (one
/// small copy on a GPU).
pub fn siglip(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    log_scale: &candle_core::Tensor,
    bias: &candle_core::Tensor,
    opts: &crate::SigLipOptions,
) -> candle_core::Result<candle_core::Tensor> {
    // candle's custom ops take at most three inputs: the scalars travel as one pair, and
    // candle's autograd splits its gradient back to the two.
    let scalars = candle_core::Tensor::cat(&[log_scale.flatten_all()?, bias.flatten_all()?], 0)?;
    if scalars.elem_count() != 2 {
        return Err(candle_core::Error::Msg(format!(
            "contra::candle::siglip: log_scale and bias must hold one element each, not {:?} and {:?}",
            log_scale.dims(),
            bias.dims()
        )));
    }
    a.apply_op3(b, &scalars, Op::new(SigLipLoss(*opts), &[a, b, &scalars]))
}

struct MocoLoss(crate::MocoOptions);

impl Loss for MocoLoss {
    const NAME: &'static str = "moco";
    type Saved = SoftmaxSaved;

    fn forward(&self, inputs: &[Input]) -> crate::Result<(crate::Tensor, SoftmaxSaved)> {
        let [q, k, queue] = values(inputs, ["q", "k", "queue"])?;
        let fwd = crate::moco_forward(q, k, queue, &self.0)?;
        Ok((fwd.loss, fwd.saved))
    }

    fn backward(
        &self,
        inputs: &[Input],
        saved: &SoftmaxSaved,
        g: f64,
    ) -> crate::Result<Vec<Option<crate::Tensor>>> {
        let [q, k, queue] = values(inputs, ["q", "k", "queue"])?;
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
        let k = k.detach();
        q.apply_op3(
            &k,
            &self.queue,
            Op::new(MocoLoss(*opts), &[q, &k, &self.queue]),
        )
    }

    /// Writes the L2-normalized keys `k` (N x D) at rows `(ptr + i) mod K` and moves the pointer
    /// ([`crate::moco_enqueue`]: the ring wraps around).
    pub fn enqueue(&mut self, k: &candle_core::Tensor) -> candle_core::Result<()> {
        #[cfg(feature = "candle-cuda")]
        if let candle_core::Device::Cuda(device) = self.queue.device() {
            if self.queue.dtype() == candle_core::DType::F32 {
                let k = k.detach().to_dtype(candle_core::DType::F32)?.contiguous()?;
                (self.queue, self.ptr) = on_cuda::enqueue(&self.queue, &k, self.ptr, device)?;
                return Ok(());
            }
        }
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
        self.queue = to_candle(queue, &self.queue)?;
        Ok(())
    }
}

/// The losses on candle's CUDA storage: contra's kernels read candle's memory in place and
/// their results become candle storage without a copy, on candle's stream.
#[cfg(feature = "candle-cuda")]
mod on_cuda {
    use std::any::Any;
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
    use candle_core::{DType, Layout, Shape};

    use super::{candle_error, input_of, Input, Loss, Op};

    /// Runs `f` with contra's work ordered after candle's queued work on `device` and
    /// candle's later work after contra's: contra adopts candle's stream when it has not run
    /// on that GPU yet, else the two streams wait for each other around `f`.
    pub(super) fn on_stream<R>(
        device: &CudaDevice,
        f: impl FnOnce() -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let candle = device.cuda_stream();
        if crate::cuda::use_stream(candle.clone()).is_ok() {
            return f();
        }
        let contra = crate::cuda::stream(candle.context().ordinal()).map_err(candle_error)?;
        let join = |waiter: &cudarc::driver::CudaStream, on: &cudarc::driver::CudaStream| {
            waiter
                .join(on)
                .map_err(|e| candle_core::Error::Cuda(format!("ordering streams: {e:?}").into()))
        };
        join(&contra, &candle)?;
        let out = f();
        join(&candle, &contra)?;
        out
    }

    /// A CUDA storage as a loss input: float values as a contra tensor reading candle's memory
    /// in place (`lender` is the candle tensor owning `storage`), integers as host labels.
    fn input(
        op: &str,
        storage: &CudaStorage,
        layout: &Layout,
        lender: &candle_core::Tensor,
    ) -> candle_core::Result<Input> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "contra::candle::{op}: the input is not contiguous (call .contiguous() first)"
            ))
        })?;
        let dims = layout.shape().dims();
        debug_assert_eq!(end - start, layout.shape().elem_count());
        debug_assert!(lender.layout() == layout && lender.dtype() == storage.dtype());
        let lender: Arc<dyn Any + Send + Sync> = Arc::new(lender.clone());
        macro_rules! borrow {
            ($slice:expr) => {
                // SAFETY: `lender` is the candle tensor whose storage this is (`Op::new` keeps
                // the args in the order `apply_op*` passes their storages), and candle frees
                // or moves a CUDA storage only when its last tensor drops (in-place writes such
                // as `Var::set` copy into the same allocation).
                unsafe { crate::Tensor::borrow_cuda_slice($slice, start, dims, lender) }
            };
        }
        let t = match &storage.slice {
            CudaStorageSlice::F32(s) => borrow!(s),
            CudaStorageSlice::F64(s) => borrow!(s),
            CudaStorageSlice::BF16(s) => borrow!(s),
            CudaStorageSlice::F16(s) => borrow!(s),
            CudaStorageSlice::U32(s) => {
                // SAFETY: as for `borrow!`.
                let labels =
                    unsafe { crate::Indices::borrow_cuda_slice(s, start, end - start, lender) };
                return labels.map(Input::Indices).map_err(candle_error);
            }
            CudaStorageSlice::U8(_) => {
                // Widened to u32 by candle on its stream; the new storage lends itself.
                let wide = Arc::new(storage.to_dtype(layout, DType::U32)?);
                let CudaStorageSlice::U32(s) = &wide.slice else {
                    return Err(candle_core::Error::Msg(format!(
                        "contra::candle::{op}: u8 labels did not widen to u32"
                    )));
                };
                let lender: Arc<dyn Any + Send + Sync> = wide.clone();
                // SAFETY: `lender` owns `s`'s allocation (a fresh contiguous storage of the
                // layout's elements from 0) and nothing else holds it.
                let labels =
                    unsafe { crate::Indices::borrow_cuda_slice(s, 0, end - start, lender) };
                return labels.map(Input::Indices).map_err(candle_error);
            }
            CudaStorageSlice::I64(_) => {
                // Read on the host, where their range to the kernels' i32 is checked (one
                // small copy each way); u32 labels stay on the GPU.
                return input_of(op, &storage.to_cpu_storage()?, layout);
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "contra::candle::{op}: {:?} inputs are not supported (f32, f64, bf16, f16; \
                     labels u8, u32, i64)",
                    storage.dtype()
                )))
            }
        };
        t.map(Input::Values).map_err(candle_error)
    }

    impl<L: Loss> Op<L> {
        /// The forward on CUDA storages: the loss in the first input's dtype, shape `()`, on
        /// the GPU.
        pub(super) fn cuda_forward(
            &self,
            args: &[(&CudaStorage, &Layout)],
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let device = args[0].0.device.clone();
            on_stream(&device, || {
                let inputs = args
                    .iter()
                    .zip(&self.args)
                    .map(|((s, l), lender)| input(L::NAME, s, l, lender))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let loss = self.forward(inputs)?;
                let storage = storage_of(loss, args[0].0.dtype(), &device)?;
                Ok((storage, Shape::from(())))
            })
        }
    }

    /// A contra tensor reading `t`'s CUDA storage in place.
    fn borrowed(op: &str, t: &candle_core::Tensor) -> candle_core::Result<crate::Tensor> {
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cuda) = &*storage else {
            return Err(candle_core::Error::Msg(format!(
                "contra::candle::{op}: the tensors must all be on the GPU"
            )));
        };
        match input(op, cuda, layout, t)? {
            Input::Values(v) => Ok(v),
            Input::Indices(_) => Err(candle_core::Error::Msg(format!(
                "contra::candle::{op}: needs float tensors"
            ))),
        }
    }

    /// MoCo's enqueue of keys `k` (f32, contiguous) into a copy of the f32 `queue` on the GPU
    /// (candle tensors do not change under their holders): the new queue and pointer.
    pub(super) fn enqueue(
        queue: &candle_core::Tensor,
        k: &candle_core::Tensor,
        ptr: usize,
        device: &CudaDevice,
    ) -> candle_core::Result<(candle_core::Tensor, usize)> {
        let queue = queue.copy()?;
        let ptr = on_stream(device, || {
            // contra writes the new rows in place, into the copy's memory.
            let mut slots = borrowed("MocoQueue::enqueue", &queue)?;
            let keys = borrowed("MocoQueue::enqueue", k)?;
            crate::moco_enqueue(&mut slots, &keys, ptr).map_err(candle_error)
        })?;
        Ok((queue, ptr))
    }

    /// A contra tensor as CUDA storage of `dtype` on `device` (converted on the GPU; moved
    /// without a copy when contra owns it).
    fn storage_of(
        t: crate::Tensor,
        dtype: DType,
        device: &CudaDevice,
    ) -> candle_core::Result<CudaStorage> {
        let cast = |t: &crate::Tensor, to: crate::DType| {
            if t.dtype() == to {
                Ok(t.clone())
            } else {
                t.to_dtype(to)
            }
        };
        let t = match t.device() {
            crate::Device::Cuda(_) => t,
            _ => t
                .to_device(crate::Device::Cuda(
                    device.cuda_stream().context().ordinal(),
                ))
                .map_err(candle_error)?,
        };
        // f64 and the 16-bit types convert through f32 on the GPU.
        let (via, to) = match dtype {
            DType::F64 => (crate::DType::F64, crate::DType::F64),
            DType::BF16 => (crate::DType::F32, crate::DType::Bf16),
            DType::F16 => (crate::DType::F32, crate::DType::F16),
            _ => (crate::DType::F32, crate::DType::F32),
        };
        let t = if t.dtype() == to {
            t
        } else {
            cast(&cast(&t, via).map_err(candle_error)?, to).map_err(candle_error)?
        };
        // The slices belong to candle's stream: candle frees them there, after its own use.
        let candle_stream = device.cuda_stream();
        let stream = Some(&candle_stream);
        let device = device.clone();
        Ok(match to {
            crate::DType::F64 => CudaStorage::wrap_cuda_slice(
                t.into_cuda_slice_on::<f64>(stream).map_err(candle_error)?,
                device,
            ),
            crate::DType::Bf16 => CudaStorage::wrap_cuda_slice(
                t.into_cuda_slice_on::<half::bf16>(stream)
                    .map_err(candle_error)?,
                device,
            ),
            crate::DType::F16 => CudaStorage::wrap_cuda_slice(
                t.into_cuda_slice_on::<half::f16>(stream)
                    .map_err(candle_error)?,
                device,
            ),
            crate::DType::F32 => CudaStorage::wrap_cuda_slice(
                t.into_cuda_slice_on::<f32>(stream).map_err(candle_error)?,
                device,
            ),
        })
    }

    /// A contra tensor as a candle tensor of `like`'s dtype and shape on `device`.
    pub(super) fn to_candle(
        t: crate::Tensor,
        like: &candle_core::Tensor,
        device: &CudaDevice,
    ) -> candle_core::Result<candle_core::Tensor> {
        // The conversions and uploads run on contra's stream: ordered before candle's next use.
        let storage = on_stream(device, || storage_of(t, like.dtype(), device))?;
        Ok(candle_core::Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            like.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}
