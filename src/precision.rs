//! How the softmax losses multiply f32 operands: exactly on CUDA cores, or as TF32 on tensor
//! cores (PyTorch's `allow_tf32`, JAX's `default_matmul_precision`).
//!
//! The setting applies to the similarity products inside the InfoNCE family (InfoNCE, NT-Xent,
//! CLIP, MoCo, SupCon) and SigLIP, forward and backward, when their operands are f32 and they
//! run on kernels (a GPU, or the interpreted mode that emulates one). bf16 / f16 operands always
//! use their own tensor cores; the CPU backend always computes exactly; every other op (norms,
//! the similarity matrix, the triplet and margin losses) is exact f32.
//!
//! The default is [`F32Precision::Highest`]. A thread can override the process-wide default for
//! the length of a closure:
//!
//! ```
//! use contra::{with_f32_precision, F32Precision, NtXentOptions, Tensor, Device};
//!
//! // On a GPU (or the interpreted mode, as here) the products run on the TF32 tensor cores.
//! let z = Tensor::from_vec(vec![0.3f32, -1.0, 0.5, 0.25, 1.0, 0.5, -0.5, 2.0], &[4, 2], Device::Interp)?;
//! let out = with_f32_precision(F32Precision::Tf32, || contra::ntxent(&z, &NtXentOptions::default()))?;
//! assert!(out.loss.to_scalar()?.is_finite());
//! # Ok::<(), contra::Error>(())
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// The arithmetic of an f32 similarity product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum F32Precision {
    /// Exact f32 fused multiply-adds on CUDA cores: every product and sum rounded to f32.
    #[default]
    Highest,
    /// Each operand rounded to TF32 (f32's 8-bit exponent, 10 of its 23 mantissa bits; to
    /// nearest, ties away from zero), products on the tensor cores with f32 accumulation. A dot
    /// product of two rows carries a relative error of about 2^-10 per term, so a logit `q.k / tau`
    /// of unit rows is off by up to about 1e-3 / tau; losses and gradients come out within about
    /// 5e-3 of the exact ones (relative norm; `docs/kernels.md` gives the measured errors).
    /// Several times the f32 throughput on an A100 or H100.
    Tf32,
}

impl F32Precision {
    fn code(self) -> u8 {
        match self {
            F32Precision::Highest => 0,
            F32Precision::Tf32 => 1,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => F32Precision::Tf32,
            _ => F32Precision::Highest,
        }
    }
}

/// The process-wide default (an [`F32Precision`] code).
static DEFAULT: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// This thread's override, set by [`with_f32_precision`] for the length of its closure.
    static OVERRIDE: Cell<Option<F32Precision>> = const { Cell::new(None) };
}

/// Sets the process-wide default precision of f32 similarity products (threads inside
/// [`with_f32_precision`] keep their own).
pub fn set_f32_precision(precision: F32Precision) {
    DEFAULT.store(precision.code(), Ordering::Relaxed);
}

/// The precision that an op started on this thread now would use.
pub fn f32_precision() -> F32Precision {
    OVERRIDE
        .with(Cell::get)
        .unwrap_or_else(|| F32Precision::from_code(DEFAULT.load(Ordering::Relaxed)))
}

/// Runs `work` with f32 similarity products at `precision` on this thread, then restores the
/// previous setting (also when `work` panics). Other threads are not affected.
pub fn with_f32_precision<R>(precision: F32Precision, work: impl FnOnce() -> R) -> R {
    struct Restore(Option<F32Precision>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(precision))));
    work()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_precision_nests_and_restores() {
        assert_eq!(f32_precision(), F32Precision::Highest);
        with_f32_precision(F32Precision::Tf32, || {
            assert_eq!(f32_precision(), F32Precision::Tf32);
            with_f32_precision(F32Precision::Highest, || {
                assert_eq!(f32_precision(), F32Precision::Highest)
            });
            assert_eq!(f32_precision(), F32Precision::Tf32);
        });
        assert_eq!(f32_precision(), F32Precision::Highest);
    }

    #[test]
    fn a_panic_inside_restores_the_setting() {
        let caught = std::panic::catch_unwind(|| {
            with_f32_precision(F32Precision::Tf32, || panic!("inside"))
        });
        assert!(caught.is_err());
        assert_eq!(f32_precision(), F32Precision::Highest);
    }
}
