//! A minimal encoder for the trainer: linear layers, ReLU, BatchNorm1d, MLPs and projection
//! heads with hand-written backward passes, plus optimizers and learning-rate schedules.
//!
//! Everything runs on the CPU in f32 (GEMMs through the CPU backend's packed SIMD GEMM);
//! activations are `batch x features` matrices ([`Mat`]). Each layer caches what its backward
//! pass needs during `forward`; `backward` adds to the parameter gradients (`+=`, clear them with `zero_grad`)
//! and returns the gradient of its input.
//!
//! ```
//! use contra::nn::{lr_at, Encoder, Mat, MlpSpec, Module, Optimizer, Sgd};
//!
//! // A 2-layer backbone 8 -> 16 -> 16 and SimCLR's projection head 16 -> 16 -> 4.
//! let mut enc = Encoder::simclr(&MlpSpec::backbone(&[8, 16, 16]), 16, 4, 0)?;
//! let x = Mat::from_vec((0..4 * 8).map(|i| (i as f32 * 0.37).sin()).collect(), 4, 8)?;
//!
//! let z = enc.forward(&x, true)?; // train mode: BatchNorm uses batch statistics
//! assert_eq!(z.shape(), [4, 4]);
//! // Loss sum(z): its gradient is all ones.
//! enc.zero_grad();
//! let grad_x = enc.backward(&Mat::from_vec(vec![1.0; 16], 4, 4)?)?;
//! assert_eq!(grad_x.shape(), [4, 8]);
//!
//! let mut opt = Sgd::new(0.9, 1e-4, false)?;
//! opt.step(&mut enc.params_mut(), lr_at(0, 100, 10, 0.1, 0.0))?;
//!
//! // Representation for evaluation: backbone only, eval-mode BatchNorm.
//! assert_eq!(enc.features(&x)?.shape(), [4, 16]);
//! // Bad input is an error, not a panic.
//! assert!(enc.forward(&Mat::zeros(4, 7), true).is_err());
//! # Ok::<(), contra::Error>(())
//! ```

mod batchnorm;
mod device;
mod encoder;
mod linear;
mod mat;
mod mlp;
mod module;
mod optim;
mod param;
mod relu;
mod resident;
mod schedule;

pub use batchnorm::BatchNorm1d;
pub use device::{Batch, DeviceEncoder};
pub use encoder::Encoder;
pub use linear::Linear;
pub use mat::Mat;
pub use mlp::{Layer, Mlp, MlpSpec, Norm};
pub use module::Module;
pub use optim::{AdamW, Lars, Optimizer, Sgd};
pub use param::{Buffer, DeviceParam, Param};
pub use relu::Relu;
pub use resident::ResidentEncoder;
pub use schedule::lr_at;
