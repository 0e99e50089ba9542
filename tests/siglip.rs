//! SigLIP through the public API: finite-difference gradients in f64 for every input and both
//! scalars, a direct pairwise reference (logits near +-50 included), f32 against f64 at shapes
//! that cross the CPU tiles, the two-call form against the one-call form, the fixtures in f64,
//! and one test per input error.

use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::{
    compare_with_cpu, feature_matrix, numeric_grad, on_kernel_devices, rel_err, t32, t64, v64,
    Outputs,
};

fn uniform(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| 2.0 * rng.random::<f64>() - 1.0).collect()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar().unwrap()
}

#[track_caller]
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let err = rel_err(got, want);
    assert!(err < tol, "{what}: relative error {err:e} >= {tol:e}");
}

/// The loss straight from its definition, in f64: every pair, a stable log-sigmoid.
fn reference_loss(
    a: &[f64],
    b: &[f64],
    dim: usize,
    log_scale: f64,
    bias: f64,
    cosine: bool,
) -> f64 {
    reference(a, b, dim, (log_scale, bias), cosine, true)
}

/// [`reference_loss`] of `a` (N rows) against `b` (M rows); without `positives` every pair is a
/// negative.
fn reference(
    a: &[f64],
    b: &[f64],
    dim: usize,
    (log_scale, bias): (f64, f64),
    cosine: bool,
    positives: bool,
) -> f64 {
    let (rows, cols) = (a.len() / dim, b.len() / dim);
    let unit = |r: &[f64]| {
        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        r.iter()
            .map(|x| if cosine { x / n } else { *x })
            .collect::<Vec<_>>()
    };
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let mut total = 0.0;
    for i in 0..rows {
        let ai = unit(&a[i * dim..(i + 1) * dim]);
        for j in 0..cols {
            let bj = unit(&b[j * dim..(j + 1) * dim]);
            let s: f64 = ai.iter().zip(&bj).map(|(x, y)| x * y).sum();
            let logit = log_scale.exp() * s + bias;
            let z = if positives && i == j { 1.0 } else { -1.0 };
            total += softplus(-z * logit);
        }
    }
    total / rows as f64
}

fn check_gradients(normalize: bool, log_scale: f64, bias: f64, seed: u64) {
    let (n, d) = (6, 4);
    let (a, b) = (uniform(seed, n * d), uniform(seed + 1, n * d));
    let opts = SigLipOptions {
        normalize,
        ..Default::default()
    };
    let loss_at = |a: &[f64], b: &[f64], ls: f64, bias: f64| {
        scalar(&siglip_forward(&t64(a, &[n, d]), &t64(b, &[n, d]), ls, bias, &opts).unwrap())
    };
    let out = siglip(&t64(&a, &[n, d]), &t64(&b, &[n, d]), log_scale, bias, &opts).unwrap();
    let what = format!("normalize {normalize}, log_scale {log_scale}, bias {bias}");
    let want_loss = reference_loss(&a, &b, d, log_scale, bias, normalize);
    assert_close(
        &[scalar(&out.loss)],
        &[want_loss],
        1e-13,
        &format!("loss ({what})"),
    );
    let num_a = numeric_grad(|x| loss_at(x, &b, log_scale, bias), &a);
    let num_b = numeric_grad(|x| loss_at(&a, x, log_scale, bias), &b);
    let num_ls = numeric_grad(|x| loss_at(&a, &b, x[0], bias), &[log_scale]);
    let num_bias = numeric_grad(|x| loss_at(&a, &b, log_scale, x[0]), &[bias]);
    assert_close(&v64(&out.grad_a), &num_a, 1e-6, &format!("grad_a ({what})"));
    assert_close(&v64(&out.grad_b), &num_b, 1e-6, &format!("grad_b ({what})"));
    let (got_ls, got_bias) = (scalar(&out.grad_log_scale), scalar(&out.grad_bias));
    assert_close(
        &[got_ls],
        &num_ls,
        1e-6,
        &format!("grad_log_scale ({what})"),
    );
    assert_close(&[got_bias], &num_bias, 1e-6, &format!("grad_bias ({what})"));
    assert!(
        got_ls.abs() > 1e-3 && got_bias.abs() > 1e-3,
        "degenerate check: a scalar gradient is ~0 ({what})"
    );
}

#[test]
fn finite_difference_gradients_for_every_input_and_both_scalars() {
    check_gradients(true, 10f64.ln(), -10.0, 1);
    check_gradients(true, 1.5, 0.7, 3);
    check_gradients(false, 0.3, -1.0, 5);
}

/// Logits of +-50 and beyond: where `log(sigmoid(x))` in f32 gives -inf (x < -104) or rounds
/// every term of a positive to 0, the loss and gradients keep their digits.
#[test]
fn large_logits_keep_their_digits() {
    let (n, d) = (9, 5);
    let (a, b) = (uniform(7, n * d), uniform(8, n * d));
    let opts = SigLipOptions::default();
    // Logit scale 100 on cosines in [-1, 1], bias -10: logits from -110 to 90.
    let (log_scale, bias) = (100f64.ln(), -10.0);
    let hi = siglip(&t64(&a, &[n, d]), &t64(&b, &[n, d]), log_scale, bias, &opts).unwrap();
    let want = reference_loss(&a, &b, d, log_scale, bias, true);
    assert_close(
        &[scalar(&hi.loss)],
        &[want],
        1e-13,
        "f64 loss at logit scale 100",
    );
    let lo = siglip(&t32(&a, &[n, d]), &t32(&b, &[n, d]), log_scale, bias, &opts).unwrap();
    assert_close(
        &[scalar(&lo.loss)],
        &[want],
        1e-4,
        "f32 loss at logit scale 100",
    );
    assert_close(
        &v64(&lo.grad_a),
        &v64(&hi.grad_a),
        1e-4,
        "f32 grad_a at logit scale 100",
    );
    assert_close(
        &v64(&lo.grad_b),
        &v64(&hi.grad_b),
        1e-4,
        "f32 grad_b at logit scale 100",
    );

    // One pair, matched, at logit +50 and one mismatched pair at logit -50: the loss is
    // 2 softplus(-50) / 2, about 2e-22, which a naive log(sigmoid) in f32 rounds to 0.
    let unit_rows = [1.0, 0.0, 0.0, 1.0];
    for t in [t64(&unit_rows, &[2, 2]), t32(&unit_rows, &[2, 2])] {
        let out = siglip(&t, &t, 50f64.ln(), 0.0, &opts).unwrap();
        // Pairs: (0,0), (1,1) at +50, positives; (0,1), (1,0) at 0, negatives: ln 2 each.
        let want = (2.0 * (-50f64).exp().ln_1p() + 2.0 * 2f64.ln()) / 2.0;
        assert_close(
            &[scalar(&out.loss)],
            &[want],
            1e-7,
            "loss at logits 50 and 0",
        );
        let out = siglip(&t, &t, 50f64.ln(), -100.0, &opts).unwrap();
        // Positives at -50, negatives at -100: the loss is about 50 + e^-100.
        let want = (2.0 * (50.0 + (-50f64).exp().ln_1p()) + 2.0 * (-100f64).exp().ln_1p()) / 2.0;
        assert_close(
            &[scalar(&out.loss)],
            &[want],
            1e-7,
            "loss at logits -50 and -100",
        );
        let grad_bias = scalar(&out.grad_bias);
        // d/d bias: (sigmoid(-50) - 1) twice plus sigmoid(-100) twice, over N = 2.
        assert_close(
            &[grad_bias],
            &[-1.0 + (-50f64).exp()],
            1e-7,
            "grad_bias at -50",
        );
    }
}

/// f32 against f64 at shapes that are not multiples of the CPU tiles (128 rows, 512 keys).
#[test]
fn f32_matches_f64_across_tiles() {
    let (n, d) = (517, 37);
    let (a, b) = (uniform(11, n * d), uniform(12, n * d));
    for (normalize, log_scale, bias) in [(true, 10f64.ln(), -10.0), (false, -1.0, 0.5)] {
        let opts = SigLipOptions {
            normalize,
            ..Default::default()
        };
        let hi = siglip(&t64(&a, &[n, d]), &t64(&b, &[n, d]), log_scale, bias, &opts).unwrap();
        let lo = siglip(&t32(&a, &[n, d]), &t32(&b, &[n, d]), log_scale, bias, &opts).unwrap();
        let what = format!("normalize {normalize}");
        assert_close(
            &[scalar(&lo.loss)],
            &[scalar(&hi.loss)],
            1e-5,
            &format!("loss, {what}"),
        );
        assert_close(
            &v64(&lo.grad_a),
            &v64(&hi.grad_a),
            1e-4,
            &format!("grad_a, {what}"),
        );
        assert_close(
            &v64(&lo.grad_b),
            &v64(&hi.grad_b),
            1e-4,
            &format!("grad_b, {what}"),
        );
        for (got, want, name) in [
            (&lo.grad_log_scale, &hi.grad_log_scale, "grad_log_scale"),
            (&lo.grad_bias, &hi.grad_bias, "grad_bias"),
        ] {
            assert_close(
                &[scalar(got)],
                &[scalar(want)],
                1e-4,
                &format!("{name}, {what}"),
            );
        }
    }
}

/// A block of negatives only (another shard's b, M rows): the definition, finite differences,
/// and the identity `loss = loss_negatives_only - (1/N) sum_i logit_ii` on the same pairs.
#[test]
fn negatives_only_blocks() {
    let (n, m, d) = (5, 7, 3);
    let (a, b) = (uniform(51, n * d), uniform(52, m * d));
    let opts = SigLipOptions {
        negatives_only: true,
        ..Default::default()
    };
    let (log_scale, bias) = (1.2, -0.4);
    let out = siglip(&t64(&a, &[n, d]), &t64(&b, &[m, d]), log_scale, bias, &opts).unwrap();
    let want = reference(&a, &b, d, (log_scale, bias), true, false);
    assert_close(&[scalar(&out.loss)], &[want], 1e-13, "negatives-only loss");
    let loss_at = |a: &[f64], b: &[f64], ls: f64, bias: f64| {
        scalar(&siglip_forward(&t64(a, &[n, d]), &t64(b, &[m, d]), ls, bias, &opts).unwrap())
    };
    let num_a = numeric_grad(|x| loss_at(x, &b, log_scale, bias), &a);
    let num_b = numeric_grad(|x| loss_at(&a, x, log_scale, bias), &b);
    let num_ls = numeric_grad(|x| loss_at(&a, &b, x[0], bias), &[log_scale]);
    let num_bias = numeric_grad(|x| loss_at(&a, &b, log_scale, x[0]), &[bias]);
    assert_close(&v64(&out.grad_a), &num_a, 1e-6, "negatives-only grad_a");
    assert_close(&v64(&out.grad_b), &num_b, 1e-6, "negatives-only grad_b");
    assert_close(
        &[scalar(&out.grad_log_scale)],
        &num_ls,
        1e-6,
        "negatives-only log_scale",
    );
    assert_close(
        &[scalar(&out.grad_bias)],
        &num_bias,
        1e-6,
        "negatives-only bias",
    );

    let b = uniform(53, n * d);
    let (ta, tb) = (t64(&a, &[n, d]), t64(&b, &[n, d]));
    let full = siglip_forward(&ta, &tb, log_scale, bias, &SigLipOptions::default()).unwrap();
    let negatives = siglip_forward(&ta, &tb, log_scale, bias, &opts).unwrap();
    let unit = |r: &[f64]| {
        let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        r.iter().map(|x| x / norm).collect::<Vec<_>>()
    };
    let diagonal: f64 = (0..n)
        .map(|i| {
            let (ai, bi) = (unit(&a[i * d..(i + 1) * d]), unit(&b[i * d..(i + 1) * d]));
            let s: f64 = ai.iter().zip(&bi).map(|(x, y)| x * y).sum();
            log_scale.exp() * s + bias
        })
        .sum();
    let want = scalar(&negatives) - diagonal / n as f64;
    assert_close(
        &[scalar(&full)],
        &[want],
        1e-13,
        "full = negatives-only - diagonal / N",
    );
    // Without negatives_only, a b of another row count is an error naming it.
    let e = siglip(
        &ta,
        &t64(&uniform(54, 2 * d), &[2, d]),
        1.0,
        0.0,
        &SigLipOptions::default(),
    );
    assert!(e.unwrap_err().to_string().contains("same shape as a"));
}

#[test]
fn two_calls_give_the_one_call_results_scaled_by_grad_loss() {
    let (n, d) = (13, 6);
    let (a, b) = (
        t64(&uniform(21, n * d), &[n, d]),
        t64(&uniform(22, n * d), &[n, d]),
    );
    let opts = SigLipOptions::default();
    let log_scale = Tensor::from_vec(vec![2.0f32], &[], Device::Cpu).unwrap();
    let one = siglip(&a, &b, &log_scale, -3.0, &opts).unwrap();
    let loss = siglip_forward(&a, &b, &log_scale, -3.0, &opts).unwrap();
    assert_eq!(scalar(&loss), scalar(&one.loss));
    let grads = siglip_backward(&a, &b, &log_scale, -3.0, &opts, 2.5).unwrap();
    let scaled = |t: &Tensor| v64(t).iter().map(|x| 2.5 * x).collect::<Vec<_>>();
    assert_close(&v64(&grads.grad_a), &scaled(&one.grad_a), 1e-15, "grad_a");
    assert_close(&v64(&grads.grad_b), &scaled(&one.grad_b), 1e-15, "grad_b");
    assert_close(
        &[scalar(&grads.grad_bias)],
        &[2.5 * scalar(&one.grad_bias)],
        1e-15,
        "bias",
    );
    let want_ls = 2.5 * scalar(&one.grad_log_scale);
    assert_close(
        &[scalar(&grads.grad_log_scale)],
        &[want_ls],
        1e-15,
        "log_scale",
    );
}

/// The fixtures in f64 (the checker runs them in f32): PyTorch's float64 values to 1e-9.
#[cfg(feature = "fixtures")]
#[test]
fn fixtures_in_f64() {
    use contra::fixtures::{run_case, Case, Precision};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["siglip_small", "siglip_odd", "siglip_raw"] {
        let case = Case::load(&root.join(name)).unwrap();
        let report = run_case(&case, Device::Cpu, Precision::F64);
        assert!(report.passed(), "{}", report.line());
    }
}

#[test]
fn bad_input_is_an_error_that_says_what() {
    let opts = SigLipOptions::default();
    let a = t64(&uniform(31, 12), &[4, 3]);
    let err = |r: Result<SigLipOutput>| r.unwrap_err().to_string();

    let b = t64(&uniform(32, 15), &[5, 3]);
    assert!(err(siglip(&a, &b, 1.0, 0.0, &opts)).contains("same shape as a"));
    let empty = t64(&[], &[0, 3]);
    assert!(err(siglip(&empty, &empty, 1.0, 0.0, &opts)).contains("empty batch"));
    let mut nan = uniform(33, 12);
    nan[5] = f64::NAN;
    assert!(err(siglip(&t64(&nan, &[4, 3]), &a, 1.0, 0.0, &opts)).contains("`a`"));
    assert!(err(siglip(&a, &a, f64::NAN, 0.0, &opts)).contains("log_scale"));
    assert!(err(siglip(&a, &a, 1.0, f64::INFINITY, &opts)).contains("bias"));
    let f32s = a.to_dtype(DType::F32).unwrap();
    let e = err(siglip(&f32s, &f32s, 200.0, 0.0, &opts));
    assert!(e.contains("log_scale") && e.contains("overflows"), "{e}");
    let two = t64(&[1.0, 2.0], &[2]);
    assert!(err(siglip(&a, &a, &two, 0.0, &opts)).contains("one element"));
    let e = siglip_backward(&a, &a, 1.0, 0.0, &opts, f64::NAN).unwrap_err();
    assert!(e.to_string().contains("grad_loss"), "{e}");
    // Finite inputs whose dot products overflow f32: an error naming what scales the logits.
    let huge = t32(&[3e19; 12], &[4, 3]);
    let raw = SigLipOptions {
        normalize: false,
        ..Default::default()
    };
    let e = err(siglip(&huge, &huge, 0.0, 0.0, &raw));
    assert!(e.contains("log_scale"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Kernels (Interp always, GPU 0 when usable) against the CPU in f64
// ---------------------------------------------------------------------------------------------

/// (N, D): rows and columns across 64-wide tiles, feature counts off every slice and chunk, a
/// single pair, one feature.
const KERNEL_SHAPES: &[(usize, usize)] = &[(37, 77), (1, 5), (3, 17), (37, 1), (130, 70)];

/// The forward, the backward and the one-call form of one case, as named outputs.
fn all_outputs(t: &[Tensor], log_scale: f64, bias: f64, opts: &SigLipOptions) -> Result<Outputs> {
    let loss = siglip_forward(&t[0], &t[1], log_scale, bias, opts)?;
    let grads = siglip_backward(&t[0], &t[1], log_scale, bias, opts, 1.25)?;
    let one = siglip(&t[0], &t[1], log_scale, bias, opts)?;
    Ok(vec![
        ("loss", vec![loss.to_scalar()?]),
        ("grad_a", grads.grad_a.to_vec_f64()?),
        ("grad_b", grads.grad_b.to_vec_f64()?),
        ("grad_log_scale", vec![grads.grad_log_scale.to_scalar()?]),
        ("grad_bias", vec![grads.grad_bias.to_scalar()?]),
        ("one-call loss", vec![one.loss.to_scalar()?]),
        ("one-call grad_a", one.grad_a.to_vec_f64()?),
        ("one-call grad_bias", vec![one.grad_bias.to_scalar()?]),
    ])
}

fn check_kernels(device: Device) {
    let mut rng = StdRng::seed_from_u64(0x5161);
    // The SigLIP init (scale 10, bias -10), a scale of 100 (logits near +-110), and the dot
    // product form.
    let settings = [
        (true, 10f64.ln(), -10.0),
        (true, 100f64.ln(), -10.0),
        (false, -0.5, 0.3),
    ];
    for (normalize, log_scale, bias) in settings {
        let opts = SigLipOptions {
            normalize,
            ..Default::default()
        };
        for &(n, d) in KERNEL_SHAPES {
            let a = feature_matrix(&mut rng, n, d);
            let b = feature_matrix(&mut rng, n, d);
            let case = format!("siglip {n}x{d} normalize={normalize} log_scale={log_scale:.2}");
            compare_with_cpu(device, &case, &[(&a, &[n, d]), (&b, &[n, d])], |t| {
                all_outputs(t, log_scale, bias, &opts)
            });
        }
    }
}

#[test]
fn kernels_match_the_cpu() {
    on_kernel_devices("siglip kernels_match_the_cpu", check_kernels);
}

/// Blocks of negatives only, a and b of different row counts (across the 64-wide tiles).
#[test]
fn negatives_only_kernels_match_the_cpu() {
    on_kernel_devices("siglip negatives_only_kernels", |device| {
        let mut rng = StdRng::seed_from_u64(0x5163);
        let opts = SigLipOptions {
            negatives_only: true,
            ..Default::default()
        };
        for &(n, m, d) in &[(37usize, 70usize, 33usize), (130, 3, 17), (1, 65, 5)] {
            let a = feature_matrix(&mut rng, n, d);
            let b = feature_matrix(&mut rng, m, d);
            let case = format!("siglip negatives only {n}x{m}x{d}");
            compare_with_cpu(device, &case, &[(&a, &[n, d]), (&b, &[m, d])], |t| {
                all_outputs(t, 10f64.ln(), -10.0, &opts)
            });
        }
    });
}

/// log_scale and bias as tensors on the device: read there, the same results as the values.
#[test]
fn scalars_on_the_device_give_the_values_results() {
    on_kernel_devices("siglip scalars_on_the_device", |device| {
        let (n, d) = (70, 33);
        let a = Tensor::from_slice(&uniform(41, n * d), &[n, d], device).unwrap();
        let b = Tensor::from_slice(&uniform(42, n * d), &[n, d], device).unwrap();
        let (a, b) = (
            a.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        );
        let on_device = |v: f32| Tensor::from_vec(vec![v], &[], device).unwrap();
        let (log_scale, bias) = (on_device(2.5), on_device(-4.0));
        let opts = SigLipOptions::default();
        let before = Transfers::current();
        let out = siglip(&a, &b, &log_scale, &bias, &opts).unwrap();
        let copies = (Transfers::current() - before).copies();
        assert_eq!(copies, 0, "copies for a call with every input on {device}");
        let want = siglip(&a, &b, 2.5, -4.0, &opts).unwrap();
        for (got, want, what) in [
            (&out.loss, &want.loss, "loss"),
            (&out.grad_log_scale, &want.grad_log_scale, "grad_log_scale"),
            (&out.grad_bias, &want.grad_bias, "grad_bias"),
            (&out.grad_a, &want.grad_a, "grad_a"),
        ] {
            assert_close(&v64(got), &v64(want), 1e-6, what);
        }
    });
}

/// bf16 and f16 operands (the tensor-core tiles) against the CPU on the same rounded values, at
/// the SigLIP init and at logits near +-110.
#[test]
fn half_kernels_match_the_cpu() {
    on_kernel_devices("siglip half_kernels_match_the_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(0x5162);
        for &(n, d) in &[(37usize, 77usize), (130, 40)] {
            let a = feature_matrix(&mut rng, n, d);
            let b = feature_matrix(&mut rng, n, d);
            for dtype in [DType::Bf16, DType::F16] {
                let rounded = |v: &[f32]| {
                    let half = Tensor::from_vec(v.to_vec(), &[n, d], Device::Cpu)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap();
                    let wide = Tensor::from_vec(half.to_vec_f64().unwrap(), &[n, d], Device::Cpu);
                    (half.to_device(device).unwrap(), wide.unwrap())
                };
                let ((ha, wa), (hb, wb)) = (rounded(&a), rounded(&b));
                let opts = SigLipOptions::default();
                // The SigLIP init, and a logit scale of 100 (logits near +-110).
                for log_scale in [10f64.ln(), 100f64.ln()] {
                    testing::take_launched_kernels();
                    let got = all_outputs(&[ha.clone(), hb.clone()], log_scale, -10.0, &opts);
                    if device == Device::Interp {
                        let launched = testing::take_launched_kernels();
                        let kernel = format!(
                            "siglip_sweep_{}",
                            if dtype == DType::Bf16 { "bf16" } else { "f16" }
                        );
                        assert!(
                            launched.contains(&kernel.as_str()),
                            "{kernel} did not run: {launched:?}"
                        );
                    }
                    let want = all_outputs(&[wa.clone(), wb.clone()], log_scale, -10.0, &opts);
                    let case = format!("{n}x{d} {dtype} log_scale {log_scale:.2} on {device}");
                    for ((name, g), (_, w)) in got.unwrap().iter().zip(&want.unwrap()) {
                        assert_close(g, w, 2e-2, &format!("{case}: {name}"));
                    }
                }
            }
        }
    });
}
