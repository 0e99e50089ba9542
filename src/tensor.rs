//! A dense row-major tensor that knows its element type and device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::checks::Checks;
use crate::kernels::storage::{self, DeviceBuf};
use crate::kernels::BufInfo;
use crate::{Device, Error, Result};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    Bf16,
    F16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::Bf16 | DType::F16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        };
        f.write_str(name)
    }
}

/// Host storage, one variant per element type.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub enum HostData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

mod sealed {
    pub trait Sealed {}
}

/// The element types a [`Tensor`] can hold: `f32`, `f64`, `half::bf16`, `half::f16`.
pub trait Element: sealed::Sealed + Copy + Send + Sync + std::fmt::Debug + 'static {
    const DTYPE: DType;
    #[doc(hidden)]
    fn slice(data: &HostData) -> Option<&[Self]>;
    #[doc(hidden)]
    fn slice_mut(data: &mut HostData) -> Option<&mut [Self]>;
    #[doc(hidden)]
    fn wrap(values: Vec<Self>) -> HostData;
    fn to_f64(self) -> f64;
    fn from_f64(value: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(data: &HostData) -> Option<&[Self]> {
                match data {
                    HostData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(data: &mut HostData) -> Option<&mut [Self]> {
                match data {
                    HostData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(values: Vec<Self>) -> HostData {
                HostData::$variant(values)
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(value: f64) -> Self {
                $from(value)
            }
        }
    };
}

element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, |x: f64| x, |v: f64| v);
element!(bf16, Bf16, bf16::to_f64, bf16::from_f64);
element!(f16, F16, f16::to_f64, f16::from_f64);

fn convert<S: Element, T: Element>(values: &[S]) -> Vec<T> {
    values.iter().map(|&x| T::from_f64(x.to_f64())).collect()
}

impl HostData {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F64(_) => DType::F64,
            HostData::Bf16(_) => DType::Bf16,
            HostData::F16(_) => DType::F16,
        }
    }

    pub(crate) fn to_vec<T: Element>(&self) -> Vec<T> {
        match self {
            HostData::F32(v) => convert(v),
            HostData::F64(v) => convert(v),
            HostData::Bf16(v) => convert(v),
            HostData::F16(v) => convert(v),
        }
    }

    pub(crate) fn to_dtype(&self, dtype: DType) -> HostData {
        match dtype {
            DType::F32 => HostData::F32(self.to_vec()),
            DType::F64 => HostData::F64(self.to_vec()),
            DType::Bf16 => HostData::Bf16(self.to_vec()),
            DType::F16 => HostData::F16(self.to_vec()),
        }
    }
}

/// The element count of `shape`, or an error naming `arg` when the product of the extents (or
/// its size in bytes) overflows: a wrapped product would describe a buffer far larger than the
/// one that exists.
pub(crate) fn checked_numel(
    op: &'static str,
    arg: &'static str,
    shape: &[usize],
    dtype: DType,
) -> Result<usize> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &extent| acc.checked_mul(extent));
    match numel {
        Some(n) if n.checked_mul(dtype.size()).is_some_and(|bytes| bytes <= isize::MAX as usize) => {
            Ok(n)
        }
        _ => Err(Error::invalid(
            op,
            arg,
            format!("{shape:?} holds more {dtype} elements than fit in memory (the product of the extents overflows)"),
        )),
    }
}

/// Where a tensor's elements live, with the key that stands for their values in the
/// fingerprints of saved forward states (see [`Tensor::content_key`]).
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    /// Host memory; `key` is known when the values came from a device (else hashed on demand).
    Host { data: HostData, key: Option<u64> },
    /// A kernel backend's buffer, shared by clones until one of them is written (copy on
    /// write). `key` is the hash of the values uploaded into it, or a fresh id for values a
    /// kernel wrote (no host scan).
    Device { buf: Arc<DeviceBuf>, key: u64 },
}

/// A fresh content key for values only a kernel has seen.
pub(crate) fn fresh_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // Odd multiples of a large odd constant: distinct, and spread like the value hashes.
    NEXT.fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A 64-bit hash of the values (FxHash-style multiply-rotate over each element's bits, widened
/// to 64): the content key of host values, the same wherever they are copied.
fn hash_values(data: &HostData) -> u64 {
    match data {
        HostData::F32(v) => hash_bits(v, |x| x.to_bits() as u64),
        HostData::F64(v) => hash_bits(v, |x| x.to_bits()),
        HostData::Bf16(v) => hash_bits(v, |x| x.to_bits() as u64),
        HostData::F16(v) => hash_bits(v, |x| x.to_bits() as u64),
    }
}

/// Elements per parallel block of the whole-tensor scans (hash, finiteness).
const SCAN_BLOCK: usize = 1 << 16;

/// The multiply-rotate hash over blocks of [`SCAN_BLOCK`] elements in parallel, each block in
/// eight independent lanes (one serial chain ran at a multiply's latency per element: the
/// fingerprint of a 65536 x 128 input took 28 ms), the lanes and then the blocks folded in order,
/// so the result does not depend on the thread count.
fn hash_bits<T: Sync>(values: &[T], bits: impl Fn(&T) -> u64 + Sync) -> u64 {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    let fold = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let block_hashes: Vec<u64> = values
        .par_chunks(SCAN_BLOCK)
        .map(|block| {
            let mut lanes = [0u64; 8];
            let chunks = block.chunks_exact(8);
            let tail = chunks.remainder();
            for chunk in chunks {
                for (lane, x) in lanes.iter_mut().zip(chunk) {
                    *lane = fold(*lane, bits(x));
                }
            }
            let lanes = lanes.iter().fold(0, |h, &lane| fold(h, lane));
            tail.iter().fold(lanes, |h, x| fold(h, bits(x)))
        })
        .collect();
    block_hashes
        .iter()
        .fold(values.len() as u64, |h, &b| fold(h, b))
}

/// A dense, row-major tensor on a [`Device`].
///
/// On `Device::Cpu` the elements live in host memory; on `Device::Interp` and `Device::Cuda`
/// they live in a buffer of that device (for the interpreted mode a guard-banded host buffer
/// that stands for device memory). Ops leave their outputs where their inputs are; moving is
/// explicit ([`Tensor::to_device`], [`Tensor::to_host`], and the reads [`Tensor::to_vec`],
/// [`Tensor::to_scalar`]), and every move between host and device is counted in
/// [`Transfers`](crate::Transfers). Cloning a device tensor shares its buffer until one of the
/// clones is written in place, which copies it on the device first.
///
/// ```
/// use contra::{Device, Tensor};
/// let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], Device::Cpu)?;
/// assert_eq!(x.shape(), &[2, 2]);
/// let on_device = x.to_device(Device::Interp)?;
/// assert_eq!(on_device.to_vec::<f32>()?, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), contra::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    device: Device,
    dtype: DType,
    pub(crate) storage: Storage,
    /// The finiteness checks of the op (or ops) that made this tensor, verified when it is read.
    checks: Vec<Arc<Checks>>,
}

impl Tensor {
    /// Wraps `values` (row-major) as a tensor of `shape` on `device` (on a kernel device: one
    /// copy to it).
    pub fn from_vec<T: Element>(values: Vec<T>, shape: &[usize], device: Device) -> Result<Self> {
        let numel = checked_numel("Tensor::from_vec", "shape", shape, T::DTYPE)?;
        if numel != values.len() {
            return Err(Error::shape(
                "Tensor::from_vec",
                "values",
                &[values.len()],
                format!("{numel} elements for shape {shape:?}"),
            ));
        }
        Self::from_host(shape.to_vec(), T::wrap(values), device)
    }

    /// Copies `values` into a new tensor.
    pub fn from_slice<T: Element>(values: &[T], shape: &[usize], device: Device) -> Result<Self> {
        Self::from_vec(values.to_vec(), shape, device)
    }

    /// A tensor of zeros (on a kernel device: filled there, no copy).
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        let numel = checked_numel("Tensor::zeros", "shape", shape, dtype)?;
        if device != Device::Cpu {
            check_available(device)?;
            let buf = storage::zeros(device, numel, dtype)?;
            return Ok(Self::from_device_buf(shape.to_vec(), dtype, buf));
        }
        let data = match dtype {
            DType::F32 => HostData::F32(vec![0.0; numel]),
            DType::F64 => HostData::F64(vec![0.0; numel]),
            DType::Bf16 => HostData::Bf16(vec![bf16::ZERO; numel]),
            DType::F16 => HostData::F16(vec![f16::ZERO; numel]),
        };
        Self::from_host(shape.to_vec(), data, device)
    }

    /// A tensor of `data` on `device`: host storage on the CPU, one copy to a kernel device.
    pub(crate) fn from_host(shape: Vec<usize>, data: HostData, device: Device) -> Result<Self> {
        Self::from_host_keyed(shape, data, None, device)
    }

    /// [`Tensor::from_host`] with the content key of `data` when it is already known.
    fn from_host_keyed(
        shape: Vec<usize>,
        data: HostData,
        key: Option<u64>,
        device: Device,
    ) -> Result<Self> {
        let dtype = data.dtype();
        if device == Device::Cpu {
            return Ok(Tensor {
                shape,
                device,
                dtype,
                storage: Storage::Host { data, key },
                checks: Vec::new(),
            });
        }
        check_available(device)?;
        let key = key.unwrap_or_else(|| hash_values(&data));
        let buf = storage::upload(device, "tensor", &data)?;
        Ok(Tensor {
            shape,
            device,
            dtype,
            storage: Storage::Device {
                buf: Arc::new(buf),
                key,
            },
            checks: Vec::new(),
        })
    }

    /// A device-resident tensor owning `buf` (the kernels' output buffers become tensors so).
    pub(crate) fn from_device_buf(shape: Vec<usize>, dtype: DType, buf: DeviceBuf) -> Tensor {
        Tensor {
            shape,
            device: buf.device(),
            dtype,
            storage: Storage::Device {
                buf: Arc::new(buf),
                key: fresh_key(),
            },
            checks: Vec::new(),
        }
    }

    /// A device-resident tensor over `buf` (which may hold more words than its elements: the
    /// loss's status words) whose reads verify `checks`.
    pub(crate) fn from_device_buf_shared(
        shape: Vec<usize>,
        dtype: DType,
        buf: Arc<DeviceBuf>,
        checks: Arc<Checks>,
    ) -> Tensor {
        Tensor {
            shape,
            device: buf.device(),
            dtype,
            storage: Storage::Device {
                buf,
                key: fresh_key(),
            },
            checks: vec![checks],
        }
    }

    /// The checks its reads verify.
    pub(crate) fn checks(&self) -> &[Arc<Checks>] {
        &self.checks
    }

    /// Replaces the checks of a device tensor written in place (the new ones cover its previous
    /// contents too).
    pub(crate) fn set_checks(&mut self, checks: &Arc<Checks>) {
        if self.device_buf().is_some() {
            self.checks = vec![checks.clone()];
        }
    }

    /// The tensor, its reads also verifying `checks` (the checks of the op that made it).
    pub(crate) fn with_checks(mut self, checks: &Arc<Checks>) -> Tensor {
        if self.device_buf().is_some() {
            self.checks.push(checks.clone());
        }
        self
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements; the constructors checked that it fits (no wrapping product).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The elements as host storage: borrowed on the CPU, copied from a device (one copy, which
    /// also brings the loss's status words; a marked word is the error of its check).
    fn host_data(&self) -> Result<std::borrow::Cow<'_, HostData>> {
        let buf = match &self.storage {
            Storage::Host { data, .. } => return Ok(std::borrow::Cow::Borrowed(data)),
            Storage::Device { buf, .. } => buf,
        };
        let info = BufInfo {
            elem: storage::elem_of(self.dtype),
            count: self.numel(),
        };
        let words = buf.download_words()?;
        let (values, tail) = words.split_at(info.elem.words(info.count).min(words.len()));
        for checks in &self.checks {
            checks.verify(checks.lives_in(buf).then_some(tail))?;
        }
        Ok(std::borrow::Cow::Owned(storage::decode(values, info)))
    }

    /// The elements, row-major, as `T`; `T` must be the tensor's dtype. A device tensor is
    /// copied to the host (the read that synchronises with the device).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::Mismatch {
                op: "Tensor::to_vec",
                reason: format!("tensor holds {}, asked for {}", self.dtype(), T::DTYPE),
            });
        }
        let data = self.host_data()?;
        Ok(T::slice(&data).map(<[T]>::to_vec).unwrap_or_default())
    }

    /// The elements converted to f64, whatever the dtype (copied to the host from a device).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        Ok(self.host_data()?.to_vec())
    }

    /// The value of a tensor of one element (a loss), as f64.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "Tensor::to_scalar",
                "self",
                &self.shape,
                "a single element (a 0-d tensor or any shape of one element)",
            ));
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// A copy converted to `dtype` (rounded to nearest even) on the same device. On a kernel
    /// device a cast kernel converts f32 to and from the other types, and f64 to f32, there;
    /// the other pairs (bf16 or f16 to and from f64) go through the host, rounded once.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if let Storage::Device { buf, .. } = &self.storage {
            if let Some(cast) = buf.cast(storage::elem_of(dtype))? {
                let mut out = Tensor::from_device_buf(self.shape.clone(), dtype, cast);
                out.checks = self.checks.clone();
                return Ok(out);
            }
        }
        let data = self.host_data()?.to_dtype(dtype);
        Self::from_host(self.shape.clone(), data, self.device)
    }

    /// The tensor on `device`: the same storage when it is already there, one copy between the
    /// host and a device, two (through the host) between devices.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device {
            return Ok(self.clone());
        }
        let data = self.host_data()?.into_owned();
        Self::from_host_keyed(self.shape.clone(), data, Some(self.content_key()), device)
    }

    /// The tensor in host memory (`Device::Cpu`).
    pub fn to_host(&self) -> Result<Tensor> {
        self.to_device(Device::Cpu)
    }

    /// A view with another shape of the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let numel = checked_numel("Tensor::reshape", "shape", shape, self.dtype())?;
        if numel != self.numel() {
            return Err(Error::shape(
                "Tensor::reshape",
                "shape",
                shape,
                format!("{} elements like {:?}", self.numel(), self.shape),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The index and value of the first NaN or infinity, if any (no copy on the host).
    pub(crate) fn first_non_finite(&self) -> Result<Option<(usize, f64)>> {
        // Blocks in parallel, each first checked with a loop that vectorizes (no early exit);
        // only a block with a non-finite value is searched for its position.
        fn find<T: Element>(values: &[T]) -> Option<(usize, f64)> {
            values
                .par_chunks(SCAN_BLOCK)
                .enumerate()
                .find_map_first(|(b, block)| {
                    let all_finite = block.iter().fold(true, |ok, v| ok & v.to_f64().is_finite());
                    if all_finite {
                        return None;
                    }
                    let (i, v) = block
                        .iter()
                        .map(|v| v.to_f64())
                        .enumerate()
                        .find(|(_, v)| !v.is_finite())?;
                    Some((b * SCAN_BLOCK + i, v))
                })
        }
        Ok(match &*self.host_data()? {
            HostData::F32(v) => find(v),
            HostData::F64(v) => find(v),
            HostData::Bf16(v) => find(v),
            HostData::F16(v) => find(v),
        })
    }

    /// What stands for the values in a saved state's fingerprint: the hash of the values,
    /// kept across copies between host and devices, or the fresh key of values only a kernel
    /// wrote (no copy to the host).
    pub(crate) fn content_key(&self) -> u64 {
        match &self.storage {
            Storage::Host { key: Some(key), .. } | Storage::Device { key, .. } => *key,
            Storage::Host { data, key: None } => hash_values(data),
        }
    }

    pub(crate) fn host<T: Element>(&self) -> Option<&[T]> {
        match &self.storage {
            Storage::Host { data, .. } => T::slice(data),
            Storage::Device { .. } => None,
        }
    }

    pub(crate) fn host_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            Storage::Host { data, key } => {
                // The values may change: the key is hashed anew when asked for.
                *key = None;
                T::slice_mut(data)
            }
            Storage::Device { .. } => None,
        }
    }

    /// The device buffer of a device-resident tensor.
    pub(crate) fn device_buf(&self) -> Option<&DeviceBuf> {
        match &self.storage {
            Storage::Device { buf, .. } => Some(buf),
            Storage::Host { .. } => None,
        }
    }

    /// The device buffer, owned (copied on the device when a clone shares it), once the checks
    /// of the ops that made it are verified (the raw buffer leaves them behind).
    #[cfg(feature = "cuda")]
    pub(crate) fn into_device_buf(self) -> Result<DeviceBuf> {
        let Storage::Device { buf, .. } = self.storage else {
            return Err(Error::Device("the tensor is in host memory".into()));
        };
        for checks in &self.checks {
            checks.verify(None)?;
        }
        match Arc::try_unwrap(buf) {
            Ok(owned) => Ok(owned),
            Err(shared) => shared.duplicate(),
        }
    }

    /// The device buffer to write in place: copied on the device first when a clone shares it,
    /// and given a fresh content key (its values are about to change).
    pub(crate) fn device_buf_mut(&mut self) -> Result<Option<&DeviceBuf>> {
        match &mut self.storage {
            Storage::Device { buf, key } => {
                if Arc::get_mut(buf).is_none() {
                    *buf = Arc::new(buf.duplicate()?);
                }
                *key = fresh_key();
                Ok(Some(buf))
            }
            Storage::Host { .. } => Ok(None),
        }
    }
}

/// An error unless `device` can hold tensors here.
fn check_available(device: Device) -> Result<()> {
    crate::device_available(device).map_err(|reason| Error::Device(format!("{device}: {reason}")))
}
