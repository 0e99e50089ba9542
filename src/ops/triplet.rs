//! Triplet margin loss with batch-all, batch-hard and semi-hard mining over a labelled batch.

use crate::{Result, Tensor};

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
        TripletOptions { distance: Distance::Euclidean, mining: Mining::BatchHard, margin: 0.2 }
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

/// What the backward needs from the forward (the mined triplets and their weights).
#[derive(Clone, Debug)]
pub struct TripletSaved {
    pub(crate) inner: (),
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

/// Triplet forward over embeddings `x` (N x D) with one label per row.
pub fn triplet_forward(x: &Tensor, labels: &[i64], opts: &TripletOptions) -> Result<TripletForward> {
    let _ = (x, labels, opts);
    todo!()
}

/// Triplet backward: the gradient of `grad_loss * loss` with respect to `x`.
pub fn triplet_backward(
    x: &Tensor,
    labels: &[i64],
    opts: &TripletOptions,
    saved: &TripletSaved,
    grad_loss: f64,
) -> Result<Tensor> {
    let _ = (x, labels, opts, saved, grad_loss);
    todo!()
}

/// Triplet loss, gradient and counts in one call.
pub fn triplet(x: &Tensor, labels: &[i64], opts: &TripletOptions) -> Result<TripletOutput> {
    let _ = (x, labels, opts);
    todo!()
}
