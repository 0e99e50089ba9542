//! Data stays where the caller put it: on device-resident inputs, an op makes no copy between
//! host and device (counted by `contra::Transfers`) until a result is read, and reading the
//! 0-d loss is one small copy that also brings the device's finiteness checks. Runs on every
//! kernel device of the machine (the interpreted mode always).

mod common;

use common::{kernel_devices, random_matrix, random_positives, rel_err};
use contra::*;
use rand::{rngs::StdRng, SeedableRng};

/// Odd shapes: no multiple of any tile.
const ROWS: usize = 38;
const DIM: usize = 13;

fn device_matrix(rng: &mut StdRng, rows: usize, device: Device) -> Tensor {
    Tensor::from_vec(random_matrix(rng, rows, DIM), &[rows, DIM], device).unwrap()
}

/// The copies `work` makes on this thread.
fn moved<T>(work: impl FnOnce() -> T) -> (T, Transfers) {
    let before = Transfers::current();
    let out = work();
    (out, Transfers::current() - before)
}

/// `work` makes no copy at all.
fn stays<T>(what: &str, device: Device, work: impl FnOnce() -> T) -> T {
    let (out, copies) = moved(work);
    assert_eq!(copies, Transfers::default(), "{what} on {device}: {copies}");
    out
}

/// Reading the loss is one copy to the host: its f64 value and the status words after it.
fn read_loss(what: &str, device: Device, loss: &Tensor) -> f64 {
    assert_eq!(loss.shape(), &[] as &[usize], "{what}: the loss is 0-d");
    assert_eq!(
        loss.device(),
        device,
        "{what}: the loss stays on the device"
    );
    let (value, copies) = moved(|| loss.to_scalar().unwrap());
    assert_eq!(
        (copies.to_device, copies.to_host),
        (0, 1),
        "{what} on {device}: reading the loss made {copies}"
    );
    // Two words of f64, at most 16 status words.
    assert!(copies.to_host_bytes <= 8 + 16 * 4, "{what}: {copies}");
    value
}

/// A device tensor agrees with the same op's CPU result.
fn close(what: &str, got: &Tensor, want: &Tensor) {
    let err = rel_err(&got.to_vec_f64().unwrap(), &want.to_vec_f64().unwrap());
    assert!(err < 1e-4, "{what}: relative error {err:e}");
}

#[test]
fn moving_tensors_is_counted() {
    for device in kernel_devices("moving_tensors_is_counted") {
        let host = Tensor::from_vec(vec![1.0f32; 10], &[2, 5], Device::Cpu).unwrap();
        let (on_device, copies) = moved(|| host.to_device(device).unwrap());
        assert_eq!((copies.to_device, copies.to_device_bytes), (1, 40));
        // Already there: the same storage, no copy.
        stays("to_device onto itself", device, || {
            on_device.to_device(device).unwrap()
        });
        stays("Tensor::zeros", device, || {
            Tensor::zeros(&[7, 3], DType::Bf16, device).unwrap()
        });
        // Conversions through f32 run on the device: no copy, the host's rounding.
        let values: Vec<f32> = (0..10).map(|i| (i as f32 - 4.5) * 1.37e-2).collect();
        let x = Tensor::from_vec(values, &[2, 5], device).unwrap();
        for dtype in [DType::Bf16, DType::F16, DType::F64] {
            let cast = stays("to_dtype", device, || x.to_dtype(dtype).unwrap());
            assert_eq!(cast.dtype(), dtype);
            let want = x.to_host().unwrap().to_dtype(dtype).unwrap();
            assert_eq!(cast.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
            let back = stays("to_dtype back", device, || {
                cast.to_dtype(DType::F32).unwrap()
            });
            let want = want.to_dtype(DType::F32).unwrap();
            assert_eq!(back.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
        }
        let (back, copies) = moved(|| on_device.to_host().unwrap());
        assert_eq!((copies.to_host, copies.to_host_bytes), (1, 40));
        assert_eq!(back.device(), Device::Cpu);
        assert_eq!(back.to_vec::<f32>().unwrap(), vec![1.0; 10]);
    }
}

#[test]
fn ntxent_forward_and_backward_stay_on_the_device() {
    for device in kernel_devices("ntxent_transfers") {
        let mut rng = StdRng::seed_from_u64(1);
        let z = device_matrix(&mut rng, ROWS, device);
        let opts = NtXentOptions { temperature: 0.3 };
        let out = stays("ntxent", device, || ntxent(&z, &opts).unwrap());
        assert_eq!(out.grad_z.device(), device);
        let (fwd, grad) = stays("ntxent_forward + ntxent_backward", device, || {
            let fwd = ntxent_forward(&z, &opts).unwrap();
            let grad = ntxent_backward(&z, &opts, &fwd.saved, 1.0).unwrap();
            (fwd, grad)
        });
        assert_eq!(fwd.saved.lse.device(), device);
        let reference = ntxent(&z.to_host().unwrap(), &opts).unwrap();
        let want = reference.loss.to_scalar().unwrap();
        for (what, loss) in [("one call", &out.loss), ("split", &fwd.loss)] {
            let got = read_loss(what, device, loss);
            assert!((got - want).abs() < 1e-4 * want, "{what}: {got} vs {want}");
        }
        close("ntxent grad_z", &out.grad_z, &reference.grad_z);
        close("ntxent_backward grad_z", &grad, &reference.grad_z);
    }
}

#[test]
fn moco_forward_backward_and_queue_stay_on_the_device() {
    for device in kernel_devices("moco_transfers") {
        let mut rng = StdRng::seed_from_u64(2);
        let (q, k) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, ROWS, device),
        );
        let mut queue = device_matrix(&mut rng, 301, device);
        let opts = MocoOptions { temperature: 0.2 };
        let out = stays("moco", device, || moco(&q, &k, &queue, &opts).unwrap());
        stays("moco_forward + moco_backward", device, || {
            let fwd = moco_forward(&q, &k, &queue, &opts).unwrap();
            moco_backward(&q, &k, &queue, &opts, &fwd.saved, 1.0).unwrap()
        });
        let reference = moco(
            &q.to_host().unwrap(),
            &k.to_host().unwrap(),
            &queue.to_host().unwrap(),
            &opts,
        )
        .unwrap();
        let got = read_loss("moco", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "moco: {got} vs {want}");
        close("moco grad_q", &out.grad_q, &reference.grad_q);

        // The enqueue writes its N rows in place: nothing crosses, not even the N rows.
        let mut host_queue = queue.to_host().unwrap();
        let next = stays("moco_enqueue", device, || {
            moco_enqueue(&mut queue, &k, 290).unwrap()
        });
        let want_next = moco_enqueue(&mut host_queue, &k.to_host().unwrap(), 290).unwrap();
        assert_eq!(next, want_next);
        close("moco_enqueue queue", &queue, &host_queue);
    }
}

#[test]
fn clip_forward_and_backward_stay_on_the_device() {
    for device in kernel_devices("clip_transfers") {
        let mut rng = StdRng::seed_from_u64(6);
        let (a, b) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, ROWS, device),
        );
        let log_scale = 2.3;
        let out = stays("clip", device, || clip(&a, &b, log_scale).unwrap());
        let grads = stays("clip_forward + clip_backward", device, || {
            let fwd = clip_forward(&a, &b, log_scale).unwrap();
            clip_backward(&a, &b, log_scale, &fwd.saved, 1.0).unwrap()
        });
        let reference = clip(&a.to_host().unwrap(), &b.to_host().unwrap(), log_scale).unwrap();
        let got = read_loss("clip", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "clip: {got} vs {want}");
        let want = reference.grad_log_scale.to_scalar().unwrap();
        for (what, g) in [
            ("one call", &out.grad_log_scale),
            ("split", &grads.grad_log_scale),
        ] {
            assert_eq!(g.device(), device);
            let got = g.to_scalar().unwrap();
            assert!(
                (got - want).abs() < 1e-4 * want.abs(),
                "{what}: {got} vs {want}"
            );
        }
        close("clip grad_b", &out.grad_b, &reference.grad_b);
        close("clip_backward grad_a", &grads.grad_a, &reference.grad_a);

        // The learnable log-scale as a tensor on the device: read there, no copy either.
        let learned = Tensor::from_vec(vec![log_scale as f32], &[], device).unwrap();
        let out = stays("clip with a device log_scale", device, || {
            clip(&a, &b, &learned).unwrap()
        });
        let got = read_loss("clip (device log_scale)", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "clip: {got} vs {want}");
        let got = out.grad_log_scale.to_scalar().unwrap();
        let want = reference.grad_log_scale.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
        // A NaN log-scale is found there too, and named.
        let nan = Tensor::from_vec(vec![f32::NAN], &[], device).unwrap();
        let err = clip(&a, &b, &nan)
            .and_then(|out| out.loss.to_scalar())
            .unwrap_err();
        assert!(err.to_string().contains("`log_scale`"), "{device}: {err}");
    }
}

#[test]
fn infonce_and_supcon_copy_only_their_host_index_lists() {
    for device in kernel_devices("infonce_supcon_transfers") {
        let mut rng = StdRng::seed_from_u64(3);
        let (q, k) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, 45, device),
        );
        let positives = random_positives(&mut rng, ROWS, 45, false);
        let opts = InfoNceOptions::default();
        // Aligned pairs (positive of query i is key i) are built on the device: no copy.
        let aligned: Vec<usize> = (0..ROWS).collect();
        let out = stays("infonce, aligned pairs", device, || {
            infonce(&q, &k, &aligned, &opts).unwrap()
        });
        let reference = infonce(
            &q.to_host().unwrap(),
            &k.to_host().unwrap(),
            &aligned,
            &opts,
        )
        .unwrap();
        close("infonce grad_q (aligned)", &out.grad_q, &reference.grad_q);
        // Any other list is a host slice: one copy of ROWS i32 per call, nothing else.
        let (out, copies) = moved(|| infonce(&q, &k, &positives, &opts).unwrap());
        assert_eq!(copies.to_host, 0, "infonce on {device}: {copies}");
        assert_eq!(
            (copies.to_device, copies.to_device_bytes),
            (1, 4 * ROWS as u64),
            "infonce on {device}: {copies}"
        );
        let reference = infonce(
            &q.to_host().unwrap(),
            &k.to_host().unwrap(),
            &positives,
            &opts,
        )
        .unwrap();
        let got = read_loss("infonce", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "infonce: {got} vs {want}");
        close("infonce grad_k", &out.grad_k, &reference.grad_k);

        let features = device_matrix(&mut rng, 2 * 19, device)
            .reshape(&[19, 2, DIM])
            .unwrap();
        let labels: Vec<i64> = (0..19).map(|i| i % 5).collect();
        let sopts = SupConOptions::default();
        // The class table: one class id and one weight per view.
        let (out, copies) = moved(|| supcon(&features, &labels, &sopts).unwrap());
        assert_eq!(copies.to_host, 0, "supcon on {device}: {copies}");
        assert_eq!(copies.to_device, 2, "supcon on {device}: {copies}");
        let reference = supcon(&features.to_host().unwrap(), &labels, &sopts).unwrap();
        let got = read_loss("supcon", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "supcon: {got} vs {want}");
    }
}

#[test]
fn normalize_similarity_and_momentum_stay_on_the_device() {
    for device in kernel_devices("elementwise_transfers") {
        let mut rng = StdRng::seed_from_u64(4);
        let (a, b) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, 27, device),
        );
        let y = stays("normalize", device, || normalize(&a).unwrap());
        let grad_y = device_matrix(&mut rng, ROWS, device);
        let dx = stays("normalize_backward", device, || {
            normalize_backward(&a, &grad_y).unwrap()
        });
        let s = stays("similarity", device, || {
            similarity(&a, &b, Similarity::Cosine).unwrap()
        });
        let host_a = a.to_host().unwrap();
        close("normalize", &y, &normalize(&host_a).unwrap());
        close(
            "normalize_backward",
            &dx,
            &normalize_backward(&host_a, &grad_y.to_host().unwrap()).unwrap(),
        );
        close(
            "similarity",
            &s,
            &similarity(&host_a, &b.to_host().unwrap(), Similarity::Cosine).unwrap(),
        );

        // In place in the device buffer; a clone made before keeps its values.
        let mut theta_k = a.clone();
        let before = theta_k.clone();
        let theta_q = device_matrix(&mut rng, ROWS, device);
        stays("momentum_update", device, || {
            momentum_update(&mut theta_k, &theta_q, 0.9).unwrap()
        });
        let mut want = host_a.clone();
        momentum_update(&mut want, &theta_q.to_host().unwrap(), 0.9).unwrap();
        close("momentum_update", &theta_k, &want);
        close("the clone taken before the update", &before, &host_a);
    }
}

#[test]
fn margin_and_nce_stay_on_the_device_but_for_their_host_labels() {
    for device in kernel_devices("margin_nce_transfers") {
        let mut rng = StdRng::seed_from_u64(7);
        let (x1, x2) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, ROWS, device),
        );
        let y: Vec<i64> = (0..ROWS as i64).map(|i| i % 2).collect();
        let opts = MarginOptions {
            margin: 1.5,
            ..Default::default()
        };
        // The labels are a host slice: one copy per call.
        let (out, copies) = moved(|| margin_loss(&x1, &x2, &y, &opts).unwrap());
        assert_eq!(
            (copies.to_device, copies.to_host),
            (2, 0),
            "margin on {device}: {copies}"
        );
        let reference =
            margin_loss(&x1.to_host().unwrap(), &x2.to_host().unwrap(), &y, &opts).unwrap();
        let got = read_loss("margin", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "margin: {got} vs {want}");
        close("margin grad_x2", &out.grad_x2, &reference.grad_x2);

        let k = 5;
        let inputs = [
            Tensor::from_vec(random_matrix(&mut rng, ROWS, 1), &[ROWS], device).unwrap(),
            Tensor::from_vec(random_matrix(&mut rng, ROWS, k), &[ROWS, k], device).unwrap(),
            Tensor::from_vec(random_matrix(&mut rng, ROWS, 1), &[ROWS], device).unwrap(),
            Tensor::from_vec(random_matrix(&mut rng, ROWS, k), &[ROWS, k], device).unwrap(),
        ];
        let [sp, sn, qp, qn] = &inputs;
        let out = stays("nce", device, || nce(sp, sn, qp, qn).unwrap());
        let host: Vec<Tensor> = inputs.iter().map(|t| t.to_host().unwrap()).collect();
        let reference = nce(&host[0], &host[1], &host[2], &host[3]).unwrap();
        let got = read_loss("nce", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "nce: {got} vs {want}");
        close("nce grad_s_neg", &out.grad_s_neg, &reference.grad_s_neg);
    }
}

/// The triplet loss mines on the device: its row scale, pair coefficients, loss and counts
/// stay there. The labels are a host slice: the forward copies their class ids in (one copy);
/// the backward needs none. Every distance, with rows large enough to be mined scaled.
#[test]
fn triplet_stays_on_the_device_but_for_its_host_labels() {
    for device in kernel_devices("triplet_transfers") {
        let mut rng = StdRng::seed_from_u64(9);
        let rows = 300;
        let labels: Vec<i64> = (0..rows as i64).map(|i| i % 7).collect();
        for (distance, scale) in [
            (Distance::Euclidean, 1.0),
            (Distance::SquaredEuclidean, 1e15),
            (Distance::Cosine, 1e20),
        ] {
            let values: Vec<f32> = random_matrix(&mut rng, rows, DIM)
                .into_iter()
                .map(|v| v * scale)
                .collect();
            let x = Tensor::from_vec(values, &[rows, DIM], device).unwrap();
            let opts = TripletOptions {
                distance,
                mining: Mining::BatchAll,
                margin: 0.3 * scale as f64,
                ..Default::default()
            };
            let what = format!("triplet {distance:?} on {device}");
            let (fwd, copies) = moved(|| triplet_forward(&x, &labels, &opts).unwrap());
            assert_eq!(
                (copies.to_device, copies.to_device_bytes, copies.to_host),
                (1, 4 * rows as u64, 0),
                "{what} forward: {copies}"
            );
            let grad = stays(&format!("{what} backward"), device, || {
                triplet_backward(&x, &labels, &opts, &fwd.saved, 1.0).unwrap()
            });
            let reference = triplet(&x.to_host().unwrap(), &labels, &opts).unwrap();
            let got = read_loss(&what, device, &fwd.loss);
            let want = reference.loss.to_scalar().unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{what}: {got} vs {want}"
            );
            // The kernels mine in f32, the CPU in f64: a triplet at a boundary may flip.
            let (got, want) = (
                fwd.counts.stats().unwrap(),
                reference.counts.stats().unwrap(),
            );
            let total = want.hard + want.semi_hard + want.easy;
            assert_eq!(got.hard + got.semi_hard + got.easy, total, "{what}");
            for (a, b) in [
                (got.hard, want.hard),
                (got.semi_hard, want.semi_hard),
                (
                    fwd.counts.count().unwrap(),
                    reference.counts.count().unwrap(),
                ),
            ] {
                assert!(
                    a.abs_diff(b) <= total / 100_000,
                    "{what}: {got:?} vs {want:?}"
                );
            }
            close(&format!("{what} grad_x"), &grad, &reference.grad_x);
            // A kernel forward's state drives the CPU backward (copied then).
            let on_cpu = triplet_backward(&x.to_host().unwrap(), &labels, &opts, &fwd.saved, 1.0);
            close(
                &format!("{what}: cpu backward of a kernel state"),
                &on_cpu.unwrap(),
                &reference.grad_x,
            );
        }
    }
}

/// A NaN in a device-resident input is found on the device: the call returns, and reading any
/// of its results is the error the CPU gives at the call.
#[test]
fn non_finite_device_inputs_are_errors_when_results_are_read() {
    for device in kernel_devices("non_finite_device_inputs") {
        let mut rng = StdRng::seed_from_u64(5);
        let mut values = random_matrix(&mut rng, ROWS, DIM);
        values[7 * DIM + 3] = f32::INFINITY;
        let z = Tensor::from_vec(values, &[ROWS, DIM], device).unwrap();
        let opts = NtXentOptions::default();
        let want = ntxent(&z.to_host().unwrap(), &opts).unwrap_err();
        let out = stays("ntxent on a NaN", device, || ntxent(&z, &opts).unwrap());
        for (what, read) in [
            ("loss", out.loss.to_scalar().map(|_| ())),
            ("grad_z", out.grad_z.to_vec_f64().map(|_| ())),
        ] {
            let err = read.unwrap_err();
            assert_eq!(err.to_string(), want.to_string(), "{what} on {device}");
            assert!(
                matches!(
                    err,
                    Error::NonFinite {
                        op: "ntxent",
                        arg: "z",
                        row: 7,
                        ..
                    }
                ),
                "{what} on {device}: {err}"
            );
        }
        let y = normalize(&z).unwrap();
        let err = y.to_vec_f64().unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    op: "normalize",
                    arg: "x",
                    row: 7,
                    ..
                }
            ),
            "{device}: {err}"
        );
    }
}

/// A caller's cudarc allocation becomes a tensor and a result goes back as a `CudaSlice`, with no
/// copy through the host (on GPU 0 when this build and machine have one).
#[test]
fn cuda_slices_cross_without_a_copy() {
    #[cfg(not(feature = "cuda"))]
    println!("cuda_slices_cross_without_a_copy: skipped: this build has no `cuda` feature");
    #[cfg(feature = "cuda")]
    {
        if let Err(reason) = device_available(Device::Cuda(0)) {
            println!("cuda_slices_cross_without_a_copy: skipped on cuda:0: {reason}");
            return;
        }
        let mut rng = StdRng::seed_from_u64(8);
        let values = random_matrix(&mut rng, ROWS, DIM);
        let stream = contra::cuda::stream(0).unwrap();
        let slice = stream.clone_htod(&values).unwrap();
        let err = Tensor::from_cuda_slice(stream.clone_htod(&values).unwrap(), &[ROWS, DIM + 1]);
        assert!(err.unwrap_err().to_string().contains("`slice`"));
        let (z, copies) = moved(|| Tensor::from_cuda_slice(slice, &[ROWS, DIM]).unwrap());
        assert_eq!(copies, Transfers::default());
        let opts = NtXentOptions::default();
        let out = ntxent(&z, &opts).unwrap();
        let reference = ntxent(&z.to_host().unwrap(), &opts).unwrap();
        let (grad, copies) = moved(|| out.grad_z.into_cuda_slice::<f32>().unwrap());
        // The device checks are read first: one small copy.
        assert_eq!((copies.to_device, copies.to_host), (0, 1), "{copies}");
        let grad: Vec<f64> = stream
            .clone_dtoh(&grad)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let err = rel_err(&grad, &reference.grad_z.to_vec_f64().unwrap());
        assert!(err < 1e-4, "grad_z through a CudaSlice: {err:e}");
        // A 16-bit slice of odd length is copied on the device into whole words.
        let half: Vec<half::bf16> = values[..7]
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let t = Tensor::from_cuda_slice(stream.clone_htod(&half).unwrap(), &[7]).unwrap();
        assert_eq!(t.to_vec::<half::bf16>().unwrap(), half);
    }
}

/// Tensors (device-resident ones and those carrying device checks included) move between
/// threads, as a data loader or a multi-stream training loop needs.
#[test]
fn tensors_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tensor>();
    send_sync::<SoftmaxSaved>();
    send_sync::<ClipSaved>();
    let z = Tensor::from_vec(vec![0.5f32; 8], &[4, 2], Device::Interp).unwrap();
    let out = ntxent(&z, &NtXentOptions::default()).unwrap();
    let loss = std::thread::spawn(move || out.loss.to_scalar().unwrap())
        .join()
        .unwrap();
    assert!(loss.is_finite());
}

/// Labels and positives already on the device (`Indices`) are read there: forward and backward
/// of every loss that takes them make no copy, and give the host labels' results.
#[test]
fn device_indices_make_no_copy() {
    for device in kernel_devices("device_indices") {
        let mut rng = StdRng::seed_from_u64(21);
        let (q, k) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, ROWS, device),
        );
        let host = (q.to_host().unwrap(), k.to_host().unwrap());
        let opts = InfoNceOptions {
            self_mask: true,
            ..InfoNceOptions::default()
        };
        let positives = random_positives(&mut rng, ROWS, ROWS, true);
        let on_device = Indices::from_usize(&positives, device).unwrap();
        let fwd = stays("infonce_forward", device, || {
            infonce_forward(&q, &k, &on_device, &opts).unwrap()
        });
        let (dq, _) = stays("infonce_backward", device, || {
            infonce_backward(&q, &k, &on_device, &opts, &fwd.saved, 1.0).unwrap()
        });
        let one = stays("infonce", device, || {
            infonce(&q, &k, &on_device, &opts).unwrap()
        });
        let want = infonce(&host.0, &host.1, &positives, &opts).unwrap();
        let got = read_loss("infonce", device, &fwd.loss);
        assert!((got - want.loss.to_scalar().unwrap()).abs() < 1e-4 * got.abs());
        close("infonce grad_q (device positives)", &dq, &want.grad_q);
        close("infonce one call", &one.grad_k, &want.grad_k);
        // A saved state of host positives drives a backward of the same device positives.
        let host_fwd = infonce_forward(&q, &k, &positives, &opts).unwrap();
        infonce_backward(&q, &k, &on_device, &opts, &host_fwd.saved, 1.0).unwrap();

        let labels: Vec<i64> = (0..ROWS as i64).map(|i| i % 5 - 2).collect();
        let device_labels = Indices::new(&labels, device).unwrap();
        let features = q.clone().reshape(&[ROWS / 2, 2, DIM]).unwrap();
        let half = &labels[..ROWS / 2];
        let half_on_device = Indices::new(half, device).unwrap();
        let sopts = SupConOptions::default();
        let fwd = stays("supcon_forward", device, || {
            supcon_forward(&features, &half_on_device, &sopts).unwrap()
        });
        let grad = stays("supcon_backward", device, || {
            supcon_backward(&features, &half_on_device, &sopts, &fwd.saved, 1.0).unwrap()
        });
        let want = supcon(&features.to_host().unwrap(), half, &sopts).unwrap();
        let got = read_loss("supcon", device, &fwd.loss);
        assert!((got - want.loss.to_scalar().unwrap()).abs() < 1e-4 * got.abs());
        close("supcon grad (device labels)", &grad, &want.grad_features);

        let topts = TripletOptions {
            mining: Mining::BatchAll,
            ..TripletOptions::default()
        };
        let out = stays("triplet", device, || {
            triplet(&q, &device_labels, &topts).unwrap()
        });
        let want = triplet(&host.0, &labels, &topts).unwrap();
        close("triplet grad (device labels)", &out.grad_x, &want.grad_x);

        let y: Vec<i64> = (0..ROWS as i64).map(|i| i % 2).collect();
        let y_on_device = Indices::new(&y, device).unwrap();
        let mopts = MarginOptions::default();
        let out = stays("margin_loss", device, || {
            margin_loss(&q, &k, &y_on_device, &mopts).unwrap()
        });
        let want = margin_loss(&host.0, &host.1, &y, &mopts).unwrap();
        close("margin grad (device labels)", &out.grad_x1, &want.grad_x1);
    }
}

/// Device indices that break an op's rule are found on the device: the call returns, and
/// reading its results is the error the host check gives.
#[test]
fn bad_device_indices_are_errors_when_results_are_read() {
    for device in kernel_devices("bad_device_indices") {
        let mut rng = StdRng::seed_from_u64(22);
        let (q, k) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, ROWS, device),
        );
        let host = (q.to_host().unwrap(), k.to_host().unwrap());
        let opts = InfoNceOptions {
            self_mask: true,
            ..InfoNceOptions::default()
        };
        let mut positives = random_positives(&mut rng, ROWS, ROWS, true);
        for bad in [ROWS + 3, 11] {
            positives[11] = bad;
            let want = infonce(&host.0, &host.1, &positives, &opts).unwrap_err();
            let on_device = Indices::from_usize(&positives, device).unwrap();
            let out = infonce(&q, &k, &on_device, &opts).unwrap();
            let got = out.loss.to_scalar().unwrap_err();
            assert_eq!(got.to_string(), want.to_string(), "positives[11] = {bad}");
            assert!(out.grad_q.to_vec_f64().is_err());
        }
        let mut y: Vec<i64> = (0..ROWS as i64).map(|i| i % 2).collect();
        y[5] = 2;
        let want = margin_loss(&host.0, &host.1, &y, &MarginOptions::default());
        let out = margin_loss(
            &q,
            &k,
            &Indices::new(&y, device).unwrap(),
            &MarginOptions::default(),
        );
        assert_eq!(
            out.unwrap().loss.to_scalar().unwrap_err().to_string(),
            want.unwrap_err().to_string()
        );
        let err = Indices::new(&[1 << 40], device).unwrap_err();
        assert!(err.to_string().contains("i32"), "{err}");
    }
}

/// pytorch-metric-learning's contrastive variant of the margin loss reduces on the device too:
/// its group counts never cross; a call copies only its host labels in.
#[test]
fn pml_margin_variant_stays_on_the_device() {
    for device in kernel_devices("pml_margin_transfers") {
        let mut rng = StdRng::seed_from_u64(23);
        let (x1, x2) = (
            device_matrix(&mut rng, ROWS, device),
            device_matrix(&mut rng, ROWS, device),
        );
        let y: Vec<i64> = (0..ROWS as i64).map(|i| i % 3 % 2).collect();
        let opts = MarginOptions {
            margin: 2.0,
            variant: MarginVariant::PmlContrastive,
        };
        let (out, copies) = moved(|| margin_loss(&x1, &x2, &y, &opts).unwrap());
        assert_eq!(
            (copies.to_device, copies.to_host),
            (2, 0),
            "pml margin on {device}: {copies}"
        );
        let reference =
            margin_loss(&x1.to_host().unwrap(), &x2.to_host().unwrap(), &y, &opts).unwrap();
        let got = read_loss("pml margin", device, &out.loss);
        let want = reference.loss.to_scalar().unwrap();
        assert!(
            (got - want).abs() < 1e-4 * want,
            "pml margin: {got} vs {want}"
        );
        close("pml margin grad_x1", &out.grad_x1, &reference.grad_x1);
    }
}
