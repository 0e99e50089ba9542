//! Launch sequences of `kernels/status.cu`: the finiteness scans whose status words travel with
//! an op's results, and the loss's reduction that writes the mean next to them.

use super::params::{ContraIndexScanParams, ContraLossParams, ContraScanParams};
use super::{blocks_for, elementwise, extent, handles, Backend, BufInfo, Elem, Launch};
use crate::{Error, Result};

/// A status word's value while every element it watches is finite (the kernels lower it to the
/// first non-finite row).
pub(crate) const ALL_FINITE: u32 = i32::MAX as u32;

/// Words of the loss buffer before its status words: the two halves of the f64 loss.
pub(crate) const LOSS_WORDS: usize = 2;

/// A buffer of `slots` status words, all [`ALL_FINITE`].
pub(crate) fn status_words<B: Backend>(b: &B, slots: usize) -> Result<B::Buf> {
    let info = BufInfo {
        elem: Elem::I32,
        count: slots,
    };
    elementwise::filled(b, "status", info, &[ALL_FINITE])
}

/// Lowers `status[slot]` to the first row of `x` (`row_len` elements per row) that holds a NaN
/// or an infinity.
pub(crate) fn scan<B: Backend>(
    b: &B,
    x: &B::Buf,
    row_len: usize,
    status: &B::Buf,
    slot: usize,
) -> Result<()> {
    let info = b.info(x);
    if info.elem == Elem::F64 || info.elem == Elem::I32 {
        return Err(Error::Device(format!(
            "no finiteness scan for {:?} buffers",
            info.elem
        )));
    }
    if info.count == 0 {
        return Ok(());
    }
    let params = ContraScanParams {
        x: b.ptr(x),
        status: b.ptr(status).cast(),
        len: info.count as i64,
        row_len: row_len.max(1) as i64,
        slot: extent("slot", slot)?,
    };
    let blocks = blocks_for(info.count, 256).clamp(1, 1024);
    b.launch(
        handles::NONFINITE_ROWS.of(info.elem),
        Launch::linear(blocks, 256),
        &params,
        &[],
    )
}

/// Lowers `status[slot]` to the first `i` whose index `values[i]` (i32) lies outside `lo..hi`,
/// or equals `i` when `forbid_self`.
pub(crate) fn scan_indices<B: Backend>(
    b: &B,
    values: &B::Buf,
    (lo, hi, forbid_self): (i64, i64, bool),
    status: &B::Buf,
    slot: usize,
) -> Result<()> {
    let len = b.info(values).count;
    if len == 0 {
        return Ok(());
    }
    let params = ContraIndexScanParams {
        values: b.ptr(values).cast(),
        status: b.ptr(status).cast(),
        len: len as i64,
        lo,
        hi,
        forbid_self: forbid_self as i32,
        slot: extent("slot", slot)?,
    };
    let blocks = blocks_for(len, 256).clamp(1, 1024);
    b.launch(
        handles::INDEX_SCAN,
        Launch::linear(blocks, 256),
        &params,
        &[],
    )
}

/// How the per-row values become the terms of a loss.
pub(crate) enum Terms<'a, Buf> {
    /// The values themselves.
    Values,
    /// The margin loss: each value is a pair's distance times `2^-dist_exp`; label 0 costs
    /// `d^2 / 2`, label 1 `relu(margin - d)^2 / 2` (in f64).
    Margin {
        labels: &'a Buf,
        margin: f64,
        dist_exp: i32,
    },
}

/// An output buffer laid out like a loss: [`LOSS_WORDS`], then `slots` status words and the
/// loss's own.
pub(crate) fn loss_buffer<B: Backend>(b: &B, slots: usize) -> Result<B::Buf> {
    let words = LOSS_WORDS
        .checked_add(slots)
        .and_then(|w| w.checked_add(1))
        .ok_or_else(|| Error::Device(format!("{slots} status words overflow usize")))?;
    b.output_of(
        "loss",
        BufInfo {
            elem: Elem::I32,
            count: words,
        },
    )
}

/// The loss buffer: `sum(terms) / divisor` in f64 ([`LOSS_WORDS`] words), then the `slots`
/// status words of `status`, then the loss's own status word.
pub(crate) fn finish_loss<B: Backend>(
    b: &B,
    values: &B::Buf,
    terms: Terms<'_, B::Buf>,
    divisor: f64,
    status: &B::Buf,
    slots: usize,
) -> Result<B::Buf> {
    let n = b.info(values).count;
    let out = loss_buffer(b, slots)?;
    let (labels, margin, dist_exp) = match terms {
        Terms::Values => (std::ptr::null_mut(), 0.0, 0),
        Terms::Margin {
            labels,
            margin,
            dist_exp,
        } => (b.ptr(labels), margin, dist_exp),
    };
    let params = ContraLossParams {
        values: b.ptr(values).cast(),
        status: b.ptr(status).cast(),
        out: b.ptr(&out).cast(),
        labels: labels.cast(),
        n: extent("rows", n)?,
        slots: extent("slots", slots)?,
        dist_exp,
        divisor,
        margin,
    };
    b.launch(
        handles::LOSS_FINISH,
        Launch::linear(1, 256),
        &params,
        &[&out],
    )?;
    Ok(out)
}
