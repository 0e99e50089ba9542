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
//!
//! Ties between equal distances pick the lowest row index. The CPU backend computes in f64 whatever
//! the input dtype, with O(N^2) memory (the pairwise distances), never O(N^3).

use super::{
    check_finite, check_finite_scalar, check_labels_len, matrix_dims, output_like, values,
};
use crate::cpu::supcon::Classes;
use crate::kernels::{self, run_on_kernels, Backend};
use crate::{cpu, DType, Error, Result, Tensor};

const OP: &str = "triplet";

/// Distance between embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distance {
    /// `sqrt(max(||a - b||^2, 1e-12))`
    Euclidean,
    /// `||a - b||^2`
    SquaredEuclidean,
    /// `1 - cos(a, b)`
    Cosine,
}

/// Which triplets contribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mining {
    /// Every valid (a, p, n); mean over the terms that are positive.
    BatchAll,
    /// Per anchor, the hardest positive and the hardest negative (Hermans et al.).
    BatchHard,
    /// Per positive pair, the nearest negative farther than the positive, else the farthest
    /// negative (FaceNet, as TF-Addons defines it).
    SemiHard,
}

/// Options of [`triplet`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TripletOptions {
    pub distance: Distance,
    pub mining: Mining,
    /// Margin `m >= 0`.
    pub margin: f64,
}

impl Default for TripletOptions {
    fn default() -> Self {
        TripletOptions {
            distance: Distance::Euclidean,
            mining: Mining::BatchHard,
            margin: 0.2,
        }
    }
}

/// How the valid triplets (a, p, n) of the batch split, as the FaceNet survey classifies them:
/// hard `d_an < d_ap`, semi-hard `d_ap <= d_an < d_ap + m`, easy otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TripletStats {
    pub hard: u64,
    pub semi_hard: u64,
    pub easy: u64,
}

/// What the backward needs from the forward: the options, the batch size and, for every pair of
/// rows that occurs in a term with a positive loss, the coefficient of its distance in the loss:
/// an N x N matrix when most pairs occur (batch-all), else a list of the pairs (at most 2 per
/// anchor for batch-hard). Never O(N^3).
#[derive(Clone, Debug)]
pub struct TripletSaved {
    pub(crate) rows: usize,
    pub(crate) opts: TripletOptions,
    pub(crate) coefs: cpu::triplet::Coefs,
}

/// Result of [`triplet_forward`].
#[derive(Clone, Debug)]
pub struct TripletForward {
    pub loss: f64,
    /// batch_all: triplets with a positive loss; batch_hard: anchors with a positive and a
    /// negative; semi_hard: positive pairs whose anchor has a negative.
    pub count: u64,
    pub stats: TripletStats,
    pub saved: TripletSaved,
}

/// Loss, gradient and counts of [`triplet`].
#[derive(Clone, Debug)]
pub struct TripletOutput {
    pub loss: f64,
    pub count: u64,
    pub stats: TripletStats,
    pub grad_x: Tensor,
}

/// Validates the inputs and returns `(rows, dim)`.
fn validate(x: &Tensor, labels: &[i64], opts: &TripletOptions) -> Result<(usize, usize)> {
    let (rows, dim) = matrix_dims(OP, "x", x)?;
    check_labels_len(OP, "labels", labels, rows)?;
    // Mining keeps the N x N pair matrix (never N^3): it must be addressable.
    crate::tensor::checked_numel(OP, "x", &[rows, rows], DType::F64)?;
    if !(opts.margin.is_finite() && opts.margin >= 0.0) {
        return Err(Error::invalid(
            OP,
            "margin",
            format!("{} must be finite and >= 0", opts.margin),
        ));
    }
    check_finite(OP, "x", x)?;
    Ok((rows, dim))
}

/// Uploads `x` (as f32) and dense class ids of `labels` (as i32) to a kernel backend.
fn upload<B: Backend>(b: &B, x: &Tensor, labels: &[i64]) -> Result<[B::Buf; 2]> {
    let (class_ids, _) = Classes::new(labels, 1).for_kernels();
    Ok([
        b.upload("x", &values::<f32>(x))?,
        b.upload_i32("labels", &class_ids)?,
    ])
}

/// The kernel problem over uploaded `[x, labels]`.
fn kernel_problem<'a, B: Backend>(
    buffers: &'a [B::Buf; 2],
    (rows, dim): (usize, usize),
    opts: &TripletOptions,
) -> kernels::triplet::Problem<'a, B> {
    kernels::triplet::Problem {
        x: &buffers[0],
        labels: &buffers[1],
        rows,
        dim,
        distance: opts.distance,
        mining: opts.mining,
        margin: opts.margin,
    }
}

/// Triplet forward over embeddings `x` (N x D) with one label per row: the loss, its count, the
/// hard / semi-hard / easy split of all valid triplets, and what [`triplet_backward`] needs.
pub fn triplet_forward(
    x: &Tensor,
    labels: &[i64],
    opts: &TripletOptions,
) -> Result<TripletForward> {
    let (rows, dim) = validate(x, labels, opts)?;
    run_on_kernels!(x.device(), b => {
        let buffers = upload(b, x, labels)?;
        let fwd = kernel_problem(&buffers, (rows, dim), opts).forward(b)?;
        Ok(TripletForward {
            loss: fwd.loss,
            count: fwd.count,
            stats: fwd.stats,
            saved: TripletSaved { rows, opts: *opts, coefs: fwd.coefs },
        })
    });
    let xv = values::<f64>(x);
    let fwd = cpu::triplet::Problem {
        x: &xv,
        rows,
        dim,
        labels,
        distance: opts.distance,
        mining: opts.mining,
        margin: opts.margin,
    }
    .forward();
    Ok(TripletForward {
        loss: fwd.loss,
        count: fwd.count,
        stats: fwd.stats,
        saved: TripletSaved {
            rows,
            opts: *opts,
            coefs: fwd.coefs,
        },
    })
}

/// Triplet backward: the gradient of `grad_loss * loss` with respect to `x`. Pass the `x`,
/// `labels` and `opts` of the forward that produced `saved`.
pub fn triplet_backward(
    x: &Tensor,
    labels: &[i64],
    opts: &TripletOptions,
    saved: &TripletSaved,
    grad_loss: f64,
) -> Result<Tensor> {
    let (rows, dim) = validate(x, labels, opts)?;
    if saved.rows != rows {
        return Err(Error::invalid(
            OP,
            "saved",
            format!("it comes from a batch of {} rows, x has {rows}", saved.rows),
        ));
    }
    if saved.opts != *opts {
        return Err(Error::invalid(
            OP,
            "saved",
            format!("it comes from options {:?}, not {opts:?}", saved.opts),
        ));
    }
    check_finite_scalar(OP, "grad_loss", grad_loss)?;
    run_on_kernels!(x.device(), b => {
        let buffers = upload(b, x, labels)?;
        let grad = kernel_problem(&buffers, (rows, dim), opts).backward(b, &saved.coefs, grad_loss)?;
        Ok(output_like(x, b.download(&grad)?, x.shape()))
    });
    let xv = values::<f64>(x);
    let grad = cpu::triplet::backward(&xv, rows, dim, opts.distance, &saved.coefs, grad_loss);
    Ok(output_like(x, grad, x.shape()))
}

/// Triplet loss, gradient and counts in one call.
///
/// ```
/// use contra::{triplet, Device, Distance, Mining, Tensor, TripletOptions};
/// // Two classes on a line: 0.0 and 0.1 are class 7, 1.0 and 0.5 are class 9.
/// let x = Tensor::from_vec(vec![0.0f64, 0.1, 1.0, 0.5], &[4, 1], Device::Cpu)?;
/// let opts = TripletOptions { distance: Distance::Euclidean, mining: Mining::BatchHard, margin: 0.2 };
/// let out = triplet(&x, &[7, 7, 9, 9], &opts)?;
/// // Anchor 0.5: hardest positive 1.0 (0.5 away), hardest negative 0.1 (0.4 away).
/// assert!((out.loss - (0.5 - 0.4 + 0.2) / 4.0).abs() < 1e-12);
/// assert_eq!(out.count, 4);
/// assert_eq!(out.grad_x.shape(), &[4, 1]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn triplet(x: &Tensor, labels: &[i64], opts: &TripletOptions) -> Result<TripletOutput> {
    let fwd = triplet_forward(x, labels, opts)?;
    let grad_x = triplet_backward(x, labels, opts, &fwd.saved, 1.0)?;
    Ok(TripletOutput {
        loss: fwd.loss,
        count: fwd.count,
        stats: fwd.stats,
        grad_x,
    })
}
