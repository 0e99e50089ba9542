//! Launch sequences of `kernels/normalize.cu`.

use super::params::ContraNormalizeParams;
use super::{blocks_for, extent, handles, Backend, BufInfo, Launch};
use crate::Result;

/// Rows per 256-thread block (one warp per row), as in normalize.cu.
const ROWS_PER_BLOCK: usize = 8;

fn launch_shape(rows: usize) -> Launch {
    Launch::linear(blocks_for(rows, ROWS_PER_BLOCK), 256)
}

/// `y = x / max(||x||, 1e-12)` per row, into a new buffer of x's element type.
pub(crate) fn forward<B: Backend>(b: &B, x: &B::Buf, rows: usize, dim: usize) -> Result<B::Buf> {
    let elem = b.info(x).elem;
    let y = b.output_of(
        "y",
        BufInfo {
            elem,
            count: rows * dim,
        },
    )?;
    let params = ContraNormalizeParams {
        x: b.ptr(x),
        y: b.ptr(&y),
        rows: extent("rows", rows)?,
        dim: extent("dim", dim)?,
        eps: 1e-12,
        ..Default::default()
    };
    let kernel = handles::NORMALIZE_FWD.of(elem);
    b.launch(kernel, launch_shape(rows), &params, &[&y])?;
    Ok(y)
}

/// The normalize backward per row, into a new f32 buffer (`grad_y` is f32 too).
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
        rows: extent("rows", rows)?,
        dim: extent("dim", dim)?,
        eps: 1e-12,
        ..Default::default()
    };
    let kernel = handles::NORMALIZE_BWD.of(b.info(x).elem);
    b.launch(kernel, launch_shape(rows), &params, &[&grad_x])?;
    Ok(grad_x)
}
