//! The CPU backend: plain Rust on all cores. It is the oracle the kernels are checked against and
//! what a machine without a GPU runs. Softmax-style losses never build an N x N matrix: they walk
//! row tiles (in parallel) and key tiles (in order), keeping a running max and log-sum-exp, and the
//! backward recomputes the probabilities tile by tile.
//!
//! Functions here take plain slices with their sizes already validated by `crate::ops`.

pub mod clip;
pub mod gemm;
pub mod infonce;
pub mod margin;
pub mod moco;
pub mod momentum;
pub mod nce;
pub mod normalize;
pub mod siglip;
mod simd;
pub mod similarity;
pub mod softmax;
pub mod supcon;
pub mod triplet;

use crate::shared::ldexp;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

use crate::tensor::Element;

/// The float types the CPU backend computes in (f32 and f64).
pub trait Real:
    Element + num_traits::Float + gemm::Gemm + Sum + AddAssign + SubAssign + MulAssign + Default
{
    fn of(value: f64) -> Self {
        <Self as Element>::from_f64(value)
    }
    fn f64(self) -> f64 {
        <Self as Element>::to_f64(self)
    }
    /// `exp(self)` for the softmax inner loops: branch-free so the loops vectorize (f32), exact
    /// `exp` in f64, where the CPU backend is the reference.
    fn exp_fast(self) -> Self {
        self.exp()
    }
    /// `(softplus(self), sigmoid(self))` for the SigLIP sweeps: branch-free so the loops
    /// vectorize (f32), exact in f64.
    fn softplus_sigmoid(self) -> (Self, Self) {
        let x = self.f64();
        (Self::of(softplus(x)), Self::of(sigmoid(x)))
    }
    /// `softplus(self)` alone, likewise.
    fn softplus(self) -> Self {
        Self::of(softplus(self.f64()))
    }
}

impl Real for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }

    #[inline(always)]
    fn softplus_sigmoid(self) -> (f32, f32) {
        // e = exp(-|x|) in (0, 1]: softplus(x) = max(x, 0) + ln(1 + e), and sigmoid(x) is
        // 1 / (1 + e) or e / (1 + e) by the sign, neither of which overflows.
        let e = exp_f32(-self.abs());
        let inv = 1.0 / (1.0 + e);
        let sigmoid = if self >= 0.0 { inv } else { e * inv };
        (self.max(0.0) + ln_1p_unit(e), sigmoid)
    }

    #[inline(always)]
    fn softplus(self) -> f32 {
        self.max(0.0) + ln_1p_unit(exp_f32(-self.abs()))
    }
}

/// `ln(1 + t)` for `t` in [0, 1] within about 1 ulp of f32, as straight-line code: `2 atanh(u)`
/// with `u = t / (2 + t)` in [0, 1/3], by its odd series to `u^15` (the next term is under
/// 2e-9 relative).
#[inline(always)]
pub fn ln_1p_unit(t: f32) -> f32 {
    let u = t / (2.0 + t);
    let u2 = u * u;
    let series = 1.0
        + u2 * (1.0 / 3.0
            + u2 * (1.0 / 5.0
                + u2 * (1.0 / 7.0
                    + u2 * (1.0 / 9.0 + u2 * (1.0 / 11.0 + u2 * (1.0 / 13.0 + u2 / 15.0))))));
    2.0 * u * series
}
impl Real for f64 {}

/// `exp(x)` in f32 within about 2 ulp, as straight-line code that LLVM vectorizes (libm's `expf`
/// is a call per element and dominated the softmax sweeps). `exp(-inf) = 0`, as masked logits
/// need; inputs above 88 saturate to `exp(88)` (logits are shifted by their row max first, so
/// they are <= 0 where this is used).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for |k| < 2^9 (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the FPU's round-to-nearest mode (SSE2 has no
    // vector round instruction).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let rounded = xc * LOG2E + ROUND;
    let k = rounded - ROUND;
    // The integer k sits in the low mantissa bits of `rounded`: read it with integer ops (a
    // float-to-int `as` cast saturates lane by lane and does not vectorize).
    let k_int = (rounded.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // exp(r) on |r| <= ln(2) / 2 by its Taylor series to degree 6 (error < 1.2e-7 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((k_int + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// The sum of `values` over eight independent lanes (vectorizes; the order is fixed, so the
/// result is deterministic).
#[inline]
pub fn lane_sum<T: Real>(values: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    let mut total = tail.iter().fold(T::zero(), |acc, &v| acc + v);
    for lane in lanes {
        total += lane;
    }
    total
}

/// Rows per parallel task in the GEMM-tiled ops (similarity, triplet distances).
pub const ROW_TILE: usize = 128;
/// Keys per tile of the softmax and SigLIP sweeps: a `sweep_rows x KEY_TILE` score block (1 MiB
/// of f32) stays in L2.
pub const KEY_TILE: usize = 1024;
/// The most rows per task of the softmax and SigLIP sweeps.
const MAX_SWEEP_ROWS: usize = 256;

/// Rows per parallel task of the softmax and SigLIP sweeps: up to 256, because a tall tile
/// amortizes the packing of each key tile and gives the key-gradient GEMM a deep inner dimension
/// (CLIP fwd+bwd at N = 1024 on 2 cores: 8.5 ms with 128 x 512 tiles, 6.5 ms with 256 x 1024),
/// but no more than splits the rows evenly over the threads, so none idles.
pub fn sweep_rows(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads())
        .next_multiple_of(8)
        .clamp(8, MAX_SWEEP_ROWS)
}

/// `norm(x) = max(||x||_2, 1e-12)` as the losses define it.
pub const NORM_EPS: f64 = 1e-12;

/// Euclidean norm of a row, accumulated in f64. Right for every finite row whose norm is a finite
/// f64 (f64 rows up to ~1e308): when the plain sum of squares overflows (or falls below f64's
/// normal range), the row is summed again scaled by a power of two (exact) chosen from its largest
/// magnitude, and the norm is scaled back.
pub fn row_norm<T: Real>(row: &[T]) -> f64 {
    let sq = row.iter().map(|&v| v.f64() * v.f64()).sum::<f64>();
    if sq.is_finite() && sq >= f64::MIN_POSITIVE {
        return sq.sqrt();
    }
    let max = max_abs(row);
    if max == 0.0 || !max.is_finite() {
        return if max == 0.0 { 0.0 } else { sq.sqrt() };
    }
    let e = exponent(max);
    let scaled = row
        .iter()
        .map(|&v| {
            let t = ldexp(v.f64(), -e);
            t * t
        })
        .sum::<f64>();
    ldexp(scaled.sqrt(), e)
}

/// The largest `|v|` of a row, in f64.
pub fn max_abs<T: Real>(row: &[T]) -> f64 {
    row.iter().fold(0.0f64, |m, &v| m.max(v.f64().abs()))
}

/// `e` with `|v| = m 2^e`, `m` in [0.5, 1), for a finite nonzero `v` (subnormals included).
pub fn exponent(v: f64) -> i32 {
    let biased = ((v.to_bits() >> 52) & 0x7ff) as i32;
    if biased == 0 {
        // Subnormal: normalize first.
        return exponent(v * TWO_POW_64) - 64;
    }
    biased - 1022
}

const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

/// Dot product accumulated in f64.
pub fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.f64() * y.f64()).sum()
}

/// `log(1 + exp(x))` without overflow.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// The logistic function.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// exp_f32 against f64 exp over the whole range the softmax uses, plus its edge cases.
    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64) - want).abs() / want;
            worst = worst.max(rel);
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn row_norm_is_right_at_every_scale() {
        let close = |got: f64, want: f64| {
            assert!((got - want).abs() <= 1e-15 * want, "{got:e} != {want:e}")
        };
        assert_eq!(row_norm(&[3.0f64, 4.0]), 5.0);
        close(row_norm(&[3e200f64, 4e200]), 5e200);
        close(row_norm(&[3e-200f64, 4e-200]), 5e-200);
        close(row_norm(&[1.2e308f64, -1e308]), 1.2e308f64.hypot(1e308));
        assert_eq!(row_norm(&[1e308f64; 4]), f64::INFINITY);
        assert_eq!(row_norm(&[0.0f64, 0.0]), 0.0);
        assert!((row_norm(&[3e19f32, 4e19]) - 5e19).abs() <= 1e-7 * 5e19);
        assert_eq!(ldexp(1.0, -1074), f64::from_bits(1));
        assert_eq!(ldexp(ldexp(3.0, 1000), -1500), 3.0 * 2f64.powi(-500));
        assert_eq!(ldexp(3.0, 1100), f64::INFINITY);
        assert_eq!(exponent(f64::from_bits(1)), -1073);
        assert_eq!(exponent(1.0), 1);
        assert_eq!(exponent(0.75), 0);
    }

    /// The f32 softplus / sigmoid against f64 over logits of both signs and large magnitude.
    #[test]
    fn softplus_sigmoid_f32_is_accurate() {
        let (mut worst_softplus, mut worst_sigmoid) = (0.0f64, 0.0f64);
        let mut x = -120.0f32;
        while x <= 120.0 {
            let (sp, sg) = x.softplus_sigmoid();
            let (want_sp, want_sg) = (softplus(x as f64), sigmoid(x as f64));
            // Below exp(-87) both are 0 in f32: an absolute error under 1e-37 there.
            let err = |got: f32, want: f64| {
                let err = (got as f64 - want).abs();
                if want > 1e-37 {
                    err / want
                } else {
                    err
                }
            };
            worst_softplus = worst_softplus.max(err(sp, want_sp));
            worst_sigmoid = worst_sigmoid.max(err(sg, want_sg));
            x += 0.0013;
        }
        assert!(worst_softplus < 4e-7, "softplus: {worst_softplus:e}");
        assert!(worst_sigmoid < 4e-7, "sigmoid: {worst_sigmoid:e}");
        assert_eq!(ln_1p_unit(0.0), 0.0);
        assert!((ln_1p_unit(1.0) as f64 - 2f64.ln()).abs() < 1e-7);
    }

    #[test]
    fn lane_sum_adds_every_value() {
        let v: Vec<f32> = (1..=21).map(|i| i as f32).collect();
        assert_eq!(lane_sum(&v), 231.0);
        assert_eq!(lane_sum::<f32>(&[]), 0.0);
    }
}
