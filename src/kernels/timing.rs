//! A short timing of every kernel on a GPU, for scripts/gpu-check.sh: device-resident random
//! inputs, a warm-up launch, then the median wall time of synchronized launches.

use std::time::Instant;

use super::cuda::Cuda;
use super::{clip, infonce, moco, momentum, normalize, queue, similarity, supcon, Backend};
use crate::ops::Similarity;
use crate::Result;

/// One timed kernel launch sequence.
pub struct KernelTiming {
    pub kernel: &'static str,
    pub shape: String,
    pub median_ms: f64,
    /// Useful floating-point work per call (multiply-add = 2), for GFLOP/s.
    pub flops: f64,
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn median_ms(repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?; // warm-up: module load, caches
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Times normalize, similarity and the fused InfoNCE forward and backward on GPU `ordinal`.
pub fn kernel_timings(ordinal: usize, repeats: usize) -> Result<Vec<KernelTiming>> {
    let cuda = Cuda::get(ordinal)?;
    let b = &*cuda;
    let mut rows = Vec::new();

    let (n, d) = (65536, 128);
    let x = b.upload("x", &random(n * d, 1))?;
    let gy = b.upload("grad_y", &random(n * d, 2))?;
    let ms = median_ms(repeats, || normalize::forward(b, &x, n, d).map(drop))?;
    rows.push(KernelTiming {
        kernel: "normalize_fwd_f32",
        shape: format!("{n}x{d}"),
        median_ms: ms,
        flops: 3.0 * (n * d) as f64,
    });
    let ms = median_ms(repeats, || normalize::backward(b, &x, &gy, n, d).map(drop))?;
    rows.push(KernelTiming {
        kernel: "normalize_bwd_f32",
        shape: format!("{n}x{d}"),
        median_ms: ms,
        flops: 6.0 * (n * d) as f64,
    });

    let (m, d) = (4096, 128);
    let a = b.upload("a", &random(m * d, 3))?;
    let c = b.upload("b", &random(m * d, 4))?;
    for kind in [Similarity::Dot, Similarity::Cosine] {
        let ms = median_ms(repeats, || {
            similarity::forward(b, &a, &c, (m, m, d), kind).map(drop)
        })?;
        rows.push(KernelTiming {
            kernel: "similarity_fwd_f32",
            shape: format!("{m}x{m}x{d} {kind:?}"),
            median_ms: ms,
            flops: 2.0 * (m * m * d) as f64,
        });
    }

    for (n, d) in [(8192, 128), (16384, 128), (8192, 512)] {
        let z = b.upload("z", &random(n * d, 5))?;
        let positives: Vec<i32> = (0..n as i32)
            .map(|i| (i + n as i32 / 2) % n as i32)
            .collect();
        let positives = b.upload_i32("positives", &positives)?;
        let problem = infonce::Problem::<Cuda> {
            q: &z,
            k: &z,
            positives: &positives,
            rows: n,
            cols: n,
            dim: d,
            temperature: 0.1,
            normalize: true,
            self_mask: true,
        };
        let gemm = 2.0 * (n * n * d) as f64;
        let ms = median_ms(repeats, || problem.forward(b).map(drop))?;
        rows.push(KernelTiming {
            kernel: "ntxent forward (normalize + infonce_fwd_f32)",
            shape: format!("{n}x{d}"),
            median_ms: ms,
            flops: gemm,
        });
        let (_, lse) = problem.forward(b)?;
        let ms = median_ms(repeats, || problem.backward(b, &lse, 1.0, true).map(drop))?;
        rows.push(KernelTiming {
            kernel: "ntxent backward (2x infonce_bwd_f32 + normalize)",
            shape: format!("{n}x{d}"),
            median_ms: ms,
            flops: 4.0 * gemm,
        });
    }
    // MoCo at the reference shape of the benchmark issue: N = 256 queries, K = 65536 negatives.
    let (n, queue_len, d) = (256, 65536, 128);
    let (q, k) = (
        b.upload("q", &random(n * d, 6))?,
        b.upload("k", &random(n * d, 7))?,
    );
    let queue = b.upload("queue", &random(queue_len * d, 8))?;
    let problem = moco::Moco::<Cuda> {
        q: &q,
        k: &k,
        queue: &queue,
        rows: n,
        queue_len,
        dim: d,
        temperature: 0.2,
    };
    let gemm = 2.0 * (n * queue_len * d) as f64;
    let ms = median_ms(repeats, || problem.forward(b).map(drop))?;
    rows.push(KernelTiming {
        kernel: "moco forward",
        shape: format!("{n}x{queue_len}x{d}"),
        median_ms: ms,
        flops: gemm,
    });
    let (_, lse) = problem.forward(b)?;
    let ms = median_ms(repeats, || problem.backward(b, &lse, 1.0).map(drop))?;
    rows.push(KernelTiming {
        kernel: "moco backward (grad q)",
        shape: format!("{n}x{queue_len}x{d}"),
        median_ms: ms,
        flops: 2.0 * gemm,
    });
    let ms = median_ms(repeats, || {
        queue::enqueue(b, &queue, &k, n, queue_len, d, 1000).map(drop)
    })?;
    rows.push(KernelTiming {
        kernel: "queue_enqueue_f32",
        shape: format!("{n}x{d} into {queue_len}"),
        median_ms: ms,
        flops: 3.0 * (n * d) as f64,
    });

    // SupCon: 4096 samples x 2 views, 100 classes.
    let (samples, views, d) = (4096, 2, 128);
    let rows_total = samples * views;
    let features = b.upload("features", &random(rows_total * d, 9))?;
    let labels: Vec<i64> = (0..samples as i64).map(|i| i % 100).collect();
    let classes = crate::cpu::supcon::Classes::new(&labels, views);
    let class: Vec<i32> = classes.class.iter().map(|&c| c as i32).collect();
    let weight: Vec<f32> = classes.inv_positives.iter().map(|&w| w as f32).collect();
    let (labels, weight) = (
        b.upload_i32("labels", &class)?,
        b.upload("target_weight", &weight)?,
    );
    let problem = supcon::SupCon::<Cuda> {
        views: &features,
        labels: &labels,
        target_weight: &weight,
        rows: rows_total,
        dim: d,
        temperature: 0.1,
        base_temperature: 0.07,
    };
    let gemm = 2.0 * (rows_total * rows_total * d) as f64;
    let ms = median_ms(repeats, || problem.forward(b).map(drop))?;
    rows.push(KernelTiming {
        kernel: "supcon forward",
        shape: format!("{samples}x{views}x{d}"),
        median_ms: ms,
        flops: gemm,
    });
    let (_, lse) = problem.forward(b)?;
    let ms = median_ms(repeats, || problem.backward(b, &lse, 1.0).map(drop))?;
    rows.push(KernelTiming {
        kernel: "supcon backward",
        shape: format!("{samples}x{views}x{d}"),
        median_ms: ms,
        flops: 4.0 * gemm,
    });

    // CLIP: 8192 image-text pairs, D = 512.
    let (n, d) = (8192, 512);
    let (a, c) = (
        b.upload("a", &random(n * d, 12))?,
        b.upload("b", &random(n * d, 13))?,
    );
    let diagonal: Vec<i32> = (0..n as i32).collect();
    let diagonal = b.upload_i32("diagonal", &diagonal)?;
    let problem = clip::Clip::<Cuda> {
        a: &a,
        b: &c,
        diagonal: &diagonal,
        rows: n,
        dim: d,
        log_scale: (1.0f64 / 0.07).ln(),
    };
    let gemm = 2.0 * (n * n * d) as f64;
    let ms = median_ms(repeats, || problem.forward(b).map(drop))?;
    rows.push(KernelTiming {
        kernel: "clip forward (row + column LSE, one sweep)",
        shape: format!("{n}x{d}"),
        median_ms: ms,
        flops: gemm,
    });
    let (_, lse) = problem.forward(b)?;
    let ms = median_ms(repeats, || {
        problem.backward(b, &lse.rows, &lse.cols, 1.0).map(drop)
    })?;
    rows.push(KernelTiming {
        kernel: "clip backward",
        shape: format!("{n}x{d}"),
        median_ms: ms,
        flops: 4.0 * gemm,
    });

    // Momentum over 25M parameters (a ResNet-50-sized encoder).
    let len = 25_000_000;
    let (theta_k, theta_q) = (
        b.upload("theta_k", &random(len, 10))?,
        b.upload("theta_q", &random(len, 11))?,
    );
    let ms = median_ms(repeats, || {
        momentum::update(b, &theta_k, &theta_q, len, 0.999)
    })?;
    rows.push(KernelTiming {
        kernel: "momentum_update_f32",
        shape: format!("{len}"),
        median_ms: ms,
        flops: 3.0 * len as f64,
    });
    Ok(rows)
}
