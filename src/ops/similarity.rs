//! Similarity / distance matrices between the rows of two matrices. This op builds the N x M
//! matrix by definition; the losses never call it.

use crate::{Result, Tensor};

/// Which pairwise score to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Similarity {
    /// `a_i . b_j`
    Dot,
    /// `norm(a_i) . norm(b_j)`
    Cosine,
    /// `||a_i - b_j||^2`
    SquaredEuclidean,
    /// `sqrt(max(||a_i - b_j||^2, 1e-12))`
    Euclidean,
}

/// The `N x M` matrix of `kind` scores between the rows of `a` (N x D) and `b` (M x D).
pub fn similarity(a: &Tensor, b: &Tensor, kind: Similarity) -> Result<Tensor> {
    let _ = (a, b, kind);
    todo!("similarity")
}
