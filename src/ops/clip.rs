//! CLIP: symmetric InfoNCE with a learnable temperature.
//! `logits = exp(log_scale) * cos(a_i, b_j)`, `loss = (CE(logits, diag) + CE(logits^T, diag)) / 2`.

use super::{
    check_finite, check_finite_scalar, check_grad_loss, check_result, check_scalar_result,
    compute_dtype, expect_shape, host_loss, kernel_output, kernel_state, matrix_dims, output_like,
    same_place, state_like, upload_features, values, with_cpu_real, Fingerprint, Origin,
};
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
    /// The loss, a 0-d f64 tensor on a\'s device.
    pub loss: Tensor,
    pub saved: ClipSaved,
}

/// Gradients of the CLIP loss.
#[derive(Clone, Debug)]
pub struct ClipGrads {
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    pub grad_log_scale: f64,
}

/// Loss and gradients of [`clip`].
#[derive(Clone, Debug)]
pub struct ClipOutput {
    /// The loss, a 0-d f64 tensor on a\'s device.
    pub loss: Tensor,
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    pub grad_log_scale: f64,
}

/// Validates the inputs (errors named after `op`) and returns `(rows, dim)`.
fn validate(op: &'static str, a: &Tensor, b: &Tensor, log_scale: f64) -> Result<(usize, usize)> {
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
    check_log_scale(op, log_scale, compute_dtype(a.device(), a.dtype()))?;
    check_finite(op, "a", a)?;
    check_finite(op, "b", b)?;
    Ok((rows, dim))
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
fn origin(a: &Tensor, b: &Tensor, log_scale: f64) -> Origin {
    Origin::new(OP, &log_scale, Fingerprint::new().tensor(a).tensor(b))
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
pub fn clip_forward(a: &Tensor, b: &Tensor, log_scale: f64) -> Result<ClipForward> {
    let dims = validate(OP, a, b, log_scale)?;
    let (loss, row_lse, col_lse) = forward_checked(a, b, log_scale, dims)?;
    let origin = origin(a, b, log_scale);
    Ok(ClipForward {
        loss: host_loss(loss, a.device())?,
        saved: ClipSaved {
            row_lse,
            col_lse,
            origin,
        },
    })
}

/// The loss and the row and column log-sum-exp, on validated inputs, checked finite.
fn forward_checked(
    a: &Tensor,
    b: &Tensor,
    log_scale: f64,
    dims: (usize, usize),
) -> Result<(f64, Tensor, Tensor)> {
    let (loss, row_lse, col_lse) = (|| {
        run_on_kernels!(a.device(), k => {
            let inputs = KernelInputs::upload(k, a, b, dims.0)?;
            let (loss, lse) = inputs.problem(dims, log_scale).forward(k)?;
            Ok((loss, kernel_state(k, lse.rows, &[dims.0])?, state_like(a, lse.cols, &[dims.0])?))
        });
        with_cpu_real!(a.dtype(), T => {
            let (av, bv) = (values::<T>(a)?, values::<T>(b)?);
            let (loss, row_lse, col_lse) = problem(&av, &bv, dims, log_scale).forward();
            Ok((loss, state_like(a, row_lse, &[dims.0])?, state_like(a, col_lse, &[dims.0])?))
        })
    })()?;
    check_scalar_result(OP, "loss", loss, BLAME)?;
    check_result(OP, "row_lse", &row_lse, BLAME)?;
    check_result(OP, "col_lse", &col_lse, BLAME)?;
    Ok((loss, row_lse, col_lse))
}

/// Backward of the CLIP loss: gradients of `grad_loss * loss` with respect to `a`, `b` and
/// `log_scale`.
pub fn clip_backward(
    a: &Tensor,
    b: &Tensor,
    log_scale: f64,
    saved: &ClipSaved,
    grad_loss: f64,
) -> Result<ClipGrads> {
    let dims = validate(BACKWARD, a, b, log_scale)?;
    for (arg, lse) in [
        ("saved.row_lse", &saved.row_lse),
        ("saved.col_lse", &saved.col_lse),
    ] {
        expect_shape(BACKWARD, arg, lse, &[dims.0])?;
        check_finite(BACKWARD, arg, lse)?;
    }
    saved.origin.check(BACKWARD, &origin(a, b, log_scale))?;
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(a.device(), a.dtype()))?;
    let lse = (&saved.row_lse, &saved.col_lse);
    backward_checked(BACKWARD, a, b, log_scale, lse, grad_loss, dims)
}

/// The gradients on validated inputs, checked finite (errors named after `op`).
fn backward_checked(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    log_scale: f64,
    lse: (&Tensor, &Tensor),
    grad_loss: f64,
    dims: (usize, usize),
) -> Result<ClipGrads> {
    let grads = backward_unchecked(a, b, log_scale, lse, grad_loss, dims)?;
    check_result(op, "grad_a", &grads.grad_a, BLAME)?;
    check_result(op, "grad_b", &grads.grad_b, BLAME)?;
    check_scalar_result(op, "grad_log_scale", grads.grad_log_scale, BLAME)?;
    Ok(grads)
}

/// The backward on validated inputs.
fn backward_unchecked(
    a: &Tensor,
    b: &Tensor,
    log_scale: f64,
    (row_lse, col_lse): (&Tensor, &Tensor),
    grad_loss: f64,
    dims: (usize, usize),
) -> Result<ClipGrads> {
    run_on_kernels!(a.device(), k => {
        let inputs = KernelInputs::upload(k, a, b, dims.0)?;
        let row_lse = k.upload("row_lse", &values::<f32>(row_lse)?)?;
        let col_lse = values::<f32>(col_lse)?;
        let (grad_a, grad_b, grad_log_scale) = inputs.problem(dims, log_scale).backward(k, &row_lse, &col_lse, grad_loss)?;
        Ok(ClipGrads {
            grad_a: kernel_output(k, a, grad_a, a.shape())?,
            grad_b: kernel_output(k, b, grad_b, b.shape())?,
            grad_log_scale,
        })
    });
    with_cpu_real!(a.dtype(), T => {
        let (av, bv) = (values::<T>(a)?, values::<T>(b)?);
        let grads = problem(&av, &bv, dims, log_scale).backward(
            &row_lse.to_vec_f64()?,
            &col_lse.to_vec_f64()?,
            grad_loss,
        );
        Ok(ClipGrads {
            grad_a: output_like(a, grads.a, a.shape())?,
            grad_b: output_like(b, grads.b, b.shape())?,
            grad_log_scale: grads.log_scale,
        })
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
/// assert!(out.grad_log_scale < 0.0);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn clip(a: &Tensor, b: &Tensor, log_scale: f64) -> Result<ClipOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let dims = validate(OP, a, b, log_scale)?;
    let (loss, row_lse, col_lse) = forward_checked(a, b, log_scale, dims)?;
    let grads = backward_checked(OP, a, b, log_scale, (&row_lse, &col_lse), 1.0, dims)?;
    Ok(ClipOutput {
        loss: host_loss(loss, a.device())?,
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
}

impl<'t, B: Backend> KernelInputs<'t, B> {
    fn upload(k: &B, a: &'t Tensor, b: &'t Tensor, rows: usize) -> Result<Self> {
        let diagonal: Vec<i32> = (0..rows as i32).collect();
        Ok(KernelInputs {
            a: upload_features(k, "a", a)?,
            b: upload_features(k, "b", b)?,
            diagonal: k.upload_i32("diagonal", &diagonal)?,
        })
    }

    fn problem(&self, (rows, dim): (usize, usize), log_scale: f64) -> kernels::clip::Clip<'_, B> {
        kernels::clip::Clip {
            a: &self.a,
            b: &self.b,
            diagonal: &self.diagonal,
            rows,
            dim,
            log_scale,
        }
    }
}
