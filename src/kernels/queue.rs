//! Launch sequence of `kernels/queue.cu`: the MoCo queue enqueue.

use super::params::ContraQueueParams;
use super::{blocks_for, extent, handles, Backend, Launch};
use crate::Result;

/// Key rows per 256-thread block (one warp per row), as in queue.cu.
const ROWS_PER_BLOCK: usize = 8;

/// Writes the L2-normalized rows of `k` (rows x dim) into `queue` (queue_len x dim, in place) at
/// rows `(ptr + i) mod queue_len`; with `rows > queue_len` only the last `queue_len` keys write.
/// Returns the new pointer `(ptr + rows) mod queue_len`.
pub(crate) fn enqueue<B: Backend>(
    b: &B,
    queue: &B::Buf,
    k: &B::Buf,
    rows: usize,
    queue_len: usize,
    dim: usize,
    ptr: usize,
) -> Result<usize> {
    let params = ContraQueueParams {
        k: b.ptr(k),
        queue: b.ptr(queue),
        rows: extent("rows", rows)?,
        queue_len: extent("queue_len", queue_len)?,
        dim: extent("dim", dim)?,
        ptr: extent("ptr", ptr)?,
        eps: 1e-12,
    };
    // The queue holds its current (real, never poison) rows and the kernel rewrites only some of
    // them; listing it as written is still sound and turns on the guard-band checks.
    b.launch(
        handles::QUEUE_ENQUEUE_F32,
        Launch::linear(blocks_for(rows, ROWS_PER_BLOCK), 256),
        &params,
        &[queue],
    )?;
    Ok((ptr + rows) % queue_len)
}
