//! The contrastive margin loss of Hadsell, Chopra and LeCun (2006): pairs `x1, x2`, `y = 0`
//! similar, `y = 1` dissimilar, `d = sqrt(max(||x1 - x2||^2, 1e-12))`,
//! `loss = mean((1 - y) d^2 / 2 + y relu(m - d)^2 / 2)`.
//!
//! The derivative of `d` is taken as 0 where `||x1 - x2||^2 < 1e-12` (the clamp is active).

use super::{
    check_grad_loss, check_host_finite, check_labels_len, check_result, compute_dtype, host_loss,
    index_operand, kernel_grads, matrix_dims, output_like, place, same_place, upload_f32, values,
    with_cpu_real, Fingerprint, Origin, Placed,
};
use crate::checks::{IndexRule, Recorder};
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, AsIndices, DType, Device, Error, Result, Tensor};

const OP: &str = "margin_loss";
const BACKWARD: &str = "margin_backward";

/// Options of [`margin_loss`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MarginOptions {
    /// Margin `m >= 0` dissimilar pairs are pushed beyond.
    pub margin: f64,
    /// Which library's contrastive loss.
    pub variant: MarginVariant,
}

impl Default for MarginOptions {
    fn default() -> Self {
        MarginOptions {
            margin: 1.0,
            variant: MarginVariant::Hadsell,
        }
    }
}

/// The contrastive margin loss as its papers and libraries define it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MarginVariant {
    /// Hadsell, Chopra and LeCun (2006): `mean((1 - y) d^2 / 2 + y relu(m - d)^2 / 2)`.
    #[default]
    Hadsell,
    /// pytorch-metric-learning's `ContrastiveLoss` (pos_margin 0, neg_margin `m`, its default
    /// `AvgNonZeroReducer`): the mean of the similar pairs' `d > 0` plus the mean of the
    /// dissimilar pairs' `m - d > 0`, without squares (an empty group adds 0; a pair closer than
    /// 1e-6 is at distance 0). PML forms the pairs from a labelled batch and normalizes the
    /// embeddings by default: pass those pairs, normalized, for its number.
    PmlContrastive,
}

/// Loss and gradients of [`margin_loss`].
#[derive(Clone, Debug)]
pub struct MarginOutput {
    /// The mean loss, a 0-d f64 tensor on x1's device.
    pub loss: Tensor,
    pub grad_x1: Tensor,
    pub grad_x2: Tensor,
}

/// Validates the inputs (errors named after `op`) and returns `dim` and the placed labels.
fn validate<'y>(
    op: &'static str,
    x1: &Tensor,
    x2: &Tensor,
    y: &'y (impl AsIndices<i64> + ?Sized),
    opts: &MarginOptions,
) -> Result<(usize, Placed<'y, i64>)> {
    let (rows, dim) = matrix_dims(op, "x1", x1)?;
    matrix_dims(op, "x2", x2)?;
    same_place(op, &[("x1", x1), ("x2", x2)])?;
    if x2.shape() != x1.shape() {
        return Err(Error::shape(
            op,
            "x2",
            x2.shape(),
            format!("{:?} (the shape of x1)", x1.shape()),
        ));
    }
    let y = place(op, "y", y.index_view(), x1.device())?;
    check_labels_len(op, "y", y.len(), rows)?;
    let host = y.host().unwrap_or_default();
    if let Some((i, &v)) = host.iter().enumerate().find(|&(_, &v)| v != 0 && v != 1) {
        return Err(Error::invalid(op, "y", format!("y[{i}] = {v} {Y_RANGE}")));
    }
    if !(opts.margin.is_finite() && opts.margin >= 0.0) {
        return Err(Error::invalid(
            op,
            "margin",
            format!("{} must be finite and >= 0", opts.margin),
        ));
    }
    // The loss squares relu(m - d) in f64 on every backend, so the margin's square must be an
    // f64; where the distances are f32 (kernels, and f32 / bf16 / f16 inputs anywhere) the margin
    // must be an f32 too.
    let f32_compute = x1.device() != Device::Cpu || x1.dtype() != DType::F64;
    if f32_compute && !((opts.margin as f32).is_finite()) {
        return Err(Error::invalid(
            op,
            "margin",
            format!(
                "{:e} overflows f32 (max {:e}), the precision this call computes distances in",
                opts.margin,
                f32::MAX
            ),
        ));
    }
    if !(opts.margin * opts.margin).is_finite() {
        return Err(Error::invalid(
            op,
            "margin",
            format!(
                "{:e}: its square, which the loss takes, overflows f64",
                opts.margin
            ),
        ));
    }
    check_host_finite(op, "x1", x1)?;
    check_host_finite(op, "x2", x2)?;
    Ok((dim, y))
}

/// What a label other than 0 or 1 is told.
const Y_RANGE: &str = "is not a label: labels must be 0 (similar) or 1 (dissimilar)";

/// `x1` and `x2` as f32 kernel operands (where they are, else copied in), their scans
/// recorded, and `y` as i32 (on the device where it is, checked there; host labels, validated
/// to be 0 or 1, copied in).
fn upload<'t, B: Backend>(
    b: &B,
    rec: &mut Recorder<'_, B>,
    x1: &'t Tensor,
    x2: &'t Tensor,
    y: &'t Placed<'_, i64>,
) -> Result<[Operand<'t, B::Buf>; 3]> {
    let (o1, o2) = (upload_f32(b, "x1", x1)?, upload_f32(b, "x2", x2)?);
    rec.input("x1", x1, &o1)?;
    rec.input("x2", x2, &o2)?;
    let rule = IndexRule {
        lo: 0,
        hi: 2,
        forbid_self: false,
        range: Y_RANGE.into(),
    };
    let y = index_operand(b, rec, "y", y, Some(rule), |y| {
        let labels: Vec<i32> = y.iter().map(|&v| v as i32).collect();
        b.upload_i32("y", &labels)
    })?;
    Ok([o1, o2, y])
}

/// The kernel problem over uploaded `[x1, x2, y]`.
fn kernel_problem<'a, B: Backend>(
    buffers: &'a [Operand<'_, B::Buf>; 3],
    rows: usize,
    dim: usize,
    opts: &MarginOptions,
) -> kernels::margin::Problem<'a, B> {
    kernels::margin::Problem {
        x1: &buffers[0],
        x2: &buffers[1],
        y: &buffers[2],
        rows,
        dim,
        margin: opts.margin,
        pml: opts.variant == MarginVariant::PmlContrastive,
    }
}

/// What the margin loss overflows on (a distance beyond f64 when squared).
const LOSS_BLAME: &str = "a similar pair's ||x1 - x2||^2 / 2 is beyond f64::MAX";
/// What a gradient beyond its output's range blames.
const GRAD_BLAME: &str =
    "its exact value is beyond the output's range; scale `grad_loss` or `x1` - `x2` down";

/// What [`margin_backward`] needs from [`margin_forward`]: only the record of the call that made
/// it (the backward recomputes each pair's distance, O(N D)), so that a backward of other
/// inputs or options is an error instead of the gradient of another loss.
#[derive(Clone, Debug)]
pub struct MarginSaved {
    pub(crate) origin: Origin,
}

/// Loss and saved state of [`margin_forward`].
#[derive(Clone, Debug)]
pub struct MarginForward {
    /// The mean loss, a 0-d f64 tensor on x1's device.
    pub loss: Tensor,
    pub saved: MarginSaved,
}

/// The origin of the margin loss's saved state.
fn origin(x1: &Tensor, x2: &Tensor, y: &Placed<'_, i64>, opts: &MarginOptions) -> Origin {
    Origin::new(OP, opts, Fingerprint::new().tensor(x1).tensor(x2).placed(y))
}

/// The mean margin loss. Distances are right at any scale and the loss is formed in f64 on every
/// backend (pairs 1e20 apart cost 5e39); a loss beyond f64 is an error naming `x1`.
pub fn margin_forward(
    x1: &Tensor,
    x2: &Tensor,
    y: &(impl AsIndices<i64> + ?Sized),
    opts: &MarginOptions,
) -> Result<MarginForward> {
    let (dim, y) = validate(OP, x1, x2, y, opts)?;
    let loss = forward_loss(x1, x2, &y, opts, dim)?;
    let saved = MarginSaved {
        origin: origin(x1, x2, &y, opts),
    };
    Ok(MarginForward { loss, saved })
}

/// The loss on validated inputs.
fn forward_loss(
    x1: &Tensor,
    x2: &Tensor,
    y: &Placed<'_, i64>,
    opts: &MarginOptions,
    dim: usize,
) -> Result<Tensor> {
    let rows = y.len();
    run_on_kernels!(x1.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let buffers = upload(b, &mut rec, x1, x2, y)?;
        let problem = kernel_problem(&buffers, rows, dim, opts);
        let (row_dist, terms) = problem.forward(b)?;
        if problem.pml {
            let finish = |status: &_, slots| {
                let (out, _) = problem.finish_pml(b, &row_dist, status, Some(slots))?;
                out.ok_or_else(|| Error::Device("margin_loss: no loss buffer".into()))
            };
            return Ok(rec.finish_with("loss", LOSS_BLAME, finish)?.0);
        }
        Ok(rec.finish_terms("loss", &row_dist, terms, rows as f64, LOSS_BLAME)?.0)
    });
    let y = host_labels(y)?;
    let loss = with_cpu_real!(x1.dtype(), T => {
        let (v1, v2) = (values::<T>(x1)?, values::<T>(x2)?);
        match opts.variant {
            MarginVariant::Hadsell => cpu::margin::forward::<T>(&v1, &v2, y, dim, opts.margin),
            MarginVariant::PmlContrastive => {
                cpu::margin::pml_forward::<T>(&v1, &v2, y, dim, opts.margin).0
            }
        }
    });
    if loss.is_finite() {
        host_loss(loss, x1.device())
    } else {
        Err(Error::invalid(
            OP,
            "x1",
            format!("the loss overflows f64 ({LOSS_BLAME})"),
        ))
    }
}

/// Gradients of `grad_loss * loss` with respect to x1 and x2. Pass the inputs and options of the
/// forward that produced `saved`.
pub fn margin_backward(
    x1: &Tensor,
    x2: &Tensor,
    y: &(impl AsIndices<i64> + ?Sized),
    opts: &MarginOptions,
    saved: &MarginSaved,
    grad_loss: f64,
) -> Result<(Tensor, Tensor)> {
    let (dim, y) = validate(BACKWARD, x1, x2, y, opts)?;
    saved.origin.check(BACKWARD, &origin(x1, x2, &y, opts))?;
    input_grads(x1, x2, &y, opts, dim, grad_loss)
}

/// The labels of the CPU path (placed on the host: the CPU is no kernel device).
fn host_labels<'p>(y: &'p Placed<'_, i64>) -> Result<&'p [i64]> {
    y.host()
        .ok_or_else(|| Error::Device("margin_loss: device labels on the CPU path".into()))
}

/// The gradients on validated inputs.
fn input_grads(
    x1: &Tensor,
    x2: &Tensor,
    y: &Placed<'_, i64>,
    opts: &MarginOptions,
    dim: usize,
    grad_loss: f64,
) -> Result<(Tensor, Tensor)> {
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(x1.device(), x1.dtype()))?;
    run_on_kernels!(x1.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let buffers = upload(b, &mut rec, x1, x2, y)?;
        let (g1, g2) = kernel_problem(&buffers, y.len(), dim, opts).backward(b, grad_loss)?;
        let grads = [("grad_x1", g1, x1), ("grad_x2", g2, x2)];
        let ((), [g1, g2]) = kernel_grads(b, rec, grads, GRAD_BLAME, |rec| Ok(((), rec.finish()?)))?;
        Ok((g1, g2))
    });
    let y = host_labels(y)?;
    let (g1, g2) = with_cpu_real!(x1.dtype(), T => {
        let (v1, v2) = (values::<T>(x1)?, values::<T>(x2)?);
        let (g1, g2) = match opts.variant {
            MarginVariant::Hadsell => {
                cpu::margin::backward::<T>(&v1, &v2, y, dim, opts.margin, grad_loss)
            }
            MarginVariant::PmlContrastive => {
                cpu::margin::pml_backward::<T>(&v1, &v2, y, dim, opts.margin, grad_loss)
            }
        };
        (output_like(x1, g1, x1.shape())?, output_like(x2, g2, x2.shape())?)
    });
    check_result(BACKWARD, "grad_x1", &g1, GRAD_BLAME)?;
    check_result(BACKWARD, "grad_x2", &g2, GRAD_BLAME)?;
    Ok((g1, g2))
}

/// Margin loss and gradients in one call.
///
/// ```
/// use contra::{margin_loss, Device, MarginOptions, Tensor};
/// let x1 = Tensor::from_vec(vec![0.0f64, 0.0, 0.0, 0.0], &[2, 2], Device::Cpu)?;
/// let x2 = Tensor::from_vec(vec![0.3f64, 0.4, 0.3, 0.4], &[2, 2], Device::Cpu)?;
/// // Both pairs are 0.5 apart: the similar one costs 0.5^2 / 2, the dissimilar one
/// // (1 - 0.5)^2 / 2 with margin 1.
/// let out = margin_loss(&x1, &x2, &[0, 1], &MarginOptions { margin: 1.0, ..Default::default() })?;
/// assert!((out.loss.to_scalar()? - (0.125 + 0.125) / 2.0).abs() < 1e-12);
/// assert_eq!(out.grad_x2.shape(), &[2, 2]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn margin_loss(
    x1: &Tensor,
    x2: &Tensor,
    y: &(impl AsIndices<i64> + ?Sized),
    opts: &MarginOptions,
) -> Result<MarginOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let (dim, y) = validate(OP, x1, x2, y, opts)?;
    if x1.device() == Device::Cpu && opts.variant == MarginVariant::Hadsell {
        return hadsell_cpu(x1, x2, host_labels(&y)?, opts.margin, dim);
    }
    let loss = forward_loss(x1, x2, &y, opts, dim)?;
    let (grad_x1, grad_x2) = input_grads(x1, x2, &y, opts, dim, 1.0)?;
    Ok(MarginOutput {
        loss,
        grad_x1,
        grad_x2,
    })
}

/// The Hadsell loss and gradients on the CPU in one pass over the pairs.
fn hadsell_cpu(
    x1: &Tensor,
    x2: &Tensor,
    y: &[i64],
    margin: f64,
    dim: usize,
) -> Result<MarginOutput> {
    let (loss, g1, g2) = with_cpu_real!(x1.dtype(), T => {
        let (v1, v2) = (values::<T>(x1)?, values::<T>(x2)?);
        let (loss, g1, g2) = cpu::margin::forward_backward::<T>(&v1, &v2, y, dim, margin, 1.0);
        (loss, output_like(x1, g1, x1.shape())?, output_like(x2, g2, x2.shape())?)
    });
    if !loss.is_finite() {
        return Err(Error::invalid(
            OP,
            "x1",
            format!("the loss overflows f64 ({LOSS_BLAME})"),
        ));
    }
    check_result(OP, "grad_x1", &g1, GRAD_BLAME)?;
    check_result(OP, "grad_x2", &g2, GRAD_BLAME)?;
    Ok(MarginOutput {
        loss: host_loss(loss, x1.device())?,
        grad_x1: g1,
        grad_x2: g2,
    })
}
