//! The training loops of SimCLR, MoCo v2 and SupCon over the crate's encoder and loss ops.
//!
//! Everything a step computes runs on the configured device: the encoder's forward and backward
//! passes ([`ResidentEncoder`]: GEMMs through cuBLAS on `cuda`, bias / ReLU / BatchNorm as our
//! kernels; the same kernels interpreted on `interp`; the CPU layers on `cpu`), the loss
//! (NT-Xent, MoCo, SupCon), the optimizer step and, for MoCo, the key encoder's forward pass,
//! the momentum update and the queue enqueue. The parameters, their gradients, the optimizer's
//! state and the BatchNorm statistics stay on the device: a step copies the augmented batch in
//! and the loss out, and the host copy of the encoder is made for the monitor's evaluations and
//! at the end.
//!
//! One step:
//! - SimCLR: a batch of N images, two augmented views (rows `i` and `i + N`), one forward pass
//!   of the 2N rows, NT-Xent, backward, optimizer step.
//! - MoCo v2: the key encoder is first moved towards the query encoder
//!   (`theta_k = m theta_k + (1 - m) theta_q`, [`crate::momentum_update`] on each parameter
//!   where it lives); the keys of view 2 come from the key encoder (no gradient), the queries of view 1
//!   from the query encoder, the loss is [`crate::moco()`] against the queue, then the keys are
//!   enqueued ([`crate::moco_enqueue`]). With `moco_symmetric` the swapped pair (queries of
//!   view 2, keys of view 1) is added and the loss is the mean of the two. The key encoder keeps
//!   its own BatchNorm running statistics. Shuffled BatchNorm is not implemented: it exists to
//!   stop a multi-GPU model from reading the positive out of per-GPU batch statistics, and here
//!   the query and key batches each hold every image of the step on one device.
//! - SupCon: V views per image, the labels of the batch, [`crate::supcon()`] on the
//!   `N x V x D` projections.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::augment::Augment;
use super::config::{apply_augment, DataSet, Method, OptimizerKind, TrainConfig};
use super::eval::{knn_accuracy, probe_accuracy, ProbeOptions};
use super::split::{derive_seed, labels_per_class};
use crate::data::Dataset;
use crate::nn::{lr_at, AdamW, Encoder, Lars, Mat, MlpSpec, Optimizer, ResidentEncoder, Sgd};
use crate::{
    moco_backward, moco_enqueue, moco_forward, ntxent_backward, ntxent_forward, siglip,
    supcon_backward, supcon_forward, Error, Indices, MocoOptions, NtXentOptions, Result,
    SigLipOptions, SupConOptions, Tensor,
};

/// What the training loop reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    /// Training starts: `total_steps` optimizer steps, `steps_per_epoch` per epoch.
    Start {
        total_steps: usize,
        steps_per_epoch: usize,
    },
    /// One optimizer step finished.
    Step(StepRecord),
    /// One epoch finished.
    Epoch(EpochRecord),
}

/// One optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// 0-based step and 1-based epoch.
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f32,
}

/// One epoch's summary.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean loss over the epoch's steps.
    pub loss: f64,
    /// `log(N) - loss` for the InfoNCE losses, N the number of candidates per anchor (SimCLR:
    /// `2B - 1`; MoCo: `K + 1`): a lower bound on the mutual information between the views, in
    /// nats.
    pub mi_bound: Option<f64>,
    /// Accuracies on the monitor split when measured this epoch.
    pub monitor: Option<MonitorPoint>,
    /// Seconds since training started.
    pub seconds: f64,
}

/// The result of [`train`].
#[derive(Clone, Debug)]
pub struct TrainOutput {
    /// The trained encoder (MoCo: the query encoder).
    pub encoder: Encoder,
    pub epochs: Vec<EpochRecord>,
    /// The loss of every step, in order.
    pub step_losses: Vec<f64>,
    /// Accuracies on the monitor split, epoch 0 before training.
    pub monitor_curve: Vec<MonitorPoint>,
    /// `log N` of the InfoNCE bound (None for SupCon).
    pub log_candidates: Option<f64>,
    pub steps: usize,
    pub seconds: f64,
}

/// The encoder of `cfg` for `in_features` inputs: `Linear - BN - ReLU` backbone layers, then
/// SimCLR's head (SimCLR, SupCon) or MoCo v2's (MoCo), weights drawn from `cfg.seed`.
pub fn build_encoder(cfg: &TrainConfig, in_features: usize) -> Result<Encoder> {
    let (backbone, head) = encoder_specs(cfg, in_features);
    Encoder::new(&backbone, &head, cfg.seed)
}

/// The backbone and head specifications of [`build_encoder`].
pub fn encoder_specs(cfg: &TrainConfig, in_features: usize) -> (MlpSpec, MlpSpec) {
    let mut widths = vec![in_features];
    widths.extend_from_slice(&cfg.backbone);
    let feat = *widths.last().unwrap_or(&in_features);
    let backbone = MlpSpec::backbone(&widths);
    let head = match cfg.method {
        Method::Moco => MlpSpec::moco_v2_head(feat, cfg.head_hidden, cfg.head_out),
        Method::SimClr | Method::SupCon | Method::SigLip => {
            MlpSpec::simclr_head(feat, cfg.head_hidden, cfg.head_out)
        }
    };
    (backbone, head)
}

/// The augmentation pipeline for `cfg` on `height x width` images: the defaults of the size
/// (Fashion-MNIST also flips horizontally), then `cfg.augment`.
pub fn augment_for(cfg: &TrainConfig, height: usize, width: usize) -> Result<Augment> {
    let mut aug = Augment::for_size(height, width);
    if cfg.data == DataSet::FashionMnist {
        aug.flip_prob = 0.5;
    }
    apply_augment(&mut aug, &cfg.augment)?;
    aug.validate()?;
    Ok(aug)
}

/// The backbone features of every image of `data` (eval mode), row-major `len x feature_dim`.
pub fn features(encoder: &Encoder, data: &Dataset) -> Result<Vec<f32>> {
    const CHUNK: usize = 2048;
    let dim = data.dim();
    let mut out = Vec::with_capacity(data.len() * encoder.feature_dim());
    for chunk in data.images.chunks(CHUNK * dim) {
        let x = Mat::from_vec(chunk.to_vec(), chunk.len() / dim, dim)?;
        out.extend_from_slice(&encoder.features(&x)?.data);
    }
    Ok(out)
}

/// Cheap accuracies measured during training on a monitor split (reference images with labels,
/// held-out query images).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MonitorPoint {
    /// 0 before training.
    pub epoch: usize,
    /// kNN-1 (cosine) of the queries against all reference images.
    pub knn1: f64,
    /// Linear probe fitted on 10 reference images per class (one draw, seed 0); NaN when a
    /// class has fewer than 10 reference images.
    pub probe_10_per_class: f64,
}

/// kNN-1 and the one-draw 10-labels-per-class probe of `reference_x` (`n x dim`) against
/// `query_x`.
pub fn monitor_scores(
    reference_x: &[f32],
    reference: &Dataset,
    query_x: &[f32],
    queries: &Dataset,
    dim: usize,
) -> Result<(f64, f64)> {
    let knn1 = knn_accuracy(
        reference_x,
        &reference.labels,
        query_x,
        &queries.labels,
        dim,
        1,
    )?;
    let probe = match labels_per_class(&reference.labels, 10, 0) {
        Ok(idx) => {
            let mut x = Vec::with_capacity(idx.len() * dim);
            for &i in &idx {
                x.extend_from_slice(&reference_x[i * dim..(i + 1) * dim]);
            }
            let y: Vec<i64> = idx.iter().map(|&i| reference.labels[i]).collect();
            probe_accuracy(
                &x,
                &y,
                query_x,
                &queries.labels,
                dim,
                reference.classes.max(queries.classes),
                &ProbeOptions::default(),
            )?
        }
        Err(_) => f64::NAN,
    };
    Ok((knn1, probe))
}

/// [`monitor_scores`] of the encoder's features, `monitor` = (reference, queries).
fn monitor_point(
    encoder: &Encoder,
    monitor: (&Dataset, &Dataset),
    epoch: usize,
) -> Result<MonitorPoint> {
    let (reference, queries) = monitor;
    let (knn1, probe_10_per_class) = monitor_scores(
        &features(encoder, reference)?,
        reference,
        &features(encoder, queries)?,
        queries,
        encoder.feature_dim(),
    )?;
    Ok(MonitorPoint {
        epoch,
        knn1,
        probe_10_per_class,
    })
}

fn make_optimizer(cfg: &TrainConfig) -> Result<Box<dyn Optimizer>> {
    Ok(match cfg.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::new(cfg.sgd_momentum, cfg.weight_decay, false)?),
        OptimizerKind::Lars => Box::new(Lars::new(cfg.sgd_momentum, cfg.weight_decay)?),
        OptimizerKind::AdamW => Box::new(AdamW::new(cfg.weight_decay)?),
    })
}

/// Rows `rows` of a row-major matrix of width `dim`.
fn take_rows(data: &[f32], dim: usize, rows: std::ops::Range<usize>) -> Vec<f32> {
    data[rows.start * dim..rows.end * dim].to_vec()
}

/// MoCo's state: the key encoder and the queue, on the training device.
struct MocoState {
    key: ResidentEncoder,
    queue: Tensor,
    ptr: usize,
}

impl MocoState {
    fn new(cfg: &TrainConfig, query: &Encoder) -> Result<Self> {
        let key = ResidentEncoder::new(query.clone(), cfg.device)?;
        // The queue starts as random unit vectors, as in MoCo.
        let dim = query.out_dim();
        let mut rng = StdRng::seed_from_u64(derive_seed(cfg.seed, 0x0E0E));
        let mut q: Vec<f32> = (0..cfg.moco_k * dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        for row in q.chunks_mut(dim) {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= n);
        }
        let queue = Tensor::from_vec(q, &[cfg.moco_k, dim], cfg.device)?;
        Ok(MocoState { key, queue, ptr: 0 })
    }
}

/// One method-specific step: forward, loss, backward (the gradients are accumulated into the
/// encoder's parameters); returns the loss.
struct Stepper<'a> {
    cfg: &'a TrainConfig,
    moco: Option<MocoState>,
    siglip: SigLipScalars,
}

/// SigLIP's learnable `log_scale` and `bias` (the paper's initialization), stepped by their own
/// Adam on the host: two numbers, whose gradients are read with the loss.
struct SigLipScalars {
    values: [f64; 2],
    moments: [(f64, f64); 2],
    steps: i32,
}

impl SigLipScalars {
    /// Adam's step size for the two scalars (they start at ln 10 and -10 and move a few units).
    const LR: f64 = 1e-2;

    fn new() -> Self {
        SigLipScalars {
            values: [SigLipOptions::INIT_LOG_SCALE, SigLipOptions::INIT_BIAS],
            moments: [(0.0, 0.0); 2],
            steps: 0,
        }
    }

    fn step(&mut self, grads: [f64; 2]) {
        const BETAS: (f64, f64) = (0.9, 0.999);
        self.steps += 1;
        for ((value, (m, v)), g) in self.values.iter_mut().zip(&mut self.moments).zip(grads) {
            *m = BETAS.0 * *m + (1.0 - BETAS.0) * g;
            *v = BETAS.1 * *v + (1.0 - BETAS.1) * g * g;
            let m_hat = *m / (1.0 - BETAS.0.powi(self.steps));
            let v_hat = *v / (1.0 - BETAS.1.powi(self.steps));
            *value -= Self::LR * m_hat / (v_hat.sqrt() + 1e-8);
        }
    }
}

impl Stepper<'_> {
    fn step(
        &mut self,
        enc: &mut ResidentEncoder,
        images: &[f32],
        labels: &[i64],
        (h, w): (usize, usize),
        aug: &Augment,
        seed: u64,
    ) -> Result<f64> {
        let cfg = self.cfg;
        let n = labels.len();
        let dim = h * w;
        match cfg.method {
            Method::SimClr => {
                let x = Mat::from_vec(aug.two_views(images, n, h, w, seed)?, 2 * n, dim)?;
                // z and its gradient stay on the device between the encoder and the loss.
                let z = enc.forward(&x, true)?;
                let opts = NtXentOptions {
                    temperature: cfg.temperature,
                };
                let fwd = ntxent_forward(&z, &opts)?;
                let grad = ntxent_backward(&z, &opts, &fwd.saved, 1.0)?;
                enc.backward_params(&grad)?;
                Ok(fwd.loss.to_scalar()?)
            }
            Method::Moco => {
                let st = self
                    .moco
                    .as_mut()
                    .ok_or_else(|| Error::invalid("train", "method", "MoCo state missing"))?;
                st.key.momentum_from(enc, cfg.moco_m)?;
                let views = aug.two_views(images, n, h, w, seed)?;
                // Each view goes to the device once: the symmetric loss reads both twice.
                let x1 = Tensor::from_vec(take_rows(&views, dim, 0..n), &[n, dim], cfg.device)?;
                let x2 = Tensor::from_vec(take_rows(&views, dim, n..2 * n), &[n, dim], cfg.device)?;
                let opts = MocoOptions {
                    temperature: cfg.temperature,
                };
                let pairs: Vec<(&Tensor, &Tensor)> = if cfg.moco_symmetric {
                    vec![(&x1, &x2), (&x2, &x1)]
                } else {
                    vec![(&x1, &x2)]
                };
                let scale = 1.0 / pairs.len() as f64;
                let mut loss = 0.0;
                let mut keys = Vec::with_capacity(pairs.len());
                for (xq, xk) in pairs {
                    let k = st.key.forward_detached(xk, true)?;
                    let q = enc.forward(xq, true)?;
                    let fwd = moco_forward(&q, &k, &st.queue, &opts)?;
                    let grad = moco_backward(&q, &k, &st.queue, &opts, &fwd.saved, scale)?;
                    enc.backward_params(&grad)?;
                    loss += scale * fwd.loss.to_scalar()?;
                    keys.push(k);
                }
                for k in &keys {
                    st.ptr = moco_enqueue(&mut st.queue, k, st.ptr)?;
                }
                Ok(loss)
            }
            Method::SigLip => {
                let x = Mat::from_vec(aug.two_views(images, n, h, w, seed)?, 2 * n, dim)?;
                let z = enc.forward(&x, true)?;
                // The two views' halves of z are the pairs; their gradients join back into z's.
                let (a, b) = split_halves(&z)?;
                let [log_scale, bias] = self.siglip.values;
                let out = siglip(&a, &b, log_scale, bias, &SigLipOptions::default())?;
                enc.backward_params(&join_halves(&out.grad_a, &out.grad_b)?)?;
                let scalar_grads = [out.grad_log_scale.to_scalar()?, out.grad_bias.to_scalar()?];
                self.siglip.step(scalar_grads);
                Ok(out.loss.to_scalar()?)
            }
            Method::SupCon => {
                let v = cfg.views;
                let x = Mat::from_vec(aug.views(images, n, h, w, v, seed)?, v * n, dim)?;
                // View-major rows (j * n + i) to the op's N x V x D layout and back, on the
                // encoder's device.
                let z = enc.forward(&x, true)?;
                let d = z.shape()[1];
                let features = swap_row_blocks(&z, v, n)?.reshape(&[n, v, d])?;
                let opts = SupConOptions {
                    temperature: cfg.temperature,
                    base_temperature: cfg.temperature,
                    ..Default::default()
                };
                // The labels go to the device once for both passes.
                let labels = Indices::new(labels, z.device())?;
                let fwd = supcon_forward(&features, &labels, &opts)?;
                let g = supcon_backward(&features, &labels, &opts, &fwd.saved, 1.0)?;
                let grad = swap_row_blocks(&g.reshape(&[n * v, d])?, n, v)?;
                enc.backward_params(&grad)?;
                Ok(fwd.loss.to_scalar()?)
            }
        }
    }
}

/// The first and second halves of `t`'s rows (f32, `2n x d`), on its device.
fn split_halves(t: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, dim) = (t.shape()[0], t.shape()[1]);
    let (half, len) = (rows / 2, rows / 2 * dim);
    let shape = [half, dim];
    crate::kernels::run_on_kernels!(t.device(), b => {
        let input = crate::ops::upload_f32(b, "t", t)?;
        let (first, second) = crate::kernels::elementwise::split_halves(b, &input)?;
        Ok((
            crate::ops::kernel_output(b, t, first, &shape)?,
            crate::ops::kernel_output(b, t, second, &shape)?,
        ))
    });
    let values = t.to_vec::<f32>()?;
    Ok((
        Tensor::from_vec(values[..len].to_vec(), &shape, t.device())?,
        Tensor::from_vec(values[len..2 * len].to_vec(), &shape, t.device())?,
    ))
}

/// `a`'s rows, then `b`'s (f32, the same shape), on their device.
fn join_halves(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (rows, dim) = (a.shape()[0], a.shape()[1]);
    let shape = [2 * rows, dim];
    crate::kernels::run_on_kernels!(a.device(), k => {
        let (first, second) = (crate::ops::upload_f32(k, "a", a)?, crate::ops::upload_f32(k, "b", b)?);
        let whole = crate::kernels::elementwise::join_halves(k, &first, &second)?;
        crate::ops::kernel_output(k, a, whole, &shape)
    });
    let mut values = a.to_vec::<f32>()?;
    values.extend(b.to_vec::<f32>()?);
    Tensor::from_vec(values, &shape, a.device())
}

/// `t` (f32, `outer * inner` rows) with its row blocks swapped: row `j * outer + i` of the
/// result is row `i * inner + j` of `t`; on a kernel device by a kernel, in place there.
fn swap_row_blocks(t: &Tensor, outer: usize, inner: usize) -> Result<Tensor> {
    let dim = t.shape()[1];
    crate::kernels::run_on_kernels!(t.device(), b => {
        let input = crate::ops::upload_f32(b, "t", t)?;
        let out = crate::kernels::elementwise::swap_row_blocks(b, &input, outer, inner, dim)?;
        crate::ops::kernel_output(b, t, out, t.shape())
    });
    let values = t.to_vec::<f32>()?;
    let mut out = vec![0.0f32; values.len()];
    for i in 0..outer {
        for j in 0..inner {
            let (from, to) = ((i * inner + j) * dim, (j * outer + i) * dim);
            out[to..to + dim].copy_from_slice(&values[from..from + dim]);
        }
    }
    Tensor::from_vec(out, t.shape(), t.device())
}

/// Trains `encoder` on `train` with `cfg`; `monitor` = (reference, queries) is used for the
/// accuracy curves ([`MonitorPoint`]) (before training, every `cfg.eval_every` epochs and after the last one). Calls
/// `on_event` after every step and epoch.
pub fn train(
    cfg: &TrainConfig,
    train: &Dataset,
    monitor: Option<(&Dataset, &Dataset)>,
    encoder: Encoder,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainOutput> {
    cfg.validate()?;
    if train.len() < 2 {
        return Err(Error::invalid(
            "train",
            "train",
            format!("{} training images; need at least 2", train.len()),
        ));
    }
    if encoder.in_features() != train.dim() {
        return Err(Error::invalid(
            "train",
            "encoder",
            format!(
                "takes {} inputs but the images have {} pixels",
                encoder.in_features(),
                train.dim()
            ),
        ));
    }
    let start = Instant::now();
    let batch = cfg.batch.min(train.len());
    let steps_per_epoch = train.len() / batch;
    let planned = steps_per_epoch * cfg.epochs;
    let total_steps = cfg.max_steps.map_or(planned, |m| m.min(planned));
    let warmup = (steps_per_epoch * cfg.warmup_epochs).min(planned.saturating_sub(1));
    let final_lr = cfg.lr * cfg.final_lr_frac;
    let log_candidates = match cfg.method {
        Method::SimClr => Some(((2 * batch - 1) as f64).ln()),
        Method::Moco => Some(((cfg.moco_k + 1) as f64).ln()),
        Method::SupCon | Method::SigLip => None,
    };
    let aug = augment_for(cfg, train.height, train.width)?;
    let mut opt = make_optimizer(cfg)?;
    let mut stepper = Stepper {
        cfg,
        moco: match cfg.method {
            Method::Moco => Some(MocoState::new(cfg, &encoder)?),
            _ => None,
        },
        siglip: SigLipScalars::new(),
    };
    on_event(Event::Start {
        total_steps,
        steps_per_epoch,
    });
    let mut monitor_curve = Vec::new();
    if let Some(m) = monitor {
        monitor_curve.push(monitor_point(&encoder, m, 0)?);
    }
    // From here the encoder lives on the training device.
    let mut encoder = ResidentEncoder::new(encoder, cfg.device)?;
    let dim = train.dim();
    let mut step = 0;
    let mut step_losses = Vec::with_capacity(total_steps);
    let mut epochs = Vec::new();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut images = Vec::with_capacity(batch * dim);
    let mut labels = Vec::with_capacity(batch);
    'epochs: for epoch in 1..=cfg.epochs {
        order.shuffle(&mut StdRng::seed_from_u64(derive_seed(
            cfg.seed,
            epoch as u64,
        )));
        let mut sum = 0.0;
        let mut count = 0;
        for chunk in order.chunks_exact(batch) {
            if step >= total_steps {
                break;
            }
            images.clear();
            labels.clear();
            for &i in chunk {
                images.extend_from_slice(train.image(i));
                labels.push(train.labels[i]);
            }
            let lr = lr_at(step, planned, warmup, cfg.lr, final_lr);
            encoder.zero_grad()?;
            let seed = derive_seed(derive_seed(cfg.seed, 0xA116), step as u64);
            let loss = stepper.step(
                &mut encoder,
                &images,
                &labels,
                (train.height, train.width),
                &aug,
                seed,
            )?;
            if !loss.is_finite() {
                return Err(Error::invalid(
                    "train",
                    "lr",
                    format!("the loss became {loss} at step {step}; lower the learning rate"),
                ));
            }
            encoder.step(&mut *opt, lr)?;
            step_losses.push(loss);
            on_event(Event::Step(StepRecord {
                step,
                epoch,
                loss,
                lr,
            }));
            sum += loss;
            count += 1;
            step += 1;
        }
        if count == 0 {
            break 'epochs;
        }
        let last = epoch == cfg.epochs || step >= total_steps;
        let point = match monitor {
            Some(m) if last || (cfg.eval_every > 0 && epoch % cfg.eval_every == 0) => {
                let p = monitor_point(&encoder.to_encoder()?, m, epoch)?;
                monitor_curve.push(p);
                Some(p)
            }
            _ => None,
        };
        let loss = sum / count as f64;
        let record = EpochRecord {
            epoch,
            loss,
            mi_bound: log_candidates.map(|l| l - loss),
            monitor: point,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_event(Event::Epoch(record.clone()));
        epochs.push(record);
        if last {
            break;
        }
    }
    Ok(TrainOutput {
        encoder: encoder.to_encoder()?,
        epochs,
        step_losses,
        monitor_curve,
        log_candidates,
        steps: step,
        seconds: start.elapsed().as_secs_f64(),
    })
}
