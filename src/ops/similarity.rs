//! Similarity / distance matrices between the rows of two matrices. This op builds the N x M
//! matrix by definition; the losses never call it.

use super::{
    check_host_finite, kernel_output, matrix_dims, output_like, same_place, same_width,
    upload_features, values, with_cpu_real,
};
use crate::checks::Recorder;
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
    check_host_finite(OP, "a", a)?;
    check_host_finite(OP, "b", b)?;
    run_on_kernels!(a.device(), k => {
        let mut rec = Recorder::new(k, OP)?;
        let (ab, bb) = (upload_features(k, "a", a)?, upload_features(k, "b", b)?);
        rec.input("a", a, &ab)?;
        rec.input("b", b, &bb)?;
        let out = kernels::similarity::forward(k, &ab, &bb, (rows, cols, dim), kind)?;
        // The scores in the output's dtype (in f32 for f64, which holds them all): a score
        // beyond its range is an error when read.
        if a.dtype() == DType::F64 {
            rec.result("scores", overflow_blame(DType::F32), &out, cols)?;
        }
        let out = kernel_output(k, a, out, &[rows, cols])?;
        if a.dtype() != DType::F64 {
            rec.result_tensor("scores", overflow_blame(a.dtype()), &out)?;
        }
        let checks = rec.finish()?;
        Ok(out.with_checks(&checks))
    });
    let out = with_cpu_real!(a.dtype(), T => {
        let s = cpu::similarity::similarity::<T>(&values::<T>(a)?, &values::<T>(b)?, rows, cols, dim, kind);
        output_like(a, s, &[rows, cols])?
    });
    match out.first_non_finite()? {
        None => Ok(out),
        Some((at, _)) => Err(Error::Overflow {
            op: OP,
            what: "scores",
            reason: format!(
                "the {kind:?} score of a row {} and b row {} is not finite; {}",
                at / cols,
                at % cols,
                overflow_blame(out.dtype())
            ),
        }),
    }
}

/// What a score beyond the output's range is blamed on (the device check names its row).
fn overflow_blame(dtype: DType) -> &'static str {
    match dtype {
        DType::F64 => "a score overflows f64 (the exact value is beyond its range)",
        _ => {
            "a score overflows the output's dtype (the exact value is beyond its range; f32, \
              bf16 and f16 inputs compute in f32)"
        }
    }
}
