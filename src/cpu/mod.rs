//! The CPU backend: plain Rust on all cores. It is the oracle the kernels are checked against and
//! what a machine without a GPU runs. Softmax-style losses never build an N x N matrix: they walk
//! row tiles (in parallel) and key tiles (in order), keeping a running max and log-sum-exp, and the
//! backward recomputes the probabilities tile by tile.
//!
//! Functions here take plain slices with their sizes already validated by `crate::ops`.

pub mod clip;
pub mod gemm;
pub mod infonce;
pub mod margin;
pub mod moco;
pub mod momentum;
pub mod nce;
pub mod normalize;
pub mod similarity;
pub mod softmax;
pub mod supcon;
pub mod triplet;

use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

use crate::tensor::Element;

/// The float types the CPU backend computes in (f32 and f64).
pub trait Real:
    Element + num_traits::Float + gemm::Gemm + Sum + AddAssign + SubAssign + MulAssign + Default
{
    fn of(value: f64) -> Self {
        <Self as Element>::from_f64(value)
    }
    fn f64(self) -> f64 {
        <Self as Element>::to_f64(self)
    }
}

impl Real for f32 {}
impl Real for f64 {}

/// Rows per parallel task in the tiled losses: big enough to amortize GEMM packing, small enough
/// that N / ROW_TILE tasks keep every core busy.
pub const ROW_TILE: usize = 128;
/// Keys per tile: one `ROW_TILE x KEY_TILE` score block stays in L2.
pub const KEY_TILE: usize = 512;

/// `norm(x) = max(||x||_2, 1e-12)` as the losses define it.
pub const NORM_EPS: f64 = 1e-12;

/// Euclidean norm of a row, accumulated in f64.
pub fn row_norm<T: Real>(row: &[T]) -> f64 {
    row.iter().map(|&v| v.f64() * v.f64()).sum::<f64>().sqrt()
}

/// Dot product accumulated in f64.
pub fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.f64() * y.f64()).sum()
}

/// `log(1 + exp(x))` without overflow.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// The logistic function.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}
