//! CLIP: symmetric InfoNCE with a learnable temperature.
//! `logits = exp(log_scale) * cos(a_i, b_j)`, `loss = (CE(logits, diag) + CE(logits^T, diag)) / 2`.

use super::{
    check_finite, check_finite_scalar, check_scale, expect_shape, matrix_dims, output_like,
    same_place, upload_features, values, with_cpu_real,
};
use crate::cpu::Real;
use crate::kernels::{self, run_on_kernels, Backend};
use crate::{cpu, Error, Result, Tensor};

const OP: &str = "clip";

/// What the backward needs: the row and column log-sum-exp (N values each).
#[derive(Clone, Debug)]
pub struct ClipSaved {
    pub row_lse: Tensor,
    pub col_lse: Tensor,
}

/// Loss and saved state of [`clip_forward`].
#[derive(Clone, Debug)]
pub struct ClipForward {
    pub loss: f64,
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
    pub loss: f64,
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    pub grad_log_scale: f64,
}

/// Validates the inputs and returns `(rows, dim)`.
fn validate(a: &Tensor, b: &Tensor, log_scale: f64) -> Result<(usize, usize)> {
    let (rows, dim) = matrix_dims(OP, "a", a)?;
    matrix_dims(OP, "b", b)?;
    same_place(OP, &[("a", a), ("b", b)])?;
    if b.shape() != a.shape() {
        return Err(Error::shape(
            OP,
            "b",
            b.shape(),
            format!("{:?} (the same shape as a: one pair per row)", a.shape()),
        ));
    }
    check_finite_scalar(OP, "log_scale", log_scale)?;
    check_finite(OP, "a", a)?;
    check_finite(OP, "b", b)?;
    Ok((rows, dim))
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
    let dims = validate(a, b, log_scale)?;
    run_on_kernels!(a.device(), k => {
        check_scale::<f32>(OP, "log_scale", log_scale, log_scale.exp())?;
        let inputs = KernelInputs::upload(k, a, b, dims.0)?;
        let (loss, lse) = inputs.problem(dims, log_scale).forward(k)?;
        let saved = ClipSaved { row_lse: a.host_like(k.download(&lse.rows)?, &[dims.0]), col_lse: a.host_like(lse.cols, &[dims.0]) };
        Ok(ClipForward { loss, saved })
    });
    with_cpu_real!(a.dtype(), T => {
        check_scale::<T>(OP, "log_scale", log_scale, log_scale.exp())?;
        let (av, bv) = (values::<T>(a), values::<T>(b));
        let (loss, row_lse, col_lse) = problem(&av, &bv, dims, log_scale).forward();
        let saved = |lse: Vec<f64>| a.host_like(lse.into_iter().map(T::of).collect::<Vec<T>>(), &[dims.0]);
        Ok(ClipForward { loss, saved: ClipSaved { row_lse: saved(row_lse), col_lse: saved(col_lse) } })
    })
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
    let dims = validate(a, b, log_scale)?;
    for (arg, lse) in [
        ("saved.row_lse", &saved.row_lse),
        ("saved.col_lse", &saved.col_lse),
    ] {
        expect_shape(OP, arg, lse, &[dims.0])?;
        check_finite(OP, arg, lse)?;
    }
    check_finite_scalar(OP, "grad_loss", grad_loss)?;
    run_on_kernels!(a.device(), k => {
        check_scale::<f32>(OP, "log_scale", log_scale, log_scale.exp())?;
        let inputs = KernelInputs::upload(k, a, b, dims.0)?;
        let row_lse = k.upload("row_lse", &values::<f32>(&saved.row_lse))?;
        let col_lse = values::<f32>(&saved.col_lse);
        let (grad_a, grad_b, grad_log_scale) = inputs.problem(dims, log_scale).backward(k, &row_lse, &col_lse, grad_loss)?;
        Ok(ClipGrads {
            grad_a: output_like(a, k.download(&grad_a)?, a.shape()),
            grad_b: output_like(b, k.download(&grad_b)?, b.shape()),
            grad_log_scale,
        })
    });
    with_cpu_real!(a.dtype(), T => {
        check_scale::<T>(OP, "log_scale", log_scale, log_scale.exp())?;
        let (av, bv) = (values::<T>(a), values::<T>(b));
        let grads = problem(&av, &bv, dims, log_scale).backward(
            &saved.row_lse.to_vec_f64(),
            &saved.col_lse.to_vec_f64(),
            grad_loss,
        );
        Ok(ClipGrads {
            grad_a: output_like(a, grads.a, a.shape()),
            grad_b: output_like(b, grads.b, b.shape()),
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
/// assert!(out.loss > 0.0 && out.loss < 2f64.ln());
/// assert_eq!(out.grad_a.shape(), &[2, 2]);
/// // The pairs already match, so a larger scale (lower temperature) lowers the loss.
/// assert!(out.grad_log_scale < 0.0);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn clip(a: &Tensor, b: &Tensor, log_scale: f64) -> Result<ClipOutput> {
    let fwd = clip_forward(a, b, log_scale)?;
    let grads = clip_backward(a, b, log_scale, &fwd.saved, 1.0)?;
    Ok(ClipOutput {
        loss: fwd.loss,
        grad_a: grads.grad_a,
        grad_b: grads.grad_b,
        grad_log_scale: grads.grad_log_scale,
    })
}

/// a, b and the diagonal positives as kernel buffers.
struct KernelInputs<B: Backend> {
    a: B::Buf,
    b: B::Buf,
    diagonal: B::Buf,
}

impl<B: Backend> KernelInputs<B> {
    fn upload(k: &B, a: &Tensor, b: &Tensor, rows: usize) -> Result<Self> {
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
