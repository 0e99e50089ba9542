//! Launch sequence of `kernels/momentum.cu`: the in-place momentum (EMA) update.

use std::ffi::c_void;

use super::params::ContraMomentumParams;
use super::{blocks_for, handles, Backend, Launch};
use crate::Result;

/// Threads per block.
const THREADS: u32 = 256;
/// Most blocks of the grid-stride loop (a few waves on any current GPU).
const MAX_BLOCKS: usize = 1024;

/// `theta_k <- m theta_k + (1 - m) theta_q` over `len` floats, in place in `theta_k`.
pub(crate) fn update<B: Backend>(
    b: &B,
    theta_k: &B::Buf,
    theta_q: &B::Buf,
    len: usize,
    m: f64,
) -> Result<()> {
    update_at(b, theta_k, b.ptr(theta_k), b.ptr(theta_q), len, m)
}

/// [`update`] on raw addresses inside the buffer `theta_k` (which must hold `len` floats from
/// `k`); the tests use it to start at misaligned offsets.
pub(crate) fn update_at<B: Backend>(
    b: &B,
    theta_k: &B::Buf,
    k: *mut c_void,
    q: *mut c_void,
    len: usize,
    m: f64,
) -> Result<()> {
    let params = ContraMomentumParams {
        theta_k: k,
        theta_q: q,
        len: len as i64,
        m: m as f32,
        one_minus_m: (1.0 - m) as f32,
    };
    // Each thread handles 4 floats per pass of the vectorized body.
    let blocks = blocks_for(len.div_ceil(4), THREADS as usize).clamp(1, MAX_BLOCKS);
    // Every element of theta_k is rewritten; its contents are real values (never poison), so
    // listing it as written turns on the interpreted mode's guard-band checks.
    b.launch(
        handles::MOMENTUM_UPDATE_F32,
        Launch::linear(blocks, THREADS),
        &params,
        &[theta_k],
    )
}

/// Runs the update on `device` with `theta_k` starting `k_offset` floats and `theta_q` starting
/// `q_offset` floats into their buffers (so not 16-byte aligned), and returns the updated
/// `theta_k`. A test hook for the kernel's aligned / misaligned paths.
pub fn update_at_offsets(
    device: crate::Device,
    theta_k: &[f32],
    theta_q: &[f32],
    k_offset: usize,
    q_offset: usize,
    m: f64,
) -> Result<Vec<f32>> {
    let len = theta_k.len();
    if theta_q.len() != len {
        return Err(crate::Error::Device(
            "theta_k and theta_q differ in length".into(),
        ));
    }
    let padded = |values: &[f32], offset: usize| {
        let mut v = vec![0.0f32; offset];
        v.extend_from_slice(values);
        v
    };
    super::run_on_kernels!(device, b => {
        let kb = b.upload("theta_k", &padded(theta_k, k_offset))?;
        let qb = b.upload("theta_q", &padded(theta_q, q_offset))?;
        // Plain address arithmetic: the offsets stay inside the buffers just uploaded.
        let k = b.ptr(&kb).cast::<f32>().wrapping_add(k_offset).cast();
        let q = b.ptr(&qb).cast::<f32>().wrapping_add(q_offset).cast();
        update_at(b, &kb, k, q, len, m)?;
        Ok(b.download(&kb)?[k_offset..].to_vec())
    });
    Err(crate::Error::Device(format!("{device} runs no kernels")))
}
