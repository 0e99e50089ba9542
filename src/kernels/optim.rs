//! Launches of `kernels/optim.cu`: the optimizers' in-place steps on one f32 parameter buffer
//! and the addition of one gradient into another. The per-optimizer bookkeeping (state, step
//! counts, which parameters decay) is in `crate::nn::optim`.

use super::params::ContraOptimParams;
use super::{blocks_for, handles, Backend, BufInfo, Elem, Kernel, Launch};
use crate::{Error, Result};

const THREADS: u32 = 256;
/// Most blocks of the grid-stride loops (a few waves on any current GPU).
const MAX_BLOCKS: usize = 1024;

/// The hyperparameters of one step; what a kernel does not read stays 0.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Coefs {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub trust: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub step_size: f32,
    pub shrink: f32,
    pub nesterov: bool,
    pub bc2_sqrt: f64,
}

/// The buffers one step touches: the value (updated), its gradient and up to two state slots.
pub(crate) struct Slots<'a, Buf> {
    pub value: &'a Buf,
    pub grad: &'a Buf,
    pub state: [Option<&'a Buf>; 2],
}

fn params<B: Backend>(
    b: &B,
    slots: &Slots<'_, B::Buf>,
    norms: Option<&B::Buf>,
    c: &Coefs,
) -> Result<ContraOptimParams> {
    let len = b.info(slots.value).count;
    let same = |buf: &B::Buf| b.info(buf).elem == Elem::F32 && b.info(buf).count == len;
    let all = [Some(slots.grad), slots.state[0], slots.state[1]];
    if b.info(slots.value).elem != Elem::F32 || !all.into_iter().flatten().all(same) {
        return Err(Error::Device(format!(
            "optimizer step: value, gradient and state must be f32 buffers of {len} elements"
        )));
    }
    let ptr = |buf: Option<&B::Buf>| buf.map_or(std::ptr::null_mut(), |buf| b.ptr(buf));
    Ok(ContraOptimParams {
        value: b.ptr(slots.value).cast(),
        grad: b.ptr(slots.grad).cast(),
        state0: ptr(slots.state[0]).cast(),
        state1: ptr(slots.state[1]).cast(),
        norms: ptr(norms).cast(),
        len: i64::try_from(len)
            .map_err(|_| Error::Device(format!("{len} elements overflow i64")))?,
        lr: c.lr,
        momentum: c.momentum,
        weight_decay: c.weight_decay,
        trust: c.trust,
        beta1: c.beta1,
        beta2: c.beta2,
        one_minus_beta1: c.one_minus_beta1,
        one_minus_beta2: c.one_minus_beta2,
        eps: c.eps,
        step_size: c.step_size,
        shrink: c.shrink,
        nesterov: c.nesterov as i32,
        bc2_sqrt: c.bc2_sqrt,
    })
}

fn run<B: Backend>(
    b: &B,
    kernel: Kernel<ContraOptimParams>,
    slots: &Slots<'_, B::Buf>,
    norms: Option<&B::Buf>,
    c: &Coefs,
) -> Result<()> {
    let p = params(b, slots, norms, c)?;
    let len = b.info(slots.value).count;
    if len == 0 {
        return Ok(());
    }
    let blocks = blocks_for(len, THREADS as usize).clamp(1, MAX_BLOCKS);
    b.launch(kernel, Launch::linear(blocks, THREADS), &p, &[])
}

/// SGD with momentum (state: the momentum buffer).
pub(crate) fn sgd<B: Backend>(b: &B, slots: &Slots<'_, B::Buf>, c: &Coefs) -> Result<()> {
    run(b, handles::OPTIM_SGD, slots, None, c)
}

/// LARS (state: the velocity); `adapt` scales the learning rate by the trust ratio, from the
/// norms of the value and the decayed gradient reduced on the device.
pub(crate) fn lars<B: Backend>(
    b: &B,
    slots: &Slots<'_, B::Buf>,
    c: &Coefs,
    adapt: bool,
) -> Result<()> {
    if !adapt {
        return run(b, handles::OPTIM_LARS, slots, None, c);
    }
    let norms = b.output_of(
        "lars_norms",
        BufInfo {
            elem: Elem::F64,
            count: 2,
        },
    )?;
    let p = params(b, slots, Some(&norms), c)?;
    b.launch(
        handles::OPTIM_LARS_NORMS,
        Launch::linear(1, THREADS),
        &p,
        &[&norms],
    )?;
    run(b, handles::OPTIM_LARS, slots, Some(&norms), c)
}

/// AdamW (state: the first and second moments).
pub(crate) fn adamw<B: Backend>(b: &B, slots: &Slots<'_, B::Buf>, c: &Coefs) -> Result<()> {
    run(b, handles::OPTIM_ADAMW, slots, None, c)
}

/// `into += delta`.
pub(crate) fn accumulate<B: Backend>(b: &B, into: &B::Buf, delta: &B::Buf) -> Result<()> {
    let slots = Slots {
        value: into,
        grad: delta,
        state: [None, None],
    };
    run(
        b,
        handles::OPTIM_ACCUMULATE,
        &slots,
        None,
        &Coefs::default(),
    )
}
