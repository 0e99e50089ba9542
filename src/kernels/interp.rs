//! The interpreted mode: the kernels compiled as host C++ (build.rs) run every CUDA thread on the
//! CPU. Buffers are host allocations with guard bands; contents start as a poison NaN, so a launch
//! that writes out of bounds or leaves an output element unwritten is an error naming the kernel
//! and the buffer, never a silent pass.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_ulong, c_void};

use super::params::ContraNormalizeParams;
use super::{extent, Backend, BufInfo, KernelParams, Launch};
use crate::{Error, Result};

/// Words of guard band on each side of a buffer.
const GUARD: usize = 64;
/// A quiet NaN with a payload no arithmetic produces: "never written".
const POISON: u32 = 0x7fc0_dead;

/// The C ABI of `kernels/interp/abi.h`.
#[repr(C)]
struct InterpLaunchConfig {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u64,
}

type InterpEntry =
    unsafe extern "C" fn(*const InterpLaunchConfig, *const c_void, *mut c_char, c_ulong) -> c_int;

/// Declares the `interp_<kernel>` entry points that INTERP_EXPORT defines in kernels/*.cu and a
/// lookup by kernel name. Each takes a pointer to its params struct, declared here as
/// `*const c_void` so one table holds them all (a pointer is a pointer in the C ABI).
macro_rules! interp_kernels {
    ($($name:ident),* $(,)?) => {
        extern "C" {
            $(
                #[link_name = concat!("interp_", stringify!($name))]
                fn $name(cfg: *const InterpLaunchConfig, params: *const c_void, err: *mut c_char, err_len: c_ulong) -> c_int;
            )*
        }
        fn entry(kernel: &str) -> Option<InterpEntry> {
            match kernel {
                $(stringify!($name) => Some($name as InterpEntry),)*
                _ => None,
            }
        }
    };
}

interp_kernels!(
    normalize_fwd_f32,
    normalize_fwd_bf16,
    normalize_fwd_f16,
    normalize_bwd_f32,
    normalize_bwd_bf16,
    normalize_bwd_f16,
    similarity_fwd_f32,
    similarity_fwd_bf16,
    similarity_fwd_f16,
    infonce_fwd_f32,
    infonce_fwd_bf16,
    infonce_fwd_f16,
    infonce_bwd_f32,
    infonce_bwd_bf16,
    infonce_bwd_f16,
    infonce_extra_bwd_f32,
    infonce_extra_bwd_bf16,
    infonce_extra_bwd_f16,
    infonce_row_dot_f32,
    infonce_row_dot_bf16,
    infonce_row_dot_f16,
    infonce_finish,
    margin_fwd_f32,
    margin_bwd_f32,
    nce_fwd_f32,
    nce_bwd_f32,
    momentum_update_f32,
    queue_enqueue_f32,
    triplet_mine_f32,
    triplet_bwd_f32,
    nn_gemm_f32,
    nn_bias_relu_f32,
    nn_relu_bwd_f32,
    nn_column_sum_f32,
    nn_batchnorm_fwd_f32,
    nn_batchnorm_bwd_f32,
    baseline_log_softmax_f32,
    baseline_nll_f32,
    baseline_nll_grad_f32,
    oob_test_f32,
);

/// A host buffer with poisoned guard bands on both sides.
pub(crate) struct GuardedBuf {
    name: &'static str,
    words: RefCell<Vec<u32>>,
    /// Payload words.
    len: usize,
    info: BufInfo,
}

impl GuardedBuf {
    fn new(name: &'static str, payload: impl ExactSizeIterator<Item = u32>, info: BufInfo) -> Self {
        let len = payload.len();
        let mut words = Vec::with_capacity(len + 2 * GUARD);
        words.extend(std::iter::repeat_n(POISON, GUARD));
        words.extend(payload);
        words.extend(std::iter::repeat_n(POISON, GUARD));
        GuardedBuf {
            name,
            words: RefCell::new(words),
            len,
            info,
        }
    }

    fn check_guards(&self, kernel: &str) -> Result<()> {
        let words = self.words.borrow();
        let (front, back) = (&words[..GUARD], &words[GUARD + self.len..]);
        if let Some(i) = front.iter().rposition(|&w| w != POISON) {
            return Err(kernel_error(
                kernel,
                format!(
                    "wrote {} element(s) before the start of buffer `{}`",
                    GUARD - i,
                    self.name
                ),
            ));
        }
        if let Some(i) = back.iter().position(|&w| w != POISON) {
            return Err(kernel_error(
                kernel,
                format!(
                    "wrote past the end of buffer `{}` (element {})",
                    self.name,
                    self.len + i
                ),
            ));
        }
        Ok(())
    }

    fn check_written(&self, kernel: &str) -> Result<()> {
        let words = self.words.borrow();
        let payload = &words[GUARD..GUARD + self.len];
        let unwritten = payload.iter().filter(|&&w| w == POISON).count();
        match payload.iter().position(|&w| w == POISON) {
            Some(first) => Err(kernel_error(
                kernel,
                format!(
                    "left {unwritten} of {} element(s) of output `{}` unwritten (first: {first})",
                    self.len, self.name
                ),
            )),
            None => Ok(()),
        }
    }
}

fn kernel_error(kernel: &str, reason: String) -> Error {
    Error::Kernel {
        kernel: kernel.to_string(),
        reason,
    }
}

thread_local! {
    /// The kernels launched on this thread since the last [`take_launched_kernels`].
    static LAUNCHED: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
}

/// The names of the kernels the interpreted mode ran on this thread since the last call (lets the
/// tests see which instantiation, e.g. `_bf16`, an op picked).
pub fn take_launched_kernels() -> Vec<&'static str> {
    LAUNCHED.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// The interpreted-mode backend.
pub(crate) struct Interp;

impl Backend for Interp {
    type Buf = GuardedBuf;

    fn upload_words(&self, name: &'static str, words: &[u32], info: BufInfo) -> Result<GuardedBuf> {
        Ok(GuardedBuf::new(name, words.iter().copied(), info))
    }

    fn output_of(&self, name: &'static str, info: BufInfo) -> Result<GuardedBuf> {
        let words = info.elem.words(info.count);
        Ok(GuardedBuf::new(
            name,
            std::iter::repeat_n(POISON, words),
            info,
        ))
    }

    fn info(&self, buf: &GuardedBuf) -> BufInfo {
        buf.info
    }

    fn ptr(&self, buf: &GuardedBuf) -> *mut c_void {
        // The payload starts GUARD words into the allocation; the Vec is never resized after
        // creation, so the address stays valid for the buffer's lifetime.
        buf.words.borrow_mut()[GUARD..].as_mut_ptr().cast()
    }

    fn download_words(&self, buf: &GuardedBuf) -> Result<Vec<u32>> {
        Ok(buf.words.borrow()[GUARD..GUARD + buf.len].to_vec())
    }

    fn launch<P: KernelParams>(
        &self,
        kernel: &'static str,
        launch: Launch,
        params: &P,
        written: &[&GuardedBuf],
    ) -> Result<()> {
        let entry = entry(kernel)
            .ok_or_else(|| kernel_error(kernel, "no interpreted build of this kernel".into()))?;
        let (grid, block) = launch.dims(kernel)?;
        LAUNCHED.with(|l| l.borrow_mut().push(kernel));
        let cfg = InterpLaunchConfig {
            grid,
            block,
            shared_bytes: 0,
        };
        let mut message = vec![0u8; 512];
        // SAFETY: `entry` is the INTERP_EXPORT wrapper of `kernel`, whose params type is `P`
        // (the kernel layer pairs them by name); `params` points to a live `P`; `message` is a
        // writable buffer of the length passed. Every pointer inside `params` comes from
        // `Backend::ptr` on buffers the caller keeps alive across this call.
        let status = unsafe {
            entry(
                &cfg,
                (params as *const P).cast(),
                message.as_mut_ptr().cast(),
                message.len() as c_ulong,
            )
        };
        if status != 0 {
            let end = message
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(message.len());
            return Err(kernel_error(
                kernel,
                String::from_utf8_lossy(&message[..end]).into_owned(),
            ));
        }
        for buf in written {
            buf.check_guards(kernel)?;
            buf.check_written(kernel)?;
        }
        Ok(())
    }
}

/// Launches the deliberately broken `oob_test_f32` (thread i writes y[i + 1]); the guard bands
/// must turn it into an error.
pub fn out_of_bounds_launch() -> Result<()> {
    let b = Interp;
    let y = b.output("y", 8)?;
    let params = ContraNormalizeParams {
        y: b.ptr(&y),
        rows: 1,
        dim: 8,
        ..Default::default()
    };
    b.launch("oob_test_f32", Launch::linear(1, 8), &params, &[&y])
}

/// Launches `normalize_fwd_f32` with one block too few, so rows are left unwritten; the poison
/// check must turn it into an error.
pub fn unwritten_output_launch() -> Result<()> {
    let b = Interp;
    let (rows, dim) = (16, 5);
    let x = b.upload("x", &vec![1.0; rows * dim])?;
    let y = b.output("y", rows * dim)?;
    let params = ContraNormalizeParams {
        x: b.ptr(&x),
        y: b.ptr(&y),
        rows: extent("rows", rows)?,
        dim: extent("dim", dim)?,
        eps: 1e-12,
        ..Default::default()
    };
    b.launch("normalize_fwd_f32", Launch::linear(1, 256), &params, &[&y])
}
