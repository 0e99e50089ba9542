//! contra's losses as candle ops (feature `candle`): a function from candle tensors to a 0-d loss
//! tensor whose `backward()` gives the inputs' gradients through candle's autograd. The forward
//! keeps what the backward needs (the per-row log-sum-exp), so the backward does not run the
//! forward again.
//!
//! This first step covers NT-Xent on candle's CPU storage (f32, f64, bf16, f16; contiguous
//! inputs); the other losses and CUDA storage follow.
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
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

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

/// NT-Xent as a candle op; keeps the forward's saved state for the backward.
struct NtXent {
    opts: NtXentOptions,
    saved: Mutex<Option<SoftmaxSaved>>,
}

impl CustomOp1 for NtXent {
    fn name(&self) -> &'static str {
        "contra-ntxent"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = host_tensor("ntxent", storage, layout)?;
        let fwd = ntxent_forward(&z, &self.opts).map_err(candle_error)?;
        let loss = fwd.loss.to_scalar().map_err(candle_error)?;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("ntxent: state poisoned".into()))? =
            Some(fwd.saved);
        Ok((scalar_like(storage, loss), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let grad_loss = grad_res
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let guard = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("ntxent: state poisoned".into()))?;
        let saved = guard.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("contra::candle::ntxent: backward before forward".into())
        })?;
        let (storage, layout) = arg.storage_and_layout();
        let z = match &*storage {
            candle_core::Storage::Cpu(cpu) => host_tensor("ntxent", cpu, layout)?,
            _ => {
                return Err(candle_core::Error::Msg(
                    "contra::candle::ntxent: only CPU storage so far".into(),
                ))
            }
        };
        drop(storage);
        let grad = ntxent_backward(&z, &self.opts, saved, grad_loss).map_err(candle_error)?;
        Ok(Some(to_candle(&grad, arg)?))
    }
}

/// The NT-Xent loss of `z` (2N x D: rows i and i + N are two views of sample i) as a 0-d tensor
/// of z's dtype; `loss.backward()` gives z's gradient. CPU storage; a non-contiguous `z` is an
/// error (call `.contiguous()`).
pub fn ntxent(
    z: &candle_core::Tensor,
    opts: &NtXentOptions,
) -> candle_core::Result<candle_core::Tensor> {
    z.apply_op1(NtXent {
        opts: *opts,
        saved: Mutex::new(None),
    })
}
