//! Launch sequence of SigLIP: a and b normalized (the cosine form), then one sweep of
//! `kernels/siglip.cu` over the tiles of `a b^T` for the per-row loss and, in the backward, the
//! gradients (the normalize backward after it).

use super::params::ContraSiglipParams;
use super::{
    blocks_for, extent, handles, normalize,
    waves::{key_ranges, row_output},
    Backend, Launch, ScalarArg,
};
use crate::Result;

/// Rows per block of `siglip_sweep`.
const TILE: usize = 64;

/// One SigLIP problem: a (rows x dim) against b (cols x dim), raw; with `positives` the pairs
/// `(i, i)` are positives (cols == rows), else every pair is a negative.
pub(crate) struct SigLip<'a, B: Backend> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub rows: usize,
    pub cols: usize,
    pub positives: bool,
    pub dim: usize,
    pub normalize: bool,
    pub log_scale: ScalarArg<'a, B::Buf>,
    pub bias: ScalarArg<'a, B::Buf>,
}

/// The gradients a backward sweep leaves on the device.
pub(crate) struct SigLipGrads<Buf> {
    pub a: Buf,
    pub b: Buf,
    /// One partial per block: the gradient of `log_scale` is their sum.
    pub log_scale_partial: Buf,
    /// One partial per block: the gradient of `bias` is their sum.
    pub bias_partial: Buf,
}

/// The per-row losses and, in a backward, the gradients.
type Sweep<Buf> = (Buf, Option<SigLipGrads<Buf>>);

impl<B: Backend> SigLip<'_, B> {
    /// What the sum of the per-row losses is divided by.
    pub fn divisor(&self) -> f64 {
        self.rows as f64
    }

    /// The per-row losses (their sum over `rows` is the loss) and, with `grad_loss`, the
    /// gradients of `grad_loss * loss`.
    pub fn sweep(&self, b: &B, grad_loss: Option<f64>) -> Result<Sweep<B::Buf>> {
        let normalized;
        let (a_op, b_op) = if self.normalize {
            normalized = (
                normalize::forward(b, self.a, self.rows, self.dim)?,
                normalize::forward(b, self.b, self.cols, self.dim)?,
            );
            (&normalized.0, &normalized.1)
        } else {
            (self.a, self.b)
        };
        let kernel = handles::SIGLIP_SWEEP.of_product(b.info(a_op).elem);
        let shape = Launch {
            grid: [blocks_for(self.rows, TILE), 1, 1],
            block: [16, 16, 1],
            shared_bytes: 0,
        };
        // Rows too few to fill the card cut their column tiles into ranges (the wave model); the
        // blocks then add their rows' loss and dA to zeros.
        let (split_tiles, shape) =
            key_ranges(b, kernel, shape, blocks_for(self.cols, TILE)).unwrap_or((0, shape));
        let blocks = shape.grid.iter().product();
        let row_loss = row_output(b, "row_loss", self.rows, split_tiles)?;
        let grads = match grad_loss {
            None => None,
            Some(_) => Some(SigLipGrads {
                a: row_output(b, "grad_a", self.rows * self.dim, split_tiles)?,
                b: b.zeros("grad_b", self.cols * self.dim)?,
                log_scale_partial: b.output("log_scale_partial", blocks)?,
                bias_partial: b.output("bias_partial", blocks)?,
            }),
        };
        let ptr = |buf: Option<&B::Buf>| buf.map_or(std::ptr::null_mut(), |buf| b.ptr(buf));
        let params = ContraSiglipParams {
            a: b.ptr(a_op),
            b: b.ptr(b_op),
            log_scale: ptr(self.log_scale.device()).cast(),
            bias_value: ptr(self.bias.device()).cast(),
            row_loss: b.ptr(&row_loss).cast(),
            grad_a: ptr(grads.as_ref().map(|g| &g.a)).cast(),
            grad_b: ptr(grads.as_ref().map(|g| &g.b)).cast(),
            log_scale_partial: ptr(grads.as_ref().map(|g| &g.log_scale_partial)).cast(),
            bias_partial: ptr(grads.as_ref().map(|g| &g.bias_partial)).cast(),
            rows: extent("rows", self.rows)?,
            cols: extent("cols", self.cols)?,
            positives: self.positives as i32,
            dim: extent("dim", self.dim)?,
            scale: self.log_scale.passed(f64::exp, 1.0),
            bias: self.bias.passed(|bias| bias, 0.0),
            grad_weight: (grad_loss.unwrap_or(0.0) / self.rows as f64) as f32,
            split_tiles: extent("split_tiles", split_tiles)?,
        };
        // The outputs the kernel must fill (a split's shares are added to zeros).
        let mut written = vec![];
        if split_tiles == 0 {
            written.push(&row_loss);
        }
        if let Some(g) = &grads {
            if split_tiles == 0 {
                written.push(&g.a);
            }
            written.extend([&g.b, &g.log_scale_partial, &g.bias_partial]);
        }
        b.launch(kernel, shape, &params, &written)?;
        let grads = match grads {
            Some(g) if self.normalize => Some(SigLipGrads {
                a: normalize::backward(b, self.a, &g.a, self.rows, self.dim)?,
                b: normalize::backward(b, self.b, &g.b, self.cols, self.dim)?,
                ..g
            }),
            other => other,
        };
        Ok((row_loss, grads))
    }
}
