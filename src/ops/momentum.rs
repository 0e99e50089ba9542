//! The MoCo momentum (EMA) update of the key encoder: `theta_k <- m theta_k + (1 - m) theta_q`.

use half::{bf16, f16};

use super::{check_finite, check_host_finite, expect_shape, same_place, upload_f32, writable_on};
use crate::checks::Recorder;
use crate::kernels::{self, run_on_kernels, Backend};
use crate::{cpu, DType, Device, Element, Error, Result, Tensor};

const OP: &str = "momentum_update";

/// Updates `theta_k` in place from `theta_q` (same shape, dtype and device) with momentum `m` in
/// [0, 1]. Any shape works (a whole flattened parameter vector or one weight matrix); the update is
/// computed in f64 and rounded once to the tensor's dtype, except that f32 tensors on a kernel
/// device (Interp, Cuda) run the f32 kernel in place in their device buffer (no copy). On an
/// error `theta_k` is unchanged.
///
/// ```
/// use contra::{momentum_update, Device, Tensor};
/// let mut theta_k = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3], Device::Cpu)?;
/// let theta_q = Tensor::from_vec(vec![3.0f32, 2.0, 1.0], &[3], Device::Cpu)?;
/// momentum_update(&mut theta_k, &theta_q, 0.75)?;
/// assert_eq!(theta_k.to_vec::<f32>()?, vec![1.5, 2.0, 2.5]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn momentum_update(theta_k: &mut Tensor, theta_q: &Tensor, m: f64) -> Result<()> {
    same_place(OP, &[("theta_k", theta_k), ("theta_q", theta_q)])?;
    expect_shape(OP, "theta_q", theta_q, theta_k.shape())?;
    if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
        return Err(Error::invalid(OP, "m", format!("{m} must lie in [0, 1]")));
    }
    check_host_finite(OP, "theta_k", theta_k)?;
    check_host_finite(OP, "theta_q", theta_q)?;
    if theta_k.device() != Device::Cpu {
        if theta_k.dtype() == DType::F32 && theta_k.numel() > 0 {
            run_on_kernels!(theta_k.device(), b => { update_on_kernels(b, theta_k, theta_q, m) });
        }
        // The 16-bit and f64 updates run on the host (f64, rounded once) and go back.
        check_finite(OP, "theta_k", theta_k)?;
        check_finite(OP, "theta_q", theta_q)?;
        let mut host = theta_k.to_host()?;
        update_on_host(&mut host, &theta_q.to_host()?, m)?;
        *theta_k = host.to_device(theta_k.device())?;
        return Ok(());
    }
    update_on_host(theta_k, theta_q, m)
}

fn update_on_host(theta_k: &mut Tensor, theta_q: &Tensor, m: f64) -> Result<()> {
    match theta_k.dtype() {
        DType::F32 => update::<f32>(theta_k, theta_q, m),
        DType::F64 => update::<f64>(theta_k, theta_q, m),
        DType::Bf16 => update::<bf16>(theta_k, theta_q, m),
        DType::F16 => update::<f16>(theta_k, theta_q, m),
    }
}

/// The kernel path for f32 tensors: the update runs in place in `theta_k`'s device buffer
/// (copied there first when a clone shares it); both tensors are scanned on the device.
fn update_on_kernels<B: Backend>(
    b: &B,
    theta_k: &mut Tensor,
    theta_q: &Tensor,
    m: f64,
) -> Result<()> {
    let len = theta_k.numel();
    let row_len = theta_k.shape().iter().skip(1).product();
    let mut rec = Recorder::new(b, OP)?;
    let qb = upload_f32(b, "theta_q", theta_q)?;
    rec.input("theta_q", theta_q, &qb)?;
    let kb = writable_on(b, OP, "theta_k", theta_k)?;
    rec.target("theta_k", kb, row_len)?;
    kernels::momentum::update(b, kb, &qb, len, m)?;
    // Reading theta_k reports a non-finite value either held.
    theta_k.set_checks(&rec.finish()?);
    Ok(())
}

fn update<E: Element>(theta_k: &mut Tensor, theta_q: &Tensor, m: f64) -> Result<()> {
    let mismatch = || Error::Mismatch {
        op: OP,
        reason: format!("`theta_k` and `theta_q` do not both hold {}", E::DTYPE),
    };
    let q = theta_q.host::<E>().ok_or_else(mismatch)?;
    let k = theta_k.host_mut::<E>().ok_or_else(mismatch)?;
    cpu::momentum::update(k, q, m);
    Ok(())
}
