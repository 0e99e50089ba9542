//! cudarc interop (feature `cuda`): your own device memory as tensors without a copy, a tensor's
//! memory back as a `CudaSlice`, and contra's kernels on your stream, ordered with your work.
//!
//! ```no_run
//! use contra::cuda::cudarc::driver::CudaContext;
//! use contra::{ntxent, NtXentOptions, Tensor};
//!
//! let ctx = CudaContext::new(0).unwrap();
//! let stream = ctx.new_stream().unwrap();
//! contra::cuda::use_stream(stream.clone())?; // before contra's first use of GPU 0
//! let z = stream.clone_htod(&vec![0.5f32; 8 * 16]).unwrap(); // your allocation
//! let z = Tensor::from_cuda_slice(z, &[8, 16])?; // no copy
//! let out = ntxent(&z, &NtXentOptions::default())?;
//! let grad = out.grad_z.into_cuda_slice::<f32>()?; // no copy
//! assert_eq!(grad.len(), 8 * 16);
//! # Ok::<(), contra::Error>(())
//! ```

use std::sync::Arc;

pub use cudarc;
use cudarc::driver::{CudaSlice, CudaStream};

use crate::kernels::cuda::Cuda;
use crate::kernels::storage::{elem_of, DeviceBuf};
use crate::kernels::BufInfo;
use crate::tensor::checked_numel;
use crate::{Device, Element, Error, Indices, Result, Tensor};

/// Runs contra's work on `stream`'s GPU on `stream`, so that its kernels are ordered with the
/// caller's (a framework's stream, for example). Call it before contra's first op or tensor on
/// that GPU; naming the stream contra already uses is fine.
pub fn use_stream(stream: Arc<CudaStream>) -> Result<()> {
    Cuda::use_stream(stream)
}

/// The stream contra runs its work on for GPU `ordinal` (the one [`use_stream`] set, else the
/// context's default stream): order your work after contra's with it.
pub fn stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    Ok(Cuda::get(ordinal)?.stream().clone())
}

impl Tensor {
    /// Wraps `slice` (row-major `shape`) as a tensor on its GPU, without a copy: the tensor owns
    /// the allocation from here. The slice must belong to the GPU's primary context (the one
    /// `CudaContext::new` gives); work pending on its stream is ordered before contra's. A
    /// 16-bit slice of odd length is copied on the device (contra's buffers are whole 32-bit
    /// words).
    pub fn from_cuda_slice<T: Element>(slice: CudaSlice<T>, shape: &[usize]) -> Result<Tensor> {
        const OP: &str = "Tensor::from_cuda_slice";
        let numel = checked_numel(OP, "shape", shape, T::DTYPE)?;
        if slice.len() != numel {
            return Err(Error::shape(
                OP,
                "slice",
                &[slice.len()],
                format!("{numel} elements for shape {shape:?}"),
            ));
        }
        let cuda = Cuda::get(slice.ordinal())?;
        let info = BufInfo {
            elem: elem_of(T::DTYPE),
            count: numel,
        };
        let buf = if T::DTYPE.size() == 2 && numel % 2 == 1 {
            cuda.copy_slice(&slice, info)?
        } else {
            cuda.adopt_slice(slice, info)?
        };
        Ok(Tensor::from_device_buf(
            shape.to_vec(),
            T::DTYPE,
            DeviceBuf::Cuda(buf),
        ))
    }

    /// `shape`'s elements of `T` from element `offset` of `slice` as a tensor on its GPU that
    /// reads and writes the caller's memory in place (a copy only when the elements do not
    /// start on a 32-bit word, or a 16-bit tail would reach past the slice). The tensor never
    /// frees the memory and holds `lender` as long as it or a clone lives.
    ///
    /// # Safety
    /// `lender` must keep `slice`'s allocation alive (not freed, not reallocated) for as long
    /// as it lives.
    #[cfg(feature = "candle-cuda")]
    pub(crate) unsafe fn borrow_cuda_slice<T: Element>(
        slice: &CudaSlice<T>,
        offset: usize,
        shape: &[usize],
        lender: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<Tensor> {
        const OP: &str = "Tensor::borrow_cuda_slice";
        let numel = checked_numel(OP, "shape", shape, T::DTYPE)?;
        let info = BufInfo {
            elem: elem_of(T::DTYPE),
            count: numel,
        };
        let cuda = Cuda::get(slice.ordinal())?;
        // SAFETY: the caller's contract is `borrow_slice`'s.
        let buf = unsafe { cuda.borrow_slice(slice, offset, info, lender)? };
        Ok(Tensor::from_device_buf(
            shape.to_vec(),
            T::DTYPE,
            DeviceBuf::Cuda(buf),
        ))
    }

    /// The tensor's memory as a `CudaSlice<T>` (`T` the tensor's dtype) on contra's stream,
    /// without a copy when no clone shares it (copied on the device otherwise). The device's
    /// checks of the op that made the tensor are verified first (one small read): a NaN input
    /// or an overflow is the error here.
    pub fn into_cuda_slice<T: Element>(self) -> Result<CudaSlice<T>> {
        self.into_cuda_slice_on(None)
    }

    /// [`Tensor::into_cuda_slice`] with the slice freed on `stream` (a framework's stream that
    /// will use it) instead of contra's.
    pub(crate) fn into_cuda_slice_on<T: Element>(
        self,
        stream: Option<&Arc<CudaStream>>,
    ) -> Result<CudaSlice<T>> {
        const OP: &str = "Tensor::into_cuda_slice";
        let Device::Cuda(ordinal) = self.device() else {
            return Err(Error::Mismatch {
                op: OP,
                reason: format!("the tensor is on {}, not on a GPU", self.device()),
            });
        };
        if T::DTYPE != self.dtype() {
            return Err(Error::Mismatch {
                op: OP,
                reason: format!("the tensor holds {}, asked for {}", self.dtype(), T::DTYPE),
            });
        }
        let numel = self.numel();
        match self.into_device_buf()? {
            DeviceBuf::Cuda(buf) => Cuda::get(ordinal)?.release_slice(buf, numel, stream),
            #[allow(unreachable_patterns)]
            _ => Err(Error::Device(format!("{OP}: no GPU buffer"))),
        }
    }
}

impl Indices {
    /// `len` u32 values from element `offset` of `slice` as indices on its GPU that the kernels
    /// read in place, as i32 (a value of 2^31 or more reads as negative: labels stay equal
    /// exactly where they were, and a positive index out of range is still refused by the op's
    /// check on the device). The indices never free the memory and hold `lender` as long as
    /// they or a clone live.
    ///
    /// # Safety
    /// `lender` must keep `slice`'s allocation alive (not freed, not reallocated) for as long
    /// as it lives.
    #[cfg(feature = "candle-cuda")]
    pub(crate) unsafe fn borrow_cuda_slice(
        slice: &CudaSlice<u32>,
        offset: usize,
        len: usize,
        lender: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<Indices> {
        let info = BufInfo {
            elem: crate::kernels::Elem::I32,
            count: len,
        };
        let cuda = Cuda::get(slice.ordinal())?;
        // SAFETY: the caller's contract is `borrow_slice`'s.
        let buf = unsafe { cuda.borrow_slice(slice, offset, info, lender)? };
        Ok(Indices::from_device_buf(len, DeviceBuf::Cuda(buf)))
    }
}
