//! SigLIP (Zhai et al. 2023): the pairwise sigmoid loss of paired embeddings, as open_clip's
//! `SigLipLoss`. `logit_ij = exp(log_scale) s_ij + bias` with `s` the cosine similarity (or the
//! dot product without `normalize`); pair `(i, i)` is a positive, every other pair a negative;
//! `loss = (1/N) sum_ij softplus(-z_ij logit_ij)`, `z_ij = +1` if `i = j` else -1 (a sum over all
//! N^2 pairs divided by N, not a mean). No N x N matrix is built, and nothing is saved between
//! the forward and the backward: each recomputes its tiles. With `negatives_only`, `b` is a block
//! of M rows from another shard and every pair is a negative (the term a data-parallel SigLIP
//! adds per other shard).

use super::{
    attach_loss_checks, check_finite_scalar, check_grad_loss, check_host_finite, check_result,
    check_scalar_result, compute_dtype, host_loss, kernel_grads, largest, matrix_dims, output_like,
    same_place, same_width, upload_features, values, with_cpu_real, Scalar, ScalarInput,
    ScalarOperand,
};
use crate::checks::Recorder;
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, Error, Result, Tensor};

const OP: &str = "siglip";
const FORWARD: &str = "siglip_forward";
const BACKWARD: &str = "siglip_backward";

/// What scales SigLIP's results, named when one overflows.
const BLAME: &str = "the logits scale as `exp(log_scale)` times the similarities (dot products \
                     without `normalize`) and the gradients also as `grad_loss`: lower them, or \
                     compute in f64 on Device::Cpu";

/// Options of [`siglip`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SigLipOptions {
    /// Cosine similarity (a and b normalized inside), as SigLIP trains; `false` takes the dot
    /// product of the embeddings as given.
    pub normalize: bool,
    /// Every pair is a negative, and `b` may have any number of rows M (same D): the loss of
    /// `a` against a block of another shard's `b`, `(1/N) sum_ij softplus(logit_ij)` (open_clip's
    /// `negative_only`), the term a data-parallel SigLIP adds for every other shard.
    pub negatives_only: bool,
}

impl Default for SigLipOptions {
    fn default() -> Self {
        SigLipOptions {
            normalize: true,
            negatives_only: false,
        }
    }
}

impl SigLipOptions {
    /// The initial `log_scale` of the SigLIP paper (a logit scale of 10).
    pub const INIT_LOG_SCALE: f64 = std::f64::consts::LN_10;
    /// The initial `bias` of the SigLIP paper (-10: most pairs are negatives).
    pub const INIT_BIAS: f64 = -10.0;
}

/// Gradients of the SigLIP loss.
#[derive(Clone, Debug)]
pub struct SigLipGrads {
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    /// The gradient of the learnable `log_scale`, a 0-d f64 tensor on a's device.
    pub grad_log_scale: Tensor,
    /// The gradient of the learnable `bias`, a 0-d f64 tensor on a's device.
    pub grad_bias: Tensor,
}

/// Loss and gradients of [`siglip`].
#[derive(Clone, Debug)]
pub struct SigLipOutput {
    /// The loss, a 0-d f64 tensor on a's device.
    pub loss: Tensor,
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    /// The gradient of the learnable `log_scale`, a 0-d f64 tensor on a's device.
    pub grad_log_scale: Tensor,
    /// The gradient of the learnable `bias`, a 0-d f64 tensor on a's device.
    pub grad_bias: Tensor,
}

/// One validated call: the rows of a and b, `dim`, `log_scale` and `bias` (values, or tensors
/// on the inputs' kernel device).
struct Call<'t> {
    rows: usize,
    cols: usize,
    dim: usize,
    log_scale: ScalarInput<'t>,
    bias: ScalarInput<'t>,
}

/// Validates the inputs (errors named after `op`).
fn validate<'t>(
    op: &'static str,
    (a, b): (&Tensor, &Tensor),
    log_scale: Scalar<'t>,
    bias: Scalar<'t>,
    opts: &SigLipOptions,
) -> Result<Call<'t>> {
    let (rows, dim) = matrix_dims(op, "a", a)?;
    let cols = same_width(op, "b", b, "M", "a", dim)?;
    same_place(op, &[("a", a), ("b", b)])?;
    if !opts.negatives_only && b.shape() != a.shape() {
        return Err(Error::shape(
            op,
            "b",
            b.shape(),
            format!("{:?} (the same shape as a: one pair per row)", a.shape()),
        ));
    }
    let compute = compute_dtype(a.device(), a.dtype());
    let log_scale = ScalarInput::resolve(op, "log_scale", log_scale, a)?;
    if let ScalarInput::Value(value) = log_scale {
        check_log_scale(op, value, compute)?;
    }
    let bias = ScalarInput::resolve(op, "bias", bias, a)?;
    if let ScalarInput::Value(value) = bias {
        check_finite_scalar(op, "bias", value)?;
        if value.abs() > largest(compute) {
            return Err(Error::invalid(
                op,
                "bias",
                format!("{value:e} overflows the {compute} the loss is computed in"),
            ));
        }
    }
    check_host_finite(op, "a", a)?;
    check_host_finite(op, "b", b)?;
    Ok(Call {
        rows,
        cols,
        dim,
        log_scale,
        bias,
    })
}

/// Rejects a `log_scale` whose logit scale `exp(log_scale)` overflows the compute dtype. A
/// tensor left on the device is checked there: a non-finite one by the scan of its operand, an
/// overflowing scale through the infinite logits it makes.
fn check_log_scale(op: &'static str, log_scale: f64, compute: crate::DType) -> Result<()> {
    check_finite_scalar(op, "log_scale", log_scale)?;
    let scale = log_scale.exp();
    if scale <= largest(compute) {
        return Ok(());
    }
    Err(Error::invalid(
        op,
        "log_scale",
        format!(
            "{log_scale} gives a logit scale of {scale:e}, which overflows the {compute} the \
             loss is computed in (the largest accepted is {:.3})",
            largest(compute).ln()
        ),
    ))
}

/// The CPU problem of one call.
fn problem<'a, T>(
    a: &'a [T],
    b: &'a [T],
    call: &Call<'_>,
    opts: &SigLipOptions,
) -> Result<cpu::siglip::Problem<'a, T>> {
    Ok(cpu::siglip::Problem {
        a,
        b,
        rows: call.rows,
        cols: call.cols,
        positives: !opts.negatives_only,
        dim: call.dim,
        log_scale: call.log_scale.value()?,
        bias: call.bias.value()?,
        normalize: opts.normalize,
    })
}

/// a, b and the scalars as kernel operands, their scans recorded.
struct KernelInputs<'t, B: Backend> {
    a: Operand<'t, B::Buf>,
    b: Operand<'t, B::Buf>,
    log_scale: ScalarOperand<'t, B::Buf>,
    bias: ScalarOperand<'t, B::Buf>,
}

impl<'t, B: Backend> KernelInputs<'t, B> {
    fn new(
        k: &B,
        rec: &mut Recorder<'_, B>,
        a: &'t Tensor,
        b: &'t Tensor,
        call: &Call<'t>,
    ) -> Result<Self> {
        let inputs = KernelInputs {
            a: upload_features(k, "a", a)?,
            b: upload_features(k, "b", b)?,
            log_scale: ScalarOperand::new(k, rec, "log_scale", call.log_scale)?,
            bias: ScalarOperand::new(k, rec, "bias", call.bias)?,
        };
        rec.input("a", a, &inputs.a)?;
        rec.input("b", b, &inputs.b)?;
        Ok(inputs)
    }

    fn problem(&self, call: &Call<'_>, opts: &SigLipOptions) -> kernels::siglip::SigLip<'_, B> {
        kernels::siglip::SigLip {
            a: &self.a,
            b: &self.b,
            rows: call.rows,
            cols: call.cols,
            positives: !opts.negatives_only,
            dim: call.dim,
            normalize: opts.normalize,
            log_scale: self.log_scale.arg(),
            bias: self.bias.arg(),
        }
    }
}

/// The loss and gradients on a kernel backend (errors named after `op`): the gradients of
/// `grad_loss * loss`, each scalar gradient a 0-d f64 tensor whose reads verify the call's
/// checks.
fn kernel_sweep<B: Backend>(
    k: &B,
    op: &'static str,
    (a, b): (&Tensor, &Tensor),
    call: &Call<'_>,
    opts: &SigLipOptions,
    grad_loss: f64,
) -> Result<(Tensor, SigLipGrads)> {
    let mut rec = Recorder::new(k, op)?;
    let inputs = KernelInputs::new(k, &mut rec, a, b, call)?;
    let problem = inputs.problem(call, opts);
    let (row_loss, grads) = problem.sweep(k, Some(grad_loss))?;
    let grads = grads.ok_or_else(|| Error::Device(format!("{op}: no gradients")))?;
    let scalar = |what, partial: &B::Buf| {
        Recorder::new(k, op)?
            .finish_scalar(what, partial, 1.0, BLAME)
            .map(|(t, _)| t)
    };
    let grad_log_scale = scalar("grad_log_scale", &grads.log_scale_partial)?;
    let grad_bias = scalar("grad_bias", &grads.bias_partial)?;
    let finish = |rec: Recorder<'_, _>| rec.finish_loss(&row_loss, problem.divisor(), BLAME);
    let (loss, [grad_a, grad_b]) = kernel_grads(
        k,
        rec,
        [("grad_a", grads.a, a), ("grad_b", grads.b, b)],
        BLAME,
        finish,
    )?;
    let grads = SigLipGrads {
        grad_a,
        grad_b,
        grad_log_scale: attach_loss_checks(grad_log_scale, &loss),
        grad_bias: attach_loss_checks(grad_bias, &loss),
    };
    Ok((loss, grads))
}

/// The loss of paired embeddings `a`, `b` (N x D each). Nothing is saved for the backward:
/// [`siglip_backward`] recomputes what it needs from the same inputs.
pub fn siglip_forward<'s, 'b>(
    a: &Tensor,
    b: &Tensor,
    log_scale: impl Into<Scalar<'s>>,
    bias: impl Into<Scalar<'b>>,
    opts: &SigLipOptions,
) -> Result<Tensor> {
    let call = validate(FORWARD, (a, b), log_scale.into(), bias.into(), opts)?;
    run_on_kernels!(a.device(), k => {
        let mut rec = Recorder::new(k, FORWARD)?;
        let inputs = KernelInputs::new(k, &mut rec, a, b, &call)?;
        let problem = inputs.problem(&call, opts);
        let (row_loss, _) = problem.sweep(k, None)?;
        Ok(rec.finish_loss(&row_loss, problem.divisor(), BLAME)?.0)
    });
    let loss = with_cpu_real!(a.dtype(), T => {
        let (av, bv) = (values::<T>(a)?, values::<T>(b)?);
        problem(&av, &bv, &call, opts)?.forward()
    });
    check_scalar_result(FORWARD, "loss", loss, BLAME)?;
    host_loss(loss, a.device())
}

/// Gradients of `grad_loss * loss` with respect to `a`, `b`, `log_scale` and `bias` (one sweep
/// that recomputes the logits).
pub fn siglip_backward<'s, 'b>(
    a: &Tensor,
    b: &Tensor,
    log_scale: impl Into<Scalar<'s>>,
    bias: impl Into<Scalar<'b>>,
    opts: &SigLipOptions,
    grad_loss: f64,
) -> Result<SigLipGrads> {
    let call = validate(BACKWARD, (a, b), log_scale.into(), bias.into(), opts)?;
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(a.device(), a.dtype()))?;
    run_on_kernels!(a.device(), k => {
        kernel_sweep(k, BACKWARD, (a, b), &call, opts, grad_loss).map(|(_, grads)| grads)
    });
    let (_, grads) = cpu_sweep(BACKWARD, a, b, &call, opts, grad_loss)?;
    Ok(grads)
}

/// The loss and the gradients of `grad_loss * loss` on the CPU, checked finite (errors named
/// after `op`).
fn cpu_sweep(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    call: &Call<'_>,
    opts: &SigLipOptions,
    grad_loss: f64,
) -> Result<(f64, SigLipGrads)> {
    let (loss, grad_a, grad_b, grad_log_scale, grad_bias) = with_cpu_real!(a.dtype(), T => {
        let (av, bv) = (values::<T>(a)?, values::<T>(b)?);
        let (loss, g) = problem(&av, &bv, call, opts)?.forward_backward(grad_loss);
        (loss, output_like(a, g.a, a.shape())?, output_like(b, g.b, b.shape())?, g.log_scale, g.bias)
    });
    check_scalar_result(op, "loss", loss, BLAME)?;
    check_result(op, "grad_a", &grad_a, BLAME)?;
    check_result(op, "grad_b", &grad_b, BLAME)?;
    check_scalar_result(op, "grad_log_scale", grad_log_scale, BLAME)?;
    check_scalar_result(op, "grad_bias", grad_bias, BLAME)?;
    let grads = SigLipGrads {
        grad_a,
        grad_b,
        grad_log_scale: host_loss(grad_log_scale, a.device())?,
        grad_bias: host_loss(grad_bias, a.device())?,
    };
    Ok((loss, grads))
}

/// SigLIP loss and gradients in one call (one sweep over the pairs). Row `i` of `a` and row `i`
/// of `b` are a matching pair; `log_scale` (the log of the logit scale) and `bias` are the
/// learnable scalars, values or one-element tensors.
///
/// ```
/// use contra::{siglip, Device, SigLipOptions, Tensor};
/// // Two image embeddings and two text embeddings, D = 2.
/// let a = Tensor::from_vec(vec![1.0f32, 0.1, 0.0, 1.0], &[2, 2], Device::Cpu)?;
/// let b = Tensor::from_vec(vec![0.9f32, 0.0, 0.2, 0.8], &[2, 2], Device::Cpu)?;
/// let opts = SigLipOptions::default();
/// let out = siglip(&a, &b, SigLipOptions::INIT_LOG_SCALE, SigLipOptions::INIT_BIAS, &opts)?;
/// assert!(out.loss.to_scalar()? > 0.0);
/// assert_eq!(out.grad_a.shape(), &[2, 2]);
/// // At bias -10 every pair looks negative: the positives pull the bias up.
/// assert!(out.grad_bias.to_scalar()? < 0.0);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn siglip<'s, 'b>(
    a: &Tensor,
    b: &Tensor,
    log_scale: impl Into<Scalar<'s>>,
    bias: impl Into<Scalar<'b>>,
    opts: &SigLipOptions,
) -> Result<SigLipOutput> {
    let call = validate(OP, (a, b), log_scale.into(), bias.into(), opts)?;
    run_on_kernels!(a.device(), k => {
        let (loss, grads) = kernel_sweep(k, OP, (a, b), &call, opts, 1.0)?;
        Ok(SigLipOutput {
            loss,
            grad_a: grads.grad_a,
            grad_b: grads.grad_b,
            grad_log_scale: grads.grad_log_scale,
            grad_bias: grads.grad_bias,
        })
    });
    let (loss, grads) = cpu_sweep(OP, a, b, &call, opts, 1.0)?;
    Ok(SigLipOutput {
        loss: host_loss(loss, a.device())?,
        grad_a: grads.grad_a,
        grad_b: grads.grad_b,
        grad_log_scale: grads.grad_log_scale,
        grad_bias: grads.grad_bias,
    })
}
