//! The element loops of the softmax and SigLIP sweeps, each compiled three times (for AVX-512,
//! for AVX2 + FMA and for baseline x86-64) with the best one the CPU has chosen at run time. The
//! crate builds for baseline x86-64, whose SSE2 has a quarter of AVX-512's lanes, and after the
//! GEMMs these loops are the sweeps' time (CLIP's backward at N = 1024 on a 2-core EPYC: 4.4 ms
//! with the baseline loops, 4.0 ms with AVX2, 3.6 ms with AVX-512).

use super::{lane_sum, Real};

/// Compiles the function for the wider x86-64 vector extensions as well, dispatching at run time.
macro_rules! dispatched {
    ($($item:item)*) => {
        $(
            #[multiversion::multiversion(targets(
                "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
                "x86_64+avx2+fma",
            ))]
            $item
        )*
    };
}
pub(crate) use dispatched;

dispatched! {
    /// The largest value of `row` (-inf for an empty row).
    pub fn row_max<T: Real>(row: &[T]) -> T {
        row.iter().fold(T::neg_infinity(), |m, &x| m.max(x))
    }

    /// `x <- exp(x - shift)` over `row`, returning the sum of the results.
    pub fn exp_shifted_sum<T: Real>(row: &mut [T], shift: T) -> T {
        for x in row.iter_mut() {
            *x = (*x - shift).exp_fast();
        }
        lane_sum(row)
    }

    /// `x <- weight * exp(x - shift)` over `row`.
    pub fn weighted_exp<T: Real>(row: &mut [T], shift: T, weight: T) {
        for x in row.iter_mut() {
            *x = weight * (*x - shift).exp_fast();
        }
    }

    /// `max[c] <- max(max[c], x)` for every row of `tile` (rows of `max.len()` values).
    pub fn column_max<T: Real>(tile: &[T], max: &mut [T]) {
        for row in tile.chunks_exact(max.len()) {
            for (m, &x) in max.iter_mut().zip(row) {
                *m = m.max(x);
            }
        }
    }

    /// `sums[c] += exp(x - shift[c])` for every row of `tile` (rows of `sums.len()` values).
    pub fn column_exp_sums<T: Real>(tile: &[T], shift: &[T], sums: &mut [T]) {
        for row in tile.chunks_exact(sums.len()) {
            for ((acc, &x), &m) in sums.iter_mut().zip(row).zip(shift) {
                *acc += (x - m).exp_fast();
            }
        }
    }
}
