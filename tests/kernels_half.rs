//! The bf16 and f16 instantiations of normalize, similarity and every softmax loss (InfoNCE,
//! NT-Xent, CLIP, MoCo, SupCon) on every kernel device, against the CPU backend on the same inputs
//! (the 16-bit values, widened): the kernels read 16-bit operands and accumulate in f32, so every
//! output must be within a relative norm error of 2e-2.
//!
//! On the interpreted mode each test also checks that the 16-bit kernels ran (not an f32 copy).
//! `Device::Cuda(0)` runs too when it is usable; otherwise the test prints why it was skipped.

use contra::*;
use rand::{rngs::StdRng, SeedableRng};

mod common;
use common::*;

/// The tolerance of the issue: 16-bit inputs, f32 accumulation, against f32/f64 on the same inputs.
const HALF_TOL: f64 = 2e-2;
const HALF_DTYPES: [DType; 2] = [DType::Bf16, DType::F16];

/// `values` rounded to `dtype`, on `device`, and the same rounded values in f64 on the CPU.
fn rounded(values: &[f32], shape: &[usize], dtype: DType, device: Device) -> (Tensor, Tensor) {
    let half = Tensor::from_vec(values.to_vec(), shape, Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let reference = Tensor::from_vec(half.to_vec_f64().unwrap(), shape, Device::Cpu).unwrap();
    (half.to_device(device).unwrap(), reference)
}

/// Runs `op` on the 16-bit inputs on `device` and on their f64 copies on the CPU, and compares
/// every output; on the interpreted mode, checks that a `_bf16` / `_f16` kernel ran, and returns
/// the kernels that ran on the device (none elsewhere).
fn compare_half(
    device: Device,
    dtype: DType,
    case: &str,
    inputs: &[Input],
    op: impl Fn(&[Tensor]) -> Result<Outputs>,
) -> Vec<&'static str> {
    let (on_device, reference): (Vec<Tensor>, Vec<Tensor>) = inputs
        .iter()
        .map(|&(values, shape)| rounded(values, shape, dtype, device))
        .unzip();
    testing::take_launched_kernels();
    let got = op(&on_device).unwrap_or_else(|e| panic!("{case} {dtype} on {device}: {e}"));
    let launched = testing::take_launched_kernels();
    if device == Device::Interp {
        let suffix = if dtype == DType::Bf16 {
            "_bf16"
        } else {
            "_f16"
        };
        assert!(
            launched.iter().any(|k| k.ends_with(suffix)),
            "{case} {dtype}: no {suffix} kernel ran: {launched:?}"
        );
        // The softmax losses' 16-bit kernels are the tensor-core (mma.sync) ones.
        if ["infonce", "ntxent", "clip", "moco", "supcon"]
            .iter()
            .any(|l| case.starts_with(l))
        {
            // The forward may be the key-split instantiation (MoCo: infonce_fwd_split_*).
            for base in ["infonce_fwd", "infonce_bwd"] {
                assert!(
                    launched
                        .iter()
                        .any(|k| k.starts_with(base) && k.ends_with(suffix)),
                    "{case} {dtype}: no {base}*{suffix} ran: {launched:?}"
                );
            }
        }
    }
    let want = op(&reference).unwrap_or_else(|e| panic!("{case} on cpu: {e}"));
    let mut worst = 0.0f64;
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        let err = rel_err(g, w);
        assert!(
            err <= HALF_TOL,
            "{case} {dtype} on {device}: `{name}` relative error {err:e} > {HALF_TOL:e}"
        );
        worst = worst.max(err);
    }
    println!("  {device} {case} {dtype}: worst relative error {worst:.2e}");
    launched
}

#[test]
fn half_normalize_and_similarity_match_cpu() {
    on_kernel_devices("half_normalize_and_similarity_match_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(0x4a1f);
        for dtype in HALF_DTYPES {
            let (n, m, d) = (37, 23, 77);
            let x = random_matrix(&mut rng, n, d);
            let y = random_matrix(&mut rng, m, d);
            let grad_y = random_matrix(&mut rng, n, d);
            compare_half(device, dtype, "normalize 37x77", &[(&x, &[n, d])], |t| {
                Ok(vec![("y", normalize(&t[0])?.to_vec_f64().unwrap())])
            });
            compare_half(
                device,
                dtype,
                "normalize backward 37x77",
                &[(&x, &[n, d]), (&grad_y, &[n, d])],
                |t| {
                    Ok(vec![(
                        "grad_x",
                        normalize_backward(&t[0], &t[1])?.to_vec_f64().unwrap(),
                    )])
                },
            );
            for kind in [
                Similarity::Dot,
                Similarity::Cosine,
                Similarity::SquaredEuclidean,
                Similarity::Euclidean,
            ] {
                let case = format!("similarity {kind:?} 37x23x77");
                compare_half(device, dtype, &case, &[(&x, &[n, d]), (&y, &[m, d])], |t| {
                    Ok(vec![(
                        "scores",
                        similarity(&t[0], &t[1], kind)?.to_vec_f64().unwrap(),
                    )])
                });
            }
        }
    });
}

#[test]
fn half_infonce_and_ntxent_match_cpu() {
    on_kernel_devices("half_infonce_and_ntxent_match_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(0x4a20);
        // d = 40: whole 16-byte chunks go through cp.async, the slice tail element by element;
        // d = 19: rows are not 16-byte aligned, every chunk element by element; d = 72: more
        // than one 64-feature chunk in the backward's second product; d = 136: three of the
        // forward's 64-feature pipeline slices, so a stage buffer is refilled; d = 264: past the
        // 256 features whose bf16 dQ stays in registers, so dQ goes through global memory.
        for (dtype, d) in HALF_DTYPES
            .into_iter()
            .flat_map(|t| [(t, 40), (t, 19), (t, 72), (t, 136), (t, 264)])
        {
            let (n, m) = (37, 70);
            let q = random_matrix(&mut rng, n, d);
            let k = random_matrix(&mut rng, m, d);
            let positives = random_positives(&mut rng, n, m, false);
            for normalize in [true, false] {
                let opts = InfoNceOptions {
                    temperature: if normalize { 0.1 } else { 1.0 },
                    normalize,
                    self_mask: false,
                };
                let case = format!("infonce 37x70x{d} normalize={normalize}");
                compare_half(device, dtype, &case, &[(&q, &[n, d]), (&k, &[m, d])], |t| {
                    let out = infonce(&t[0], &t[1], &positives, &opts)?;
                    Ok(vec![
                        ("loss", vec![out.loss.to_scalar().unwrap()]),
                        ("grad_q", out.grad_q.to_vec_f64().unwrap()),
                        ("grad_k", out.grad_k.to_vec_f64().unwrap()),
                    ])
                });
            }
            // 2 and 4 row tiles: the symmetric forward's pairs of tiles. The two views are close
            // (large positive logits), so a lost target term shows in the loss.
            for rows in [66, 194] {
                let z = clustered_rows(
                    &mut rng,
                    &(0..rows).map(|i| i % (rows / 2)).collect::<Vec<_>>(),
                    d,
                    0.3,
                );
                let opts = NtXentOptions { temperature: 0.2 };
                compare_half(
                    device,
                    dtype,
                    &format!("ntxent {rows}x{d}"),
                    &[(&z, &[rows, d])],
                    |t| {
                        let out = ntxent(&t[0], &opts)?;
                        Ok(vec![
                            ("loss", vec![out.loss.to_scalar().unwrap()]),
                            ("grad_z", out.grad_z.to_vec_f64().unwrap()),
                        ])
                    },
                );
            }
        }
    });
}

/// The tensor-core kernels keep the block's query rows resident in dynamic shared memory where
/// they fit: the forward (`infonce_fwd_resident_*`) up to 96 KB (544 features), the backward's
/// S recompute (`infonce_bwd_resident_*`) as well for bf16, and for f16 while two blocks still
/// share an SM (up to 416 features); beyond, `infonce_fwd_*` / `infonce_bwd_*` re-stage them per
/// key tile. Every path matches the CPU. 130 x 150: three key tiles per block, so the key
/// pipeline runs from one tile into the next, and the backward's rotated start tiles differ.
#[test]
fn half_kernels_keep_rows_resident_where_they_fit() {
    let device = Device::Interp;
    let mut rng = StdRng::seed_from_u64(0x4a22);
    for (dtype, d, forward_resident, backward_resident) in [
        (DType::Bf16, 544, true, true),
        (DType::F16, 136, true, true),
        (DType::F16, 450, true, false),
        (DType::Bf16, 545, false, false),
        (DType::F16, 600, false, false),
    ] {
        let (n, m) = (130, 150);
        let q = random_matrix(&mut rng, n, d);
        let k = random_matrix(&mut rng, m, d);
        let positives = random_positives(&mut rng, n, m, false);
        // Raw dot products of uniform rows: logits of spread sqrt(D / 9), so each row's lse
        // depends on which keys it met (cosine logits near 0 would hide a wrong row).
        let opts = InfoNceOptions {
            temperature: 1.0,
            normalize: false,
            self_mask: false,
        };
        let case = format!("infonce 130x150x{d} raw");
        let launched = compare_half(device, dtype, &case, &[(&q, &[n, d]), (&k, &[m, d])], |t| {
            let out = infonce(&t[0], &t[1], &positives, &opts)?;
            Ok(vec![
                ("loss", vec![out.loss.to_scalar().unwrap()]),
                ("grad_q", out.grad_q.to_vec_f64().unwrap()),
                ("grad_k", out.grad_k.to_vec_f64().unwrap()),
            ])
        });
        let suffix = if dtype == DType::Bf16 { "bf16" } else { "f16" };
        for (pass, resident) in [("fwd", forward_resident), ("bwd", backward_resident)] {
            let want = match resident {
                true => format!("infonce_{pass}_resident_{suffix}"),
                false => format!("infonce_{pass}_{suffix}"),
            };
            assert!(
                launched.iter().any(|k| *k == want),
                "{case} {dtype}: {want} did not run: {launched:?}"
            );
        }
    }
}

#[test]
fn half_clip_moco_supcon_match_cpu() {
    on_kernel_devices("half_clip_moco_supcon_match_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(0x4a21);
        for dtype in HALF_DTYPES {
            let (n, d) = (37, 40);
            let a = random_matrix(&mut rng, n, d);
            let b = random_matrix(&mut rng, n, d);
            compare_half(
                device,
                dtype,
                "clip 37x40",
                &[(&a, &[n, d]), (&b, &[n, d])],
                |t| {
                    let out = clip(&t[0], &t[1], (1.0f64 / 0.07).ln())?;
                    Ok(vec![
                        ("loss", vec![out.loss.to_scalar().unwrap()]),
                        ("grad_a", out.grad_a.to_vec_f64().unwrap()),
                        ("grad_b", out.grad_b.to_vec_f64().unwrap()),
                        (
                            "grad_log_scale",
                            vec![out.grad_log_scale.to_scalar().unwrap()],
                        ),
                    ])
                },
            );
            let queue = random_matrix(&mut rng, 101, d);
            let opts = MocoOptions { temperature: 0.2 };
            let inputs: &[Input] = &[(&a, &[n, d]), (&b, &[n, d]), (&queue, &[101, d])];
            let launched = compare_half(device, dtype, "moco 37x101x40", inputs, |t| {
                let out = moco(&t[0], &t[1], &t[2], &opts)?;
                Ok(vec![
                    ("loss", vec![out.loss.to_scalar().unwrap()]),
                    ("grad_q", out.grad_q.to_vec_f64().unwrap()),
                ])
            });
            // Two key tiles, split across blocks, the rows resident in each.
            let suffix = if dtype == DType::Bf16 { "bf16" } else { "f16" };
            let want = format!("infonce_fwd_split_resident_{suffix}");
            assert!(
                device != Device::Interp || launched.iter().any(|k| *k == want),
                "moco {dtype}: {want} did not run: {launched:?}"
            );
            // 1 and 4 row tiles (N·V = 46, 201).
            for (samples, views) in [(23, 2), (67, 3)] {
                let labels: Vec<i64> = (0..samples as i64).map(|i| i % 5).collect();
                // Views [sample][view], each near its class's centre.
                let classes: Vec<usize> = (0..samples * views).map(|r| (r / views) % 5).collect();
                // (Closer views make the gradient a small difference of large terms, which the
                // bf16 backward product cannot resolve to 2e-2.)
                let features = clustered_rows(&mut rng, &classes, d, 1.0);
                let opts = SupConOptions {
                    temperature: 0.1,
                    base_temperature: 0.07,
                    ..Default::default()
                };
                compare_half(
                    device,
                    dtype,
                    &format!("supcon {samples}x{views}x{d}"),
                    &[(&features, &[samples, views, d])],
                    |t| {
                        let out = supcon(&t[0], &labels, &opts)?;
                        Ok(vec![
                            ("loss", vec![out.loss.to_scalar().unwrap()]),
                            ("grad_features", out.grad_features.to_vec_f64().unwrap()),
                        ])
                    },
                );
            }
        }
    });
}
