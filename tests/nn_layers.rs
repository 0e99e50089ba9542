//! The encoder's layers, optimizers and schedule: finite-difference gradient checks of every
//! layer and of whole networks (input and parameter gradients), hand-computed optimizer updates,
//! BatchNorm running statistics against PyTorch's formula, and bad input.

use contra::nn::{
    lr_at, AdamW, BatchNorm1d, Encoder, Lars, Layer, Linear, Mat, Mlp, MlpSpec, Module, Norm,
    Optimizer, Param, Relu, Sgd,
};
use contra::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- gradient-check machinery

/// Something with a forward pass, a backward pass and parameters.
trait GradChecked {
    fn fwd(&mut self, x: &Mat) -> Result<Mat>;
    fn bwd(&mut self, grad_out: &Mat) -> Result<Mat>;
    fn params(&mut self) -> Vec<&mut Param>;
}

impl GradChecked for Linear {
    fn fwd(&mut self, x: &Mat) -> Result<Mat> {
        self.forward(x)
    }
    fn bwd(&mut self, g: &Mat) -> Result<Mat> {
        self.backward(g)
    }
    fn params(&mut self) -> Vec<&mut Param> {
        self.params_mut()
    }
}

impl GradChecked for Relu {
    fn fwd(&mut self, x: &Mat) -> Result<Mat> {
        self.forward(x)
    }
    fn bwd(&mut self, g: &Mat) -> Result<Mat> {
        self.backward(g)
    }
    fn params(&mut self) -> Vec<&mut Param> {
        Vec::new()
    }
}

/// BatchNorm in whatever mode it was set to.
impl GradChecked for BatchNorm1d {
    fn fwd(&mut self, x: &Mat) -> Result<Mat> {
        self.forward(x)
    }
    fn bwd(&mut self, g: &Mat) -> Result<Mat> {
        self.backward(g)
    }
    fn params(&mut self) -> Vec<&mut Param> {
        self.params_mut()
    }
}

/// An MLP run in a fixed mode.
struct MlpIn(Mlp, bool);

impl GradChecked for MlpIn {
    fn fwd(&mut self, x: &Mat) -> Result<Mat> {
        self.0.forward(x, self.1)
    }
    fn bwd(&mut self, g: &Mat) -> Result<Mat> {
        self.0.backward(g)
    }
    fn params(&mut self) -> Vec<&mut Param> {
        self.0.params_mut()
    }
}

/// An encoder run in a fixed mode.
struct EncoderIn(Encoder, bool);

impl GradChecked for EncoderIn {
    fn fwd(&mut self, x: &Mat) -> Result<Mat> {
        self.0.forward(x, self.1)
    }
    fn bwd(&mut self, g: &Mat) -> Result<Mat> {
        self.0.backward(g)
    }
    fn params(&mut self) -> Vec<&mut Param> {
        self.0.params_mut()
    }
}

/// Deliberately wrong gradients, to prove the checker can fail.
struct Broken {
    inner: Linear,
    input_scale: f32,
    drop_bias_grad: bool,
}

impl GradChecked for Broken {
    fn fwd(&mut self, x: &Mat) -> Result<Mat> {
        self.inner.forward(x)
    }
    fn bwd(&mut self, g: &Mat) -> Result<Mat> {
        let bias_before = self.inner.bias.as_ref().map(|b| b.grad.clone());
        let mut gx = self.inner.backward(g)?;
        gx.data.iter_mut().for_each(|v| *v *= self.input_scale);
        if self.drop_bias_grad {
            self.inner.bias.as_mut().unwrap().grad = bias_before.unwrap();
        }
        Ok(gx)
    }
    fn params(&mut self) -> Vec<&mut Param> {
        self.inner.params_mut()
    }
}

fn random_mat(rows: usize, cols: usize, rng: &mut StdRng) -> Mat {
    let data = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Mat::from_vec(data, rows, cols).unwrap()
}

/// `||a - b|| / max(||a||, ||b||, 1e-2)`: relative, with a floor for gradients that are zero
/// by construction (a bias in front of a train-mode BatchNorm).
fn rel_err(analytic: &[f32], numeric: &[f64]) -> f64 {
    assert_eq!(analytic.len(), numeric.len());
    let (mut diff, mut na, mut nn) = (0f64, 0f64, 0f64);
    for (&a, &n) in analytic.iter().zip(numeric) {
        diff += (a as f64 - n).powi(2);
        na += (a as f64).powi(2);
        nn += n * n;
    }
    diff.sqrt() / na.sqrt().max(nn.sqrt()).max(1e-2)
}

/// Relative errors of the analytic gradients of `loss = sum(out * r)` (r fixed and random)
/// against central differences with step `eps`: one entry for the input, then one per param.
fn grad_check<M: GradChecked>(m: &mut M, x: &Mat, eps: f32, seed: u64) -> Vec<(String, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let out = m.fwd(x).unwrap();
    let r = random_mat(out.rows, out.cols, &mut rng);
    let loss = |m: &mut M, x: &Mat| -> f64 {
        let y = m.fwd(x).unwrap();
        y.data
            .iter()
            .zip(&r.data)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };

    m.params().into_iter().for_each(Param::zero_grad);
    m.fwd(x).unwrap();
    let grad_x = m.bwd(&r).unwrap();
    assert_eq!(grad_x.shape(), x.shape());
    let analytic: Vec<(String, Vec<f32>)> = m
        .params()
        .into_iter()
        .map(|p| (p.name.clone(), p.grad.clone()))
        .collect();

    let mut report = Vec::new();
    let mut xs = x.clone();
    let numeric_x: Vec<f64> = (0..x.data.len())
        .map(|k| {
            let orig = xs.data[k];
            xs.data[k] = orig + eps;
            let (hi, lp) = (xs.data[k], loss(m, &xs));
            xs.data[k] = orig - eps;
            let (lo, lm) = (xs.data[k], loss(m, &xs));
            xs.data[k] = orig;
            (lp - lm) / (hi as f64 - lo as f64)
        })
        .collect();
    report.push(("input".to_string(), rel_err(&grad_x.data, &numeric_x)));

    for (pi, (name, grad)) in analytic.iter().enumerate() {
        let numeric: Vec<f64> = (0..grad.len())
            .map(|k| {
                let orig = m.params()[pi].value[k];
                m.params()[pi].value[k] = orig + eps;
                let (hi, lp) = (m.params()[pi].value[k], loss(m, x));
                m.params()[pi].value[k] = orig - eps;
                let (lo, lm) = (m.params()[pi].value[k], loss(m, x));
                m.params()[pi].value[k] = orig;
                (lp - lm) / (hi as f64 - lo as f64)
            })
            .collect();
        report.push((name.clone(), rel_err(grad, &numeric)));
    }
    report
}

const TOL: f64 = 5e-3;

fn assert_grads_ok<M: GradChecked>(
    what: &str,
    m: &mut M,
    x: &Mat,
    eps: f32,
    expect_tensors: usize,
) {
    let report = grad_check(m, x, eps, 7);
    assert_eq!(report.len(), expect_tensors, "{what}: {report:?}");
    for (name, err) in &report {
        assert!(
            *err < TOL,
            "{what}: gradient of `{name}` off by relative error {err:.2e} (all: {report:?})"
        );
    }
}

/// Inputs whose magnitudes stay above 0.2, so that a step of 1e-2 never crosses a ReLU kink.
fn away_from_zero(rows: usize, cols: usize, rng: &mut StdRng) -> Mat {
    let data = (0..rows * cols)
        .map(|_| {
            let m: f32 = rng.random_range(0.2..1.0);
            if rng.random_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect();
    Mat::from_vec(data, rows, cols).unwrap()
}

fn randomize_affine(bn: &mut BatchNorm1d, rng: &mut StdRng) {
    for p in bn.params_mut() {
        p.value.iter_mut().for_each(|v| {
            *v = rng.random_range(0.5..1.5) * if rng.random_bool(0.5) { 1.0 } else { -1.0 }
        });
    }
}

// ---------------------------------------------------------------- gradient checks

#[test]
fn grad_check_detects_wrong_gradients() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = random_mat(6, 5, &mut rng);
    let correct = Linear::new(5, 3, true, &mut rng).unwrap();

    let mut ok = Broken {
        inner: correct.clone(),
        input_scale: 1.0,
        drop_bias_grad: false,
    };
    assert!(grad_check(&mut ok, &x, 1e-2, 3)
        .iter()
        .all(|(_, e)| *e < TOL));

    let mut scaled = Broken {
        inner: correct.clone(),
        input_scale: 1.03,
        drop_bias_grad: false,
    };
    let report = grad_check(&mut scaled, &x, 1e-2, 3);
    assert!(
        report[0].1 > TOL,
        "a 3% wrong input gradient went unnoticed: {report:?}"
    );

    let mut no_bias = Broken {
        inner: correct,
        input_scale: 1.0,
        drop_bias_grad: true,
    };
    let report = grad_check(&mut no_bias, &x, 1e-2, 3);
    assert_eq!(report[2].0, "bias");
    assert!(
        report[2].1 > TOL,
        "a missing bias gradient went unnoticed: {report:?}"
    );
}

#[test]
fn linear_gradients() {
    let mut rng = StdRng::seed_from_u64(2);
    let x = random_mat(6, 5, &mut rng);
    let mut with_bias = Linear::new(5, 4, true, &mut rng).unwrap();
    assert_grads_ok("Linear with bias", &mut with_bias, &x, 1e-2, 3);
    let mut no_bias = Linear::new(5, 4, false, &mut rng).unwrap();
    assert_grads_ok("Linear without bias", &mut no_bias, &x, 1e-2, 2);
}

#[test]
fn relu_gradients_away_from_kinks() {
    let mut rng = StdRng::seed_from_u64(3);
    let x = away_from_zero(6, 5, &mut rng);
    assert_grads_ok("ReLU", &mut Relu::new(), &x, 1e-2, 1);
}

#[test]
fn batchnorm_gradients_train_mode() {
    let mut rng = StdRng::seed_from_u64(4);
    let x = random_mat(7, 4, &mut rng);
    let mut bn = BatchNorm1d::new(4, true).unwrap();
    randomize_affine(&mut bn, &mut rng);
    assert_grads_ok("BatchNorm1d train affine", &mut bn, &x, 1e-2, 3);
    let mut plain = BatchNorm1d::new(4, false).unwrap();
    assert_grads_ok("BatchNorm1d train", &mut plain, &x, 1e-2, 1);
}

#[test]
fn batchnorm_gradients_eval_mode() {
    let mut rng = StdRng::seed_from_u64(5);
    let x = random_mat(5, 4, &mut rng);
    let mut bn = BatchNorm1d::new(4, true).unwrap();
    randomize_affine(&mut bn, &mut rng);
    bn.running_mean.value = vec![0.3, -0.2, 0.1, 0.0];
    bn.running_var.value = vec![0.5, 2.0, 1.3, 0.8];
    bn.set_train(false);
    assert_grads_ok("BatchNorm1d eval affine", &mut bn, &x, 1e-2, 3);
    // Eval mode leaves the running statistics alone.
    assert_eq!(bn.running_mean.value, vec![0.3, -0.2, 0.1, 0.0]);
}

/// The smallest |ReLU input| when `layers` run on `x` in the given mode.
fn relu_margin<'a>(layers: impl IntoIterator<Item = &'a Layer>, x: &Mat, train: bool) -> f32 {
    let mut h = x.clone();
    let mut margin = f32::INFINITY;
    for layer in layers {
        let mut layer = layer.clone();
        match &mut layer {
            Layer::BatchNorm(bn) => bn.set_train(train),
            Layer::Relu(_) => margin = h.data.iter().fold(margin, |m, v| m.min(v.abs())),
            Layer::Linear(_) => {}
        }
        h = layer.forward(&h).unwrap();
    }
    margin
}

/// A random input whose ReLU inputs all stay at least 0.02 from the kink, so that steps of
/// 1e-3 in the input or a weight do not cross it (a crossing breaks finite differences, not
/// the analytic gradient).
fn clear_of_kinks<'a>(
    layers: impl IntoIterator<Item = &'a Layer> + Clone,
    shape: [usize; 2],
    train: bool,
    rng: &mut StdRng,
) -> Mat {
    for _ in 0..1000 {
        let x = random_mat(shape[0], shape[1], rng);
        if relu_margin(layers.clone(), &x, train) > 0.02 {
            return x;
        }
    }
    panic!("no input clear of ReLU kinks in 1000 tries");
}

#[test]
fn mlp_gradients() {
    let mut rng = StdRng::seed_from_u64(6);

    let plain = Mlp::new(&MlpSpec::new(&[5, 7, 6, 3]), 11).unwrap();
    let x = clear_of_kinks(plain.layers(), [8, 5], true, &mut rng);
    assert_grads_ok("plain MLP", &mut MlpIn(plain, true), &x, 1e-3, 7);

    let mut bn_mlp = Mlp::new(&MlpSpec::backbone(&[5, 7, 4]), 12).unwrap();
    for layer in bn_mlp.layers_mut() {
        if let Layer::BatchNorm(bn) = layer {
            randomize_affine(bn, &mut rng);
        }
    }
    let x = clear_of_kinks(bn_mlp.layers(), [8, 5], true, &mut rng);
    // 0.weight 1.weight 1.bias 3.weight 4.weight 4.bias, plus the input.
    assert_grads_ok(
        "BN MLP train",
        &mut MlpIn(bn_mlp.clone(), true),
        &x,
        1e-3,
        7,
    );

    // Eval mode after a few train steps gave it running statistics.
    let mut eval = bn_mlp;
    for _ in 0..3 {
        eval.forward(&random_mat(8, 5, &mut rng), true).unwrap();
    }
    let x = clear_of_kinks(eval.layers(), [8, 5], false, &mut rng);
    assert_grads_ok("BN MLP eval", &mut MlpIn(eval, false), &x, 1e-3, 7);
}

#[test]
fn encoder_gradients() {
    let mut rng = StdRng::seed_from_u64(8);
    let simclr = Encoder::simclr(&MlpSpec::backbone(&[6, 8, 5]), 7, 3, 21).unwrap();
    let layers = simclr.backbone.layers().iter().chain(simclr.head.layers());
    let x = clear_of_kinks(layers, [8, 6], true, &mut rng);
    // backbone: 0.w 1.w 1.b 3.w 4.w 4.b; head: 0.w 1.w 1.b 3.w 3.b; plus the input.
    assert_grads_ok("SimCLR encoder", &mut EncoderIn(simclr, true), &x, 1e-3, 12);

    let moco = Encoder::moco_v2(&MlpSpec::backbone(&[6, 8, 5]), 7, 3, 22).unwrap();
    let layers = moco.backbone.layers().iter().chain(moco.head.layers());
    let x = clear_of_kinks(layers, [8, 6], true, &mut rng);
    assert_grads_ok("MoCo v2 encoder", &mut EncoderIn(moco, true), &x, 1e-3, 11);
}

#[test]
fn backward_accumulates_param_grads() {
    let mut rng = StdRng::seed_from_u64(9);
    let x = random_mat(4, 3, &mut rng);
    let g = random_mat(4, 2, &mut rng);
    let mut lin = Linear::new(3, 2, true, &mut rng).unwrap();
    lin.forward(&x).unwrap();
    lin.backward(&g).unwrap();
    let once: Vec<Vec<f32>> = lin.params().iter().map(|p| p.grad.clone()).collect();
    lin.backward(&g).unwrap();
    for (p, g1) in lin.params().iter().zip(&once) {
        for (a, b) in p.grad.iter().zip(g1) {
            assert!((a - 2.0 * b).abs() < 1e-6);
        }
    }
    lin.params_mut().into_iter().for_each(Param::zero_grad);
    assert!(lin
        .params()
        .iter()
        .all(|p| p.grad.iter().all(|&v| v == 0.0)));
}

// ---------------------------------------------------------------- forward values

#[test]
fn mat_products_match_naive_loops() {
    let mut rng = StdRng::seed_from_u64(10);
    let a = random_mat(3, 4, &mut rng);
    let b = random_mat(4, 5, &mut rng);
    let c = random_mat(6, 4, &mut rng);
    let d = random_mat(3, 2, &mut rng);
    let naive = |rows: usize, cols: usize, inner: usize, f: &dyn Fn(usize, usize, usize) -> f32| {
        let mut m = Mat::zeros(rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                m.data[i * cols + j] = (0..inner).map(|k| f(i, j, k)).sum();
            }
        }
        m
    };
    let close = |x: &Mat, y: &Mat| {
        assert_eq!(x.shape(), y.shape());
        x.data
            .iter()
            .zip(&y.data)
            .all(|(p, q)| (p - q).abs() < 1e-5)
    };
    let ab = naive(3, 5, 4, &|i, j, k| a.row(i)[k] * b.row(k)[j]);
    assert!(close(&a.matmul(&b).unwrap(), &ab));
    let act = naive(3, 6, 4, &|i, j, k| a.row(i)[k] * c.row(j)[k]);
    assert!(close(&a.matmul_t(&c).unwrap(), &act));
    let atd = naive(4, 2, 3, &|i, j, k| a.row(k)[i] * d.row(k)[j]);
    assert!(close(&a.t_matmul(&d).unwrap(), &atd));
    assert!(a.matmul(&c).is_err());
    assert!(a.matmul_t(&b).is_err());
    assert!(a.t_matmul(&b).is_err());
}

#[test]
fn linear_forward_and_init() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut lin = Linear::new(16, 3, true, &mut rng).unwrap();
    let bound = 1.0 / 4.0;
    for p in lin.params() {
        assert!(p.value.iter().all(|v| v.abs() <= bound));
        // Uniform over [-bound, bound]: the samples spread over most of it.
        let max = p.value.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max > 0.5 * bound, "{}: max {max}", p.name);
    }
    assert_eq!(lin.weight.shape, vec![3, 16]);
    assert!(lin.weight.decay && !lin.bias.as_ref().unwrap().decay);
    let again = Linear::new(16, 3, true, &mut StdRng::seed_from_u64(11)).unwrap();
    assert_eq!(again.weight.value, lin.weight.value);

    let x = random_mat(2, 16, &mut rng);
    let y = lin.forward(&x).unwrap();
    for i in 0..2 {
        for o in 0..3 {
            let want: f32 = lin.bias.as_ref().unwrap().value[o]
                + (0..16)
                    .map(|k| x.row(i)[k] * lin.weight.value[o * 16 + k])
                    .sum::<f32>();
            assert!((y.row(i)[o] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn batchnorm_running_stats_follow_pytorch() {
    // PyTorch: running = (1 - momentum) * running + momentum * stat, with the unbiased
    // variance; the output uses the biased one.
    let xs = [
        vec![1.0f32, 2.0, 3.0, 4.0, 10.0, -2.0],
        vec![0.5f32, -1.0, 2.5, 0.0, 4.0, 4.0],
    ];
    let mut bn = BatchNorm1d::new(2, true).unwrap();
    let (mut rm, mut rv) = ([0f64; 2], [1f64; 2]);
    for data in &xs {
        let x = Mat::from_vec(data.clone(), 3, 2).unwrap();
        let y = bn.forward(&x).unwrap();
        for j in 0..2 {
            let col: Vec<f64> = (0..3).map(|i| data[i * 2 + j] as f64).collect();
            let mean = col.iter().sum::<f64>() / 3.0;
            let ss: f64 = col.iter().map(|v| (v - mean).powi(2)).sum();
            rm[j] = 0.9 * rm[j] + 0.1 * mean;
            rv[j] = 0.9 * rv[j] + 0.1 * ss / 2.0;
            for (i, v) in col.iter().enumerate() {
                let want = (v - mean) / (ss / 3.0 + 1e-5).sqrt();
                assert!((y.row(i)[j] as f64 - want).abs() < 1e-5);
            }
            assert!((bn.running_mean.value[j] as f64 - rm[j]).abs() < 1e-6);
            assert!((bn.running_var.value[j] as f64 - rv[j]).abs() < 1e-5);
        }
    }
    // Eval mode normalises with the running statistics, even a single row.
    bn.set_train(false);
    bn.weight.as_mut().unwrap().value = vec![2.0, 0.5];
    bn.bias.as_mut().unwrap().value = vec![1.0, -1.0];
    let x = Mat::from_vec(vec![0.7, -0.3], 1, 2).unwrap();
    let y = bn.forward(&x).unwrap();
    let (gamma, beta) = ([2.0, 0.5], [1.0, -1.0]);
    for j in 0..2 {
        let want = gamma[j] * (x.data[j] as f64 - rm[j]) / (rv[j] + 1e-5).sqrt() + beta[j];
        assert!((y.data[j] as f64 - want).abs() < 1e-5);
    }
    assert_eq!(bn.infer(&x).unwrap(), y);
}

#[test]
fn mlp_layouts_names_and_decay_flags() {
    let kinds = |m: &Mlp| -> String {
        m.layers()
            .iter()
            .map(|l| match l {
                Layer::Linear(_) => 'L',
                Layer::BatchNorm(_) => 'B',
                Layer::Relu(_) => 'R',
            })
            .collect()
    };
    let sim = Mlp::new(&MlpSpec::simclr_head(8, 8, 4), 0).unwrap();
    assert_eq!(kinds(&sim), "LBRL");
    let moco = Mlp::new(&MlpSpec::moco_v2_head(8, 8, 4), 0).unwrap();
    assert_eq!(kinds(&moco), "LRL");
    let bb = Mlp::new(&MlpSpec::backbone(&[4, 8, 8]), 0).unwrap();
    assert_eq!(kinds(&bb), "LBRLBR");
    let mut spec = MlpSpec::new(&[4, 8, 2]);
    spec.output_norm = Norm::BatchNormNoAffine;
    spec.output_bias = false;
    let out_bn = Mlp::new(&spec, 0).unwrap();
    assert_eq!(kinds(&out_bn), "LRLB");
    assert_eq!(out_bn.params().len(), 3);
    assert_eq!(out_bn.buffers().len(), 2);

    let enc = Encoder::simclr(&MlpSpec::backbone(&[4, 8]), 6, 3, 0).unwrap();
    let names: Vec<(&str, bool)> = enc
        .params()
        .iter()
        .map(|p| (p.name.as_str(), p.decay))
        .collect();
    assert_eq!(
        names,
        [
            ("backbone.0.weight", true),
            ("backbone.1.weight", false),
            ("backbone.1.bias", false),
            ("head.0.weight", true),
            ("head.1.weight", false),
            ("head.1.bias", false),
            ("head.3.weight", true),
            ("head.3.bias", false),
        ]
    );
    let buffers: Vec<&str> = enc.buffers().iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        buffers,
        [
            "backbone.1.running_mean",
            "backbone.1.running_var",
            "head.1.running_mean",
            "head.1.running_var",
        ]
    );
    assert_eq!(
        (enc.in_features(), enc.feature_dim(), enc.out_dim()),
        (4, 8, 3)
    );
    assert_eq!(
        enc.num_params(),
        enc.params().iter().map(|p| p.len()).sum::<usize>()
    );
}

#[test]
fn features_use_eval_mode_and_change_nothing() {
    let mut rng = StdRng::seed_from_u64(12);
    let mut enc = Encoder::moco_v2(&MlpSpec::backbone(&[5, 6]), 6, 2, 3).unwrap();
    for _ in 0..2 {
        enc.forward(&random_mat(4, 5, &mut rng), true).unwrap();
    }
    let buffers = enc.flat_buffers();
    let x = random_mat(3, 5, &mut rng);
    let f = enc.features(&x).unwrap();
    assert_eq!(enc.flat_buffers(), buffers);
    assert_eq!(f, enc.backbone.infer(&x).unwrap());
    // Same thing through the caching path in eval mode.
    assert_eq!(f, enc.backbone.forward(&x, false).unwrap());
    assert!(f.data.iter().all(|&v| v >= 0.0), "backbone ends in a ReLU");
    let z = enc.forward(&x, false).unwrap();
    assert_eq!(z, enc.infer(&x).unwrap());
    assert_eq!(enc.flat_buffers(), buffers);
}

#[test]
fn flat_views_and_momentum_update() {
    let spec = MlpSpec::backbone(&[4, 6, 5]);
    let mut query = Encoder::moco_v2(&spec, 5, 3, 1).unwrap();
    let mut key = Encoder::moco_v2(&spec, 5, 3, 2).unwrap();
    let (q, k) = (query.flat_params(), key.flat_params());
    assert_eq!(q.len(), query.num_params());
    assert_ne!(q, k);

    key.momentum_update_from(&query, 0.9).unwrap();
    for ((a, &qv), &kv) in key.flat_params().iter().zip(&q).zip(&k) {
        assert!((a - (0.9 * kv + 0.1 * qv)).abs() < 1e-6);
    }
    key.momentum_update_from(&query, 0.0).unwrap();
    assert_eq!(key.flat_params(), q);

    let mut copy = Encoder::moco_v2(&spec, 5, 3, 3).unwrap();
    copy.load_flat(&q).unwrap();
    assert_eq!(copy.flat_params(), q);

    query
        .forward(
            &Mat::from_vec((0..12).map(|i| i as f32).collect(), 3, 4).unwrap(),
            true,
        )
        .unwrap();
    assert_ne!(copy.flat_buffers(), query.flat_buffers());
    copy.copy_buffers_from(&query).unwrap();
    assert_eq!(copy.flat_buffers(), query.flat_buffers());
    let zeros = vec![0.0; copy.flat_buffers().len()];
    copy.load_flat_buffers(&zeros).unwrap();
    assert_eq!(copy.flat_buffers(), zeros);

    // The same on bare MLPs.
    let mut a = Mlp::new(&spec, 5).unwrap();
    let b = Mlp::new(&spec, 6).unwrap();
    a.momentum_update_from(&b, 0.5).unwrap();
    a.load_flat(&b.flat_params()).unwrap();
    assert_eq!(a.flat_params(), b.flat_params());
    a.copy_buffers_from(&b).unwrap();
}

// ---------------------------------------------------------------- optimizers

fn two_params() -> (Param, Param) {
    let w = Param::new("w", vec![2], vec![1.0, -2.0], true).unwrap();
    let b = Param::new("b", vec![1], vec![1.0], false).unwrap();
    (w, b)
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "got {got:?}, want {want:?}");
    }
}

#[test]
fn sgd_momentum_weight_decay_two_steps() {
    let (mut w, mut b) = two_params();
    let mut opt = Sgd::new(0.9, 0.1, false).unwrap();
    for _ in 0..2 {
        w.grad = vec![0.5, 0.25];
        b.grad = vec![1.0];
        opt.step(&mut [&mut w, &mut b], 0.5).unwrap();
    }
    // w0: g = 0.5 + 0.1 * 1 = 0.6, buf 0.6, w 0.7; g = 0.57, buf 1.11, w 0.145.
    // w1: g = 0.05, w -2.025; g = 0.0475, buf 0.0925, w -2.07125.
    // b (no decay): buf 1, b 0.5; buf 1.9, b -0.45.
    close(&w.value, &[0.145, -2.07125]);
    close(&b.value, &[-0.45]);

    let (mut w, _) = two_params();
    let mut nesterov = Sgd::new(0.9, 0.1, true).unwrap();
    for _ in 0..2 {
        w.grad = vec![0.5, 0.25];
        nesterov.step(&mut [&mut w], 0.5).unwrap();
    }
    // g 0.6, buf 0.6, step 1.14 -> 0.43; g 0.543, buf 1.083, step 1.5177 -> -0.32885.
    close(&w.value[..1], &[-0.32885]);
}

#[test]
fn adamw_first_step_is_bias_corrected() {
    let mut w = Param::new("w", vec![3], vec![2.0, 2.0, 2.0], true).unwrap();
    let mut b = Param::new("b", vec![1], vec![2.0], false).unwrap();
    let mut opt = AdamW::new(0.5).unwrap();
    w.grad = vec![0.3, -1e-3, 50.0];
    b.grad = vec![0.3];
    opt.step(&mut [&mut w, &mut b], 0.1).unwrap();
    // m_hat = g and v_hat = g^2: the step is lr * sign(g) whatever |g|; decay 1 - 0.1 * 0.5.
    close(&w.value, &[1.8, 2.0, 1.8]);
    close(&b.value, &[1.9]);
    // A constant gradient keeps giving steps of lr.
    w.grad = vec![0.3, -1e-3, 50.0];
    b.grad = vec![0.3];
    opt.step(&mut [&mut w, &mut b], 0.1).unwrap();
    close(&w.value, &[1.8 * 0.95 - 0.1, 1.9 + 0.1, 1.8 * 0.95 - 0.1]);
    close(&b.value, &[1.8]);
    assert_eq!(opt.steps(), 2);
}

#[test]
fn lars_adapts_only_decayed_params() {
    let mut w = Param::new("w", vec![2], vec![3.0, 4.0], true).unwrap();
    let mut b = Param::new("b", vec![2], vec![3.0, 4.0], false).unwrap();
    let mut opt = Lars::new(0.9, 0.1).unwrap();
    w.grad = vec![0.6, 0.8];
    b.grad = vec![0.6, 0.8];
    opt.step(&mut [&mut w, &mut b], 2.0).unwrap();
    // w: g = grad + 0.1 w = (0.9, 1.2), |g| = 1.5, |w| = 5, ratio 0.001 * 5 / 1.5;
    // step = 2 * ratio * g = (0.006, 0.008).
    close(&w.value, &[2.994, 3.992]);
    // b: neither decay nor adaptation: step = lr * grad.
    close(&b.value, &[1.8, 2.4]);
    b.grad = vec![0.6, 0.8];
    w.grad = vec![0.0, 0.0];
    w.value = vec![0.0, 0.0];
    opt.step(&mut [&mut w, &mut b], 2.0).unwrap();
    // Momentum: v = 0.9 * (1.2, 1.6) + (1.2, 1.6).
    close(&b.value, &[1.8 - 2.28, 2.4 - 3.04]);
    // Zero weight and gradient: ratio 1, and w only moves by its momentum 0.9 * (0.006, 0.008).
    close(&w.value, &[-0.0054, -0.0072]);
}

#[test]
fn optimizer_errors() {
    assert!(Sgd::new(0.0, 0.0, true).is_err());
    assert!(Sgd::new(1.0, 0.0, false).is_err());
    assert!(Sgd::new(0.9, -1.0, false).is_err());
    assert!(Lars::with_trust_coefficient(0.9, 0.0, 0.0).is_err());
    assert!(AdamW::with_betas(0.9, 1.0, 1e-8, 0.0).is_err());
    assert!(AdamW::with_betas(0.9, 0.999, 0.0, 0.0).is_err());

    let (mut w, mut b) = two_params();
    let mut opt = Sgd::new(0.9, 0.0, false).unwrap();
    assert!(opt.step(&mut [&mut w], f32::NAN).is_err());
    opt.step(&mut [&mut w], 0.1).unwrap();
    // Another parameter list than the first step's.
    assert!(opt.step(&mut [&mut w, &mut b], 0.1).is_err());
    assert!(opt.step(&mut [&mut b], 0.1).is_err());
    w.grad.pop();
    assert!(opt.step(&mut [&mut w], 0.1).is_err());
}

// ---------------------------------------------------------------- schedule

#[test]
fn cosine_schedule_with_warmup() {
    let lr = |s| lr_at(s, 100, 10, 1.0, 0.0);
    assert!((lr(0) - 0.1).abs() < 1e-6);
    assert!((lr(4) - 0.5).abs() < 1e-6);
    assert!((lr(9) - 1.0).abs() < 1e-6);
    assert!((lr(10) - 1.0).abs() < 1e-6);
    assert!((lr(55) - 0.5).abs() < 1e-6);
    assert_eq!(lr(100), 0.0);
    assert_eq!(lr(1000), 0.0);
    for s in 10..100 {
        assert!(lr(s + 1) <= lr(s));
    }
    assert!((lr_at(0, 50, 0, 0.3, 0.01) - 0.3).abs() < 1e-7);
    assert!((lr_at(50, 50, 0, 0.3, 0.01) - 0.01).abs() < 1e-7);
    assert!((lr_at(49, 50, 0, 0.3, 0.01) - 0.01).abs() < 1e-3);
    // Warm-up as long as the run: linear up, then the final rate.
    assert!((lr_at(4, 5, 5, 1.0, 0.0) - 1.0).abs() < 1e-7);
    assert_eq!(lr_at(5, 5, 5, 1.0, 0.2), 0.2);
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_is_an_error() {
    let mut rng = StdRng::seed_from_u64(13);
    assert!(Mat::from_vec(vec![0.0; 5], 2, 3).is_err());
    assert!(Param::new("p", vec![2, 2], vec![0.0; 3], true).is_err());
    assert!(Linear::new(0, 3, true, &mut rng).is_err());
    assert!(BatchNorm1d::new(0, true).is_err());

    let mut lin = Linear::new(3, 2, true, &mut rng).unwrap();
    assert!(
        lin.backward(&Mat::zeros(4, 2)).is_err(),
        "backward before forward"
    );
    let err = lin.forward(&Mat::zeros(4, 5)).unwrap_err();
    assert!(err.to_string().contains("Linear::forward"), "{err}");
    assert!(lin.forward(&Mat::zeros(0, 3)).is_err());
    lin.forward(&Mat::zeros(4, 3)).unwrap();
    assert!(lin.backward(&Mat::zeros(5, 2)).is_err());
    assert!(lin.backward(&Mat::zeros(4, 3)).is_err());
    let mut bad = Mat::zeros(4, 3);
    bad.data.pop();
    assert!(lin.forward(&bad).is_err());
    lin.weight.value.pop();
    assert!(lin.forward(&Mat::zeros(4, 3)).is_err());

    let mut relu = Relu::new();
    assert!(relu.backward(&Mat::zeros(2, 2)).is_err());
    relu.forward(&Mat::zeros(2, 2)).unwrap();
    assert!(relu.backward(&Mat::zeros(2, 3)).is_err());

    let mut bn = BatchNorm1d::new(3, true).unwrap();
    let err = bn.forward(&Mat::zeros(1, 3)).unwrap_err();
    assert!(err.to_string().contains("batch of 1"), "{err}");
    assert!(bn.forward(&Mat::zeros(4, 2)).is_err());
    bn.set_train(false);
    bn.forward(&Mat::zeros(1, 3)).unwrap();
    bn.running_var.value.pop();
    assert!(bn.forward(&Mat::zeros(2, 3)).is_err());
    let mut bn = BatchNorm1d::new(3, false).unwrap();
    bn.momentum = 2.0;
    assert!(bn.forward(&Mat::zeros(2, 3)).is_err());

    assert!(Mlp::new(&MlpSpec::new(&[3]), 0).is_err());
    assert!(Mlp::new(&MlpSpec::new(&[3, 0, 2]), 0).is_err());
    let mut mlp = Mlp::new(&MlpSpec::backbone(&[3, 4]), 0).unwrap();
    assert!(
        mlp.forward(&Mat::zeros(1, 3), true).is_err(),
        "BatchNorm batch of 1"
    );
    assert!(mlp.forward(&Mat::zeros(2, 4), true).is_err());
    assert!(mlp.load_flat(&[0.0; 3]).is_err());
    assert!(mlp.load_flat_buffers(&[0.0; 3]).is_err());
    let other = Mlp::new(&MlpSpec::backbone(&[3, 5]), 0).unwrap();
    assert!(mlp.momentum_update_from(&other, 0.9).is_err());
    assert!(mlp.copy_buffers_from(&other).is_err());
    let twin = mlp.clone();
    assert!(mlp.momentum_update_from(&twin, 1.5).is_err());

    let err = Encoder::new(&MlpSpec::new(&[3, 4]), &MlpSpec::new(&[5, 2]), 0).unwrap_err();
    assert!(err.to_string().contains("Encoder::new"), "{err}");
    let mut enc = Encoder::simclr(&MlpSpec::backbone(&[3, 4]), 4, 2, 0).unwrap();
    assert!(enc.features(&Mat::zeros(2, 4)).is_err());
    assert!(
        enc.backward(&Mat::zeros(2, 2)).is_err(),
        "backward before forward"
    );
    enc.forward(&Mat::zeros(2, 3), true).unwrap();
    assert!(enc.backward(&Mat::zeros(2, 3)).is_err());
    let other = Encoder::moco_v2(&MlpSpec::backbone(&[3, 4]), 4, 2, 0).unwrap();
    assert!(enc.momentum_update_from(&other, 0.9).is_err());
}
