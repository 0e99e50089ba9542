//! The kernel ops (normalize, similarity, InfoNCE, NT-Xent) on every kernel device, against the
//! CPU backend computed in f64 on the same f32 inputs.
//!
//! Kernel devices: `Device::Interp` always (the CUDA sources run on CPU threads, with poisoned,
//! guard-banded buffers), and `Device::Cuda(0)` when `device_available` says it can run here;
//! otherwise every test prints `skipped on cuda:0: <reason>` and checks only the interpreted mode.
//!
//! Shapes are deliberately not multiples of the kernels' tiles (64 rows / cols, 16 features,
//! warps of 32), include one row (or two for NT-Xent) and one feature, and one shape exceeds a
//! tile in every dimension. Every output (loss, lse, gradients, y, the similarity matrix) must be
//! within a relative norm error of `TOL` of the reference; NaN or infinity fails.
//!
//! The fixture harness (tests/fixtures.rs) runs the same kernels on the PyTorch fixtures; this file
//! does not repeat that.

use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::*;

/// `(N, M, D)` shapes for ops between two matrices: not multiples of any tile, one query row,
/// two query rows, one feature, and one shape bigger than a tile in every dimension.
const PAIR_SHAPES: &[(usize, usize, usize)] = &[
    (37, 53, 77),
    (1, 3, 77),
    (2, 5, 17),
    (37, 53, 1),
    (130, 70, 40),
];

/// `(N, D)` shapes for square problems (self mask: keys are the queries' set, N == M). N = 1 has
/// no legal positive under the self mask.
const SQUARE_SHAPES: &[(usize, usize)] = &[(37, 77), (2, 17), (37, 1), (130, 40)];

const TEMPERATURES: &[f64] = &[0.07, 0.5];

// ---------------------------------------------------------------------------------------------
// normalize
// ---------------------------------------------------------------------------------------------

/// `(rows, D)` shapes for normalize; rows >= 3 get an all-zero row.
const NORMALIZE_SHAPES: &[(usize, usize)] = &[(37, 77), (1, 77), (2, 17), (37, 1), (130, 40)];

/// `x` (`rows x dim`) with its middle row zeroed when `rows >= 3`, and the index of that row.
fn with_zero_row(mut x: Vec<f32>, rows: usize, dim: usize) -> (Vec<f32>, Option<usize>) {
    let zero = (rows >= 3).then_some(rows / 2);
    if let Some(r) = zero {
        x[r * dim..(r + 1) * dim].fill(0.0);
    }
    (x, zero)
}

fn check_normalize_forward(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x6e01);
    for &(rows, dim) in NORMALIZE_SHAPES {
        let (x, zero) = with_zero_row(random_matrix(&mut rng, rows, dim), rows, dim);
        let case = format!("normalize {rows}x{dim}");
        let got = compare_with_cpu(device, &case, &[(&x, &[rows, dim])], |t| {
            Ok(vec![("y", normalize(&t[0])?.to_vec_f64().unwrap())])
        });
        if let Some(r) = zero {
            let y = output(&got, "y");
            assert!(
                y[r * dim..(r + 1) * dim].iter().all(|&v| v == 0.0),
                "{case} on {device}: zero row not zero"
            );
        }
    }
}

fn check_normalize_backward(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x6e02);
    for &(rows, dim) in NORMALIZE_SHAPES {
        let (x, zero) = with_zero_row(feature_matrix(&mut rng, rows, dim), rows, dim);
        let grad_y = random_matrix(&mut rng, rows, dim);
        let shape = [rows, dim];
        compare_with_cpu(
            device,
            &format!("normalize_backward {rows}x{dim}"),
            &[(&x, &shape), (&grad_y, &shape)],
            |t| {
                let grad_x = normalize_backward(&t[0], &t[1])?.to_vec_f64().unwrap();
                // The zero row's gradient is grad_y / 1e-12 and would dwarf every other row in the
                // norm: compare the other rows on their own too.
                let others = grad_x
                    .chunks(dim)
                    .enumerate()
                    .filter(|&(r, _)| Some(r) != zero)
                    .flat_map(|(_, row)| row.iter().copied())
                    .collect();
                Ok(vec![("grad_x", grad_x), ("grad_x (nonzero rows)", others)])
            },
        );
    }
}

#[test]
fn normalize_forward_matches_cpu() {
    on_kernel_devices("normalize_forward_matches_cpu", check_normalize_forward);
}

#[test]
fn normalize_backward_matches_cpu() {
    on_kernel_devices("normalize_backward_matches_cpu", check_normalize_backward);
}

// ---------------------------------------------------------------------------------------------
// similarity
// ---------------------------------------------------------------------------------------------

fn check_similarity(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x5101);
    for kind in [
        Similarity::Dot,
        Similarity::Cosine,
        Similarity::SquaredEuclidean,
        Similarity::Euclidean,
    ] {
        for &(n, m, d) in PAIR_SHAPES {
            let a = random_matrix(&mut rng, n, d);
            let b = random_matrix(&mut rng, m, d);
            let case = format!("similarity {kind:?} {n}x{m}x{d}");
            compare_with_cpu(device, &case, &[(&a, &[n, d]), (&b, &[m, d])], |t| {
                Ok(vec![(
                    "similarity",
                    similarity(&t[0], &t[1], kind)?.to_vec_f64().unwrap(),
                )])
            });
        }
    }
}

#[test]
fn similarity_matches_cpu() {
    on_kernel_devices("similarity_matches_cpu", check_similarity);
}

// ---------------------------------------------------------------------------------------------
// InfoNCE
// ---------------------------------------------------------------------------------------------

/// Loss, saved lse and both gradients of the split forward / backward (grad_loss = 1).
fn infonce_outputs(
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
) -> Result<Outputs> {
    let fwd = infonce_forward(q, k, positives, opts)?;
    let (grad_q, grad_k) = infonce_backward(q, k, positives, opts, &fwd.saved, 1.0)?;
    Ok(vec![
        ("loss", vec![fwd.loss.to_scalar().unwrap()]),
        ("lse", fwd.saved.lse.to_vec_f64().unwrap()),
        ("grad_q", grad_q.to_vec_f64().unwrap()),
        ("grad_k", grad_k.to_vec_f64().unwrap()),
    ])
}

/// InfoNCE with the given options at every shape and temperature.
fn check_infonce_options(device: Device, normalize: bool, self_mask: bool, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let shapes: Vec<(usize, usize, usize)> = if self_mask {
        SQUARE_SHAPES.iter().map(|&(n, d)| (n, n, d)).collect()
    } else {
        PAIR_SHAPES.to_vec()
    };
    for &temperature in TEMPERATURES {
        for &(n, m, d) in &shapes {
            let (q, k) = if normalize {
                (
                    feature_matrix(&mut rng, n, d),
                    feature_matrix(&mut rng, m, d),
                )
            } else {
                (random_matrix(&mut rng, n, d), random_matrix(&mut rng, m, d))
            };
            let positives = random_positives(&mut rng, n, m, self_mask);
            let opts = InfoNceOptions {
                temperature,
                normalize,
                self_mask,
            };
            let case = format!(
                "infonce {n}x{m}x{d} tau={temperature} normalize={normalize} self_mask={self_mask}"
            );
            compare_with_cpu(device, &case, &[(&q, &[n, d]), (&k, &[m, d])], |t| {
                infonce_outputs(&t[0], &t[1], &positives, &opts)
            });
        }
    }
}

fn check_infonce_raw(device: Device) {
    check_infonce_options(device, false, false, 0x1c01);
}

fn check_infonce_normalized(device: Device) {
    check_infonce_options(device, true, false, 0x1c02);
}

fn check_infonce_raw_self_mask(device: Device) {
    check_infonce_options(device, false, true, 0x1c03);
}

fn check_infonce_normalized_self_mask(device: Device) {
    check_infonce_options(device, true, true, 0x1c04);
}

#[test]
fn infonce_raw_matches_cpu() {
    on_kernel_devices("infonce_raw_matches_cpu", check_infonce_raw);
}

#[test]
fn infonce_normalized_matches_cpu() {
    on_kernel_devices("infonce_normalized_matches_cpu", check_infonce_normalized);
}

#[test]
fn infonce_raw_self_mask_matches_cpu() {
    on_kernel_devices(
        "infonce_raw_self_mask_matches_cpu",
        check_infonce_raw_self_mask,
    );
}

#[test]
fn infonce_normalized_self_mask_matches_cpu() {
    on_kernel_devices(
        "infonce_normalized_self_mask_matches_cpu",
        check_infonce_normalized_self_mask,
    );
}

/// The split forward / backward with grad_loss = 2.5 gives 2.5x the one-call gradients, on the
/// device, and both agree with the cpu.
fn check_infonce_split_grad_loss(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x1c05);
    for (normalize, self_mask) in [(false, false), (true, true)] {
        let (n, m, d) = if self_mask {
            (37, 37, 77)
        } else {
            (37, 53, 77)
        };
        let q = random_matrix(&mut rng, n, d);
        let k = random_matrix(&mut rng, m, d);
        let positives = random_positives(&mut rng, n, m, self_mask);
        let opts = InfoNceOptions {
            temperature: 0.07,
            normalize,
            self_mask,
        };
        let case = format!(
            "infonce split grad_loss=2.5 {n}x{m}x{d} normalize={normalize} self_mask={self_mask}"
        );
        let got = compare_with_cpu(device, &case, &[(&q, &[n, d]), (&k, &[m, d])], |t| {
            let one_call = infonce(&t[0], &t[1], &positives, &opts)?;
            let fwd = infonce_forward(&t[0], &t[1], &positives, &opts)?;
            let (grad_q, grad_k) =
                infonce_backward(&t[0], &t[1], &positives, &opts, &fwd.saved, 2.5)?;
            Ok(vec![
                ("loss (one call)", vec![one_call.loss.to_scalar().unwrap()]),
                ("loss (split)", vec![fwd.loss.to_scalar().unwrap()]),
                ("grad_q (one call)", one_call.grad_q.to_vec_f64().unwrap()),
                ("grad_k (one call)", one_call.grad_k.to_vec_f64().unwrap()),
                ("grad_q (split, 2.5)", grad_q.to_vec_f64().unwrap()),
                ("grad_k (split, 2.5)", grad_k.to_vec_f64().unwrap()),
            ])
        });
        for grad in ["grad_q", "grad_k"] {
            let split = output(&got, &format!("{grad} (split, 2.5)"));
            let one_call = scaled(output(&got, &format!("{grad} (one call)")), 2.5);
            let err = rel_err(split, &one_call);
            assert!(err <= TOL, "{case} on {device}: {grad} with grad_loss 2.5 is not 2.5x the one-call one ({err:e})");
        }
    }
}

#[test]
fn infonce_split_backward_scales_with_grad_loss() {
    on_kernel_devices(
        "infonce_split_backward_scales_with_grad_loss",
        check_infonce_split_grad_loss,
    );
}

/// Rows of random direction and a norm in [9, 11).
fn rows_of_norm_ten(rng: &mut StdRng, rows: usize, dim: usize) -> Vec<f32> {
    let mut x = random_matrix(rng, rows, dim);
    for row in x.chunks_mut(dim) {
        let norm = row
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-6);
        let target = rng.random_range(9.0..11.0);
        row.iter_mut()
            .for_each(|v| *v = (*v as f64 * target / norm) as f32);
    }
    x
}

/// Temperature 0.01 on unnormalized rows of norm ~10: logits up to ~1e4, far beyond what exp
/// survives in f32; an online log-sum-exp keeps everything finite and equal to the cpu.
fn check_infonce_large_logits(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x1c06);
    for self_mask in [false, true] {
        let (n, m, d) = if self_mask { (37, 37, 6) } else { (37, 53, 6) };
        let q = rows_of_norm_ten(&mut rng, n, d);
        let k = rows_of_norm_ten(&mut rng, m, d);
        let positives = random_positives(&mut rng, n, m, self_mask);
        let opts = InfoNceOptions {
            temperature: 0.01,
            normalize: false,
            self_mask,
        };
        let max_logit = q
            .chunks(d)
            .flat_map(|qi| {
                k.chunks(d).map(move |kj| {
                    qi.iter()
                        .zip(kj)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                })
            })
            .fold(0.0f64, |acc, s| acc.max(s.abs()))
            / opts.temperature;
        assert!(
            max_logit > 5e3,
            "the test's logits are too small to matter ({max_logit})"
        );
        let case = format!(
            "infonce large logits (max |logit| {max_logit:.0}) {n}x{m}x{d} self_mask={self_mask}"
        );
        // A logit near 1e4 is only known to ulp(1e4) ~ 1e-3 in f32, and softmax probabilities
        // inherit that absolute error; 2e-3 still fails any overflow (inf / NaN) by far.
        let tolerance = 2.0 * max_logit * f32::EPSILON as f64;
        let got = compare_with_cpu_within(
            device,
            &case,
            &[(&q, &[n, d]), (&k, &[m, d])],
            tolerance,
            |t| infonce_outputs(&t[0], &t[1], &positives, &opts),
        );
        for (name, values) in &got {
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{case} on {device}: `{name}` is not finite"
            );
        }
    }
}

#[test]
fn infonce_large_logits_stay_finite() {
    on_kernel_devices(
        "infonce_large_logits_stay_finite",
        check_infonce_large_logits,
    );
}

// ---------------------------------------------------------------------------------------------
// NT-Xent
// ---------------------------------------------------------------------------------------------

/// `(N, D)` for NT-Xent's 2N x D input: 2 rows, 4 rows, odd sizes, one feature, and 2, 3 and 4
/// row tiles (the symmetric forward visits each pair of tiles once; an even count of tiles
/// gives the upper half one tile fewer).
const NTXENT_SHAPES: &[(usize, usize)] =
    &[(1, 17), (2, 17), (37, 77), (37, 1), (65, 40), (100, 24)];

fn check_ntxent(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x7e01);
    for &temperature in TEMPERATURES {
        for &(n, d) in NTXENT_SHAPES {
            let z = feature_matrix(&mut rng, 2 * n, d);
            let opts = NtXentOptions { temperature };
            let case = format!("ntxent 2x{n}x{d} tau={temperature}");
            compare_with_cpu(device, &case, &[(&z, &[2 * n, d])], |t| {
                let fwd = ntxent_forward(&t[0], &opts)?;
                let grad_z = ntxent_backward(&t[0], &opts, &fwd.saved, 1.0)?;
                Ok(vec![
                    ("loss", vec![fwd.loss.to_scalar().unwrap()]),
                    ("lse", fwd.saved.lse.to_vec_f64().unwrap()),
                    ("grad_z", grad_z.to_vec_f64().unwrap()),
                ])
            });
        }
    }
}

#[test]
fn ntxent_matches_cpu() {
    on_kernel_devices("ntxent_matches_cpu", check_ntxent);
}

fn check_ntxent_split_grad_loss(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x7e02);
    let (n, d) = (37, 77);
    let z = random_matrix(&mut rng, 2 * n, d);
    let opts = NtXentOptions { temperature: 0.07 };
    let case = format!("ntxent split grad_loss=2.5 2x{n}x{d}");
    let got = compare_with_cpu(device, &case, &[(&z, &[2 * n, d])], |t| {
        let one_call = ntxent(&t[0], &opts)?;
        let fwd = ntxent_forward(&t[0], &opts)?;
        let grad_z = ntxent_backward(&t[0], &opts, &fwd.saved, 2.5)?;
        Ok(vec![
            ("loss (one call)", vec![one_call.loss.to_scalar().unwrap()]),
            ("loss (split)", vec![fwd.loss.to_scalar().unwrap()]),
            ("grad_z (one call)", one_call.grad_z.to_vec_f64().unwrap()),
            ("grad_z (split, 2.5)", grad_z.to_vec_f64().unwrap()),
        ])
    });
    let err = rel_err(
        output(&got, "grad_z (split, 2.5)"),
        &scaled(output(&got, "grad_z (one call)"), 2.5),
    );
    assert!(
        err <= TOL,
        "{case} on {device}: grad_z with grad_loss 2.5 is not 2.5x the one-call one ({err:e})"
    );
}

#[test]
fn ntxent_split_backward_scales_with_grad_loss() {
    on_kernel_devices(
        "ntxent_split_backward_scales_with_grad_loss",
        check_ntxent_split_grad_loss,
    );
}

/// Where the wave model says the card fills better, the forwards, the backwards and SigLIP's
/// sweep cut their rows of key tiles into ranges (`split_cases`): on a modelled device the exact
/// f32 kernels run on those grids and match the CPU.
#[test]
fn sweeps_split_their_key_ranges() {
    check_split_cases(0x7e03, 24, "f32", |split| {
        let case = &split.case;
        testing::take_launches();
        compare_with_cpu(Device::Interp, &case.name, &case.input_refs(), &case.op);
        testing::take_launches()
    });
}

// ---------------------------------------------------------------------------------------------
// The interpreted mode's guards (interp only: they launch deliberately broken kernels)
// ---------------------------------------------------------------------------------------------

/// Checks that `result` is an `Error::Kernel` whose reason names buffer `y` and contains one of
/// `needles`.
fn expect_kernel_error(what: &str, result: Result<()>, needles: &[&str]) {
    match result {
        Err(err @ Error::Kernel { .. }) => {
            println!("{what}: {err}");
            let Error::Kernel { reason, .. } = &err else {
                unreachable!()
            };
            assert!(
                reason.contains("`y`"),
                "{what}: the message does not name buffer `y`: {err}"
            );
            assert!(
                needles.iter().any(|n| reason.contains(n)),
                "{what}: the message says none of {needles:?}: {err}"
            );
        }
        other => panic!("{what}: expected Err(Error::Kernel {{ .. }}), got {other:?}"),
    }
}

#[test]
fn interp_out_of_bounds_write_is_an_error() {
    expect_kernel_error(
        "out_of_bounds_launch",
        contra::testing::out_of_bounds_launch(),
        &["out of bounds", "past the end", "before the start"],
    );
}

#[test]
fn interp_unwritten_output_is_an_error() {
    expect_kernel_error(
        "unwritten_output_launch",
        contra::testing::unwritten_output_launch(),
        &["unwritten"],
    );
}

/// (N, K, D) for MoCo: queues shorter and longer than a 64-key tile, a single negative, D = 1.
const MOCO_SHAPES: &[(usize, usize, usize)] = &[
    (37, 101, 77),
    (1, 3, 17),
    (2, 1, 17),
    (37, 53, 1),
    (130, 70, 40),
];

fn check_moco(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x3c0c);
    for &temperature in TEMPERATURES {
        for &(n, queue_len, d) in MOCO_SHAPES {
            let q = feature_matrix(&mut rng, n, d);
            let k = feature_matrix(&mut rng, n, d);
            let queue = random_matrix(&mut rng, queue_len, d);
            let opts = MocoOptions { temperature };
            let case = format!("moco {n}x{queue_len}x{d} tau={temperature}");
            let inputs: &[Input] = &[(&q, &[n, d]), (&k, &[n, d]), (&queue, &[queue_len, d])];
            compare_with_cpu(device, &case, inputs, |t| {
                let fwd = moco_forward(&t[0], &t[1], &t[2], &opts)?;
                let grad_q = moco_backward(&t[0], &t[1], &t[2], &opts, &fwd.saved, 1.5)?;
                Ok(vec![
                    ("loss", vec![fwd.loss.to_scalar().unwrap()]),
                    ("lse", fwd.saved.lse.to_vec_f64().unwrap()),
                    ("grad_q", grad_q.to_vec_f64().unwrap()),
                ])
            });
        }
    }
}

#[test]
fn moco_matches_cpu() {
    on_kernel_devices("moco_matches_cpu", check_moco);
}

/// MoCo with 256 queries against a 65536-key queue: the forward and backward sweeps the
/// interpreted mode ran had at least 2 blocks per SM of a 132-SM card (the keys split across
/// blocks; unsplit, 256 rows are 4 blocks), and the results are the CPU's.
#[test]
fn moco_fills_the_card_at_256_queries_and_65536_keys() {
    const FILL_BLOCKS: u32 = 2 * 132;
    let (n, queue_len, d) = (256, 65536, 3);
    let mut rng = StdRng::seed_from_u64(0x3c0d);
    let q = random_matrix(&mut rng, n, d);
    let k = random_matrix(&mut rng, n, d);
    let queue = random_matrix(&mut rng, queue_len, d);
    let opts = MocoOptions { temperature: 0.2 };
    let inputs: &[Input] = &[(&q, &[n, d]), (&k, &[n, d]), (&queue, &[queue_len, d])];
    contra::testing::take_launches();
    compare_with_cpu(Device::Interp, "moco 256x65536x3", inputs, |t| {
        let fwd = moco_forward(&t[0], &t[1], &t[2], &opts)?;
        let grad_q = moco_backward(&t[0], &t[1], &t[2], &opts, &fwd.saved, 1.0)?;
        Ok(vec![
            ("loss", vec![fwd.loss.to_scalar().unwrap()]),
            ("grad_q", grad_q.to_vec_f64().unwrap()),
        ])
    });
    let launches = contra::testing::take_launches();
    for sweep in ["infonce_fwd_split_f32", "infonce_bwd_f32"] {
        let launch = launches
            .iter()
            .find(|l| l.kernel == sweep)
            .unwrap_or_else(|| panic!("no {sweep} among {launches:?}"));
        let blocks = launch.grid.iter().product::<u32>();
        assert!(
            blocks >= FILL_BLOCKS,
            "{sweep} ran {:?} = {blocks} blocks, fewer than {FILL_BLOCKS}",
            launch.grid
        );
    }
}

/// (N, V, D) for SupCon: N·V across a 64-row tile, a lone view (every key masked), V = 3, and
/// 3 and 4 row tiles for the symmetric forward.
const SUPCON_SHAPES: &[(usize, usize, usize)] = &[
    (37, 2, 77),
    (1, 1, 17),
    (2, 1, 17),
    (23, 3, 40),
    (37, 2, 1),
    (45, 3, 19),
    (50, 4, 33),
];

fn check_supcon(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x5c0b);
    for &(n, views, d) in SUPCON_SHAPES {
        let features = feature_matrix(&mut rng, n * views, d);
        // Few classes so most anchors have positives, plus one label seen once.
        let mut labels: Vec<i64> = (0..n).map(|_| rng.random_range(0..4)).collect();
        labels[0] = 99;
        let opts = SupConOptions {
            temperature: 0.1,
            base_temperature: 0.07,
            ..Default::default()
        };
        let case = format!("supcon {n}x{views}x{d}");
        compare_with_cpu(device, &case, &[(&features, &[n, views, d])], |t| {
            let fwd = supcon_forward(&t[0], &labels, &opts)?;
            let grad = supcon_backward(&t[0], &labels, &opts, &fwd.saved, 0.75)?;
            Ok(vec![
                ("loss", vec![fwd.loss.to_scalar().unwrap()]),
                ("lse", fwd.saved.lse.to_vec_f64().unwrap()),
                ("grad_features", grad.to_vec_f64().unwrap()),
            ])
        });
    }
}

#[test]
fn supcon_matches_cpu() {
    on_kernel_devices("supcon_matches_cpu", check_supcon);
}

/// (N, D) for CLIP: rows and columns across 64-wide tiles, tiny batches, D = 1. (N = 1 is
/// degenerate: the loss is identically 0 and both sides hold only rounding noise.)
const CLIP_SHAPES: &[(usize, usize)] = &[(37, 77), (3, 17), (2, 17), (37, 1), (130, 40)];

fn check_clip(device: Device) {
    let mut rng = StdRng::seed_from_u64(0xc11b);
    // The CLIP init (1 / 0.07) and its usual cap (100).
    for log_scale in [(1.0f64 / 0.07).ln(), 100f64.ln()] {
        for &(n, d) in CLIP_SHAPES {
            let a = feature_matrix(&mut rng, n, d);
            let b = feature_matrix(&mut rng, n, d);
            let case = format!("clip {n}x{d} log_scale={log_scale:.2}");
            compare_with_cpu(device, &case, &[(&a, &[n, d]), (&b, &[n, d])], |t| {
                let fwd = clip_forward(&t[0], &t[1], log_scale)?;
                let grads = clip_backward(&t[0], &t[1], log_scale, &fwd.saved, 1.25)?;
                Ok(vec![
                    ("loss", vec![fwd.loss.to_scalar().unwrap()]),
                    ("row_lse", fwd.saved.row_lse.to_vec_f64().unwrap()),
                    ("col_lse", fwd.saved.col_lse.to_vec_f64().unwrap()),
                    ("grad_a", grads.grad_a.to_vec_f64().unwrap()),
                    ("grad_b", grads.grad_b.to_vec_f64().unwrap()),
                    (
                        "grad_log_scale",
                        vec![grads.grad_log_scale.to_scalar().unwrap()],
                    ),
                ])
            });
        }
    }
}

#[test]
fn clip_matches_cpu() {
    on_kernel_devices("clip_matches_cpu", check_clip);
}

/// `x` rounded to tf32 as PTX's cvt.rna.tf32.f32 does (10 mantissa bits, to nearest, ties away
/// from zero), computed from the value's binade rather than from its bits.
fn tf32_reference(x: f32) -> f32 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let magnitude = x.abs() as f64;
    let mut exponent = (magnitude.log2().floor() as i32).max(-126);
    while exponent > -126 && 2f64.powi(exponent) > magnitude {
        exponent -= 1;
    }
    while 2f64.powi(exponent + 1) <= magnitude {
        exponent += 1;
    }
    let unit = 2f64.powi(exponent - 10);
    let rounded = (magnitude / unit + 0.5).floor() * unit; // exact: unit is a power of two
    (rounded as f32).copysign(x) // 2^128 (past f32::MAX) becomes inf
}

/// mma_1688_tf32 and to_tf32 (kernels/tensor_core.cuh) follow the PTX ISA: lane l = 4 g + t
/// holds A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4] and B[t][g], B[t+4][g] and receives D[g][2t],
/// D[g][2t+1], D[g+8][2t], D[g+8][2t+1]; operands round to nearest with ties away from zero. On a
/// GPU this checks the hardware against what the interpreted mode emulates.
/// Values whose tf32 rounding covers ties (both signs), the carry into the exponent, overflow to
/// inf, inf, NaN, signed zeros, subnormals and ordinary numbers.
fn tf32_rounding_cases() -> [f32; 32] {
    let tie = 1.0 + 2f32.powi(-11);
    [
        1.0,
        tie,
        -tie,
        f32::from_bits(tie.to_bits() - 1),
        1.0 + 3.0 * 2f32.powi(-11),
        f32::from_bits(0x3fff_ffff),
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        2f32.powi(-140) + 2f32.powi(-149),
        -2f32.powi(-137) * 3.0,
        std::f32::consts::PI,
        -std::f32::consts::E,
        1e-3,
        -7.77e20,
        123_456.79,
        0.1,
        -0.3,
        65_504.0,
        1.000_976_6,
        2.0f32.powi(100) * 1.999,
        -1e-30,
        5.0e-39,
        0.999_999_94,
        -1.5,
        1.0 / 3.0,
        9_999.999,
    ]
}

#[test]
fn tf32_mma_and_rounding_follow_the_ptx_isa() {
    common::on_kernel_devices("tf32_mma", |device| {
        let values = tf32_rounding_cases();
        let got = contra::testing::tf32_mma_fragments(device, &values).unwrap();
        let a = |i: usize, k: usize| 1.0 + (8 * i + k) as f32 / 128.0 + 3.0 / 4096.0;
        let b = |k: usize, n: usize| -(1.0 + (8 * k + n) as f32 / 64.0 + 5.0 / 8192.0);
        let d = |r: usize, c: usize| -> f64 {
            (0..8)
                .map(|k| tf32_reference(a(r, k)) as f64 * tf32_reference(b(k, c)) as f64)
                .sum()
        };
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            let places = [
                (g, 2 * t),
                (g, 2 * t + 1),
                (g + 8, 2 * t),
                (g + 8, 2 * t + 1),
            ];
            for (e, &(r, c)) in places.iter().enumerate() {
                let have = f32::from_bits(got[4 * lane + e]) as f64;
                let want = d(r, c);
                assert!(
                    (have - want).abs() <= 1e-6 * want.abs(),
                    "{device}: lane {lane} d[{e}] = D[{r}][{c}]: {have} != {want}"
                );
            }
        }
        for (i, &x) in values.iter().enumerate() {
            let have = f32::from_bits(got[128 + i]);
            let want = tf32_reference(x);
            assert!(
                have.to_bits() == want.to_bits() || (have.is_nan() && want.is_nan()),
                "{device}: to_tf32({x:e} = {:#010x}) = {:#010x}, want {:#010x}",
                x.to_bits(),
                have.to_bits(),
                want.to_bits()
            );
        }
    });
}

/// Hopper's warpgroup MMA (kernels/wgmma.cuh) follows the PTX ISA: operands in the 128-byte
/// swizzle described by their shared-memory descriptors, K-major (a k-step 32 bytes on) and
/// MN-major (a whole 64-column panel, a k-step 16 rows on, as the wgmma backward reads the key
/// tile, G and the query rows), bf16 and tf32 (K-major, 8 f32 words a k-step), and the
/// accumulators of thread 32 w + 4 g + t at row 16 w + g + 8 ((i / 2) % 2), column
/// 8 (i / 4) + 2 t + i % 2; the first op of a chain ignores what the accumulators held (NaN). On
/// a Hopper GPU this checks the hardware against what the interpreted mode emulates; elsewhere
/// the GPU run is reported as skipped.
#[test]
fn wgmma_follows_the_ptx_isa() {
    common::on_kernel_devices("wgmma", |device| {
        let got = match contra::testing::wgmma_fragments(device) {
            Ok(words) => words,
            Err(e) if device != Device::Interp => {
                println!("wgmma on {device}: skipped: {e}");
                return;
            }
            Err(e) => panic!("{device}: {e}"),
        };
        // Panel element (row, column) of A and of B.
        let a = |row: usize, k: usize| ((7 * row + 3 * k) % 17) as f64 - 8.0;
        let b = |row: usize, k: usize| ((5 * row + 11 * k) % 13) as f64 - 6.0;
        type Product<'a> = &'a dyn Fn(usize, usize) -> f64;
        // (name, first word, words per thread, the product): D = A B[0..32)^T with both operands
        // K-major (the panels' rows are M and N), E = A^T B with both MN-major (their rows are K),
        // F = A' B'^T in tf32 over the first 32 columns, K-major.
        let products: [(&str, usize, usize, Product); 3] = [
            ("D", 0, 16, &|row, col| {
                (0..64).map(|k| a(row, k) * b(col, k)).sum()
            }),
            ("E", 2048, 32, &|row, col| {
                (0..64).map(|k| a(k, row) * b(k, col)).sum()
            }),
            ("F", 6144, 16, &|row, col| {
                (0..32).map(|k| a(row, k) * b(col, k)).sum()
            }),
        ];
        for (name, first, per_thread, want) in products {
            for tid in 0..128 {
                let (warp, g, t) = (tid / 32, tid % 32 / 4, tid % 4);
                for i in 0..per_thread {
                    let row = 16 * warp + g + 8 * ((i / 2) % 2);
                    let col = 8 * (i / 4) + 2 * t + i % 2;
                    let have = f32::from_bits(got[first + per_thread * tid + i]) as f64;
                    assert!(
                        have == want(row, col),
                        "{device}: thread {tid} {name} element {i} = {name}[{row}][{col}]: {have} != {}",
                        want(row, col)
                    );
                }
            }
        }
    });
}

/// A launch may give a block more than 48 KB of dynamic shared memory (up to 227 KB): the kernel
/// sees that many bytes and every word of them holds what was written; beyond 227 KB the launch is
/// an error naming the shared memory.
#[test]
fn dynamic_shared_memory_beyond_48_kb() {
    common::on_kernel_devices("dynamic_shared", |device| {
        // The kernel has 4 B of static shared memory: 48 KB of dynamic memory already needs the
        // raised limit, and the largest request leaves room for the static word.
        for bytes in [1024, 48 * 1024, 100 * 1024, 227 * 1024 - 16] {
            let (seen, wrong) = contra::testing::dynamic_shared_roundtrip(device, bytes).unwrap();
            assert_eq!(seen as usize, bytes, "{device}");
            assert_eq!(wrong, 0, "{device}: {bytes} B");
        }
        let err = contra::testing::dynamic_shared_roundtrip(device, 227 * 1024 + 4).unwrap_err();
        assert!(err.to_string().contains("shared memory"), "{err}");
    });
}

/// ldmatrix (kernels/tensor_core.cuh) gives the PTX ISA's fragment layouts: lane l = 4 g + t
/// holds elements (g, 2t), (g, 2t + 1) of each matrix, or (2t, g), (2t + 1, g) with .trans. On
/// a GPU this checks the hardware against the layouts the interpreted mode emulates.
#[test]
fn ldmatrix_fragments_follow_the_ptx_layouts() {
    common::on_kernel_devices("ldmatrix", |device| {
        let got = contra::testing::ldmatrix_fragments(device).unwrap();
        let forms = [
            (1, false),
            (2, false),
            (4, false),
            (1, true),
            (2, true),
            (4, true),
        ];
        for (form, (count, transposed)) in forms.into_iter().enumerate() {
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                for i in 0..4 {
                    let at = |r: usize, c: usize| (i * 64 + r * 8 + c + 1) as u32;
                    let want = match (i < count, transposed) {
                        (false, _) => 0,
                        (true, false) => at(g, 2 * t) | at(g, 2 * t + 1) << 16,
                        (true, true) => at(2 * t, g) | at(2 * t + 1, g) << 16,
                    };
                    let dot = if transposed { ".trans" } else { "" };
                    assert_eq!(
                        got[form * 128 + lane * 4 + i],
                        want,
                        "{device}: ldmatrix x{count}{dot}, lane {lane}, d[{i}]"
                    );
                }
            }
        }
    });
}
