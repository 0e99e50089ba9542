//! Training state on the device: the optimizers' device steps (SGD, LARS, AdamW as kernels) give
//! the host steps' values, and a `ResidentEncoder` trains like the host encoder while a step
//! copies only its batch in (and the loss out, read by the caller).

mod common;

use common::{on_kernel_devices, rel_err};
use contra::nn::{
    AdamW, DeviceParam, Encoder, Lars, Mat, MlpSpec, Module, Optimizer, Param, ResidentEncoder, Sgd,
};
use contra::{ntxent_backward, ntxent_forward, DType, Device, NtXentOptions, Tensor, Transfers};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Three parameters of odd sizes; the last does not decay (a bias).
fn host_params(rng: &mut StdRng) -> Vec<Param> {
    [(vec![7, 13], true), (vec![300], true), (vec![5], false)]
        .into_iter()
        .enumerate()
        .map(|(i, (shape, decay))| {
            let len = shape.iter().product();
            Param::new(format!("p{i}"), shape, random(rng, len), decay).unwrap()
        })
        .collect()
}

fn to_device(params: &[Param], device: Device) -> Vec<DeviceParam> {
    params
        .iter()
        .map(|p| DeviceParam {
            name: p.name.clone(),
            shape: p.shape.clone(),
            value: Tensor::from_slice(&p.value, &[p.len()], device).unwrap(),
            grad: Tensor::zeros(&[p.len()], DType::F32, device).unwrap(),
            decay: p.decay,
        })
        .collect()
}

const OPTIMIZERS: [&str; 4] = ["sgd", "sgd nesterov", "lars", "adamw"];

fn optimizer(name: &str) -> Box<dyn Optimizer> {
    match name {
        "sgd" => Box::new(Sgd::new(0.9, 1e-3, false).unwrap()),
        "sgd nesterov" => Box::new(Sgd::new(0.8, 0.0, true).unwrap()),
        "lars" => Box::new(Lars::new(0.9, 1e-4).unwrap()),
        _ => Box::new(AdamW::new(0.05).unwrap()),
    }
}

/// Four steps with fresh gradients each: the device values against the host's, bit for bit
/// (LARS to the last bits: its norms are summed in another order); no copy on the device.
#[test]
fn device_optimizer_steps_match_the_host() {
    on_kernel_devices("device_optimizer_steps_match_the_host", |device| {
        for name in OPTIMIZERS {
            let (mut host_opt, mut device_opt) = (optimizer(name), optimizer(name));
            let mut rng = StdRng::seed_from_u64(17);
            let mut host = host_params(&mut rng);
            let mut resident = to_device(&host, device);
            for step in 0..4 {
                let lr = 0.1 / (step + 1) as f32;
                for (h, d) in host.iter_mut().zip(&mut resident) {
                    h.grad = random(&mut rng, h.len());
                    d.grad = Tensor::from_slice(&h.grad, &[h.len()], device).unwrap();
                }
                host_opt
                    .step(&mut host.iter_mut().collect::<Vec<_>>(), lr)
                    .unwrap();
                let before = Transfers::current();
                device_opt.step_device(&mut resident, lr).unwrap();
                let moved = Transfers::current() - before;
                assert_eq!(moved.copies(), 0, "{name} on {device}: {moved}");
                for (h, d) in host.iter().zip(&resident) {
                    let got = d.value.to_vec::<f32>().unwrap();
                    let what = format!("{name} step {step} {} on {device}", h.name);
                    if name == "lars" {
                        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                        let err = rel_err(&f64s(&got), &f64s(&h.value));
                        assert!(err < 1e-6, "{what}: relative error {err:e}");
                    } else {
                        assert_eq!(got, h.value, "{what}");
                    }
                }
            }
        }
    });
}

#[test]
fn device_optimizer_steps_reject_bad_parameters() {
    on_kernel_devices("device_optimizer_steps_reject_bad_parameters", |device| {
        let mut rng = StdRng::seed_from_u64(3);
        let host = host_params(&mut rng);
        let mut opt = Sgd::new(0.9, 0.0, false).unwrap();
        let mut on_host = to_device(&host, Device::Cpu);
        let err = opt.step_device(&mut on_host, 0.1).unwrap_err();
        assert!(err.to_string().contains("kernel device"), "{err}");
        let mut resident = to_device(&host, device);
        let err = opt.step_device(&mut resident, f32::NAN).unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        opt.step_device(&mut resident, 0.1).unwrap();
        // A different parameter list than the first step's.
        let err = opt.step_device(&mut resident[..2], 0.1).unwrap_err();
        assert!(err.to_string().contains("first step"), "{err}");
        let mut wrong = to_device(&host, device);
        wrong[1].grad = Tensor::zeros(&[299], DType::F32, device).unwrap();
        let err = Sgd::new(0.9, 0.0, false)
            .unwrap()
            .step_device(&mut wrong, 0.1)
            .unwrap_err();
        assert!(err.to_string().contains("p1"), "{err}");
    });
}

fn encoder() -> Encoder {
    let mut enc = Encoder::simclr(&MlpSpec::backbone(&[29, 23, 19]), 21, 11, 3).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let flat: Vec<f32> = enc
        .flat_params()
        .iter()
        .map(|v| v + rng.random_range(-0.3..0.3))
        .collect();
    enc.load_flat(&flat).unwrap();
    enc
}

/// SimCLR steps (NT-Xent, SGD) with the encoder on the CPU and resident on the device: the same
/// losses and parameters; on the device a step copies the batch in and the loss out, nothing
/// else.
#[test]
fn resident_encoder_trains_like_the_host_encoder() {
    on_kernel_devices("resident_encoder_trains_like_the_host_encoder", |device| {
        let mut models = [
            ResidentEncoder::new(encoder(), Device::Cpu).unwrap(),
            ResidentEncoder::new(encoder(), device).unwrap(),
        ];
        let mut opts = [
            Sgd::new(0.9, 1e-3, false).unwrap(),
            Sgd::new(0.9, 1e-3, false).unwrap(),
        ];
        let mut rng = StdRng::seed_from_u64(5);
        for step in 0..3 {
            // 2 x 19 rows: odd, no multiple of a tile.
            let x = Mat::from_vec(random(&mut rng, 38 * 29), 38, 29).unwrap();
            let mut losses = Vec::new();
            for (model, opt) in models.iter_mut().zip(&mut opts) {
                let before = Transfers::current();
                model.zero_grad().unwrap();
                let z = model.forward(&x, true).unwrap();
                let nt = NtXentOptions::default();
                let fwd = ntxent_forward(&z, &nt).unwrap();
                let grad = ntxent_backward(&z, &nt, &fwd.saved, 1.0).unwrap();
                model.backward_params(&grad).unwrap();
                model.step(opt, 0.05).unwrap();
                losses.push(fwd.loss.to_scalar().unwrap());
                let moved = Transfers::current() - before;
                if model.device() != Device::Cpu {
                    assert_eq!(
                        (moved.to_device, moved.to_device_bytes, moved.to_host),
                        (1, 38 * 29 * 4, 1),
                        "step {step} on {device}: {moved}"
                    );
                }
            }
            let rel = (losses[0] - losses[1]).abs() / losses[0].abs();
            assert!(rel < 1e-5, "step {step}: {losses:?}");
        }
        let [cpu, dev] = models.map(|m| m.to_encoder().unwrap());
        for (a, b) in dev.params().iter().zip(cpu.params()) {
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let err = rel_err(&f64s(&a.value), &f64s(&b.value));
            assert!(err < 1e-5, "{} on {device}: {err:e}", a.name);
        }
        for (a, b) in dev.buffers().iter().zip(cpu.buffers()) {
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let err = rel_err(&f64s(&a.value), &f64s(&b.value));
            assert!(err < 1e-5, "{} on {device}: {err:e}", a.name);
        }
    });
}

/// MoCo's key update on the device moves each key parameter towards the query's there, as the
/// host update does; the key's forward keeps nothing for a backward.
#[test]
fn resident_momentum_update_matches_the_host() {
    on_kernel_devices("resident_momentum_update_matches_the_host", |device| {
        let query_enc = encoder();
        let key_enc = Encoder::simclr(&MlpSpec::backbone(&[29, 23, 19]), 21, 11, 9).unwrap();
        let mut want = key_enc.clone();
        want.momentum_update_from(&query_enc, 0.9).unwrap();
        for on in [Device::Cpu, device] {
            let query = ResidentEncoder::new(query_enc.clone(), on).unwrap();
            let mut key = ResidentEncoder::new(key_enc.clone(), on).unwrap();
            let before = Transfers::current();
            key.momentum_from(&query, 0.9).unwrap();
            let moved = Transfers::current() - before;
            if on != Device::Cpu {
                assert_eq!(moved.copies(), 0, "momentum on {on}: {moved}");
            }
            let got = key.to_encoder().unwrap();
            for (a, b) in got.params().iter().zip(want.params()) {
                let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                let err = rel_err(&f64s(&a.value), &f64s(&b.value));
                assert!(err < 1e-6, "{} on {on}: {err:e}", a.name);
            }
            let x = Mat::from_vec(vec![0.5; 4 * 29], 4, 29).unwrap();
            key.forward_detached(&x, true).unwrap();
            let grad = Tensor::zeros(&[4, 11], DType::F32, on).unwrap();
            let err = key.backward_params(&grad).unwrap_err();
            assert!(err.to_string().contains("without a forward"), "{on}: {err}");
        }
    });
}

/// A batch already on the device is used there (no copy) and gives the host batch's output.
#[test]
fn resident_forward_takes_a_device_batch() {
    on_kernel_devices("resident_forward_takes_a_device_batch", |device| {
        let mut model = ResidentEncoder::new(encoder(), device).unwrap();
        let mut rng = StdRng::seed_from_u64(6);
        let x = Mat::from_vec(random(&mut rng, 7 * 29), 7, 29).unwrap();
        let want = model.forward(&x, false).unwrap().to_vec::<f32>().unwrap();
        let on_device = x.to_tensor(device).unwrap();
        let before = Transfers::current();
        let z = model.forward(&on_device, false).unwrap();
        let moved = Transfers::current() - before;
        assert_eq!(moved.copies(), 0, "{device}: {moved}");
        assert_eq!(z.to_vec::<f32>().unwrap(), want);
        let wrong = Tensor::zeros(&[7, 28], DType::F32, device).unwrap();
        let err = model.forward(&wrong, false).unwrap_err();
        assert!(err.to_string().contains("29"), "{err}");
    });
}
