//! The TF32 instantiations of every softmax loss (InfoNCE, NT-Xent, CLIP, MoCo, SupCon) and of
//! SigLIP: f32 inputs under `with_f32_precision(F32Precision::Tf32)` on every kernel device,
//! forward and backward, against the CPU backend in f64 on the same inputs. The operands are
//! rounded to tf32 (10 mantissa bits) and the products accumulate in f32, so every output must
//! be within a relative norm error of 5e-3.
//!
//! On the interpreted mode each case also checks that the `_tf32` forward and backward kernels ran,
//! and that without the setting the same op runs the exact `_f32` ones. `Device::Cuda(0)` runs too
//! when it is usable; otherwise the test prints why it was skipped.

use contra::*;
use rand::{rngs::StdRng, SeedableRng};

mod common;
use common::*;

/// The tolerance of the issue for tf32 operands with f32 accumulation.
const TF32_TOL: f64 = 5e-3;

/// Runs `op` under TF32 on `device` and in f64 on the CPU and compares every output; on the
/// interpreted mode, checks that the `_tf32` instantiation of each of `sweeps` ran (the key-split
/// and resident forwards count as the forward) and that the default precision runs `_f32`
/// instead, and returns the launches of the TF32 run (none elsewhere).
fn compare_tf32(
    device: Device,
    case: &str,
    sweeps: &[&str],
    inputs: &[Input],
    op: impl Fn(&[Tensor]) -> Result<Outputs>,
) -> Vec<testing::LaunchRecord> {
    testing::take_launches();
    with_f32_precision(F32Precision::Tf32, || {
        compare_with_cpu_within(device, &format!("{case} tf32"), inputs, TF32_TOL, &op)
    });
    let tf32_launches = testing::take_launches();
    if device != Device::Interp {
        return tf32_launches;
    }
    let tf32_launched = kernel_names(&tf32_launches);
    let ran = |launched: &[&str], base: &str, suffix: &str| {
        launched
            .iter()
            .any(|k| k.starts_with(base) && k.ends_with(suffix))
    };
    for base in sweeps {
        assert!(
            ran(&tf32_launched, base, "_tf32"),
            "{case}: no {base}*_tf32 ran: {tf32_launched:?}"
        );
    }
    compare_with_cpu(device, &format!("{case} f32"), inputs, &op);
    let launched = testing::take_launched_kernels();
    for base in sweeps {
        assert!(
            ran(&launched, base, "_f32") && !ran(&launched, base, "_tf32"),
            "{case}: the default precision ran {launched:?}"
        );
    }
    tf32_launches
}

/// compare_tf32 for a loss case of the InfoNCE family (its softmax sweeps on tf32).
fn compare_tf32_softmax(device: Device, case: &LossCase) -> Vec<testing::LaunchRecord> {
    compare_tf32(
        device,
        &case.name,
        SOFTMAX_SWEEPS,
        &case.input_refs(),
        &case.op,
    )
}

const SOFTMAX_SWEEPS: &[&str] = &["infonce_fwd", "infonce_bwd"];

#[test]
fn tf32_infonce_and_ntxent_match_cpu() {
    on_kernel_devices("tf32_infonce_and_ntxent_match_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(0x7f32);
        // d = 19: rows not 16-byte aligned, every chunk element by element; d = 40: whole
        // 16-byte chunks through cp.async and a slice tail; d = 72: two 64-feature chunks in
        // the backward's second product; d = 100: four of the forward's 32-feature slices, so
        // each stage buffer is refilled. NT-Xent at 2 and 4 row tiles: the symmetric forward's
        // pairs of tiles.
        for d in [19, 40, 72, 100] {
            let mut cases: Vec<LossCase> = [true, false]
                .map(|normalize| infonce_case(&mut rng, 37, 70, d, normalize))
                .into();
            cases.extend([66, 194].map(|rows| ntxent_case(&mut rng, rows, d)));
            for case in &cases {
                compare_tf32_softmax(device, case);
            }
        }
    });
}

#[test]
fn tf32_clip_moco_supcon_siglip_match_cpu() {
    on_kernel_devices("tf32_clip_moco_supcon_siglip_match_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(0x7f33);
        // d = 19: element-by-element staging; d = 76: cp.async chunks and a slice tail.
        for d in [19, 76] {
            let n = 37;
            // MoCo with 101 and 700 keys: both split across blocks, the rows resident in each.
            let mut cases = vec![clip_case(&mut rng, n, d)];
            cases.extend([101, 700].map(|queue_len| moco_case(&mut rng, n, queue_len, d)));
            // 1 and 4 row tiles (N·V = 46, 201).
            cases.extend(
                [(23, 2), (67, 3)].map(|(samples, views)| supcon_case(&mut rng, samples, views, d)),
            );
            for case in &cases {
                let launched = kernel_names(&compare_tf32_softmax(device, case));
                assert!(
                    device != Device::Interp
                        || !case.name.starts_with("moco")
                        || launched.contains(&"infonce_fwd_split_resident_tf32"),
                    "{}: {launched:?}",
                    case.name
                );
            }
            let case = siglip_case(&mut rng, n, d);
            compare_tf32(
                device,
                &case.name,
                &["siglip_sweep"],
                &case.input_refs(),
                &case.op,
            );
        }
    });
}

/// Under TF32 the kernels keep the block's query rows resident where they fit: the forward
/// (`infonce_fwd_resident_infonce_tf32`, its InfoNCE instantiation) up to 96 KB (272 features), the backward
/// (`infonce_bwd_resident_tf32`) while two blocks still share an SM (208 features), then the fused
/// backward (`infonce_bwd_fused_tf32`, whole key tiles, G on the fragments) up to 256; beyond,
/// `infonce_fwd_tf32` / `infonce_bwd_tf32`. Every path matches the CPU. 130 rows against 150
/// keys: three key tiles, so the key pipelines run across tiles.
#[test]
fn tf32_kernels_keep_rows_resident_where_they_fit() {
    let mut rng = StdRng::seed_from_u64(0x7f34);
    for (d, forward, backward) in [
        (
            33,
            "infonce_fwd_resident_infonce_tf32",
            "infonce_bwd_resident_tf32",
        ),
        (
            208,
            "infonce_fwd_resident_infonce_tf32",
            "infonce_bwd_resident_tf32",
        ),
        (
            209,
            "infonce_fwd_resident_infonce_tf32",
            "infonce_bwd_fused_tf32",
        ),
        (
            256,
            "infonce_fwd_resident_infonce_tf32",
            "infonce_bwd_fused_tf32",
        ),
        (273, "infonce_fwd_tf32", "infonce_bwd_tf32"),
    ] {
        let case = infonce_case(&mut rng, 130, 150, d, false);
        let launched = kernel_names(&compare_tf32_softmax(Device::Interp, &case));
        for kernel in [forward, backward] {
            assert!(
                launched.contains(&kernel),
                "{}: {kernel} did not run: {launched:?}",
                case.name
            );
        }
    }
}

/// The fused tf32 backward for every loss of the family, at 209 to 256 features (where it runs):
/// CLIP with dK (G^T by single loads) and its log-scale term, NT-Xent and SupCon symmetric,
/// MoCo under a key split, against the CPU at the tf32 tolerance.
#[test]
fn tf32_fused_backward_matches_cpu_for_every_loss() {
    on_kernel_devices("tf32_fused_backward_matches_cpu_for_every_loss", |device| {
        let mut rng = StdRng::seed_from_u64(0x7f35);
        let cases = [
            clip_case(&mut rng, 130, 250),
            ntxent_case(&mut rng, 134, 256),
            supcon_case(&mut rng, 67, 2, 230),
            moco_case(&mut rng, 37, 201, 211),
            infonce_case(&mut rng, 70, 129, 240, true),
        ];
        for case in &cases {
            let launched = kernel_names(&compare_tf32_softmax(device, case));
            assert_ran_on_interp(device, &launched, "infonce_bwd_fused_tf32", &case.name);
        }
    });
}

/// The sweeps' key ranges (see `split_cases`) under TF32, and, in compare_tf32's second run, on
/// the exact f32 kernels.
#[test]
fn tf32_sweeps_split_their_key_ranges() {
    check_split_cases(0x7f36, 40, "tf32", |split| {
        let case = &split.case;
        compare_tf32(
            Device::Interp,
            &case.name,
            &split.sweeps(),
            &case.input_refs(),
            &case.op,
        )
    });
}

/// On a modelled Hopper GPU every loss of the family with f32 inputs under TF32 runs its sm_90a
/// forward (`infonce_fwd_wgmma_<loss>_tf32`: panels of 32 f32 features, 128-byte swizzled, each
/// word rounded to tf32 in shared memory before wgmma m64n32k8 reads it) and matches the CPU at
/// the tf32 tolerance. Widths: 19 (one panel, zeros past the features), 40 and 72 (two and three
/// panels), 136 (five) and 256 (eight, the widest its 96 KB hold); 130 rows make three row tiles.
#[test]
fn wgmma_tf32_forwards_match_cpu() {
    let _hopper = ModelledHopper::on();
    let mut rng = StdRng::seed_from_u64(0x7f37);
    for d in [19, 40, 72, 136, 256] {
        for (loss, case) in &fixed_loss_cases(&mut rng, d) {
            let launched = kernel_names(&compare_tf32_softmax(Device::Interp, case));
            let want = format!("infonce_fwd_wgmma_{loss}_tf32");
            assert_ran_on_interp(Device::Interp, &launched, &want, &case.name);
        }
    }
}
