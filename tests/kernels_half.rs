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
/// the launches on the device (none elsewhere).
fn compare_half(
    device: Device,
    dtype: DType,
    case: &str,
    inputs: &[Input],
    op: impl Fn(&[Tensor]) -> Result<Outputs>,
) -> Vec<testing::LaunchRecord> {
    let (on_device, reference): (Vec<Tensor>, Vec<Tensor>) = inputs
        .iter()
        .map(|&(values, shape)| rounded(values, shape, dtype, device))
        .unzip();
    testing::take_launches();
    let got = op(&on_device).unwrap_or_else(|e| panic!("{case} {dtype} on {device}: {e}"));
    let launches = testing::take_launches();
    let launched = kernel_names(&launches);
    if device == Device::Interp {
        let suffix = &format!("_{}", kernel_suffix(dtype));
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
    launches
}

/// compare_half for a loss case.
fn compare_half_case(device: Device, dtype: DType, case: &LossCase) -> Vec<testing::LaunchRecord> {
    compare_half(device, dtype, &case.name, &case.input_refs(), &case.op)
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
        // NT-Xent at 2 and 4 row tiles: the symmetric forward's pairs of tiles.
        for (dtype, d) in HALF_DTYPES
            .into_iter()
            .flat_map(|t| [(t, 40), (t, 19), (t, 72), (t, 136), (t, 264)])
        {
            let mut cases: Vec<LossCase> = [true, false]
                .map(|normalize| infonce_case(&mut rng, 37, 70, d, normalize))
                .into();
            cases.extend([66, 194].map(|rows| ntxent_case(&mut rng, rows, d)));
            for case in &cases {
                compare_half_case(device, dtype, case);
            }
        }
    });
}

/// The suffix of the kernels instantiated for `dtype` (bf16 or f16).
fn kernel_suffix(dtype: DType) -> &'static str {
    if dtype == DType::Bf16 {
        "bf16"
    } else {
        "f16"
    }
}

/// The tensor-core kernels keep the block's query rows resident in dynamic shared memory where
/// they fit: the forward (`infonce_fwd_resident_*`, per loss) up to 96 KB (544 features), the
/// backward's S recompute (`infonce_bwd_resident_*`) as well past the fused backward's 256
/// features, for bf16 and for f16 while two blocks still share an SM (up to 416 features);
/// beyond, `infonce_fwd_*` / `infonce_bwd_*` re-stage them per key tile. Every path matches the
/// CPU. 130 x 150: three key tiles per block, so the key
/// pipeline runs from one tile into the next, and the backward's rotated start tiles differ.
#[test]
fn half_kernels_keep_rows_resident_where_they_fit() {
    let device = Device::Interp;
    let mut rng = StdRng::seed_from_u64(0x4a22);
    for (dtype, d, forward_resident, backward_resident) in [
        (DType::Bf16, 544, true, true),
        (DType::F16, 300, true, true),
        (DType::F16, 450, true, false),
        (DType::Bf16, 545, false, false),
        (DType::F16, 600, false, false),
    ] {
        let case = infonce_case(&mut rng, 130, 150, d, false);
        let launched = kernel_names(&compare_half_case(device, dtype, &case));
        let suffix = kernel_suffix(dtype);
        let case_dtype = format!("{} {dtype}", case.name);
        assert_resident_kernels(
            &launched,
            &case_dtype,
            suffix,
            forward_resident,
            backward_resident,
        );
    }
}

/// bf16 and f16 backwards up to 256 features run `infonce_bwd_fused_<type>` (each key tile staged
/// whole once, G formed on the score fragments and read by ldmatrix for dQ and dK; f16's G scaled
/// into its range): every loss of the family at widths that are no multiple of 64 (19, 150, 200)
/// and at the 256 limit, against the CPU. 130 x 150 gives three key tiles per block (the next tile
/// in flight across tiles, rotated starts); CLIP adds dK and the log-scale partials, MoCo a key
/// split (dQ added at the end).
#[test]
fn half_backward_is_fused_up_to_256_features() {
    on_kernel_devices("half_backward_is_fused_up_to_256_features", |device| {
        let mut rng = StdRng::seed_from_u64(0x4a23);
        let mut cases = Vec::new();
        // 19, 150 and 200 features are staged as 1, 3 and 4 whole 64-feature chunks (rows of 8,
        // 24 and 32 16-byte copies: the stager's step wraps mid-row at 24).
        for d in [19, 150, 200, 256] {
            cases.push(infonce_case(&mut rng, 130, 150, d, false));
        }
        cases.push(infonce_case(&mut rng, 70, 129, 64, true));
        cases.push(ntxent_case(&mut rng, 134, 200));
        cases.push(clip_case(&mut rng, 130, 200));
        cases.push(moco_case(&mut rng, 37, 201, 19));
        cases.push(supcon_case(&mut rng, 67, 2, 72));
        for dtype in HALF_DTYPES {
            let want = format!("infonce_bwd_fused_{}", kernel_suffix(dtype));
            for case in &cases {
                let launched = kernel_names(&compare_half_case(device, dtype, case));
                assert_ran_on_interp(device, &launched, &want, &case.name);
            }
        }
    });
}

#[test]
fn half_clip_moco_supcon_match_cpu() {
    on_kernel_devices("half_clip_moco_supcon_match_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(0x4a21);
        for dtype in HALF_DTYPES {
            let d = 40;
            // MoCo: two key tiles, split across blocks, the rows resident in each. SupCon: 1
            // and 4 row tiles (N·V = 46, 201).
            let mut cases = vec![clip_case(&mut rng, 37, d), moco_case(&mut rng, 37, 101, d)];
            cases.extend(
                [(23, 2), (67, 3)].map(|(samples, views)| supcon_case(&mut rng, samples, views, d)),
            );
            let suffix = kernel_suffix(dtype);
            for case in &cases {
                let launched = kernel_names(&compare_half_case(device, dtype, case));
                let want = format!("infonce_fwd_split_resident_{suffix}");
                assert!(
                    device != Device::Interp
                        || !case.name.starts_with("moco")
                        || launched.iter().any(|k| *k == want),
                    "{} {dtype}: {want} did not run: {launched:?}",
                    case.name
                );
            }
        }
    });
}

/// Where the wave model says the card fills better, the forwards, the backwards and SigLIP's
/// sweep cut their rows of key tiles into ranges along grid y (`split_cases`): on a modelled
/// device, in bf16 and f16, with ranges that start past the diagonal tile, ranges left empty,
/// rows' shares added atomically and the scalar partials one per block, the results match the
/// CPU.
#[test]
fn half_sweeps_split_their_key_ranges() {
    for (dtype, seed) in [(DType::Bf16, 0x4a24), (DType::F16, 0x4a25)] {
        check_split_cases(seed, 40, &dtype.to_string(), |split| {
            compare_half_case(Device::Interp, dtype, &split.case)
        });
    }
}

/// On a modelled Hopper GPU every loss of the family with 16-bit operands runs its sm_90a
/// forward (`infonce_fwd_wgmma_<loss>_<type>`: query rows in 128-byte-swizzled panels, scores by
/// wgmma from shared memory, emulated with the descriptors' addressing and both extremes of its
/// asynchrony) and its sm_90a backward (`infonce_bwd_wgmma_<width>_<type>`: S, dQ and dK on
/// wgmma with K-major and MN-major operands), and matches the CPU. Widths: 19 and 40 (one panel,
/// zeros past the features), 72 (a second panel nearly empty), 136 (three panels, so a stage is
/// refilled within a tile) and 256 (four whole panels): each of the backward's four widths; 130
/// rows make three row tiles (the symmetric sweeps' pairs of tiles, pipelines that run on from
/// tile to tile, rotated key orders).
#[test]
fn wgmma_forwards_match_cpu() {
    let _hopper = ModelledHopper::on();
    let mut rng = StdRng::seed_from_u64(0x4a26);
    for (dtype, d) in HALF_DTYPES
        .into_iter()
        .flat_map(|t| [(t, 19), (t, 40), (t, 72), (t, 136), (t, 256)])
    {
        let suffix = kernel_suffix(dtype);
        for (loss, case) in &fixed_loss_cases(&mut rng, d) {
            let launched = kernel_names(&compare_half_case(Device::Interp, dtype, case));
            let width = d.div_ceil(64) * 64;
            for want in [
                format!("infonce_fwd_wgmma_{loss}_{suffix}"),
                format!("infonce_bwd_wgmma_{width}_{suffix}"),
            ] {
                let name = format!("{} {dtype}", case.name);
                assert_ran_on_interp(Device::Interp, &launched, &want, &name);
            }
        }
    }
}

/// The wgmma forwards cut their rows of key tiles into ranges as the other forwards do
/// (`split_cases` on modelled devices, bf16).
#[test]
fn wgmma_sweeps_split_their_key_ranges() {
    let _hopper = ModelledHopper::on();
    check_split_cases(0x4a27, 40, "bf16 on a modelled Hopper", |split| {
        compare_half_case(Device::Interp, DType::Bf16, &split.case)
    });
}

/// The 16-bit backwards store G, the softmax gradient, in the operand type. f16 tops out at 65504,
/// so its G is scaled by a power of two first (and the products' sums back after): a loss scaled
/// by 2^20, as mixed-precision training scales its loss, puts G's positives near 1e5 and still
/// gets the exact gradient from the fused backward and from a modelled Hopper's wgmma one, for
/// NT-Xent (dQ only) and CLIP (dK too).
#[test]
fn f16_backwards_take_a_scaled_loss() {
    let mut rng = StdRng::seed_from_u64(0x4a27);
    let grad_loss = 2f64.powi(20);
    let (rows, d) = (130, 72);
    let cluster: Vec<usize> = (0..rows).map(|i| i % (rows / 2)).collect();
    let z = clustered_rows(&mut rng, &cluster, d, 0.3);
    let a = random_matrix(&mut rng, rows, d);
    let b = random_matrix(&mut rng, rows, d);
    let opts = NtXentOptions { temperature: 0.2 };
    let log_scale = (1.0f64 / 0.07).ln();
    for (hopper, backward) in [
        (false, "infonce_bwd_fused_f16"),
        (true, "infonce_bwd_wgmma_128_f16"),
    ] {
        let _hopper = hopper.then(ModelledHopper::on);
        let launched = compare_half(
            Device::Interp,
            DType::F16,
            "ntxent 130x72, loss x 2^20",
            &[(&z, &[rows, d])],
            |t| {
                let forward = ntxent_forward(&t[0], &opts)?;
                let grad_z = ntxent_backward(&t[0], &opts, &forward.saved, grad_loss)?;
                loss_outputs(&forward.loss, &[("grad_z", &grad_z)], &[])
            },
        );
        assert_ran_on_interp(Device::Interp, &kernel_names(&launched), backward, "ntxent");
        let launched = compare_half(
            Device::Interp,
            DType::F16,
            "clip 130x72, loss x 2^20",
            &[(&a, &[rows, d]), (&b, &[rows, d])],
            |t| {
                let forward = clip_forward(&t[0], &t[1], log_scale)?;
                let grads = clip_backward(&t[0], &t[1], log_scale, &forward.saved, grad_loss)?;
                loss_outputs(
                    &forward.loss,
                    &[("grad_a", &grads.grad_a), ("grad_b", &grads.grad_b)],
                    &[("grad_log_scale", &grads.grad_log_scale)],
                )
            },
        );
        assert_ran_on_interp(Device::Interp, &kernel_names(&launched), backward, "clip");
    }
}
