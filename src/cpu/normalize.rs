//! Row-wise L2 normalization, forward and backward.

use rayon::prelude::*;

use super::{row_norm, Real, NORM_EPS};

/// `y = x / max(||x||, eps)` for each row of `x` (rows of length `dim`).
pub fn forward<T: Real>(x: &[T], dim: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(y_row, x_row)| {
            let inv = T::of(1.0 / row_norm(x_row).max(NORM_EPS));
            for (out, &v) in y_row.iter_mut().zip(x_row) {
                *out = v * inv;
            }
        });
    y
}

/// `dx = (dy - y (y . dy)) / max(||x||, eps)` for each row.
pub fn backward<T: Real>(x: &[T], grad_y: &[T], dim: usize) -> Vec<T> {
    let mut grad_x = vec![T::zero(); x.len()];
    grad_x
        .par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(grad_y.par_chunks(dim)))
        .for_each(|(gx, (x_row, gy))| backward_row(x_row, gy, gx));
    grad_x
}

/// The backward of one row; also used by the losses that normalize inside.
pub fn backward_row<T: Real>(x_row: &[T], grad_y: &[T], grad_x: &mut [T]) {
    let norm = row_norm(x_row).max(NORM_EPS);
    let y_dot_dy: f64 = x_row
        .iter()
        .zip(grad_y)
        .map(|(&x, &g)| x.f64() / norm * g.f64())
        .sum();
    for ((out, &x), &g) in grad_x.iter_mut().zip(x_row).zip(grad_y) {
        *out = T::of((g.f64() - x.f64() / norm * y_dot_dy) / norm);
    }
}
