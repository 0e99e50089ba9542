//! The encoder's training passes as kernels (`DeviceEncoder`: GEMM, bias, ReLU and BatchNorm on
//! the interpreted mode and, when usable, GPU 0) against the CPU layers on the same encoder and
//! inputs: the projection, the input gradient, every parameter gradient and the BatchNorm running
//! statistics, in train and eval mode, at widths that are no multiple of the 16-wide GEMM tile.

mod common;

use common::{on_kernel_devices, rel_err};
use contra::nn::{DeviceEncoder, Encoder, Mat, MlpSpec, Module};
use contra::{Device, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Outputs of the device and the CPU agree to f32 rounding (the sums are ordered differently).
const TOL: f64 = 1e-5;

/// The gradients at and below a BatchNorm layer trained on two rows: its normalized inputs are
/// +-1, so its input gradient cancels down to the eps term, about 1 % of the upstream gradient
/// (0.024 against 2.6 in the 2-row case below). Both sides are then f32 rounding amplified about
/// 100 times (2e-4 measured on an H200), and the bound is TOL scaled by that condition number.
const CANCELLING_TOL: f64 = 100.0 * 2.0 * TOL;

fn random_mat(rows: usize, cols: usize, rng: &mut StdRng) -> Mat {
    let data = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Mat::from_vec(data, rows, cols).unwrap()
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn assert_close(what: &str, device: Device, got: &[f32], want: &[f32], tol: f64) {
    let err = rel_err(&as_f64(got), &as_f64(want));
    assert!(
        err <= tol,
        "{what} on {device}: relative error {err:e} > {tol:e}"
    );
}

/// SimCLR (Linear-BN-ReLU-Linear with bias) and MoCo v2 (Linear-ReLU-Linear) heads over a
/// BN backbone, with every parameter moved off its initial value (BatchNorm's scale off 1).
fn encoders(rng: &mut StdRng) -> Vec<(&'static str, Encoder)> {
    let backbone = MlpSpec::backbone(&[29, 23, 19]);
    let mut out = vec![
        ("simclr", Encoder::simclr(&backbone, 21, 11, 3).unwrap()),
        ("moco_v2", Encoder::moco_v2(&backbone, 17, 13, 4).unwrap()),
    ];
    for (_, enc) in &mut out {
        let flat: Vec<f32> = enc
            .flat_params()
            .iter()
            .map(|v| v + rng.random_range(-0.3..0.3))
            .collect();
        enc.load_flat(&flat).unwrap();
    }
    out
}

/// Forward then backward of `enc` on the CPU and on `device`, from the same state.
fn compare_pass(device: Device, name: &str, enc: &Encoder, x: &Mat, train: bool, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cpu = enc.clone();
    let mut dev = enc.clone();
    let z_cpu = cpu.forward(x, train).unwrap();
    let mut runner = DeviceEncoder::new(device);
    let z_dev = runner.forward(&mut dev, x, train).unwrap();
    let what = format!("{name} (train = {train})");
    let grad_tol = if train && x.rows == 2 {
        CANCELLING_TOL
    } else {
        TOL
    };
    assert_close(
        &format!("{what}: projection"),
        device,
        &z_dev.data,
        &z_cpu.data,
        TOL,
    );
    for (a, b) in dev.buffers().iter().zip(cpu.buffers()) {
        assert_close(
            &format!("{what}: {}", a.name),
            device,
            &a.value,
            &b.value,
            TOL,
        );
    }

    let grad = random_mat(z_cpu.rows, z_cpu.cols, &mut rng);
    cpu.zero_grad();
    dev.zero_grad();
    let gx_cpu = cpu.backward(&grad).unwrap();
    let gx_dev = runner.backward(&mut dev, &grad).unwrap();
    assert_close(
        &format!("{what}: grad x"),
        device,
        &gx_dev.data,
        &gx_cpu.data,
        grad_tol,
    );
    for (a, b) in dev.params().iter().zip(cpu.params()) {
        assert!(
            b.grad.iter().any(|&g| g != 0.0),
            "{}: zero CPU gradient",
            b.name
        );
        assert_close(
            &format!("{what}: grad {}", a.name),
            device,
            &a.grad,
            &b.grad,
            grad_tol,
        );
    }
}

#[test]
fn device_passes_match_the_cpu_layers() {
    on_kernel_devices("device_passes_match_the_cpu_layers", |device| {
        let mut rng = StdRng::seed_from_u64(11);
        // 37 rows, 29 inputs: neither is a multiple of the GEMM tile or of a warp.
        let x = random_mat(37, 29, &mut rng);
        for (name, enc) in encoders(&mut rng) {
            compare_pass(device, name, &enc, &x, true, 1);
            compare_pass(device, name, &enc, &x, false, 2);
        }
        // The smallest train batch and a single-row eval batch.
        let (_, enc) = encoders(&mut rng).remove(0);
        compare_pass(
            device,
            "simclr, 2 rows",
            &enc,
            &random_mat(2, 29, &mut rng),
            true,
            3,
        );
        compare_pass(
            device,
            "simclr, 1 row",
            &enc,
            &random_mat(1, 29, &mut rng),
            false,
            4,
        );
    });
}

#[test]
fn device_backward_adds_to_the_gradients() {
    on_kernel_devices("device_backward_adds_to_the_gradients", |device| {
        let mut rng = StdRng::seed_from_u64(5);
        let (_, mut enc) = encoders(&mut rng).remove(0);
        let x = random_mat(20, 29, &mut rng);
        let grad = random_mat(20, 11, &mut rng);
        let mut runner = DeviceEncoder::new(device);
        enc.zero_grad();
        let mut once = Vec::new();
        for pass in 0..2 {
            runner.forward(&mut enc, &x, false).unwrap();
            runner.backward(&mut enc, &grad).unwrap();
            if pass == 0 {
                once = enc.params().iter().map(|p| p.grad.clone()).collect();
            }
        }
        for (p, first) in enc.params().iter().zip(&once) {
            let twice: Vec<f32> = first.iter().map(|g| 2.0 * g).collect();
            assert_close(
                &format!("2 x grad {}", p.name),
                device,
                &p.grad,
                &twice,
                TOL,
            );
        }
    });
}

#[test]
fn parameter_only_backward_gives_the_same_gradients() {
    on_kernel_devices(
        "parameter_only_backward_gives_the_same_gradients",
        |device| {
            let mut rng = StdRng::seed_from_u64(8);
            let x = random_mat(21, 29, &mut rng);
            for (name, enc) in encoders(&mut rng) {
                let grad = random_mat(21, enc.out_dim(), &mut rng);
                for on in [Device::Cpu, device] {
                    let (mut full, mut params) = (enc.clone(), enc.clone());
                    let mut runner = DeviceEncoder::new(on);
                    for (e, only_params) in [(&mut full, false), (&mut params, true)] {
                        e.zero_grad();
                        runner.forward(e, &x, true).unwrap();
                        match only_params {
                            true => runner.backward_params(e, &grad).unwrap(),
                            false => drop(runner.backward(e, &grad).unwrap()),
                        }
                    }
                    for (a, b) in params.params().iter().zip(full.params()) {
                        assert_close(&format!("{name}: {}", a.name), on, &a.grad, &b.grad, TOL);
                        assert!(b.grad.iter().any(|&g| g != 0.0), "{name}: zero gradient");
                    }
                }
            }
        },
    );
}

/// The tensor-facing passes (the output and its gradient left on the device, no copy of either)
/// give the host passes' output and parameter gradients.
#[test]
fn tensor_passes_keep_the_output_on_the_device() {
    on_kernel_devices("tensor_passes_keep_the_output_on_the_device", |device| {
        let mut rng = StdRng::seed_from_u64(9);
        let x = random_mat(21, 29, &mut rng);
        for (name, enc) in encoders(&mut rng) {
            let grad = random_mat(21, enc.out_dim(), &mut rng);
            let (mut host, mut kept) = (enc.clone(), enc.clone());
            host.zero_grad();
            kept.zero_grad();
            let mut runner = DeviceEncoder::new(device);
            let z_host = runner.forward(&mut host, &x, true).unwrap();
            runner.backward_params(&mut host, &grad).unwrap();
            let z = runner.forward_tensor(&mut kept, &x, true).unwrap();
            assert_eq!((z.device(), z.shape()), (device, &[21, enc.out_dim()][..]));
            let g = grad.to_tensor(device).unwrap();
            let before = contra::Transfers::current();
            runner.backward_params_tensor(&mut kept, &g).unwrap();
            let moved = contra::Transfers::current() - before;
            // The parameter gradients still come to the host (the optimizer runs there).
            assert_eq!(
                moved.to_device, 0,
                "{name}: the gradient was copied in: {moved}"
            );
            assert_close(name, device, &z.to_vec::<f32>().unwrap(), &z_host.data, TOL);
            for (a, b) in kept.params().iter().zip(host.params()) {
                assert_close(
                    &format!("{name}: {}", a.name),
                    device,
                    &a.grad,
                    &b.grad,
                    TOL,
                );
            }
        }
    });
}

fn expect_err(what: &str, result: Result<Mat>, needle: &str) {
    match result {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "{what}: error `{e}` does not mention `{needle}`"
        ),
    }
}

#[test]
fn device_passes_reject_bad_input() {
    on_kernel_devices("device_passes_reject_bad_input", |device| {
        let mut rng = StdRng::seed_from_u64(6);
        let (_, mut enc) = encoders(&mut rng).remove(0);
        let mut runner = DeviceEncoder::new(device);
        let g = random_mat(4, 11, &mut rng);
        expect_err(
            "backward first",
            runner.backward(&mut enc, &g),
            "without a forward",
        );
        let x = random_mat(4, 28, &mut rng);
        expect_err("input width", runner.forward(&mut enc, &x, true), "29");
        let one = random_mat(1, 29, &mut rng);
        expect_err(
            "train batch of 1",
            runner.forward(&mut enc, &one, true),
            "batch of 1",
        );
        runner
            .forward(&mut enc, &random_mat(4, 29, &mut rng), true)
            .unwrap();
        let wrong = random_mat(5, 11, &mut rng);
        expect_err("grad rows", runner.backward(&mut enc, &wrong), "grad_out");
        // The failed backward consumed the pass; another encoder cannot reuse one either.
        runner
            .forward(&mut enc, &random_mat(4, 29, &mut rng), true)
            .unwrap();
        let (_, mut moco) = encoders(&mut rng).remove(1);
        expect_err("other encoder", runner.backward(&mut moco, &g), "differ");
        let mut broken = enc.clone();
        broken.backbone.layers_mut()[0] = contra::nn::Layer::Relu(contra::nn::Relu::new());
        expect_err(
            "layer list",
            runner.forward(&mut broken, &random_mat(4, 29, &mut rng), true),
            "29",
        );
    });
}
