//! The kernel layer: the launch sequences of every kernel op, written once over a [`Backend`]
//! (the interpreted mode, or a CUDA GPU). This layer holds the crate's only kernel-launching
//! `unsafe` code, in `interp.rs` and `cuda.rs`, each block with its `// SAFETY:` reason.

pub(crate) mod clip;
pub(crate) mod infonce;
pub(crate) mod interp;
pub(crate) mod margin;
pub(crate) mod moco;
pub(crate) mod momentum;
pub(crate) mod nce;
pub(crate) mod normalize;
#[rustfmt::skip]
#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, clippy::all)]
pub(crate) mod params;
pub(crate) mod queue;
pub(crate) mod similarity;
pub(crate) mod supcon;
pub(crate) mod triplet;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cuda")]
pub mod timing;

use std::ffi::c_void;

use crate::Result;

/// Grid and block shape of one launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Launch {
    /// A 1-D grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: usize, threads: u32) -> Launch {
        Launch {
            grid: [blocks as u32, 1, 1],
            block: [threads, 1, 1],
        }
    }
}

/// Blocks needed to cover `n` items, `per_block` at a time.
pub(crate) fn blocks_for(n: usize, per_block: usize) -> usize {
    n.div_ceil(per_block)
}

/// The kernel parameter structs of `kernels/include/params.h` (plain C data, passed by value).
#[cfg(not(feature = "cuda"))]
pub(crate) trait KernelParams: Copy {}
#[cfg(feature = "cuda")]
pub(crate) trait KernelParams: Copy + cudarc::driver::DeviceRepr {}
impl KernelParams for params::ContraNormalizeParams {}
impl KernelParams for params::ContraSimilarityParams {}
impl KernelParams for params::ContraInfonceFwdParams {}
impl KernelParams for params::ContraInfonceBwdParams {}
impl KernelParams for params::ContraMarginParams {}
impl KernelParams for params::ContraNceParams {}
impl KernelParams for params::ContraMomentumParams {}
impl KernelParams for params::ContraQueueParams {}
impl KernelParams for params::ContraInfonceExtraBwdParams {}
impl KernelParams for params::ContraTripletMineParams {}
impl KernelParams for params::ContraTripletBwdParams {}

/// A device that runs the kernels. Buffers hold 32-bit words (f32 values or i32 indices).
pub(crate) trait Backend {
    type Buf;
    /// A buffer holding a copy of `values`.
    fn upload(&self, name: &'static str, values: &[f32]) -> Result<Self::Buf>;
    fn upload_i32(&self, name: &'static str, values: &[i32]) -> Result<Self::Buf>;
    /// An output buffer of `len` floats whose contents are undefined (poisoned in interp mode).
    fn output(&self, name: &'static str, len: usize) -> Result<Self::Buf>;
    /// The address a kernel sees.
    fn ptr(&self, buf: &Self::Buf) -> *mut c_void;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Runs `kernel` with `params`; `written` are the buffers the kernel must fill completely.
    fn launch<P: KernelParams>(
        &self,
        kernel: &'static str,
        launch: Launch,
        params: &P,
        written: &[&Self::Buf],
    ) -> Result<()>;
}

/// Runs `$body` with `$b` bound to the kernel backend of `$device` and returns its result from
/// the enclosing function; does nothing on the CPU (the caller goes on with the CPU path).
macro_rules! run_on_kernels {
    ($device:expr, $b:ident => $body:block) => {
        match $device {
            $crate::Device::Interp => {
                let $b = &$crate::kernels::interp::Interp;
                return $body;
            }
            #[cfg(feature = "cuda")]
            $crate::Device::Cuda(ordinal) => {
                let backend = $crate::kernels::cuda::Cuda::get(ordinal)?;
                let $b = &*backend;
                return $body;
            }
            _ => {}
        }
    };
}
pub(crate) use run_on_kernels;
