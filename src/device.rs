//! Where an op runs. The same call works on every device: tensors carry their device and an op
//! runs where its inputs live.

use std::fmt;

/// A compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Plain Rust on all cores (rayon): the reference implementation and the fallback.
    #[default]
    Cpu,
    /// The CUDA kernels compiled as host C++, every CUDA thread run on the CPU. Slow by design;
    /// it exists to test the kernels on machines without a GPU. Its tensors live in
    /// guard-banded buffers that stand for device memory: moving them to and from the host is
    /// counted like a GPU's copies ([`Transfers`](crate::Transfers)).
    Interp,
    /// GPU `i` through the CUDA driver (feature `cuda`). Tensors live in its memory and ops
    /// leave their outputs there.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `interp`, `cuda` (GPU 0) or `cuda:N`.
    pub fn parse(name: &str) -> crate::Result<Device> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Device::Cpu),
            "interp" => Ok(Device::Interp),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match lower.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(crate::Error::invalid(
                    "Device::parse",
                    "name",
                    format!("`{name}` is not one of cpu, interp, cuda, cuda:N"),
                )),
            },
        }
    }

    /// True when tensors of this device live in host memory (the CPU; an interpreted-mode
    /// tensor stands for device memory, moved explicitly like a GPU's).
    pub fn is_host(&self) -> bool {
        matches!(self, Device::Cpu)
    }
}

impl Device {
    /// Waits until the work queued on this device so far has run (a GPU's launches are
    /// asynchronous; reading a result waits by itself). Nothing to wait for on the CPU and in
    /// the interpreted mode.
    pub fn synchronize(self) -> crate::Result<()> {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::kernels::cuda::Cuda::get(i)?.synchronize(),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Interp => write!(f, "interp"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Device> {
        Device::parse(s)
    }
}

/// `Ok` when `device` can run ops here; otherwise the reason (no `cuda` feature, no driver,
/// no such GPU).
pub fn device_available(device: Device) -> Result<(), String> {
    match device {
        Device::Cpu | Device::Interp => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => crate::kernels::cuda::Cuda::get(i)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            Err("this build has no `cuda` feature (cargo build --features cuda)".to_string())
        }
    }
}
