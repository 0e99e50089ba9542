//! Launches of `kernels/nn.cu`: the encoder layers of the trainer on the device (GEMM, bias +
//! ReLU, the ReLU backward, column sums, BatchNorm1d). The layer sequencing is in
//! `crate::nn::device`; here each function is one launch on row-major f32 buffers.

use super::params::{
    ContraBatchNormBwdParams, ContraBatchNormFwdParams, ContraBiasReluParams,
    ContraColumnSumParams, ContraGemmParams, ContraReluBwdParams,
};
use super::{blocks_for, extent, handles, Backend, BufInfo, Elem, Launch};
use crate::{Error, Result};

/// Threads per block of the one-thread-per-element and one-thread-per-column kernels.
const THREADS: u32 = 256;
/// Grid-stride kernels stop adding blocks here (enough to fill any current GPU).
const MAX_BLOCKS: usize = 4096;
/// The tile edge of `nn_gemm_f32` (its block is `GEMM_TILE x GEMM_TILE` threads).
const GEMM_TILE: usize = 16;

/// `c = alpha op(a) op(b) + beta c` on row-major f32 matrices: `op(a)` is `m x k`, `op(b)` is
/// `k x n`, `c` is `m x n`. `trans_a` means `a` is stored `k x m` (and `trans_b`: `b` stored
/// `n x k`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl GemmShape {
    /// `c = op(a) op(b)`, overwriting `c`.
    pub fn product(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        GemmShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// Row strides of the stored `a`, `b` and `c`.
    pub fn strides(&self) -> (usize, usize, usize) {
        let lda = if self.trans_a { self.m } else { self.k };
        let ldb = if self.trans_b { self.k } else { self.n };
        (lda, ldb, self.n)
    }

    /// Errors unless every extent is positive and fits 32-bit indices, and the buffers of `a`,
    /// `b` and `c` are f32 and hold (at least) the elements the shape addresses.
    pub fn check(&self, buffers: [BufInfo; 3]) -> Result<()> {
        // Extents first: each is below 2^31, so the products below cannot wrap a 64-bit usize.
        let fits = |v: usize| v > 0 && v <= super::MAX_EXTENT;
        if ![self.m, self.n, self.k].into_iter().all(fits) {
            return Err(Error::invalid(
                "gemm",
                "shape",
                format!(
                    "m = {}, n = {}, k = {} must each be in 1..={}",
                    self.m,
                    self.n,
                    self.k,
                    super::MAX_EXTENT
                ),
            ));
        }
        let needed = [self.m * self.k, self.k * self.n, self.m * self.n];
        for ((name, info), need) in ["a", "b", "c"].into_iter().zip(buffers).zip(needed) {
            if info.elem != Elem::F32 {
                return Err(Error::invalid(
                    "gemm",
                    name,
                    format!("holds {:?} elements; the GEMM reads f32", info.elem),
                ));
            }
            let have = info.count;
            if have < need {
                return Err(Error::invalid(
                    "gemm",
                    name,
                    format!("holds {have} elements; the shape {self:?} needs {need}"),
                ));
            }
        }
        Ok(())
    }
}

/// The GEMM as our own tiled kernel (the interpreted mode's GEMM, and the GPU's when cuBLAS
/// cannot be loaded).
pub(crate) fn gemm_kernel<B: Backend>(
    backend: &B,
    shape: &GemmShape,
    a: &B::Buf,
    b: &B::Buf,
    c: &B::Buf,
) -> Result<()> {
    shape.check([a, b, c].map(|buf| backend.info(buf)))?;
    let (lda, ldb, ldc) = shape.strides();
    let row_tiles = blocks_for(shape.m, GEMM_TILE);
    if row_tiles > 65535 {
        return Err(Error::invalid(
            "gemm",
            "m",
            format!("{} rows exceed the kernel's 65535 x 16", shape.m),
        ));
    }
    let params = ContraGemmParams {
        a: backend.ptr(a).cast(),
        b: backend.ptr(b).cast(),
        c: backend.ptr(c).cast(),
        m: extent("m", shape.m)?,
        n: extent("n", shape.n)?,
        k: extent("k", shape.k)?,
        lda: extent("lda", lda)?,
        ldb: extent("ldb", ldb)?,
        ldc: extent("ldc", ldc)?,
        trans_a: shape.trans_a as i32,
        trans_b: shape.trans_b as i32,
        alpha: shape.alpha,
        beta: shape.beta,
    };
    let launch = Launch {
        grid: [blocks_for(shape.n, GEMM_TILE), row_tiles, 1],
        block: [GEMM_TILE as u32, GEMM_TILE as u32, 1],
        shared_bytes: 0,
    };
    backend.launch(handles::NN_GEMM_F32, launch, &params, &[c])
}

/// A grid-stride launch over `len` elements.
fn elementwise(len: usize) -> Launch {
    Launch::linear(
        blocks_for(len, THREADS as usize).clamp(1, MAX_BLOCKS),
        THREADS,
    )
}

/// One thread per column.
fn per_column(cols: usize) -> Launch {
    Launch::linear(blocks_for(cols, THREADS as usize).max(1), THREADS)
}

/// `y = x + bias` (per column; none: `y = x`), then `max(., 0)` when `relu`.
pub(crate) fn bias_relu<B: Backend>(
    backend: &B,
    x: &B::Buf,
    bias: Option<&B::Buf>,
    y: &B::Buf,
    [rows, cols]: [usize; 2],
    relu: bool,
) -> Result<()> {
    let params = ContraBiasReluParams {
        x: backend.ptr(x).cast(),
        bias: bias.map_or(std::ptr::null(), |b| backend.ptr(b).cast()),
        y: backend.ptr(y).cast(),
        rows: extent("rows", rows)?,
        cols: extent("cols", cols)?,
        relu: relu as i32,
    };
    backend.launch(
        handles::NN_BIAS_RELU_F32,
        elementwise(rows * cols),
        &params,
        &[y],
    )
}

/// `dx = dy` where the ReLU output `y` is positive, else 0.
pub(crate) fn relu_bwd<B: Backend>(
    backend: &B,
    y: &B::Buf,
    dy: &B::Buf,
    dx: &B::Buf,
    len: usize,
) -> Result<()> {
    let params = ContraReluBwdParams {
        y: backend.ptr(y).cast(),
        dy: backend.ptr(dy).cast(),
        dx: backend.ptr(dx).cast(),
        len: len as i64,
    };
    backend.launch(handles::NN_RELU_BWD_F32, elementwise(len), &params, &[dx])
}

/// `out[j] = sum_i x[i, j]`.
pub(crate) fn column_sum<B: Backend>(
    backend: &B,
    x: &B::Buf,
    out: &B::Buf,
    [rows, cols]: [usize; 2],
) -> Result<()> {
    let params = ContraColumnSumParams {
        x: backend.ptr(x).cast(),
        out: backend.ptr(out).cast(),
        rows: extent("rows", rows)?,
        cols: extent("cols", cols)?,
    };
    backend.launch(
        handles::NN_COLUMN_SUM_F32,
        per_column(cols),
        &params,
        &[out],
    )
}

/// The buffers of one BatchNorm1d forward pass.
pub(crate) struct BatchNormFwd<'a, Buf> {
    pub x: &'a Buf,
    /// Weight and bias (affine), or none.
    pub affine: Option<(&'a Buf, &'a Buf)>,
    pub running_mean: &'a Buf,
    pub running_var: &'a Buf,
    pub y: &'a Buf,
    pub x_hat: &'a Buf,
    pub inv_std: &'a Buf,
}

pub(crate) fn batchnorm_fwd<B: Backend>(
    backend: &B,
    bufs: &BatchNormFwd<'_, B::Buf>,
    [rows, cols]: [usize; 2],
    train: bool,
    eps: f32,
    momentum: f32,
) -> Result<()> {
    let (weight, bias) = match bufs.affine {
        Some((w, b)) => (backend.ptr(w).cast_const(), backend.ptr(b).cast_const()),
        None => (std::ptr::null(), std::ptr::null()),
    };
    let params = ContraBatchNormFwdParams {
        x: backend.ptr(bufs.x).cast(),
        weight: weight.cast(),
        bias: bias.cast(),
        y: backend.ptr(bufs.y).cast(),
        x_hat: backend.ptr(bufs.x_hat).cast(),
        inv_std: backend.ptr(bufs.inv_std).cast(),
        running_mean: backend.ptr(bufs.running_mean).cast(),
        running_var: backend.ptr(bufs.running_var).cast(),
        rows: extent("rows", rows)?,
        cols: extent("cols", cols)?,
        train: train as i32,
        eps,
        momentum,
    };
    let written = [bufs.y, bufs.x_hat, bufs.inv_std];
    backend.launch(
        handles::NN_BATCHNORM_FWD_F32,
        per_column(cols),
        &params,
        &written,
    )
}

/// The buffers of one BatchNorm1d backward pass.
pub(crate) struct BatchNormBwd<'a, Buf> {
    pub dy: &'a Buf,
    pub x_hat: &'a Buf,
    pub inv_std: &'a Buf,
    pub weight: Option<&'a Buf>,
    pub dx: &'a Buf,
    /// Where the weight and bias gradients go (affine), or none.
    pub grad_affine: Option<(&'a Buf, &'a Buf)>,
}

pub(crate) fn batchnorm_bwd<B: Backend>(
    backend: &B,
    bufs: &BatchNormBwd<'_, B::Buf>,
    [rows, cols]: [usize; 2],
    train: bool,
) -> Result<()> {
    let (grad_weight, grad_bias) = match bufs.grad_affine {
        Some((w, b)) => (backend.ptr(w), backend.ptr(b)),
        None => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    let params = ContraBatchNormBwdParams {
        dy: backend.ptr(bufs.dy).cast(),
        x_hat: backend.ptr(bufs.x_hat).cast(),
        inv_std: backend.ptr(bufs.inv_std).cast(),
        weight: bufs
            .weight
            .map_or(std::ptr::null(), |w| backend.ptr(w).cast_const().cast()),
        dx: backend.ptr(bufs.dx).cast(),
        grad_weight: grad_weight.cast(),
        grad_bias: grad_bias.cast(),
        rows: extent("rows", rows)?,
        cols: extent("cols", cols)?,
        train: train as i32,
    };
    let mut written = vec![bufs.dx];
    if let Some((w, b)) = bufs.grad_affine {
        written.extend([w, b]);
    }
    backend.launch(
        handles::NN_BATCHNORM_BWD_F32,
        per_column(cols),
        &params,
        &written,
    )
}
