//! The one error type of the crate. Every bad input becomes an [`Error`] that names the operation,
//! the argument and what was wrong with it; library code never panics on user input.

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `contra`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument has the wrong rank or extent.
    #[error("{op}: `{arg}` has shape {got:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    /// A batch or feature dimension is zero where at least one element is needed.
    #[error("{op}: `{arg}` is empty ({what})")]
    Empty {
        op: &'static str,
        arg: &'static str,
        what: String,
    },
    /// An input holds NaN or an infinity.
    #[error("{op}: `{arg}` holds a non-finite value ({value}) in row {row}")]
    NonFinite {
        op: &'static str,
        arg: &'static str,
        row: usize,
        value: f64,
    },
    /// A scalar option or an index/label is out of its legal range.
    #[error("{op}: invalid `{arg}`: {reason}")]
    InvalidArgument {
        op: &'static str,
        arg: &'static str,
        reason: String,
    },
    /// Inputs of one call disagree in element type or device, or a dtype is not supported here.
    #[error("{op}: {reason}")]
    Mismatch { op: &'static str, reason: String },
    /// A result overflowed the precision the op computes in although every input and option
    /// passed its checks; the reason names the options that scale the result.
    #[error("{op}: `{what}` overflows the compute precision ({reason})")]
    Overflow {
        op: &'static str,
        what: &'static str,
        reason: String,
    },
    /// A device could not be opened or a transfer / launch failed.
    #[error("device error: {0}")]
    Device(String),
    /// A kernel run in interpreted mode wrote out of bounds, left an output unwritten or broke
    /// a CUDA rule (divergent barrier, missing warp lane).
    #[error("kernel `{kernel}` failed in interpreted mode: {reason}")]
    Kernel { kernel: String, reason: String },
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A data file or fixture case is malformed.
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
}

impl Error {
    /// An f64 input of a kernel device holding `value` in `row`, beyond the f32 range the
    /// kernels compute in (it would arrive as an infinity).
    pub(crate) fn beyond_f32(arg: &'static str, row: usize, value: f64) -> Self {
        Error::invalid(
            "upload",
            arg,
            format!(
                "row {row} holds {value:e}, beyond the f32 range the kernels compute in; scale \
                 the input or use Device::Cpu, which computes f64 inputs in f64"
            ),
        )
    }

    pub(crate) fn invalid(op: &'static str, arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            arg,
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(
        op: &'static str,
        arg: &'static str,
        got: &[usize],
        expected: impl Into<String>,
    ) -> Self {
        Error::Shape {
            op,
            arg,
            got: got.to_vec(),
            expected: expected.into(),
        }
    }

    #[cfg_attr(not(any(feature = "train", feature = "fixtures")), allow(dead_code))]
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    #[cfg_attr(not(any(feature = "train", feature = "fixtures")), allow(dead_code))]
    pub(crate) fn format(path: impl AsRef<std::path::Path>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().display().to_string(),
            reason: reason.into(),
        }
    }
}
