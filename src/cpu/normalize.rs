//! Row-wise L2 normalization, forward and backward.

use rayon::prelude::*;

use super::{row_norm, Real, NORM_EPS};

/// `y = x / max(||x||, eps)` for each row of `x` (rows of length `dim`).
///
/// The norm is an f64 that is right at any scale ([`row_norm`]), and `y` is formed in f64 before
/// its rounding to `T`: a huge row's reciprocal norm may be subnormal in `T` (f32 rows of norm
/// above ~1e38), or in f64 itself (norms above 2^1000), where the division is kept.
pub fn forward<T: Real>(x: &[T], dim: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(y_row, x_row)| {
            let norm = row_norm(x_row).max(NORM_EPS);
            if norm < HUGE_NORM {
                let inv = 1.0 / norm;
                for (out, &v) in y_row.iter_mut().zip(x_row) {
                    *out = T::of(v.f64() * inv);
                }
            } else {
                for (out, &v) in y_row.iter_mut().zip(x_row) {
                    *out = T::of(v.f64() / norm);
                }
            }
        });
    y
}

/// 2^1000: from here on a norm's f64 reciprocal nears the subnormal range.
const HUGE_NORM: f64 = 1.0715086071862673e301;

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
