//! Launch sequences of `kernels/triplet.cu`: the row scale from `triplet_row_norms` and
//! `triplet_scale_rows`, the pair quantities from similarity.cu, the mining from `triplet_mine`,
//! the loss and counts from `triplet_finish`, the gradient from `triplet_bwd` (and normalize.cu
//! for the cosine distance). Nothing crosses to the host.

use super::params::*;
use super::{
    blocks_for, elementwise, extent, handles, normalize, similarity, Backend, BufInfo, Elem, Launch,
};
use crate::shared::{ldexp, Coefs, Distance, Mining, Similarity, TripletStats, DIST_EPS};
use crate::{Error, Result};

/// Threads of `triplet_mine` (one block per anchor) and of `triplet_finish` (one block).
const MINE_THREADS: u32 = 256;
const FINISH_THREADS: u32 = 256;
/// Rows and feature columns of one `triplet_bwd` block.
const BWD_ROWS: usize = 4;
const BWD_THREADS: usize = 128;
/// Per-anchor triplet counts are 32-bit in the kernel: at most (N / 2)^2 per anchor.
pub(crate) const MAX_ROWS: usize = 65_536;

/// The euclidean distances are mined from f32 squared distances: rows whose largest norm passes
/// 2^40 are mined scaled by `2^-k` (`triplet_row_norms` and `triplet_scale_rows` on the device,
/// k in the call's summary), which keeps the squared distances below 2^82 and a batch-all
/// anchor's sum of up to (N / 2)^2 terms below 2^114. Scaling is exact and the distances scale
/// with it, so the mined triplets are the same (the kernels scale the margin and the clamp alike).
pub(crate) const ROW_NORM_EXP: i32 = 40;

/// 32-bit words of a call's summary (`ContraTripletSummary`: four u64 counts and the largest
/// squared row norm).
pub(crate) const SUMMARY_WORDS: usize = 2 * ContraTripletSummary_CONTRA_SUMMARY_LEN as usize;

/// What the forward leaves on the device: the mined pair coefficients (n x n f32, in the units
/// of the scaled rows, not yet divided by the triplet count), the summary (the row scale; the
/// counts once [`Problem::finish`] ran) and the anchors' partial sums and counts.
pub(crate) struct Mined<Buf> {
    pub coef: Buf,
    pub summary: Buf,
    anchor_sum: Buf,
    anchor_count: Buf,
    anchor_stats: Buf,
}

/// The coefficients a backward starts from.
pub(crate) enum CoefSource<'a, Buf> {
    /// A kernel forward's, with its finished summary (their divisor and row scale).
    Device { coef: &'a Buf, summary: &'a Buf },
    /// Coefficients in the rows' own units (a CPU forward's), copied in and used with the rows
    /// scaled by `2^-k`.
    Host { coefs: &'a Coefs, k: i32 },
}

/// One triplet problem on a backend: `x` (rows x dim, f32).
pub(crate) struct Problem<'a, B: Backend> {
    pub x: &'a B::Buf,
    pub rows: usize,
    pub dim: usize,
    pub distance: Distance,
    pub mining: Mining,
    pub margin: f64,
    /// The loss is the mean over the positive terms (else over every mined term).
    pub nonzero_only: bool,
}

/// The power of the row scale in `distance`: 2 for the squared euclidean, else 1.
pub(crate) fn power(distance: Distance) -> i32 {
    match distance {
        Distance::SquaredEuclidean => 2,
        _ => 1,
    }
}

/// The row scale exponent k a summary's largest squared row norm sets (as `triplet_row_exp`
/// in the kernels): 0 below a norm of 2^40, else frexp's exponent of the norm minus 40.
pub(crate) fn row_exponent(max_sq_norm: f64) -> i32 {
    let norm = max_sq_norm.sqrt();
    if !(norm >= ldexp(1.0, ROW_NORM_EXP) && norm.is_finite()) {
        return 0;
    }
    let (_, exp) = frexp(norm);
    exp - ROW_NORM_EXP
}

/// `(m, e)` with `v = m 2^e` and `0.5 <= m < 1`, for a finite normal positive `v`.
fn frexp(v: f64) -> (f64, i32) {
    let biased = ((v.to_bits() >> 52) & 0x7ff) as i32;
    (ldexp(v, 1022 - biased), biased - 1022)
}

/// The counts of a finished summary's words: (count, stats), and its row scale exponent.
pub(crate) fn read_summary(words: &[u32]) -> Result<(u64, TripletStats, i32)> {
    let word = |i: u32| -> Result<u64> {
        let at = 2 * i as usize;
        match words.get(at..at + 2) {
            Some(w) => Ok(w[0] as u64 | (w[1] as u64) << 32),
            None => Err(Error::Device(format!(
                "a triplet summary of {} words, not {SUMMARY_WORDS}",
                words.len()
            ))),
        }
    };
    let stats = TripletStats {
        hard: word(ContraTripletSummary_CONTRA_SUMMARY_HARD)?,
        semi_hard: word(ContraTripletSummary_CONTRA_SUMMARY_SEMI_HARD)?,
        easy: word(ContraTripletSummary_CONTRA_SUMMARY_EASY)?,
    };
    let k = row_exponent(f64::from_bits(word(
        ContraTripletSummary_CONTRA_SUMMARY_MAX_SQ_NORM,
    )?));
    Ok((word(ContraTripletSummary_CONTRA_SUMMARY_COUNT)?, stats, k))
}

/// Threads of the summary's kernels (rows per block of `triplet_row_norms`: one warp each).
const SCALE_THREADS: u32 = 256;
const MAX_SCALE_BLOCKS: usize = 1024;

impl<B: Backend> Problem<'_, B> {
    fn check_rows(&self) -> Result<()> {
        if self.rows > MAX_ROWS {
            return Err(Error::invalid(
                "triplet",
                "x",
                format!(
                    "{} rows: the triplet kernels take at most {MAX_ROWS} (use Device::Cpu)",
                    self.rows
                ),
            ));
        }
        Ok(())
    }

    /// A fresh summary whose largest squared row norm is x's (left 0 for the cosine distance,
    /// which is scale-invariant: k = 0).
    fn summary(&self, b: &B) -> Result<B::Buf> {
        let info = BufInfo {
            elem: Elem::I32,
            count: SUMMARY_WORDS,
        };
        let summary = elementwise::filled(b, "summary", info, &[0])?;
        if self.distance != Distance::Cosine && self.rows > 0 {
            let params = self.scale_params(b, &summary, None)?;
            let warps_per_block = SCALE_THREADS as usize / 32;
            let blocks = blocks_for(self.rows, warps_per_block).clamp(1, MAX_SCALE_BLOCKS);
            b.launch(
                handles::TRIPLET_ROW_NORMS,
                Launch::linear(blocks, SCALE_THREADS),
                &params,
                &[],
            )?;
        }
        Ok(summary)
    }

    fn scale_params(
        &self,
        b: &B,
        summary: &B::Buf,
        out: Option<&B::Buf>,
    ) -> Result<ContraTripletScaleParams> {
        Ok(ContraTripletScaleParams {
            x: b.ptr(self.x).cast(),
            out: out.map_or(std::ptr::null_mut(), |o| b.ptr(o).cast()),
            summary: b.ptr(summary).cast(),
            rows: extent("n", self.rows)?,
            dim: extent("dim", self.dim)?,
        })
    }

    /// Pair quantities, mining and the anchors' partials over `labels` (dense class ids, i32
    /// per row), all left on the device.
    pub fn forward(&self, b: &B, labels: &B::Buf) -> Result<Mined<B::Buf>> {
        self.check_rows()?;
        let n = self.rows;
        let summary = self.summary(b)?;
        let (kind, scaled) = match self.distance {
            Distance::Cosine => (Similarity::Cosine, None),
            _ => {
                let len = n.checked_mul(self.dim).ok_or_else(|| {
                    Error::invalid("triplet", "x", "rows x dim overflows usize".to_string())
                })?;
                let out = b.output("x_scaled", len)?;
                let params = self.scale_params(b, &summary, Some(&out))?;
                let blocks = blocks_for(len, SCALE_THREADS as usize).clamp(1, MAX_SCALE_BLOCKS);
                if len > 0 {
                    b.launch(
                        handles::TRIPLET_SCALE_ROWS,
                        Launch::linear(blocks, SCALE_THREADS),
                        &params,
                        &[&out],
                    )?;
                }
                (Similarity::SquaredEuclidean, Some(out))
            }
        };
        let rows = scaled.as_ref().unwrap_or(self.x);
        let raw = similarity::forward(b, rows, rows, (n, n, self.dim), kind)?;
        let mined = Mined {
            coef: b.output("coef", n * n)?,
            summary,
            anchor_sum: b.output("anchor_sum", n)?,
            anchor_count: b.output("anchor_count", 2 * n)?,
            anchor_stats: b.output("anchor_stats", 3 * n)?,
        };
        let params = ContraTripletMineParams {
            raw: b.ptr(&raw).cast(),
            labels: b.ptr(labels).cast(),
            summary: b.ptr(&mined.summary).cast(),
            coef: b.ptr(&mined.coef).cast(),
            anchor_sum: b.ptr(&mined.anchor_sum).cast(),
            anchor_count: b.ptr(&mined.anchor_count).cast(),
            anchor_stats: b.ptr(&mined.anchor_stats).cast(),
            rows: extent("n", n)?,
            distance: match self.distance {
                Distance::Euclidean => ContraTripletDistance_CONTRA_TRIPLET_EUCLIDEAN,
                Distance::SquaredEuclidean => {
                    ContraTripletDistance_CONTRA_TRIPLET_SQUARED_EUCLIDEAN
                }
                Distance::Cosine => ContraTripletDistance_CONTRA_TRIPLET_COSINE,
            } as i32,
            mining: match self.mining {
                Mining::BatchAll => ContraTripletMining_CONTRA_TRIPLET_BATCH_ALL,
                Mining::BatchHard => ContraTripletMining_CONTRA_TRIPLET_BATCH_HARD,
                Mining::SemiHard => ContraTripletMining_CONTRA_TRIPLET_SEMI_HARD,
                Mining::SemiHardAll => ContraTripletMining_CONTRA_TRIPLET_SEMI_HARD_ALL,
            } as i32,
            margin: self.margin,
            eps: DIST_EPS,
        };
        b.launch(
            handles::TRIPLET_MINE_F32,
            Launch::linear(n, MINE_THREADS),
            &params,
            &[
                &mined.coef,
                &mined.anchor_sum,
                &mined.anchor_count,
                &mined.anchor_stats,
            ],
        )?;
        Ok(mined)
    }

    /// Reduces a forward's partials (one block, fixed order): the loss buffer (the loss, then
    /// the `slots` status words of `status`, then the loss's own; see `status::finish_loss`),
    /// and the counts into the forward's summary.
    pub fn finish(
        &self,
        b: &B,
        mined: &Mined<B::Buf>,
        status: &B::Buf,
        slots: usize,
    ) -> Result<B::Buf> {
        let out = super::status::loss_buffer(b, slots)?;
        let params = ContraTripletFinishParams {
            anchor_sum: b.ptr(&mined.anchor_sum).cast(),
            anchor_count: b.ptr(&mined.anchor_count).cast(),
            anchor_stats: b.ptr(&mined.anchor_stats).cast(),
            status: b.ptr(status).cast(),
            summary: b.ptr(&mined.summary).cast(),
            out: b.ptr(&out).cast(),
            rows: extent("n", self.rows)?,
            slots: extent("slots", slots)?,
            power: power(self.distance),
            nonzero_only: self.nonzero_only as i32,
        };
        b.launch(
            handles::TRIPLET_FINISH,
            Launch::linear(1, FINISH_THREADS),
            &params,
            &[&out],
        )?;
        Ok(out)
    }

    /// The gradient of `grad_loss * loss` with respect to x (f32, rows x dim). With
    /// L(x) = L'(x 2^-k) 2^(kp), the kernel takes the scaled problem's gradient times
    /// 2^(k(p - 1)); host coefficients come in scaled to that problem's units, 2^(k(2 - p)).
    pub fn backward(&self, b: &B, coefs: CoefSource<'_, B::Buf>, grad_loss: f64) -> Result<B::Buf> {
        self.check_rows()?;
        let (n, dim) = (self.rows, self.dim);
        let p = power(self.distance);
        let uploaded;
        let (coef, summary, k) = match coefs {
            CoefSource::Device { coef, summary } => (coef, Some(summary), 0),
            CoefSource::Host { coefs, k } => {
                uploaded = b.upload("coef", &coefs.to_dense_f32(n, k * (2 - p)))?;
                (&uploaded, None, k)
            }
        };
        let cosine = self.distance == Distance::Cosine;
        let normed;
        let y = if cosine {
            normed = normalize::forward(b, self.x, n, dim)?;
            &normed
        } else {
            self.x
        };
        let out = b.output(if cosine { "grad_normed" } else { "grad_x" }, n * dim)?;
        let params = ContraTripletBwdParams {
            x: b.ptr(y).cast(),
            coef: b.ptr(coef).cast(),
            summary: summary.map_or(std::ptr::null(), |s| b.ptr(s).cast_const().cast()),
            out: b.ptr(&out).cast(),
            rows: extent("n", n)?,
            dim: extent("dim", dim)?,
            cosine: cosine as i32,
            power: p,
            k,
            grad_loss,
        };
        let launch = Launch {
            grid: [blocks_for(n, BWD_ROWS), blocks_for(dim, BWD_THREADS), 1],
            block: [BWD_THREADS as u32, 1, 1],
            shared_bytes: 0,
        };
        b.launch(handles::TRIPLET_BWD_F32, launch, &params, &[&out])?;
        if cosine {
            normalize::backward(b, self.x, &out, n, dim)
        } else {
            Ok(out)
        }
    }
}
