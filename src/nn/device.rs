//! The encoder's training passes on a kernel device (the interpreted mode or a GPU): GEMMs
//! through the backend (cuBLAS on the GPU, our `nn_gemm_f32` kernel otherwise), bias, ReLU and
//! BatchNorm as the kernels of `kernels/nn.cu`, activations kept on the device between layers.
//!
//! The host [`Encoder`] stays the owner of the parameters: each forward uploads the current
//! weights (so optimizers, momentum updates and checkpoints work unchanged on the host), writes
//! the updated BatchNorm running statistics back, and each backward adds the device's parameter
//! gradients into the host `grad`s, exactly where the CPU passes put them.
//!
//! ```
//! use contra::nn::{DeviceEncoder, Encoder, Mat, MlpSpec, Module};
//! use contra::Device;
//!
//! let mut enc = Encoder::simclr(&MlpSpec::backbone(&[8, 16, 16]), 16, 4, 0)?;
//! let x = Mat::from_vec((0..6 * 8).map(|i| (i as f32 * 0.37).sin()).collect(), 6, 8)?;
//! let cpu = enc.clone().forward(&x, true)?;
//!
//! // The same pass as kernels, interpreted on the CPU (Device::Cuda(0) on a GPU).
//! let mut on_device = DeviceEncoder::new(Device::Interp);
//! let z = on_device.forward(&mut enc, &x, true)?;
//! let worst = z.data.iter().zip(&cpu.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
//! assert!(worst < 1e-4);
//!
//! enc.zero_grad();
//! let grad_x = on_device.backward(&mut enc, &Mat::from_vec(vec![1.0; 24], 6, 4)?)?;
//! assert_eq!(grad_x.shape(), [6, 8]);
//! # Ok::<(), contra::Error>(())
//! ```

use std::rc::Rc;

use crate::kernels::interp::{GuardedBuf, Interp};
use crate::kernels::nn::{
    batchnorm_bwd, batchnorm_fwd, bias_relu, column_sum, relu_bwd, BatchNormBwd, BatchNormFwd,
    GemmShape,
};
use crate::kernels::Backend;
use crate::nn::{BatchNorm1d, Encoder, Layer, Linear, Mat, Param};
use crate::{Device, Error, Result, Tensor};

/// Runs an [`Encoder`]'s forward and backward passes on `device`, keeping the activations the
/// backward pass needs on the device in between. On [`Device::Cpu`] it calls the encoder's own
/// CPU passes.
pub struct DeviceEncoder {
    device: Device,
    saved: Option<Saved>,
}

/// The last forward pass's device buffers, per backend.
enum Saved {
    Interp(Pass<GuardedBuf>),
    #[cfg(feature = "cuda")]
    Cuda(
        std::sync::Arc<crate::kernels::cuda::Cuda>,
        Pass<crate::kernels::cuda::CudaBuf>,
    ),
}

/// What one forward pass leaves for the backward pass.
struct Pass<Buf> {
    rows: usize,
    out_cols: usize,
    layers: Vec<SavedLayer<Buf>>,
}

/// A layer's output and what its backward pass keeps.
type LayerOut<Buf> = (Rc<Buf>, SavedLayer<Buf>);

/// Per layer, the device buffers its backward pass reads.
enum SavedLayer<Buf> {
    Linear {
        input: Rc<Buf>,
        weight: Buf,
    },
    BatchNorm {
        x_hat: Buf,
        inv_std: Buf,
        weight: Option<Buf>,
        train: bool,
    },
    Relu {
        output: Rc<Buf>,
    },
}

impl DeviceEncoder {
    /// A runner for `device`; the GPU itself is opened on the first pass.
    pub fn new(device: Device) -> Self {
        DeviceEncoder {
            device,
            saved: None,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// What computes the GEMMs: "cpu (matrixmultiply)", "interp nn_gemm_f32", "cuBLAS", or our
    /// kernel on a GPU whose libcublas is not found.
    pub fn gemm_library(&self) -> Result<String> {
        Ok(match self.device {
            Device::Cpu => "cpu (matrixmultiply)".into(),
            Device::Interp => "interp nn_gemm_f32".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::kernels::cuda::Cuda::get(ordinal)?
                .gemm_library()
                .into(),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(no_cuda()),
        })
    }

    /// `head(backbone(x))` like [`Encoder::forward`] (`train` picks batch or running BatchNorm
    /// statistics; train mode updates the encoder's running statistics), remembering on the
    /// device what [`backward`](Self::backward) needs.
    pub fn forward(&mut self, enc: &mut Encoder, x: &Mat, train: bool) -> Result<Mat> {
        if self.device == Device::Cpu {
            self.saved = None;
            x.check_input("DeviceEncoder::forward", "x", enc.in_features())?;
            enc.set_train(train);
            return enc.forward(x, train);
        }
        // The device output, copied to the host.
        Mat::from_tensor(&self.forward_tensor(enc, x, train)?)
    }

    /// [`forward`](Self::forward) leaving the output on the device, as an f32 tensor
    /// (`rows x out_features`) that a loss takes where it is (on the CPU, a host tensor).
    pub fn forward_tensor(&mut self, enc: &mut Encoder, x: &Mat, train: bool) -> Result<Tensor> {
        self.saved = None;
        x.check_input("DeviceEncoder::forward", "x", enc.in_features())?;
        enc.set_train(train);
        match self.device {
            Device::Cpu => enc.forward(x, train)?.to_tensor(Device::Cpu),
            Device::Interp => {
                let (z, pass) = forward_on(&Interp, enc, x)?;
                let z = output_tensor(&Interp, z, &pass)?;
                self.saved = Some(Saved::Interp(pass));
                Ok(z)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let cuda = crate::kernels::cuda::Cuda::get(ordinal)?;
                let (z, pass) = forward_on(&*cuda, enc, x)?;
                let z = output_tensor(&*cuda, z, &pass)?;
                self.saved = Some(Saved::Cuda(cuda, pass));
                Ok(z)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(no_cuda()),
        }
    }

    /// Backpropagates `dL/dz` through the last [`forward`](Self::forward) of `enc`: adds every
    /// parameter's gradient to its `grad` and returns `dL/dx`. Each forward allows one backward.
    pub fn backward(&mut self, enc: &mut Encoder, grad_out: &Mat) -> Result<Mat> {
        if self.device == Device::Cpu {
            return enc.backward(grad_out);
        }
        // Asked for, the input gradient is always there.
        Ok(self
            .run_backward(enc, GradOut::Host(grad_out), true)?
            .unwrap_or_else(|| Mat::zeros(0, 0)))
    }

    /// [`backward`](Self::backward) for the parameter gradients only (what training needs): the
    /// first layer's input gradient, a GEMM as large as its weight gradient, is not computed.
    pub fn backward_params(&mut self, enc: &mut Encoder, grad_out: &Mat) -> Result<()> {
        if self.device == Device::Cpu {
            return enc.backward_params(grad_out);
        }
        self.run_backward(enc, GradOut::Host(grad_out), false)
            .map(drop)
    }

    /// [`backward_params`](Self::backward_params) from a gradient left on the device (an f32
    /// tensor like [`forward_tensor`](Self::forward_tensor)'s output): no copy of it to the host.
    pub fn backward_params_tensor(&mut self, enc: &mut Encoder, grad_out: &Tensor) -> Result<()> {
        if self.device == Device::Cpu {
            return enc.backward_params(&Mat::from_tensor(grad_out)?);
        }
        self.run_backward(enc, GradOut::Device(grad_out), false)
            .map(drop)
    }

    fn run_backward(
        &mut self,
        enc: &mut Encoder,
        grad_out: GradOut<'_>,
        want_input: bool,
    ) -> Result<Option<Mat>> {
        const OP: &str = "DeviceEncoder::backward";
        let saved = self.saved.take().ok_or_else(|| {
            Error::invalid(
                OP,
                "self",
                "backward called without a forward pass before it",
            )
        })?;
        match saved {
            Saved::Interp(pass) => backward_on(&Interp, enc, pass, grad_out, want_input),
            #[cfg(feature = "cuda")]
            Saved::Cuda(cuda, pass) => backward_on(&*cuda, enc, pass, grad_out, want_input),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::Device("this build of contra has no GPU support (rebuild with `--features cuda`)".into())
}

/// Every layer of the encoder, backbone first.
fn layers_mut(enc: &mut Encoder) -> impl DoubleEndedIterator<Item = &mut Layer> {
    enc.backbone
        .layers_mut()
        .iter_mut()
        .chain(enc.head.layers_mut().iter_mut())
}

/// Errors unless `p` holds `len` values and as many gradients (its fields are public).
fn check_param(op: &'static str, p: &Param, len: usize) -> Result<()> {
    if p.value.len() == len && p.grad.len() == len {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            "param",
            &[p.value.len(), p.grad.len()],
            format!("value and grad of {len} elements ({})", p.name),
        ))
    }
}

fn add_into(grad: &mut [f32], delta: &[f32]) {
    grad.iter_mut().zip(delta).for_each(|(g, d)| *g += d);
}

/// The encoder's output on the device (`rows x cols` f32) and what the backward needs.
type Forward<Buf> = (Rc<Buf>, Pass<Buf>);

fn forward_on<B: Backend>(b: &B, enc: &mut Encoder, x: &Mat) -> Result<Forward<B::Buf>> {
    let rows = x.rows;
    let mut h = Rc::new(b.upload("x", &x.data)?);
    let mut cols = x.cols;
    let mut layers = Vec::new();
    for layer in layers_mut(enc) {
        let (out, saved) = match layer {
            Layer::Linear(l) => linear_fwd(b, l, &h, rows, cols)?,
            Layer::BatchNorm(bn) => batchnorm_layer_fwd(b, bn, &h, rows, cols)?,
            Layer::Relu(_) => {
                let y = Rc::new(b.output("relu_out", rows * cols)?);
                bias_relu(b, &h, None, &y, [rows, cols], true)?;
                (y.clone(), SavedLayer::Relu { output: y })
            }
        };
        cols = b.info(&out).count / rows;
        h = out;
        layers.push(saved);
    }
    let pass = Pass {
        rows,
        out_cols: cols,
        layers,
    };
    Ok((h, pass))
}

/// The output of [`forward_on`] as a device tensor (the buffer itself unless a layer keeps it
/// for the backward, then a copy on the device).
fn output_tensor<B: Backend>(b: &B, out: Rc<B::Buf>, pass: &Pass<B::Buf>) -> Result<Tensor> {
    let buf = match Rc::try_unwrap(out) {
        Ok(owned) => owned,
        Err(shared) => b.duplicate(&shared)?,
    };
    let shape = vec![pass.rows, pass.out_cols];
    Ok(Tensor::from_device_buf(
        shape,
        crate::DType::F32,
        b.adopt(buf)?,
    ))
}

/// The upstream gradient of a backward: a host matrix, or an f32 tensor on the device.
enum GradOut<'a> {
    Host(&'a Mat),
    Device(&'a Tensor),
}

impl GradOut<'_> {
    fn shape(&self) -> Vec<usize> {
        match self {
            GradOut::Host(m) => m.shape().to_vec(),
            GradOut::Device(t) => t.shape().to_vec(),
        }
    }

    /// The gradient as an owned buffer on `b` (the backward overwrites it layer by layer).
    fn to_buf<B: Backend>(&self, b: &B) -> Result<B::Buf> {
        match self {
            GradOut::Host(m) => b.upload("grad_out", &m.data),
            GradOut::Device(t) => {
                let resident = t
                    .device_buf()
                    .and_then(|buf| b.resident(buf))
                    .filter(|buf| b.info(buf).elem == crate::kernels::Elem::F32)
                    .ok_or_else(|| Error::Mismatch {
                        op: "DeviceEncoder::backward",
                        reason: format!(
                            "`grad_out` must be an f32 tensor on the encoder's device, not {} on {}",
                            t.dtype(),
                            t.device()
                        ),
                    })?;
                b.duplicate(resident)
            }
        }
    }
}

/// `y = x W^T (+ b)`.
fn linear_fwd<B: Backend>(
    b: &B,
    l: &Linear,
    x: &Rc<B::Buf>,
    rows: usize,
    cols: usize,
) -> Result<LayerOut<B::Buf>> {
    const OP: &str = "DeviceEncoder::forward";
    let (out, inp) = (l.out_features(), l.in_features());
    if inp != cols {
        return Err(Error::shape(
            OP,
            "layer input",
            &[rows, cols],
            format!("(batch, {inp})"),
        ));
    }
    check_param(OP, &l.weight, out * inp)?;
    let weight = b.upload("weight", &l.weight.value)?;
    let y = b.output("linear_out", rows * out)?;
    b.gemm(
        &GemmShape::product(rows, out, inp, false, true),
        x,
        &weight,
        &y,
    )?;
    if let Some(bias) = &l.bias {
        check_param(OP, bias, out)?;
        let bias = b.upload("bias", &bias.value)?;
        bias_relu(b, &y, Some(&bias), &y, [rows, out], false)?;
    }
    let saved = SavedLayer::Linear {
        input: x.clone(),
        weight,
    };
    Ok((Rc::new(y), saved))
}

fn batchnorm_layer_fwd<B: Backend>(
    b: &B,
    bn: &mut BatchNorm1d,
    x: &B::Buf,
    rows: usize,
    cols: usize,
) -> Result<LayerOut<B::Buf>> {
    const OP: &str = "DeviceEncoder::forward";
    let d = bn.num_features();
    if d != cols || bn.running_var.value.len() != d {
        return Err(Error::shape(
            OP,
            "batchnorm input",
            &[rows, cols],
            format!("(batch, {d})"),
        ));
    }
    let train = bn.is_training();
    if train && rows < 2 {
        return Err(Error::invalid(
            "BatchNorm1d::forward",
            "x",
            "train mode needs more than 1 value per feature (got a batch of 1)",
        ));
    }
    let affine = match (&bn.weight, &bn.bias) {
        (Some(w), Some(s)) => {
            check_param(OP, w, d)?;
            check_param(OP, s, d)?;
            Some((
                b.upload("bn_weight", &w.value)?,
                b.upload("bn_bias", &s.value)?,
            ))
        }
        _ => None,
    };
    let running_mean = b.upload("running_mean", &bn.running_mean.value)?;
    let running_var = b.upload("running_var", &bn.running_var.value)?;
    let (y, x_hat, inv_std) = (
        b.output("bn_out", rows * d)?,
        b.output("x_hat", rows * d)?,
        b.output("inv_std", d)?,
    );
    let bufs = BatchNormFwd {
        x,
        affine: affine.as_ref().map(|(w, s)| (w, s)),
        running_mean: &running_mean,
        running_var: &running_var,
        y: &y,
        x_hat: &x_hat,
        inv_std: &inv_std,
    };
    batchnorm_fwd(b, &bufs, [rows, d], train, bn.eps, bn.momentum)?;
    if train {
        bn.running_mean.value = b.download(&running_mean)?;
        bn.running_var.value = b.download(&running_var)?;
    }
    let saved = SavedLayer::BatchNorm {
        x_hat,
        inv_std,
        weight: affine.map(|(w, _)| w),
        train,
    };
    Ok((Rc::new(y), saved))
}

fn backward_on<B: Backend>(
    b: &B,
    enc: &mut Encoder,
    pass: Pass<B::Buf>,
    grad_out: GradOut<'_>,
    want_input: bool,
) -> Result<Option<Mat>> {
    const OP: &str = "DeviceEncoder::backward";
    let rows = pass.rows;
    if let GradOut::Host(m) = &grad_out {
        m.check_input(OP, "grad_out", pass.out_cols)?;
    }
    if grad_out.shape() != [rows, pass.out_cols] {
        return Err(Error::shape(
            OP,
            "grad_out",
            &grad_out.shape(),
            format!("({rows}, {}) like the forward output", pass.out_cols),
        ));
    }
    if layers_mut(enc).count() != pass.layers.len() {
        return Err(Error::invalid(
            OP,
            "enc",
            "its layers differ from the forward pass's encoder",
        ));
    }
    let mut g = grad_out.to_buf(b)?;
    let mut cols = pass.out_cols;
    let first_layer = pass.layers.len().saturating_sub(1); // in backward order
    let steps = layers_mut(enc).rev().zip(pass.layers.into_iter().rev());
    for (step, (layer, saved)) in steps.enumerate() {
        g = match (layer, saved) {
            (Layer::Linear(l), SavedLayer::Linear { input, weight }) => {
                let (out, inp) = (l.out_features(), l.in_features());
                check_param(OP, &l.weight, out * inp)?;
                // dW = dy^T x (out x in), db = column sums of dy, dx = dy W (rows x in).
                let grad_w = b.output("grad_weight", out * inp)?;
                b.gemm(
                    &GemmShape::product(out, inp, rows, true, false),
                    &g,
                    &input,
                    &grad_w,
                )?;
                add_into(&mut l.weight.grad, &b.download(&grad_w)?);
                if let Some(bias) = &mut l.bias {
                    check_param(OP, bias, out)?;
                    let grad_b = b.output("grad_bias", out)?;
                    column_sum(b, &g, &grad_b, [rows, out])?;
                    add_into(&mut bias.grad, &b.download(&grad_b)?);
                }
                if step == first_layer && !want_input {
                    return Ok(None);
                }
                let dx = b.output("grad_in", rows * inp)?;
                b.gemm(
                    &GemmShape::product(rows, inp, out, false, false),
                    &g,
                    &weight,
                    &dx,
                )?;
                cols = inp;
                dx
            }
            (
                Layer::BatchNorm(bn),
                SavedLayer::BatchNorm {
                    x_hat,
                    inv_std,
                    weight,
                    train,
                },
            ) => {
                let grads = match weight {
                    Some(_) => Some((
                        b.output("grad_bn_weight", cols)?,
                        b.output("grad_bn_bias", cols)?,
                    )),
                    None => None,
                };
                let dx = b.output("grad_in", rows * cols)?;
                let bufs = BatchNormBwd {
                    dy: &g,
                    x_hat: &x_hat,
                    inv_std: &inv_std,
                    weight: weight.as_ref(),
                    dx: &dx,
                    grad_affine: grads.as_ref().map(|(w, s)| (w, s)),
                };
                batchnorm_bwd(b, &bufs, [rows, cols], train)?;
                if let (Some((gw, gb)), Some(w), Some(s)) = (&grads, &mut bn.weight, &mut bn.bias) {
                    add_into(&mut w.grad, &b.download(gw)?);
                    add_into(&mut s.grad, &b.download(gb)?);
                }
                dx
            }
            (Layer::Relu(_), SavedLayer::Relu { output }) => {
                let dx = b.output("grad_in", rows * cols)?;
                relu_bwd(b, &output, &g, &dx, rows * cols)?;
                dx
            }
            _ => {
                return Err(Error::invalid(
                    OP,
                    "enc",
                    "its layers differ from the forward pass's encoder",
                ))
            }
        };
    }
    match want_input {
        true => Mat::from_vec(b.download(&g)?, rows, cols).map(Some),
        false => Ok(None),
    }
}
