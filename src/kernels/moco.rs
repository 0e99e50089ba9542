//! Launch sequence of the MoCo loss: q and k normalized by the normalize kernel, the queue used as
//! given; the fused InfoNCE forward with k as each row's extra (positive) logit; the backward's
//! query pass over the queue plus the extra logit's term, then the normalize backward.

use super::infonce::{fused_forward, BackwardPass, Softmax};
use super::params::ContraInfonceExtraBwdParams;
use super::{blocks_for, extent, handles, normalize, Backend, Launch};
use crate::Result;

/// One MoCo problem: q, k (rows x dim) raw, queue (queue_len x dim) used as given.
pub(crate) struct Moco<'a, B: Backend> {
    pub q: &'a B::Buf,
    pub k: &'a B::Buf,
    pub queue: &'a B::Buf,
    pub rows: usize,
    pub queue_len: usize,
    pub dim: usize,
    pub temperature: f64,
}

impl<B: Backend> Moco<'_, B> {
    fn scale(&self) -> f32 {
        (1.0 / self.temperature) as f32
    }

    fn normalized(&self, b: &B) -> Result<(B::Buf, B::Buf)> {
        Ok((
            normalize::forward(b, self.q, self.rows, self.dim)?,
            normalize::forward(b, self.k, self.rows, self.dim)?,
        ))
    }

    fn softmax<'s>(&'s self, qn: &'s B::Buf) -> Softmax<'s, B::Buf> {
        Softmax::queue(qn, self.queue, self.rows, self.queue_len, self.dim)
    }

    /// The per-row losses (the loss is their mean) and the per-row log-sum-exp (over the
    /// positive and the queue).
    pub fn forward(&self, b: &B) -> Result<(B::Buf, B::Buf)> {
        let (qn, kn) = self.normalized(b)?;
        self.forward_on(b, &qn, &kn)
    }

    fn forward_on(&self, b: &B, qn: &B::Buf, kn: &B::Buf) -> Result<(B::Buf, B::Buf)> {
        fused_forward(b, self.softmax(qn), self.scale(), false, Some(kn), None)
    }

    /// The gradient of `grad_loss * loss` with respect to q (k and the queue get none).
    pub fn backward(&self, b: &B, lse: &B::Buf, grad_loss: f64) -> Result<B::Buf> {
        let (qn, kn) = self.normalized(b)?;
        self.backward_on(b, &qn, &kn, lse, grad_loss)
    }

    /// Forward and backward (`grad_loss` = 1) over q and k normalized once: the per-row losses,
    /// the lse and the query gradient.
    pub fn forward_backward(&self, b: &B) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let (qn, kn) = self.normalized(b)?;
        let (row_loss, lse) = self.forward_on(b, &qn, &kn)?;
        let grad_q = self.backward_on(b, &qn, &kn, &lse, 1.0)?;
        Ok((row_loss, lse, grad_q))
    }

    fn backward_on(
        &self,
        b: &B,
        qn: &B::Buf,
        kn: &B::Buf,
        lse: &B::Buf,
        grad_loss: f64,
    ) -> Result<B::Buf> {
        let grad_scale = (grad_loss / self.rows as f64) as f32;
        let softmax = self.softmax(qn);
        let pass = BackwardPass {
            lse,
            scale: self.scale(),
            grad_scale,
            self_mask: false,
        };
        let grad_qn = pass.queries(b, &softmax)?;
        let params = ContraInfonceExtraBwdParams {
            q: b.ptr(qn),
            extra_key: b.ptr(kn),
            lse: b.ptr(lse).cast(),
            grad_q: b.ptr(&grad_qn).cast(),
            rows: extent("rows", self.rows)?,
            dim: extent("dim", self.dim)?,
            scale: self.scale(),
            grad_scale,
        };
        // One warp per row, 8 rows per 256-thread block.
        b.launch(
            handles::INFONCE_EXTRA_BWD.of(b.info(qn).elem),
            Launch::linear(blocks_for(self.rows, 8), 256),
            &params,
            &[&grad_qn],
        )?;
        normalize::backward(b, self.q, &grad_qn, self.rows, self.dim)
    }
}
