//! Launch sequences of `kernels/nce.cu`: noise-contrastive estimation.

use super::params::ContraNceParams;
use super::{blocks_for, extent, handles, Backend, Launch};
use crate::Result;

/// Rows per 256-thread block of the forward (one warp per row), as in nce.cu.
const ROWS_PER_BLOCK: usize = 8;
/// Threads per block of the elementwise backward.
const THREADS: u32 = 256;
/// Most blocks of the backward's grid-stride loop.
const MAX_BLOCKS: usize = 4096;

/// One NCE batch on a backend: `s_pos`, `logq_pos` (rows) and `s_neg`, `logq_neg` (rows x k).
pub(crate) struct Problem<'a, B: Backend> {
    pub s_pos: &'a B::Buf,
    pub s_neg: &'a B::Buf,
    pub logq_pos: &'a B::Buf,
    pub logq_neg: &'a B::Buf,
    pub rows: usize,
    pub k: usize,
}

impl<B: Backend> Problem<'_, B> {
    fn params(&self, b: &B) -> Result<ContraNceParams> {
        Ok(ContraNceParams {
            s_pos: b.ptr(self.s_pos),
            s_neg: b.ptr(self.s_neg),
            logq_pos: b.ptr(self.logq_pos),
            logq_neg: b.ptr(self.logq_neg),
            rows: extent("rows", self.rows)?,
            k: extent("k", self.k)?,
            log_k: (self.k as f64).ln() as f32,
            ..Default::default()
        })
    }

    /// The per-row losses (the loss is their mean).
    pub fn forward(&self, b: &B) -> Result<B::Buf> {
        let row_loss = b.output("row_loss", self.rows)?;
        let params = ContraNceParams {
            row_loss: b.ptr(&row_loss).cast(),
            ..self.params(b)?
        };
        let shape = Launch::linear(blocks_for(self.rows, ROWS_PER_BLOCK), 256);
        b.launch(handles::NCE_FWD_F32, shape, &params, &[&row_loss])?;
        Ok(row_loss)
    }

    /// Gradients of `grad_loss * loss` for `s_pos` (rows) and `s_neg` (rows x k).
    pub fn backward(&self, b: &B, grad_loss: f64) -> Result<(B::Buf, B::Buf)> {
        let grad_s_pos = b.output("grad_s_pos", self.rows)?;
        let grad_s_neg = b.output("grad_s_neg", self.rows * self.k)?;
        let params = ContraNceParams {
            grad_s_pos: b.ptr(&grad_s_pos),
            grad_s_neg: b.ptr(&grad_s_neg),
            grad_scale: (grad_loss / self.rows as f64) as f32,
            ..self.params(b)?
        };
        let elements = self.rows * (self.k + 1);
        let blocks = blocks_for(elements, THREADS as usize).min(MAX_BLOCKS);
        b.launch(
            handles::NCE_BWD_F32,
            Launch::linear(blocks, THREADS),
            &params,
            &[&grad_s_pos, &grad_s_neg],
        )?;
        Ok((grad_s_pos, grad_s_neg))
    }
}
