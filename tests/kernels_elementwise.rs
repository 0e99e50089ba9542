//! The row-wise and elementwise kernel ops (margin loss, NCE, the momentum update and the MoCo
//! queue enqueue) on every kernel device, against the CPU backend computed in f64 on the same f32
//! inputs.
//!
//! Kernel devices: `Device::Interp` always (the CUDA sources run on CPU threads, with poisoned,
//! guard-banded buffers), and `Device::Cuda(0)` when `device_available` says it can run here;
//! otherwise every test prints `skipped on cuda:0: <reason>` and checks only the interpreted mode.
//!
//! Shapes are deliberately not multiples of a warp (32) or of a float4 (4), and include one row,
//! two rows and one feature. Every output must be within a relative norm error of `TOL` of the
//! reference; NaN or infinity fails.

use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::*;

/// `n` uniform values in [lo, hi).
fn uniform(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi) as f32).collect()
}

/// `||a - b||` of two rows, in f64.
fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&u, &v)| (u as f64 - v as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

// ---------------------------------------------------------------------------------------------
// margin
// ---------------------------------------------------------------------------------------------

/// `(N, D)` shapes: not multiples of a warp, one row, two rows, one feature, several blocks.
const MARGIN_SHAPES: &[(usize, usize)] = &[(37, 77), (1, 77), (2, 17), (37, 1), (130, 40)];

/// Pairs whose distances spread around the margin: `x2 = x1 + u`, with `u` a random direction of
/// length 0.2 m .. 2.5 m (so pairs fall both inside and outside the margin), and with three rows
/// or more one pair of identical rows (the 1e-12 clamp). Labels alternate 0 / 1 from a random
/// start, so both occur from two rows on.
fn margin_inputs(
    rng: &mut StdRng,
    rows: usize,
    dim: usize,
    margin: f64,
) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let x1 = random_matrix(rng, rows, dim);
    let mut x2 = x1.clone();
    const SPREAD: [f64; 5] = [0.2, 0.6, 0.95, 1.3, 2.5];
    for (i, row) in x2.chunks_mut(dim).enumerate() {
        if rows >= 3 && i == rows / 2 {
            continue; // identical pair
        }
        let u = random_matrix(rng, 1, dim);
        let norm = u
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-6);
        let length = margin * SPREAD[rng.random_range(0..SPREAD.len())];
        for (x, &v) in row.iter_mut().zip(&u) {
            *x = (*x as f64 + v as f64 * length / norm) as f32;
        }
    }
    let start = rng.random_range(0..2i64);
    let y = (0..rows as i64).map(|i| (i + start) % 2).collect();
    (x1, x2, y)
}

fn check_margin(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x3a01);
    let (mut inside, mut outside) = (0, 0);
    for &margin in &[1.0, 2.5] {
        for &(n, d) in MARGIN_SHAPES {
            let (x1, x2, y) = margin_inputs(&mut rng, n, d, margin);
            for ((a, b), &yi) in x1.chunks(d).zip(x2.chunks(d)).zip(&y) {
                if yi == 1 && distance(a, b) < margin {
                    inside += 1;
                } else if yi == 1 {
                    outside += 1;
                }
            }
            let opts = MarginOptions {
                margin,
                ..Default::default()
            };
            let case = format!("margin {n}x{d} m={margin}");
            let shape = [n, d];
            let got = compare_with_cpu(device, &case, &[(&x1, &shape), (&x2, &shape)], |t| {
                let one_call = margin_loss(&t[0], &t[1], &y, &opts)?;
                let fwd = margin_forward(&t[0], &t[1], &y, &opts)?;
                let (g1, g2) = margin_backward(&t[0], &t[1], &y, &opts, &fwd.saved, 2.5)?;
                Ok(vec![
                    ("loss (one call)", vec![one_call.loss.to_scalar().unwrap()]),
                    ("loss (split)", vec![fwd.loss.to_scalar().unwrap()]),
                    ("grad_x1", one_call.grad_x1.to_vec_f64().unwrap()),
                    ("grad_x2", one_call.grad_x2.to_vec_f64().unwrap()),
                    ("grad_x1 (grad_loss 2.5)", g1.to_vec_f64().unwrap()),
                    ("grad_x2 (grad_loss 2.5)", g2.to_vec_f64().unwrap()),
                ])
            });
            let (g1, g2) = (output(&got, "grad_x1"), output(&got, "grad_x2"));
            assert!(
                g1.iter().zip(g2).all(|(a, b)| *a == -*b),
                "{case} on {device}: grad_x2 is not exactly -grad_x1"
            );
            let err = rel_err(output(&got, "grad_x1 (grad_loss 2.5)"), &scaled(g1, 2.5));
            assert!(
                err <= TOL,
                "{case} on {device}: grad_x1 with grad_loss 2.5 is not 2.5x ({err:e})"
            );
        }
    }
    assert!(
        inside > 10 && outside > 10,
        "the test's dissimilar pairs do not straddle the margin ({inside} inside, {outside} outside)"
    );
}

#[test]
fn margin_matches_cpu() {
    on_kernel_devices("margin_matches_cpu", check_margin);
}

// ---------------------------------------------------------------------------------------------
// NCE
// ---------------------------------------------------------------------------------------------

/// `(B, k)`: B rows of k noise scores; one row, two rows, one noise sample, k beyond a warp.
const NCE_SHAPES: &[(usize, usize)] = &[(37, 77), (1, 77), (2, 17), (37, 1), (130, 5), (3, 33)];

/// NCE on `s_pos`, `s_neg`, `logq_pos`, `logq_neg`: both forms, grad_loss 1 and 2.5.
fn check_nce_case(device: Device, case: &str, rows: usize, k: usize, inputs: [Vec<f32>; 4]) {
    let [s_pos, s_neg, logq_pos, logq_neg] = &inputs;
    let (vec_shape, mat_shape) = ([rows], [rows, k]);
    let got = compare_with_cpu(
        device,
        case,
        &[
            (s_pos, &vec_shape),
            (s_neg, &mat_shape),
            (logq_pos, &vec_shape),
            (logq_neg, &mat_shape),
        ],
        |t| {
            let one_call = nce(&t[0], &t[1], &t[2], &t[3])?;
            let fwd = nce_forward(&t[0], &t[1], &t[2], &t[3])?;
            let (gp, gn) = nce_backward(&t[0], &t[1], &t[2], &t[3], &fwd.saved, 2.5)?;
            Ok(vec![
                ("loss (one call)", vec![one_call.loss.to_scalar().unwrap()]),
                ("loss (split)", vec![fwd.loss.to_scalar().unwrap()]),
                ("grad_s_pos", one_call.grad_s_pos.to_vec_f64().unwrap()),
                ("grad_s_neg", one_call.grad_s_neg.to_vec_f64().unwrap()),
                ("grad_s_pos (grad_loss 2.5)", gp.to_vec_f64().unwrap()),
                ("grad_s_neg (grad_loss 2.5)", gn.to_vec_f64().unwrap()),
            ])
        },
    );
    for grad in ["grad_s_pos", "grad_s_neg"] {
        let err = rel_err(
            output(&got, &format!("{grad} (grad_loss 2.5)")),
            &scaled(output(&got, grad), 2.5),
        );
        assert!(
            err <= TOL,
            "{case} on {device}: {grad} with grad_loss 2.5 is not 2.5x ({err:e})"
        );
    }
}

fn check_nce(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x9c01);
    for &(rows, k) in NCE_SHAPES {
        let inputs = [
            uniform(&mut rng, rows, -3.0, 3.0),
            uniform(&mut rng, rows * k, -3.0, 3.0),
            uniform(&mut rng, rows, -6.0, -1.0),
            uniform(&mut rng, rows * k, -6.0, -1.0),
        ];
        check_nce_case(device, &format!("nce {rows}x{k}"), rows, k, inputs);
    }
}

/// Scores of magnitude 100 .. 3000 of both signs: `exp` of any of them overflows f32 (beyond
/// ~88.7), so only a stable softplus / sigmoid stays finite and equal to the cpu.
fn check_nce_large_scores(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x9c02);
    let large = |rng: &mut StdRng, n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                (sign * rng.random_range(100.0..3000.0)) as f32
            })
            .collect()
    };
    for &(rows, k) in &[(37, 77), (2, 1), (5, 33)] {
        let inputs = [
            large(&mut rng, rows),
            large(&mut rng, rows * k),
            uniform(&mut rng, rows, -6.0, -1.0),
            uniform(&mut rng, rows * k, -6.0, -1.0),
        ];
        check_nce_case(
            device,
            &format!("nce large scores {rows}x{k}"),
            rows,
            k,
            inputs,
        );
    }
}

#[test]
fn nce_matches_cpu() {
    on_kernel_devices("nce_matches_cpu", check_nce);
}

#[test]
fn nce_large_scores_stay_finite() {
    on_kernel_devices("nce_large_scores_stay_finite", check_nce_large_scores);
}

// ---------------------------------------------------------------------------------------------
// momentum
// ---------------------------------------------------------------------------------------------

/// Shapes of theta: lengths 1, 3, 1001 (no multiple of 4), a matrix, and one long enough for
/// several blocks of the grid-stride loop.
const MOMENTUM_SHAPES: &[&[usize]] = &[&[1], &[3], &[1001], &[7, 13], &[4099, 3]];

const MOMENTA: &[f64] = &[0.0, 0.5, 0.999, 1.0];

fn check_momentum(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x4d01);
    for &shape in MOMENTUM_SHAPES {
        let len: usize = shape.iter().product();
        let theta_k = random_matrix(&mut rng, 1, len);
        let theta_q = random_matrix(&mut rng, 1, len);
        for &m in MOMENTA {
            let case = format!("momentum {shape:?} m={m}");
            let got = compare_with_cpu(
                device,
                &case,
                &[(&theta_k, shape), (&theta_q, shape)],
                |t| {
                    let mut k = t[0].clone();
                    momentum_update(&mut k, &t[1], m)?;
                    assert_eq!(k.shape(), shape);
                    Ok(vec![("theta_k", k.to_vec_f64().unwrap())])
                },
            );
            // m = 1 keeps theta_k and m = 0 copies theta_q, exactly.
            let exact = match m {
                1.0 => Some(&theta_k),
                0.0 => Some(&theta_q),
                _ => None,
            };
            if let Some(want) = exact {
                assert!(
                    output(&got, "theta_k")
                        .iter()
                        .zip(want)
                        .all(|(&g, &w)| g == w as f64),
                    "{case} on {device}: not exact"
                );
            }
        }
    }
}

#[test]
fn momentum_matches_cpu() {
    on_kernel_devices("momentum_matches_cpu", check_momentum);
}

/// The kernel on slices that start 0..3 floats into their buffers: the same misalignment for both
/// (scalar head, float4 body, scalar tail) and different ones (all scalar).
fn check_momentum_misaligned(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x4d02);
    for &len in &[1usize, 2, 3, 5, 37, 1001] {
        let theta_k = random_matrix(&mut rng, 1, len);
        let theta_q = random_matrix(&mut rng, 1, len);
        let m = 0.9;
        let want: Vec<f64> = theta_k
            .iter()
            .zip(&theta_q)
            .map(|(&k, &q)| m * k as f64 + (1.0 - m) * q as f64)
            .collect();
        for (k_offset, q_offset) in [(0, 0), (1, 1), (2, 2), (3, 3), (1, 2), (0, 3), (3, 0)] {
            let got = contra::testing::momentum_update_at_offsets(
                device, &theta_k, &theta_q, k_offset, q_offset, m,
            )
            .unwrap_or_else(|e| panic!("momentum at offsets on {device}: {e}"));
            let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
            let err = rel_err(&got, &want);
            assert!(
                err <= TOL,
                "momentum len {len} offsets ({k_offset}, {q_offset}) on {device}: relative error {err:e}"
            );
        }
    }
}

#[test]
fn momentum_misaligned_slices_match() {
    on_kernel_devices(
        "momentum_misaligned_slices_match",
        check_momentum_misaligned,
    );
}

// ---------------------------------------------------------------------------------------------
// MoCo queue enqueue
// ---------------------------------------------------------------------------------------------

/// `(K, N, ptr, D)`: wrap-around (K = 5, N = 3, ptr = 4), no wrap, N > K, K mod N != 0, N = K,
/// one-row queue, one feature, a long queue whose pointer wraps near its end.
const ENQUEUE_CASES: &[(usize, usize, usize, usize)] = &[
    (5, 3, 4, 77),
    (5, 3, 0, 77),
    (4, 10, 1, 17),
    (37, 50, 11, 77),
    (7, 3, 5, 1),
    (5, 5, 2, 33),
    (1, 1, 0, 77),
    (1, 3, 0, 5),
    (64, 3, 62, 40),
];

fn check_enqueue(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x0e01);
    for &(queue_len, rows, ptr, dim) in ENQUEUE_CASES {
        let queue = random_matrix(&mut rng, queue_len, dim);
        let mut keys = uniform(&mut rng, rows * dim, -3.0, 3.0);
        if rows >= 3 {
            keys[dim..2 * dim].fill(0.0); // a zero key stays zero
        }
        let case = format!("moco_enqueue K={queue_len} N={rows} ptr={ptr} D={dim}");
        let got = compare_with_cpu(
            device,
            &case,
            &[(&queue, &[queue_len, dim]), (&keys, &[rows, dim])],
            |t| {
                let mut q = t[0].clone();
                let next = moco_enqueue(&mut q, &t[1], ptr)?;
                Ok(vec![
                    ("queue", q.to_vec_f64().unwrap()),
                    ("ptr", vec![next as f64]),
                ])
            },
        );
        assert_eq!(
            output(&got, "ptr"),
            &[((ptr + rows) % queue_len) as f64],
            "{case} on {device}: pointer"
        );
        // Rows no key reaches keep their exact contents; every written row is the last key that
        // maps to it.
        let after = output(&got, "queue");
        for slot in 0..queue_len {
            let row = &after[slot * dim..(slot + 1) * dim];
            let writer = (0..rows).rev().find(|&i| (ptr + i) % queue_len == slot);
            match writer {
                None => assert!(
                    row.iter()
                        .zip(&queue[slot * dim..(slot + 1) * dim])
                        .all(|(&g, &w)| g == w as f64),
                    "{case} on {device}: untouched slot {slot} changed"
                ),
                Some(i) => {
                    let key = &keys[i * dim..(i + 1) * dim];
                    let norm = key
                        .iter()
                        .map(|&v| (v as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                        .max(1e-12);
                    let want: Vec<f64> = key.iter().map(|&v| v as f64 / norm).collect();
                    let err = rel_err(row, &want);
                    assert!(
                        err <= TOL,
                        "{case} on {device}: slot {slot} is not key {i} normalized ({err:e})"
                    );
                }
            }
        }
    }
}

#[test]
fn moco_enqueue_matches_cpu() {
    on_kernel_devices("moco_enqueue_matches_cpu", check_enqueue);
}
