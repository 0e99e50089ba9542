//! contra's losses inside candle (feature `candle`, CPU storage): candle's `backward()` gives
//! contra's own gradients, a few optimizer steps on a `Var` lower the loss, and bad input is a
//! candle error that says what was wrong.

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
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
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
    assert!(err.contains("U32") && err.contains("f32"), "{err}");
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
