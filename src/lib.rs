//! # contra
//!
//! Fused, memory-lean contrastive-learning losses with their gradients: L2 normalization,
//! similarity matrices, InfoNCE / NT-Xent / CLIP / MoCo / SupCon, triplet losses with
//! batch-all, batch-hard and semi-hard mining, the Hadsell margin loss, NCE, and the MoCo queue
//! and momentum updates.
//!
//! Every op runs on a [`Device`]: the multithreaded CPU backend (the reference), the interpreted
//! kernels (CUDA sources run on CPU threads, for testing) or a CUDA GPU (feature `cuda`). Softmax
//! losses never build an N x N matrix on any backend.
//!
//! ```
//! use contra::{ntxent, Device, NtXentOptions, Tensor};
//! // Two views of 2 samples, D = 3: rows i and i + 2 are views of sample i.
//! let z = Tensor::from_vec(
//!     vec![1.0f32, 0.0, 0.0,  0.0, 1.0, 0.0,  0.9, 0.1, 0.0,  0.1, 0.9, 0.0],
//!     &[4, 3],
//!     Device::Cpu,
//! )?;
//! let out = ntxent(&z, &NtXentOptions { temperature: 0.5 })?;
//! assert!(out.loss.to_scalar()? > 0.0);
//! assert_eq!(out.grad_z.shape(), &[4, 3]);
//! # Ok::<(), contra::Error>(())
//! ```

/// The benchmark suite behind `contra bench`: public for the command line and its tests, not part
/// of the library's API.
#[cfg(feature = "bench")]
#[doc(hidden)]
pub mod bench;
#[cfg(feature = "candle")]
pub mod candle;
pub(crate) mod checks;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "train")]
pub mod data;
pub mod device;
pub mod error;
#[cfg(feature = "fixtures")]
pub mod fixtures;
mod indices;
pub(crate) mod kernels;
#[cfg(feature = "nn")]
pub mod nn;
pub mod ops;
mod precision;
pub(crate) mod shared;
pub mod tensor;
#[cfg(feature = "train")]
pub mod train;

pub use device::{device_available, Device};
pub use error::{Error, Result};
pub use indices::{AsIndices, IndexView, Indices};
pub use kernels::storage::Transfers;
pub use ops::*;
pub use precision::{f32_precision, set_f32_precision, with_f32_precision, F32Precision};
pub use tensor::{DType, Element, Tensor};

/// Hooks for the crate's own tests of the interpreted mode (not part of the API).
#[doc(hidden)]
pub mod testing {
    pub use crate::kernels::interp::{
        dynamic_shared_roundtrip, ldmatrix_fragments, model_concurrent_blocks, model_hopper,
        out_of_bounds_launch, take_launched_kernels, take_launches, tf32_mma_fragments,
        unwritten_output_launch, wgmma_fragments, LaunchRecord,
    };
    pub use crate::kernels::momentum::update_at_offsets as momentum_update_at_offsets;
}

/// The README's example compiles and runs as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
