//! Dense similarity / distance matrices between the rows of two matrices: one GEMM for the dot
//! products, then an elementwise pass. Row tiles of the output run in parallel.

use rayon::prelude::*;

use super::gemm::{Gemm, MatRef};
use super::{exponent, max_abs, normalize, row_norm, Real, ROW_TILE};
use crate::shared::{ldexp, Similarity, DIST_EPS};

/// The `rows x cols` matrix of `kind` scores between the rows of `a` (rows x dim) and `b`
/// (cols x dim). Sizes are validated by the caller.
///
/// Squared euclidean distances are `max(|a|^2 + |b|^2 - 2 a.b, 0)` (norms accumulated in f64);
/// euclidean distances are `sqrt(max(squared, 1e-12))`.
///
/// Overflow: cosine similarities come from rows normalized at any scale. The other kinds run the
/// GEMM in `T` while every row norm is below `sqrt(T::MAX) / 4` (then no dot product, partial sum
/// or squared distance can overflow); otherwise the whole matrix is computed in f64 from rows
/// scaled by powers of two ([`similarity_scaled`]). A score beyond `T`'s range comes back as an
/// infinity, which the op turns into an error.
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
    let norms = |x: &[T]| -> Vec<f64> { x.par_chunks(dim).map(row_norm).collect() };
    if kind != Similarity::Cosine {
        let limit = T::max_value().f64().sqrt() / 4.0;
        let fits = |n: &[f64]| n.iter().all(|&v| v < limit);
        let (a_norms, b_norms) = (norms(a), norms(b));
        if !(fits(&a_norms) && fits(&b_norms)) {
            return similarity_scaled(a, b, rows, cols, dim, kind)
                .into_iter()
                .map(T::of)
                .collect();
        }
        if kind != Similarity::Dot {
            let squares = |n: Vec<f64>| n.into_iter().map(|v| v * v).collect();
            return gemm_pass(
                a,
                b,
                rows,
                cols,
                dim,
                kind,
                squares(a_norms),
                squares(b_norms),
            );
        }
    }
    gemm_pass(a, b, rows, cols, dim, kind, Vec::new(), Vec::new())
}

/// The GEMM and the elementwise pass; `a_sq` / `b_sq` (the rows' squared norms) are empty for the
/// dot product and the cosine.
#[allow(clippy::too_many_arguments)]
fn gemm_pass<T: Real>(
    a: &[T],
    b: &[T],
    rows: usize,
    cols: usize,
    dim: usize,
    kind: Similarity,
    a_sq: Vec<f64>,
    b_sq: Vec<f64>,
) -> Vec<T> {
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

/// Dot products and (squared) euclidean distances in f64 at any scale: each row is scaled by
/// `2^-e` with `e` its largest magnitude's exponent (exact: the scaled row's entries are below 1),
/// the scaled rows meet in one f64 GEMM, and each score is put together from the scaled parts:
/// `a.b = (a'.b') 2^(ea + eb)`, and a squared distance in the units of its pair's larger exponent
/// `E = max(ea, eb)`, which cannot overflow:
/// `|a - b|^2 2^-2E = |a'|^2 2^(2(ea - E)) + |b'|^2 2^(2(eb - E)) - 2 (a'.b') 2^(ea + eb - 2E)`.
/// Used when a score, or a partial sum on the way to it, could overflow the compute type.
pub fn similarity_scaled<T: Real>(
    a: &[T],
    b: &[T],
    rows: usize,
    cols: usize,
    dim: usize,
    kind: Similarity,
) -> Vec<f64> {
    // A zero row's exponent: below any pair partner's, so it never sets a pair's scale.
    const ZERO_ROW: i32 = -4000;
    let scale_rows = |x: &[T]| -> (Vec<f64>, Vec<i32>, Vec<f64>) {
        let parts: Vec<(Vec<f64>, i32, f64)> = x
            .par_chunks(dim)
            .map(|row| {
                let max = max_abs(row);
                let e = if max > 0.0 { exponent(max) } else { ZERO_ROW };
                let scaled: Vec<f64> = row.iter().map(|&v| ldexp(v.f64(), -e)).collect();
                let sq = scaled.iter().map(|v| v * v).sum();
                (scaled, e, sq)
            })
            .collect();
        let mut values = Vec::with_capacity(x.len());
        let (mut exps, mut sqs) = (Vec::new(), Vec::new());
        for (scaled, e, sq) in parts {
            values.extend(scaled);
            exps.push(e);
            sqs.push(sq);
        }
        (values, exps, sqs)
    };
    let (a_s, ea, a_sq) = scale_rows(a);
    let (b_s, eb, b_sq) = scale_rows(b);
    let b_t = MatRef::row_major(&b_s, cols, dim).t();
    let mut out = vec![0.0f64; rows * cols];
    out.par_chunks_mut(ROW_TILE * cols)
        .enumerate()
        .for_each(|(tile, block)| {
            let r0 = tile * ROW_TILE;
            let len = block.len() / cols;
            let a_tile = MatRef::row_major(&a_s[r0 * dim..(r0 + len) * dim], len, dim);
            f64::gemm(1.0, a_tile, b_t, 0.0, block);
            for (i, row) in block.chunks_mut(cols).enumerate() {
                let (ei, si) = (ea[r0 + i], a_sq[r0 + i]);
                for (j, out) in row.iter_mut().enumerate() {
                    let (ej, sj, dot) = (eb[j], b_sq[j], *out);
                    if kind == Similarity::Dot {
                        *out = ldexp(dot, ei + ej);
                        continue;
                    }
                    let e = ei.max(ej);
                    let sq_scaled = (ldexp(si, 2 * (ei - e)) + ldexp(sj, 2 * (ej - e))
                        - 2.0 * ldexp(dot, ei + ej - 2 * e))
                    .max(0.0);
                    let sq = ldexp(sq_scaled, 2 * e);
                    *out = match kind {
                        Similarity::Euclidean if sq.is_finite() => sq.max(DIST_EPS).sqrt(),
                        Similarity::Euclidean => ldexp(sq_scaled.sqrt(), e),
                        _ => sq,
                    };
                }
            }
        });
    out
}
