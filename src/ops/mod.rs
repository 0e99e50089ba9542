//! The safe public API: one file per op. Each op validates its inputs (shapes, dtypes, devices,
//! finite values, option ranges) and then dispatches to a backend.

pub mod clip;
pub mod infonce;
pub mod margin;
pub mod moco;
pub mod momentum;
pub mod nce;
pub mod normalize;
pub mod ntxent;
pub mod siglip;
pub mod similarity;
pub mod supcon;
pub mod triplet;

pub use clip::{clip, clip_backward, clip_forward, ClipForward, ClipGrads, ClipOutput, ClipSaved};
pub use margin::{
    margin_backward, margin_forward, margin_loss, MarginForward, MarginOptions, MarginOutput,
    MarginSaved, MarginVariant,
};
pub use moco::{moco, moco_backward, moco_enqueue, moco_forward, MocoOptions, MocoOutput};
pub use momentum::momentum_update;
pub use nce::{nce, nce_backward, nce_forward, NceForward, NceOutput, NceSaved};
pub use siglip::{
    siglip, siglip_backward, siglip_forward, SigLipGrads, SigLipOptions, SigLipOutput,
};
pub use similarity::{similarity, Similarity};
pub use supcon::{
    supcon, supcon_backward, supcon_forward, SupConOptions, SupConOutput, SupConReduction,
};
pub use triplet::{
    triplet, triplet_backward, triplet_forward, Distance, Mining, TripletCounts, TripletForward,
    TripletOptions, TripletOutput, TripletReduction, TripletSaved, TripletStats,
};

pub use infonce::{
    infonce, infonce_backward, infonce_forward, InfoNceOptions, InfoNceOutput, SoftmaxForward,
    SoftmaxSaved,
};
pub use normalize::{normalize, normalize_backward};
pub use ntxent::{ntxent, ntxent_backward, ntxent_forward, NtXentOptions, NtXentOutput};

use std::borrow::Cow;

/// A scalar argument that can be learned (CLIP's `log_scale`): a plain value, or a tensor of one
/// element. A tensor on the inputs' kernel device is read there by the kernels (no copy to the
/// host, so a step that learns it makes none); one on the CPU is read directly.
///
/// ```
/// use contra::{clip, Device, Tensor};
/// let a = Tensor::from_vec(vec![1.0f32, 0.1, 0.0, 1.0], &[2, 2], Device::Interp)?;
/// let b = Tensor::from_vec(vec![0.9f32, 0.0, 0.2, 0.8], &[2, 2], Device::Interp)?;
/// let log_scale = Tensor::from_vec(vec![2.0f32], &[], Device::Interp)?;
/// let learned = clip(&a, &b, &log_scale)?;
/// let fixed = clip(&a, &b, 2.0)?;
/// assert!((learned.loss.to_scalar()? - fixed.loss.to_scalar()?).abs() < 1e-5);
/// # Ok::<(), contra::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub enum Scalar<'a> {
    /// A fixed value (or one the caller updates on the host).
    Value(f64),
    /// A tensor of one element, of any float dtype, on the CPU or on the inputs' device.
    Tensor(&'a Tensor),
}

impl From<f64> for Scalar<'_> {
    fn from(value: f64) -> Self {
        Scalar::Value(value)
    }
}

impl<'a> From<&'a Tensor> for Scalar<'a> {
    fn from(t: &'a Tensor) -> Self {
        Scalar::Tensor(t)
    }
}

use std::sync::Arc;

/// A learnable scalar of one call: a value (given, or read from a host tensor), or a one-element
/// tensor on the inputs' kernel device, which the kernels read there (a non-finite one is caught
/// there by the scan of its operand).
#[derive(Clone, Copy, Debug)]
pub(crate) enum ScalarInput<'t> {
    Value(f64),
    Device(&'t Tensor),
}

impl<'t> ScalarInput<'t> {
    /// `scalar` (argument `arg` of `op`) for inputs like `a`: a tensor is kept on `a`'s kernel
    /// device, read when it or `a` is on the CPU, and an error when the two are on different
    /// devices or it has more than one element.
    pub fn resolve(
        op: &'static str,
        arg: &'static str,
        scalar: Scalar<'t>,
        a: &Tensor,
    ) -> Result<ScalarInput<'t>> {
        let t = match scalar {
            Scalar::Value(value) => return Ok(ScalarInput::Value(value)),
            Scalar::Tensor(t) => t,
        };
        if t.numel() != 1 {
            return Err(Error::shape(
                op,
                arg,
                t.shape(),
                "one element (a 0-d tensor)",
            ));
        }
        if t.device() == a.device() && a.device() != Device::Cpu {
            return Ok(ScalarInput::Device(t));
        }
        if t.device() != Device::Cpu && a.device() != Device::Cpu {
            return Err(Error::Mismatch {
                op,
                reason: format!("`a` is on {} but `{arg}` is on {}", a.device(), t.device()),
            });
        }
        // On the CPU (or `a` on the CPU): read it.
        Ok(ScalarInput::Value(t.to_scalar()?))
    }

    /// The value, for the CPU path (where a scalar is never left on a device).
    pub fn value(self) -> Result<f64> {
        match self {
            ScalarInput::Value(value) => Ok(value),
            ScalarInput::Device(t) => t.to_scalar(),
        }
    }
}

/// A learnable scalar as a kernel operand: by value, or as one f32 on the device (its scan
/// recorded).
pub(crate) enum ScalarOperand<'t, Buf> {
    Value(f64),
    Device(Operand<'t, Buf>),
}

impl<'t, Buf> ScalarOperand<'t, Buf> {
    pub fn new<B: Backend<Buf = Buf>>(
        k: &B,
        rec: &mut Recorder<'_, B>,
        arg: &'static str,
        input: ScalarInput<'t>,
    ) -> Result<Self> {
        Ok(match input {
            ScalarInput::Value(value) => ScalarOperand::Value(value),
            ScalarInput::Device(t) => {
                let operand = upload_f32(k, arg, t)?;
                rec.input(arg, t, &operand)?;
                ScalarOperand::Device(operand)
            }
        })
    }

    pub fn arg(&self) -> crate::kernels::ScalarArg<'_, Buf> {
        match self {
            ScalarOperand::Value(value) => crate::kernels::ScalarArg::Value(*value),
            ScalarOperand::Device(operand) => crate::kernels::ScalarArg::Device(operand),
        }
    }
}

use crate::checks::{Checks, IndexRule, Recorder};
use crate::cpu::Real;
use crate::kernels::{Backend, Elem, Operand};
use crate::{DType, Device, Error, IndexView, Indices, Result, Tensor};

/// The dtype the CPU backend computes in for inputs of `dtype`: f64 stays f64, the rest (f32 and
/// the 16-bit types, upcast) compute in f32.
pub(crate) fn cpu_compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Runs `$body` with `$T` bound to the CPU compute type for `$dtype` (f32 or f64).
macro_rules! with_cpu_real {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $crate::ops::cpu_compute_dtype($dtype) {
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            _ => {
                type $T = f32;
                $body
            }
        }
    };
}
pub(crate) use with_cpu_real;

/// The host values of `t` as `T`: borrowed when `t` is on the host in that dtype, else
/// converted (and copied from its device).
pub(crate) fn values<T: Real>(t: &Tensor) -> Result<Cow<'_, [T]>> {
    match t.host::<T>() {
        Some(v) => Ok(Cow::Borrowed(v)),
        None => Ok(Cow::Owned(t.to_vec_f64()?.into_iter().map(T::of).collect())),
    }
}

/// A feature tensor as a kernel operand in its own storage type: bf16 and f16 as 16-bit values
/// (the kernels read them so and accumulate in f32), f32 and f64 as f32. A tensor already on
/// `b` in a type the kernels read is used where it is (no copy).
pub(crate) fn upload_features<'t, B: Backend>(
    b: &B,
    name: &'static str,
    t: &'t Tensor,
) -> Result<Operand<'t, B::Buf>> {
    if let Some(buf) = t.device_buf().and_then(|buf| b.resident(buf)) {
        return Ok(match t.dtype() {
            // Read as f32 (a value beyond its range becomes an infinity, which the op's scan
            // of this operand reports).
            DType::F64 => Operand::Copied(crate::kernels::elementwise::cast(b, buf, Elem::F32)?),
            _ => Operand::Resident(buf),
        });
    }
    check_f32_range(name, t)?;
    if let Some(v) = t.host::<half::bf16>() {
        let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
        return Ok(Operand::Copied(b.upload_half(name, &bits, Elem::Bf16)?));
    }
    if let Some(v) = t.host::<half::f16>() {
        let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
        return Ok(Operand::Copied(b.upload_half(name, &bits, Elem::F16)?));
    }
    Ok(Operand::Copied(b.upload(name, &values::<f32>(t)?)?))
}

/// Rejects an f64 tensor holding a value beyond the f32 range the kernels compute in (it would
/// arrive as an infinity).
pub(crate) fn check_f32_range(name: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F64 {
        return Ok(());
    }
    let v = values::<f64>(t)?;
    let row_len = t.shape().iter().skip(1).product::<usize>().max(1);
    match v.iter().position(|x| x.abs() > f32::MAX as f64) {
        None => Ok(()),
        Some(i) => Err(Error::beyond_f32(name, i / row_len, v[i])),
    }
}

/// An f32 kernel operand of `t`'s values, checked against the f32 range (an f32 tensor already
/// on `b` is used where it is).
pub(crate) fn upload_f32<'t, B: Backend>(
    b: &B,
    name: &'static str,
    t: &'t Tensor,
) -> Result<Operand<'t, B::Buf>> {
    if let Some(buf) = t.device_buf().and_then(|buf| b.resident(buf)) {
        return Ok(match b.info(buf).elem {
            Elem::F32 => Operand::Resident(buf),
            _ => Operand::Copied(crate::kernels::elementwise::cast(b, buf, Elem::F32)?),
        });
    }
    check_f32_range(name, t)?;
    Ok(Operand::Copied(b.upload(name, &values::<f32>(t)?)?))
}

/// The device buffer of `t` on `b`, to be written in place (copied on the device first when a
/// clone shares it).
pub(crate) fn writable_on<'t, B: Backend>(
    b: &B,
    op: &'static str,
    arg: &'static str,
    t: &'t mut Tensor,
) -> Result<&'t B::Buf> {
    let device = t.device();
    t.device_buf_mut()?
        .and_then(|buf| b.resident(buf))
        .ok_or_else(|| Error::Mismatch {
            op,
            reason: format!("`{arg}` is not resident on {device}"),
        })
}

/// An output of the CPU path, stored in `like`'s dtype on `like`'s device.
pub(crate) fn output_like<T: Real>(
    like: &Tensor,
    values: Vec<T>,
    shape: &[usize],
) -> Result<Tensor> {
    let data = T::wrap(values);
    let data = match data.dtype() == like.dtype() {
        true => data,
        false => data.to_dtype(like.dtype()),
    };
    Tensor::from_host(shape.to_vec(), data, like.device())
}

/// Saved forward state (an lse) computed on the host, kept in its own dtype on `like`'s device.
pub(crate) fn state_like<T: crate::Element>(
    like: &Tensor,
    values: Vec<T>,
    shape: &[usize],
) -> Result<Tensor> {
    Tensor::from_host(shape.to_vec(), T::wrap(values), like.device())
}

/// Saved forward state a kernel wrote (an f32 lse), kept where it is.
pub(crate) fn kernel_state<B: Backend>(b: &B, buf: B::Buf, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_device_buf(
        shape.to_vec(),
        DType::F32,
        b.adopt(buf)?,
    ))
}

/// A kernel's output buffer as a tensor of `shape` in `like`'s dtype on `b`: the buffer itself
/// when the types match, else converted on the device.
pub(crate) fn kernel_output<B: Backend>(
    b: &B,
    like: &Tensor,
    buf: B::Buf,
    shape: &[usize],
) -> Result<Tensor> {
    let elem = crate::kernels::storage::elem_of(like.dtype());
    let buf = match b.info(&buf).elem == elem {
        true => buf,
        false => crate::kernels::elementwise::cast(b, &buf, elem)?,
    };
    Ok(Tensor::from_device_buf(
        shape.to_vec(),
        like.dtype(),
        b.adopt(buf)?,
    ))
}

/// Checks that every tensor of one call lives on the same device with the same dtype.
pub(crate) fn same_place(
    op: &'static str,
    tensors: &[(&'static str, &Tensor)],
) -> Result<(Device, DType)> {
    let (first_name, first) = tensors[0];
    for &(name, t) in &tensors[1..] {
        if t.device() != first.device() {
            return Err(Error::Mismatch {
                op,
                reason: format!(
                    "`{first_name}` is on {} but `{name}` is on {}",
                    first.device(),
                    t.device()
                ),
            });
        }
        if t.dtype() != first.dtype() {
            return Err(Error::Mismatch {
                op,
                reason: format!(
                    "`{first_name}` is {} but `{name}` is {}",
                    first.dtype(),
                    t.dtype()
                ),
            });
        }
    }
    Ok((first.device(), first.dtype()))
}

/// Checks that `t` is a non-empty `rows x cols` matrix and returns `(rows, cols)`.
pub(crate) fn matrix_dims(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
) -> Result<(usize, usize)> {
    match *t.shape() {
        [rows, cols] => {
            if rows == 0 {
                return Err(Error::Empty {
                    op,
                    arg,
                    what: "it has 0 rows (empty batch)".into(),
                });
            }
            if cols == 0 {
                return Err(Error::Empty {
                    op,
                    arg,
                    what: "its feature dimension D is 0".into(),
                });
            }
            Ok((rows, cols))
        }
        _ => Err(Error::shape(
            op,
            arg,
            t.shape(),
            "a matrix (rank 2: rows x features)",
        )),
    }
}

/// Checks that `other` is a non-empty matrix with the same feature dimension `dim` as `first`
/// (named `first_name`) and returns its row count; `rows_name` names its rows in the message.
pub(crate) fn same_width(
    op: &'static str,
    arg: &'static str,
    other: &Tensor,
    rows_name: &str,
    first_name: &str,
    dim: usize,
) -> Result<usize> {
    let (rows, width) = matrix_dims(op, arg, other)?;
    if width == dim {
        Ok(rows)
    } else {
        Err(Error::shape(
            op,
            arg,
            other.shape(),
            format!("[{rows_name}, {dim}] (same D as {first_name})"),
        ))
    }
}

/// Checks that `t` is a non-empty vector and returns its length.
pub(crate) fn vector_len(op: &'static str, arg: &'static str, t: &Tensor) -> Result<usize> {
    match *t.shape() {
        [0] => Err(Error::Empty {
            op,
            arg,
            what: "it has 0 elements (empty batch)".into(),
        }),
        [n] => Ok(n),
        _ => Err(Error::shape(op, arg, t.shape(), "a vector (rank 1)")),
    }
}

/// Checks that `t` has `expected` shape.
pub(crate) fn expect_shape(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    expected: &[usize],
) -> Result<()> {
    if t.shape() == expected {
        Ok(())
    } else {
        Err(Error::shape(op, arg, t.shape(), format!("{expected:?}")))
    }
}

/// Rejects NaN and infinities, naming the first offending row (the first index of a `rows x ...`
/// layout).
pub(crate) fn check_finite(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    let row_len = t.shape().iter().skip(1).product::<usize>().max(1);
    match t.first_non_finite()? {
        Some((index, value)) => Err(Error::NonFinite {
            op,
            arg,
            row: index / row_len,
            value,
        }),
        None => Ok(()),
    }
}

/// [`check_finite`] for a host tensor; a device-resident one is scanned on the device by the
/// op's [`Recorder`](crate::checks::Recorder), and the error comes with its results.
pub(crate) fn check_host_finite(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    match t.device_buf() {
        Some(_) => Ok(()),
        None => check_finite(op, arg, t),
    }
}

/// A loss formed on the host, as the 0-d f64 tensor every loss returns, on `device` (one copy
/// to a kernel device, where the loss is not yet formed there).
pub(crate) fn host_loss(value: f64, device: Device) -> Result<Tensor> {
    Tensor::from_host(
        Vec::new(),
        crate::tensor::HostData::F64(vec![value]),
        device,
    )
}

/// The kernel gradients `grads` (name, buffer, the input it belongs to) as tensors like their
/// inputs, after recording a scan of each in its final dtype (a gradient must be finite, also
/// once rounded to a 16-bit type; `blame` names what scales it). `finish` closes the recorder
/// (with or without a loss) once every scan is recorded; its checks go with every gradient.
pub(crate) fn kernel_grads<'b, B: Backend, L, const N: usize>(
    b: &'b B,
    mut rec: Recorder<'b, B>,
    grads: [(&'static str, B::Buf, &Tensor); N],
    blame: &'static str,
    finish: impl FnOnce(Recorder<'b, B>) -> Result<(L, Arc<Checks>)>,
) -> Result<(L, [Tensor; N])> {
    let mut tensors = Vec::with_capacity(N);
    for (what, buf, like) in grads {
        // f64 holds every f32: the kernel's own buffer is scanned then.
        let row_len = like.shape().iter().skip(1).product();
        if like.dtype() == DType::F64 {
            rec.result(what, blame, &buf, row_len)?;
        }
        let grad = kernel_output(b, like, buf, like.shape())?;
        if like.dtype() != DType::F64 {
            rec.result_tensor(what, blame, &grad)?;
        }
        tensors.push(grad);
    }
    let (out, checks) = finish(rec)?;
    let grads = tensors
        .into_iter()
        .map(|grad| grad.with_checks(&checks))
        .collect::<Vec<_>>()
        .try_into()
        // N in, N out.
        .map_err(|_| Error::Device("gradient count changed".into()))?;
    Ok((out, grads))
}

/// `t` (a second scalar result of a call) whose reads also verify the checks `loss` carries.
pub(crate) fn attach_loss_checks(t: Tensor, loss: &Tensor) -> Tensor {
    loss.checks()
        .iter()
        .fold(t, |t, checks| t.with_checks(checks))
}

/// Rejects a temperature that is not finite and positive.
pub(crate) fn check_temperature(op: &'static str, arg: &'static str, tau: f64) -> Result<()> {
    if tau.is_finite() && tau > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            arg,
            format!("{tau} must be finite and > 0"),
        ))
    }
}

/// Rejects a scalar that is not finite.
pub(crate) fn check_finite_scalar(op: &'static str, arg: &'static str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(op, arg, format!("{value} is not finite")))
    }
}

/// Checks that `labels` has one entry per row.
pub(crate) fn check_labels_len(
    op: &'static str,
    arg: &'static str,
    len: usize,
    rows: usize,
) -> Result<()> {
    if len == rows {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            arg,
            &[len],
            format!("[{rows}] (one label per row)"),
        ))
    }
}

/// The fixture kinds whose ops run as kernels on Interp and Cuda.
pub const KERNEL_KINDS: &[&str] = &[
    "normalize",
    "infonce",
    "ntxent",
    "moco",
    "margin",
    "nce",
    "momentum",
    "supcon",
    "clip",
    "triplet",
    "siglip",
];

/// Which implementation runs ops of `kind` on `device` (reported per fixture case).
pub fn backend_path(kind: &str, device: Device) -> String {
    let has_kernel = KERNEL_KINDS.contains(&kind);
    match (device, has_kernel) {
        (Device::Cpu, _) => "cpu".to_string(),
        (_, true) => format!("{device} kernel"),
        (_, false) => format!("{device}: cpu fallback, no kernel yet"),
    }
}

/// The dtype an op computes in on `device` for inputs of `dtype`: the kernels compute in f32
/// whatever they read; the CPU as [`cpu_compute_dtype`] says.
pub(crate) fn compute_dtype(device: Device, dtype: DType) -> DType {
    match device {
        Device::Cpu => cpu_compute_dtype(dtype),
        _ => DType::F32,
    }
}

/// The largest finite value of the compute dtype `compute` (f32 or f64).
pub(crate) fn largest(compute: DType) -> f64 {
    match compute {
        DType::F64 => f64::MAX,
        _ => f32::MAX as f64,
    }
}

/// Rejects a softmax temperature that is not finite and positive, or so small that the logit
/// scale `1 / tau` (times log2(e), which the kernels fold in) overflows the compute dtype: every
/// logit would be infinite.
pub(crate) fn check_softmax_temperature(op: &'static str, tau: f64, compute: DType) -> Result<()> {
    check_temperature(op, "temperature", tau)?;
    let scale = std::f64::consts::LOG2_E / tau;
    if scale <= largest(compute) {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            "temperature",
            format!(
                "{tau:e} gives a logit scale of {:e}, which overflows the {compute} the loss is \
                 computed in (the smallest accepted is {:e})",
                1.0 / tau,
                std::f64::consts::LOG2_E / largest(compute)
            ),
        ))
    }
}

/// Rejects a `grad_loss` that is not finite or not representable in the compute dtype.
pub(crate) fn check_grad_loss(op: &'static str, grad_loss: f64, compute: DType) -> Result<()> {
    check_finite_scalar(op, "grad_loss", grad_loss)?;
    if grad_loss.abs() <= largest(compute) {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            "grad_loss",
            format!("{grad_loss:e} overflows the {compute} the gradients are computed in"),
        ))
    }
}

/// The last line of defence against a silently wrong number: an op whose inputs and options
/// passed every check but whose result still overflowed the compute dtype returns an error
/// naming the options that scale it, never inf or NaN.
pub(crate) fn check_result(
    op: &'static str,
    what: &'static str,
    values: &Tensor,
    blame: &str,
) -> Result<()> {
    match values.first_non_finite()? {
        None => Ok(()),
        Some((index, _)) => Err(Error::Overflow {
            op,
            what,
            reason: format!("element {index} is not finite; {blame}"),
        }),
    }
}

/// Like [`check_result`] for a scalar result (a loss).
pub(crate) fn check_scalar_result(
    op: &'static str,
    what: &'static str,
    value: f64,
    blame: &str,
) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::Overflow {
            op,
            what,
            reason: format!("it is {value}; {blame}"),
        })
    }
}

/// Where a saved forward state comes from: the op, its options, and a fingerprint of its inputs
/// (shapes, dtypes, values, indices). A backward handed the state of another call is an
/// error instead of gradients of nonsense.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    op: &'static str,
    options: String,
    inputs: u64,
}

impl Origin {
    pub fn new(op: &'static str, options: &impl std::fmt::Debug, inputs: Fingerprint) -> Self {
        Origin {
            op,
            options: format!("{options:?}"),
            inputs: inputs.0,
        }
    }

    /// Errors (from `backward_op`) unless `self` is what the forward of these inputs saves.
    pub fn check(&self, backward_op: &'static str, expected: &Origin) -> Result<()> {
        let reason = if self.op != expected.op {
            format!("it was saved by {}, not by {}", self.op, expected.op)
        } else if self.options != expected.options {
            format!(
                "it was saved with options {}, not {}",
                self.options, expected.options
            )
        } else if self.inputs != expected.inputs {
            "it was saved from other inputs (their shapes, dtypes or values differ)".to_string()
        } else {
            return Ok(());
        };
        Err(Error::invalid(backward_op, "saved", reason))
    }
}

/// A 64-bit hash of an op's inputs (FxHash-style multiply-rotate over their bits: fast enough to
/// run beside the finiteness scan; it guards against mistakes, not adversaries).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fingerprint(u64);

impl Fingerprint {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    pub fn new() -> Self {
        Fingerprint(0)
    }

    fn word(mut self, word: u64) -> Self {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
        self
    }

    /// Folds in a tensor's shape, dtype and values.
    pub fn tensor(self, t: &Tensor) -> Self {
        let mut h = self.word(t.rank() as u64);
        for &extent in t.shape() {
            h = h.word(extent as u64);
        }
        // Not the device: a state saved on one backend may drive another's backward (the
        // content key is the same for copies of the values).
        h.word(t.dtype() as u64).word(t.content_key())
    }

    /// Folds in a list of indices or labels.
    pub fn indices<I: Copy + TryInto<i64>>(self, values: &[I]) -> Self {
        self.word(values.len() as u64)
            .word(crate::indices::hash(values))
    }

    /// Folds in placed indices: the same for host values and for [`Indices`] made from them.
    pub fn placed<I: Copy + TryInto<i64>>(self, placed: &Placed<'_, I>) -> Self {
        match placed {
            Placed::Host(values) => self.indices(values),
            Placed::Device(indices) => self.word(indices.len() as u64).word(indices.key()),
        }
    }
}

/// An op's index argument (labels, positives) once placed: values on the host (a slice, or
/// indices copied from elsewhere), or [`Indices`] resident on the op's kernel device.
pub(crate) enum Placed<'a, I: Clone> {
    Host(Cow<'a, [I]>),
    Device(&'a Indices),
}

impl<I: Copy + TryFrom<i64>> Placed<'_, I> {
    pub fn len(&self) -> usize {
        match self {
            Placed::Host(values) => values.len(),
            Placed::Device(indices) => indices.len(),
        }
    }

    /// The host values (the device-resident ones are checked on the device).
    pub fn host(&self) -> Option<&[I]> {
        match self {
            Placed::Host(values) => Some(values),
            Placed::Device(_) => None,
        }
    }
}

/// Places the index argument `arg` of an op on `device`: indices resident there stay, any
/// others are brought to the host (copied from their device).
pub(crate) fn place<'a, I: Copy + TryFrom<i64>>(
    op: &'static str,
    arg: &'static str,
    view: IndexView<'a, I>,
    device: Device,
) -> Result<Placed<'a, I>> {
    match view {
        IndexView::Indices(indices) if device != Device::Cpu && indices.device() == device => {
            Ok(Placed::Device(indices))
        }
        other => Ok(Placed::Host(other.host(op, arg)?)),
    }
}

/// Placed indices as an i32 kernel operand on `b`: resident ones where they are (checked
/// against `rule` by a scan recorded in `rec`), host values as `copy_in` puts them on `b`.
pub(crate) fn index_operand<'t, B: Backend, I: Copy + TryFrom<i64>>(
    b: &B,
    rec: &mut Recorder<'_, B>,
    arg: &'static str,
    placed: &'t Placed<'_, I>,
    rule: Option<IndexRule>,
    copy_in: impl FnOnce(&[I]) -> Result<B::Buf>,
) -> Result<Operand<'t, B::Buf>> {
    match placed {
        Placed::Host(values) => Ok(Operand::Copied(copy_in(values)?)),
        Placed::Device(indices) => {
            let buf = indices
                .device_buf()
                .and_then(|buf| b.resident(buf))
                .ok_or_else(|| Error::Device(format!("`{arg}` is not on the op's device")))?;
            if let Some(rule) = rule {
                rec.indices(arg, indices, buf, rule)?;
            }
            Ok(Operand::Resident(buf))
        }
    }
}
