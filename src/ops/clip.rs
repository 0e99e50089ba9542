//! CLIP: symmetric InfoNCE with a learnable temperature.
//! `logits = exp(log_scale) * cos(a_i, b_j)`, `loss = (CE(logits, diag) + CE(logits^T, diag)) / 2`.

use super::{
    attach_loss_checks, check_finite_scalar, check_grad_loss, check_host_finite, check_result,
    check_scalar_result, compute_dtype, expect_shape, host_loss, kernel_grads, kernel_state,
    matrix_dims, output_like, same_place, state_like, upload_f32, upload_features, values,
    with_cpu_real, Fingerprint, Origin, Scalar, ScalarInput, ScalarOperand,
};
use crate::checks::Recorder;
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, DType, Error, Result, Tensor};

const OP: &str = "clip";
const BACKWARD: &str = "clip_backward";

/// What scales CLIP's results, named when one overflows.
const BLAME: &str = "the logits scale as `exp(log_scale)` and the gradients as `grad_loss * \
                     exp(log_scale)`: lower them, or compute in f64 on Device::Cpu";

/// What the backward needs: the row and column log-sum-exp (N values each). It also records
/// the inputs and `log_scale` that made it: a backward given the state of another call is an
/// error.
#[derive(Clone, Debug)]
pub struct ClipSaved {
    pub row_lse: Tensor,
    pub col_lse: Tensor,
    pub(crate) origin: Origin,
}

/// Loss and saved state of [`clip_forward`].
#[derive(Clone, Debug)]
pub struct ClipForward {
    /// The loss, a 0-d f64 tensor on a's device.
    pub loss: Tensor,
    pub saved: ClipSaved,
}

/// Gradients of the CLIP loss.
#[derive(Clone, Debug)]
pub struct ClipGrads {
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    /// The gradient of the learnable `log_scale`, a 0-d f64 tensor on a's device.
    pub grad_log_scale: Tensor,
}

/// Loss and gradients of [`clip`].
#[derive(Clone, Debug)]
pub struct ClipOutput {
    /// The loss, a 0-d f64 tensor on a's device.
    pub loss: Tensor,
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    /// The gradient of the learnable `log_scale`, a 0-d f64 tensor on a's device.
    pub grad_log_scale: Tensor,
}

/// Validates the inputs (errors named after `op`) and returns `(rows, dim)`.
fn validate<'t>(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    log_scale: Scalar<'t>,
) -> Result<((usize, usize), ScalarInput<'t>)> {
    let (rows, dim) = matrix_dims(op, "a", a)?;
    matrix_dims(op, "b", b)?;
    same_place(op, &[("a", a), ("b", b)])?;
    if b.shape() != a.shape() {
        return Err(Error::shape(
            op,
            "b",
            b.shape(),
            format!("{:?} (the same shape as a: one pair per row)", a.shape()),
        ));
    }
    let log_scale = ScalarInput::resolve(op, "log_scale", log_scale, a)?;
    if let ScalarInput::Value(value) = log_scale {
        check_log_scale(op, value, compute_dtype(a.device(), a.dtype()))?;
    }
    check_host_finite(op, "a", a)?;
    check_host_finite(op, "b", b)?;
    Ok(((rows, dim), log_scale))
}

/// Rejects a `log_scale` whose logit scale `exp(log_scale)` (times log2(e), which the kernels
/// fold in) overflows the compute dtype.
fn check_log_scale(op: &'static str, log_scale: f64, compute: DType) -> Result<()> {
    check_finite_scalar(op, "log_scale", log_scale)?;
    let largest = super::largest(compute);
    let scale = log_scale.exp();
    if scale * std::f64::consts::LOG2_E <= largest {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            "log_scale",
            format!(
                "{log_scale} gives a logit scale of {scale:e}, which overflows the {compute} \
                 the loss is computed in (the largest accepted is {:.3})",
                (largest / std::f64::consts::LOG2_E).ln()
            ),
        ))
    }
}

/// The origin of clip's saved state.
fn origin(a: &Tensor, b: &Tensor, log_scale: ScalarInput<'_>) -> Origin {
    let inputs = Fingerprint::new().tensor(a).tensor(b);
    match log_scale {
        ScalarInput::Value(value) => Origin::new(OP, &value, inputs),
        ScalarInput::Device(t) => Origin::new(OP, &"log_scale tensor", inputs.tensor(t)),
    }
}

fn problem<'a, T>(
    a: &'a [T],
    b: &'a [T],
    (rows, dim): (usize, usize),
    log_scale: f64,
) -> cpu::clip::Problem<'a, T> {
    cpu::clip::Problem {
        a,
        b,
        rows,
        dim,
        log_scale,
    }
}

/// Forward of the CLIP loss for paired embeddings `a`, `b` (N x D each): the loss and the row
/// and column log-sum-exp for [`clip_backward`].
pub fn clip_forward<'s>(
    a: &Tensor,
    b: &Tensor,
    log_scale: impl Into<Scalar<'s>>,
) -> Result<ClipForward> {
    let (dims, log_scale) = validate(OP, a, b, log_scale.into())?;
    run_on_kernels!(a.device(), k => {
        let origin = origin(a, b, log_scale);
        let mut rec = Recorder::new(k, OP)?;
        let inputs = KernelInputs::new(k, &mut rec, a, b, dims.0, log_scale)?;
        let problem = inputs.problem(dims);
        let fwd = kernel_sweep(k, &mut rec, &problem)?;
        let (loss, checks) = rec.finish_loss(&fwd.row_value, problem.divisor(), BLAME)?;
        let row_lse = kernel_state(k, fwd.row_lse, &[dims.0])?.with_checks(&checks);
        let col_lse = kernel_state(k, fwd.col_lse, &[dims.0])?.with_checks(&checks);
        Ok(ClipForward { loss, saved: ClipSaved { row_lse, col_lse, origin } })
    });
    clip_forward_cpu(a, b, log_scale.value()?, dims)
}

/// The forward on a kernel backend, its log-sum-exps recorded for a scan.
fn kernel_sweep<B: Backend>(
    k: &B,
    rec: &mut Recorder<'_, B>,
    problem: &kernels::clip::Clip<'_, B>,
) -> Result<kernels::clip::ClipForward<B::Buf>> {
    let fwd = problem.forward(k)?;
    rec.result("row_lse", BLAME, &fwd.row_lse, 1)?;
    rec.result("col_lse", BLAME, &fwd.col_lse, 1)?;
    Ok(fwd)
}

/// The forward on the CPU, its results checked finite.
fn clip_forward_cpu(
    a: &Tensor,
    b: &Tensor,
    log_scale: f64,
    dims: (usize, usize),
) -> Result<ClipForward> {
    let (loss, row_lse, col_lse) = with_cpu_real!(a.dtype(), T => {
        let (av, bv) = (values::<T>(a)?, values::<T>(b)?);
        let (loss, row_lse, col_lse) = problem(&av, &bv, dims, log_scale).forward();
        (loss, state_like(a, row_lse, &[dims.0])?, state_like(a, col_lse, &[dims.0])?)
    });
    check_scalar_result(OP, "loss", loss, BLAME)?;
    check_result(OP, "row_lse", &row_lse, BLAME)?;
    check_result(OP, "col_lse", &col_lse, BLAME)?;
    let saved = ClipSaved {
        row_lse,
        col_lse,
        origin: origin(a, b, ScalarInput::Value(log_scale)),
    };
    Ok(ClipForward {
        loss: host_loss(loss, a.device())?,
        saved,
    })
}

/// Backward of the CLIP loss: gradients of `grad_loss * loss` with respect to `a`, `b` and
/// `log_scale`.
pub fn clip_backward<'s>(
    a: &Tensor,
    b: &Tensor,
    log_scale: impl Into<Scalar<'s>>,
    saved: &ClipSaved,
    grad_loss: f64,
) -> Result<ClipGrads> {
    let (dims, log_scale) = validate(BACKWARD, a, b, log_scale.into())?;
    for (arg, lse) in [
        ("saved.row_lse", &saved.row_lse),
        ("saved.col_lse", &saved.col_lse),
    ] {
        expect_shape(BACKWARD, arg, lse, &[dims.0])?;
        check_host_finite(BACKWARD, arg, lse)?;
    }
    saved.origin.check(BACKWARD, &origin(a, b, log_scale))?;
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(a.device(), a.dtype()))?;
    run_on_kernels!(a.device(), k => {
        let mut rec = Recorder::new(k, BACKWARD)?;
        let inputs = KernelInputs::new(k, &mut rec, a, b, dims.0, log_scale)?;
        let row_lse = upload_f32(k, "saved.row_lse", &saved.row_lse)?;
        rec.input("saved.row_lse", &saved.row_lse, &row_lse)?;
        let col_lse = upload_f32(k, "saved.col_lse", &saved.col_lse)?;
        rec.input("saved.col_lse", &saved.col_lse, &col_lse)?;
        let (ga, gb, partial) = inputs.problem(dims).backward(k, &row_lse, &col_lse, grad_loss)?;
        let finish = |rec: Recorder<'_, _>| rec.finish_scalar("grad_log_scale", &partial, 1.0, BLAME);
        let (grad_log_scale, [grad_a, grad_b]) = kernel_grads(k, rec, [("grad_a", ga, a), ("grad_b", gb, b)], BLAME, finish)?;
        Ok(ClipGrads { grad_a, grad_b, grad_log_scale })
    });
    let lse = (&saved.row_lse, &saved.col_lse);
    cpu_grads(BACKWARD, a, b, log_scale.value()?, lse, grad_loss, dims)
}

/// The gradients on the CPU from the forward's log-sum-exps, checked finite (errors named after
/// `op`).
fn cpu_grads(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    log_scale: f64,
    (row_lse, col_lse): (&Tensor, &Tensor),
    grad_loss: f64,
    dims: (usize, usize),
) -> Result<ClipGrads> {
    let (grad_a, grad_b, grad_log_scale) = with_cpu_real!(a.dtype(), T => {
        let (av, bv) = (values::<T>(a)?, values::<T>(b)?);
        let (row_lse, col_lse) = (row_lse.to_vec_f64()?, col_lse.to_vec_f64()?);
        let grads = problem(&av, &bv, dims, log_scale).backward(&row_lse, &col_lse, grad_loss);
        (output_like(a, grads.a, a.shape())?, output_like(b, grads.b, b.shape())?, grads.log_scale)
    });
    check_result(op, "grad_a", &grad_a, BLAME)?;
    check_result(op, "grad_b", &grad_b, BLAME)?;
    check_scalar_result(op, "grad_log_scale", grad_log_scale, BLAME)?;
    Ok(ClipGrads {
        grad_a,
        grad_b,
        grad_log_scale: host_loss(grad_log_scale, a.device())?,
    })
}

/// CLIP loss and gradients in one call. Row `i` of `a` and row `i` of `b` are a matching pair;
/// `log_scale` is the learnable log of the logit scale (`1 / temperature`).
///
/// ```
/// use contra::{clip, Device, Tensor};
/// // Two image embeddings and two text embeddings, D = 2.
/// let a = Tensor::from_vec(vec![1.0f32, 0.1, 0.0, 1.0], &[2, 2], Device::Cpu)?;
/// let b = Tensor::from_vec(vec![0.9f32, 0.0, 0.2, 0.8], &[2, 2], Device::Cpu)?;
/// let out = clip(&a, &b, (1.0f64 / 0.07).ln())?;
/// let loss = out.loss.to_scalar()?;
/// assert!(loss > 0.0 && loss < 2f64.ln());
/// assert_eq!(out.grad_a.shape(), &[2, 2]);
/// // The pairs already match, so a larger scale (lower temperature) lowers the loss.
/// assert!(out.grad_log_scale.to_scalar()? < 0.0);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn clip<'s>(a: &Tensor, b: &Tensor, log_scale: impl Into<Scalar<'s>>) -> Result<ClipOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let (dims, log_scale) = validate(OP, a, b, log_scale.into())?;
    run_on_kernels!(a.device(), k => {
        let mut rec = Recorder::new(k, OP)?;
        let inputs = KernelInputs::new(k, &mut rec, a, b, dims.0, log_scale)?;
        let problem = inputs.problem(dims);
        let fwd = kernel_sweep(k, &mut rec, &problem)?;
        let (ga, gb, partial) = problem.backward(k, &fwd.row_lse, &fwd.col_lse, 1.0)?;
        // Its own buffer, whose reads also verify the call's checks (attached below).
        let (grad_log_scale, _) = Recorder::new(k, OP)?.finish_scalar("grad_log_scale", &partial, 1.0, BLAME)?;
        let finish = |rec: Recorder<'_, _>| rec.finish_loss(&fwd.row_value, problem.divisor(), BLAME);
        let (loss, [grad_a, grad_b]) = kernel_grads(k, rec, [("grad_a", ga, a), ("grad_b", gb, b)], BLAME, finish)?;
        let grad_log_scale = attach_loss_checks(grad_log_scale, &loss);
        Ok(ClipOutput { loss, grad_a, grad_b, grad_log_scale })
    });
    let log_scale = log_scale.value()?;
    let fwd = clip_forward_cpu(a, b, log_scale, dims)?;
    let lse = (&fwd.saved.row_lse, &fwd.saved.col_lse);
    let grads = cpu_grads(OP, a, b, log_scale, lse, 1.0, dims)?;
    Ok(ClipOutput {
        loss: fwd.loss,
        grad_a: grads.grad_a,
        grad_b: grads.grad_b,
        grad_log_scale: grads.grad_log_scale,
    })
}

/// a, b and the diagonal positives as kernel buffers.
struct KernelInputs<'t, B: Backend> {
    a: Operand<'t, B::Buf>,
    b: Operand<'t, B::Buf>,
    diagonal: B::Buf,
    log_scale: ScalarOperand<'t, B::Buf>,
}

impl<'t, B: Backend> KernelInputs<'t, B> {
    /// a and b where they are (copied in from the host), their scans recorded; the diagonal
    /// `i -> i` built on the device.
    fn new(
        k: &B,
        rec: &mut Recorder<'_, B>,
        a: &'t Tensor,
        b: &'t Tensor,
        rows: usize,
        log_scale: ScalarInput<'t>,
    ) -> Result<Self> {
        let log_scale = ScalarOperand::new(k, rec, "log_scale", log_scale)?;
        let inputs = KernelInputs {
            a: upload_features(k, "a", a)?,
            b: upload_features(k, "b", b)?,
            diagonal: kernels::elementwise::index_ring(k, rows, 0)?,
            log_scale,
        };
        rec.input("a", a, &inputs.a)?;
        rec.input("b", b, &inputs.b)?;
        Ok(inputs)
    }

    fn problem(&self, (rows, dim): (usize, usize)) -> kernels::clip::Clip<'_, B> {
        kernels::clip::Clip {
            a: &self.a,
            b: &self.b,
            diagonal: &self.diagonal,
            rows,
            dim,
            log_scale: self.log_scale.arg(),
        }
    }
}
