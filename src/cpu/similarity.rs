//! Dense similarity / distance matrices between the rows of two matrices: one GEMM for the dot
//! products, then an elementwise pass. Row tiles of the output run in parallel.

use rayon::prelude::*;

use super::gemm::MatRef;
use super::triplet::DIST_EPS;
use super::{normalize, row_norm, Real, ROW_TILE};
use crate::ops::similarity::Similarity;

/// The `rows x cols` matrix of `kind` scores between the rows of `a` (rows x dim) and `b`
/// (cols x dim). Sizes are validated by the caller.
///
/// Squared euclidean distances are `max(|a|^2 + |b|^2 - 2 a.b, 0)` (norms accumulated in f64);
/// euclidean distances are `sqrt(max(squared, 1e-12))`.
pub fn similarity<T: Real>(
    a: &[T],
    b: &[T],
    rows: usize,
    cols: usize,
    dim: usize,
    kind: Similarity,
) -> Vec<T> {
    let (an, bn);
    let (a, b) = if kind == Similarity::Cosine {
        an = normalize::forward(a, dim);
        bn = normalize::forward(b, dim);
        (&an[..], &bn[..])
    } else {
        (a, b)
    };
    let squared_norms = |x: &[T]| -> Vec<f64> {
        x.par_chunks(dim)
            .map(|row| {
                let n = row_norm(row);
                n * n
            })
            .collect()
    };
    let (a_sq, b_sq) = match kind {
        Similarity::SquaredEuclidean | Similarity::Euclidean => {
            (squared_norms(a), squared_norms(b))
        }
        Similarity::Dot | Similarity::Cosine => (Vec::new(), Vec::new()),
    };
    let b_t = MatRef::row_major(b, cols, dim).t();
    let mut out = vec![T::zero(); rows * cols];
    out.par_chunks_mut(ROW_TILE * cols)
        .enumerate()
        .for_each(|(tile, block)| {
            let r0 = tile * ROW_TILE;
            let len = block.len() / cols;
            let a_tile = MatRef::row_major(&a[r0 * dim..(r0 + len) * dim], len, dim);
            T::gemm(T::one(), a_tile, b_t, T::zero(), block);
            if a_sq.is_empty() {
                return;
            }
            for (i, row) in block.chunks_mut(cols).enumerate() {
                let ai = a_sq[r0 + i];
                for (out, &bj) in row.iter_mut().zip(&b_sq) {
                    let sq = (ai + bj - 2.0 * out.f64()).max(0.0);
                    *out = T::of(match kind {
                        Similarity::Euclidean => sq.max(DIST_EPS).sqrt(),
                        _ => sq,
                    });
                }
            }
        });
    out
}
