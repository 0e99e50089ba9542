//! A 3 x 3 convolution (stride 1, padding 1) on candle's CPU storage whose forward pass and both
//! gradients are GEMMs over one image's im2col matrix at a time.
//!
//! Why the example carries it: candle 0.11's CPU `conv2d` backward computes the weight gradient
//! as a convolution of the batch-transposed input with an H x W "kernel" and the input gradient
//! as a direct transposed convolution; for this CNN at batch 256 the two cost 3-4x the forward
//! pass and were most of a training step. Here all three passes are the same GEMM size, and a
//! whole training step is twice as fast (136 s -> 68 s per Fashion-MNIST epoch on 2 cores). On
//! other devices (CUDA) and dtypes `conv3x3` is candle's own `conv2d`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Images per chunk of the weight gradient's partial sums: a fixed split, so the sum's order
/// (and every bit of the result) does not depend on the thread count or on work stealing.
const WEIGHT_GRAD_CHUNK: usize = 16;

/// `x (B, C, H, W)` convolved with `w (O, C, 3, 3)`, zero padding 1, stride 1: `(B, O, H, W)`.
pub fn conv3x3(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (_, wc, kh, kw) = w.dims4()?;
    if (wc, kh, kw) != (c, 3, 3) {
        candle_core::bail!(
            "conv3x3: weight {:?} does not fit input {:?} (expected (O, {c}, 3, 3))",
            w.dims(),
            x.dims()
        );
    }
    let ours = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if ours && x.elem_count() > 0 && w.elem_count() > 0 {
        x.contiguous()?.apply_op2(&w.contiguous()?, Conv3x3)
    } else {
        x.conv2d(w, 1, 1, 1, 1)
    }
}

/// The forward op; its `bwd` runs the two gradient ops below.
struct Conv3x3;

/// `dx` from `(grad (B, O, H, W), w)`.
struct InputGrad;

/// `dw` from `(x, grad (B, O, H, W))`.
struct WeightGrad;

/// The sizes of one image: input channels, height, width.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    h: usize,
    w: usize,
}

impl Dims {
    fn hw(self) -> usize {
        self.h * self.w
    }
    /// Rows of the im2col matrix (its columns are the `hw` pixels).
    fn taps(self) -> usize {
        self.c * 9
    }
}

/// The contiguous f32 data of a CPU tensor argument.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("conv3x3: f32 storage only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("conv3x3: arguments must be contiguous");
    };
    Ok(&data[start..end])
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let (o, ..) = wl.shape().dims4()?;
        let d = Dims { c, h, w };
        let (x, weight) = (f32_data(xs, xl)?, f32_data(ws, wl)?);
        let mut y = vec![0f32; b * o * d.hw()];
        y.par_chunks_mut(o * d.hw())
            .zip(x.par_chunks(c * d.hw()))
            .for_each_init(
                || vec![0f32; d.taps() * d.hw()],
                |cols, (y_img, x_img)| {
                    im2col(x_img, d, cols);
                    // y (O x HW) = w (O x C9) * cols (C9 x HW)
                    gemm(o, d.taps(), d.hw(), weight, false, cols, false, 0.0, y_img);
                },
            );
        Ok((CpuStorage::F32(y), Shape::from((b, o, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &InputGrad)?;
        let dw = x.apply_op2_no_bwd(&grad, &WeightGrad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv3x3-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, o, h, w) = gl.shape().dims4()?;
        let (_, c, _, _) = wl.shape().dims4()?;
        let d = Dims { c, h, w };
        let (grad, weight) = (f32_data(gs, gl)?, f32_data(ws, wl)?);
        let mut dx = vec![0f32; b * c * d.hw()];
        dx.par_chunks_mut(c * d.hw())
            .zip(grad.par_chunks(o * d.hw()))
            .for_each_init(
                || vec![0f32; d.taps() * d.hw()],
                |cols, (dx_img, g_img)| {
                    // dcols (C9 x HW) = w^T (C9 x O) * g (O x HW), then back onto the pixels.
                    gemm(d.taps(), o, d.hw(), weight, true, g_img, false, 0.0, cols);
                    col2im(cols, d, dx_img);
                },
            );
        Ok((CpuStorage::F32(dx), Shape::from((b, c, h, w))))
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv3x3-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = xl.shape().dims4()?;
        let (_, o, _, _) = gl.shape().dims4()?;
        let d = Dims { c, h, w };
        let (x, grad) = (f32_data(xs, xl)?, f32_data(gs, gl)?);
        let size = o * d.taps();
        let partials: Vec<Vec<f32>> = x
            .par_chunks(WEIGHT_GRAD_CHUNK * c * d.hw())
            .zip(grad.par_chunks(WEIGHT_GRAD_CHUNK * o * d.hw()))
            .map(|(x_chunk, g_chunk)| {
                let mut dw = vec![0f32; size];
                let mut cols = vec![0f32; d.taps() * d.hw()];
                for (x_img, g_img) in x_chunk.chunks(c * d.hw()).zip(g_chunk.chunks(o * d.hw())) {
                    im2col(x_img, d, &mut cols);
                    // dw (O x C9) += g (O x HW) * cols^T (HW x C9)
                    gemm(o, d.hw(), d.taps(), g_img, false, &cols, true, 1.0, &mut dw);
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; size];
        for partial in partials {
            dw.iter_mut().zip(partial).for_each(|(sum, v)| *sum += v);
        }
        Ok((CpuStorage::F32(dw), Shape::from((o, c, 3, 3))))
    }
}

/// The pixel ranges `(destination, source)` of one row for the horizontal tap `kx` (0, 1, 2 for
/// offsets -1, 0, +1); the rest of the destination row is padding.
fn tap_span(kx: usize, w: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    match kx {
        0 => (1..w, 0..w - 1),
        1 => (0..w, 0..w),
        _ => (0..w - 1, 1..w),
    }
}

/// One image's im2col matrix: row `(ci * 3 + ky) * 3 + kx` holds, for every output pixel, the
/// input pixel under tap `(ky, kx)` of channel `ci` (zero outside the image).
fn im2col(img: &[f32], d: Dims, cols: &mut [f32]) {
    let (h, w, hw) = (d.h, d.w, d.hw());
    for (ci, plane) in img.chunks(hw).enumerate() {
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &mut cols[((ci * 3 + ky) * 3 + kx) * hw..][..hw];
                let (dst, src) = tap_span(kx, w);
                for (y, out) in row.chunks_mut(w).enumerate() {
                    match (y + ky).checked_sub(1).filter(|&sy| sy < h) {
                        Some(sy) => {
                            out.fill(0.0);
                            out[dst.clone()].copy_from_slice(&plane[sy * w..][src.clone()]);
                        }
                        None => out.fill(0.0),
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2col`: adds every tap's row back onto the input pixels it was read from.
fn col2im(cols: &[f32], d: Dims, img: &mut [f32]) {
    let (h, w, hw) = (d.h, d.w, d.hw());
    img.fill(0.0);
    for (ci, plane) in img.chunks_mut(hw).enumerate() {
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &cols[((ci * 3 + ky) * 3 + kx) * hw..][..hw];
                let (dst, src) = tap_span(kx, w);
                for (y, values) in row.chunks(w).enumerate() {
                    if let Some(sy) = (y + ky).checked_sub(1).filter(|&sy| sy < h) {
                        let target = &mut plane[sy * w..][src.clone()];
                        for (t, v) in target.iter_mut().zip(&values[dst.clone()]) {
                            *t += v;
                        }
                    }
                }
            }
        }
    }
}

/// `c = a * b + beta * c` for row-major `a (m x k)` and `b (k x n)`, either given transposed.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    at: bool,
    b: &[f32],
    bt: bool,
    beta: f32,
    c: &mut [f32],
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // Row-major strides (row, column) of the operand as it enters the product.
    let strides = |transposed: bool, rows: usize, cols: usize| {
        if transposed {
            (1, rows as isize)
        } else {
            (cols as isize, 1)
        }
    };
    let (rsa, csa) = strides(at, m, k);
    let (rsb, csb) = strides(bt, k, n);
    // SAFETY: the assert above keeps every index matrixmultiply forms in bounds: `a` holds m x k
    // values reached through its row-major strides (or those of its transpose), `b` k x n, and
    // `c`, written only here, m x n; the three slices do not overlap (`c` is borrowed mutably).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let diff = norm(&(a - b).unwrap()).to_scalar::<f32>().unwrap();
        diff / norm(a).to_scalar::<f32>().unwrap()
    }

    /// The op and its two gradients against candle's conv2d, at odd sizes and one channel.
    #[test]
    fn matches_candles_conv2d() -> candle_core::Result<()> {
        for (b, c, o, h, w) in [(3, 5, 7, 9, 11), (2, 1, 4, 6, 5), (17, 3, 2, 1, 2)] {
            let dev = Device::Cpu;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c, 3, 3), &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (b, o, h, w), &dev)?;
            let ours = conv3x3(&x, &k)?;
            let theirs = x.conv2d(&k, 1, 1, 1, 1)?;
            assert!(
                relative_error(&theirs, &ours) < 1e-5,
                "forward at {b}x{c}x{h}x{w}"
            );
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
            for (name, var) in [("dx", x.as_tensor()), ("dw", k.as_tensor())] {
                let (a, e) = (g_theirs.get(var).unwrap(), g_ours.get(var).unwrap());
                assert!(relative_error(a, e) < 1e-5, "{name} at {b}x{c}x{o}x{h}x{w}");
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_a_weight_of_another_size() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((3, 2, 5, 5), DType::F32, &dev).unwrap();
        let err = conv3x3(&x, &k).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
