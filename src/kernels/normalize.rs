//! Launch sequences of `kernels/normalize.cu`.

use super::params::ContraNormalizeParams;
use super::{blocks_for, Backend, Launch};
use crate::Result;

/// Rows per 256-thread block (one warp per row), as in normalize.cu.
const ROWS_PER_BLOCK: usize = 8;

fn launch_shape(rows: usize) -> Launch {
    Launch::linear(blocks_for(rows, ROWS_PER_BLOCK), 256)
}

/// `y = x / max(||x||, 1e-12)` per row, into a new buffer.
pub(crate) fn forward<B: Backend>(b: &B, x: &B::Buf, rows: usize, dim: usize) -> Result<B::Buf> {
    let y = b.output("y", rows * dim)?;
    let params = ContraNormalizeParams {
        x: b.ptr(x),
        y: b.ptr(&y),
        rows: rows as i32,
        dim: dim as i32,
        eps: 1e-12,
        ..Default::default()
    };
    b.launch("normalize_fwd_f32", launch_shape(rows), &params, &[&y])?;
    Ok(y)
}

/// The normalize backward per row, into a new buffer.
pub(crate) fn backward<B: Backend>(
    b: &B,
    x: &B::Buf,
    grad_y: &B::Buf,
    rows: usize,
    dim: usize,
) -> Result<B::Buf> {
    let grad_x = b.output("grad_x", rows * dim)?;
    let params = ContraNormalizeParams {
        x: b.ptr(x),
        grad_y: b.ptr(grad_y),
        grad_x: b.ptr(&grad_x),
        rows: rows as i32,
        dim: dim as i32,
        eps: 1e-12,
        ..Default::default()
    };
    b.launch("normalize_bwd_f32", launch_shape(rows), &params, &[&grad_x])?;
    Ok(grad_x)
}
