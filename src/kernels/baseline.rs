//! Launches of `kernels/baseline.cu`: the unfused softmax cross-entropy that the benchmarks
//! measure next to the fused kernels (PyTorch eager's kernel sequence after the logits GEMM).

use super::params::ContraBaselineParams;
use super::{blocks_for, extent, handles, Backend, Launch};
use crate::Result;

const THREADS: u32 = 256;

fn params<B: Backend>(
    b: &B,
    logits: &B::Buf,
    targets: &B::Buf,
    loss_rows: Option<&B::Buf>,
    [rows, cols]: [usize; 2],
) -> Result<ContraBaselineParams> {
    Ok(ContraBaselineParams {
        logits: b.ptr(logits).cast(),
        targets: b.ptr(targets).cast_const().cast(),
        loss_rows: loss_rows.map_or(std::ptr::null_mut(), |l| b.ptr(l).cast()),
        rows: extent("rows", rows)?,
        cols: extent("cols", cols)?,
        self_mask: 0,
        grad_scale: 0.0,
    })
}

/// The mean cross-entropy of the `rows x cols` logits against `targets`, leaving the
/// log-probabilities in `logits` (two kernels: log-softmax, then the gather).
pub(crate) fn cross_entropy<B: Backend>(
    b: &B,
    logits: &B::Buf,
    targets: &B::Buf,
    shape @ [rows, _]: [usize; 2],
    self_mask: bool,
) -> Result<f64> {
    let loss_rows = b.output("loss_rows", rows)?;
    let mut p = params(b, logits, targets, Some(&loss_rows), shape)?;
    p.self_mask = self_mask as i32;
    let per_row = Launch::linear(rows, THREADS);
    b.launch(handles::BASELINE_LOG_SOFTMAX_F32, per_row, &p, &[logits])?;
    let per_thread = Launch::linear(blocks_for(rows, THREADS as usize), THREADS);
    b.launch(handles::BASELINE_NLL_F32, per_thread, &p, &[&loss_rows])?;
    let losses = b.download(&loss_rows)?;
    Ok(losses.iter().map(|&l| l as f64).sum::<f64>() / rows as f64)
}

/// Turns the log-probabilities left by [`cross_entropy`] into the gradient of the mean loss with
/// respect to the logits, in place.
pub(crate) fn cross_entropy_grad<B: Backend>(
    b: &B,
    log_probs: &B::Buf,
    targets: &B::Buf,
    shape @ [rows, cols]: [usize; 2],
) -> Result<()> {
    let mut p = params(b, log_probs, targets, None, shape)?;
    p.grad_scale = 1.0 / rows as f32;
    let blocks = blocks_for(rows * cols, THREADS as usize).clamp(1, 65535);
    b.launch(
        handles::BASELINE_NLL_GRAD_F32,
        Launch::linear(blocks, THREADS),
        &p,
        &[log_probs],
    )
}
