//! Launch sequences of `kernels/margin.cu`: the Hadsell margin loss over pairs of rows.

use super::params::{ContraMarginFinishParams, ContraMarginParams};
use super::status::Terms;
use super::{blocks_for, extent, handles, Backend, BufInfo, Elem, Launch};
use crate::Result;

/// Pair rows per 256-thread block (one warp per row), as in margin.cu.
const ROWS_PER_BLOCK: usize = 8;

/// The `d = sqrt(max(||x1 - x2||^2, DIST_EPS))` clamp.
const DIST_EPS: f32 = 1e-12;

/// margin_fwd writes `d 2^-64` per row.
const DIST_OUT_EXP: i32 = 64;

fn launch_shape(rows: usize) -> Launch {
    Launch::linear(blocks_for(rows, ROWS_PER_BLOCK), 256)
}

/// One margin-loss problem on a backend: `x1`, `x2` (rows x dim) and the labels `y` (rows, i32:
/// 0 similar, 1 dissimilar).
pub(crate) struct Problem<'a, B: Backend> {
    pub x1: &'a B::Buf,
    pub x2: &'a B::Buf,
    pub y: &'a B::Buf,
    pub rows: usize,
    pub dim: usize,
    pub margin: f64,
    /// pytorch-metric-learning's `ContrastiveLoss` (`margin_pml_finish`) instead of Hadsell's.
    pub pml: bool,
}

impl<B: Backend> Problem<'_, B> {
    fn params(&self, b: &B) -> Result<ContraMarginParams> {
        Ok(ContraMarginParams {
            x1: b.ptr(self.x1),
            x2: b.ptr(self.x2),
            y: b.ptr(self.y).cast(),
            rows: extent("rows", self.rows)?,
            dim: extent("dim", self.dim)?,
            margin: self.margin as f32,
            eps: DIST_EPS,
            pml: self.pml as i32,
            ..Default::default()
        })
    }

    /// PML's reduction of the forward's distances `row_dist`: the group scales `{1 / n0,
    /// 1 / n1}` (f64 on the device) and, with `slots`, the loss buffer (the loss, the `slots`
    /// status words of `status`, its own status word).
    pub fn finish_pml(
        &self,
        b: &B,
        row_dist: &B::Buf,
        status: &B::Buf,
        slots: Option<usize>,
    ) -> Result<(Option<B::Buf>, B::Buf)> {
        let scales = b.output_of(
            "pml_scales",
            BufInfo {
                elem: Elem::F64,
                count: 2,
            },
        )?;
        let out = match slots {
            Some(slots) => Some(super::status::loss_buffer(b, slots)?),
            None => None,
        };
        let params = ContraMarginFinishParams {
            dist: b.ptr(row_dist).cast(),
            y: b.ptr(self.y).cast(),
            status: b.ptr(status).cast(),
            out: out
                .as_ref()
                .map_or(std::ptr::null_mut(), |o| b.ptr(o).cast()),
            scales: b.ptr(&scales).cast(),
            rows: extent("rows", self.rows)?,
            slots: extent("slots", slots.unwrap_or(0))?,
            dist_exp: DIST_OUT_EXP,
            margin: self.margin,
        };
        let mut written = vec![&scales];
        written.extend(out.as_ref());
        b.launch(
            handles::MARGIN_PML_FINISH,
            Launch::linear(1, 256),
            &params,
            &written,
        )?;
        Ok((out, scales))
    }

    /// Each pair's clamped distance `d 2^-64` (exact in f32 for any f32 rows), and how the
    /// loss reduction turns them into its terms `d^2 / 2` or `relu(m - d)^2 / 2`, in f64, where
    /// a pair 1e20 apart (`d^2 / 2 = 5e39`) is no overflow.
    pub fn forward(&self, b: &B) -> Result<(B::Buf, Terms<'_, B::Buf>)> {
        let row_dist = b.output("row_dist", self.rows)?;
        let params = ContraMarginParams {
            row_loss: b.ptr(&row_dist).cast(),
            ..self.params(b)?
        };
        b.launch(
            handles::MARGIN_FWD_F32,
            launch_shape(self.rows),
            &params,
            &[&row_dist],
        )?;
        let terms = Terms::Margin {
            labels: self.y,
            margin: self.margin,
            dist_exp: DIST_OUT_EXP,
        };
        Ok((row_dist, terms))
    }

    /// Gradients of `grad_loss * loss` for x1 and x2 (PML's: from the group counts of a
    /// forward run again here).
    pub fn backward(&self, b: &B, grad_loss: f64) -> Result<(B::Buf, B::Buf)> {
        let scales = match self.pml {
            true => {
                let (row_dist, _) = self.forward(b)?;
                let no_status = super::status::status_words(b, 1)?;
                Some(self.finish_pml(b, &row_dist, &no_status, None)?.1)
            }
            false => None,
        };
        let grad_x1 = b.output("grad_x1", self.rows * self.dim)?;
        let grad_x2 = b.output("grad_x2", self.rows * self.dim)?;
        let grad_scale = match self.pml {
            true => grad_loss,
            false => grad_loss / self.rows as f64,
        };
        let params = ContraMarginParams {
            grad_x1: b.ptr(&grad_x1),
            grad_x2: b.ptr(&grad_x2),
            grad_scale: grad_scale as f32,
            pml_scales: scales
                .as_ref()
                .map_or(std::ptr::null(), |s| b.ptr(s).cast_const().cast()),
            ..self.params(b)?
        };
        b.launch(
            handles::MARGIN_BWD_F32,
            launch_shape(self.rows),
            &params,
            &[&grad_x1, &grad_x2],
        )?;
        Ok((grad_x1, grad_x2))
    }
}
