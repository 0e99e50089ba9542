//! The GPU backend: the fatbins nvcc built (build.rs) loaded lazily through cudarc's dynamic
//! driver bindings, one context and stream per GPU, and the kernel launches.

use std::any::Any;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::CudaBlas;

use super::nn::{gemm_kernel, GemmShape};
use super::params::*;
use super::storage::{count_to_device, count_to_host, DeviceBuf};
use super::{extent, Backend, BufInfo, Kernel, KernelParams, Launch};
use crate::{Error, Result};

/// (module name, fatbin) for every kernels/*.cu, embedded at build time.
const FATBINS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));

// SAFETY: these are plain C structs of pointers and scalars (kernels/include/params.h), laid
// out identically in Rust (bindgen, with layout tests) and passed to kernels by value.
unsafe impl DeviceRepr for ContraNormalizeParams {}
unsafe impl DeviceRepr for ContraSimilarityParams {}
unsafe impl DeviceRepr for ContraInfonceFwdParams {}
unsafe impl DeviceRepr for ContraInfonceBwdParams {}
unsafe impl DeviceRepr for ContraMarginParams {}
unsafe impl DeviceRepr for ContraMarginFinishParams {}
unsafe impl DeviceRepr for ContraNceParams {}
unsafe impl DeviceRepr for ContraMomentumParams {}
unsafe impl DeviceRepr for ContraQueueParams {}
unsafe impl DeviceRepr for ContraInfonceExtraBwdParams {}
unsafe impl DeviceRepr for ContraRowDotParams {}
unsafe impl DeviceRepr for ContraTripletMineParams {}
unsafe impl DeviceRepr for ContraTripletBwdParams {}
unsafe impl DeviceRepr for ContraTripletScaleParams {}
unsafe impl DeviceRepr for ContraTripletFinishParams {}
unsafe impl DeviceRepr for ContraGemmParams {}
unsafe impl DeviceRepr for ContraBiasReluParams {}
unsafe impl DeviceRepr for ContraReluBwdParams {}
unsafe impl DeviceRepr for ContraColumnSumParams {}
unsafe impl DeviceRepr for ContraBatchNormFwdParams {}
unsafe impl DeviceRepr for ContraBatchNormBwdParams {}
unsafe impl DeviceRepr for ContraBaselineParams {}
unsafe impl DeviceRepr for ContraScanParams {}
unsafe impl DeviceRepr for ContraClipColumnsParams {}
unsafe impl DeviceRepr for ContraSiglipParams {}
unsafe impl DeviceRepr for ContraHalvesParams {}
unsafe impl DeviceRepr for ContraLossParams {}
unsafe impl DeviceRepr for ContraFillParams {}
unsafe impl DeviceRepr for ContraCastParams {}
unsafe impl DeviceRepr for ContraSwapParams {}
unsafe impl DeviceRepr for ContraOptimParams {}
unsafe impl DeviceRepr for ContraIndexScanParams {}
unsafe impl DeviceRepr for ContraClassWeightsParams {}

/// Whether the debug switch `CONTRA_SYNC_LAUNCHES=1` asks for a synchronised launch (each
/// kernel's errors named at its launch).
fn sync_launches_asked() -> bool {
    std::env::var("CONTRA_SYNC_LAUNCHES").is_ok_and(|v| v == "1")
}

fn device_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// A kernel's function, looked up once, the dynamic shared memory it is allowed so far, and
/// the driver's last occupancy answer for it: ((threads, dynamic shared bytes), blocks per SM).
struct LoadedKernel {
    function: CudaFunction,
    dynamic_limit: usize,
    occupancy: Option<((u32, usize), u32)>,
}

/// One GPU: its context, a stream, and the modules and kernels loaded so far.
pub(crate) struct Cuda {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// The kernels launched so far. Each is looked up in its module once, and its dynamic
    /// shared-memory limit is raised only when a launch asks for more than any before: both
    /// are driver calls, a few microseconds per launch otherwise (MoCo's whole call takes 0.5 ms).
    kernels: Mutex<HashMap<&'static str, LoadedKernel>>,
    /// The GPU's opt-in shared memory per block, read once (None: the driver could not say).
    shared_per_block: OnceLock<Option<usize>>,
    /// The GPU's SM count, read once (None: the driver could not say).
    multiprocessors: OnceLock<Option<usize>>,
    /// Whether the GPU is compute capability 9.0 (the sm_90a kernels' SASS), read once.
    hopper: OnceLock<bool>,
    /// cuBLAS on this GPU's stream, or `None` when libcublas cannot be loaded (the GEMMs then
    /// run our `nn_gemm_f32` kernel).
    blas: OnceLock<Option<CudaBlas>>,
    /// Whether each launch waits for its kernel, so that a failing kernel is named in the
    /// error: off by default (launches are asynchronous, errors surface at the next read),
    /// on with `CONTRA_SYNC_LAUNCHES=1`. [`Backend::timed`] turns it off while it measures.
    sync_launches: AtomicBool,
}

/// The backends opened so far, by GPU ordinal.
fn opened() -> Result<std::sync::MutexGuard<'static, HashMap<usize, Arc<Cuda>>>> {
    static OPEN: OnceLock<Mutex<HashMap<usize, Arc<Cuda>>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::Device("poisoned lock".into()))
}

impl Cuda {
    /// The (cached) backend of GPU `ordinal`; a clear error without a driver or such a GPU.
    pub fn get(ordinal: usize) -> Result<Arc<Cuda>> {
        let mut open = opened()?;
        if let Some(cuda) = open.get(&ordinal) {
            return Ok(cuda.clone());
        }
        // With `candle-cuda` cudarc links the CUDA libraries (candle's choice): they are there.
        #[cfg(not(feature = "candle-cuda"))]
        // SAFETY: only probes whether libcuda can be loaded; cudarc panics on first use otherwise.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no CUDA driver (libcuda.so) found on this machine".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| device_error("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "cuda:{ordinal} does not exist ({count} GPU(s) visible)"
            )));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| device_error("creating a CUDA context", e))?;
        let cuda = Cuda::on_stream(ordinal, ctx.default_stream());
        open.insert(ordinal, cuda.clone());
        Ok(cuda)
    }

    fn on_stream(ordinal: usize, stream: Arc<CudaStream>) -> Arc<Cuda> {
        Arc::new(Cuda {
            ordinal,
            ctx: stream.context().clone(),
            stream,
            modules: Mutex::new(HashMap::new()),
            kernels: Mutex::new(HashMap::new()),
            shared_per_block: OnceLock::new(),
            multiprocessors: OnceLock::new(),
            hopper: OnceLock::new(),
            blas: OnceLock::new(),
            sync_launches: AtomicBool::new(sync_launches_asked()),
        })
    }

    /// Makes `stream` the stream contra runs on for its GPU, so that contra's kernels are
    /// ordered with the caller's work there. It must come before contra's first use of that GPU
    /// (or name the stream contra already uses).
    pub fn use_stream(stream: Arc<CudaStream>) -> Result<()> {
        let ordinal = stream.context().ordinal();
        let mut open = opened()?;
        match open.get(&ordinal) {
            Some(cuda) if Arc::ptr_eq(&cuda.stream, &stream) => Ok(()),
            Some(_) => Err(Error::Device(format!(
                "cuda:{ordinal} already runs contra's work on another stream: call \
                 contra::cuda::use_stream before the first op or tensor on that GPU"
            ))),
            None => {
                open.insert(ordinal, Cuda::on_stream(ordinal, stream));
                Ok(())
            }
        }
    }

    /// Waits for the work queued on this GPU's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_error("waiting for the GPU", e))
    }

    /// The stream contra's work on this GPU runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `slice` (the caller's allocation on this GPU's context) as the words of a buffer of
    /// `info`, without a copy: the buffer owns and frees the allocation. The caller checked that
    /// the slice holds `info.count` elements of `info.elem` and that the words cover exactly
    /// its bytes.
    pub fn adopt_slice<T>(&self, slice: CudaSlice<T>, info: BufInfo) -> Result<CudaBuf> {
        if slice.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Device(format!(
                "the slice belongs to another CUDA context than contra's on cuda:{}",
                self.ordinal
            )));
        }
        // The caller's pending work on the slice's stream comes before contra's on its own.
        self.stream
            .join(slice.stream())
            .map_err(|e| device_error("ordering the slice's stream before contra's", e))?;
        let words = info.elem.words(info.count);
        let ptr = slice.leak();
        // SAFETY: `ptr` is a live allocation of this context (checked above) that `leak` gave
        // up; it holds `words` 32-bit words (the caller checked its byte length), and from here
        // the new slice owns and frees it.
        let words = unsafe { self.stream.upgrade_device_ptr::<u32>(ptr, words) };
        Ok(CudaBuf::owned(words, info, self.ordinal))
    }

    /// `info.count` elements of `T` from element `offset` of `slice` as a buffer, without a copy
    /// when they start on a 32-bit word and fill whole words (else a copy): the buffer reads the caller's memory and never frees it, and holds
    /// `lender` as long as it lives. Work pending on contra's stream comes after the caller's
    /// on the slice's stream.
    ///
    /// # Safety
    /// `lender` must keep `slice`'s allocation alive (not freed, not reallocated) for as long
    /// as it lives, as the framework tensor owning the slice does.
    #[cfg(feature = "candle-cuda")]
    pub unsafe fn borrow_slice<T>(
        &self,
        slice: &CudaSlice<T>,
        offset: usize,
        info: BufInfo,
        lender: Arc<dyn Any + Send + Sync>,
    ) -> Result<CudaBuf> {
        if slice.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Device(format!(
                "the slice belongs to another CUDA context than contra's on cuda:{}",
                self.ordinal
            )));
        }
        let size = std::mem::size_of::<T>();
        let words = info.elem.words(info.count);
        let fits = offset
            .checked_add(info.count)
            .is_some_and(|end| end <= slice.len());
        if !fits {
            return Err(Error::Device(format!(
                "elements {offset}.. ({} of them) are outside a slice of {}",
                info.count,
                slice.len()
            )));
        }
        let start_byte = offset * size;
        // Whole words only: an odd 16-bit count would take in the next element, which a
        // kernel writing whole words could change.
        let exact_words = words * 4 == info.count * size;
        self.stream
            .join(slice.stream())
            .map_err(|e| device_error("ordering the slice's stream before contra's", e))?;
        let (base, _read) = slice.device_ptr(&self.stream);
        let start = base + start_byte as u64;
        if start_byte % 4 != 0 || !exact_words || info.count == 0 {
            let out = self.output_of("borrowed slice", info)?;
            {
                let (dst, _write) = out.words.device_ptr(&self.stream);
                // SAFETY: `start` points at `info.count` live elements of the slice (checked
                // above), `dst` holds at least as many bytes; the copy is ordered on this
                // stream, which the guards record.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst,
                        start,
                        info.count * size,
                        self.stream.cu_stream(),
                    )
                }
                .map_err(|e| device_error("device to device copy", e))?;
            }
            return Ok(out);
        }
        // SAFETY: `start` is 4-byte aligned and the `words` whole words from it are exactly the
        // elements asked for, inside the slice (checked above), which `lender` keeps alive as long as the buffer holds it; the
        // buffer's drop leaks this slice instead of freeing it.
        let words = unsafe { self.stream.upgrade_device_ptr::<u32>(start, words) };
        Ok(CudaBuf {
            words: ManuallyDrop::new(words),
            info,
            ordinal: self.ordinal,
            lender: Some(AssertUnwindSafe(lender)),
        })
    }

    /// A copy of `slice` in a new buffer of `info` (whole words: a 16-bit slice of odd length).
    pub fn copy_slice<T>(&self, slice: &CudaSlice<T>, info: BufInfo) -> Result<CudaBuf> {
        let out = self.output_of("slice", info)?;
        let bytes = info.count * std::mem::size_of::<T>();
        {
            let (src, _read) = slice.device_ptr(&self.stream);
            let (dst, _write) = out.words.device_ptr(&self.stream);
            // SAFETY: both are live allocations of this context: `src` holds `bytes` bytes (the
            // slice's length times its element size) and `dst` at least as many (whole words
            // for the same count); the copy is ordered on this stream, which the guards record.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
            }
            .map_err(|e| device_error("device to device copy", e))?;
        }
        Ok(out)
    }

    /// The words of `buf` as a slice of `len` elements of `T`, without a copy when contra owns
    /// them (the slice owns the allocation from here), else copied; the slice belongs to
    /// `stream` (frees there), contra's own by default. The caller checked that `T` is the
    /// buffer's element type, and orders `stream`'s use after contra's work.
    pub fn release_slice<T>(
        &self,
        buf: CudaBuf,
        len: usize,
        stream: Option<&Arc<CudaStream>>,
    ) -> Result<CudaSlice<T>> {
        let stream = stream.unwrap_or(&self.stream);
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Device(format!(
                "the stream belongs to another CUDA context than contra's on cuda:{}",
                self.ordinal
            )));
        }
        let mut buf = if buf.lender.is_some() {
            self.duplicate(&buf)?
        } else {
            buf
        };
        // SAFETY: `words` is taken once and `buf` is forgotten right after, so its drop does
        // not see the taken slice (an owned buffer has no lender to release).
        let words = unsafe { ManuallyDrop::take(&mut buf.words) };
        std::mem::forget(buf);
        let ptr = words.leak();
        // SAFETY: `ptr` is the live allocation `leak` gave up (of this context, like `stream`),
        // of at least `len` elements of `T` (the buffer's element type and count); the new
        // slice owns and frees it.
        Ok(unsafe { stream.upgrade_device_ptr::<T>(ptr, len) })
    }

    /// The GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String> {
        self.ctx
            .name()
            .map_err(|e| device_error("cuDeviceGetName", e))
    }

    /// cuBLAS, loaded on first use; `None` when the library is not found.
    fn blas(&self) -> Option<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only probes whether libcublas can be loaded (cudarc panics on first use
                // otherwise).
                #[cfg(not(feature = "candle-cuda"))]
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return None;
                }
                CudaBlas::new(self.stream.clone()).ok()
            })
            .as_ref()
    }

    /// Waits for the stream unless a [`Backend::timed`] measurement is running.
    fn sync_after(&self, what: &str) -> Result<()> {
        if !self.sync_launches.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.stream
            .synchronize()
            .map_err(|e| device_error(&format!("running `{what}`"), e))
    }

    /// What runs the encoder's GEMMs on this GPU: "cuBLAS", or our kernel when libcublas is
    /// not on the library path.
    #[cfg(feature = "nn")]
    pub fn gemm_library(&self) -> &'static str {
        match self.blas() {
            Some(_) => "cuBLAS",
            None => "contra nn_gemm_f32 (libcublas not found)",
        }
    }

    /// Raises `function`'s dynamic shared-memory limit to `dynamic` bytes. The driver's default
    /// limit is 48 KB less the kernel's static shared memory, so a kernel with static arrays
    /// needs this even below 48 KB of dynamic memory; the request is checked against the GPU's
    /// per-block maximum first, so that a request too large is an error that names both sizes.
    fn allow_dynamic_shared(
        &self,
        function: &CudaFunction,
        kernel: &str,
        dynamic: usize,
    ) -> Result<()> {
        let error = |what: &str, e| device_error(&format!("`{kernel}`: {what}"), e);
        let static_bytes = function
            .shared_size_bytes()
            .map_err(|e| error("reading its static shared memory", e))?;
        let per_block = self.shared_optin().ok_or_else(|| {
            Error::Device(format!(
                "`{kernel}`: the driver does not say how much shared memory a block may have on cuda:{}",
                self.ordinal
            ))
        })?;
        let static_bytes = static_bytes.max(0) as usize;
        if static_bytes.saturating_add(dynamic) > per_block {
            return Err(Error::Device(format!(
                "`{kernel}` needs {dynamic} B of dynamic shared memory next to its {static_bytes} B \
                 of static shared memory, over the {per_block} B a block may have on cuda:{}",
                self.ordinal
            )));
        }
        // `dynamic` is at most `per_block`, an i32, so the cast is exact.
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic as i32,
            )
            .map_err(|e| error(&format!("allowing {dynamic} B of dynamic shared memory"), e))
    }

    /// The GPU's opt-in shared memory per block, asked of the driver once.
    fn shared_optin(&self) -> Option<usize> {
        *self.shared_per_block.get_or_init(|| {
            self.ctx
                .attribute(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .ok()
                .map(|bytes| bytes.max(0) as usize)
        })
    }

    /// The GPU's SM count, asked of the driver once.
    fn multiprocessor_count(&self) -> Option<usize> {
        *self.multiprocessors.get_or_init(|| {
            self.ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .ok()
                .and_then(|count| usize::try_from(count).ok())
        })
    }

    /// Whether the GPU is compute capability 9.0, asked of the driver once (no: it could not say).
    fn is_hopper(&self) -> bool {
        *self.hopper.get_or_init(|| {
            let attribute = |a| self.ctx.attribute(a).ok();
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) == Some(9)
                && attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                    == Some(0)
        })
    }

    /// `kernel` (of module `module`), looked up on its first launch, with its dynamic
    /// shared-memory limit raised to `dynamic` bytes unless an earlier launch raised it as far.
    fn function(
        &self,
        module: &'static str,
        kernel: &'static str,
        dynamic: usize,
    ) -> Result<CudaFunction> {
        self.with_loaded(module, kernel, dynamic, |loaded| {
            Ok(loaded.function.clone())
        })
    }

    /// Runs `work` on `kernel` as `function` prepares it, under the kernels' lock.
    fn with_loaded<R>(
        &self,
        module: &'static str,
        kernel: &'static str,
        dynamic: usize,
        work: impl FnOnce(&mut LoadedKernel) -> Result<R>,
    ) -> Result<R> {
        let mut kernels = self
            .kernels
            .lock()
            .map_err(|_| Error::Device("poisoned lock".into()))?;
        let loaded = match kernels.entry(kernel) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let function = self
                    .module(module, kernel)?
                    .load_function(kernel)
                    .map_err(|e| device_error(&format!("kernel `{kernel}`"), e))?;
                entry.insert(LoadedKernel {
                    function,
                    dynamic_limit: 0,
                    occupancy: None,
                })
            }
        };
        if dynamic > loaded.dynamic_limit {
            self.allow_dynamic_shared(&loaded.function, kernel, dynamic)?;
            loaded.dynamic_limit = dynamic;
        }
        work(loaded)
    }

    /// The module (kernels/<name>.cu) holding `kernel`, loaded on first use.
    fn module(&self, name: &'static str, kernel: &str) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| Error::Device("poisoned lock".into()))?;
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        let (stem, fatbin) = FATBINS
            .iter()
            .find(|(stem, _)| *stem == name)
            .ok_or_else(|| Error::Device(format!("no module `{name}` for kernel `{kernel}`")))?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
            .map_err(|e| {
                device_error(
                    &format!("loading module {stem} on cuda:{}", self.ordinal),
                    e,
                )
            })?;
        modules.insert(stem, module.clone());
        Ok(module)
    }
}

/// A device allocation of 32-bit words and what they hold: contra's own, or a range of a
/// caller's allocation that `lender` keeps alive (never freed here).
pub(crate) struct CudaBuf {
    words: ManuallyDrop<CudaSlice<u32>>,
    info: BufInfo,
    ordinal: usize,
    /// Only kept alive, never read: unwinding cannot see it half-changed.
    lender: Option<AssertUnwindSafe<Arc<dyn Any + Send + Sync>>>,
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        // SAFETY: `words` is taken once, here, and not used afterwards.
        let words = unsafe { ManuallyDrop::take(&mut self.words) };
        if self.lender.is_some() {
            // The lender's allocation: forget the pointer, its owner frees it.
            words.leak();
        }
    }
}

impl CudaBuf {
    fn owned(words: CudaSlice<u32>, info: BufInfo, ordinal: usize) -> CudaBuf {
        CudaBuf {
            words: ManuallyDrop::new(words),
            info,
            ordinal,
            lender: None,
        }
    }

    pub fn info(&self) -> BufInfo {
        self.info
    }

    /// The GPU holding the buffer.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;

    fn gemm(&self, shape: &GemmShape, a: &CudaBuf, b: &CudaBuf, c: &CudaBuf) -> Result<()> {
        let Some(blas) = self.blas() else {
            return gemm_kernel(self, shape, a, b, c);
        };
        shape.check([a.info, b.info, c.info])?;
        let (lda, ldb, ldc) = shape.strides();
        let op = |transposed: bool| match transposed {
            true => cublasOperation_t::CUBLAS_OP_T,
            false => cublasOperation_t::CUBLAS_OP_N,
        };
        let ptr = |buf: &CudaBuf| self.ptr(buf).cast::<f32>();
        // cuBLAS is column-major, where a row-major matrix reads as its transpose: row-major
        // c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T, so b goes first.
        // SAFETY: a, b and c are live allocations of this context holding at least the f32
        // elements the shape and strides address (`check` above); alpha and beta are host
        // values that outlive the call (host pointer mode, read before it returns); the handle
        // belongs to this context's stream.
        let (n, m, k) = (
            extent("n", shape.n)?,
            extent("m", shape.m)?,
            extent("k", shape.k)?,
        );
        let (lda, ldb, ldc) = (
            extent("lda", lda)?,
            extent("ldb", ldb)?,
            extent("ldc", ldc)?,
        );
        unsafe {
            cudarc::cublas::result::sgemm(
                *blas.handle(),
                op(shape.trans_b),
                op(shape.trans_a),
                n,
                m,
                k,
                &shape.alpha,
                ptr(b),
                ldb,
                ptr(a),
                lda,
                &shape.beta,
                ptr(c),
                ldc,
            )
        }
        .map_err(|e| device_error("cublasSgemm", e))?;
        self.sync_after("cublasSgemm")
    }

    fn timed<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        let event = || {
            self.stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| device_error("recording a CUDA event", e))
        };
        let start = event()?;
        self.sync_launches.store(false, Ordering::Relaxed);
        let out = work();
        self.sync_launches
            .store(sync_launches_asked(), Ordering::Relaxed);
        let end = event()?;
        // Surfaces any error of the launches left asynchronous.
        self.stream
            .synchronize()
            .map_err(|e| device_error("running the timed launches", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| device_error("reading CUDA event times", e))?;
        Ok((out?, ms as f64))
    }

    fn upload_words(&self, _name: &'static str, words: &[u32], info: BufInfo) -> Result<CudaBuf> {
        let words = if words.is_empty() {
            self.stream.alloc_zeros(1)
        } else {
            count_to_device(words.len());
            self.stream.clone_htod(words)
        }
        .map_err(|e| device_error("host to device copy", e))?;
        Ok(CudaBuf::owned(words, info, self.ordinal))
    }

    fn output_of(&self, name: &'static str, info: BufInfo) -> Result<CudaBuf> {
        let words = self
            .stream
            .alloc_zeros(info.elem.words(info.count).max(1))
            .map_err(|e| device_error(&format!("allocating `{name}`"), e))?;
        Ok(CudaBuf::owned(words, info, self.ordinal))
    }

    fn duplicate(&self, buf: &CudaBuf) -> Result<CudaBuf> {
        let words = self
            .stream
            .clone_dtod(&*buf.words)
            .map_err(|e| device_error("device to device copy", e))?;
        Ok(CudaBuf::owned(words, buf.info, self.ordinal))
    }

    fn adopt(&self, buf: CudaBuf) -> Result<DeviceBuf> {
        Ok(DeviceBuf::Cuda(buf))
    }

    fn resident<'a>(&self, buf: &'a DeviceBuf) -> Option<&'a CudaBuf> {
        match buf {
            DeviceBuf::Cuda(buf) if buf.ordinal == self.ordinal => Some(buf),
            _ => None,
        }
    }

    fn zeros(&self, name: &'static str, len: usize) -> Result<CudaBuf> {
        // Output buffers are allocated zeroed here: no host round trip.
        self.output(name, len)
    }

    fn ptr(&self, buf: &CudaBuf) -> *mut c_void {
        let (ptr, _sync) = buf.words.device_ptr(&self.stream);
        ptr as usize as *mut c_void
    }

    fn info(&self, buf: &CudaBuf) -> BufInfo {
        buf.info
    }

    fn download_words(&self, buf: &CudaBuf) -> Result<Vec<u32>> {
        count_to_host(buf.info.elem.words(buf.info.count));
        let mut words = self
            .stream
            .clone_dtoh(&*buf.words)
            .map_err(|e| device_error("device to host copy", e))?;
        words.truncate(buf.info.elem.words(buf.info.count));
        Ok(words)
    }

    fn concurrent_blocks<P: KernelParams>(
        &self,
        kernel: Kernel<P>,
        launch: &Launch,
    ) -> Option<usize> {
        let threads = launch
            .block
            .iter()
            .try_fold(1u32, |all, &along| all.checked_mul(along))?;
        let asked = (threads, launch.shared_bytes);
        // Loads the kernel and allows its shared memory, as the launch that follows would; the
        // driver is asked once per block size and shared memory.
        let per_sm = self
            .with_loaded(kernel.module, kernel.name, launch.shared_bytes, |loaded| {
                if let Some((seen, per_sm)) = loaded.occupancy {
                    if seen == asked {
                        return Ok(per_sm);
                    }
                }
                let per_sm = loaded
                    .function
                    .occupancy_max_active_blocks_per_multiprocessor(threads, asked.1, None)
                    .map_err(|e| device_error("occupancy", e))?;
                loaded.occupancy = Some((asked, per_sm));
                Ok(per_sm)
            })
            .ok()?;
        usize::try_from(per_sm)
            .ok()?
            .checked_mul(self.multiprocessor_count()?)
    }

    fn runs_sm90a(&self) -> bool {
        self.is_hopper() && super::sm90a_allowed()
    }

    fn shared_bytes_per_block(&self) -> usize {
        // The driver's answer, or the launch layer's own bound if it cannot give one (a launch
        // past the GPU's figure is still refused with a clear error).
        self.shared_optin()
            .unwrap_or(super::MAX_DYNAMIC_SHARED_BYTES)
    }

    fn launch<P: KernelParams>(
        &self,
        kernel: Kernel<P>,
        launch: Launch,
        params: &P,
        _written: &[&CudaBuf],
    ) -> Result<()> {
        let (module, kernel) = (kernel.module, kernel.name);
        let (grid, block) = launch.dims(kernel)?;
        let function = self.function(module, kernel, launch.shared_bytes)?;
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (block[0], block[1], block[2]),
            shared_mem_bytes: launch.shared_bytes as u32,
        };
        let mut builder = self.stream.launch_builder(&function);
        builder.arg(params);
        // SAFETY: `function` is `kernel`, whose single parameter has type `P` (the handle's type,
        // generated from the kernel's export in its source); every pointer in `params` is a live device allocation of this
        // context sized for the shapes validated by the op; the grid covers what the kernel
        // expects (see the launch-shape functions next to each launch).
        unsafe { builder.launch(cfg) }
            .map_err(|e| device_error(&format!("launching `{kernel}`"), e))?;
        self.sync_after(kernel)
    }
}
