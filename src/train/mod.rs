//! End-to-end training: data sets and augmentations, the SimCLR / MoCo v2 / SupCon / SigLIP loops and
//! their evaluation (kNN and linear probe), reports, plots and checkpoints.
//!
//! `contra train simclr|moco|supcon|siglip` ([`run::run`]) trains an MLP encoder ([`crate::nn`]) on the
//! training split, then evaluates on the held-out split, with the same protocol
//! ([`eval::evaluate`]: kNN k = 1, 5 with cosine similarity; a linear probe on all labels and on
//! 10 labels per class, mean and spread over seeds 0..5), the trained backbone's features, the
//! same encoder untrained (its seeded initial weights) and raw pixels. It writes into `--out`
//! (default `runs/<method>-<date>-<time>/`):
//!
//! - `report.json`: `method`, `data`, `device`, `epochs`, `seconds`, `loss` and `mi_bound`
//!   (`log N - loss` per epoch; `null` for SupCon and SigLIP, whose losses are not InfoNCE bounds), the loss
//!   of every step (`step_loss`), the monitor curve, `eval` with `encoder`, `untrained` and
//!   `raw_pixels` (each with `knn1`, `knn5`, `probe_full`, `probe_10_per_class` as fractions,
//!   plus the spread of the 10-label scores), the configuration and the encoder's layout;
//! - `curves.png`: loss and the MI bound per epoch, and the monitored held-out kNN-1 and
//!   10-labels-per-class probe accuracy (raw pixels as dashed lines);
//! - `checkpoint.safetensors`: every parameter and BatchNorm buffer with the metadata to
//!   rebuild the encoder ([`checkpoint`]); `contra eval --checkpoint F` prints the same table.
//!
//! **Where things run.** `--device` picks where a training step runs: the encoder's forward and
//! backward passes ([`crate::nn::DeviceEncoder`]), the losses and, for MoCo, the key encoder,
//! the momentum update (on the flat parameter vector) and the queue enqueue: `cpu` (the
//! reference), `interp` (the CUDA kernels interpreted on the CPU) or `cuda[:N]` (the kernels and
//! cuBLAS on the GPU, build with `--features cuda`). The optimizer step and evaluation run on the
//! CPU. `contra train-check --device cuda` trains a few steps of each method on the CPU and on
//! the device from the same seed and compares the losses.
//!
//! **Defaults** ([`config::TrainConfig::defaults`], with the measurements behind them), chosen
//! by measured runs on 2 CPU cores: digits: backbone 64 -> 512 -> 256 (`Linear - BN - ReLU`),
//! features 256, head 256 -> 256 -> 128, batch 256, 200 epochs, SGD momentum 0.9, lr 0.5 with 10
//! warm-up epochs and cosine decay to 0, weight decay 1e-4; SimCLR temperature 0.5 (SimCLR's
//! value for small data); MoCo v2 with the MLP head, K = 1024, a symmetrized loss, and, adapted
//! to small data, temperature 0.5 and m = 0.99 (the anchors' 0.2 and 0.999 measured worse
//! here); SupCon temperature 0.1, two views. Fashion-MNIST / MNIST: backbone
//! 784 -> 1024 -> 512, head 512 -> 512 -> 128, 20 epochs, lr 0.1, a crop of 80-100 % of the
//! area, horizontal flips on Fashion-MNIST, K = 8192.
//! The per-epoch monitor evaluates the held-out split, which is also the evaluation split
//! (the data sets have no third split), so defaults tuned on it are mildly optimistic.

// The API is what this module re-exports below; the files behind it stay reachable (the command
// line and the tests use a few helpers) but are not documented as API.
#[doc(hidden)]
pub mod augment;
#[doc(hidden)]
pub mod checkpoint;
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod eval;
#[doc(hidden)]
pub mod idx;
#[doc(hidden)]
pub mod plot;
#[doc(hidden)]
pub mod report;
#[doc(hidden)]
pub mod run;
#[doc(hidden)]
pub mod split;
#[doc(hidden)]
pub mod trainer;

pub use augment::Augment;
pub use checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
pub use config::{DataSet, Method, OptimizerKind, TrainConfig};
pub use eval::{
    evaluate, evaluate_with, knn_accuracies, knn_accuracy, probe_accuracy, EvalScores, LinearProbe,
    ProbeOptions, Spread,
};
pub use idx::{fashion_mnist, mnist, read_idx, write_idx, DEFAULT_FASHION_MNIST_DIR};
pub use report::EvalTable;
pub use run::{default_out_dir, evaluate_table, load_data, run, RunOutput};
pub use split::{digits_split, labels_per_class, stratified_split};
pub use trainer::{build_encoder, features, train, EpochRecord, Event, StepRecord, TrainOutput};
