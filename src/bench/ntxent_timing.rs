//! The tensor-core NT-Xent measurements through the public API: `ntxent` forward + backward
//! on features already on the device (bf16, or f32 multiplied as tf32), each call ending with the read of its loss (what a
//! training step waits for), at one shape (median wall time, TFLOP/s over 8 N^2 D) and the
//! largest N that runs. `contra ntxent-timing` prints them; `scripts/gpu-run.sh` runs it.

use std::time::Instant;

use super::cases::{uniform, Precision};
use crate::{ntxent, with_f32_precision, DType, Device, NtXentOptions, Result, Tensor};

/// One timed shape.
#[derive(Clone, Debug)]
pub struct NtXentTiming {
    pub n: usize,
    pub d: usize,
    /// The median over the timed calls, milliseconds.
    pub median_ms: f64,
}

impl NtXentTiming {
    /// The useful work of a forward + backward, 8 N^2 D (2 for the forward's scores, 6 for a
    /// backward that recomputes them and forms dQ and dK; contra's symmetric passes execute
    /// 5 N^2 D of it), per second, in TFLOP/s.
    pub fn tflops(&self) -> f64 {
        8.0 * (self.n as f64).powi(2) * self.d as f64 / self.median_ms / 1e9
    }
}

/// `n x d` features on `device` (uniform in [-1, 1), seed 9): bf16 for `Precision::Bf16`,
/// else f32.
fn features(n: usize, d: usize, device: Device, precision: Precision) -> Result<Tensor> {
    let dtype = match precision {
        Precision::Bf16 => DType::Bf16,
        Precision::F32 | Precision::Tf32 => DType::F32,
    };
    let len = crate::tensor::checked_numel("ntxent-timing", "z", &[n, d], dtype)?;
    Tensor::from_vec(uniform(len, 9), &[n, d], device)?.to_dtype(dtype)
}

/// One forward + backward at `precision`, its loss read.
fn call(z: &Tensor, precision: Precision) -> Result<f64> {
    with_f32_precision(precision.f32_precision(), || {
        let out = ntxent(z, &NtXentOptions { temperature: 0.1 })?;
        out.loss.to_scalar()
    })
}

/// The median of `repeats` timed calls at `n x d` on `device`, after one untimed warm-up call.
pub fn at_shape(
    device: Device,
    n: usize,
    d: usize,
    repeats: usize,
    precision: Precision,
) -> Result<NtXentTiming> {
    let z = features(n, d, device, precision)?;
    call(&z, precision)?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        call(&z, precision)?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(NtXentTiming {
        n,
        d,
        median_ms: times[times.len() / 2],
    })
}

/// Doubles N from `start` to `max_n`, one timed call each (after a warm-up at `start`), until
/// a call fails: the largest N that ran and the error that stopped the search (none when
/// `max_n` ran).
pub fn largest(
    device: Device,
    d: usize,
    start: usize,
    max_n: usize,
    precision: Precision,
) -> (Option<NtXentTiming>, Option<String>) {
    let mut best = None;
    let mut n = start.max(2);
    while n <= max_n {
        match at_shape(device, n, d, 1, precision) {
            Ok(t) => best = Some(t),
            Err(e) => return (best, Some(format!("N = {n}: {e}"))),
        }
        n *= 2;
    }
    (best, None)
}
