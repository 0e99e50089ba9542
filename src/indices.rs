//! Integer arguments (class labels, positive indices) where the ops' tensors are: [`Indices`]
//! on a kernel device are read there by the kernels, so a training step whose labels already
//! live on the device copies nothing for them. Every op that takes labels or positives accepts
//! a host slice (`&[i64]`, `&Vec<i64>`, `&[i64; N]`; `usize` for positives) or `&Indices`.

use std::sync::Arc;

use crate::kernels::storage::{self, DeviceBuf};
use crate::kernels::{BufInfo, Elem};
use crate::{Device, Error, Result};

/// Integer indices on the host or on a kernel device (there as i32: every value must fit).
///
/// ```
/// use contra::{supcon, Device, Indices, SupConOptions, Tensor, Transfers};
/// let device = Device::Interp;
/// let features = Tensor::from_vec(vec![0.5f32; 3 * 2 * 4], &[3, 2, 4], device)?;
/// let labels = Indices::new(&[0, 0, 1], device)?; // one copy, once
/// let before = Transfers::current();
/// let out = supcon(&features, &labels, &SupConOptions::default())?;
/// assert_eq!((Transfers::current() - before).copies(), 0);
/// # Ok::<(), contra::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Indices {
    len: usize,
    storage: Storage,
    /// A hash of the values (kept from the host values they were made from): what a saved
    /// state's fingerprint folds in, the same for a host slice of these values.
    key: u64,
}

#[derive(Clone, Debug)]
enum Storage {
    Host(Arc<[i64]>),
    Device(Arc<DeviceBuf>),
}

impl Indices {
    /// `values` on `device` (copied once to a kernel device, as i32).
    pub fn new(values: &[i64], device: Device) -> Result<Indices> {
        let key = hash(values);
        let storage = match device {
            Device::Cpu => Storage::Host(values.into()),
            _ => {
                let words = values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        i32::try_from(v).map(|v| v as u32).map_err(|_| {
                            Error::invalid(
                                "Indices::new",
                                "values",
                                format!("values[{i}] = {v} does not fit the i32 the kernels read"),
                            )
                        })
                    })
                    .collect::<Result<Vec<u32>>>()?;
                let info = BufInfo {
                    elem: Elem::I32,
                    count: values.len(),
                };
                Storage::Device(Arc::new(storage::upload_words(
                    device, "indices", &words, info,
                )?))
            }
        };
        Ok(Indices {
            len: values.len(),
            storage,
            key,
        })
    }

    /// Indices over `len` i32 values a kernel device already holds (`buf`), keyed as values
    /// no host has seen: a saved state made with them matches only these indices (or clones).
    #[cfg(feature = "candle-cuda")]
    pub(crate) fn from_device_buf(len: usize, buf: DeviceBuf) -> Indices {
        Indices {
            len,
            storage: Storage::Device(Arc::new(buf)),
            key: crate::tensor::fresh_key(),
        }
    }

    /// [`Indices::new`] of `usize` values (positive indices).
    pub fn from_usize(values: &[usize], device: Device) -> Result<Indices> {
        let wide = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                i64::try_from(v).map_err(|_| {
                    Error::invalid(
                        "Indices::from_usize",
                        "values",
                        format!("values[{i}] = {v} does not fit i64"),
                    )
                })
            })
            .collect::<Result<Vec<i64>>>()?;
        Indices::new(&wide, device)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            Storage::Device(buf) => buf.device(),
        }
    }

    /// The values on the host (copied from a device).
    pub fn to_vec(&self) -> Result<Vec<i64>> {
        match &self.storage {
            Storage::Host(values) => Ok(values.to_vec()),
            Storage::Device(buf) => Ok(buf
                .download_words()?
                .into_iter()
                .take(self.len)
                .map(|w| w as i32 as i64)
                .collect()),
        }
    }

    /// The device buffer (i32), when the indices live on a kernel device.
    pub(crate) fn device_buf(&self) -> Option<&DeviceBuf> {
        match &self.storage {
            Storage::Host(_) => None,
            Storage::Device(buf) => Some(buf),
        }
    }

    pub(crate) fn key(&self) -> u64 {
        self.key
    }
}

/// The hash of index values that [`Indices`] keeps (FxHash-style multiply-rotate).
pub(crate) fn hash<I: Copy + TryInto<i64>>(values: &[I]) -> u64 {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    values.iter().fold(0, |h, &v| {
        let bits = v.try_into().map_or(u64::MAX, |v| v as u64);
        (h.rotate_left(5) ^ bits).wrapping_mul(K)
    })
}

/// Labels or positive indices as an op takes them: a host slice of `I`, or [`Indices`].
pub trait AsIndices<I> {
    #[doc(hidden)]
    fn index_view(&self) -> IndexView<'_, I>;
}

/// Where an op's index argument is.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum IndexView<'a, I> {
    Slice(&'a [I]),
    Indices(&'a Indices),
}

impl<'a, I: Copy + TryFrom<i64>> IndexView<'a, I> {
    /// The values on the host (borrowed, or copied from the device). A device value that does
    /// not fit `I` (a negative positive index) is an error naming `arg`.
    pub(crate) fn host(
        self,
        op: &'static str,
        arg: &'static str,
    ) -> Result<std::borrow::Cow<'a, [I]>> {
        match self {
            IndexView::Slice(values) => Ok(std::borrow::Cow::Borrowed(values)),
            IndexView::Indices(indices) => indices
                .to_vec()?
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    I::try_from(v).map_err(|_| {
                        Error::invalid(op, arg, format!("{arg}[{i}] = {v} is out of range"))
                    })
                })
                .collect::<Result<Vec<I>>>()
                .map(std::borrow::Cow::Owned),
        }
    }
}

macro_rules! host_indices {
    ($($t:ty),*) => {$(
        impl AsIndices<$t> for [$t] {
            fn index_view(&self) -> IndexView<'_, $t> {
                IndexView::Slice(self)
            }
        }
        impl AsIndices<$t> for Vec<$t> {
            fn index_view(&self) -> IndexView<'_, $t> {
                IndexView::Slice(self)
            }
        }
        impl<const N: usize> AsIndices<$t> for [$t; N] {
            fn index_view(&self) -> IndexView<'_, $t> {
                IndexView::Slice(self)
            }
        }
        impl AsIndices<$t> for Indices {
            fn index_view(&self) -> IndexView<'_, $t> {
                IndexView::Indices(self)
            }
        }
    )*};
}
host_indices!(i64, usize);
