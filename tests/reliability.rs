//! Issue 13's reproducers that are not about malformed files or norms: sizes whose product
//! overflows, options whose f32 image overflows, CLIP's scale gradient on clustered embeddings,
//! saved state tied to what made it, the NaN policy, and error names. Each runs on Cpu and on
//! the kernel devices (Interp, and GPU 0 when there is one).

mod common;

use common::{kernel_devices, rel_err};
use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Every device this machine runs ops on.
fn devices(test: &str) -> Vec<Device> {
    let mut all = vec![Device::Cpu];
    all.extend(kernel_devices(test));
    all
}

/// `rows x dim` embeddings clustered around `centre`: each row is the centre plus uniform noise
/// of size `spread` (what a model's outputs look like early in training).
fn clustered(rng: &mut StdRng, centre: &[f64], rows: usize, spread: f64) -> Vec<f64> {
    let dim = centre.len();
    (0..rows * dim)
        .map(|e| centre[e % dim] + spread * (rng.random::<f64>() * 2.0 - 1.0))
        .collect()
}

/// CLIP's `d loss / d log_scale` sums `dlogit * logit` over terms of size `scale` that cancel to
/// a result of size `scale * spread`: summed as is, f32 got it with the wrong sign. Computed from
/// centred terms it is right to about the resolution of an f32 logit, `2^-24 * scale`, which is
/// what the f32 logits themselves carry (documented on `clip`).
#[test]
fn clip_scale_gradient_is_right_on_clustered_embeddings() {
    let mut rng = StdRng::seed_from_u64(13);
    let (rows, dim, scale) = (333, 65, 100.0f64);
    let bound = scale * f64::from(f32::EPSILON) / 2.0;
    // The views of a pair share a centre (the positives are the closest), or each side has its
    // own (every logit about equal).
    for shared_centre in [true, false] {
        let mut centre = || {
            (0..dim)
                .map(|_| rng.random::<f64>() * 2.0 - 1.0)
                .collect::<Vec<f64>>()
        };
        let (centre_a, centre_b) = (centre(), centre());
        let centre_b = if shared_centre { &centre_a } else { &centre_b };
        let a = clustered(&mut rng, &centre_a, rows, 1e-3);
        let b = clustered(&mut rng, centre_b, rows, 1e-3);
        let reference = {
            let a = Tensor::from_vec(a.clone(), &[rows, dim], Device::Cpu).unwrap();
            let b = Tensor::from_vec(b.clone(), &[rows, dim], Device::Cpu).unwrap();
            clip(&a, &b, scale.ln())
                .unwrap()
                .grad_log_scale
                .to_scalar()
                .unwrap()
        };
        println!("shared centre {shared_centre}: f64 grad_log_scale {reference:e}");
        for device in devices("clip_scale_gradient") {
            let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let a = Tensor::from_vec(to_f32(&a), &[rows, dim], device).unwrap();
            let b = Tensor::from_vec(to_f32(&b), &[rows, dim], device).unwrap();
            let got = clip(&a, &b, scale.ln())
                .unwrap()
                .grad_log_scale
                .to_scalar()
                .unwrap();
            let err = (got - reference).abs();
            println!("  {device}: {got:e}, error {err:.2e} (bound {bound:.2e})");
            assert!(err < bound, "{device}: {got:e} vs f64 {reference:e}");
        }
    }
}

/// An op's outcome on inputs at the edge of the compute precision: a finite result, or an error
/// that names one of `names`; never inf, NaN or a panic.
/// The result is finite, or the call (or, on a kernel device, the read of its results, where the
/// device's checks surface) is an error naming one of `names`.
fn finite_or_named<T>(
    result: Result<T>,
    finite: impl Fn(&T) -> Result<bool>,
    names: &[&str],
    case: &str,
) {
    match result.and_then(|out| finite(&out)) {
        Ok(finite) => assert!(finite, "{case}: a non-finite result"),
        Err(err) => {
            let text = err.to_string();
            assert!(
                names.iter().any(|name| text.contains(&format!("`{name}`"))),
                "{case}: the error names none of {names:?}: {text}"
            );
        }
    }
}

fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.to_vec_f64()?.iter().all(|v| v.is_finite()))
}

fn unit_rows(rng: &mut StdRng, rows: usize, dim: usize, device: Device) -> Tensor {
    let values: Vec<f32> = (0..rows * dim)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(values, &[rows, dim], device).unwrap()
}

#[test]
fn shapes_whose_element_count_overflows_are_errors() {
    let huge = (1usize << 63) + 1;
    let err = Tensor::from_vec(vec![3.0f32, 4.0], &[2, huge], Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("`shape`"), "{err}");
    let err = Tensor::zeros(&[1 << 40, 1 << 40], DType::F32, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("`shape`"), "{err}");
    // The element count fits, its size in bytes does not.
    assert!(Tensor::zeros(&[1 << 62], DType::F64, Device::Cpu).is_err());
    let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2], Device::Cpu).unwrap();
    let err = x.reshape(&[2, huge]).unwrap_err();
    assert!(err.to_string().contains("`shape`"), "{err}");
}

#[test]
fn temperatures_whose_logit_scale_overflows_f32_are_errors_naming_it() {
    let mut rng = StdRng::seed_from_u64(7);
    for device in devices("tiny_temperature") {
        let z = unit_rows(&mut rng, 6, 5, device);
        let positives = [3, 4, 5, 0, 1, 2];
        for tau in [3e-39, 1e-39, 5e-324] {
            let case = format!("{device} tau {tau:e}");
            let err = ntxent(&z, &NtXentOptions { temperature: tau }).unwrap_err();
            assert!(err.to_string().contains("`temperature`"), "{case}: {err}");
            let opts = InfoNceOptions {
                temperature: tau,
                ..Default::default()
            };
            let err = infonce_forward(&z, &z, &positives, &opts).unwrap_err();
            assert!(err.to_string().contains("`temperature`"), "{case}: {err}");
            let err = moco(&z, &z, &z, &MocoOptions { temperature: tau }).unwrap_err();
            assert!(err.to_string().contains("`temperature`"), "{case}: {err}");
            let features = z.clone().reshape(&[3, 2, 5]).unwrap();
            let sopts = SupConOptions {
                temperature: tau,
                base_temperature: 1.0,
                ..Default::default()
            };
            let err = supcon(&features, &[0, 1, 0], &sopts).unwrap_err();
            assert!(err.to_string().contains("`temperature`"), "{case}: {err}");
        }
        // Small but representable: a finite result or an error naming what overflowed.
        for tau in [1e-30, 1e-20, 1e-6] {
            let case = format!("{device} tau {tau:e}");
            let opts = InfoNceOptions {
                temperature: tau,
                ..Default::default()
            };
            let names = ["temperature", "grad_q", "grad_k", "loss", "lse"];
            let finite = |o: &InfoNceOutput| {
                Ok(o.loss.to_scalar()?.is_finite()
                    && all_finite(&o.grad_q)?
                    && all_finite(&o.grad_k)?)
            };
            finite_or_named(infonce(&z, &z, &positives, &opts), finite, &names, &case);
            let finite =
                |o: &MocoOutput| Ok(o.loss.to_scalar()?.is_finite() && all_finite(&o.grad_q)?);
            finite_or_named(
                moco(&z, &z, &z, &MocoOptions { temperature: tau }),
                finite,
                &names,
                &case,
            );
            let finite =
                |o: &NtXentOutput| Ok(o.loss.to_scalar()?.is_finite() && all_finite(&o.grad_z)?);
            finite_or_named(
                ntxent(&z, &NtXentOptions { temperature: tau }),
                finite,
                &["temperature", "grad_z", "loss", "lse"],
                &case,
            );
        }
    }
}

#[test]
fn grad_loss_and_log_scale_beyond_f32_are_errors_naming_them() {
    let mut rng = StdRng::seed_from_u64(8);
    for device in devices("grad_loss_range") {
        let z = unit_rows(&mut rng, 4, 3, device);
        let opts = NtXentOptions { temperature: 0.5 };
        let fwd = ntxent_forward(&z, &opts).unwrap();
        let err = ntxent_backward(&z, &opts, &fwd.saved, 1e39).unwrap_err();
        assert!(err.to_string().contains("`grad_loss`"), "{device}: {err}");
        assert!(
            err.to_string().starts_with("ntxent_backward"),
            "{device}: {err}"
        );
        // exp(89) overflows f32; exp(80) does not, but the gradients then may.
        let err = clip(&z, &z, 89.0).unwrap_err();
        assert!(err.to_string().contains("`log_scale`"), "{device}: {err}");
        let finite = |o: &ClipOutput| {
            Ok(o.loss.to_scalar()?.is_finite()
                && o.grad_log_scale.to_scalar()?.is_finite()
                && all_finite(&o.grad_a)?
                && all_finite(&o.grad_b)?)
        };
        let names = [
            "log_scale",
            "loss",
            "grad_a",
            "grad_b",
            "grad_log_scale",
            "row_lse",
            "col_lse",
        ];
        finite_or_named(
            clip(&z, &z, 80.0),
            finite,
            &names,
            &format!("{device} log_scale 80"),
        );
    }
    // f64 on the CPU computes in f64: the same grad_loss is fine there.
    let z = Tensor::from_vec(
        vec![1.0f64, 0.0, 0.0, 1.0, 0.8, 0.6, 0.6, 0.8],
        &[4, 2],
        Device::Cpu,
    )
    .unwrap();
    let opts = NtXentOptions { temperature: 0.5 };
    let fwd = ntxent_forward(&z, &opts).unwrap();
    assert!(all_finite(&ntxent_backward(&z, &opts, &fwd.saved, 1e39).unwrap()).unwrap());
}

#[test]
fn raw_infonce_whose_logits_overflow_f32_is_an_error_not_nan() {
    let opts = InfoNceOptions {
        temperature: 0.1,
        normalize: false,
        self_mask: false,
    };
    for device in devices("raw_infonce_overflow") {
        let q = Tensor::from_vec(vec![1e20f32, 0.0, 0.0, 1e20], &[2, 2], device).unwrap();
        let result = infonce(&q, &q, &[0, 1], &opts);
        let finite = |o: &InfoNceOutput| {
            Ok(o.loss.to_scalar()?.is_finite() && all_finite(&o.grad_q)? && all_finite(&o.grad_k)?)
        };
        finite_or_named(
            result,
            finite,
            &["loss", "lse", "temperature", "grad_q"],
            &format!("{device}"),
        );
    }
    // In f64 on the CPU the loss is representable and right: 1e40 / 0.1 per row.
    let q = Tensor::from_vec(vec![1e20f64, 0.0, 0.0, 1e20], &[2, 2], Device::Cpu).unwrap();
    let out = infonce(&q, &q, &[1, 0], &opts).unwrap();
    assert!(
        (out.loss.to_scalar().unwrap() / 1e41 - 1.0).abs() < 1e-12,
        "{}",
        out.loss.to_scalar().unwrap()
    );
}

#[test]
fn a_backward_given_another_call_s_saved_state_is_an_error() {
    let mut rng = StdRng::seed_from_u64(9);
    for device in devices("saved_state") {
        let (q, k, queue) = (
            unit_rows(&mut rng, 5, 4, device),
            unit_rows(&mut rng, 5, 4, device),
            unit_rows(&mut rng, 7, 4, device),
        );
        let opts = MocoOptions { temperature: 0.2 };
        let fwd = moco_forward(&q, &k, &queue, &opts).unwrap();
        // Same shapes, other temperature / other queue / other op: each an error naming `saved`.
        let hotter = MocoOptions { temperature: 0.01 };
        let other_queue = unit_rows(&mut rng, 7, 4, device);
        let errors = [
            moco_backward(&q, &k, &queue, &hotter, &fwd.saved, 1.0).unwrap_err(),
            moco_backward(&q, &k, &other_queue, &opts, &fwd.saved, 1.0).unwrap_err(),
            infonce_backward(
                &q,
                &k,
                &[0, 1, 2, 3, 4],
                &InfoNceOptions::default(),
                &fwd.saved,
                1.0,
            )
            .unwrap_err(),
        ];
        for err in errors {
            let text = err.to_string();
            assert!(
                text.contains("`saved`") && text.contains("_backward"),
                "{device}: {text}"
            );
        }
        // The matching call still works, and gets what the one-call form gets.
        let grad = moco_backward(&q, &k, &queue, &opts, &fwd.saved, 1.0).unwrap();
        let one = moco(&q, &k, &queue, &opts).unwrap();
        assert!(
            rel_err(
                &grad.to_vec_f64().unwrap(),
                &one.grad_q.to_vec_f64().unwrap()
            ) < 1e-6
        );

        let fwd = clip_forward(&q, &k, 2.0).unwrap();
        let err = clip_backward(&q, &k, 2.5, &fwd.saved, 1.0).unwrap_err();
        assert!(err.to_string().contains("`saved`"), "{device}: {err}");
    }
}

#[test]
fn enqueue_rejects_a_queue_that_moco_would_reject() {
    for device in devices("enqueue_nan") {
        let mut queue =
            Tensor::from_vec(vec![0.0f32, f32::NAN, 1.0, 0.0], &[2, 2], device).unwrap();
        let k = Tensor::from_vec(vec![1.0f32, 0.0], &[1, 2], device).unwrap();
        // On a kernel device the queue is scanned there and the error comes with its read.
        let err = moco_enqueue(&mut queue, &k, 0)
            .and_then(|_| queue.to_vec_f64())
            .unwrap_err();
        assert!(err.to_string().contains("`queue`"), "{device}: {err}");
    }
}

/// MoCo with a dominant positive: the positive's softmax minus 1 is about -1e-24, so the query
/// gradient is tiny. A log-sum-exp saved in f32 made it 7e-7; saved in f64 (and with exp_m1) the
/// error is bounded by the f64 resolution of the log-sum-exp, `|lse| * 2^-52 / tau` per unit of
/// key norm and batch weight.
#[test]
fn moco_gradient_with_a_dominant_positive_is_not_drowned_by_lse_rounding() {
    // Query i (= its key) is e_i; queue row i has cosine c with it and 0 with the others, so
    // each negative's softmax is exp((c - 1) / tau) = exp(-55), about 1e-24. 1 / tau is not an
    // f32: a log-sum-exp rounded to f32 would be off by up to 4e-6.
    let (rows, dim, tau) = (3, 4, 0.0123f64);
    let c = 1.0 - 55.0 * tau;
    let mut q = vec![0.0f32; rows * dim];
    let mut queue = vec![0.0f32; rows * dim];
    for i in 0..rows {
        q[i * dim + i] = 1.0;
        queue[i * dim + i] = c as f32;
        queue[i * dim + dim - 1] = (1.0 - c * c).sqrt() as f32;
    }
    let q = Tensor::from_vec(q, &[rows, dim], Device::Cpu).unwrap();
    let queue = Tensor::from_vec(queue, &[rows, dim], Device::Cpu).unwrap();
    let out = moco(&q, &q, &queue, &MocoOptions { temperature: tau }).unwrap();
    let largest = out
        .grad_q
        .to_vec_f64()
        .unwrap()
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let bound = (1.0 / tau) * f64::EPSILON * 4.0 / tau;
    println!("largest |dq| {largest:e}");
    assert!(largest < bound, "largest |dq| {largest:e}, bound {bound:e}");
}

/// Issue 13: rows of norm above ~1.8e19 were zeroed by the kernels (f32 sums of squares
/// overflowed), so the cosine softmax losses returned ln M with zero gradients. They are
/// scale-invariant: at 1e20 times the inputs the loss is the same and the gradients are 1e-20
/// times as large.
#[test]
fn cosine_softmax_losses_are_scale_invariant_at_huge_norms() {
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, dim, big) = (6, 5, 1e20f32);
    let base: Vec<f32> = (0..rows * dim)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let scaled: Vec<f32> = base.iter().map(|v| v * big).collect();
    for device in devices("huge_norms") {
        let at =
            |values: &[f32], shape: &[usize]| Tensor::from_slice(values, shape, device).unwrap();
        let (x, xb) = (at(&base, &[rows, dim]), at(&scaled, &[rows, dim]));
        let check = |name: &str, small: (f64, Vec<Tensor>), large: (f64, Vec<Tensor>)| {
            assert!(
                (small.0 - large.0).abs() < 1e-5 * small.0.abs().max(1.0),
                "{device} {name}: loss {} vs {}",
                small.0,
                large.0
            );
            for (g, gb) in small.1.iter().zip(&large.1) {
                let gb: Vec<f64> = gb
                    .to_vec_f64()
                    .unwrap()
                    .iter()
                    .map(|v| v * big as f64)
                    .collect();
                let err = rel_err(&gb, &g.to_vec_f64().unwrap());
                assert!(
                    err < 1e-4,
                    "{device} {name}: gradient relative error {err:e}"
                );
            }
        };
        let opts = NtXentOptions { temperature: 0.3 };
        let run = |z: &Tensor| {
            ntxent(z, &opts)
                .map(|o| (o.loss.to_scalar().unwrap(), vec![o.grad_z]))
                .unwrap()
        };
        check("ntxent", run(&x), run(&xb));
        let iopts = InfoNceOptions {
            temperature: 0.2,
            normalize: true,
            self_mask: false,
        };
        let run = |q: &Tensor| {
            infonce(q, &x, &[1, 2, 3, 4, 5, 0], &iopts)
                .map(|o| (o.loss.to_scalar().unwrap(), vec![o.grad_q]))
                .unwrap()
        };
        check("infonce", run(&x), run(&xb));
        let run = |a: &Tensor| {
            clip(a, &x, 2.0)
                .map(|o| (o.loss.to_scalar().unwrap(), vec![o.grad_a]))
                .unwrap()
        };
        check("clip", run(&x), run(&xb));
        let mopts = MocoOptions { temperature: 0.2 };
        let run = |q: &Tensor| {
            moco(q, &x, &x, &mopts)
                .map(|o| (o.loss.to_scalar().unwrap(), vec![o.grad_q]))
                .unwrap()
        };
        check("moco", run(&x), run(&xb));
        let sopts = SupConOptions {
            temperature: 0.3,
            base_temperature: 0.3,
            ..Default::default()
        };
        let run = |f: &Tensor| {
            let f = f.clone().reshape(&[3, 2, dim]).unwrap();
            supcon(&f, &[0, 1, 0], &sopts)
                .map(|o| (o.loss.to_scalar().unwrap(), vec![o.grad_features]))
                .unwrap()
        };
        check("supcon", run(&x), run(&xb));
    }
}
