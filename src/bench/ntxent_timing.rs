//! The tensor-core NT-Xent measurements through the public API: `ntxent` forward + backward
//! on bf16 features already on the device, each call ending with the read of its loss (what a
//! training step waits for), at one shape (median wall time, TFLOP/s over 8 N^2 D) and the
//! largest N that runs. `contra ntxent-timing` prints them; `scripts/gpu-run.sh` runs it.

use std::time::Instant;

use super::cases::uniform;
use crate::{ntxent, DType, Device, NtXentOptions, Result, Tensor};

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

/// `n x d` bf16 features on `device` (uniform in [-1, 1), seed 9).
fn features(n: usize, d: usize, device: Device) -> Result<Tensor> {
    let len = crate::tensor::checked_numel("ntxent-timing", "z", &[n, d], DType::Bf16)?;
    Tensor::from_vec(uniform(len, 9), &[n, d], device)?.to_dtype(DType::Bf16)
}

/// One forward + backward, its loss read.
fn call(z: &Tensor) -> Result<f64> {
    let out = ntxent(z, &NtXentOptions { temperature: 0.1 })?;
    out.loss.to_scalar()
}

/// The median of `repeats` timed calls at `n x d` on `device`, after one untimed warm-up call.
pub fn at_shape(device: Device, n: usize, d: usize, repeats: usize) -> Result<NtXentTiming> {
    let z = features(n, d, device)?;
    call(&z)?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        call(&z)?;
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
) -> (Option<NtXentTiming>, Option<String>) {
    let mut best = None;
    let mut n = start.max(2);
    while n <= max_n {
        match at_shape(device, n, d, 1) {
            Ok(t) => best = Some(t),
            Err(e) => return (best, Some(format!("N = {n}: {e}"))),
        }
        n *= 2;
    }
    (best, None)
}
