//! Triplet margin loss with batch-all, batch-hard and semi-hard mining over a labelled batch.
//!
//! Distances: `euclidean = sqrt(max(||a - b||^2, 1e-12))` (derivative 0 where the squared distance
//! is below 1e-12), `squared_euclidean = ||a - b||^2`, `cosine = 1 - norm(a) . norm(b)`. A valid
//! triplet (a, p, n) has `a != p`, `y_a = y_p` and `y_n != y_a`.
//!
//! - batch-all: the mean of the terms `relu(d_ap - d_an + m)` that are positive over every valid
//!   triplet (0 if none); `count` is the number of positive terms.
//! - batch-hard: per anchor the hardest positive (largest `d_ap`) and hardest negative (smallest
//!   `d_an`); the mean of `relu(d_ap - d_an + m)` over the anchors that have both, which `count`
//!   counts.
//! - semi-hard (TF-Addons `triplet_semihard_loss`): per positive pair (a, p) whose anchor has a
//!   negative, the nearest negative with `d_an > d_ap`, or, if there is none, the farthest negative;
//!   the mean of `relu(d_ap - d_an + m)` over those pairs, which `count` counts.
//! - semi-hard-all (pytorch-metric-learning's `TripletMarginMiner("semihard")`): every triplet
//!   with `d_an > d_ap` and `d_ap - d_an + m >= 0`; the mean of its positive terms.
//!
//! `reduction` changes what the sum is divided by (and `count`): `NonZero` the terms that are
//! positive (pytorch-metric-learning's `AvgNonZeroReducer`), `AllMined` every mined term.
//!
//! Ties between equal distances pick the lowest row index. The CPU backend computes in f64 whatever
//! the input dtype, with O(N^2) memory (the pairwise distances), never O(N^3).

use std::sync::{Arc, OnceLock};

use super::{
    check_grad_loss, check_host_finite, check_labels_len, check_result, host_loss, index_operand,
    kernel_grads, kernel_state, matrix_dims, output_like, place, upload_f32, values, Fingerprint,
    Origin, Placed,
};
use crate::checks::{Checks, Recorder};
use crate::kernels::storage::DeviceBuf;
use crate::kernels::{self, run_on_kernels, Backend};
use crate::shared::{Classes, Coefs};
pub use crate::shared::{Distance, Mining, TripletReduction, TripletStats};
use crate::{cpu, AsIndices, DType, Device, Error, Result, Tensor};

const OP: &str = "triplet";
const BACKWARD: &str = "triplet_backward";

/// Options of [`triplet`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TripletOptions {
    pub distance: Distance,
    pub mining: Mining,
    /// Margin `m >= 0`.
    pub margin: f64,
    /// What the sum of the terms is divided by (the value of `counts.count()`).
    pub reduction: TripletReduction,
}

impl Default for TripletOptions {
    fn default() -> Self {
        TripletOptions {
            distance: Distance::Euclidean,
            mining: Mining::BatchHard,
            margin: 0.2,
            reduction: TripletReduction::Conventional,
        }
    }
}

/// What the backward needs from the forward: the options, the batch size and, for every pair of
/// rows that occurs in a term with a positive loss, the coefficient of its distance in the loss:
/// on the CPU an N x N matrix when most pairs occur (batch-all), else a list of the pairs (at
/// most 2 per anchor for batch-hard); from the kernels the N x N matrix, left on the device.
/// Never O(N^3).
#[derive(Clone, Debug)]
pub struct TripletSaved {
    pub(crate) rows: usize,
    pub(crate) opts: TripletOptions,
    pub(crate) coefs: SavedCoefs,
    /// The inputs that made it (a backward on other rows or labels is an error).
    pub(crate) origin: Origin,
}

/// Where a forward's pair coefficients are.
#[derive(Clone, Debug)]
pub(crate) enum SavedCoefs {
    /// The CPU's, in the rows' own units.
    Host(Coefs),
    /// The kernels' as `triplet_mine` wrote them (n x n f32 in the units of the rows scaled by
    /// `2^-k`, not yet divided by the triplet count), with the call's summary (the count, k).
    Device {
        raw: Tensor,
        summary: Arc<DeviceBuf>,
    },
}

impl SavedCoefs {
    /// The coefficients in the rows' own units on the host (copied from the device when the
    /// kernels made them): what the CPU backward, or a kernel backward on another device, takes.
    fn to_host(&self, distance: Distance) -> Result<std::borrow::Cow<'_, Coefs>> {
        match self {
            SavedCoefs::Host(coefs) => Ok(std::borrow::Cow::Borrowed(coefs)),
            SavedCoefs::Device { raw, summary } => {
                let (count, _, k) = kernels::triplet::read_summary(&summary.download_words()?)?;
                let scale = if count == 0 { 0.0 } else { 1.0 / count as f64 };
                // d loss / d raw = 2^(kp) (d loss' / d raw') 2^(-2k).
                let exp = k * (kernels::triplet::power(distance) - 2);
                let dense = raw
                    .to_vec::<f32>()?
                    .into_iter()
                    .map(|c| crate::shared::ldexp(c as f64 * scale, exp))
                    .collect();
                Ok(std::borrow::Cow::Owned(Coefs::Dense(dense)))
            }
        }
    }
}

/// The counts of a triplet call: on the host from the CPU, or in the kernels' summary on the
/// device until read (reading them waits for the call, like reading its loss). A CPU call's
/// hard / semi-hard / easy split is computed on the first [`TripletCounts::stats`] (a second
/// pass over the distances, from the call's inputs kept until then), so a training step that
/// does not read it does not pay for it.
#[derive(Clone, Debug)]
pub struct TripletCounts(Counts);

#[derive(Clone, Debug)]
enum Counts {
    Host {
        count: u64,
        stats: Arc<HostStats>,
    },
    Device {
        summary: Arc<DeviceBuf>,
        checks: Arc<Checks>,
    },
}

impl TripletCounts {
    /// What the loss's sum was divided by. With the conventional reduction: batch_all and
    /// semi_hard_all, triplets with a positive loss; batch_hard, anchors with a positive and a
    /// negative; semi_hard, positive pairs whose anchor has a negative.
    pub fn count(&self) -> Result<u64> {
        Ok(self.read()?.0)
    }

    /// The hard / semi-hard / easy split of every valid triplet.
    pub fn stats(&self) -> Result<TripletStats> {
        Ok(self.read()?.1)
    }

    fn read(&self) -> Result<(u64, TripletStats)> {
        match &self.0 {
            Counts::Host { count, stats } => Ok((*count, stats.get())),
            Counts::Device { summary, checks } => {
                checks.verify(None)?;
                let (count, stats, _) = kernels::triplet::read_summary(&summary.download_words()?)?;
                Ok((count, stats))
            }
        }
    }
}

/// A CPU forward's inputs, kept for its stats until they are first asked for.
struct HostStats {
    x: Vec<f64>,
    labels: Vec<i64>,
    dim: usize,
    opts: TripletOptions,
    stats: OnceLock<TripletStats>,
}

impl HostStats {
    fn get(&self) -> TripletStats {
        *self
            .stats
            .get_or_init(|| cpu_problem(&self.x, &self.labels, self.dim, &self.opts).stats())
    }
}

impl std::fmt::Debug for HostStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stats.get() {
            Some(stats) => write!(f, "{stats:?}"),
            None => write!(f, "(computed when first read)"),
        }
    }
}

/// The CPU problem over f64 rows `x` (rows x dim) and their labels.
fn cpu_problem<'a>(
    x: &'a [f64],
    labels: &'a [i64],
    dim: usize,
    opts: &TripletOptions,
) -> cpu::triplet::Problem<'a> {
    cpu::triplet::Problem {
        x,
        rows: labels.len(),
        dim,
        labels,
        distance: opts.distance,
        mining: opts.mining,
        margin: opts.margin,
        reduction: opts.reduction,
    }
}

/// Result of [`triplet_forward`].
#[derive(Clone, Debug)]
pub struct TripletForward {
    /// The loss, a 0-d f64 tensor on x's device.
    pub loss: Tensor,
    pub counts: TripletCounts,
    pub saved: TripletSaved,
}

/// Loss, gradient and counts of [`triplet`].
#[derive(Clone, Debug)]
pub struct TripletOutput {
    /// The loss, a 0-d f64 tensor on x's device.
    pub loss: Tensor,
    pub counts: TripletCounts,
    pub grad_x: Tensor,
}

/// Validates the inputs (errors named after `op`) and returns `(rows, dim)` and the placed
/// labels.
fn validate<'l>(
    op: &'static str,
    x: &Tensor,
    labels: &'l (impl AsIndices<i64> + ?Sized),
    opts: &TripletOptions,
) -> Result<((usize, usize), Placed<'l, i64>)> {
    let (rows, dim) = matrix_dims(op, "x", x)?;
    let labels = place(op, "labels", labels.index_view(), x.device())?;
    check_labels_len(op, "labels", labels.len(), rows)?;
    // Mining keeps the N x N pair matrix (never N^3): it must be addressable.
    crate::tensor::checked_numel(op, "x", &[rows, rows], DType::F64)?;
    if !(opts.margin.is_finite() && opts.margin >= 0.0) {
        return Err(Error::invalid(
            op,
            "margin",
            format!("{} must be finite and >= 0", opts.margin),
        ));
    }
    // The kernels mine in f32: the margin must be an f32 there. The CPU mines in f64 whatever
    // the input dtype.
    if x.device() != Device::Cpu && !(opts.margin as f32).is_finite() {
        return Err(Error::invalid(
            op,
            "margin",
            format!(
                "{:e} overflows f32 (max {:e}), the precision the kernels mine in",
                opts.margin,
                f32::MAX
            ),
        ));
    }
    check_host_finite(op, "x", x)?;
    Ok(((rows, dim), labels))
}

/// The origin of triplet's saved state.
fn origin(x: &Tensor, labels: &Placed<'_, i64>, opts: &TripletOptions) -> Origin {
    Origin::new(OP, opts, Fingerprint::new().tensor(x).placed(labels))
}

/// The power-of-two exponent `k` the kernels take the rows of host values `x` scaled by
/// (`2^-k`; 0: unscaled) when a backward brings in a CPU forward's coefficients; a kernel
/// forward finds its own on the device (kernels::triplet::ROW_NORM_EXP).
fn host_prescale(x: &[f32], dim: usize, opts: &TripletOptions) -> i32 {
    match opts.distance {
        Distance::Cosine => 0,
        _ => cpu::triplet::prescale_exponent(x, dim, kernels::triplet::ROW_NORM_EXP),
    }
}

/// The kernel problem on `b` over the f32 operand `x`.
fn kernel_problem<'a, B: Backend>(
    _on: &B,
    x: &'a B::Buf,
    (rows, dim): (usize, usize),
    opts: &TripletOptions,
) -> kernels::triplet::Problem<'a, B> {
    kernels::triplet::Problem {
        x,
        rows,
        dim,
        distance: opts.distance,
        mining: opts.mining,
        margin: opts.margin,
        nonzero_only: opts.reduction.nonzero_only(opts.mining),
    }
}

/// What the loss overflows on (only f64 rows can: the kernels' f32 rows never do).
const LOSS_BLAME: &str = "distances between the rows of x are beyond f64";

/// Triplet forward over embeddings `x` (N x D) with one label per row: the loss, its count, the
/// hard / semi-hard / easy split of all valid triplets, and what [`triplet_backward`] needs.
///
/// Right at any input scale: the cosine distance is scale-invariant, and the euclidean distances
/// of rows with huge norms are mined scaled by a power of two (exact), with the margin scaled
/// alike. A loss beyond f64 (squared distances of f64 rows beyond ~1e154) is an error naming `x`.
pub fn triplet_forward(
    x: &Tensor,
    labels: &(impl AsIndices<i64> + ?Sized),
    opts: &TripletOptions,
) -> Result<TripletForward> {
    let (dims, labels) = validate(OP, x, labels, opts)?;
    triplet_forward_unchecked(x, &labels, opts, dims)
}

/// The CPU forward's loss as a 0-d tensor on `device`, once it is known to be finite.
fn checked_loss(loss: f64, opts: &TripletOptions, device: crate::Device) -> Result<Tensor> {
    if !loss.is_finite() {
        return Err(Error::invalid(
            OP,
            "x",
            format!("the loss overflows f64 ({:?} {LOSS_BLAME})", opts.distance),
        ));
    }
    host_loss(loss, device)
}

fn triplet_forward_unchecked(
    x: &Tensor,
    labels: &Placed<'_, i64>,
    opts: &TripletOptions,
    (rows, dim): (usize, usize),
) -> Result<TripletForward> {
    let origin = origin(x, labels, opts);
    run_on_kernels!(x.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let x_op = upload_f32(b, "x", x)?;
        rec.input("x", x, &x_op)?;
        // The mining compares labels only for equality: device labels are used as they are,
        // host ones as dense class ids (the one copy a call with host labels makes).
        let class_ids = index_operand(b, &mut rec, "labels", labels, None, |labels| {
            b.upload_i32("labels", &Classes::new(labels, 1).for_kernels().0)
        })?;
        let problem = kernel_problem(b, &x_op, (rows, dim), opts);
        let mined = problem.forward(b, &class_ids)?;
        let (loss, checks) = rec.finish_with("loss", LOSS_BLAME, |status, slots| {
            problem.finish(b, &mined, status, slots)
        })?;
        let summary = Arc::new(b.adopt(mined.summary)?);
        let raw = kernel_state(b, mined.coef, &[rows, rows])?.with_checks(&checks);
        Ok(TripletForward {
            loss,
            counts: TripletCounts(Counts::Device { summary: summary.clone(), checks }),
            saved: TripletSaved {
                rows,
                opts: *opts,
                coefs: SavedCoefs::Device { raw, summary },
                origin,
            },
        })
    });
    let xv = values::<f64>(x)?;
    let labels = labels
        .host()
        .ok_or_else(|| Error::Device("triplet: device labels on the CPU path".into()))?;
    let fwd = cpu_problem(&xv, labels, dim, opts).forward();
    let stats = HostStats {
        labels: labels.to_vec(),
        x: xv.into_owned(),
        dim,
        opts: *opts,
        stats: OnceLock::new(),
    };
    Ok(TripletForward {
        loss: checked_loss(fwd.loss, opts, x.device())?,
        counts: TripletCounts(Counts::Host {
            count: fwd.count,
            stats: Arc::new(stats),
        }),
        saved: TripletSaved {
            rows,
            opts: *opts,
            coefs: SavedCoefs::Host(fwd.coefs),
            origin,
        },
    })
}

/// Triplet backward: the gradient of `grad_loss * loss` with respect to `x`. Pass the `x`,
/// `labels` and `opts` of the forward that produced `saved`.
pub fn triplet_backward(
    x: &Tensor,
    labels: &(impl AsIndices<i64> + ?Sized),
    opts: &TripletOptions,
    saved: &TripletSaved,
    grad_loss: f64,
) -> Result<Tensor> {
    let ((rows, dim), labels) = validate(BACKWARD, x, labels, opts)?;
    if saved.rows != rows {
        return Err(Error::invalid(
            BACKWARD,
            "saved",
            format!("it comes from a batch of {} rows, x has {rows}", saved.rows),
        ));
    }
    if saved.opts != *opts {
        return Err(Error::invalid(
            BACKWARD,
            "saved",
            format!("it comes from options {:?}, not {opts:?}", saved.opts),
        ));
    }
    saved.origin.check(BACKWARD, &origin(x, &labels, opts))?;
    // Mining and its coefficients are f64 on the CPU and f32 on the kernels.
    let compute = match x.device() {
        Device::Cpu => DType::F64,
        _ => DType::F32,
    };
    check_grad_loss(BACKWARD, grad_loss, compute)?;
    triplet_backward_unchecked(x, opts, saved, grad_loss, (rows, dim))
}

/// What a gradient beyond its dtype's range blames.
const GRAD_BLAME: &str =
    "its exact value is beyond the output's range; scale `grad_loss` or `x` down";

fn triplet_backward_unchecked(
    x: &Tensor,
    opts: &TripletOptions,
    saved: &TripletSaved,
    grad_loss: f64,
    (rows, dim): (usize, usize),
) -> Result<Tensor> {
    run_on_kernels!(x.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let x_op = upload_f32(b, "x", x)?;
        rec.input("x", x, &x_op)?;
        // A kernel forward's coefficients on this device are used where they are (no N x N
        // copy); any others come in from the host, with the rows scaled as the host finds.
        let resident = match &saved.coefs {
            SavedCoefs::Device { raw, summary } => raw
                .device_buf()
                .and_then(|raw| b.resident(raw))
                .zip(b.resident(summary)),
            SavedCoefs::Host(_) => None,
        };
        let host_coefs;
        let source = match resident {
            Some((coef, summary)) => kernels::triplet::CoefSource::Device { coef, summary },
            None => {
                host_coefs = saved.coefs.to_host(opts.distance)?;
                let k = host_prescale(&values::<f32>(x)?, dim, opts);
                kernels::triplet::CoefSource::Host { coefs: &host_coefs, k }
            }
        };
        let grad = kernel_problem(b, &x_op, (rows, dim), opts).backward(b, source, grad_loss)?;
        let ((), [grad]) =
            kernel_grads(b, rec, [("grad_x", grad, x)], GRAD_BLAME, |rec| Ok(((), rec.finish()?)))?;
        Ok(grad)
    });
    let xv = values::<f64>(x)?;
    let coefs = saved.coefs.to_host(opts.distance)?;
    let grad = cpu::triplet::backward(&xv, rows, dim, opts.distance, &coefs, grad_loss);
    let grad = output_like(x, grad, x.shape())?;
    check_result(BACKWARD, "grad_x", &grad, GRAD_BLAME)?;
    Ok(grad)
}

/// Triplet loss, gradient and counts in one call.
///
/// ```
/// use contra::{triplet, Device, Distance, Mining, Tensor, TripletOptions};
/// // Two classes on a line: 0.0 and 0.1 are class 7, 1.0 and 0.5 are class 9.
/// let x = Tensor::from_vec(vec![0.0f64, 0.1, 1.0, 0.5], &[4, 1], Device::Cpu)?;
/// let opts = TripletOptions {
///     distance: Distance::Euclidean,
///     mining: Mining::BatchHard,
///     margin: 0.2,
///     ..Default::default()
/// };
/// let out = triplet(&x, &[7, 7, 9, 9], &opts)?;
/// // Anchor 0.5: hardest positive 1.0 (0.5 away), hardest negative 0.1 (0.4 away).
/// assert!((out.loss.to_scalar()? - (0.5 - 0.4 + 0.2) / 4.0).abs() < 1e-12);
/// assert_eq!(out.counts.count()?, 4);
/// assert_eq!(out.grad_x.shape(), &[4, 1]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn triplet(
    x: &Tensor,
    labels: &(impl AsIndices<i64> + ?Sized),
    opts: &TripletOptions,
) -> Result<TripletOutput> {
    let fwd = triplet_forward(x, labels, opts)?;
    let grad_x = triplet_backward(x, labels, opts, &fwd.saved, 1.0)?;
    Ok(TripletOutput {
        loss: fwd.loss,
        counts: fwd.counts,
        grad_x,
    })
}
