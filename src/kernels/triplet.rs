//! Launch sequences of `kernels/triplet.cu`: the pair quantities come from similarity.cu, the
//! mining from `triplet_mine`, the gradient from `triplet_bwd` (and normalize.cu for the cosine
//! distance).

use super::params::*;
use super::{blocks_for, extent, handles, normalize, similarity, Backend, Launch};
use crate::shared::{
    ldexp, scaled_margin, Coefs, Distance, Mining, Similarity, TripletStats, DIST_EPS,
};
use crate::{Error, Result};

/// Threads of `triplet_mine` (one block per anchor).
const MINE_THREADS: u32 = 256;
/// Rows and feature columns of one `triplet_bwd` block.
const BWD_ROWS: usize = 4;
const BWD_THREADS: usize = 128;
/// Per-anchor triplet counts are 32-bit in the kernel: at most (N / 2)^2 per anchor.
pub(crate) const MAX_ROWS: usize = 65_536;

/// The euclidean distances are mined from f32 squared distances: rows whose largest norm passes
/// 2^40 go to the kernels scaled by a power of two (`prescale_exponent`), which keeps the squared
/// distances below 2^82 and a batch-all anchor's sum of up to (N / 2)^2 terms below 2^114. Scaling
/// is exact and the distances scale with it, so the mined triplets are the same (the op scales
/// the margin and the clamp alike; `forward_scaled`, `backward_scaled`).
pub(crate) const ROW_NORM_EXP: i32 = 40;

/// What the kernel forward returns (the host sums the per-anchor values in f64 and u64).
pub(crate) struct Forward<Buf> {
    pub loss: f64,
    pub count: u64,
    pub stats: TripletStats,
    /// What the backward needs, left on the device.
    pub coefs: DeviceCoefs<Buf>,
}

/// The mined pair coefficients as `triplet_mine` wrote them (n x n f32, in the units of the
/// rows scaled by `2^-k`, not yet divided by the triplet count), and their scale `1 / count`.
pub(crate) struct DeviceCoefs<Buf> {
    pub raw: Buf,
    pub scale: f64,
    pub k: i32,
}

/// The coefficients a backward starts from: a forward's on the device, or host ones (a CPU
/// forward's, copied in).
pub(crate) enum CoefSource<'a, Buf> {
    Device { raw: &'a Buf, scale: f64 },
    Host(&'a Coefs),
}

/// One triplet problem on a backend: `x` (rows x dim) and dense class ids (i32) per row.
pub(crate) struct Problem<'a, B: Backend> {
    pub x: &'a B::Buf,
    pub labels: &'a B::Buf,
    pub rows: usize,
    pub dim: usize,
    pub distance: Distance,
    pub mining: Mining,
    pub margin: f64,
}

/// The power of the row scale in `distance`: 2 for the squared euclidean, else 1.
pub(crate) fn power(distance: Distance) -> i32 {
    match distance {
        Distance::SquaredEuclidean => 2,
        _ => 1,
    }
}

impl<B: Backend> Problem<'_, B> {
    fn power(&self) -> i32 {
        power(self.distance)
    }

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

    // Unscaled entry points, for the benchmarks and the GPU timings.
    #[cfg_attr(not(any(feature = "bench", feature = "cuda")), allow(dead_code))]
    pub fn forward(&self, b: &B) -> Result<Forward<B::Buf>> {
        self.forward_scaled(b, 0)
    }

    /// [`Problem::forward`] when `x` holds the rows scaled by `2^-k` (see [`ROW_NORM_EXP`]):
    /// the margin and the euclidean clamp are scaled alike (each kept at least f32's smallest
    /// normal), and the loss comes back in the rows' own units (the coefficients stay in the
    /// scaled problem's, on the device).
    pub fn forward_scaled(&self, b: &B, k: i32) -> Result<Forward<B::Buf>> {
        self.check_rows()?;
        let p = self.power();
        let n = self.rows;
        let kind = match self.distance {
            Distance::Cosine => Similarity::Cosine,
            _ => Similarity::SquaredEuclidean,
        };
        let raw = similarity::forward(b, self.x, self.x, (n, n, self.dim), kind)?;
        let coef = b.output("coef", n * n)?;
        let anchor_sum = b.output("anchor_sum", n)?;
        let anchor_count = b.output("anchor_count", n)?;
        let anchor_stats = b.output("anchor_stats", 3 * n)?;
        let params = ContraTripletMineParams {
            raw: b.ptr(&raw).cast(),
            labels: b.ptr(self.labels).cast(),
            coef: b.ptr(&coef).cast(),
            anchor_sum: b.ptr(&anchor_sum).cast(),
            anchor_count: b.ptr(&anchor_count).cast(),
            anchor_stats: b.ptr(&anchor_stats).cast(),
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
            } as i32,
            margin: if k == 0 {
                self.margin as f32
            } else {
                scaled_margin(self.margin, -k * p, f32::MIN_POSITIVE as f64) as f32
            },
            eps: (ldexp(DIST_EPS, -2 * k) as f32).max(f32::MIN_POSITIVE),
        };
        b.launch(
            handles::TRIPLET_MINE_F32,
            Launch::linear(n, MINE_THREADS),
            &params,
            &[&coef, &anchor_sum, &anchor_count, &anchor_stats],
        )?;
        // Per-anchor partials summed on the host in f64 / u64: deterministic.
        let sum: f64 = b.download(&anchor_sum)?.iter().map(|&v| v as f64).sum();
        let count: u64 = b
            .download(&anchor_count)?
            .iter()
            .map(|v| v.to_bits() as u64)
            .sum();
        let mut stats = TripletStats::default();
        for s in b.download(&anchor_stats)?.chunks(3) {
            stats.hard += s[0].to_bits() as u64;
            stats.semi_hard += s[1].to_bits() as u64;
            stats.easy += s[2].to_bits() as u64;
        }
        let (loss, scale) = if count > 0 {
            (sum / count as f64, 1.0 / count as f64)
        } else {
            (0.0, 0.0)
        };
        // loss = loss' 2^(kp).
        Ok(Forward {
            loss: ldexp(loss, k * p),
            count,
            stats,
            coefs: DeviceCoefs {
                raw: coef,
                scale,
                k,
            },
        })
    }

    /// The gradient of `grad_loss * loss` with respect to x, from a forward's coefficients.
    #[cfg_attr(not(any(feature = "bench", feature = "cuda")), allow(dead_code))]
    pub fn backward(&self, b: &B, coefs: &DeviceCoefs<B::Buf>, grad_loss: f64) -> Result<B::Buf> {
        let source = CoefSource::Device {
            raw: &coefs.raw,
            scale: coefs.scale,
        };
        self.backward_scaled(b, source, grad_loss, 0)
    }

    /// [`Problem::backward`] when `x` holds the rows scaled by `2^-k`. A forward's device
    /// coefficients are in the scaled problem's units (from the same `k`); host ones are in the
    /// rows' own units. With L(x) = L'(x 2^-k) 2^(kp), the gradient is the scaled problem's
    /// times 2^(k(p - 1)), from its coefficients 2^(k(2 - p)) coefs.
    pub fn backward_scaled(
        &self,
        b: &B,
        coefs: CoefSource<'_, B::Buf>,
        grad_loss: f64,
        k: i32,
    ) -> Result<B::Buf> {
        self.check_rows()?;
        let (n, dim) = (self.rows, self.dim);
        let p = self.power();
        let uploaded;
        let (coef, coef_scale) = match coefs {
            CoefSource::Device { raw, scale } => (raw, scale),
            CoefSource::Host(coefs) => {
                uploaded = b.upload("coef", &coefs.to_dense_f32(n, k * (2 - p)))?;
                (&uploaded, 1.0)
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
            y: b.ptr(y),
            coef: b.ptr(coef).cast(),
            out: b.ptr(&out),
            rows: extent("n", n)?,
            dim: extent("dim", dim)?,
            cosine: cosine as i32,
            grad_scale: (ldexp(grad_loss, k * (p - 1)) * coef_scale) as f32,
        };
        let launch = Launch {
            grid: [blocks_for(n, BWD_ROWS), blocks_for(dim, BWD_THREADS), 1],
            block: [BWD_THREADS as u32, 1, 1],
        };
        b.launch(handles::TRIPLET_BWD_F32, launch, &params, &[&out])?;
        if cosine {
            normalize::backward(b, self.x, &out, n, dim)
        } else {
            Ok(out)
        }
    }
}
