//! Launch sequences of `kernels/infonce.cu` for InfoNCE and NT-Xent: optional normalize kernels
//! around the fused forward (per-row LSE, no N x M buffer) and the one-pass backward.

use super::params::{ContraInfonceBwdParams, ContraInfonceFwdParams, ContraRowDotParams};
use super::{
    blocks_for, elementwise, extent, handles, normalize,
    waves::{key_ranges, row_output},
    Backend, BufInfo, Elem, Kernel, KernelParams, Launch, Typed,
};
use crate::Result;

/// Query (or owner) rows per block in infonce.cu.
const TILE: usize = 64;

/// Blocks that keep a 132-SM H100 busy twice over: a key split aims at least this many.
const FILL_BLOCKS: usize = 2 * 132;

/// `infonce_fwd_resident`'s pipeline depth (kResidentStages in kernels/infonce_tc.cuh).
const RESIDENT_STAGES: usize = 3;

/// The most dynamic shared memory the resident kernels take: two blocks of the forward still fit
/// per SM of an H100 next to their static shared memory (an A100's 164 KB holds one at this
/// size). Wider rows run `infonce_fwd` / `infonce_bwd`.
const RESIDENT_MAX_BYTES: usize = 96 * 1024;

/// How the tensor cores take operands of `elem` at the calling thread's precision: the bytes of
/// a staged word, the mma's k-step and the forward's slice (kernels/tile_dot.cuh and
/// infonce_tc.cuh), or None for CUDA cores (exact f32).
fn tensor_core_operands(elem: Elem) -> Option<(usize, usize, usize)> {
    match elem {
        Elem::Bf16 | Elem::F16 => Some((2, 16, 64)),
        Elem::F32 if crate::f32_precision() == crate::F32Precision::Tf32 => Some((4, 8, 32)),
        _ => None,
    }
}

/// The dynamic shared memory of `infonce_fwd_resident` and `infonce_bwd_resident` at `dim`
/// features (ResidentGeometry in kernels/infonce_tc.cuh: 64 query rows of the features rounded
/// up to a k-step plus one 16-byte chunk, and the key stages), or None when the operands run on
/// CUDA cores or the rows do not fit in `RESIDENT_MAX_BYTES`.
fn resident_rows_bytes(elem: Elem, dim: usize) -> Option<usize> {
    let (word, k_step, slice) = tensor_core_operands(elem)?;
    let chunk = 16 / word;
    let q_stride = dim
        .div_ceil(k_step)
        .checked_mul(k_step)?
        .checked_add(chunk)?;
    let stages = RESIDENT_STAGES * TILE * (slice + chunk);
    let bytes = TILE
        .checked_mul(q_stride)?
        .checked_add(stages)?
        .checked_mul(word)?;
    (bytes <= RESIDENT_MAX_BYTES).then_some(bytes)
}

/// Dynamic shared memory of the wgmma forward (kernels/infonce_wgmma.cuh) at `dim` features: a
/// 1024-byte alignment margin, the query rows in 8 KB panels (of 64 16-bit features or 32 tf32
/// ones) and RESIDENT_STAGES 8 KB key slices; None unless the backend runs the sm_90a kernels,
/// the operands go to the tensor cores (16-bit, or f32 under TF32) and the rows fit in
/// `RESIDENT_MAX_BYTES` (up to 512 16-bit features, 256 tf32).
fn wgmma_rows_bytes<B: Backend>(b: &B, elem: Elem, dim: usize) -> Option<usize> {
    let (word, _, _) = tensor_core_operands(elem)?;
    if !b.runs_sm90a() {
        return None;
    }
    let bytes = wgmma_panels(dim, word)
        .checked_add(RESIDENT_STAGES)?
        .checked_mul(WGMMA_PANEL_BYTES)?
        .checked_add(WGMMA_ALIGNMENT)?;
    (bytes <= RESIDENT_MAX_BYTES).then_some(bytes)
}

/// The sm_90a kernels' operands: panels of 128-byte rows (64 16-bit features, 32 tf32;
/// kernels/wgmma.cuh), from a 1024-aligned shared address that the launch leaves room for.
const WGMMA_ROW_BYTES: usize = 128;
const WGMMA_PANEL_BYTES: usize = TILE * WGMMA_ROW_BYTES;
const WGMMA_ALIGNMENT: usize = 1024;

/// The panels that hold `dim` features of `word`-byte operands (at least one).
fn wgmma_panels(dim: usize, word: usize) -> usize {
    dim.div_ceil(WGMMA_ROW_BYTES / word).max(1)
}

/// Hopper's fused backward (`infonce_bwd_wgmma_<width>_<bf16|f16>`, kernels/infonce_sm90a.cu)
/// where the backend runs the sm_90a kernels: bf16 and f16 up to `FUSED_MAX_DIM` features, the
/// narrowest of its four widths that holds `dim`, with its dynamic shared memory (the rows, two
/// key tiles and G: 105 KB at D = 256) where it fits the `per_block` bytes the GPU gives a block.
fn wgmma_backward<B: Backend>(
    b: &B,
    elem: Elem,
    dim: usize,
    per_block: usize,
) -> Option<(Kernel<ContraInfonceBwdParams>, usize)> {
    if dim > FUSED_MAX_DIM || !b.runs_sm90a() {
        return None;
    }
    let panels = wgmma_panels(dim, 2);
    let kernel = match (elem, panels) {
        (Elem::Bf16, 1) => handles::INFONCE_BWD_WGMMA_64_BF16,
        (Elem::Bf16, 2) => handles::INFONCE_BWD_WGMMA_128_BF16,
        (Elem::Bf16, 3) => handles::INFONCE_BWD_WGMMA_192_BF16,
        (Elem::Bf16, _) => handles::INFONCE_BWD_WGMMA_256_BF16,
        (Elem::F16, 1) => handles::INFONCE_BWD_WGMMA_64_F16,
        (Elem::F16, 2) => handles::INFONCE_BWD_WGMMA_128_F16,
        (Elem::F16, 3) => handles::INFONCE_BWD_WGMMA_192_F16,
        (Elem::F16, _) => handles::INFONCE_BWD_WGMMA_256_F16,
        _ => return None,
    };
    let bytes = (3 * panels + 1) * WGMMA_PANEL_BYTES + WGMMA_ALIGNMENT;
    (bytes + FUSED_STATIC_SHARED <= per_block).then_some((kernel, bytes))
}

fn launch_shape(rows: usize) -> Launch {
    Launch {
        grid: [blocks_for(rows, TILE), 1, 1],
        block: [16, 16, 1],
        shared_bytes: 0,
    }
}

/// The key tiles each block of a sweep over `s` takes (0: all of them, no split) and the sweep's
/// grid where the device gives no figure for the wave model (the interpreted mode). A softmax
/// that may split its keys (MoCo) and has fewer than `FILL_BLOCKS` row tiles gets its key tiles
/// cut into at least `FILL_BLOCKS / row tiles` ranges along grid y (N = 256 rows against a
/// 65536-key queue: 4 x 69 blocks instead of 4).
pub(crate) fn sweep_grid<Buf>(s: &Softmax<'_, Buf>) -> (usize, Launch) {
    let row_blocks = blocks_for(s.rows, TILE);
    let tiles = blocks_for(s.cols, TILE);
    if !s.split_keys || row_blocks >= FILL_BLOCKS || tiles < 2 {
        return (0, launch_shape(s.rows));
    }
    let splits = FILL_BLOCKS.div_ceil(row_blocks).min(tiles);
    // Rounding the range down keeps the block count at `splits` or more.
    let per_block = (tiles / splits).max(1);
    let launch = Launch {
        grid: [row_blocks, tiles.div_ceil(per_block), 1],
        block: [16, 16, 1],
        shared_bytes: 0,
    };
    (per_block, launch)
}

/// The key split of a sweep over `s` by `kernel` at `shape`, rows of `longest` key tiles: by the
/// wave model where the device gives a figure (`key_ranges`), else MoCo's `sweep_grid`; (tiles
/// per range or 0, the launch).
fn key_split<B: Backend, P: KernelParams>(
    b: &B,
    s: &Softmax<'_, B::Buf>,
    kernel: Kernel<P>,
    shape: Launch,
    longest: usize,
) -> (usize, Launch) {
    key_ranges(b, kernel, shape, longest).unwrap_or_else(|| {
        let (per_range, grid) = sweep_grid(s);
        (
            per_range,
            Launch {
                grid: grid.grid,
                ..shape
            },
        )
    })
}

/// One InfoNCE problem on a backend. `q` and `k` are the raw inputs; with `normalize` the
/// kernels see their normalized copies.
pub(crate) struct Problem<'a, B: Backend> {
    pub q: &'a B::Buf,
    pub k: &'a B::Buf,
    pub positives: &'a B::Buf,
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
    pub temperature: f64,
    pub normalize: bool,
    pub self_mask: bool,
    /// q and k are the same rows (NT-Xent): the symmetric forward and backward.
    pub symmetric: bool,
}

/// Normalized copies of q and k when the problem asks for cosine similarity (one copy when they
/// are the same rows).
enum Operands<Buf> {
    Raw,
    Normalized(Buf, Buf),
    Shared(Buf),
}

impl<B: Backend> Problem<'_, B> {
    fn operands(&self, b: &B) -> Result<Operands<B::Buf>> {
        if !self.normalize {
            return Ok(Operands::Raw);
        }
        if self.symmetric {
            return Ok(Operands::Shared(normalize::forward(
                b, self.q, self.rows, self.dim,
            )?));
        }
        Ok(Operands::Normalized(
            normalize::forward(b, self.q, self.rows, self.dim)?,
            normalize::forward(b, self.k, self.cols, self.dim)?,
        ))
    }

    fn pick<'s>(&'s self, ops: &'s Operands<B::Buf>) -> (&'s B::Buf, &'s B::Buf) {
        match ops {
            Operands::Raw => (self.q, self.k),
            Operands::Normalized(q, k) => (q, k),
            Operands::Shared(z) => (z, z),
        }
    }

    fn scale(&self) -> f32 {
        (1.0 / self.temperature) as f32
    }

    /// The fused softmax over the (possibly normalized) operands `q`, `k`.
    fn softmax<'s>(&'s self, q: &'s B::Buf, k: &'s B::Buf) -> Softmax<'s, B::Buf> {
        Softmax {
            q,
            k,
            positives: Some(self.positives),
            labels: None,
            col_lse: None,
            log_scale: None,
            symmetric: self.symmetric,
            split_keys: false,
            rows: self.rows,
            cols: self.cols,
            dim: self.dim,
        }
    }

    /// The per-row losses (the loss is their mean) and the per-row log-sum-exp.
    pub fn forward(&self, b: &B) -> Result<(B::Buf, B::Buf)> {
        self.forward_on(b, &self.operands(b)?)
    }

    fn forward_on(&self, b: &B, ops: &Operands<B::Buf>) -> Result<(B::Buf, B::Buf)> {
        let (q, k) = self.pick(ops);
        fused_forward(
            b,
            self.softmax(q, k),
            self.scale(),
            self.self_mask,
            None,
            None,
        )
    }

    /// Gradients of `grad_loss * loss` for q and k, in one backward pass. A symmetric problem
    /// returns only dz = dq + dk.
    pub fn backward(
        &self,
        b: &B,
        lse: &B::Buf,
        grad_loss: f64,
    ) -> Result<(B::Buf, Option<B::Buf>)> {
        self.backward_on(b, &self.operands(b)?, lse, grad_loss)
    }

    /// Forward and backward (`grad_loss` = 1) over operands normalized once.
    pub fn forward_backward(&self, b: &B) -> Result<Sweep<B::Buf>> {
        let ops = self.operands(b)?;
        let (row_loss, lse) = self.forward_on(b, &ops)?;
        let (grad_q, grad_k) = self.backward_on(b, &ops, &lse, 1.0)?;
        Ok(Sweep {
            row_loss,
            lse,
            grad_q,
            grad_k,
        })
    }

    fn backward_on(
        &self,
        b: &B,
        ops: &Operands<B::Buf>,
        lse: &B::Buf,
        grad_loss: f64,
    ) -> Result<(B::Buf, Option<B::Buf>)> {
        let (q, k) = self.pick(ops);
        let softmax = self.softmax(q, k);
        let grad_scale = (grad_loss / self.rows as f64) as f32;
        let pass = BackwardPass {
            lse,
            scale: self.scale(),
            grad_scale,
            self_mask: self.self_mask,
        };
        let (grad_q, grad_k) = if self.symmetric {
            (pass.symmetric(b, &softmax)?, None)
        } else {
            let (grad_q, grad_k) = pass.both_sides(b, &softmax)?;
            (grad_q, Some(grad_k))
        };
        if !self.normalize {
            return Ok((grad_q, grad_k));
        }
        // The symmetric problem's dz comes back in grad_q, through z = q's normalization.
        let grad_q = normalize::backward(b, self.q, &grad_q, self.rows, self.dim)?;
        let grad_k = match grad_k {
            Some(g) => Some(normalize::backward(b, self.k, &g, self.cols, self.dim)?),
            None => None,
        };
        Ok((grad_q, grad_k))
    }
}

/// What a forward and backward in one call leave on the device.
pub(crate) struct Sweep<Buf> {
    /// The per-row losses (the loss is their mean).
    pub row_loss: Buf,
    pub lse: Buf,
    pub grad_q: Buf,
    /// None for a symmetric problem (`grad_q` is then dz).
    pub grad_k: Option<Buf>,
}

/// The operands of one fused softmax as the kernels see them (already normalized if the loss
/// asks for it).
pub(crate) struct Softmax<'a, Buf> {
    pub q: &'a Buf,
    pub k: &'a Buf,
    /// The positive key of each query; `None` when the positive is an extra logit (MoCo) or
    /// given by labels.
    pub positives: Option<&'a Buf>,
    /// SupCon: a label per row (i32) and `1 / |P(i)|` per row (f32, 0 without positives).
    pub labels: Option<(&'a Buf, &'a Buf)>,
    /// CLIP's column log-sum-exp: the backward adds the column softmax (symmetric loss).
    pub col_lse: Option<&'a Buf>,
    /// CLIP's learnable log-scale left on the device (one f32): the logit scale is its exp,
    /// in place of the scale passed by value.
    pub log_scale: Option<&'a Buf>,
    /// q and k are the same rows (NT-Xent, SupCon): the forward visits each pair of tiles once.
    pub symmetric: bool,
    /// MoCo: few rows against a long queue may split the keys across blocks (`sweep_grid`).
    pub split_keys: bool,
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
}

impl<'a, Buf> Softmax<'a, Buf> {
    /// MoCo's softmax: each query against the queue, its positive an extra logit (given at the
    /// launch), the keys splittable across blocks.
    pub fn queue(q: &'a Buf, queue: &'a Buf, rows: usize, queue_len: usize, dim: usize) -> Self {
        Softmax {
            q,
            k: queue,
            positives: None,
            labels: None,
            col_lse: None,
            log_scale: None,
            symmetric: false,
            split_keys: true,
            rows,
            cols: queue_len,
            dim,
        }
    }
}

/// The kernel address of an optional buffer (NULL when absent).
fn or_null<B: Backend>(b: &B, buf: Option<&B::Buf>) -> *mut std::ffi::c_void {
    buf.map_or(std::ptr::null_mut(), |buf| b.ptr(buf))
}

/// Running log-sum-exp states `{max: -inf, sum: 0}` for `n` rows or columns, as the kernels
/// fold into them (pairs of f32 words).
pub(crate) fn empty_lse_states<B: Backend>(b: &B, n: usize) -> Result<B::Buf> {
    let info = BufInfo {
        elem: Elem::I32,
        count: 2 * n,
    };
    elementwise::filled(b, "lse_states", info, &[f32::NEG_INFINITY.to_bits(), 0])
}

/// `infonce_bwd`'s static shared memory: G and the second products' staging buffer (64 x 65 f32
/// each) and 8 warp partials.
const BACKWARD_STATIC_SHARED: usize = 2 * TILE * (TILE + 1) * 4 + 8 * 4;

/// Shared memory per block that still lets two blocks share an SM of an H100 (228 KB, 1 KB of it
/// reserved per block).
const TWO_BLOCKS_SHARED: usize = 113 * 1024;

/// The dynamic shared memory of `infonce_bwd_resident`, when the backward takes it (bf16 past
/// `FUSED_MAX_DIM` features, where `infonce_bwd_fused_bf16` does not take it): bf16 (one
/// block per SM anyway: its dQ stays in registers) whenever the rows fit, other tensor-core
/// operands while two blocks still fit per SM (tf32 at D = 256 would drop to one: it keeps
/// `infonce_bwd`).
fn resident_backward_bytes(elem: Elem, dim: usize) -> Option<usize> {
    resident_rows_bytes(elem, dim)
        .filter(|&bytes| elem == Elem::Bf16 || bytes + BACKWARD_STATIC_SHARED <= TWO_BLOCKS_SHARED)
}

/// The fused backward's widest rows: its dQ stays in registers (kFusedMaxDim in
/// kernels/infonce_tc.cuh).
const FUSED_MAX_DIM: usize = 4 * TILE;

/// The fused backward's block: 16 warps (kFusedThreads in kernels/infonce_tc.cuh).
const FUSED_BLOCK: [u32; 3] = [16, 32, 1];

/// The fused backward's static shared memory (the log-scale partials of its 16 warps).
const FUSED_STATIC_SHARED: usize = 16 * 4;

/// The fused backward for operands of `elem` at the calling thread's precision, with its dynamic
/// shared memory (FusedGeometry in kernels/infonce_tc.cuh): the block's query rows and two key
/// tiles, each row the features rounded up to whole 64-feature chunks and one 16-byte chunk of
/// pad, then G (64 rows of 64 keys and the pad) in the operand type. bf16
/// (`infonce_bwd_fused_bf16`: its 8-warp form measured faster than the resident backward on an
/// H200; the 16-warp form not measured yet) and f16 (`infonce_bwd_fused_f16`, G scaled by a
/// power of two into f16's range; in place of the resident backward, whose f16 products run on
/// CUDA cores) up to `FUSED_MAX_DIM` features; f32 as tf32 (`infonce_bwd_fused_tf32`, 217 KB at
/// D = 256) where the resident backward does not fit two blocks per SM (past 208 features), in
/// place of the re-staging `infonce_bwd` (not measured yet: the tf32 resident backward keeps the
/// narrower rows until a GPU run compares the two). Only where it fits the `per_block` bytes of
/// shared memory the GPU gives a block (an A100's 163 KB holds the 16-bit layout, not the tf32
/// one at D = 256); None otherwise.
fn fused_backward(
    elem: Elem,
    dim: usize,
    per_block: usize,
) -> Option<(Kernel<ContraInfonceBwdParams>, usize)> {
    let kernel = match (elem, tensor_core_operands(elem)) {
        (Elem::Bf16, _) => handles::INFONCE_BWD_FUSED_BF16,
        (Elem::F16, _) => handles::INFONCE_BWD_FUSED_F16,
        (Elem::F32, Some(_)) if resident_backward_bytes(elem, dim).is_none() => {
            handles::INFONCE_BWD_FUSED_TF32
        }
        _ => return None,
    };
    let (word, _, _) = tensor_core_operands(elem)?;
    if dim > FUSED_MAX_DIM {
        return None;
    }
    let chunk = 16 / word;
    let stride = dim.div_ceil(TILE) * TILE + chunk;
    let bytes = (3 * TILE * stride + TILE * (TILE + chunk)) * word;
    (bytes + FUSED_STATIC_SHARED <= per_block).then_some((kernel, bytes))
}

/// The losses the kernels are instantiated for at compile time (`FixedLoss` in
/// kernels/infonce_rows.cuh: the fused backward, the resident forward), by the mix of the
/// family's inputs they use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FixedLoss {
    /// Symmetric.
    NtXent,
    /// Symmetric, with labels.
    SupCon,
    /// With the column softmax.
    Clip,
    /// None of them (InfoNCE, MoCo).
    InfoNce,
}

/// The `FixedLoss` of this mix of inputs; None for any other mix (no loss of the crate makes
/// one), which keeps the general kernels.
fn fixed_loss(symmetric: bool, column_softmax: bool, labels: bool) -> Option<FixedLoss> {
    match (symmetric, column_softmax, labels) {
        (true, false, false) => Some(FixedLoss::NtXent),
        (true, false, true) => Some(FixedLoss::SupCon),
        (false, true, false) => Some(FixedLoss::Clip),
        (false, false, false) => Some(FixedLoss::InfoNce),
        _ => None,
    }
}

/// The resident forward of `loss` (an instantiation per loss).
fn resident_forward(loss: FixedLoss) -> Typed<ContraInfonceFwdParams> {
    match loss {
        FixedLoss::NtXent => handles::INFONCE_FWD_RESIDENT_NTXENT,
        FixedLoss::SupCon => handles::INFONCE_FWD_RESIDENT_SUPCON,
        FixedLoss::Clip => handles::INFONCE_FWD_RESIDENT_CLIP,
        FixedLoss::InfoNce => handles::INFONCE_FWD_RESIDENT_INFONCE,
    }
}

/// The sm_90a (wgmma) forward of `loss`.
fn wgmma_forward(loss: FixedLoss) -> Typed<ContraInfonceFwdParams> {
    match loss {
        FixedLoss::NtXent => handles::INFONCE_FWD_WGMMA_NTXENT,
        FixedLoss::SupCon => handles::INFONCE_FWD_WGMMA_SUPCON,
        FixedLoss::Clip => handles::INFONCE_FWD_WGMMA_CLIP,
        FixedLoss::InfoNce => handles::INFONCE_FWD_WGMMA_INFONCE,
    }
}

/// `infonce_fwd`: the per-row losses (the loss is their mean) and the per-row log-sum-exp.
/// `extra_key` adds MoCo's positive logit `scale * q_i . extra_key_i` to each row and makes it
/// the target; `col_state` (CLIP) receives the columns' softmax states. A symmetric softmax
/// sweeps half the tiles, and a sweep cut into key ranges (MoCo's queue, or rows too few to fill
/// the card) sweeps each range in its own block: both fold their rows into shared row states,
/// then `infonce_finish` writes lse and the loss.
pub(crate) fn fused_forward<B: Backend>(
    b: &B,
    s: Softmax<'_, B::Buf>,
    scale: f32,
    self_mask: bool,
    extra_key: Option<&B::Buf>,
    col_state: Option<&B::Buf>,
) -> Result<(B::Buf, B::Buf)> {
    let lse = b.output("lse", s.rows)?;
    let row_loss = b.output("row_loss", s.rows)?;
    let elem = b.info(s.q).elem;
    // CLIP's column softmax is the caller's col_state.
    let loss = fixed_loss(s.symmetric, col_state.is_some(), s.labels.is_some());
    // Tensor-core operands whose query rows fit stay resident (one instantiation per loss), on
    // Hopper's wgmma where the device has it.
    let resident = resident_rows_bytes(elem, s.dim);
    let rows_shape = launch_shape(s.rows);
    let resident_shape = |bytes| Launch {
        shared_bytes: bytes,
        ..rows_shape
    };
    let (whole, whole_shape) = match (resident, loss, wgmma_rows_bytes(b, elem, s.dim)) {
        (Some(_), Some(loss), Some(bytes)) => (wgmma_forward(loss), resident_shape(bytes)),
        (Some(bytes), Some(loss), None) => (resident_forward(loss), resident_shape(bytes)),
        _ => (handles::INFONCE_FWD, rows_shape),
    };
    let whole = whole.of_product(elem);
    // Rows too few to fill the card cut their keys into ranges; a symmetric sweep's rows are
    // half-rows.
    let tiles = blocks_for(s.cols, TILE);
    let longest = if s.symmetric { tiles / 2 + 1 } else { tiles };
    let (kernel, (split_tiles, shape)) = if s.split_keys {
        // MoCo's queue splits by its own instantiation (no column folds).
        let (split, split_shape) = match resident {
            Some(bytes) => (handles::INFONCE_FWD_SPLIT_RESIDENT, resident_shape(bytes)),
            None => (handles::INFONCE_FWD_SPLIT, rows_shape),
        };
        let split = split.of_product(elem);
        match key_split(b, &s, split, split_shape, longest) {
            (0, _) => (whole, (0, whole_shape)),
            cut => (split, cut),
        }
    } else {
        (whole, key_split(b, &s, whole, whole_shape, longest))
    };
    // Rows whose statistics several blocks add to are finished by infonce_finish.
    let shared_rows = s.symmetric || split_tiles > 0;
    let row_states = match shared_rows {
        true => Some((empty_lse_states(b, s.rows)?, b.zeros("row_target", s.rows)?)),
        false => None,
    };
    let (row_state, row_target) = match &row_states {
        Some((states, target)) => (Some(states), Some(target)),
        None => (None, None),
    };
    // A symmetric sweep's columns are its rows.
    let (col_state, col_target) = match s.symmetric {
        true => (row_state, row_target),
        false => (col_state, None),
    };
    let params = ContraInfonceFwdParams {
        q: b.ptr(s.q),
        k: b.ptr(s.k),
        positives: or_null(b, s.positives).cast(),
        labels: or_null(b, s.labels.map(|(labels, _)| labels)).cast(),
        target_weight: or_null(b, s.labels.map(|(_, weight)| weight)).cast(),
        extra_key: or_null(b, extra_key),
        col_state: or_null(b, col_state).cast(),
        symmetric: s.symmetric as i32,
        col_target: or_null(b, col_target).cast(),
        row_state: or_null(b, row_state).cast(),
        row_target: or_null(b, row_target).cast(),
        lse: b.ptr(&lse).cast(),
        row_loss: b.ptr(&row_loss).cast(),
        rows: extent("rows", s.rows)?,
        cols: extent("cols", s.cols)?,
        dim: extent("dim", s.dim)?,
        self_mask: self_mask as i32,
        scale,
        log_scale: or_null(b, s.log_scale).cast(),
        split_tiles: extent("split_tiles", split_tiles)?,
    };
    if shared_rows {
        b.launch(kernel, shape, &params, &[])?;
        b.launch(
            handles::INFONCE_FINISH,
            Launch::linear(blocks_for(s.rows, 256), 256),
            &params,
            &[&lse, &row_loss],
        )?;
    } else {
        b.launch(kernel, shape, &params, &[&lse, &row_loss])?;
    }
    Ok((row_loss, lse))
}

/// What every `infonce_bwd` launch of one loss shares: the forward's log-sum-exp and the scales.
pub(crate) struct BackwardPass<'a, Buf> {
    pub lse: &'a Buf,
    pub scale: f32,
    /// d(total) / d(loss) over the loss's normaliser.
    pub grad_scale: f32,
    pub self_mask: bool,
}

/// The kernel and grid of one backward pass, chosen before its outputs exist: under a key
/// split the blocks of a row tile add their shares to grad_q, which then starts as zeros, and
/// CLIP's log-scale partials are one per block.
struct BackwardPlan {
    kernel: Kernel<ContraInfonceBwdParams>,
    shape: Launch,
    /// Key tiles per range of the split, 0 for none.
    split_tiles: usize,
    symmetric: bool,
}

impl BackwardPlan {
    /// grad_q for this plan: zeros under a key split, an output the kernel fills otherwise.
    fn grad_q<B: Backend>(&self, b: &B, s: &Softmax<'_, B::Buf>) -> Result<B::Buf> {
        row_output(b, "grad_q", s.rows * s.dim, self.split_tiles)
    }

    fn blocks(&self) -> usize {
        self.shape.grid.iter().product()
    }
}

impl<Buf> BackwardPass<'_, Buf> {
    /// The query gradient only (MoCo: the keys get none).
    pub fn queries<B: Backend<Buf = Buf>>(&self, b: &B, s: &Softmax<'_, Buf>) -> Result<Buf> {
        let plan = backward_plan(b, s, false);
        let grad_q = plan.grad_q(b, s)?;
        self.launch(b, s, &plan, &grad_q, None, None)?;
        Ok(grad_q)
    }

    /// q and k are the same rows (NT-Xent, SupCon): dz = dq + dk from one pass.
    pub fn symmetric<B: Backend<Buf = Buf>>(&self, b: &B, s: &Softmax<'_, Buf>) -> Result<Buf> {
        let plan = backward_plan(b, s, true);
        let grad = plan.grad_q(b, s)?;
        self.launch(b, s, &plan, &grad, None, None)?;
        Ok(grad)
    }

    /// Both gradients in one pass, (grad_q, grad_k); grad_k by atomic adds.
    pub fn both_sides<B: Backend<Buf = Buf>>(
        &self,
        b: &B,
        s: &Softmax<'_, Buf>,
    ) -> Result<(Buf, Buf)> {
        let plan = backward_plan(b, s, false);
        let (grad_q, grad_k) = (plan.grad_q(b, s)?, b.zeros("grad_k", s.cols * s.dim)?);
        self.launch(b, s, &plan, &grad_q, Some(&grad_k), None)?;
        Ok((grad_q, grad_k))
    }

    /// CLIP: both gradients and the partials of the gradient of `log_scale` (one per block; the
    /// gradient is their sum), centred on the diagonal dot products `diag_dot`.
    pub fn both_sides_and_log_scale<B: Backend<Buf = Buf>>(
        &self,
        b: &B,
        s: &Softmax<'_, Buf>,
        diag_dot: &Buf,
    ) -> Result<(Buf, Buf, Buf)> {
        let plan = backward_plan(b, s, false);
        let (grad_q, grad_k) = (plan.grad_q(b, s)?, b.zeros("grad_k", s.cols * s.dim)?);
        let partial = b.output("log_scale_partial", plan.blocks())?;
        self.launch(
            b,
            s,
            &plan,
            &grad_q,
            Some(&grad_k),
            Some((&partial, diag_dot)),
        )?;
        Ok((grad_q, grad_k, partial))
    }

    fn launch<B: Backend<Buf = Buf>>(
        &self,
        b: &B,
        s: &Softmax<'_, Buf>,
        plan: &BackwardPlan,
        grad_q: &Buf,
        grad_k: Option<&Buf>,
        log_scale_partial: Option<(&Buf, &Buf)>,
    ) -> Result<()> {
        let params = ContraInfonceBwdParams {
            q: b.ptr(s.q),
            k: b.ptr(s.k),
            positives: or_null(b, s.positives).cast(),
            labels: or_null(b, s.labels.map(|(labels, _)| labels)).cast(),
            target_weight: or_null(b, s.labels.map(|(_, weight)| weight)).cast(),
            lse: b.ptr(self.lse).cast(),
            col_lse: or_null(b, s.col_lse).cast(),
            log_scale_partial: or_null(b, log_scale_partial.map(|(partial, _)| partial)).cast(),
            diag_dot: or_null(b, log_scale_partial.map(|(_, diag)| diag)).cast(),
            grad_q: b.ptr(grad_q).cast(),
            grad_k: or_null(b, grad_k).cast(),
            rows: extent("rows", s.rows)?,
            cols: extent("cols", s.cols)?,
            dim: extent("dim", s.dim)?,
            self_mask: self.self_mask as i32,
            symmetric: plan.symmetric as i32,
            scale: self.scale,
            grad_scale: self.grad_scale,
            log_scale: or_null(b, s.log_scale).cast(),
            split_tiles: extent("split_tiles", plan.split_tiles)?,
        };
        // The outputs the kernel must fill: grad_q unless its blocks add to zeros, the partials.
        let mut written: Vec<&Buf> = log_scale_partial
            .map(|(partial, _)| partial)
            .into_iter()
            .collect();
        if plan.split_tiles == 0 {
            written.push(grad_q);
        }
        b.launch(plan.kernel, plan.shape, &params, &written)
    }
}

/// The backward's plan for `s` (symmetric or not): rows too few to fill the card cut their keys
/// into ranges (`key_split`: the wave model, or without a device figure MoCo's fixed split), and
/// the blocks add their shares of grad_q atomically.
fn backward_plan<B: Backend>(b: &B, s: &Softmax<'_, B::Buf>, symmetric: bool) -> BackwardPlan {
    let elem = b.info(s.q).elem;
    let per_block = b.shared_bytes_per_block();
    let fused = wgmma_backward(b, elem, s.dim, per_block)
        .or_else(|| fused_backward(elem, s.dim, per_block))
        .filter(|_| fixed_loss(symmetric, s.col_lse.is_some(), s.labels.is_some()).is_some());
    let rows_shape = launch_shape(s.rows);
    let (kernel, shape) = match (fused, resident_backward_bytes(elem, s.dim)) {
        (Some((kernel, bytes)), _) => (
            kernel,
            Launch {
                block: FUSED_BLOCK,
                shared_bytes: bytes,
                ..rows_shape
            },
        ),
        (None, Some(bytes)) => (
            handles::INFONCE_BWD_RESIDENT.of_product(elem),
            Launch {
                shared_bytes: bytes,
                ..rows_shape
            },
        ),
        (None, None) => (handles::INFONCE_BWD.of_product(elem), rows_shape),
    };
    // Every block of the backward sweeps all its row's key tiles.
    let (split_tiles, shape) = key_split(b, s, kernel, shape, blocks_for(s.cols, TILE));
    BackwardPlan {
        kernel,
        shape,
        split_tiles,
        symmetric,
    }
}

/// `a_i . b_i` for each row of two `rows x dim` buffers of one element type, as f32.
pub(crate) fn row_dots<B: Backend>(
    b: &B,
    lhs: &B::Buf,
    rhs: &B::Buf,
    rows: usize,
    dim: usize,
) -> Result<B::Buf> {
    let out = b.output("diag_dot", rows)?;
    let params = ContraRowDotParams {
        a: b.ptr(lhs),
        b: b.ptr(rhs),
        out: b.ptr(&out).cast(),
        rows: extent("rows", rows)?,
        dim: extent("dim", dim)?,
    };
    let kernel = handles::INFONCE_ROW_DOT.of(b.info(lhs).elem);
    b.launch(
        kernel,
        Launch::linear(blocks_for(rows, 8), 256),
        &params,
        &[&out],
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_rows_take_their_shared_memory_up_to_the_cap() {
        // bf16 at D = 256: 64 x (256 + 8) + 3 x 64 x (64 + 8) halves.
        assert_eq!(resident_rows_bytes(Elem::Bf16, 256), Some(61_440));
        // D = 19 rounds up to two 16-feature k-steps.
        assert_eq!(
            resident_rows_bytes(Elem::F16, 19),
            Some((64 * (32 + 8) + 3 * 64 * 72) * 2)
        );
        assert_eq!(resident_rows_bytes(Elem::Bf16, 544), Some(96 * 1024));
        assert_eq!(resident_rows_bytes(Elem::Bf16, 545), None);
        assert_eq!(resident_rows_bytes(Elem::F32, 256), None);
        crate::with_f32_precision(crate::F32Precision::Tf32, || {
            // tf32 at D = 256: 64 x (256 + 4) + 3 x 64 x (32 + 4) words of 4 bytes.
            assert_eq!(resident_rows_bytes(Elem::F32, 256), Some(94_208));
            assert_eq!(resident_rows_bytes(Elem::F32, 300), None);
        });
        assert_eq!(resident_rows_bytes(Elem::Bf16, usize::MAX), None);
    }

    #[test]
    fn wgmma_panels_hold_128_bytes_of_each_row() {
        // 64 16-bit features or 32 tf32 ones a panel (kPanelFeatures in kernels/infonce_wgmma.cuh).
        assert_eq!(wgmma_panels(64, 2), 1);
        assert_eq!(wgmma_panels(65, 2), 2);
        assert_eq!(wgmma_panels(256, 2), 4);
        assert_eq!(wgmma_panels(19, 4), 1);
        assert_eq!(wgmma_panels(33, 4), 2);
        assert_eq!(wgmma_panels(256, 4), 8);
        // An empty row still stages one panel (of zeros).
        assert_eq!(wgmma_panels(0, 4), 1);
    }

    #[test]
    fn the_fused_backward_takes_16_bit_and_tf32_rows_up_to_256_features() {
        let h100 = 227 * 1024;
        let bytes = |elem, dim| fused_backward(elem, dim, h100).map(|(_, bytes)| bytes);
        // 64 rows and two key tiles of 256 + 8 elements, and G: 108 KB.
        assert_eq!(bytes(Elem::Bf16, 256), Some(110_592));
        // 40 features are staged as one whole 64-feature chunk.
        assert_eq!(bytes(Elem::Bf16, 40), bytes(Elem::Bf16, 64));
        assert_eq!(bytes(Elem::Bf16, 257), None);
        // f16: bf16's layout.
        assert_eq!(bytes(Elem::F16, 256), Some(110_592));
        assert_eq!(bytes(Elem::F16, 257), None);
        // f32: only as tf32; 64 rows and two key tiles of 256 + 4 words, and G: 212 KB.
        assert_eq!(bytes(Elem::F32, 256), None);
        crate::with_f32_precision(crate::F32Precision::Tf32, || {
            assert_eq!(bytes(Elem::F32, 256), Some(217_088));
            assert_eq!(bytes(Elem::F32, 257), None);
            // Up to 208 features the resident backward keeps two blocks per SM.
            assert_eq!(bytes(Elem::F32, 208), None);
            assert!(bytes(Elem::F32, 209).is_some());
            // An A100 (163 KB per block) takes neither the tf32 layout at 256 nor at 209.
            let a100 = 163 * 1024;
            assert_eq!(fused_backward(Elem::F32, 256, a100).map(|(_, b)| b), None);
            assert_eq!(fused_backward(Elem::F32, 209, a100).map(|(_, b)| b), None);
        });
        // The bf16 layout fits one: the static 64 B on top of the dynamic bytes.
        assert!(fused_backward(Elem::Bf16, 256, 110_592 + 64).is_some());
        assert!(fused_backward(Elem::Bf16, 256, 110_592 + 63).is_none());
    }

    #[test]
    fn each_mix_of_inputs_has_its_instantiated_loss_or_none() {
        assert_eq!(fixed_loss(true, false, false), Some(FixedLoss::NtXent));
        assert_eq!(fixed_loss(true, false, true), Some(FixedLoss::SupCon));
        assert_eq!(fixed_loss(false, true, false), Some(FixedLoss::Clip));
        assert_eq!(fixed_loss(false, false, false), Some(FixedLoss::InfoNce));
        // No loss of the crate mixes these: the general kernels take them (the per-loss
        // instantiations would trap).
        for (symmetric, column_softmax, labels) in [
            (true, true, false),
            (false, false, true),
            (false, true, true),
            (true, true, true),
        ] {
            assert_eq!(fixed_loss(symmetric, column_softmax, labels), None);
        }
        assert_eq!(
            resident_forward(FixedLoss::Clip).tf32.map(|k| k.name),
            Some("infonce_fwd_resident_clip_tf32")
        );
    }

    #[test]
    fn the_backward_keeps_rows_resident_unless_it_costs_a_block_per_sm() {
        assert_eq!(resident_backward_bytes(Elem::Bf16, 544), Some(96 * 1024));
        assert_eq!(resident_backward_bytes(Elem::F16, 256), Some(61_440));
        assert_eq!(resident_backward_bytes(Elem::F16, 544), None);
        crate::with_f32_precision(crate::F32Precision::Tf32, || {
            assert_eq!(resident_backward_bytes(Elem::F32, 256), None);
            assert!(resident_backward_bytes(Elem::F32, 128).is_some());
        });
    }

    fn moco_softmax(rows: usize, cols: usize) -> Softmax<'static, ()> {
        Softmax::queue(&(), &(), rows, cols, 128)
    }

    /// Every key tile in exactly one non-empty range of a block column.
    fn assert_ranges_cover(tiles: usize, per_block: usize, ranges: usize) {
        assert!(
            per_block >= 1 && per_block * ranges >= tiles,
            "{ranges} x {per_block} < {tiles}"
        );
        assert!(
            per_block * (ranges - 1) < tiles,
            "range {} is empty",
            ranges - 1
        );
    }

    #[test]
    fn moco_at_256_rows_and_a_65536_key_queue_fills_two_blocks_per_sm() {
        let (per_block, launch) = sweep_grid(&moco_softmax(256, 65536));
        assert_eq!(launch.grid[0], 4);
        assert!(
            launch.grid[0] * launch.grid[1] >= 2 * 132,
            "{:?}",
            launch.grid
        );
        assert_ranges_cover(1024, per_block, launch.grid[1]);
    }

    #[test]
    fn key_splits_cover_every_tile_once() {
        for (rows, cols) in [
            (37, 101),
            (1, 3),
            (130, 70),
            (64, 64 * 300 + 1),
            (300, 5000),
        ] {
            let (per_block, launch) = sweep_grid(&moco_softmax(rows, cols));
            let tiles = blocks_for(cols, TILE);
            if per_block == 0 {
                assert!(tiles < 2, "{rows}x{cols} not split");
                assert_eq!(launch.grid[1], 1);
            } else {
                assert_ranges_cover(tiles, per_block, launch.grid[1]);
            }
        }
    }

    #[test]
    fn only_a_softmax_that_asks_and_lacks_row_blocks_splits() {
        let mut s = moco_softmax(256, 65536);
        s.split_keys = false;
        assert_eq!(sweep_grid(&s).0, 0);
        let many_rows = moco_softmax(64 * 264, 65536);
        assert_eq!(sweep_grid(&many_rows).0, 0);
    }
}
