//! A dense row-major tensor that knows its element type and device.

use half::{bf16, f16};

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
    fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F64(_) => DType::F64,
            HostData::Bf16(_) => DType::Bf16,
            HostData::F16(_) => DType::F16,
        }
    }

    fn to_vec<T: Element>(&self) -> Vec<T> {
        match self {
            HostData::F32(v) => convert(v),
            HostData::F64(v) => convert(v),
            HostData::Bf16(v) => convert(v),
            HostData::F16(v) => convert(v),
        }
    }

    fn to_dtype(&self, dtype: DType) -> HostData {
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

/// A dense, row-major tensor on a [`Device`].
///
/// ```
/// use contra::{Device, Tensor};
/// let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], Device::Cpu)?;
/// assert_eq!(x.shape(), &[2, 2]);
/// assert_eq!(x.to_vec::<f32>()?, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), contra::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    device: Device,
    pub(crate) data: HostData,
}

impl Tensor {
    /// Wraps `values` (row-major) as a tensor of `shape` on `device`.
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
        Self::on_device(shape.to_vec(), T::wrap(values), device)
    }

    /// Copies `values` into a new tensor.
    pub fn from_slice<T: Element>(values: &[T], shape: &[usize], device: Device) -> Result<Self> {
        Self::from_vec(values.to_vec(), shape, device)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        let numel = checked_numel("Tensor::zeros", "shape", shape, dtype)?;
        let data = match dtype {
            DType::F32 => HostData::F32(vec![0.0; numel]),
            DType::F64 => HostData::F64(vec![0.0; numel]),
            DType::Bf16 => HostData::Bf16(vec![bf16::ZERO; numel]),
            DType::F16 => HostData::F16(vec![f16::ZERO; numel]),
        };
        Self::on_device(shape.to_vec(), data, device)
    }

    pub(crate) fn on_device(shape: Vec<usize>, data: HostData, device: Device) -> Result<Self> {
        if let Device::Cuda(_) = device {
            crate::device_available(device)
                .map_err(|reason| Error::Device(format!("{device}: {reason}")))?;
        }
        Ok(Tensor {
            shape,
            device,
            data,
        })
    }

    /// Builds a host tensor on the same device as `self` (used for op outputs).
    pub(crate) fn host_like<T: Element>(&self, values: Vec<T>, shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            device: self.device,
            data: T::wrap(values),
        }
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
        self.data.dtype()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The elements, row-major, as `T`; `T` must be the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        match T::slice(&self.data) {
            Some(values) => Ok(values.to_vec()),
            None => Err(Error::Mismatch {
                op: "Tensor::to_vec",
                reason: format!("tensor holds {}, asked for {}", self.dtype(), T::DTYPE),
            }),
        }
    }

    /// The elements converted to f64, whatever the dtype.
    pub fn to_vec_f64(&self) -> Vec<f64> {
        self.data.to_vec()
    }

    /// A copy converted to `dtype` on the same device.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        Tensor {
            shape: self.shape.clone(),
            device: self.device,
            data: self.data.to_dtype(dtype),
        }
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        Self::on_device(self.shape.clone(), self.data.clone(), device)
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

    /// The index and value of the first NaN or infinity, if any (no copy of the data).
    pub(crate) fn first_non_finite(&self) -> Option<(usize, f64)> {
        fn find<T: Element>(values: &[T]) -> Option<(usize, f64)> {
            values
                .iter()
                .map(|v| v.to_f64())
                .enumerate()
                .find(|(_, v)| !v.is_finite())
        }
        match &self.data {
            HostData::F32(v) => find(v),
            HostData::F64(v) => find(v),
            HostData::Bf16(v) => find(v),
            HostData::F16(v) => find(v),
        }
    }

    /// Calls `f` with the bits of every element, widened to 64 bits (for fingerprints).
    pub(crate) fn for_each_bits(&self, mut f: impl FnMut(u64)) {
        match &self.data {
            HostData::F32(v) => v.iter().for_each(|x| f(x.to_bits() as u64)),
            HostData::F64(v) => v.iter().for_each(|x| f(x.to_bits())),
            HostData::Bf16(v) => v.iter().for_each(|x| f(x.to_bits() as u64)),
            HostData::F16(v) => v.iter().for_each(|x| f(x.to_bits() as u64)),
        }
    }

    pub(crate) fn host<T: Element>(&self) -> Option<&[T]> {
        T::slice(&self.data)
    }

    pub(crate) fn host_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        T::slice_mut(&mut self.data)
    }
}
