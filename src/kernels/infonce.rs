//! Launch sequences of `kernels/infonce.cu` for InfoNCE and NT-Xent: optional normalize kernels
//! around the fused forward (per-row LSE, no N x M buffer) and the two-pass backward.

use super::params::{ContraInfonceBwdParams, ContraInfonceFwdParams};
use super::{blocks_for, normalize, Backend, Launch};
use crate::Result;

/// Query (or owner) rows per block in infonce.cu.
const TILE: usize = 64;

fn launch_shape(rows: usize) -> Launch {
    Launch {
        grid: [blocks_for(rows, TILE) as u32, 1, 1],
        block: [16, 16, 1],
    }
}

/// One InfoNCE problem on a backend. `q` and `k` are the raw inputs; with `normalize` the
/// kernels see their normalized copies.
pub(crate) struct Problem<'a, B: Backend> {
    pub q: &'a B::Buf,
    pub k: &'a B::Buf,
    pub positives: &'a B::Buf,
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
    pub temperature: f64,
    pub normalize: bool,
    pub self_mask: bool,
}

/// Normalized copies of q and k when the problem asks for cosine similarity.
enum Operands<Buf> {
    Raw,
    Normalized(Buf, Buf),
}

impl<B: Backend> Problem<'_, B> {
    fn operands(&self, b: &B) -> Result<Operands<B::Buf>> {
        if !self.normalize {
            return Ok(Operands::Raw);
        }
        Ok(Operands::Normalized(
            normalize::forward(b, self.q, self.rows, self.dim)?,
            normalize::forward(b, self.k, self.cols, self.dim)?,
        ))
    }

    fn pick<'s>(&'s self, ops: &'s Operands<B::Buf>) -> (&'s B::Buf, &'s B::Buf) {
        match ops {
            Operands::Raw => (self.q, self.k),
            Operands::Normalized(q, k) => (q, k),
        }
    }

    /// The mean loss and the per-row log-sum-exp.
    pub fn forward(&self, b: &B) -> Result<(f64, B::Buf)> {
        let ops = self.operands(b)?;
        let (q, k) = self.pick(&ops);
        let lse = b.output("lse", self.rows)?;
        let row_loss = b.output("row_loss", self.rows)?;
        let params = ContraInfonceFwdParams {
            q: b.ptr(q),
            k: b.ptr(k),
            positives: b.ptr(self.positives).cast(),
            lse: b.ptr(&lse).cast(),
            row_loss: b.ptr(&row_loss).cast(),
            rows: self.rows as i32,
            cols: self.cols as i32,
            dim: self.dim as i32,
            self_mask: self.self_mask as i32,
            scale: (1.0 / self.temperature) as f32,
        };
        b.launch(
            "infonce_fwd_f32",
            launch_shape(self.rows),
            &params,
            &[&lse, &row_loss],
        )?;
        // The mean of N per-row losses is summed on the host in f64: N floats, deterministic.
        let total: f64 = b.download(&row_loss)?.iter().map(|&v| v as f64).sum();
        Ok((total / self.rows as f64, lse))
    }

    /// Gradients of `grad_loss * loss` for q and k. With `sum_into_q` (NT-Xent, where q and k are
    /// the same rows) the key gradient is added to the query gradient and only that is returned.
    pub fn backward(
        &self,
        b: &B,
        lse: &B::Buf,
        grad_loss: f64,
        sum_into_q: bool,
    ) -> Result<(B::Buf, Option<B::Buf>)> {
        let ops = self.operands(b)?;
        let (q, k) = self.pick(&ops);
        let grad_q = b.output("grad_q", self.rows * self.dim)?;
        let grad_k = if sum_into_q {
            None
        } else {
            Some(b.output("grad_k", self.cols * self.dim)?)
        };
        let base = ContraInfonceBwdParams {
            positives: b.ptr(self.positives).cast(),
            lse: b.ptr(lse).cast(),
            dim: self.dim as i32,
            self_mask: self.self_mask as i32,
            scale: (1.0 / self.temperature) as f32,
            grad_scale: (grad_loss / self.rows as f64) as f32,
            ..Default::default()
        };
        let query_pass = ContraInfonceBwdParams {
            owner: b.ptr(q),
            other: b.ptr(k),
            grad_owner: b.ptr(&grad_q),
            owner_rows: self.rows as i32,
            other_rows: self.cols as i32,
            owner_is_query: 1,
            accumulate: 0,
            ..base
        };
        b.launch(
            "infonce_bwd_f32",
            launch_shape(self.rows),
            &query_pass,
            &[&grad_q],
        )?;
        let key_target = grad_k.as_ref().unwrap_or(&grad_q);
        let key_pass = ContraInfonceBwdParams {
            owner: b.ptr(k),
            other: b.ptr(q),
            grad_owner: b.ptr(key_target),
            owner_rows: self.cols as i32,
            other_rows: self.rows as i32,
            owner_is_query: 0,
            accumulate: sum_into_q as i32,
            ..base
        };
        b.launch(
            "infonce_bwd_f32",
            launch_shape(self.cols),
            &key_pass,
            &[key_target],
        )?;
        if !self.normalize {
            return Ok((grad_q, grad_k));
        }
        let grad_q = normalize::backward(b, self.q, &grad_q, self.rows, self.dim)?;
        let grad_k = match grad_k {
            Some(g) => Some(normalize::backward(b, self.k, &g, self.cols, self.dim)?),
            None => None,
        };
        Ok((grad_q, grad_k))
    }
}
