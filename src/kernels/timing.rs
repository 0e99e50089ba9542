//! A short timing of every kernel on a GPU, for scripts/gpu-check.sh: device-resident random
//! inputs, a warm-up launch, then the median of CUDA-event times ([`Backend::timed`]), and the
//! tensor-core NT-Xent measurements (TFLOP/s at a given shape, the largest N that runs).

use super::cuda::Cuda;
use super::{
    clip, infonce, moco, momentum, normalize, queue, similarity, supcon, triplet, Backend, Elem,
};
use crate::shared::{Distance, Mining, Similarity};
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

fn median_ms(cuda: &Cuda, repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?; // warm-up: module load, caches
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        times.push(cuda.timed(&mut run)?.1);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Times `run` (see [`median_ms`]) and records it as one row of the table.
fn time(
    b: &Cuda,
    rows: &mut Vec<KernelTiming>,
    kernel: &'static str,
    shape: String,
    flops: f64,
    repeats: usize,
    run: impl FnMut() -> Result<()>,
) -> Result<()> {
    let median_ms = median_ms(b, repeats, run)?;
    rows.push(KernelTiming {
        kernel,
        shape,
        median_ms,
        flops,
    });
    Ok(())
}

/// NT-Xent on `z` (n x d) as the fused InfoNCE problem: positives i <-> i + n/2, temperature 0.1.
fn ntxent_problem<'a>(
    z: &'a <Cuda as Backend>::Buf,
    positives: &'a <Cuda as Backend>::Buf,
    n: usize,
    d: usize,
) -> infonce::Problem<'a, Cuda> {
    infonce::Problem {
        q: z,
        k: z,
        positives,
        rows: n,
        cols: n,
        dim: d,
        temperature: 0.1,
        normalize: true,
        self_mask: true,
        symmetric: true,
    }
}

/// NT-Xent forward + backward on `z` (n x d, bf16 on the device: the tensor-core kernels),
/// positives i <-> i + n/2, temperature 0.1.
fn ntxent_bf16_call(
    b: &Cuda,
    z: &<Cuda as Backend>::Buf,
    positives: &<Cuda as Backend>::Buf,
    n: usize,
    d: usize,
) -> Result<()> {
    let problem = ntxent_problem(z, positives, n, d);
    let (_, lse) = problem.forward(b)?;
    problem.backward(b, &lse, 1.0).map(drop)
}

/// Uploads an n x d bf16 feature matrix and NT-Xent's positives.
fn ntxent_bf16_inputs(
    b: &Cuda,
    n: usize,
    d: usize,
) -> Result<(<Cuda as Backend>::Buf, <Cuda as Backend>::Buf)> {
    let bits: Vec<u16> = random(n * d, 9)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let z = b.upload_half("z", &bits, Elem::Bf16)?;
    let positives: Vec<i32> = (0..n).map(|i| ((i + n / 2) % n) as i32).collect();
    Ok((z, b.upload_i32("positives", &positives)?))
}

/// NT-Xent forward + backward with bf16 inputs at `n x d` on GPU `ordinal`: the median of
/// `repeats` CUDA-event times, with `flops` = 8 N^2 D (the count of the tensor-core issue:
/// 2 N^2 D forward, 6 N^2 D for a backward that recomputes the scores and forms dQ and dK).
/// contra executes 5 N^2 D of it (the symmetric forward computes half the tiles; the symmetric
/// backward one recomputation and one product dz = (G + G^T) z), so this is useful work per
/// second, as the issue defines it.
pub fn ntxent_bf16(ordinal: usize, n: usize, d: usize, repeats: usize) -> Result<KernelTiming> {
    let cuda = Cuda::get(ordinal)?;
    let b = &*cuda;
    let (z, positives) = ntxent_bf16_inputs(b, n, d)?;
    let median_ms = median_ms(b, repeats, || ntxent_bf16_call(b, &z, &positives, n, d))?;
    Ok(KernelTiming {
        kernel: "ntxent fwd+bwd bf16 (tensor cores)",
        shape: format!("{n}x{d}"),
        median_ms,
        flops: 8.0 * (n as f64) * (n as f64) * d as f64,
    })
}

/// Doubles N from `start` up to `max_n`, one timed call each, until a call fails: the timing
/// of the largest N that ran, and the error that stopped the search (none when `max_n` ran).
pub fn largest_ntxent_bf16(
    ordinal: usize,
    d: usize,
    start: usize,
    max_n: usize,
) -> Result<(Option<KernelTiming>, Option<String>)> {
    let cuda = Cuda::get(ordinal)?;
    let b = &*cuda;
    let mut best = None;
    let mut n = start.max(2);
    while n <= max_n {
        let attempt = ntxent_bf16_inputs(b, n, d)
            .and_then(|(z, positives)| cuda.timed(|| ntxent_bf16_call(b, &z, &positives, n, d)));
        match attempt {
            Ok((_, ms)) => {
                best = Some(KernelTiming {
                    kernel: "ntxent fwd+bwd bf16 (tensor cores)",
                    shape: format!("{n}x{d}"),
                    median_ms: ms,
                    flops: 8.0 * (n as f64) * (n as f64) * d as f64,
                })
            }
            Err(e) => return Ok((best, Some(format!("N = {n}: {e}")))),
        }
        n *= 2;
    }
    Ok((best, None))
}

/// Times normalize, similarity and the fused InfoNCE forward and backward on GPU `ordinal`.
pub fn kernel_timings(ordinal: usize, repeats: usize) -> Result<Vec<KernelTiming>> {
    let cuda = Cuda::get(ordinal)?;
    let b = &*cuda;
    let mut rows = Vec::new();

    let (n, d) = (65536, 128);
    let x = b.upload("x", &random(n * d, 1))?;
    let gy = b.upload("grad_y", &random(n * d, 2))?;
    time(
        b,
        &mut rows,
        "normalize_fwd_f32",
        format!("{n}x{d}"),
        3.0 * (n * d) as f64,
        repeats,
        || normalize::forward(b, &x, n, d).map(drop),
    )?;
    time(
        b,
        &mut rows,
        "normalize_bwd_f32",
        format!("{n}x{d}"),
        6.0 * (n * d) as f64,
        repeats,
        || normalize::backward(b, &x, &gy, n, d).map(drop),
    )?;

    let (m, d) = (4096, 128);
    let a = b.upload("a", &random(m * d, 3))?;
    let c = b.upload("b", &random(m * d, 4))?;
    for kind in [Similarity::Dot, Similarity::Cosine] {
        time(
            b,
            &mut rows,
            "similarity_fwd_f32",
            format!("{m}x{m}x{d} {kind:?}"),
            2.0 * (m * m * d) as f64,
            repeats,
            || similarity::forward(b, &a, &c, (m, m, d), kind).map(drop),
        )?;
    }

    for (n, d, elem) in [
        (8192, 128, Elem::F32),
        (16384, 128, Elem::F32),
        (8192, 512, Elem::F32),
        (16384, 128, Elem::Bf16),
    ] {
        let values = random(n * d, 5);
        let z = if elem == Elem::Bf16 {
            let bits: Vec<u16> = values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            b.upload_half("z", &bits, Elem::Bf16)?
        } else {
            b.upload("z", &values)?
        };
        let dtype = if elem == Elem::Bf16 { "bf16" } else { "f32" };
        let positives: Vec<i32> = (0..n as i32)
            .map(|i| (i + n as i32 / 2) % n as i32)
            .collect();
        let positives = b.upload_i32("positives", &positives)?;
        let problem = ntxent_problem(&z, &positives, n, d);
        let gemm = 2.0 * (n * n * d) as f64;
        time(
            b,
            &mut rows,
            "ntxent forward (normalize + infonce_fwd)",
            format!("{n}x{d} {dtype}"),
            gemm,
            repeats,
            || problem.forward(b).map(drop),
        )?;
        let (_, lse) = problem.forward(b)?;
        time(
            b,
            &mut rows,
            "ntxent backward (2x infonce_bwd + normalize)",
            format!("{n}x{d} {dtype}"),
            4.0 * gemm,
            repeats,
            || problem.backward(b, &lse, 1.0).map(drop),
        )?;
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
    time(
        b,
        &mut rows,
        "moco forward",
        format!("{n}x{queue_len}x{d}"),
        gemm,
        repeats,
        || problem.forward(b).map(drop),
    )?;
    let (_, lse) = problem.forward(b)?;
    time(
        b,
        &mut rows,
        "moco backward (grad q)",
        format!("{n}x{queue_len}x{d}"),
        2.0 * gemm,
        repeats,
        || problem.backward(b, &lse, 1.0).map(drop),
    )?;
    time(
        b,
        &mut rows,
        "queue_enqueue_f32",
        format!("{n}x{d} into {queue_len}"),
        3.0 * (n * d) as f64,
        repeats,
        || queue::enqueue(b, &queue, &k, n, queue_len, d, 1000).map(drop),
    )?;

    // SupCon: 4096 samples x 2 views, 100 classes.
    let (samples, views, d) = (4096, 2, 128);
    let rows_total = samples * views;
    let features = b.upload("features", &random(rows_total * d, 9))?;
    let labels: Vec<i64> = (0..samples as i64).map(|i| i % 100).collect();
    let (class, weight) = crate::shared::Classes::new(&labels, views).for_kernels();
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
    time(
        b,
        &mut rows,
        "supcon forward",
        format!("{samples}x{views}x{d}"),
        gemm,
        repeats,
        || problem.forward(b).map(drop),
    )?;
    let (_, lse) = problem.forward(b)?;
    time(
        b,
        &mut rows,
        "supcon backward",
        format!("{samples}x{views}x{d}"),
        4.0 * gemm,
        repeats,
        || problem.backward(b, &lse, 1.0).map(drop),
    )?;

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
        log_scale: super::clip::LogScale::Value((1.0f64 / 0.07).ln()),
    };
    let gemm = 2.0 * (n * n * d) as f64;
    time(
        b,
        &mut rows,
        "clip forward (row + column LSE, one sweep)",
        format!("{n}x{d}"),
        gemm,
        repeats,
        || problem.forward(b).map(drop),
    )?;
    let fwd = problem.forward(b)?;
    time(
        b,
        &mut rows,
        "clip backward",
        format!("{n}x{d}"),
        4.0 * gemm,
        repeats,
        || {
            problem
                .backward(b, &fwd.row_lse, &fwd.col_lse, 1.0)
                .map(drop)
        },
    )?;

    // Triplet mining over a 4096-row batch with 64 classes (pair matrix, mining, backward).
    let (n, d) = (4096, 128);
    let x = b.upload("x", &random(n * d, 14))?;
    let class: Vec<i32> = (0..n as i32).map(|i| i % 64).collect();
    let labels = b.upload_i32("labels", &class)?;
    for mining in [Mining::BatchAll, Mining::BatchHard, Mining::SemiHard] {
        let problem = triplet::Problem::<Cuda> {
            x: &x,
            rows: n,
            dim: d,
            distance: Distance::Euclidean,
            mining,
            margin: 0.2,
        };
        let pairs = 2.0 * (n * n * d) as f64;
        time(
            b,
            &mut rows,
            "triplet forward (row scale + similarity + triplet_mine)",
            format!("{n}x{d} {mining:?}"),
            pairs,
            repeats,
            || problem.forward(b, &labels).map(drop),
        )?;
        let mined = problem.forward(b, &labels)?;
        let status = super::status::status_words(b, 1)?;
        problem.finish(b, &mined, &status, 0)?;
        time(
            b,
            &mut rows,
            "triplet backward (triplet_bwd)",
            format!("{n}x{d} {mining:?}"),
            pairs,
            repeats,
            || {
                let source = triplet::CoefSource::Device {
                    coef: &mined.coef,
                    summary: &mined.summary,
                };
                problem.backward(b, source, 1.0).map(drop)
            },
        )?;
    }

    // Momentum over 25M parameters (a ResNet-50-sized encoder).
    let len = 25_000_000;
    let (theta_k, theta_q) = (
        b.upload("theta_k", &random(len, 10))?,
        b.upload("theta_q", &random(len, 11))?,
    );
    time(
        b,
        &mut rows,
        "momentum_update_f32",
        format!("{len}"),
        3.0 * len as f64,
        repeats,
        || momentum::update(b, &theta_k, &theta_q, len, 0.999),
    )?;
    Ok(rows)
}
