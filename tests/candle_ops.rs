//! contra's losses inside candle (feature `candle`, CPU storage; with `candle-cuda` also CUDA
//! storage when a GPU is there): candle's `backward()` gives contra's own gradients, a few
//! optimizer steps on a `Var` lower the loss, and bad input is a candle error that says what was
//! wrong.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use contra::NtXentOptions;

/// Odd-sized views: 2 x 13 rows of 7 features.
fn views(dtype: DType) -> Tensor {
    let values: Vec<f64> = (0..26 * 7)
        .map(|i| (i * 37 % 101) as f64 / 50.0 - 1.0)
        .collect();
    Tensor::from_vec(values, (26, 7), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max(1e-300)
}

#[test]
fn ntxent_backward_gives_contras_gradient() {
    let opts = NtXentOptions { temperature: 0.3 };
    for (dtype, tol) in [
        (DType::F64, 1e-10),
        (DType::F32, 1e-5),
        (DType::BF16, 2e-2),
        (DType::F16, 2e-2),
    ] {
        let z = Var::from_tensor(&views(dtype)).unwrap();
        let loss = contra::candle::ntxent(z.as_tensor(), &opts).unwrap();
        assert_eq!(loss.dims(), &[] as &[usize]);
        // Through candle's graph: 2 * loss, so the gradient scales too.
        let grads = (loss.clone() * 2.0).unwrap().backward().unwrap();
        let got: Vec<f64> = grads
            .get(z.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let host: Vec<f64> = views(DType::F64).flatten_all().unwrap().to_vec1().unwrap();
        let zc = contra::Tensor::from_vec(host, &[26, 7], contra::Device::Cpu).unwrap();
        let zc = match dtype {
            DType::F32 => zc.to_dtype(contra::DType::F32).unwrap(),
            DType::BF16 => zc.to_dtype(contra::DType::Bf16).unwrap(),
            DType::F16 => zc.to_dtype(contra::DType::F16).unwrap(),
            _ => zc,
        };
        let want = contra::ntxent(&zc, &opts).unwrap();
        let want_grad: Vec<f64> = want
            .grad_z
            .to_vec_f64()
            .unwrap()
            .into_iter()
            .map(|g| 2.0 * g)
            .collect();
        let err = max_rel(&got, &want_grad);
        assert!(err < tol, "{dtype:?}: gradient error {err:e}");
        let loss = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let want_loss = want.loss.to_scalar().unwrap();
        assert!(
            ((loss - want_loss) / want_loss).abs() < tol,
            "{dtype:?}: {loss} vs {want_loss}"
        );
    }
}

#[test]
fn sgd_steps_on_a_var_lower_the_loss() {
    let opts = NtXentOptions { temperature: 0.5 };
    let z = Var::from_tensor(&views(DType::F32)).unwrap();
    let loss_of = |z: &Var| {
        contra::candle::ntxent(z.as_tensor(), &opts)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let first = loss_of(&z);
    for _ in 0..5 {
        let loss = contra::candle::ntxent(z.as_tensor(), &opts).unwrap();
        let grad = loss.backward().unwrap().remove(z.as_tensor()).unwrap();
        z.set(&(z.as_tensor() - (grad * 0.5).unwrap()).unwrap())
            .unwrap();
    }
    let last = loss_of(&z);
    assert!(last < first - 1e-3, "{first} -> {last}");
}

#[test]
fn bad_input_is_a_candle_error_that_says_what() {
    let opts = NtXentOptions::default();
    let odd = views(DType::F32).i(0..25).unwrap();
    let err = contra::candle::ntxent(&odd, &opts).unwrap_err().to_string();
    assert!(err.contains("ntxent") && err.contains("25"), "{err}");
    let ints = Tensor::zeros((4, 3), DType::U32, &Device::Cpu).unwrap();
    let err = contra::candle::ntxent(&ints, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`z`") && err.contains("float tensor"), "{err}");
    let transposed = views(DType::F32).t().unwrap();
    let err = contra::candle::ntxent(&transposed, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("contiguous"), "{err}");
    let err = contra::candle::ntxent(&views(DType::F32), &NtXentOptions { temperature: 0.0 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("temperature"), "{err}");
}

/// candle's gradient of `input` (as f64 values).
fn grad_of(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Vec<f64> {
    grads
        .get(t)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `values` as a candle Var of `dtype` on `device` and a contra host tensor of `shape`.
fn both(device: &Device, dtype: DType, values: &[f64], shape: &[usize]) -> (Var, contra::Tensor) {
    let t = Tensor::from_vec(values.to_vec(), shape, device).unwrap();
    let var = Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
    let host = contra::Tensor::from_vec(values.to_vec(), shape, contra::Device::Cpu).unwrap();
    let host = match dtype {
        DType::F32 => host.to_dtype(contra::DType::F32).unwrap(),
        DType::BF16 => host.to_dtype(contra::DType::Bf16).unwrap(),
        DType::F16 => host.to_dtype(contra::DType::F16).unwrap(),
        _ => host,
    };
    (var, host)
}

fn values(len: usize, seed: usize) -> Vec<f64> {
    (0..len)
        .map(|i| ((i * 37 + seed * 11) % 101) as f64 / 50.0 - 1.0)
        .collect()
}

fn assert_close(tol: f64, what: &str, got: &[f64], want: &[f64]) {
    let err = max_rel(got, want);
    assert!(err < tol, "{what}: gradient error {err:e} > {tol:e}");
}

/// Asserts candle's gradient of each var equals contra's gradient paired with it.
fn assert_grads(
    tol: f64,
    what: &str,
    grads: &candle_core::backprop::GradStore,
    pairs: &[(&Var, &contra::Tensor)],
) {
    for (i, (var, want)) in pairs.iter().enumerate() {
        assert_close(
            tol,
            &format!("{what} input {i}"),
            &grad_of(grads, var.as_tensor()),
            &want.to_vec_f64().unwrap(),
        );
    }
}

#[test]
fn every_loss_backward_gives_contras_gradients() {
    for (dtype, tol) in [
        (DType::F64, 1e-10),
        (DType::F32, 1e-5),
        (DType::BF16, 2e-2),
        (DType::F16, 2e-2),
    ] {
        check_every_loss(&Device::Cpu, dtype, tol);
    }
}

/// The same checks on candle's CUDA storage (contra's kernels on candle's memory and stream).
#[cfg(feature = "candle-cuda")]
#[test]
fn every_loss_on_cuda_storage_gives_contras_gradients() {
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("skipped: no GPU for candle's CUDA storage ({e})");
            return;
        }
    };
    for (dtype, tol) in [
        (DType::F64, 1e-10),
        (DType::F32, 1e-5),
        (DType::BF16, 2e-2),
        (DType::F16, 2e-2),
    ] {
        check_every_loss(&device, dtype, tol);
    }
    check_moco_queue(&device);
}

/// Every loss on candle storage of `device` against contra on the host.
fn check_every_loss(device: &Device, dtype: DType, tol: f64) {
    // NT-Xent: 2 x 13 rows of 7.
    let (z, zh) = both(device, dtype, &values(26 * 7, 12), &[26, 7]);
    let nopts = NtXentOptions { temperature: 0.3 };
    let grads = contra::candle::ntxent(z.as_tensor(), &nopts)
        .unwrap()
        .backward()
        .unwrap();
    let want = contra::ntxent(&zh, &nopts).unwrap();
    assert_grads(tol, "ntxent", &grads, &[(&z, &want.grad_z)]);

    let labels: Vec<i64> = vec![0, 1, 2, 0, 1, 2, 0, 1, 3, 3, 0];
    let n = labels.len();
    let label_t = Tensor::from_vec(labels.clone(), n, device).unwrap();

    // InfoNCE: q (11 x 5), k (13 x 5), positives as u32.
    let (q, qh) = both(device, dtype, &values(n * 5, 1), &[n, 5]);
    let (k, kh) = both(device, dtype, &values(13 * 5, 2), &[13, 5]);
    let positives: Vec<u32> = (0..n as u32).map(|i| (i * 3 + 1) % 13).collect();
    let opts = contra::InfoNceOptions::default();
    let loss = contra::candle::infonce(
        q.as_tensor(),
        k.as_tensor(),
        &Tensor::from_vec(positives.clone(), n, device).unwrap(),
        &opts,
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let pos: Vec<usize> = positives.iter().map(|&p| p as usize).collect();
    let want = contra::infonce(&qh, &kh, &pos, &opts).unwrap();
    assert_grads(
        tol,
        "infonce",
        &grads,
        &[(&q, &want.grad_q), (&k, &want.grad_k)],
    );

    // SupCon: 11 samples x 2 views x 5.
    let (f, fh) = both(device, dtype, &values(n * 2 * 5, 3), &[n, 2, 5]);
    let sopts = contra::SupConOptions {
        temperature: 0.2,
        base_temperature: 0.2,
        ..Default::default()
    };
    // Labels as u32 here (i64 for the triplets).
    let label_u32 = label_t.to_dtype(DType::U32).unwrap();
    let grads = contra::candle::supcon(f.as_tensor(), &label_u32, &sopts)
        .unwrap()
        .backward()
        .unwrap();
    let want = contra::supcon(&fh, &labels, &sopts).unwrap();
    assert_grads(tol, "supcon", &grads, &[(&f, &want.grad_features)]);

    // Triplet: every mining.
    let (x, xh) = both(device, dtype, &values(n * 5, 4), &[n, 5]);
    for mining in [
        contra::Mining::BatchAll,
        contra::Mining::BatchHard,
        contra::Mining::SemiHard,
    ] {
        let topts = contra::TripletOptions {
            mining,
            margin: 0.4,
            ..Default::default()
        };
        let (loss, counts) = contra::candle::triplet(x.as_tensor(), &label_t, &topts).unwrap();
        let grads = loss.backward().unwrap();
        let want = contra::triplet(&xh, &labels, &topts).unwrap();
        assert_eq!(counts.count().unwrap(), want.counts.count().unwrap());
        assert_eq!(counts.stats().unwrap(), want.counts.stats().unwrap());
        assert_grads(
            tol,
            &format!("triplet {mining:?}"),
            &grads,
            &[(&x, &want.grad_x)],
        );
    }

    // Margin loss: y as u8.
    let (x1, x1h) = both(device, dtype, &values(n * 5, 5), &[n, 5]);
    let (x2, x2h) = both(device, dtype, &values(n * 5, 6), &[n, 5]);
    let y: Vec<u8> = (0..n as u8).map(|i| i % 2).collect();
    let mopts = contra::MarginOptions {
        margin: 1.5,
        ..Default::default()
    };
    let grads = contra::candle::margin_loss(
        x1.as_tensor(),
        x2.as_tensor(),
        &Tensor::from_vec(y.clone(), n, device).unwrap(),
        &mopts,
    )
    .unwrap()
    .backward()
    .unwrap();
    let yi: Vec<i64> = y.iter().map(|&v| v as i64).collect();
    let want = contra::margin_loss(&x1h, &x2h, &yi, &mopts).unwrap();
    assert_grads(
        tol,
        "margin",
        &grads,
        &[(&x1, &want.grad_x1), (&x2, &want.grad_x2)],
    );

    // SigLIP with a learnable log_scale and bias.
    let (a, ah) = both(device, dtype, &values(n * 5, 13), &[n, 5]);
    let (b, bh) = both(device, dtype, &values(n * 5, 14), &[n, 5]);
    let (s, _) = both(device, dtype, &[1.5], &[1]);
    let (bias, _) = both(device, dtype, &[-2.0], &[]);
    let gopts = contra::SigLipOptions::default();
    let grads = contra::candle::siglip(
        a.as_tensor(),
        b.as_tensor(),
        s.as_tensor(),
        bias.as_tensor(),
        &gopts,
    )
    .unwrap()
    .backward()
    .unwrap();
    let want = contra::siglip(&ah, &bh, 1.5, -2.0, &gopts).unwrap();
    assert_grads(
        tol,
        "siglip",
        &grads,
        &[(&a, &want.grad_a), (&b, &want.grad_b)],
    );
    for (var, want, what) in [
        (&s, &want.grad_log_scale, "siglip log_scale"),
        (&bias, &want.grad_bias, "siglip bias"),
    ] {
        assert_close(
            tol,
            what,
            &grad_of(&grads, var.as_tensor()),
            &[want.to_scalar().unwrap()],
        );
    }

    // CLIP with a learnable log_scale.
    let (a, ah) = both(device, dtype, &values(n * 5, 7), &[n, 5]);
    let (b, bh) = both(device, dtype, &values(n * 5, 8), &[n, 5]);
    let (s, _) = both(device, dtype, &[2.3], &[1]);
    let grads = contra::candle::clip(a.as_tensor(), b.as_tensor(), s.as_tensor())
        .unwrap()
        .backward()
        .unwrap();
    let want = contra::clip(&ah, &bh, 2.3).unwrap();
    assert_grads(
        tol,
        "clip",
        &grads,
        &[(&a, &want.grad_a), (&b, &want.grad_b)],
    );
    assert_close(
        tol,
        "clip log_scale",
        &grad_of(&grads, s.as_tensor()),
        &[want.grad_log_scale.to_scalar().unwrap()],
    );

    // Labels out of range: a candle error naming them.
    let bad = Tensor::from_vec(vec![0u32, 99], 2, device).unwrap();
    let err = contra::candle::infonce(
        &q.as_tensor().narrow(0, 0, 2).unwrap(),
        k.as_tensor(),
        &bad,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("positives[1] = 99"), "{err}");
    // Float labels: refused.
    let err = contra::candle::supcon(
        f.as_tensor(),
        &label_t.to_dtype(DType::F32).unwrap(),
        &sopts,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("labels") && err.contains("integer"), "{err}");
}

#[test]
fn moco_queue_loss_and_enqueue_match_contra() {
    check_moco_queue(&Device::Cpu);
}

fn check_moco_queue(device: &Device) {
    let (q, qh) = both(device, DType::F64, &values(5 * 4, 9), &[5, 4]);
    let (k, kh) = both(device, DType::F64, &values(5 * 4, 10), &[5, 4]);
    let (initial, queue_h) = both(device, DType::F64, &values(7 * 4, 11), &[7, 4]);
    let mut queue = contra::candle::MocoQueue::new(initial.as_tensor().clone()).unwrap();
    let opts = contra::MocoOptions { temperature: 0.2 };
    let loss = queue.loss(q.as_tensor(), k.as_tensor(), &opts).unwrap();
    let grads = loss.backward().unwrap();
    let want = contra::moco(&qh, &kh, &queue_h, &opts).unwrap();
    assert_close(
        1e-10,
        "moco q",
        &grad_of(&grads, q.as_tensor()),
        &want.grad_q.to_vec_f64().unwrap(),
    );
    assert!(
        grads.get(k.as_tensor()).is_none(),
        "the keys get no gradient"
    );
    // Pointer 5 of 7: the second enqueue wraps around.
    let mut want_queue = queue_h.clone();
    let mut ptr = 0;
    for _ in 0..2 {
        queue.enqueue(k.as_tensor()).unwrap();
        ptr = contra::moco_enqueue(&mut want_queue, &kh, ptr).unwrap();
    }
    assert_eq!(queue.ptr(), ptr);
    let got: Vec<f64> = queue.queue().flatten_all().unwrap().to_vec1().unwrap();
    assert_close(
        1e-10,
        "queue after enqueue",
        &got,
        &want_queue.to_vec_f64().unwrap(),
    );
}
