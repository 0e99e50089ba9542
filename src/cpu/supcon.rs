//! Supervised contrastive loss (Khosla et al., contrast_mode "all") on the tiled softmax core.
//!
//! The N x V x D features are N·V normalized rows (row `n * V + v` is view `v` of sample `n`);
//! each row is an anchor against all the others (self masked); its positives are the other rows
//! with the same label, each weighted `1 / |P(a)|` in the target.

use super::softmax::{self, RowStats, Scores, Targets, STRIP_MAX_COLS};
use super::{normalize, Real};
use crate::shared::Classes;

/// One SupCon problem. Sizes are validated by the caller.
#[derive(Clone, Copy)]
pub struct Problem<'a, T> {
    /// Features, (samples · views) x dim, sample-major.
    pub features: &'a [T],
    /// One label per sample.
    pub labels: &'a [i64],
    pub samples: usize,
    pub views: usize,
    pub dim: usize,
    pub temperature: f64,
    pub base_temperature: f64,
    pub reduction: crate::ops::supcon::SupConReduction,
}

impl<T: Real> Problem<'_, T> {
    fn rows(&self) -> usize {
        self.samples * self.views
    }

    /// `tau / base_tau / anchors`: the weight of each anchor's term in the mean (0 where the
    /// reduction makes the loss 0).
    fn anchor_weight(&self, classes: &Classes) -> f64 {
        self.temperature / self.base_temperature / self.reduction.anchors(classes)
    }

    fn with_scores<R>(&self, f: impl FnOnce(&Scores<'_, T>, &Classes) -> R) -> R {
        let zn = normalize::forward(self.features, self.dim);
        let classes = Classes::new(self.labels, self.views);
        f(
            &Scores {
                queries: &zn,
                keys: &zn,
                rows: self.rows(),
                cols: self.rows(),
                dim: self.dim,
                scale: 1.0 / self.temperature,
                self_mask: true,
            },
            &classes,
        )
    }

    /// The mean loss over the N·V anchors and the per-anchor log-sum-exp over `j != a`.
    pub fn forward(&self) -> (f64, Vec<f64>) {
        self.with_scores(|s, classes| {
            let stats = softmax::forward(s, None, classes, false);
            let total = anchor_total(&stats, classes);
            // A single anchor has nothing to contrast with: its LSE is -inf, and it has no
            // positive either, so its (unused) saved value is set to 0.
            let lse = stats
                .lse
                .into_iter()
                .map(|l| if l.is_finite() { l } else { 0.0 })
                .collect();
            (total * self.anchor_weight(classes), lse)
        })
    }

    /// The gradient of `grad_loss * loss` with respect to the features.
    pub fn backward(&self, lse: &[f64], grad_loss: f64) -> Vec<T> {
        let dzn = self.with_scores(|s, classes| {
            let weight = self.row_weights(classes, grad_loss);
            view_grads(softmax::backward(s, lse, None, &weight, classes, true))
        });
        normalize::backward(self.features, &dzn, self.dim)
    }

    /// Loss and the feature gradient of `grad_loss * loss` in one sweep (see
    /// [`softmax::forward_backward`]); two sweeps when the views are too many for a row strip.
    pub fn forward_backward(&self, grad_loss: f64) -> (f64, Vec<T>) {
        if self.rows() > STRIP_MAX_COLS {
            let (loss, lse) = self.forward();
            return (loss, self.backward(&lse, grad_loss));
        }
        let (loss, dzn) = self.with_scores(|s, classes| {
            let weight = self.row_weights(classes, grad_loss);
            let (stats, grads) = softmax::forward_backward(s, None, &weight, classes, true);
            (
                anchor_total(&stats, classes) * self.anchor_weight(classes),
                view_grads(grads),
            )
        });
        let dz = normalize::backward(self.features, &dzn, self.dim);
        (loss, dz)
    }

    /// `grad_loss * anchor_weight` for anchors with positives, 0 for the others.
    fn row_weights(&self, classes: &Classes, grad_loss: f64) -> Vec<f64> {
        let w = grad_loss * self.anchor_weight(classes);
        (0..self.rows())
            .map(|a| if classes.has_positive(a) { w } else { 0.0 })
            .collect()
    }
}

/// The sum of `lse_a - target_logit_a` over the anchors with positives.
fn anchor_total(stats: &RowStats, classes: &Classes) -> f64 {
    (0..stats.lse.len())
        .filter(|&a| classes.has_positive(a))
        .map(|a| stats.lse[a] - stats.target_logit[a])
        .sum()
}

/// The views are both the queries and the keys: their gradient is the sum of the two.
fn view_grads<T: Real>(grads: softmax::Grads<T>) -> Vec<T> {
    let mut dz = grads.queries;
    for (x, &y) in dz.iter_mut().zip(grads.keys.as_deref().unwrap_or_default()) {
        *x += y;
    }
    dz
}

/// The positives of anchor `i` are the other views with its label, each weighted `1 / |P(i)|`.
impl Targets for Classes {
    fn visit(&self, i: usize, cols: std::ops::Range<usize>, f: &mut dyn FnMut(usize, f64)) {
        if self.inv_positives[i] == 0.0 {
            return;
        }
        for j in cols {
            if j != i && self.class[j] == self.class[i] {
                f(j, self.inv_positives[i]);
            }
        }
    }
}
