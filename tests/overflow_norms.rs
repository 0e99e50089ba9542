//! Overflow-safe arithmetic on every backend (issue 13, part 2): a finite input whose result is
//! representable gets that result on the CPU backend and on the kernels (interpreted mode, and
//! the GPU where there is one), never a silent 0, NaN or infinity; a result beyond the output's
//! range is an error naming the argument.
//!
//! The references are computed here in f64 (rows divided by their largest magnitude before
//! squaring where a plain f64 sum could overflow). Shapes are not multiples of any tile size, and
//! batches mix row scales, so that the rescaling of one row must not disturb another: a 64-row
//! similarity tile with one huge row takes the scaled path for all of its rows.

mod common;

use common::kernel_devices;
use contra::{
    margin_backward, margin_forward, moco_enqueue, normalize, normalize_backward, similarity,
    triplet, DType, Device, Distance, Error, MarginOptions, Mining, Similarity, Tensor,
    TripletOptions, TripletOutput,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DIM: usize = 33;

/// The CPU backend and every kernel device of this machine.
fn devices(test: &str) -> Vec<Device> {
    let mut all = vec![Device::Cpu];
    all.extend(kernel_devices(test));
    all
}

fn t32(values: &[f32], shape: &[usize], device: Device) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, device).unwrap()
}

fn t64(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, Device::Cpu).unwrap()
}

fn f64s(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// `2^k`, exact.
fn pow2(k: i32) -> f64 {
    2f64.powi(k)
}

/// The Euclidean norm of `v` in f64 at any scale.
fn norm(v: &[f64]) -> f64 {
    let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if max == 0.0 {
        return 0.0;
    }
    max * v.iter().map(|x| (x / max).powi(2)).sum::<f64>().sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `||got - want|| / max(||want||, tiny)`; NaN or a length mismatch gives infinity.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().chain(want).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    norm(&diff) / norm(want).max(1e-300)
}

/// Checks each row of a `rows x dim` output on its own (rows of very different scales).
#[track_caller]
fn assert_rows_close(got: &[f64], want: &[f64], dim: usize, tol: f64, case: &str) {
    assert_eq!(got.len(), want.len(), "{case}: length");
    for (r, (g, w)) in got.chunks(dim).zip(want.chunks(dim)).enumerate() {
        let err = rel_err(g, w);
        assert!(
            err <= tol,
            "{case}: row {r} relative error {err:e} > {tol:e}\n got {:?}\nwant {:?}",
            &g[..g.len().min(4)],
            &w[..w.len().min(4)]
        );
    }
}

/// A `rows x dim` f32 matrix whose row `r` is uniform in [-1, 1) times `scales[r % len]`.
fn scaled_rows(rng: &mut StdRng, rows: usize, scales: &[f64]) -> Vec<f32> {
    (0..rows * DIM)
        .map(|i| ((2.0 * rng.random::<f64>() - 1.0) * scales[(i / DIM) % scales.len()]) as f32)
        .collect()
}

/// Row scales that pass the f32 sum of squares (norms above 2^63 ~ 9.2e18) mixed with normal ones
/// and rows so small that the 1e-12 norm clamp holds (not so small that their products are f32
/// subnormals, whose precision no overflow handling can restore).
const MIXED: [f64; 10] = [1e-3, 1.0, 3e19, 1e20, 1e25, 1e30, 1e36, 3e38, 1e-17, 1e-14];

/// `x / max(||x||, 1e-12)` per row, in f64.
fn ref_normalize(x: &[f64], dim: usize) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|row| {
            let n = norm(row).max(1e-12);
            row.iter().map(move |v| v / n)
        })
        .collect()
}

/// `(dy - y (y . dy)) / max(||x||, 1e-12)` per row, in f64.
fn ref_normalize_backward(x: &[f64], gy: &[f64], dim: usize) -> Vec<f64> {
    x.chunks(dim)
        .zip(gy.chunks(dim))
        .flat_map(|(row, g)| {
            let n = norm(row).max(1e-12);
            let y: Vec<f64> = row.iter().map(|v| v / n).collect();
            let y_dot_g = dot(&y, g);
            y.iter()
                .zip(g)
                .map(|(yv, gv)| (gv - yv * y_dot_g) / n)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn is_invalid(err: &Error, arg: &str) -> bool {
    matches!(err, Error::InvalidArgument { arg: a, .. } if *a == arg)
}

/// `err` says that the result `what` overflows the output's precision.
fn is_overflow(err: &Error, what: &str) -> bool {
    matches!(err, Error::Overflow { what: w, .. } if *w == what)
}

// ---------------------------------------------------------------------------------------------
// normalize, normalize_backward and the MoCo queue

/// Issue 13's reproducer: the interpreted kernels gave [0, 0] (the f32 sum of squares overflows).
#[test]
fn normalize_of_3e19_4e19_is_0_6_0_8() {
    for device in devices("normalize_of_3e19_4e19_is_0_6_0_8") {
        let y = normalize(&t32(&[3e19, 4e19], &[1, 2], device))
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert!(
            (y[0] - 0.6).abs() <= 1e-7 && (y[1] - 0.8).abs() <= 1e-7,
            "{device}: {y:?}"
        );
    }
    let y = normalize(&t64(&[3e200, 4e200], &[1, 2]))
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    assert!(
        (y[0] - 0.6).abs() <= 1e-15 && (y[1] - 0.8).abs() <= 1e-15,
        "{y:?}"
    );
}

/// Huge rows (1e20 .. 3e38), normal rows and clamped tiny rows in one batch, forward and backward
/// (the upstream gradient too is huge on some rows: its own sum of squares overflows).
#[test]
fn normalize_is_right_for_mixed_row_scales() {
    let (rows, mut rng) = (67, StdRng::seed_from_u64(0x1301));
    let x = scaled_rows(&mut rng, rows, &MIXED);
    // dy of norm ~1e25 (its own sum of squares overflows) on every other run of ten rows, so
    // that it meets every row scale of x; every gradient stays within f32's range.
    let gy: Vec<f32> = scaled_rows(&mut rng, rows, &[1.0])
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if (i / DIM / MIXED.len()) % 2 == 1 {
                v * 1e25
            } else {
                v
            }
        })
        .collect();
    let want_y = ref_normalize(&f64s(&x), DIM);
    let want_gx = ref_normalize_backward(&f64s(&x), &f64s(&gy), DIM);
    for device in devices("normalize_is_right_for_mixed_row_scales") {
        let xt = t32(&x, &[rows, DIM], device);
        let y = normalize(&xt).unwrap().to_vec_f64().unwrap();
        assert_rows_close(&y, &want_y, DIM, 1e-6, &format!("normalize on {device}"));
        let gx = normalize_backward(&xt, &t32(&gy, &[rows, DIM], device))
            .unwrap()
            .to_vec_f64()
            .unwrap();
        // Rows of norm ~1e39 have gradients ~1e-39: f32 subnormals, good to ~1e-6.
        let case = format!("normalize_backward on {device}");
        assert_rows_close(&gx, &want_gx, DIM, 1e-5, &case);
    }
}

/// Rows whose norm (~1.5e40) is itself beyond f32 while every entry of y is an ordinary f32: y
/// must not go through the reciprocal norm, a subnormal f32 with ~5 digits.
#[test]
fn normalize_rows_whose_norm_exceeds_f32_max() {
    let (rows, dim) = (3, 4099);
    let mut rng = StdRng::seed_from_u64(0x1310);
    let x: Vec<f32> = (0..rows * dim)
        .map(|_| {
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            (sign * rng.random_range(1e38..3.4e38)) as f32
        })
        .collect();
    let want = ref_normalize(&f64s(&x), dim);
    assert!(norm(&f64s(&x[..dim])) > 1e40);
    for device in devices("normalize_rows_whose_norm_exceeds_f32_max") {
        let y = normalize(&t32(&x, &[rows, dim], device))
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert_rows_close(&y, &want, dim, 1e-6, &format!("normalize on {device}"));
    }
}

/// bf16 rows keep f32's exponent range: the bf16 kernels need the scaled path too.
#[test]
fn normalize_bf16_huge_rows() {
    let (rows, mut rng) = (67, StdRng::seed_from_u64(0x1302));
    let x = scaled_rows(&mut rng, rows, &MIXED);
    let xb = t32(&x, &[rows, DIM], Device::Cpu)
        .to_dtype(DType::Bf16)
        .unwrap();
    let want = ref_normalize(&xb.to_vec_f64().unwrap(), DIM);
    for device in devices("normalize_bf16_huge_rows") {
        let y = normalize(&xb.to_device(device).unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert_rows_close(&y, &want, DIM, 1e-2, &format!("bf16 normalize on {device}"));
    }
}

/// The CPU's f64 path at f64's extremes (kernels compute in f32, where such values do not fit).
#[test]
fn normalize_f64_rows_up_to_1e307() {
    let (rows, mut rng) = (67, StdRng::seed_from_u64(0x1303));
    let scales = [1e-300, 1e-200, 1e-3, 1.0, 1e160, 1e200, 1e300, 1e307];
    let x: Vec<f64> = (0..rows * DIM)
        .map(|i| (2.0 * rng.random::<f64>() - 1.0) * scales[(i / DIM) % scales.len()])
        .collect();
    let gy: Vec<f64> = (0..rows * DIM)
        .map(|_| 2.0 * rng.random::<f64>() - 1.0)
        .collect();
    let xt = t64(&x, &[rows, DIM]);
    let y = normalize(&xt).unwrap().to_vec_f64().unwrap();
    assert_rows_close(&y, &ref_normalize(&x, DIM), DIM, 1e-13, "f64 normalize");
    let gx = normalize_backward(&xt, &t64(&gy, &[rows, DIM]))
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let want = ref_normalize_backward(&x, &gy, DIM);
    // 1e307-scale rows have gradients ~1e-308: f64 subnormals.
    assert_rows_close(&gx, &want, DIM, 1e-6, "f64 normalize_backward");
}

/// The MoCo enqueue normalizes keys in its own kernel (queue.cu).
#[test]
fn moco_enqueue_normalizes_huge_keys() {
    let (queue_len, keys, ptr) = (10, 7, 5);
    let mut rng = StdRng::seed_from_u64(0x1304);
    let queue = scaled_rows(&mut rng, queue_len, &[1.0]);
    let k = scaled_rows(&mut rng, keys, &[1e20, 3e38, 1e-3, 1e30, 1e-20, 3e19, 1.0]);
    let want = ref_normalize(&f64s(&k), DIM);
    for device in devices("moco_enqueue_normalizes_huge_keys") {
        let mut q = t32(&queue, &[queue_len, DIM], device);
        let next = moco_enqueue(&mut q, &t32(&k, &[keys, DIM], device), ptr).unwrap();
        assert_eq!(next, (ptr + keys) % queue_len);
        let got = q.to_vec_f64().unwrap();
        for i in 0..keys {
            let slot = (ptr + i) % queue_len;
            let err = rel_err(
                &got[slot * DIM..(slot + 1) * DIM],
                &want[i * DIM..(i + 1) * DIM],
            );
            assert!(err <= 1e-6, "{device}: key {i} in slot {slot}: {err:e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// similarity

/// The `rows x cols` reference scores in f64 (exact formulas: no cancellation).
fn ref_similarity(a: &[f64], b: &[f64], dim: usize, kind: Similarity) -> Vec<f64> {
    let mut out = Vec::new();
    for ra in a.chunks(dim) {
        for rb in b.chunks(dim) {
            let diff: Vec<f64> = ra.iter().zip(rb).map(|(x, y)| x - y).collect();
            out.push(match kind {
                Similarity::Dot => dot(ra, rb),
                Similarity::Cosine => {
                    let (na, nb) = (norm(ra), norm(rb));
                    let ra: Vec<f64> = ra.iter().map(|v| v / na.max(1e-12)).collect();
                    let rb: Vec<f64> = rb.iter().map(|v| v / nb.max(1e-12)).collect();
                    dot(&ra, &rb)
                }
                Similarity::SquaredEuclidean => norm(&diff).powi(2),
                Similarity::Euclidean => norm(&diff).max(1e-6),
            });
        }
    }
    out
}

/// Compares a score matrix group by group: entries whose rows have the same pair of scale classes
/// (row `r`'s class is `r % classes`) are of one magnitude, so small scores are checked as
/// strictly as huge ones.
#[track_caller]
fn assert_scores_close(
    got: &[f64],
    want: &[f64],
    (rows, cols, classes): (usize, usize, usize),
    tol: f64,
    case: &str,
) {
    for ca in 0..classes {
        for cb in 0..classes {
            let (mut g, mut w) = (Vec::new(), Vec::new());
            for i in (ca..rows).step_by(classes) {
                for j in (cb..cols).step_by(classes) {
                    g.push(got[i * cols + j]);
                    w.push(want[i * cols + j]);
                }
            }
            let err = rel_err(&g, &w);
            assert!(
                err <= tol,
                "{case}: rows of class {ca} x {cb}: relative error {err:e} > {tol:e} \
                 (got {:e}, want {:e} first)",
                g[0],
                w[0]
            );
        }
    }
}

/// Runs one similarity case on every device against the f64 reference.
fn check_similarity(test: &str, scales: &[f64], kind: Similarity, tol: f64, seed: u64) {
    let (rows, cols) = (67, 70);
    let mut rng = StdRng::seed_from_u64(seed);
    let a = scaled_rows(&mut rng, rows, scales);
    let b = scaled_rows(&mut rng, cols, scales);
    let want = ref_similarity(&f64s(&a), &f64s(&b), DIM, kind);
    assert!(want.iter().all(|v| v.abs() < f32::MAX as f64));
    for device in devices(test) {
        let got = similarity(
            &t32(&a, &[rows, DIM], device),
            &t32(&b, &[cols, DIM], device),
            kind,
        )
        .unwrap_or_else(|e| panic!("{test} on {device}: {e}"))
        .to_vec_f64()
        .unwrap();
        let case = format!("{test} {kind:?} on {device}");
        assert_scores_close(&got, &want, (rows, cols, scales.len()), tol, &case);
    }
}

/// Cosine similarities of rows of norm up to ~1e39 (the interpreted kernels gave NaN).
#[test]
fn similarity_cosine_of_huge_rows() {
    check_similarity(
        "similarity_cosine_of_huge_rows",
        &MIXED,
        Similarity::Cosine,
        1e-5,
        0x1305,
    );
}

/// Euclidean distances up to ~1e37 fit in f32: right on the CPU too (its f32 GEMM overflowed).
#[test]
fn similarity_euclidean_of_huge_rows() {
    let scales = [1e-3, 1.0, 3e19, 1e20, 1e25, 1e30, 1e36];
    check_similarity(
        "similarity_euclidean_of_huge_rows",
        &scales,
        Similarity::Euclidean,
        1e-5,
        0x1306,
    );
}

/// Rows just past 2^63 in norm (the f32 sums of squares overflow) that lie close together (near
/// 1e19 times the unit vector `dir` of the seed), so that every squared distance and dot product
/// still fits in f32; every fourth row, the others are small.
fn near_rows(rng: &mut StdRng, rows: usize) -> Vec<f32> {
    let mut dir_rng = StdRng::seed_from_u64(0x0d1e);
    let dir: Vec<f64> = (0..DIM).map(|_| dir_rng.random::<f64>() - 0.5).collect();
    let n = norm(&dir);
    let small = [1e-3, 1.0, 1e9];
    (0..rows * DIM)
        .map(|i| {
            let (r, d) = (i / DIM, i % DIM);
            let noise = 2.0 * rng.random::<f64>() - 1.0;
            match r % 4 {
                3 => (1e19 * dir[d] / n + 1e18 * noise) as f32,
                c => (small[c] * noise) as f32,
            }
        })
        .collect()
}

#[test]
fn similarity_squared_euclidean_and_dot_of_rows_past_2_pow_63() {
    let (rows, cols) = (67, 70);
    let mut rng = StdRng::seed_from_u64(0x1307);
    let a = near_rows(&mut rng, rows);
    let b = near_rows(&mut rng, cols);
    assert!(a.chunks(DIM).any(|r| norm(&f64s(r)) > pow2(63)));
    for kind in [Similarity::SquaredEuclidean, Similarity::Dot] {
        let want = ref_similarity(&f64s(&a), &f64s(&b), DIM, kind);
        let max = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(max < f32::MAX as f64 / 2.0, "{kind:?}: {max:e}");
        for device in devices("similarity_squared_euclidean_and_dot") {
            let got = similarity(
                &t32(&a, &[rows, DIM], device),
                &t32(&b, &[cols, DIM], device),
                kind,
            )
            .unwrap_or_else(|e| panic!("{kind:?} on {device}: {e}"))
            .to_vec_f64()
            .unwrap();
            let case = format!("{kind:?} on {device}");
            assert_scores_close(&got, &want, (rows, cols, 4), 1e-4, &case);
        }
    }
}

/// A dot product whose partial sums overflow f32 while the result does not.
#[test]
fn similarity_dot_with_overflowing_partial_sums() {
    let a = [3e38f32, 3e38, -3e38, 1.0];
    let b = [1.0f32, 1.0, 1.0, 1.0];
    for device in devices("similarity_dot_with_overflowing_partial_sums") {
        let got = similarity(
            &t32(&a, &[1, 4], device),
            &t32(&b, &[1, 4], device),
            Similarity::Dot,
        )
        .unwrap_or_else(|e| panic!("{device}: {e}"))
        .to_vec::<f32>()
        .unwrap();
        assert_eq!(got, vec![3e38f32], "{device}");
    }
}

/// Scores beyond f32 are errors naming `a`, not infinities.
#[test]
fn similarity_beyond_f32_is_an_error() {
    let mut rng = StdRng::seed_from_u64(0x1308);
    let a = scaled_rows(&mut rng, 5, &[1e20]);
    let b = scaled_rows(&mut rng, 3, &[1e20]);
    let opposite = [3e38f32, -3e38];
    for device in devices("similarity_beyond_f32_is_an_error") {
        for kind in [Similarity::SquaredEuclidean, Similarity::Dot] {
            // On a kernel device the error comes when the scores are read.
            let err = similarity(
                &t32(&a, &[5, DIM], device),
                &t32(&b, &[3, DIM], device),
                kind,
            )
            .and_then(|s| s.to_vec_f64())
            .expect_err("squared distances / dot products ~1e40");
            assert!(is_overflow(&err, "scores"), "{kind:?} on {device}: {err}");
        }
        let err = similarity(
            &t32(&opposite[..1], &[1, 1], device),
            &t32(&opposite[1..], &[1, 1], device),
            Similarity::Euclidean,
        )
        .and_then(|s| s.to_vec_f64())
        .expect_err("a distance of 6e38");
        assert!(is_overflow(&err, "scores"), "euclidean on {device}: {err}");
    }
}

/// bf16 cosine similarities of huge rows (the bf16 kernel instantiations).
#[test]
fn similarity_bf16_cosine_of_huge_rows() {
    let (rows, cols) = (67, 70);
    let mut rng = StdRng::seed_from_u64(0x1309);
    let to_bf16 = |v: &[f32], r: usize| {
        t32(v, &[r, DIM], Device::Cpu)
            .to_dtype(DType::Bf16)
            .unwrap()
    };
    let a = to_bf16(&scaled_rows(&mut rng, rows, &MIXED), rows);
    let b = to_bf16(&scaled_rows(&mut rng, cols, &MIXED), cols);
    let want = ref_similarity(
        &a.to_vec_f64().unwrap(),
        &b.to_vec_f64().unwrap(),
        DIM,
        Similarity::Cosine,
    );
    for device in devices("similarity_bf16_cosine_of_huge_rows") {
        let (ad, bd) = (a.to_device(device).unwrap(), b.to_device(device).unwrap());
        let got = similarity(&ad, &bd, Similarity::Cosine)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let case = format!("bf16 cosine on {device}");
        assert_scores_close(&got, &want, (rows, cols, MIXED.len()), 2e-2, &case);
    }
}

/// The CPU's f64 path up to 1e300 (its GEMM runs on rows rescaled by powers of two).
#[test]
fn similarity_f64_rows_up_to_1e300() {
    let (rows, cols) = (67, 70);
    let mut rng = StdRng::seed_from_u64(0x130a);
    let rows_of = |rng: &mut StdRng, n: usize, scales: &[f64]| -> Vec<f64> {
        (0..n * DIM)
            .map(|i| (2.0 * rng.random::<f64>() - 1.0) * scales[(i / DIM) % scales.len()])
            .collect()
    };
    let wide = [1e-300, 1e-3, 1.0, 1e150, 1e200, 1e300];
    let a = rows_of(&mut rng, rows, &wide);
    let b = rows_of(&mut rng, cols, &wide);
    for kind in [Similarity::Cosine, Similarity::Euclidean] {
        let got = similarity(&t64(&a, &[rows, DIM]), &t64(&b, &[cols, DIM]), kind)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let want = ref_similarity(&a, &b, DIM, kind);
        let case = format!("f64 {kind:?}");
        assert_scores_close(&got, &want, (rows, cols, wide.len()), 1e-10, &case);
    }
    // Dot products up to 1e300, and squared distances of rows just past sqrt(f64::MAX) / 4 that
    // lie close together (each below f64::MAX).
    let dots = [1e-300, 1.0, 1e150];
    let (a, b) = (
        rows_of(&mut rng, rows, &dots),
        rows_of(&mut rng, cols, &dots),
    );
    let got = similarity(
        &t64(&a, &[rows, DIM]),
        &t64(&b, &[cols, DIM]),
        Similarity::Dot,
    )
    .unwrap()
    .to_vec_f64()
    .unwrap();
    let want = ref_similarity(&a, &b, DIM, Similarity::Dot);
    assert_scores_close(&got, &want, (rows, cols, dots.len()), 1e-10, "f64 dot");
    let near = |rng: &mut StdRng, n: usize| -> Vec<f64> {
        near_rows(rng, n)
            .iter()
            .map(|&v| v as f64 * if v.abs() > 1e15 { 5e134 } else { 1.0 })
            .collect()
    };
    let (a, b) = (near(&mut rng, rows), near(&mut rng, cols));
    assert!(a.chunks(DIM).any(|r| norm(r) > f64::MAX.sqrt() / 4.0));
    let got = similarity(
        &t64(&a, &[rows, DIM]),
        &t64(&b, &[cols, DIM]),
        Similarity::SquaredEuclidean,
    )
    .unwrap()
    .to_vec_f64()
    .unwrap();
    let want = ref_similarity(&a, &b, DIM, Similarity::SquaredEuclidean);
    assert_scores_close(&got, &want, (rows, cols, 4), 1e-10, "f64 squared euclidean");
    // Beyond f64: errors.
    let huge = rows_of(&mut rng, 3, &[1e300]);
    for kind in [Similarity::SquaredEuclidean, Similarity::Dot] {
        let err = similarity(&t64(&huge, &[3, DIM]), &t64(&huge, &[3, DIM]), kind).unwrap_err();
        assert!(is_overflow(&err, "scores"), "f64 {kind:?}: {err}");
    }
    let sums = [1e308, 1e308, -1e308, 1.0];
    let got = similarity(
        &t64(&sums, &[1, 4]),
        &t64(&[1.0; 4], &[1, 4]),
        Similarity::Dot,
    )
    .unwrap()
    .to_vec_f64()
    .unwrap();
    assert_eq!(got, vec![1e308]);
}

// ---------------------------------------------------------------------------------------------
// triplet

const DISTANCES: [Distance; 3] = [
    Distance::Euclidean,
    Distance::SquaredEuclidean,
    Distance::Cosine,
];
const MININGS: [Mining; 3] = [Mining::BatchAll, Mining::BatchHard, Mining::SemiHard];

fn labels(rows: usize) -> Vec<i64> {
    (0..rows as i64).map(|i| (i * 5) % 7).collect()
}

/// How loss, margin and gradient scale when x is scaled by `2^k`: the powers of two of the margin
/// (and loss) and of the gradient.
fn powers(distance: Distance) -> (i32, i32) {
    match distance {
        Distance::Euclidean => (1, 0),
        Distance::SquaredEuclidean => (2, 1),
        Distance::Cosine => (0, -1),
    }
}

fn run_triplet(
    x: &Tensor,
    labels: &[i64],
    distance: Distance,
    mining: Mining,
    margin: f64,
) -> TripletOutput {
    let opts = TripletOptions {
        distance,
        mining,
        margin,
        ..Default::default()
    };
    triplet(x, labels, &opts)
        .unwrap_or_else(|e| panic!("{distance:?} {mining:?} on {}: {e}", x.device()))
}

#[track_caller]
fn assert_triplet_close(
    got: &TripletOutput,
    want: &TripletOutput,
    (loss_pow, grad_pow): (f64, f64),
    tol: f64,
    case: &str,
) {
    assert_eq!(
        got.counts.count().unwrap(),
        want.counts.count().unwrap(),
        "{case}: count"
    );
    assert_eq!(
        got.counts.stats().unwrap(),
        want.counts.stats().unwrap(),
        "{case}: stats"
    );
    let loss_err = (got.loss.to_scalar().unwrap() - want.loss.to_scalar().unwrap() * loss_pow)
        .abs()
        / (want.loss.to_scalar().unwrap() * loss_pow)
            .abs()
            .max(1e-300);
    assert!(
        loss_err <= tol,
        "{case}: loss {:e} vs {:e} ({loss_err:e})",
        got.loss.to_scalar().unwrap(),
        want.loss.to_scalar().unwrap() * loss_pow
    );
    let want_grad: Vec<f64> = want
        .grad_x
        .to_vec_f64()
        .unwrap()
        .iter()
        .map(|g| g * grad_pow)
        .collect();
    let err = rel_err(&got.grad_x.to_vec_f64().unwrap(), &want_grad);
    assert!(err <= tol, "{case}: gradient relative error {err:e}");
}

/// Inputs of norm ~2.4e20 (x 2^66, exact) against the same rows at unit scale, every distance and
/// mining: the f64 CPU at unit scale is the reference, and each device at 2^66 must match it
/// scaled (the interpreted kernels returned the margin as the loss). The cosine results must
/// equal the unit-norm ones (scale invariance).
#[test]
fn triplet_at_norm_1e20_matches_unit_scale() {
    let rows = 67;
    let mut rng = StdRng::seed_from_u64(0x130b);
    let unit = scaled_rows(&mut rng, rows, &[1.0]);
    let labels = labels(rows);
    let k = 66;
    let huge: Vec<f32> = unit.iter().map(|&v| v * pow2(k) as f32).collect();
    for distance in DISTANCES {
        let (margin_pow, grad_pow) = powers(distance);
        // Squared distances ~2^134 need a margin that is an f32: 0.2 2^126 here.
        let unit_margin = if distance == Distance::SquaredEuclidean {
            0.2 * pow2(-6)
        } else {
            0.2
        };
        let huge_margin = unit_margin * pow2(k * margin_pow);
        for mining in MININGS {
            let reference = run_triplet(
                &t64(&f64s(&unit), &[rows, DIM]),
                &labels,
                distance,
                mining,
                unit_margin,
            );
            assert!(reference.loss.to_scalar().unwrap() > 0.0);
            let scale = (pow2(k * margin_pow), pow2(k * grad_pow));
            for device in devices("triplet_at_norm_1e20_matches_unit_scale") {
                let case = format!("{distance:?} {mining:?} on {device}");
                let at_unit = run_triplet(
                    &t32(&unit, &[rows, DIM], device),
                    &labels,
                    distance,
                    mining,
                    unit_margin,
                );
                let at_huge = run_triplet(
                    &t32(&huge, &[rows, DIM], device),
                    &labels,
                    distance,
                    mining,
                    huge_margin,
                );
                // Scaling by 2^66 is exact and so is every backend's rescaling: tight.
                assert_triplet_close(
                    &at_huge,
                    &at_unit,
                    scale,
                    1e-6,
                    &format!("{case} (vs its unit run)"),
                );
                assert_triplet_close(
                    &at_huge,
                    &reference,
                    scale,
                    1e-4,
                    &format!("{case} (vs f64 cpu)"),
                );
            }
        }
    }
}

/// Norm ~1e20 with a scale that is not a power of two: each device against the f64 CPU on the
/// same f32 values (which it takes in f64, where nothing overflows).
#[test]
fn triplet_at_1e20_matches_f64_cpu() {
    let rows = 67;
    let mut rng = StdRng::seed_from_u64(0x130c);
    let x = scaled_rows(&mut rng, rows, &[1e20]);
    let labels = labels(rows);
    for distance in DISTANCES {
        let margin = match distance {
            Distance::Euclidean => 2e19,
            Distance::SquaredEuclidean => 3e38,
            Distance::Cosine => 0.2,
        };
        for mining in MININGS {
            let reference = run_triplet(
                &t64(&f64s(&x), &[rows, DIM]),
                &labels,
                distance,
                mining,
                margin,
            );
            assert!(reference.loss.to_scalar().unwrap() > 0.0);
            for device in devices("triplet_at_1e20_matches_f64_cpu") {
                let got = run_triplet(
                    &t32(&x, &[rows, DIM], device),
                    &labels,
                    distance,
                    mining,
                    margin,
                );
                let case = format!("{distance:?} {mining:?} on {device}");
                assert_triplet_close(&got, &reference, (1.0, 1.0), 1e-4, &case);
            }
        }
    }
}

/// Rows of norm ~1e25 and ~1e-3 in one euclidean batch: the kernels mine it scaled by 2^-45, where
/// the small rows' squared distances (~1e-33) must not fall under the clamp (scaled alike), and
/// the small rows' gradients (unit vectors, as large as the huge rows') must stay right.
#[test]
fn triplet_mixed_row_scales_match_f64_cpu() {
    let rows = 67;
    let mut rng = StdRng::seed_from_u64(0x130f);
    let x = scaled_rows(&mut rng, rows, &[1e25, 1e-3]);
    let labels = labels(rows);
    for mining in MININGS {
        let reference = run_triplet(
            &t64(&f64s(&x), &[rows, DIM]),
            &labels,
            Distance::Euclidean,
            mining,
            0.2,
        );
        for device in devices("triplet_mixed_row_scales_match_f64_cpu") {
            let got = run_triplet(
                &t32(&x, &[rows, DIM], device),
                &labels,
                Distance::Euclidean,
                mining,
                0.2,
            );
            let case = format!("{mining:?} on {device}");
            assert_triplet_close(&got, &reference, (1.0, 1.0), 1e-4, &case);
        }
    }
}

/// f64 rows of norm ~1e301 on the CPU: euclidean and cosine are right (the squared distances
/// ~1e602 are mined scaled); the squared-euclidean loss itself is beyond f64: an error naming x.
#[test]
fn triplet_f64_rows_at_2_pow_1000() {
    let rows = 67;
    let mut rng = StdRng::seed_from_u64(0x130d);
    let unit: Vec<f64> = f64s(&scaled_rows(&mut rng, rows, &[1.0]));
    let labels = labels(rows);
    let k = 1000;
    let huge: Vec<f64> = unit.iter().map(|v| v * pow2(k)).collect();
    for mining in MININGS {
        for distance in [Distance::Euclidean, Distance::Cosine] {
            let (margin_pow, grad_pow) = powers(distance);
            let reference = run_triplet(&t64(&unit, &[rows, DIM]), &labels, distance, mining, 0.2);
            let got = run_triplet(
                &t64(&huge, &[rows, DIM]),
                &labels,
                distance,
                mining,
                0.2 * pow2(k * margin_pow),
            );
            let scale = (pow2(k * margin_pow), pow2(k * grad_pow));
            assert_triplet_close(
                &got,
                &reference,
                scale,
                1e-12,
                &format!("f64 {distance:?} {mining:?}"),
            );
        }
        let opts = TripletOptions {
            distance: Distance::SquaredEuclidean,
            mining,
            margin: 0.2,
            ..Default::default()
        };
        let err = triplet(&t64(&huge, &[rows, DIM]), &labels, &opts).unwrap_err();
        assert!(is_invalid(&err, "x"), "f64 squared {mining:?}: {err}");
    }
}

/// A gradient beyond f32 (squared distances of rows near f32::MAX) is an error naming x; a margin
/// beyond f32 is an error naming margin.
#[test]
fn triplet_beyond_f32_is_an_error() {
    let x = [3e38f32, 2.9e38, -3e38, -2.9e38];
    let labels = [0, 1, 0, 1];
    let opts = TripletOptions {
        distance: Distance::SquaredEuclidean,
        mining: Mining::BatchAll,
        margin: 0.2,
        ..Default::default()
    };
    let reference = triplet(&t64(&f64s(&x), &[4, 1]), &labels, &opts).unwrap();
    assert!(reference
        .grad_x
        .to_vec_f64()
        .unwrap()
        .iter()
        .any(|g| g.abs() > f32::MAX as f64));
    for device in devices("triplet_beyond_f32_is_an_error") {
        // On a kernel device the error comes with the read of the gradient.
        let err = triplet(&t32(&x, &[4, 1], device), &labels, &opts)
            .and_then(|out| out.grad_x.to_vec_f64())
            .unwrap_err();
        assert!(is_overflow(&err, "grad_x"), "{device}: {err}");
        // The kernels mine in f32; the CPU mines in f64 whatever the input dtype.
        let big_margin = TripletOptions {
            margin: 1e39,
            ..opts
        };
        let result = triplet(
            &t32(&[0.0, 1.0, 2.0, 3.0], &[4, 1], device),
            &labels,
            &big_margin,
        );
        match device {
            Device::Cpu => assert!(result.unwrap().loss.to_scalar().unwrap() > 1e38, "{device}"),
            _ => assert!(is_invalid(&result.unwrap_err(), "margin"), "{device}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// margin loss

/// The mean Hadsell loss and its gradients in f64.
fn ref_margin(x1: &[f64], x2: &[f64], y: &[i64], margin: f64) -> (f64, Vec<f64>) {
    let n = y.len() as f64;
    let (mut loss, mut grad) = (0.0, Vec::new());
    for ((a, b), &yi) in x1.chunks(DIM).zip(x2.chunks(DIM)).zip(y) {
        let diff: Vec<f64> = a.iter().zip(b).map(|(u, v)| u - v).collect();
        let d = norm(&diff).max(1e-6);
        let (l, coef) = if yi == 0 {
            (d * d / 2.0, 1.0)
        } else {
            let gap = (margin - d).max(0.0);
            (gap * gap / 2.0, -gap / d)
        };
        loss += l / n;
        grad.extend(diff.iter().map(|t| coef * t / n));
    }
    (loss, grad)
}

/// Pairs 1e19 .. 1e21 apart (losses ~5e39: beyond f32, not f64) and a margin of 5e20, then a
/// margin of 1e30 over unit pairs (the interpreted kernels returned inf for both).
#[test]
fn margin_loss_at_distance_1e20() {
    let rows = 67;
    let mut rng = StdRng::seed_from_u64(0x130e);
    let y: Vec<i64> = (0..rows as i64).map(|i| i % 2).collect();
    for (scales, margin) in [([3e19, 1e20, 3e20], 5e20), ([1.0, 0.5, 2.0], 1e30)] {
        let x1 = scaled_rows(&mut rng, rows, &scales);
        let x2 = scaled_rows(&mut rng, rows, &scales);
        let (want_loss, want_grad) = ref_margin(&f64s(&x1), &f64s(&x2), &y, margin);
        let opts = MarginOptions {
            margin,
            ..Default::default()
        };
        for device in devices("margin_loss_at_distance_1e20") {
            let (a, b) = (
                t32(&x1, &[rows, DIM], device),
                t32(&x2, &[rows, DIM], device),
            );
            let fwd = margin_forward(&a, &b, &y, &opts).unwrap_or_else(|e| panic!("{device}: {e}"));
            let loss = fwd
                .loss
                .to_scalar()
                .unwrap_or_else(|e| panic!("{device}: {e}"));
            let err = (loss - want_loss).abs() / want_loss;
            assert!(
                err <= 1e-5,
                "margin {margin:e} on {device}: loss {loss:e} vs {want_loss:e}"
            );
            let (g1, g2) = margin_backward(&a, &b, &y, &opts, &fwd.saved, 1.0).unwrap();
            let err = rel_err(&g1.to_vec_f64().unwrap(), &want_grad);
            assert!(
                err <= 1e-5,
                "margin {margin:e} on {device}: grad_x1 {err:e}"
            );
            let minus: Vec<f64> = want_grad.iter().map(|g| -g).collect();
            assert!(
                rel_err(&g2.to_vec_f64().unwrap(), &minus) <= 1e-5,
                "{device}: grad_x2"
            );
        }
    }
}

/// A similar pair 6e38 apart: its distance is beyond f32 but its loss (1.8e77) is an f64, so the
/// forward returns it; its gradient (6e38) is beyond f32: an error naming x1. Margins beyond f32
/// (or, in f64, with a square beyond f64) are errors naming margin; so is an f64 loss beyond f64.
#[test]
fn margin_loss_limits() {
    let (x1, x2) = ([3e38f32], [-3e38f32]);
    let want = (3e38f32 as f64 * 2.0).powi(2) / 2.0;
    let opts = MarginOptions {
        margin: 1.0,
        ..Default::default()
    };
    for device in devices("margin_loss_limits") {
        let (a, b) = (t32(&x1, &[1, 1], device), t32(&x2, &[1, 1], device));
        let fwd = margin_forward(&a, &b, &[0], &opts).unwrap_or_else(|e| panic!("{device}: {e}"));
        let loss = fwd
            .loss
            .to_scalar()
            .unwrap_or_else(|e| panic!("{device}: {e}"));
        assert!(
            (loss - want).abs() <= 1e-6 * want,
            "{device}: {loss:e} vs {want:e}"
        );
        // On a kernel device the error comes with the read of the gradients.
        let err = margin_backward(&a, &b, &[0], &opts, &fwd.saved, 1.0)
            .and_then(|(g1, _)| g1.to_vec_f64())
            .unwrap_err();
        assert!(is_overflow(&err, "grad_x1"), "{device}: {err}");
        let err = margin_forward(
            &a,
            &b,
            &[1],
            &MarginOptions {
                margin: 1e39,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(is_invalid(&err, "margin"), "{device}: {err}");
    }
    // f64 on the CPU: a margin of 1e39 is fine, one whose square overflows is not; pairs 1e150
    // apart cost 5e299, pairs 1e200 apart overflow.
    let (a, b) = (t64(&[1e150], &[1, 1]), t64(&[0.0], &[1, 1]));
    let loss = margin_forward(
        &a,
        &b,
        &[0],
        &MarginOptions {
            margin: 1e39,
            ..Default::default()
        },
    )
    .unwrap()
    .loss
    .to_scalar()
    .unwrap();
    assert!((loss - 5e299).abs() <= 1e-12 * 5e299, "{loss:e}");
    let err = margin_forward(
        &a,
        &b,
        &[1],
        &MarginOptions {
            margin: 1e200,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(is_invalid(&err, "margin"), "{err}");
    let err = margin_forward(&t64(&[1e200], &[1, 1]), &b, &[0], &opts).unwrap_err();
    assert!(is_invalid(&err, "x1"), "{err}");
    // Three losses of 8.45e307: their sum overflows f64, their mean does not.
    let (a, b) = (
        t64(&[1.3e154, -1.3e154, 1.3e154], &[3, 1]),
        t64(&[0.0; 3], &[3, 1]),
    );
    let loss = margin_forward(&a, &b, &[0, 0, 0], &opts)
        .unwrap()
        .loss
        .to_scalar()
        .unwrap();
    let want = 1.3e154f64 * 1.3e154 / 2.0;
    assert!((loss - want).abs() <= 1e-12 * want, "{loss:e}");
}
