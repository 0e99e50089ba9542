//! Supervised contrastive loss (Khosla et al., contrast_mode "all"): features N x V x D,
//! normalized inside; every view is an anchor; positives are the other views with its label.

use super::infonce::{
    kernel_forward, SoftmaxForward, SoftmaxSaved, GRADIENT_BLAME, TEMPERATURE_BLAME,
};
use super::{
    check_grad_loss, check_host_finite, check_labels_len, check_result, check_scalar_result,
    check_softmax_temperature, check_temperature, compute_dtype, host_loss, kernel_grads,
    output_like, place, state_like, upload_features, values, with_cpu_real, Fingerprint, Origin,
    Placed,
};
use crate::checks::Recorder;
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, AsIndices, Error, Result, Tensor};

const OP: &str = "supcon";
const BACKWARD: &str = "supcon_backward";

/// Options of [`supcon`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SupConOptions {
    pub temperature: f64,
    /// The loss is scaled by `temperature / base_temperature`.
    pub base_temperature: f64,
    /// Which anchors the mean is over.
    pub reduction: SupConReduction,
}

impl Default for SupConOptions {
    fn default() -> Self {
        SupConOptions {
            temperature: 0.07,
            base_temperature: 0.07,
            reduction: SupConReduction::AllAnchors,
        }
    }
}

/// Which anchors SupCon's mean is over: the libraries differ on anchors without a positive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SupConReduction {
    /// SupContrast (Khosla et al.'s code): every one of the N·V anchors; an anchor without a
    /// positive adds 0 and still counts.
    #[default]
    AllAnchors,
    /// pytorch-metric-learning's `SupConLoss` (its `AvgNonZeroReducer`): the anchors with a
    /// positive; the loss (and gradient) is 0 for a batch without a positive pair or without a
    /// negative pair (one class). With `base_temperature = temperature`, PML's number.
    AnchorsWithPositives,
}

impl SupConReduction {
    /// The count SupCon's sum is divided by (times `base_temperature / temperature`) for the
    /// class table `classes`: infinite where the loss is 0.
    pub(crate) fn anchors(self, classes: &crate::shared::Classes) -> f64 {
        let rows = classes.class.len();
        match self {
            SupConReduction::AllAnchors => rows as f64,
            SupConReduction::AnchorsWithPositives => {
                let with_positive = (0..rows).filter(|&a| classes.has_positive(a)).count();
                let one_class = classes
                    .class
                    .iter()
                    .all(|&c| Some(&c) == classes.class.first());
                match (with_positive, one_class) {
                    (0, _) | (_, true) => f64::INFINITY,
                    (n, false) => n as f64,
                }
            }
        }
    }
}

/// Loss and gradient of [`supcon`].
#[derive(Clone, Debug)]
pub struct SupConOutput {
    /// The loss, a 0-d f64 tensor on the features' device.
    pub loss: Tensor,
    pub grad_features: Tensor,
}

/// The problem's `(samples, views, dim)`.
type Dims = (usize, usize, usize);

/// Validates the inputs (errors named after `op`) and returns `(samples, views, dim)` and the
/// placed labels.
fn validate<'l>(
    op: &'static str,
    features: &Tensor,
    labels: &'l (impl AsIndices<i64> + ?Sized),
    opts: &SupConOptions,
) -> Result<(Dims, Placed<'l, i64>)> {
    let (samples, views, dim) = match *features.shape() {
        [n, v, d] => (n, v, d),
        _ => {
            return Err(Error::shape(
                op,
                "features",
                features.shape(),
                "[N, V, D] (rank 3: samples x views x features)",
            ))
        }
    };
    let empty = |what: &str| {
        Err(Error::Empty {
            op,
            arg: "features",
            what: what.into(),
        })
    };
    if samples == 0 {
        return empty("it has 0 samples (empty batch)");
    }
    if views == 0 {
        return empty("it has 0 views per sample");
    }
    if dim == 0 {
        return empty("its feature dimension D is 0");
    }
    let labels = place(op, "labels", labels.index_view(), features.device())?;
    check_labels_len(op, "labels", labels.len(), samples)?;
    check_softmax_temperature(
        op,
        opts.temperature,
        compute_dtype(features.device(), features.dtype()),
    )?;
    check_temperature(op, "base_temperature", opts.base_temperature)?;
    let ratio = opts.temperature / opts.base_temperature;
    if !ratio.is_finite() {
        return Err(Error::invalid(
            op,
            "base_temperature",
            format!("temperature / base_temperature = {ratio} is not finite"),
        ));
    }
    // Row n of the error is sample n.
    check_host_finite(op, "features", features)?;
    Ok(((samples, views, dim), labels))
}

/// The origin of supcon's saved state.
fn origin(features: &Tensor, labels: &Placed<'_, i64>, opts: &SupConOptions) -> Origin {
    Origin::new(OP, opts, Fingerprint::new().tensor(features).placed(labels))
}

/// The labels of the CPU path (placed on the host: the CPU is no kernel device).
fn host_labels<'p>(labels: &'p Placed<'_, i64>) -> Result<&'p [i64]> {
    labels
        .host()
        .ok_or_else(|| Error::Device("supcon: device labels on the CPU path".into()))
}

fn problem<'a, T>(
    features: &'a [T],
    labels: &'a [i64],
    (samples, views, dim): (usize, usize, usize),
    opts: &SupConOptions,
) -> cpu::supcon::Problem<'a, T> {
    cpu::supcon::Problem {
        features,
        labels,
        samples,
        views,
        dim,
        temperature: opts.temperature,
        base_temperature: opts.base_temperature,
        reduction: opts.reduction,
    }
}

/// SupCon forward: the mean loss over the N·V anchors and the per-anchor log-sum-exp.
pub fn supcon_forward(
    features: &Tensor,
    labels: &(impl AsIndices<i64> + ?Sized),
    opts: &SupConOptions,
) -> Result<SoftmaxForward> {
    let (dims, labels) = validate(OP, features, labels, opts)?;
    let origin = origin(features, &labels, opts);
    run_on_kernels!(features.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = KernelInputs::new(b, &mut rec, features, &labels, dims, opts.reduction)?;
        let problem = inputs.problem(dims, opts);
        let (row_loss, lse) = problem.forward(b)?;
        kernel_forward(b, rec, row_loss, lse, problem.divisor(), origin)
    });
    with_cpu_real!(features.dtype(), T => {
        let fv = values::<T>(features)?;
        let (loss, lse) = problem(&fv, host_labels(&labels)?, dims, opts).forward();
        let lse = state_like(features, lse, &[dims.0 * dims.1])?;
        SoftmaxSaved::checked(OP, loss, lse, origin, TEMPERATURE_BLAME)
    })
}

/// SupCon backward: the gradient of `grad_loss * loss` with respect to the features.
pub fn supcon_backward(
    features: &Tensor,
    labels: &(impl AsIndices<i64> + ?Sized),
    opts: &SupConOptions,
    saved: &SoftmaxSaved,
    grad_loss: f64,
) -> Result<Tensor> {
    let (dims, labels) = validate(BACKWARD, features, labels, opts)?;
    saved.check(BACKWARD, &origin(features, &labels, opts), dims.0 * dims.1)?;
    check_grad_loss(
        BACKWARD,
        grad_loss,
        compute_dtype(features.device(), features.dtype()),
    )?;
    run_on_kernels!(features.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let inputs = KernelInputs::new(b, &mut rec, features, &labels, dims, opts.reduction)?;
        let lse = saved.operand(b, &mut rec)?;
        let grad = inputs.problem(dims, opts).backward(b, &lse, grad_loss)?;
        let grads = [("grad_features", grad, features)];
        let ((), [grad]) = kernel_grads(b, rec, grads, GRADIENT_BLAME, |rec| Ok(((), rec.finish()?)))?;
        Ok(grad)
    });
    with_cpu_real!(features.dtype(), T => {
        let fv = values::<T>(features)?;
        let grad = problem(&fv, host_labels(&labels)?, dims, opts)
            .backward(&saved.lse.to_vec_f64()?, grad_loss);
        let grad = output_like(features, grad, features.shape())?;
        check_result(BACKWARD, "grad_features", &grad, GRADIENT_BLAME)?;
        Ok(grad)
    })
}

/// SupCon loss and gradient in one call: `features` is N x V x D (V views of each of N samples),
/// `labels` has one class per sample. Views of the same class pull together.
///
/// ```
/// use contra::{supcon, Device, SupConOptions, Tensor};
/// // 3 samples, 2 views each, D = 2; samples 0 and 1 share a class.
/// let features = Tensor::from_vec(
///     vec![1.0f32, 0.0, 0.9, 0.1,  0.8, 0.2, 1.0, 0.1,  0.0, 1.0, 0.1, 0.9],
///     &[3, 2, 2],
///     Device::Cpu,
/// )?;
/// let opts = SupConOptions { temperature: 0.1, base_temperature: 0.1, ..Default::default() };
/// let out = supcon(&features, &[7, 7, 3], &opts)?;
/// assert!(out.loss.to_scalar()? > 0.0);
/// assert_eq!(out.grad_features.shape(), &[3, 2, 2]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn supcon(
    features: &Tensor,
    labels: &(impl AsIndices<i64> + ?Sized),
    opts: &SupConOptions,
) -> Result<SupConOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let (dims, labels) = validate(OP, features, labels, opts)?;
    run_on_kernels!(features.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = KernelInputs::new(b, &mut rec, features, &labels, dims, opts.reduction)?;
        let problem = inputs.problem(dims, opts);
        let (row_loss, lse) = problem.forward(b)?;
        rec.result("lse", TEMPERATURE_BLAME, &lse, 1)?;
        let grad = problem.backward(b, &lse, 1.0)?;
        let finish = |rec: Recorder<'_, _>| rec.finish_loss(&row_loss, problem.divisor(), TEMPERATURE_BLAME);
        let grads = [("grad_features", grad, features)];
        let (loss, [grad_features]) = kernel_grads(b, rec, grads, GRADIENT_BLAME, finish)?;
        Ok(SupConOutput { loss, grad_features })
    });
    // One sweep for loss and gradient (see cpu::softmax::forward_backward).
    with_cpu_real!(features.dtype(), T => {
        let fv = values::<T>(features)?;
        let (loss, grad) = problem(&fv, host_labels(&labels)?, dims, opts).forward_backward(1.0);
        check_scalar_result(OP, "loss", loss, TEMPERATURE_BLAME)?;
        let grad_features = output_like(features, grad, features.shape())?;
        check_result(OP, "grad_features", &grad_features, GRADIENT_BLAME)?;
        Ok(SupConOutput { loss: host_loss(loss, features.device())?, grad_features })
    })
}

/// The flattened views, a dense class id per view and `1 / |P(a)|` per view, as kernel buffers.
struct KernelInputs<'t, B: Backend> {
    views: Operand<'t, B::Buf>,
    labels: B::Buf,
    target_weight: B::Buf,
    /// What the loss's sum is divided by (before the temperature ratio).
    anchors: f64,
}

impl<'t, B: Backend> KernelInputs<'t, B> {
    /// The features where they are (copied in from the host), their scan recorded; the class
    /// table built on the device from device labels, or on the host and copied in.
    fn new(
        b: &B,
        rec: &mut Recorder<'_, B>,
        features: &'t Tensor,
        labels: &Placed<'_, i64>,
        (samples, views, _): Dims,
        reduction: SupConReduction,
    ) -> Result<Self> {
        let anchors = match (reduction, labels) {
            (SupConReduction::AllAnchors, _) => (samples * views) as f64,
            (_, Placed::Host(labels)) => {
                reduction.anchors(&crate::shared::Classes::new(labels, views))
            }
            // The count depends on the labels: read from the device (one small copy).
            (_, Placed::Device(indices)) => {
                reduction.anchors(&crate::shared::Classes::new(&indices.to_vec()?, views))
            }
        };
        let (labels, target_weight) = match labels {
            Placed::Device(indices) => {
                let buf = indices
                    .device_buf()
                    .and_then(|buf| b.resident(buf))
                    .ok_or_else(|| Error::Device("supcon: labels not on the device".into()))?;
                kernels::elementwise::class_weights(b, buf, views)?
            }
            Placed::Host(labels) => {
                let (class, weight) = crate::shared::Classes::new(labels, views).for_kernels();
                (
                    b.upload_i32("labels", &class)?,
                    b.upload("target_weight", &weight)?,
                )
            }
        };
        let inputs = KernelInputs {
            views: upload_features(b, "features", features)?,
            labels,
            target_weight,
            anchors,
        };
        rec.input("features", features, &inputs.views)?;
        Ok(inputs)
    }

    fn problem(
        &self,
        (samples, views, dim): (usize, usize, usize),
        opts: &SupConOptions,
    ) -> kernels::supcon::SupCon<'_, B> {
        kernels::supcon::SupCon {
            views: &self.views,
            labels: &self.labels,
            target_weight: &self.target_weight,
            rows: samples * views,
            anchors: self.anchors,
            dim,
            temperature: opts.temperature,
            base_temperature: opts.base_temperature,
        }
    }
}
