//! End-to-end training: data sets and augmentations, the SimCLR / MoCo v2 / SupCon loops and
//! their evaluation (kNN and linear probe).

pub mod augment;
pub mod eval;
pub mod idx;
pub mod split;

pub use augment::Augment;
pub use eval::{
    evaluate, evaluate_with, knn_accuracies, knn_accuracy, probe_accuracy, EvalScores, LinearProbe,
    ProbeOptions, Spread,
};
pub use idx::{fashion_mnist, mnist, read_idx, write_idx, DEFAULT_FASHION_MNIST_DIR};
pub use split::{digits_split, labels_per_class, stratified_split};
