//! Launch sequences of `kernels/elementwise.cu`: constant fills, NT-Xent's index ring and dtype
//! casts, so that constants and conversions never cross between host and device.

use super::params::{
    ContraCastParams, ContraClassWeightsParams, ContraFillParams, ContraHalvesParams,
    ContraSwapParams,
};
use super::{blocks_for, handles, Backend, BufInfo, Elem, Kernel, Launch};
use crate::{Error, Result};

const THREADS: u32 = 256;
/// Most blocks of the grid-stride loops (a few waves on any current GPU).
const MAX_BLOCKS: usize = 1024;

fn grid(len: usize) -> Launch {
    Launch::linear(
        blocks_for(len, THREADS as usize).clamp(1, MAX_BLOCKS),
        THREADS,
    )
}

/// A buffer of `info.count` elements whose 32-bit words repeat `pattern` (1 to 4 words).
pub(crate) fn filled<B: Backend>(
    b: &B,
    name: &'static str,
    info: BufInfo,
    pattern: &[u32],
) -> Result<B::Buf> {
    let out = b.output_of(name, info)?;
    let words = info.elem.words(info.count);
    let mut padded = [0u32; 4];
    padded[..pattern.len()].copy_from_slice(pattern);
    let params = ContraFillParams {
        out: b.ptr(&out).cast(),
        len: words as i64,
        pattern: padded,
        period: pattern.len() as i32,
        shift: 0,
    };
    if words > 0 {
        b.launch(handles::FILL_WORDS, grid(words), &params, &[&out])?;
    }
    Ok(out)
}

/// `out[i] = (i + shift) % len` as i32: NT-Xent's positives (`shift` = N of 2N rows).
pub(crate) fn index_ring<B: Backend>(b: &B, len: usize, shift: usize) -> Result<B::Buf> {
    let out = b.output_of(
        "positives",
        BufInfo {
            elem: Elem::I32,
            count: len,
        },
    )?;
    let params = ContraFillParams {
        out: b.ptr(&out).cast(),
        len: super::extent("rows", len)? as i64,
        pattern: [0; 4],
        period: 1,
        shift: super::extent("shift", shift)?,
    };
    b.launch(handles::INDEX_RING, grid(len), &params, &[&out])?;
    Ok(out)
}

/// A copy of `input` as `elem`, converted on the device: f32 to and from every other type,
/// f64 to f32.
pub(crate) fn cast<B: Backend>(b: &B, input: &B::Buf, elem: Elem) -> Result<B::Buf> {
    let from = b.info(input);
    let kernel: Kernel<ContraCastParams> = match (from.elem, elem) {
        (Elem::F32, Elem::F64) => handles::CAST_F32_TO_F64,
        (Elem::F64, Elem::F32) => handles::CAST_F64_TO_F32,
        (Elem::F32, to @ (Elem::F32 | Elem::Bf16 | Elem::F16)) => handles::CAST_FROM_F32.of(to),
        (from @ (Elem::Bf16 | Elem::F16), Elem::F32) => handles::CAST_TO_F32.of(from),
        (from, to) => {
            return Err(Error::Device(format!(
                "no device cast from {from:?} to {to:?}"
            )))
        }
    };
    let out = b.output_of(
        "cast",
        BufInfo {
            elem,
            count: from.count,
        },
    )?;
    let params = ContraCastParams {
        in_: b.ptr(input),
        out: b.ptr(&out),
        len: from.count as i64,
    };
    if from.count > 0 {
        b.launch(kernel, grid(from.count), &params, &[&out])?;
    }
    Ok(out)
}

/// `input` (f32, `outer x inner` rows of `dim`) with its first two axes swapped: row
/// `j * outer + i` of the result is row `i * inner + j` of the input (the trainer's SupCon step).
#[cfg_attr(not(feature = "train"), allow(dead_code))]
pub(crate) fn swap_row_blocks<B: Backend>(
    b: &B,
    input: &B::Buf,
    outer: usize,
    inner: usize,
    dim: usize,
) -> Result<B::Buf> {
    let len = outer
        .checked_mul(inner)
        .and_then(|rows| rows.checked_mul(dim))
        .filter(|&len| len == b.info(input).count)
        .ok_or_else(|| {
            Error::Device(format!(
                "swap_row_blocks: {outer} x {inner} x {dim} is not the buffer's size"
            ))
        })?;
    let out = b.output("swapped", len)?;
    let params = ContraSwapParams {
        in_: b.ptr(input).cast(),
        out: b.ptr(&out).cast(),
        outer: super::extent("outer", outer)?,
        inner: super::extent("inner", inner)?,
        dim: super::extent("dim", dim)?,
    };
    if len > 0 {
        b.launch(handles::SWAP_ROW_BLOCKS, grid(len), &params, &[&out])?;
    }
    Ok(out)
}

/// The first and second halves of `whole` (f32, `2 len` words): the two views of a batch (the
/// trainer's SigLIP step).
#[cfg_attr(not(feature = "train"), allow(dead_code))]
pub(crate) fn split_halves<B: Backend>(b: &B, whole: &B::Buf) -> Result<(B::Buf, B::Buf)> {
    let len = even_half(b, "split_halves", whole)?;
    let (first, second) = (b.output("first", len)?, b.output("second", len)?);
    halves(
        b,
        handles::SPLIT_HALVES,
        (whole, &first, &second),
        len,
        &[&first, &second],
    )?;
    Ok((first, second))
}

/// `first`'s words, then `second`'s (f32, the same length), in a new buffer.
#[cfg_attr(not(feature = "train"), allow(dead_code))]
pub(crate) fn join_halves<B: Backend>(b: &B, first: &B::Buf, second: &B::Buf) -> Result<B::Buf> {
    let len = b.info(first).count;
    if b.info(second).count != len {
        return Err(Error::Device(
            "join_halves: halves of different lengths".into(),
        ));
    }
    let whole = b.output("whole", 2 * len)?;
    halves(
        b,
        handles::JOIN_HALVES,
        (&whole, first, second),
        len,
        &[&whole],
    )?;
    Ok(whole)
}

/// Half of `buf`'s f32 count, which must be even.
fn even_half<B: Backend>(b: &B, op: &str, buf: &B::Buf) -> Result<usize> {
    let count = b.info(buf).count;
    match count % 2 {
        0 => Ok(count / 2),
        _ => Err(Error::Device(format!(
            "{op}: {count} elements do not split in two halves"
        ))),
    }
}

fn halves<B: Backend>(
    b: &B,
    kernel: Kernel<ContraHalvesParams>,
    (whole, first, second): (&B::Buf, &B::Buf, &B::Buf),
    len: usize,
    written: &[&B::Buf],
) -> Result<()> {
    let params = ContraHalvesParams {
        whole: b.ptr(whole).cast(),
        first: b.ptr(first).cast(),
        second: b.ptr(second).cast(),
        len: len as i64,
    };
    if len > 0 {
        b.launch(kernel, grid(len), &params, written)?;
    }
    Ok(())
}

/// SupCon's per-view class table from `labels` (i32, one per sample): each of the `views` rows
/// of sample i gets its label and `1 / |P|`, built on the device (`class_weights`).
pub(crate) fn class_weights<B: Backend>(
    b: &B,
    labels: &B::Buf,
    views: usize,
) -> Result<(B::Buf, B::Buf)> {
    let n = b.info(labels).count;
    let rows = n
        .checked_mul(views)
        .ok_or_else(|| Error::Device(format!("{n} samples x {views} views overflow usize")))?;
    let row_labels = b.output_of(
        "labels",
        BufInfo {
            elem: Elem::I32,
            count: rows,
        },
    )?;
    let row_weights = b.output("target_weight", rows)?;
    let params = ContraClassWeightsParams {
        labels: b.ptr(labels).cast(),
        row_labels: b.ptr(&row_labels).cast(),
        row_weights: b.ptr(&row_weights).cast(),
        n: super::extent("samples", n)?,
        views: super::extent("views", views)?,
    };
    if rows > 0 {
        b.launch(
            handles::CLASS_WEIGHTS,
            grid(n),
            &params,
            &[&row_labels, &row_weights],
        )?;
    }
    Ok((row_labels, row_weights))
}
