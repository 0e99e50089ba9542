//! The unfused GPU baseline: the kernel sequence of an eager framework, on the same
//! device-resident inputs as contra's fused kernels (NT-Xent and InfoNCE):
//!
//! - forward: normalize the rows (our kernel); the logits `S = q k^T / tau` as one GEMM (cuBLAS
//!   on a GPU) into a materialized `rows x cols` matrix; log-softmax over each row; the negative
//!   log-likelihood gather;
//! - backward: `G = (softmax - onehot) / rows` in place; `dq = G k / tau` (NT-Xent:
//!   `(G + G^T) z / tau`) and `dk = G^T q / tau` as GEMMs; the normalize backward.
//!
//! Memory and traffic are O(rows x cols): what the fused kernels avoid.

use super::cases::{self, Case, Op, Pass, Precision};
use super::runner::{GradCheck, Outcome};
use crate::kernels::baseline::{cross_entropy, cross_entropy_grad};
use crate::kernels::nn::GemmShape;
use crate::kernels::{normalize, Backend};
use crate::{Error, Result};

/// Errors unless the baseline covers `case`'s op.
pub(crate) fn check_supported(case: &Case) -> Result<()> {
    if case.precision != Precision::F32 {
        return Err(Error::invalid(
            "bench",
            "impl",
            "the unfused baseline runs exact f32 (its GEMM is SGEMM)",
        ));
    }
    match case.op {
        Op::Ntxent | Op::Infonce => Ok(()),
        op => Err(Error::invalid(
            "bench",
            "impl",
            format!(
                "the unfused baseline covers ntxent and infonce, not {}",
                op.name()
            ),
        )),
    }
}

/// One call of `case` on `tensors` (`z`, or `q` and `k`) with `targets` (the positive column of
/// each row); with `check`, the gradient's first values are downloaded for the checksum.
pub(crate) fn run<B: Backend>(
    b: &B,
    case: &Case,
    tensors: &[B::Buf],
    targets: &B::Buf,
    check: bool,
) -> Result<Outcome> {
    check_supported(case)?;
    let ntxent = case.op == Op::Ntxent;
    let (rows, dim) = (case.n, case.d);
    let cols = if ntxent { rows } else { case.k };
    let tau = if ntxent {
        cases::NTXENT_TAU
    } else {
        cases::INFONCE_TAU
    } as f32;
    let q = normalize::forward(b, &tensors[0], rows, dim)?;
    let k = if ntxent {
        None
    } else {
        Some(normalize::forward(b, &tensors[1], cols, dim)?)
    };
    let kn = k.as_ref().unwrap_or(&q);
    let logits = b.output("logits", rows * cols)?;
    let scaled = |mut g: GemmShape, beta: f32| {
        g.alpha = 1.0 / tau;
        g.beta = beta;
        g
    };
    b.gemm(
        &scaled(GemmShape::product(rows, cols, dim, false, true), 0.0),
        &q,
        kn,
        &logits,
    )?;
    let loss = cross_entropy(b, &logits, targets, [rows, cols], ntxent)?;
    if case.pass == Pass::Forward {
        return Ok(Outcome {
            check: loss,
            grad_check: None,
        });
    }
    cross_entropy_grad(b, &logits, targets, [rows, cols])?;
    // dq = G k / tau (+ G^T z / tau for NT-Xent, where k is z itself).
    let grad_q = b.output("grad_qn", rows * dim)?;
    b.gemm(
        &scaled(GemmShape::product(rows, dim, cols, false, false), 0.0),
        &logits,
        kn,
        &grad_q,
    )?;
    if ntxent {
        let transposed = scaled(GemmShape::product(rows, dim, cols, true, false), 1.0);
        b.gemm(&transposed, &logits, &q, &grad_q)?;
    } else {
        let grad_k = b.output("grad_kn", cols * dim)?;
        let transposed = scaled(GemmShape::product(cols, dim, rows, true, false), 0.0);
        b.gemm(&transposed, &logits, &q, &grad_k)?;
        normalize::backward(b, &tensors[1], &grad_k, cols, dim)?;
    }
    let dq = normalize::backward(b, &tensors[0], &grad_q, rows, dim)?;
    let grad_check = if check {
        Some(GradCheck::of(b.download(&dq)?.iter().map(|&v| v as f64)))
    } else {
        None
    };
    Ok(Outcome {
        check: loss,
        grad_check,
    })
}
