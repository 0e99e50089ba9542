//! Similarity / distance matrices between the rows of two matrices. This op builds the N x M
//! matrix by definition; the losses never call it.

use super::{
    check_finite, kernel_output, matrix_dims, output_like, same_place, same_width, upload_features,
    values, with_cpu_real,
};
use crate::kernels::{self, run_on_kernels};
use crate::{cpu, DType, Error, Result, Tensor};

pub use crate::shared::Similarity;

const OP: &str = "similarity";

/// The `N x M` matrix of `kind` scores between the rows of `a` (N x D) and `b` (M x D), in the
/// dtype of the inputs (f32, bf16 and f16 compute in f32).
///
/// Distances use `||a||^2 + ||b||^2 - 2 a.b`, clamped at 0, with the dot products from one GEMM.
///
/// Every score is right at any input scale (rows of norm 1e20 or 1e38 in f32, 1e300 in f64): the
/// backends rescale rows by powers of two where a sum could overflow. A score whose exact value is
/// beyond the output's range (a squared distance or dot product above `f32::MAX` for f32 / bf16 /
/// f16 inputs, or above the 16-bit output's own range) is an error naming `a`.
///
/// ```
/// use contra::{similarity, Device, Similarity, Tensor};
/// let a = Tensor::from_vec(vec![1.0f64, 0.0, 0.0, 2.0], &[2, 2], Device::Cpu)?;
/// let b = Tensor::from_vec(vec![3.0f64, 4.0], &[1, 2], Device::Cpu)?;
/// let dot = similarity(&a, &b, Similarity::Dot)?;
/// assert_eq!(dot.shape(), &[2, 1]);
/// assert_eq!(dot.to_vec::<f64>()?, vec![3.0, 8.0]);
/// let dist = similarity(&a, &b, Similarity::Euclidean)?.to_vec::<f64>()?;
/// assert!((dist[0] - 20f64.sqrt()).abs() < 1e-12);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn similarity(a: &Tensor, b: &Tensor, kind: Similarity) -> Result<Tensor> {
    let (rows, dim) = matrix_dims(OP, "a", a)?;
    let cols = same_width(OP, "b", b, "M", "a", dim)?;
    same_place(OP, &[("a", a), ("b", b)])?;
    // The N x M output must be addressable before anything is allocated.
    crate::tensor::checked_numel(OP, "b", &[rows, cols], a.dtype())?;
    check_finite(OP, "a", a)?;
    check_finite(OP, "b", b)?;
    let out = similarity_unchecked(a, b, (rows, cols, dim), kind)?;
    match out.first_non_finite()? {
        None => Ok(out),
        Some((at, _)) => Err(Error::invalid(
            OP,
            "a",
            format!(
                "the {kind:?} score of a row {} and b row {} overflows {} (the exact value is \
                 beyond its range{})",
                at / cols,
                at % cols,
                out.dtype(),
                match out.dtype() {
                    DType::F64 => "",
                    _ => "; f32, bf16 and f16 inputs compute in f32",
                }
            ),
        )),
    }
}

/// The score matrix; a score beyond the output's range comes back infinite.
fn similarity_unchecked(
    a: &Tensor,
    b: &Tensor,
    (rows, cols, dim): (usize, usize, usize),
    kind: Similarity,
) -> Result<Tensor> {
    run_on_kernels!(a.device(), k => {
        let (ab, bb) = (upload_features(k, "a", a)?, upload_features(k, "b", b)?);
        let out = kernels::similarity::forward(k, &ab, &bb, (rows, cols, dim), kind)?;
        kernel_output(k, a, out, &[rows, cols])
    });
    with_cpu_real!(a.dtype(), T => {
        let s = cpu::similarity::similarity::<T>(&values::<T>(a)?, &values::<T>(b)?, rows, cols, dim, kind);
        output_like(a, s, &[rows, cols])
    })
}
