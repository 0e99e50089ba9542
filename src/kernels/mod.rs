//! The kernel layer: the launch sequences of every kernel op, written once over a [`Backend`]
//! (the interpreted mode, or a CUDA GPU). This layer holds the crate's only kernel-launching
//! `unsafe` code, in `interp.rs` and `cuda.rs`, each block with its `// SAFETY:` reason.

#[cfg(feature = "bench")]
pub(crate) mod baseline;
pub(crate) mod clip;
pub(crate) mod elementwise;
pub(crate) mod infonce;
pub(crate) mod interp;
pub(crate) mod margin;
pub(crate) mod moco;
pub(crate) mod momentum;
pub(crate) mod nce;
// The encoder's kernels (feature `nn`); its GEMM shape also serves the cuBLAS path.
#[cfg_attr(not(feature = "nn"), allow(dead_code))]
pub(crate) mod nn;
pub(crate) mod normalize;
#[cfg_attr(not(feature = "nn"), allow(dead_code))]
pub(crate) mod optim;
#[rustfmt::skip]
#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, clippy::all)]
pub(crate) mod params;
pub(crate) mod queue;
pub(crate) mod siglip;
pub(crate) mod similarity;
pub(crate) mod status;
pub(crate) mod storage;
pub(crate) mod supcon;
pub(crate) mod triplet;
pub(crate) mod waves;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use std::ffi::c_void;

use crate::Result;

/// Grid and block shape of one launch. The grid is kept in `usize` until [`Launch::dims`]
/// checks it against CUDA's limits, so that no block count is truncated on the way.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Launch {
    pub grid: [usize; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory per block, bytes (the backends raise a kernel's limit above the
    /// default 48 KB when a launch asks for more).
    pub shared_bytes: usize,
}

/// CUDA's grid limits: 2^31 - 1 blocks along x, 65535 along y and z.
const MAX_GRID: [usize; 3] = [i32::MAX as usize, 65535, 65535];
/// The most dynamic shared memory a block may have (227 KB: sm_90; the launch layer asks for
/// more than 48 KB only where the kernel's data needs it).
pub(crate) const MAX_DYNAMIC_SHARED_BYTES: usize = 227 * 1024;

impl Launch {
    /// A 1-D grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: usize, threads: u32) -> Launch {
        Launch {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }

    /// The grid and block as the driver takes them, or an error naming `kernel` when the grid
    /// exceeds CUDA's limits (the launch layer never truncates a block count).
    pub fn dims(&self, kernel: &str) -> Result<([u32; 3], [u32; 3])> {
        let mut grid = [0u32; 3];
        for (axis, (&blocks, &limit)) in self.grid.iter().zip(&MAX_GRID).enumerate() {
            if blocks > limit {
                return Err(crate::Error::invalid(
                    "kernel launch",
                    "grid",
                    format!(
                        "`{kernel}` needs {blocks} blocks along axis {axis}, more than CUDA's \
                         limit of {limit}: the input is too large for one launch"
                    ),
                ));
            }
            grid[axis] = blocks as u32;
        }
        if self.shared_bytes > MAX_DYNAMIC_SHARED_BYTES {
            return Err(crate::Error::invalid(
                "kernel launch",
                "shared memory",
                format!(
                    "`{kernel}` needs {} bytes of shared memory per block, more than the {} a \
                     block may have",
                    self.shared_bytes, MAX_DYNAMIC_SHARED_BYTES
                ),
            ));
        }
        Ok((grid, self.block))
    }
}

/// The largest extent (rows, columns, features, queue length) the kernels accept. They take
/// extents as 32-bit `int` and form offsets in 64 bits; the margin below 2^31 - 1 keeps every
/// strided loop counter (`i += blockDim`) from wrapping.
pub(crate) const MAX_EXTENT: usize = i32::MAX as usize - 4096;

/// `value` as a kernel's 32-bit extent parameter, or an error naming `arg` when it does not fit.
pub(crate) fn extent(arg: &'static str, value: usize) -> Result<i32> {
    if value <= MAX_EXTENT {
        Ok(value as i32)
    } else {
        Err(crate::Error::invalid(
            "kernel launch",
            arg,
            format!(
                "{value} exceeds the kernels' 32-bit index range (at most {MAX_EXTENT}); \
                 use Device::Cpu for inputs this large"
            ),
        ))
    }
}

/// Blocks needed to cover `n` items, `per_block` at a time.
pub(crate) fn blocks_for(n: usize, per_block: usize) -> usize {
    n.div_ceil(per_block)
}

/// A learnable scalar (CLIP's and SigLIP's `log_scale`, SigLIP's `bias`) as a kernel takes it:
/// a value, or one f32 the kernel reads on the device (no copy to the host).
#[derive(Clone, Copy)]
pub(crate) enum ScalarArg<'a, Buf> {
    Value(f64),
    Device(&'a Buf),
}

impl<'a, Buf> ScalarArg<'a, Buf> {
    /// The value passed by value: `of(value)`, or `unused` when the kernel reads the device one.
    pub fn passed(&self, of: impl FnOnce(f64) -> f64, unused: f64) -> f32 {
        match *self {
            ScalarArg::Value(value) => of(value) as f32,
            ScalarArg::Device(_) => unused as f32,
        }
    }

    /// The device operand, when there is one.
    pub fn device(&self) -> Option<&'a Buf> {
        match *self {
            ScalarArg::Value(_) => None,
            ScalarArg::Device(buf) => Some(buf),
        }
    }
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
impl KernelParams for params::ContraMarginFinishParams {}
impl KernelParams for params::ContraNceParams {}
impl KernelParams for params::ContraMomentumParams {}
impl KernelParams for params::ContraQueueParams {}
impl KernelParams for params::ContraInfonceExtraBwdParams {}
impl KernelParams for params::ContraRowDotParams {}
impl KernelParams for params::ContraTripletMineParams {}
impl KernelParams for params::ContraTripletBwdParams {}
impl KernelParams for params::ContraTripletScaleParams {}
impl KernelParams for params::ContraTripletFinishParams {}
impl KernelParams for params::ContraGemmParams {}
impl KernelParams for params::ContraBiasReluParams {}
impl KernelParams for params::ContraReluBwdParams {}
impl KernelParams for params::ContraColumnSumParams {}
impl KernelParams for params::ContraBatchNormFwdParams {}
impl KernelParams for params::ContraBatchNormBwdParams {}
impl KernelParams for params::ContraBaselineParams {}
impl KernelParams for params::ContraScanParams {}
impl KernelParams for params::ContraClipColumnsParams {}
impl KernelParams for params::ContraSiglipParams {}
impl KernelParams for params::ContraHalvesParams {}
impl KernelParams for params::ContraLossParams {}
impl KernelParams for params::ContraFillParams {}
impl KernelParams for params::ContraCastParams {}
impl KernelParams for params::ContraSwapParams {}
impl KernelParams for params::ContraOptimParams {}
impl KernelParams for params::ContraIndexScanParams {}
impl KernelParams for params::ContraClassWeightsParams {}

/// What one element of a kernel buffer holds. Buffers are stored as 32-bit words; 16-bit
/// elements are packed two to a word, element `2i` in the low half (both backends are
/// little-endian, as the kernels' `__nv_bfloat16*` / `__half*` views expect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    I32,
    Bf16,
    F16,
    /// Storage only (device-resident f64 tensors, two words per element, low word first); the
    /// kernels compute in f32 and never read it.
    F64,
}

impl Elem {
    /// 32-bit words that hold `count` elements.
    pub fn words(self, count: usize) -> usize {
        match self {
            Elem::Bf16 | Elem::F16 => count.div_ceil(2),
            Elem::F32 | Elem::I32 => count,
            Elem::F64 => 2 * count,
        }
    }
}

/// The element type and count of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BufInfo {
    pub elem: Elem,
    pub count: usize,
}

/// A kernel of `kernels/<module>.cu` that takes the parameter struct `P`. The handles are
/// generated by build.rs from the sources' exports ([`handles`]), so a launch with the wrong
/// parameter struct does not compile and no kernel name is kept by hand.
pub(crate) struct Kernel<P> {
    /// The source file's stem, which names its fatbin (the GPU backend loads it).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub module: &'static str,
    pub name: &'static str,
    params: std::marker::PhantomData<fn(P)>,
}

impl<P> Kernel<P> {
    pub const fn new(module: &'static str, name: &'static str) -> Self {
        Kernel {
            module,
            name,
            params: std::marker::PhantomData,
        }
    }
}

impl<P> Clone for Kernel<P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P> Copy for Kernel<P> {}

/// The f32, bf16 and f16 instantiations of one kernel body (`CONTRA_TYPED_KERNELS*`), and the
/// tf32 one where the body has it (`CONTRA_TYPED_KERNELS_TF32`: f32 operands on tensor cores).
pub(crate) struct Typed<P> {
    pub f32: Kernel<P>,
    pub bf16: Kernel<P>,
    pub f16: Kernel<P>,
    pub tf32: Option<Kernel<P>>,
}

impl<P> Typed<P> {
    /// The instantiation for operands of type `elem` (f32 for f32 and i32 buffers).
    pub fn of(&self, elem: Elem) -> Kernel<P> {
        match elem {
            Elem::Bf16 => self.bf16,
            Elem::F16 => self.f16,
            Elem::F32 | Elem::I32 | Elem::F64 => self.f32,
        }
    }

    /// The instantiation for products of `elem` operands at the calling thread's
    /// [`crate::f32_precision`]: tf32 for f32 operands when it asks for TF32 and the body has it.
    pub fn of_product(&self, elem: Elem) -> Kernel<P> {
        match (elem, crate::f32_precision(), self.tf32) {
            (Elem::F32, crate::F32Precision::Tf32, Some(tf32)) => tf32,
            _ => self.of(elem),
        }
    }
}

/// Every kernel of `kernels/*.cu`, by name in capitals (generated by build.rs).
#[allow(dead_code)] // the optional layers' kernels are unused without their features
pub(crate) mod handles {
    use super::params::*;
    use super::{Kernel, Typed};
    include!(concat!(env!("OUT_DIR"), "/kernel_handles.rs"));
}

/// Whether the `*_sm90a` kernels may run where the device has them: yes unless `CONTRA_WGMMA=off`
/// (read once), so that a GPU session can time both paths and a user can step around them.
pub(crate) fn sm90a_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("CONTRA_WGMMA").map_or(true, |v| v != "off"))
}

/// A device that runs the kernels. Buffers hold 32-bit words: f32 values, i32 indices, or pairs
/// of 16-bit floats.
pub(crate) trait Backend {
    type Buf;
    /// A buffer holding a copy of `words`, which encode `info.count` elements.
    fn upload_words(&self, name: &'static str, words: &[u32], info: BufInfo) -> Result<Self::Buf>;
    /// An output buffer of `info.count` elements whose contents are undefined (poisoned in interp
    /// mode).
    fn output_of(&self, name: &'static str, info: BufInfo) -> Result<Self::Buf>;
    /// The address a kernel sees.
    fn ptr(&self, buf: &Self::Buf) -> *mut c_void;
    fn info(&self, buf: &Self::Buf) -> BufInfo;
    fn download_words(&self, buf: &Self::Buf) -> Result<Vec<u32>>;
    /// A copy of `buf` on the same device.
    fn duplicate(&self, buf: &Self::Buf) -> Result<Self::Buf>;
    /// `buf` as the storage of a device-resident tensor.
    fn adopt(&self, buf: Self::Buf) -> Result<storage::DeviceBuf>;
    /// The buffer of a device-resident tensor when it lives on this backend.
    fn resident<'a>(&self, buf: &'a storage::DeviceBuf) -> Option<&'a Self::Buf>;
    /// Runs `kernel` with `params`; `written` are the buffers the kernel must fill completely.
    fn launch<P: KernelParams>(
        &self,
        kernel: Kernel<P>,
        launch: Launch,
        params: &P,
        written: &[&Self::Buf],
    ) -> Result<()>;

    /// The shared memory, static and dynamic, one block may have: 227 KB (an H100's) in the
    /// interpreted mode; the GPU's own figure on a GPU (an A100 gives 163 KB), so that a launch
    /// sequence can pick a layout that fits.
    fn shared_bytes_per_block(&self) -> usize {
        MAX_DYNAMIC_SHARED_BYTES
    }

    /// How many blocks of `kernel` at `launch`'s block size and shared memory the whole device
    /// runs at once (its SMs times the kernel's occupancy), for the launch layer's choices
    /// against the wave tail; None where no figure is known: the interpreted mode, unless a test
    /// models a device (`testing::model_concurrent_blocks`), and a driver that cannot say.
    fn concurrent_blocks<P: KernelParams>(
        &self,
        _kernel: Kernel<P>,
        _launch: &Launch,
    ) -> Option<usize> {
        None
    }

    /// Whether the device runs the `*_sm90a` kernels (Hopper's warpgroup MMA, wgmma): compute
    /// capability 9.0 exactly, unless `CONTRA_WGMMA=off` (read once) keeps every launch on the
    /// sm_80 / sm_90 kernels. The interpreted mode runs them where a test asks
    /// (`testing::model_hopper`).
    fn runs_sm90a(&self) -> bool {
        false
    }

    /// `c = alpha op(a) op(b) + beta c` on row-major f32 buffers: our tiled kernel here; the
    /// GPU backend uses cuBLAS when it can load it.
    #[cfg_attr(not(feature = "nn"), allow(dead_code))]
    fn gemm(&self, shape: &nn::GemmShape, a: &Self::Buf, b: &Self::Buf, c: &Self::Buf) -> Result<()>
    where
        Self: Sized,
    {
        nn::gemm_kernel(self, shape, a, b, c)
    }

    /// Runs `work` and returns its result with the milliseconds it took: wall-clock time here;
    /// the GPU backend leaves the launches asynchronous and measures the stream between two
    /// CUDA events.
    #[cfg_attr(not(any(feature = "bench", feature = "cuda")), allow(dead_code))]
    fn timed<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, f64)>
    where
        Self: Sized,
    {
        let start = std::time::Instant::now();
        let out = work()?;
        Ok((out, start.elapsed().as_secs_f64() * 1e3))
    }

    /// A buffer holding a copy of `values`.
    fn upload(&self, name: &'static str, values: &[f32]) -> Result<Self::Buf> {
        let words: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        let info = BufInfo {
            elem: Elem::F32,
            count: values.len(),
        };
        self.upload_words(name, &words, info)
    }

    fn upload_i32(&self, name: &'static str, values: &[i32]) -> Result<Self::Buf> {
        let words: Vec<u32> = values.iter().map(|&v| v as u32).collect();
        let info = BufInfo {
            elem: Elem::I32,
            count: values.len(),
        };
        self.upload_words(name, &words, info)
    }

    /// A buffer of 16-bit floats (`elem` is `Bf16` or `F16`) given by their bit patterns.
    fn upload_half(&self, name: &'static str, bits: &[u16], elem: Elem) -> Result<Self::Buf> {
        let words: Vec<u32> = bits
            .chunks(2)
            .map(|pair| pair[0] as u32 | (pair.get(1).copied().unwrap_or(0) as u32) << 16)
            .collect();
        let info = BufInfo {
            elem,
            count: bits.len(),
        };
        self.upload_words(name, &words, info)
    }

    /// An f32 output buffer of `len` elements.
    fn output(&self, name: &'static str, len: usize) -> Result<Self::Buf> {
        self.output_of(
            name,
            BufInfo {
                elem: Elem::F32,
                count: len,
            },
        )
    }

    /// An f32 buffer of `len` zeros (a target of atomic adds).
    fn zeros(&self, name: &'static str, len: usize) -> Result<Self::Buf> {
        self.upload(name, &vec![0.0; len])
    }

    /// The buffer's elements as f32 (i32 buffers: the raw bits, for `f32::to_bits`).
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        let words = self.download_words(buf)?;
        Ok(match storage::decode(&words, self.info(buf)) {
            crate::tensor::HostData::F32(v) => v,
            other => other.to_vec(),
        })
    }
}

/// A kernel operand: a device-resident tensor's own buffer, or a copy made for this call.
pub(crate) enum Operand<'a, Buf> {
    Resident(&'a Buf),
    Copied(Buf),
}

impl<Buf> std::ops::Deref for Operand<'_, Buf> {
    type Target = Buf;
    fn deref(&self) -> &Buf {
        match self {
            Operand::Resident(buf) => buf,
            Operand::Copied(buf) => buf,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_beyond_32_bits_are_errors_naming_the_argument() {
        assert_eq!(extent("rows", MAX_EXTENT).unwrap(), MAX_EXTENT as i32);
        let err = extent("dim", MAX_EXTENT + 1).unwrap_err().to_string();
        assert!(err.contains("`dim`") && err.contains("32-bit"), "{err}");
        // A value that `as i32` would wrap to a small positive number.
        assert!(extent("rows", (1usize << 32) + 5).is_err());
    }

    #[test]
    fn grids_beyond_cuda_limits_are_errors_not_truncated() {
        let fine = Launch {
            grid: [MAX_GRID[0], 65535, 65535],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        assert_eq!(fine.dims("k").unwrap().0, [i32::MAX as u32, 65535, 65535]);
        for axis in 0..3 {
            let mut launch = fine;
            launch.grid[axis] += 1;
            let err = launch.dims("similarity_fwd_f32").unwrap_err().to_string();
            assert!(
                err.contains("similarity_fwd_f32") && err.contains("`grid`"),
                "{err}"
            );
        }
        // 2^32 + 1 blocks would have been launched as 1 block.
        assert!(Launch::linear((1 << 32) + 1, 256).dims("k").is_err());
    }
}
