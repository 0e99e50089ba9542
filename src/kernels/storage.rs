//! Device-resident tensor storage: a kernel backend's buffer behind an `Arc`, the encoding of
//! host values as the 32-bit words buffers hold, and the counters of host-device copies.

use std::cell::Cell;

use half::{bf16, f16};

use super::{interp, Backend, BufInfo, Elem};
use crate::tensor::HostData;
use crate::{Device, Result};

/// A buffer of one kernel backend, owned by a device-resident tensor.
pub(crate) enum DeviceBuf {
    Interp(interp::GuardedBuf),
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaBuf),
}

impl std::fmt::Debug for DeviceBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuf({:?} on {})", self.info(), self.device())
    }
}

impl DeviceBuf {
    pub fn info(&self) -> BufInfo {
        match self {
            DeviceBuf::Interp(buf) => interp::Interp.info(buf),
            #[cfg(feature = "cuda")]
            DeviceBuf::Cuda(buf) => buf.info(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            DeviceBuf::Interp(_) => Device::Interp,
            #[cfg(feature = "cuda")]
            DeviceBuf::Cuda(buf) => Device::Cuda(buf.ordinal()),
        }
    }

    /// The buffer's words, copied to the host (one counted transfer).
    pub fn download_words(&self) -> Result<Vec<u32>> {
        match self {
            DeviceBuf::Interp(buf) => interp::Interp.download_words(buf),
            #[cfg(feature = "cuda")]
            DeviceBuf::Cuda(buf) => super::cuda::Cuda::get(buf.ordinal())?.download_words(buf),
        }
    }

    /// A copy converted to `elem` on the same device, when a cast kernel converts these types
    /// directly (f32 to and from the others, f64 to f32); `None` otherwise.
    pub fn cast(&self, elem: Elem) -> Result<Option<DeviceBuf>> {
        let from = self.info().elem;
        let direct = matches!((from, elem), (Elem::F32, _) | (_, Elem::F32))
            && !matches!((from, elem), (Elem::I32, _) | (_, Elem::I32));
        if !direct {
            return Ok(None);
        }
        match self {
            DeviceBuf::Interp(buf) => {
                let b = &interp::Interp;
                Ok(Some(b.adopt(super::elementwise::cast(b, buf, elem)?)?))
            }
            #[cfg(feature = "cuda")]
            DeviceBuf::Cuda(buf) => {
                let cuda = super::cuda::Cuda::get(buf.ordinal())?;
                let b = &*cuda;
                Ok(Some(b.adopt(super::elementwise::cast(b, buf, elem)?)?))
            }
        }
    }

    /// A copy on the same device (no host round trip): what a write to a shared buffer copies
    /// first, so that clones of a tensor stay independent values.
    pub fn duplicate(&self) -> Result<DeviceBuf> {
        match self {
            DeviceBuf::Interp(buf) => Ok(DeviceBuf::Interp(interp::Interp.duplicate(buf)?)),
            #[cfg(feature = "cuda")]
            DeviceBuf::Cuda(buf) => {
                let cuda = super::cuda::Cuda::get(buf.ordinal())?;
                Ok(DeviceBuf::Cuda(cuda.duplicate(buf)?))
            }
        }
    }
}

/// Copies host values to `device` (a kernel device; one counted transfer).
pub(crate) fn upload(device: Device, name: &'static str, data: &HostData) -> Result<DeviceBuf> {
    let (words, info) = encode(data);
    upload_words(device, name, &words, info)
}

/// Copies `words`, which encode `info.count` elements, to `device` (one counted transfer).
pub(crate) fn upload_words(
    device: Device,
    name: &'static str,
    words: &[u32],
    info: BufInfo,
) -> Result<DeviceBuf> {
    match device {
        Device::Interp => Ok(DeviceBuf::Interp(
            interp::Interp.upload_words(name, words, info)?,
        )),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let cuda = super::cuda::Cuda::get(ordinal)?;
            Ok(DeviceBuf::Cuda(cuda.upload_words(name, words, info)?))
        }
        _ => Err(crate::Error::Device(format!(
            "{device} is not a kernel device (no buffer to upload to)"
        ))),
    }
}

/// A buffer of `count` zeros of `dtype` on `device`, filled there (no copy).
pub(crate) fn zeros(device: Device, count: usize, dtype: crate::DType) -> Result<DeviceBuf> {
    let info = BufInfo {
        elem: elem_of(dtype),
        count,
    };
    match device {
        Device::Interp => Ok(DeviceBuf::Interp(interp::GuardedBuf::zeroed(
            "tensor", info,
        ))),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let cuda = super::cuda::Cuda::get(ordinal)?;
            // Device allocations are zeroed there (cuMemsetD8).
            Ok(DeviceBuf::Cuda(cuda.output_of("tensor", info)?))
        }
        _ => Err(crate::Error::Device(format!(
            "{device} is not a kernel device (no buffer to fill)"
        ))),
    }
}

/// The element type of a buffer holding `dtype` values.
pub(crate) fn elem_of(dtype: crate::DType) -> Elem {
    match dtype {
        crate::DType::F32 => Elem::F32,
        crate::DType::F64 => Elem::F64,
        crate::DType::Bf16 => Elem::Bf16,
        crate::DType::F16 => Elem::F16,
    }
}

/// Host values as buffer words: f32 one per word, f64 two (low word first), 16-bit floats two
/// per word (element `2i` in the low half).
fn encode(data: &HostData) -> (Vec<u32>, BufInfo) {
    fn pack(bits: impl ExactSizeIterator<Item = u16>) -> Vec<u32> {
        let bits: Vec<u16> = bits.collect();
        bits.chunks(2)
            .map(|pair| pair[0] as u32 | (pair.get(1).copied().unwrap_or(0) as u32) << 16)
            .collect()
    }
    let (words, elem, count) = match data {
        HostData::F32(v) => (v.iter().map(|x| x.to_bits()).collect(), Elem::F32, v.len()),
        HostData::F64(v) => (
            v.iter()
                .flat_map(|x| [x.to_bits() as u32, (x.to_bits() >> 32) as u32])
                .collect(),
            Elem::F64,
            v.len(),
        ),
        HostData::Bf16(v) => (pack(v.iter().map(|x| x.to_bits())), Elem::Bf16, v.len()),
        HostData::F16(v) => (pack(v.iter().map(|x| x.to_bits())), Elem::F16, v.len()),
    };
    (words, BufInfo { elem, count })
}

/// The inverse of [`encode`]; i32 buffers decode as their f32 bit patterns.
pub(crate) fn decode(words: &[u32], info: BufInfo) -> HostData {
    let halves = || {
        words
            .iter()
            .flat_map(|&w| [w as u16, (w >> 16) as u16])
            .take(info.count)
    };
    match info.elem {
        Elem::F32 | Elem::I32 => HostData::F32(words.iter().map(|&w| f32::from_bits(w)).collect()),
        Elem::F64 => HostData::F64(
            words
                .chunks_exact(2)
                .map(|w| f64::from_bits(w[0] as u64 | (w[1] as u64) << 32))
                .collect(),
        ),
        Elem::Bf16 => HostData::Bf16(halves().map(bf16::from_bits).collect()),
        Elem::F16 => HostData::F16(halves().map(f16::from_bits).collect()),
    }
}

/// Host-device copies made by the current thread since it started, counted by the kernel
/// backends (Interp and Cuda) for every upload and download: tensor moves, op inputs, and the
/// reads of results.
///
/// A training step on device-resident tensors should show one small read (the loss) and
/// nothing else; subtract two readings to see what a piece of code moved:
///
/// ```
/// use contra::{Device, Tensor, Transfers};
/// let before = Transfers::current();
/// let x = Tensor::from_vec(vec![1.0f32; 6], &[2, 3], Device::Interp)?; // one upload
/// let moved = Transfers::current() - before;
/// assert_eq!((moved.to_device, moved.to_device_bytes), (1, 24));
/// assert_eq!(moved.to_host, 0);
/// # Ok::<(), contra::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host-to-device copies.
    pub to_device: u64,
    /// Bytes those copies moved (whole 32-bit words: a buffer of an odd number of 16-bit
    /// values counts its padding).
    pub to_device_bytes: u64,
    /// Device-to-host copies.
    pub to_host: u64,
    /// Bytes those copies moved.
    pub to_host_bytes: u64,
}

thread_local! {
    static TRANSFERS: Cell<Transfers> = const {
        Cell::new(Transfers { to_device: 0, to_device_bytes: 0, to_host: 0, to_host_bytes: 0 })
    };
}

impl Transfers {
    /// The counts of the current thread so far.
    pub fn current() -> Transfers {
        TRANSFERS.with(Cell::get)
    }

    /// Bytes moved either way.
    pub fn bytes(&self) -> u64 {
        self.to_device_bytes + self.to_host_bytes
    }

    /// Copies either way.
    pub fn copies(&self) -> u64 {
        self.to_device + self.to_host
    }
}

impl std::ops::Sub for Transfers {
    type Output = Transfers;
    fn sub(self, earlier: Transfers) -> Transfers {
        Transfers {
            to_device: self.to_device - earlier.to_device,
            to_device_bytes: self.to_device_bytes - earlier.to_device_bytes,
            to_host: self.to_host - earlier.to_host,
            to_host_bytes: self.to_host_bytes - earlier.to_host_bytes,
        }
    }
}

impl std::fmt::Display for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} copies to the device ({} bytes), {} to the host ({} bytes)",
            self.to_device, self.to_device_bytes, self.to_host, self.to_host_bytes
        )
    }
}

/// Records one host-to-device copy of `words` 32-bit words.
pub(crate) fn count_to_device(words: usize) {
    record(|t| (&mut t.to_device, &mut t.to_device_bytes), words);
}

/// Records one device-to-host copy of `words` 32-bit words.
pub(crate) fn count_to_host(words: usize) {
    record(|t| (&mut t.to_host, &mut t.to_host_bytes), words);
}

/// Adds one copy of `words` words to the counters `which` picks.
fn record(which: impl FnOnce(&mut Transfers) -> (&mut u64, &mut u64), words: usize) {
    TRANSFERS.with(|cell| {
        let mut now = cell.get();
        let (copies, bytes) = which(&mut now);
        *copies += 1;
        *bytes += 4 * words as u64;
        cell.set(now);
    });
}
