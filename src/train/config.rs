//! What a training run does: the method, the data, the device of the losses and every
//! hyperparameter, with measured per-method / per-data-set defaults ([`TrainConfig::defaults`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde_json::{json, Value};

use super::augment::Augment;
use crate::{Device, Error, Result};

/// The augmentation settings `--aug` can change.
pub const AUGMENT_KEYS: [&str; 12] = [
    "crop_prob",
    "crop_min",
    "crop_max",
    "max_shift",
    "flip_prob",
    "jitter_prob",
    "brightness",
    "contrast",
    "noise_std",
    "erase_prob",
    "erase_min",
    "erase_max",
];

/// Applies `(key, value)` changes (keys of [`AUGMENT_KEYS`]) to `aug`.
pub fn apply_augment(aug: &mut Augment, changes: &[(String, f32)]) -> Result<()> {
    for (key, v) in changes {
        let v = *v;
        match key.as_str() {
            "crop_prob" => aug.crop_prob = v,
            "crop_min" => aug.crop_scale.0 = v,
            "crop_max" => aug.crop_scale.1 = v,
            "max_shift" => {
                if !(v >= 0.0 && v.fract() == 0.0) {
                    return Err(Error::invalid(
                        "augment",
                        "max_shift",
                        format!("{v} is not a whole number of pixels"),
                    ));
                }
                aug.max_shift = v as usize
            }
            "flip_prob" => aug.flip_prob = v,
            "jitter_prob" => aug.jitter_prob = v,
            "brightness" => aug.brightness = v,
            "contrast" => aug.contrast = v,
            "noise_std" => aug.noise_std = v,
            "erase_prob" => aug.erase_prob = v,
            "erase_min" => aug.erase_scale.0 = v,
            "erase_max" => aug.erase_scale.1 = v,
            _ => {
                return Err(Error::invalid(
                    "augment",
                    "key",
                    format!("`{key}` is not one of {}", AUGMENT_KEYS.join(", ")),
                ))
            }
        }
    }
    Ok(())
}

/// Parses `key=value` (one `--aug` entry).
pub fn parse_augment(s: &str) -> Result<(String, f32)> {
    let bad = || {
        Error::invalid(
            "augment",
            "aug",
            format!("`{s}` is not key=value with a number value"),
        )
    };
    let (k, v) = s.split_once('=').ok_or_else(bad)?;
    let v: f32 = v.trim().parse().map_err(|_| bad())?;
    Ok((k.trim().to_string(), v))
}

/// The contrastive method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// SimCLR: two augmented views per image, NT-Xent over the 2N projections.
    SimClr,
    /// MoCo v2: a query encoder, a momentum key encoder and a queue of negative keys.
    Moco,
    /// Supervised contrastive learning: V views per image, positives share the label.
    SupCon,
    /// SigLIP's pairwise sigmoid loss between the two views of each image, with a learnable
    /// logit scale and bias.
    SigLip,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::SimClr, Method::Moco, Method::SupCon, Method::SigLip];

    pub fn name(self) -> &'static str {
        match self {
            Method::SimClr => "simclr",
            Method::Moco => "moco",
            Method::SupCon => "supcon",
            Method::SigLip => "siglip",
        }
    }

    /// Whether the loss is an InfoNCE bound (`log N - loss` bounds the mutual information).
    pub fn is_infonce(self) -> bool {
        matches!(self, Method::SimClr | Method::Moco)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s.trim().to_ascii_lowercase().as_str() {
            "simclr" => Ok(Method::SimClr),
            "moco" | "mocov2" | "moco-v2" => Ok(Method::Moco),
            "supcon" => Ok(Method::SupCon),
            "siglip" => Ok(Method::SigLip),
            _ => Err(Error::invalid(
                "Method::from_str",
                "method",
                format!("`{s}` is not one of simclr, moco, supcon, siglip"),
            )),
        }
    }
}

/// The data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSet {
    /// The embedded UCI digits (8 x 8): 1347 train / 450 held-out images.
    Digits,
    /// Fashion-MNIST from IDX files (28 x 28, 60 000 / 10 000).
    FashionMnist,
    /// MNIST from IDX files (28 x 28, 60 000 / 10 000).
    Mnist,
}

impl DataSet {
    pub fn name(self) -> &'static str {
        match self {
            DataSet::Digits => "digits",
            DataSet::FashionMnist => "fashion-mnist",
            DataSet::Mnist => "mnist",
        }
    }
}

impl fmt::Display for DataSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataSet {
    type Err = Error;
    fn from_str(s: &str) -> Result<DataSet> {
        match s.trim().to_ascii_lowercase().as_str() {
            "digits" => Ok(DataSet::Digits),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" | "fashion" => {
                Ok(DataSet::FashionMnist)
            }
            "mnist" => Ok(DataSet::Mnist),
            _ => Err(Error::invalid(
                "DataSet::from_str",
                "data",
                format!("`{s}` is not one of digits, fashion-mnist, mnist"),
            )),
        }
    }
}

/// The optimizer of the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    /// SGD with momentum (and weight decay on weights).
    Sgd,
    /// LARS (SimCLR's large-batch optimizer).
    Lars,
    /// AdamW (decoupled weight decay).
    AdamW,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Lars => "lars",
            OptimizerKind::AdamW => "adamw",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<OptimizerKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sgd" => Ok(OptimizerKind::Sgd),
            "lars" => Ok(OptimizerKind::Lars),
            "adamw" | "adam" => Ok(OptimizerKind::AdamW),
            _ => Err(Error::invalid(
                "OptimizerKind::from_str",
                "optimizer",
                format!("`{s}` is not one of sgd, lars, adamw"),
            )),
        }
    }
}

/// An f32 setting as the f64 of its shortest decimal form (0.8, not 0.800000011920929).
fn short(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

/// Every setting of a training run. Start from [`TrainConfig::defaults`] and override fields.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub method: Method,
    pub data: DataSet,
    /// Folder of the IDX files (Fashion-MNIST defaults to
    /// [`crate::train::DEFAULT_FASHION_MNIST_DIR`]; MNIST needs one).
    pub data_dir: Option<PathBuf>,
    /// Where the step runs: the encoder's passes, the losses, the MoCo momentum update and the
    /// queue. Evaluation (kNN, linear probe) and the optimizer step run on the CPU.
    pub device: Device,
    pub epochs: usize,
    /// Images per step (each contributes 2, or `views`, augmented rows).
    pub batch: usize,
    /// Stop after this many optimizer steps (for smoke tests and GPU-vs-CPU checks).
    pub max_steps: Option<usize>,
    pub optimizer: OptimizerKind,
    /// Peak learning rate (reached after the warm-up, then cosine decay to `lr * final_lr_frac`).
    pub lr: f32,
    pub final_lr_frac: f32,
    pub warmup_epochs: usize,
    pub weight_decay: f32,
    /// SGD / LARS momentum.
    pub sgd_momentum: f32,
    /// Softmax temperature of the loss.
    pub temperature: f64,
    /// Backbone widths after the input, e.g. `[512, 256]` for `in -> 512 -> 256`; every layer is
    /// `Linear - BatchNorm - ReLU` and the last width is the representation that is evaluated.
    pub backbone: Vec<usize>,
    /// Projection head `feat -> head_hidden -> head_out` (SimCLR / SupCon: with a BatchNorm;
    /// MoCo v2: `Linear - ReLU - Linear`).
    pub head_hidden: usize,
    pub head_out: usize,
    /// MoCo: key-encoder momentum.
    pub moco_m: f64,
    /// MoCo: queue length K.
    pub moco_k: usize,
    /// MoCo: also use the swapped pair (query from view 2, key from view 1), as MoCo v3 does;
    /// both keys are enqueued.
    pub moco_symmetric: bool,
    /// SupCon: views per image.
    pub views: usize,
    /// Changes to the augmentation defaults of the image size ([`crate::train::Augment::for_size`]),
    /// applied in order: `(key, value)` with the keys of [`AUGMENT_KEYS`].
    pub augment: Vec<(String, f32)>,
    /// Seed of the weights, the batch order and the augmentations.
    pub seed: u64,
    /// Train on a stratified subset of this many training images (all when `None`).
    pub train_subset: Option<usize>,
    /// Evaluate on a stratified subset of this many held-out images (all when `None`).
    pub test_subset: Option<usize>,
    /// Monitor kNN-1 accuracy every this many epochs (0: only before and after training).
    pub eval_every: usize,
    /// Seeds of the 10-labels-per-class probe draws.
    pub probe_seeds: Vec<u64>,
}

impl TrainConfig {
    /// The defaults of `method` on `data`, chosen by measured runs on 2 CPU cores (numbers are
    /// the 10-labels-per-class linear probe on the held-out split, mean of 5 draws):
    ///
    /// - every method: backbone `in -> 512 -> 256` (digits) or `784 -> 1024 -> 512` (28 x 28),
    ///   each layer `Linear - BN - ReLU`; a projection head to 128; batch 256; SGD with
    ///   momentum 0.9 and weight decay 1e-4; cosine schedule with linear warm-up (10 epochs on
    ///   digits, 2 on 28 x 28). Digits: 200 epochs at lr 0.5 (400 epochs gain < 0.005).
    ///   28 x 28: 20 epochs at lr 0.1 (0.717 vs 0.703 for lr 0.5 in 4-epoch trials; 40 epochs
    ///   give 0.736 against 20 epochs' 0.735 on Fashion-MNIST, not worth twice the time) and a milder
    ///   crop (80-100 % of the area: 0.715 vs 0.696 for 50-100 % at 10 epochs; erasing matters,
    ///   0.666 without it).
    /// - SimCLR: temperature 0.5, SimCLR's value for small data (0.1: 0.673, 0.2: 0.691, 1.0:
    ///   0.698 on Fashion-MNIST).
    /// - MoCo v2: the MLP head, K = 1024 on digits (fewer than the 1347 training images;
    ///   4096: 0.954) and 8192 on 28 x 28 data, a symmetrized loss (both view orders; 0.939
    ///   without). Adapted to small data: temperature 0.5 instead of the anchor's 0.2 (digits
    ///   0.957 vs 0.943; Fashion-MNIST 0.715 vs 0.706) and m = 0.99 instead of 0.999 (with
    ///   temperature 0.5: 0.957 vs 0.937), since 200 epochs of 5 steps are only 1000 updates.
    /// - SupCon: temperature 0.1, two views.
    pub fn defaults(method: Method, data: DataSet) -> TrainConfig {
        let small = data == DataSet::Digits;
        let mut c = TrainConfig {
            method,
            data,
            data_dir: None,
            device: Device::Cpu,
            epochs: if small { 200 } else { 20 },
            batch: 256,
            max_steps: None,
            optimizer: OptimizerKind::Sgd,
            lr: if small { 0.5 } else { 0.1 },
            final_lr_frac: 0.0,
            warmup_epochs: if small { 10 } else { 2 },
            weight_decay: 1e-4,
            sgd_momentum: 0.9,
            temperature: 0.5,
            backbone: if small {
                vec![512, 256]
            } else {
                vec![1024, 512]
            },
            head_hidden: if small { 256 } else { 512 },
            head_out: 128,
            moco_m: 0.99,
            moco_k: if small { 1024 } else { 8192 },
            moco_symmetric: true,
            views: 2,
            // 28 x 28: a milder crop (80-100 % of the area instead of 50-100 %) measured
            // better for an MLP, which has no translation invariance of its own.
            augment: if small {
                Vec::new()
            } else {
                vec![("crop_min".to_string(), 0.8)]
            },
            seed: 0,
            train_subset: None,
            test_subset: None,
            eval_every: if small { 10 } else { 2 },
            probe_seeds: (0..5).collect(),
        };
        match method {
            Method::SimClr => {}
            Method::Moco => {
                c.temperature = 0.5;
            }
            Method::SupCon => {
                c.temperature = 0.1;
            }
            // The temperature is not used: the logit scale is learned.
            Method::SigLip => {}
        }
        c
    }

    /// Checks the settings are usable.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "TrainConfig";
        if self.epochs == 0 {
            return Err(Error::invalid(OP, "epochs", "must be at least 1"));
        }
        if self.batch < 2 {
            return Err(Error::invalid(
                OP,
                "batch",
                format!("{} images per step; need at least 2", self.batch),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid(OP, "lr", format!("{} must be > 0", self.lr)));
        }
        if !(0.0..=1.0).contains(&self.final_lr_frac) {
            return Err(Error::invalid(
                OP,
                "final_lr_frac",
                format!("{} is not in [0, 1]", self.final_lr_frac),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::invalid(
                OP,
                "temperature",
                format!("{} must be > 0", self.temperature),
            ));
        }
        if self.backbone.is_empty() || self.backbone.contains(&0) {
            return Err(Error::invalid(
                OP,
                "backbone",
                format!("{:?}: need at least one positive width", self.backbone),
            ));
        }
        if self.head_hidden == 0 || self.head_out == 0 {
            return Err(Error::invalid(OP, "head", "widths must be positive"));
        }
        if !(0.0..=1.0).contains(&self.moco_m) {
            return Err(Error::invalid(
                OP,
                "moco_m",
                format!("{} is not in [0, 1]", self.moco_m),
            ));
        }
        if self.moco_k == 0 {
            return Err(Error::invalid(
                OP,
                "moco_k",
                "the queue needs at least 1 row",
            ));
        }
        if self.views < 1 {
            return Err(Error::invalid(OP, "views", "need at least 1 view"));
        }
        let mut aug = Augment::for_size(28, 28);
        apply_augment(&mut aug, &self.augment)?;
        aug.validate()?;
        if self.probe_seeds.is_empty() {
            return Err(Error::invalid(OP, "probe_seeds", "need at least one seed"));
        }
        if self.max_steps == Some(0) {
            return Err(Error::invalid(OP, "max_steps", "must be at least 1"));
        }
        Ok(())
    }

    /// The settings as JSON (for `report.json` and the checkpoint metadata).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "method": self.method.name(),
            "data": self.data.name(),
            "data_dir": self.data_dir.as_ref().map(|p| p.display().to_string()),
            "device": self.device.to_string(),
            "epochs": self.epochs,
            "batch": self.batch,
            "max_steps": self.max_steps,
            "optimizer": self.optimizer.name(),
            "lr": short(self.lr),
            "final_lr_frac": short(self.final_lr_frac),
            "warmup_epochs": self.warmup_epochs,
            "weight_decay": short(self.weight_decay),
            "sgd_momentum": short(self.sgd_momentum),
            "temperature": self.temperature,
            "backbone": self.backbone,
            "head_hidden": self.head_hidden,
            "head_out": self.head_out,
            "seed": self.seed,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
            "eval_every": self.eval_every,
            "probe_seeds": self.probe_seeds,
            "augment": self.augment.iter().map(|(k, v)| (k.clone(), json!(short(*v)))).collect::<serde_json::Map<_, _>>(),
        });
        match self.method {
            Method::Moco => {
                v["moco_m"] = json!(self.moco_m);
                v["moco_k"] = json!(self.moco_k);
                v["moco_symmetric"] = json!(self.moco_symmetric);
            }
            Method::SupCon => v["views"] = json!(self.views),
            Method::SimClr | Method::SigLip => {}
        }
        v
    }
}
