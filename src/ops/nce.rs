//! Noise-contrastive estimation (Gutmann & Hyvärinen; Mnih & Teh): data scores `s_pos` (B),
//! noise scores `s_neg` (B x k), noise log-probabilities `logq_pos` (B), `logq_neg` (B x k);
//! `delta = s - log k - logq`, `loss = mean_b [ softplus(-delta_pos) + sum_j softplus(delta_neg_j) ]`.
//!
//! `k` is the number of columns of `s_neg`. Softplus and sigmoid are evaluated in a form that
//! does not overflow for large scores.

use super::{
    check_grad_loss, check_host_finite, check_result, check_scalar_result, compute_dtype,
    expect_shape, host_loss, kernel_grads, matrix_dims, output_like, same_place, upload_f32,
    values, vector_len, with_cpu_real, Fingerprint, Origin,
};
use crate::checks::Recorder;
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, Error, Result, Tensor};

const OP: &str = "nce";
const BACKWARD: &str = "nce_backward";

/// What scales NCE's results, named when one overflows.
const BLAME: &str = "the scores or `grad_loss` are too large for the compute precision";

/// Loss and gradients of [`nce`].
#[derive(Clone, Debug)]
pub struct NceOutput {
    /// The mean loss, a 0-d f64 tensor on the inputs' device.
    pub loss: Tensor,
    pub grad_s_pos: Tensor,
    pub grad_s_neg: Tensor,
}

/// Validates the inputs (errors named after `op`) and returns `(B, k)`.
fn validate(
    op: &'static str,
    s_pos: &Tensor,
    s_neg: &Tensor,
    logq_pos: &Tensor,
    logq_neg: &Tensor,
) -> Result<(usize, usize)> {
    let rows = vector_len(op, "s_pos", s_pos)?;
    let (neg_rows, k) = matrix_dims(op, "s_neg", s_neg)?;
    if neg_rows != rows {
        return Err(Error::shape(
            op,
            "s_neg",
            s_neg.shape(),
            format!("[{rows}, k] (one row of noise scores per entry of s_pos)"),
        ));
    }
    same_place(
        op,
        &[
            ("s_pos", s_pos),
            ("s_neg", s_neg),
            ("logq_pos", logq_pos),
            ("logq_neg", logq_neg),
        ],
    )?;
    expect_shape(op, "logq_pos", logq_pos, &[rows])?;
    expect_shape(op, "logq_neg", logq_neg, &[rows, k])?;
    for (arg, t) in [
        ("s_pos", s_pos),
        ("s_neg", s_neg),
        ("logq_pos", logq_pos),
        ("logq_neg", logq_neg),
    ] {
        check_host_finite(op, arg, t)?;
    }
    Ok((rows, k))
}

/// `[s_pos, s_neg, logq_pos, logq_neg]` as f32 kernel operands (where they are, else copied
/// in), their scans recorded.
fn upload<'t, B: Backend>(
    b: &B,
    rec: &mut Recorder<'_, B>,
    inputs: [&'t Tensor; 4],
) -> Result<[Operand<'t, B::Buf>; 4]> {
    let names = ["s_pos", "s_neg", "logq_pos", "logq_neg"];
    let mut operands = Vec::with_capacity(4);
    for (name, t) in names.into_iter().zip(inputs) {
        let operand = upload_f32(b, name, t)?;
        rec.input(name, t, &operand)?;
        operands.push(operand);
    }
    operands
        .try_into()
        .map_err(|_| Error::Device("nce: four operands".into()))
}

/// The kernel problem over uploaded `[s_pos, s_neg, logq_pos, logq_neg]`.
fn kernel_problem<'a, B: Backend>(
    buffers: &'a [Operand<'_, B::Buf>; 4],
    rows: usize,
    k: usize,
) -> kernels::nce::Problem<'a, B> {
    kernels::nce::Problem {
        s_pos: &buffers[0],
        s_neg: &buffers[1],
        logq_pos: &buffers[2],
        logq_neg: &buffers[3],
        rows,
        k,
    }
}

/// What [`nce_backward`] needs from [`nce_forward`]: only the record of the call that made it
/// (the backward's terms are elementwise in the scores), so that a backward of other inputs is
/// an error.
#[derive(Clone, Debug)]
pub struct NceSaved {
    pub(crate) origin: Origin,
}

/// Loss and saved state of [`nce_forward`].
#[derive(Clone, Debug)]
pub struct NceForward {
    /// The mean loss, a 0-d f64 tensor on the inputs' device.
    pub loss: Tensor,
    pub saved: NceSaved,
}

/// The origin of NCE's saved state.
fn origin(inputs: [&Tensor; 4]) -> Origin {
    let fingerprint = inputs
        .into_iter()
        .fold(Fingerprint::new(), |f, t| f.tensor(t));
    Origin::new(OP, &(), fingerprint)
}

/// The mean NCE loss and what [`nce_backward`] needs.
pub fn nce_forward(
    s_pos: &Tensor,
    s_neg: &Tensor,
    logq_pos: &Tensor,
    logq_neg: &Tensor,
) -> Result<NceForward> {
    let dims = validate(OP, s_pos, s_neg, logq_pos, logq_neg)?;
    let inputs = [s_pos, s_neg, logq_pos, logq_neg];
    let loss = forward_loss(inputs, dims)?;
    let saved = NceSaved {
        origin: origin(inputs),
    };
    Ok(NceForward { loss, saved })
}

/// The loss on validated inputs.
fn forward_loss(inputs: [&Tensor; 4], (rows, k): (usize, usize)) -> Result<Tensor> {
    let [s_pos, s_neg, logq_pos, logq_neg] = inputs;
    run_on_kernels!(s_pos.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let buffers = upload(b, &mut rec, [s_pos, s_neg, logq_pos, logq_neg])?;
        let row_loss = kernel_problem(&buffers, rows, k).forward(b)?;
        Ok(rec.finish_loss(&row_loss, rows as f64, BLAME)?.0)
    });
    let loss = with_cpu_real!(s_pos.dtype(), T => {
        let (sp, sn, qp, qn) =
            (values::<T>(s_pos)?, values::<T>(s_neg)?, values::<T>(logq_pos)?, values::<T>(logq_neg)?);
        cpu::nce::Problem { s_pos: &sp, s_neg: &sn, logq_pos: &qp, logq_neg: &qn, rows, k }.forward()
    });
    check_scalar_result(OP, "loss", loss, BLAME)?;
    host_loss(loss, s_pos.device())
}

/// Gradients of `grad_loss * loss` with respect to `s_pos` and `s_neg`. Pass the inputs of the
/// forward that produced `saved`.
pub fn nce_backward(
    s_pos: &Tensor,
    s_neg: &Tensor,
    logq_pos: &Tensor,
    logq_neg: &Tensor,
    saved: &NceSaved,
    grad_loss: f64,
) -> Result<(Tensor, Tensor)> {
    let dims = validate(BACKWARD, s_pos, s_neg, logq_pos, logq_neg)?;
    let inputs = [s_pos, s_neg, logq_pos, logq_neg];
    saved.origin.check(BACKWARD, &origin(inputs))?;
    input_grads(inputs, dims, grad_loss)
}

/// The gradients on validated inputs.
fn input_grads(
    inputs: [&Tensor; 4],
    (rows, k): (usize, usize),
    grad_loss: f64,
) -> Result<(Tensor, Tensor)> {
    let [s_pos, s_neg, logq_pos, logq_neg] = inputs;
    check_grad_loss(
        BACKWARD,
        grad_loss,
        compute_dtype(s_pos.device(), s_pos.dtype()),
    )?;
    run_on_kernels!(s_pos.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let buffers = upload(b, &mut rec, [s_pos, s_neg, logq_pos, logq_neg])?;
        let (gp, gn) = kernel_problem(&buffers, rows, k).backward(b, grad_loss)?;
        let grads = [("grad_s_pos", gp, s_pos), ("grad_s_neg", gn, s_neg)];
        let ((), [gp, gn]) = kernel_grads(b, rec, grads, BLAME, |rec| Ok(((), rec.finish()?)))?;
        Ok((gp, gn))
    });
    let (gp, gn) = with_cpu_real!(s_pos.dtype(), T => {
        let (sp, sn, qp, qn) =
            (values::<T>(s_pos)?, values::<T>(s_neg)?, values::<T>(logq_pos)?, values::<T>(logq_neg)?);
        let problem = cpu::nce::Problem { s_pos: &sp, s_neg: &sn, logq_pos: &qp, logq_neg: &qn, rows, k };
        let (gp, gn) = problem.backward(grad_loss);
        (output_like(s_pos, gp, &[rows])?, output_like(s_neg, gn, &[rows, k])?)
    });
    check_result(BACKWARD, "grad_s_pos", &gp, BLAME)?;
    check_result(BACKWARD, "grad_s_neg", &gn, BLAME)?;
    Ok((gp, gn))
}

/// NCE loss and gradients in one call.
///
/// ```
/// use contra::{nce, Device, Tensor};
/// // B = 2 samples, k = 1 noise sample each, uniform noise log-probabilities of 0.
/// let s_pos = Tensor::from_vec(vec![2.0f64, 0.0], &[2], Device::Cpu)?;
/// let s_neg = Tensor::from_vec(vec![-1.0f64, 0.0], &[2, 1], Device::Cpu)?;
/// let zeros_b = Tensor::from_vec(vec![0.0f64; 2], &[2], Device::Cpu)?;
/// let zeros_bk = Tensor::from_vec(vec![0.0f64; 2], &[2, 1], Device::Cpu)?;
/// let out = nce(&s_pos, &s_neg, &zeros_b, &zeros_bk)?;
/// let softplus = |x: f64| (1.0 + x.exp()).ln();
/// let want = (softplus(-2.0) + softplus(-1.0) + 2.0 * softplus(0.0)) / 2.0;
/// assert!((out.loss.to_scalar()? - want).abs() < 1e-12);
/// assert_eq!(out.grad_s_neg.shape(), &[2, 1]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn nce(
    s_pos: &Tensor,
    s_neg: &Tensor,
    logq_pos: &Tensor,
    logq_neg: &Tensor,
) -> Result<NceOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let dims = validate(OP, s_pos, s_neg, logq_pos, logq_neg)?;
    let inputs = [s_pos, s_neg, logq_pos, logq_neg];
    run_on_kernels!(s_pos.device(), _b => {
        let loss = forward_loss(inputs, dims)?;
        let (grad_s_pos, grad_s_neg) = input_grads(inputs, dims, 1.0)?;
        Ok(NceOutput { loss, grad_s_pos, grad_s_neg })
    });
    // The CPU: one pass for the loss and both gradients.
    let (rows, k) = dims;
    let (loss, gp, gn) = with_cpu_real!(s_pos.dtype(), T => {
        let (sp, sn, qp, qn) =
            (values::<T>(s_pos)?, values::<T>(s_neg)?, values::<T>(logq_pos)?, values::<T>(logq_neg)?);
        let problem = cpu::nce::Problem { s_pos: &sp, s_neg: &sn, logq_pos: &qp, logq_neg: &qn, rows, k };
        let (loss, gp, gn) = problem.forward_backward(1.0);
        (loss, output_like(s_pos, gp, &[rows])?, output_like(s_neg, gn, &[rows, k])?)
    });
    check_scalar_result(OP, "loss", loss, BLAME)?;
    check_result(OP, "grad_s_pos", &gp, BLAME)?;
    check_result(OP, "grad_s_neg", &gn, BLAME)?;
    Ok(NceOutput {
        loss: host_loss(loss, s_pos.device())?,
        grad_s_pos: gp,
        grad_s_neg: gn,
    })
}
