//! The encoder's training passes on a kernel device (the interpreted mode or a GPU): GEMMs
//! through the backend (cuBLAS on the GPU, our `nn_gemm_f32` kernel otherwise), bias, ReLU and
//! BatchNorm as the kernels of `kernels/nn.cu`, activations kept on the device between layers.
//!
//! Here the host [`Encoder`] stays the owner of the parameters: each forward uploads the current
//! weights (so optimizers, momentum updates and checkpoints work unchanged on the host), writes
//! the updated BatchNorm running statistics back, and each backward adds the device's parameter
//! gradients into the host `grad`s, exactly where the CPU passes put them. To keep the
//! parameters, gradients and optimizer state on the device instead, use
//! [`ResidentEncoder`](crate::nn::ResidentEncoder), which runs the same passes.
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
use crate::ops::writable_on;
use crate::{DType, Device, Error, Result, Tensor};

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
pub(crate) struct Pass<Buf> {
    rows: usize,
    out_cols: usize,
    layers: Vec<SavedLayer<Buf>>,
}

/// A layer's output and what its backward pass keeps.
type LayerOut<Buf> = (Rc<Buf>, SavedLayer<Buf>);

/// Per layer, what its backward pass reads: device buffers, and the weights it was run with.
enum SavedLayer<Buf> {
    Linear {
        input: Rc<Buf>,
        weight: Tensor,
    },
    BatchNorm {
        x_hat: Buf,
        inv_std: Buf,
        weight: Option<Tensor>,
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
        if self.device == Device::Cpu {
            return enc.forward(x, train)?.to_tensor(Device::Cpu);
        }
        // The host encoder owns the parameters: this pass runs with copies of them, and the
        // running statistics it updates come back.
        let mut weights = Weights::upload(enc, self.device)?;
        let z = self.forward_with(enc, &mut weights, Batch::Host(x))?;
        if train {
            for (buffer, stats) in enc.buffers_mut().into_iter().zip(&weights.running) {
                buffer.value = stats.to_vec::<f32>()?;
            }
        }
        Ok(z)
    }

    /// The forward pass on a kernel device with the parameters `weights` (in place of the
    /// encoder's own values); `enc` gives the layers and their modes.
    pub(crate) fn forward_with(
        &mut self,
        enc: &Encoder,
        weights: &mut Weights,
        x: Batch<'_>,
    ) -> Result<Tensor> {
        self.saved = None;
        x.check(enc.in_features())?;
        match self.device {
            Device::Cpu => Err(Error::invalid(
                "DeviceEncoder::forward",
                "device",
                "device weights need a kernel device",
            )),
            Device::Interp => {
                let (z, pass) = forward_on(&Interp, enc, weights, x)?;
                let z = output_tensor(&Interp, z, &pass)?;
                self.saved = Some(Saved::Interp(pass));
                Ok(z)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let cuda = crate::kernels::cuda::Cuda::get(ordinal)?;
                let (z, pass) = forward_on(&*cuda, enc, weights, x)?;
                let z = output_tensor(&*cuda, z, &pass)?;
                self.saved = Some(Saved::Cuda(cuda, pass));
                Ok(z)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(no_cuda()),
        }
    }

    /// Forgets the last forward pass (its activations, and its hold on the weights).
    pub(crate) fn clear(&mut self) {
        self.saved = None;
    }

    /// Backpropagates `dL/dz` through the last [`forward`](Self::forward) of `enc`: adds every
    /// parameter's gradient to its `grad` and returns `dL/dx`. Each forward allows one backward.
    pub fn backward(&mut self, enc: &mut Encoder, grad_out: &Mat) -> Result<Mat> {
        if self.device == Device::Cpu {
            return enc.backward(grad_out);
        }
        let grad_x = self.add_param_grads(enc, GradOut::Host(grad_out), true)?;
        // Asked for, the input gradient is always there.
        Ok(grad_x.unwrap_or_else(|| Mat::zeros(0, 0)))
    }

    /// [`backward`](Self::backward) for the parameter gradients only (what training needs): the
    /// first layer's input gradient, a GEMM as large as its weight gradient, is not computed.
    pub fn backward_params(&mut self, enc: &mut Encoder, grad_out: &Mat) -> Result<()> {
        if self.device == Device::Cpu {
            return enc.backward_params(grad_out);
        }
        self.add_param_grads(enc, GradOut::Host(grad_out), false)
            .map(drop)
    }

    /// [`backward_params`](Self::backward_params) from a gradient left on the device (an f32
    /// tensor like [`forward_tensor`](Self::forward_tensor)'s output): no copy of it to the host.
    pub fn backward_params_tensor(&mut self, enc: &mut Encoder, grad_out: &Tensor) -> Result<()> {
        if self.device == Device::Cpu {
            return enc.backward_params(&Mat::from_tensor(grad_out)?);
        }
        self.add_param_grads(enc, GradOut::Device(grad_out), false)
            .map(drop)
    }

    /// The backward into the host encoder's gradients (copied from the device).
    fn add_param_grads(
        &mut self,
        enc: &mut Encoder,
        grad_out: GradOut<'_>,
        want_input: bool,
    ) -> Result<Option<Mat>> {
        let (grads, grad_x) = self.backward_with(enc, grad_out, want_input)?;
        for (p, grad) in enc.params_mut().into_iter().zip(grads) {
            if let Some(grad) = grad {
                let delta = grad.to_vec::<f32>()?;
                p.grad.iter_mut().zip(&delta).for_each(|(g, d)| *g += d);
            }
        }
        Ok(grad_x)
    }

    /// The backward of the last forward: each parameter's gradient as an f32 tensor on the
    /// device (`params()` order; `None` where the pass did not reach it), and `dL/dx` when
    /// `want_input`.
    pub(crate) fn backward_with(
        &mut self,
        enc: &Encoder,
        grad_out: GradOut<'_>,
        want_input: bool,
    ) -> Result<(Vec<Option<Tensor>>, Option<Mat>)> {
        const OP: &str = "DeviceEncoder::backward";
        let saved = self.saved.take().ok_or_else(|| {
            Error::invalid(
                OP,
                "self",
                "backward called without a forward pass before it",
            )
        })?;
        match saved {
            Saved::Interp(pass) => grads_as_tensors(&Interp, enc, pass, grad_out, want_input),
            #[cfg(feature = "cuda")]
            Saved::Cuda(cuda, pass) => grads_as_tensors(&*cuda, enc, pass, grad_out, want_input),
        }
    }
}

/// [`backward_on`] with the parameter gradients as device tensors shaped like the parameters.
fn grads_as_tensors<B: Backend>(
    b: &B,
    enc: &Encoder,
    pass: Pass<B::Buf>,
    grad_out: GradOut<'_>,
    want_input: bool,
) -> Result<(Vec<Option<Tensor>>, Option<Mat>)> {
    let (grads, grad_x) = backward_on(b, enc, pass, grad_out, want_input)?;
    let tensors = grads
        .into_iter()
        .zip(enc.params())
        .map(|(grad, p)| {
            grad.map(|buf| {
                Ok(Tensor::from_device_buf(
                    vec![p.len()],
                    DType::F32,
                    b.adopt(buf)?,
                ))
            })
            .transpose()
        })
        .collect::<Result<_>>()?;
    Ok((tensors, grad_x))
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::Device("this build of contra has no GPU support (rebuild with `--features cuda`)".into())
}

/// Every layer of the encoder, backbone first.
fn layers(enc: &Encoder) -> impl DoubleEndedIterator<Item = &Layer> {
    enc.backbone.layers().iter().chain(enc.head.layers())
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

/// The encoder's parameter values (`params()` order) and BatchNorm running statistics
/// (`buffers()` order) as f32 tensors on the pass's device.
pub(crate) struct Weights {
    pub values: Vec<Tensor>,
    pub running: Vec<Tensor>,
}

impl Weights {
    /// Copies of `enc`'s parameters and running statistics on `device`.
    pub fn upload(enc: &Encoder, device: Device) -> Result<Weights> {
        let upload = |values: &[f32], shape: &[usize]| {
            Tensor::from_slice(values, &[shape.iter().product::<usize>()], device)
        };
        Ok(Weights {
            values: (enc.params().into_iter())
                .map(|p| upload(&p.value, &p.shape))
                .collect::<Result<_>>()?,
            running: (enc.buffers().into_iter())
                .map(|b| upload(&b.value, &b.shape))
                .collect::<Result<_>>()?,
        })
    }
}

/// The device buffer of `t` on `b`.
fn buffer_of<'t, B: Backend>(b: &B, what: &'static str, t: &'t Tensor) -> Result<&'t B::Buf> {
    t.device_buf()
        .and_then(|buf| b.resident(buf))
        .filter(|buf| b.info(buf).elem == crate::kernels::Elem::F32)
        .ok_or_else(|| Error::Mismatch {
            op: "DeviceEncoder",
            reason: format!("`{what}` is not an f32 tensor on the pass's device"),
        })
}

/// The encoder's output on the device (`rows x cols` f32) and what the backward needs.
type Forward<Buf> = (Rc<Buf>, Pass<Buf>);

/// An encoder's input batch: host rows (copied in), or an f32 tensor (`rows x in_features`)
/// already on the encoder's device (used there).
#[derive(Clone, Copy, Debug)]
pub enum Batch<'a> {
    Host(&'a Mat),
    Device(&'a Tensor),
}

impl<'a> From<&'a Mat> for Batch<'a> {
    fn from(x: &'a Mat) -> Self {
        Batch::Host(x)
    }
}

impl<'a> From<&'a Tensor> for Batch<'a> {
    fn from(x: &'a Tensor) -> Self {
        Batch::Device(x)
    }
}

impl Batch<'_> {
    /// Errors unless the batch is `rows x cols` with rows > 0 (an f32 tensor of rank 2).
    pub(crate) fn check(&self, cols: usize) -> Result<()> {
        const OP: &str = "DeviceEncoder::forward";
        match self {
            Batch::Host(m) => m.check_input(OP, "x", cols),
            Batch::Device(t) => {
                if t.rank() != 2 || t.shape()[1] != cols || t.dtype() != DType::F32 {
                    return Err(Error::shape(
                        OP,
                        "x",
                        t.shape(),
                        format!("(batch, {cols}) f32, not {}", t.dtype()),
                    ));
                }
                if t.shape()[0] == 0 {
                    return Err(Error::Empty {
                        op: OP,
                        arg: "x",
                        what: "batch of 0 rows".into(),
                    });
                }
                Ok(())
            }
        }
    }

    pub(crate) fn rows(&self) -> usize {
        match self {
            Batch::Host(m) => m.rows,
            Batch::Device(t) => t.shape()[0],
        }
    }

    /// The batch as an owned buffer on `b` (copied in, or copied on the device).
    fn to_buf<B: Backend>(self, b: &B) -> Result<B::Buf> {
        match self {
            Batch::Host(m) => b.upload("x", &m.data),
            Batch::Device(t) => b.duplicate(buffer_of(b, "x", t)?),
        }
    }
}

/// `head(backbone(x))` on `b` with the parameters `weights` (train-mode BatchNorm updates
/// `weights.running` in place); `enc` gives the layers.
pub(crate) fn forward_on<B: Backend>(
    b: &B,
    enc: &Encoder,
    weights: &mut Weights,
    x: Batch<'_>,
) -> Result<Forward<B::Buf>> {
    let (n_params, n_running) = (enc.params().len(), enc.buffers().len());
    if weights.values.len() != n_params || weights.running.len() != n_running {
        return Err(Error::invalid(
            "DeviceEncoder::forward",
            "weights",
            format!(
                "{} parameters and {} running statistics for an encoder of {n_params} and {n_running}",
                weights.values.len(),
                weights.running.len()
            ),
        ));
    }
    let rows = x.rows();
    let mut h = Rc::new(x.to_buf(b)?);
    let mut cols = enc.in_features();
    let mut saved_layers = Vec::new();
    let (mut param, mut running) = (0, 0);
    for layer in layers(enc) {
        let (out, saved) = match layer {
            Layer::Linear(l) => {
                let values = &weights.values[param..param + 1 + l.bias.is_some() as usize];
                param += values.len();
                linear_fwd(b, l, values, &h, rows, cols)?
            }
            Layer::BatchNorm(bn) => {
                let affine = bn.weight.is_some() && bn.bias.is_some();
                let values = &weights.values[param..param + 2 * affine as usize];
                param += bn.params().len();
                let stats = &mut weights.running[running..running + 2];
                running += 2;
                batchnorm_layer_fwd(b, bn, values, stats, &h, rows, cols)?
            }
            Layer::Relu(_) => {
                let y = Rc::new(b.output("relu_out", rows * cols)?);
                bias_relu(b, &h, None, &y, [rows, cols], true)?;
                (y.clone(), SavedLayer::Relu { output: y })
            }
        };
        cols = b.info(&out).count / rows;
        h = out;
        saved_layers.push(saved);
    }
    let pass = Pass {
        rows,
        out_cols: cols,
        layers: saved_layers,
    };
    Ok((h, pass))
}

/// The output of [`forward_on`] as a device tensor (the buffer itself unless a layer keeps it
/// for the backward, then a copy on the device).
pub(crate) fn output_tensor<B: Backend>(
    b: &B,
    out: Rc<B::Buf>,
    pass: &Pass<B::Buf>,
) -> Result<Tensor> {
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
pub(crate) enum GradOut<'a> {
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

/// `y = x W^T (+ b)`; `values` are the weight and, with a bias, the bias.
fn linear_fwd<B: Backend>(
    b: &B,
    l: &Linear,
    values: &[Tensor],
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
    let y = b.output("linear_out", rows * out)?;
    b.gemm(
        &GemmShape::product(rows, out, inp, false, true),
        x,
        buffer_of(b, "weight", &values[0])?,
        &y,
    )?;
    if let (Some(bias), Some(value)) = (&l.bias, values.get(1)) {
        check_param(OP, bias, out)?;
        let bias = buffer_of(b, "bias", value)?;
        bias_relu(b, &y, Some(bias), &y, [rows, out], false)?;
    }
    let saved = SavedLayer::Linear {
        input: x.clone(),
        weight: values[0].clone(),
    };
    Ok((Rc::new(y), saved))
}

/// `values`: the affine weight and bias (empty without); `stats`: the running mean and
/// variance, updated in place in train mode.
fn batchnorm_layer_fwd<B: Backend>(
    b: &B,
    bn: &BatchNorm1d,
    values: &[Tensor],
    stats: &mut [Tensor],
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
    let affine = match (&bn.weight, &bn.bias, values) {
        (Some(w), Some(s), [weight, bias]) => {
            check_param(OP, w, d)?;
            check_param(OP, s, d)?;
            Some((
                buffer_of(b, "bn_weight", weight)?,
                buffer_of(b, "bn_bias", bias)?,
            ))
        }
        _ => None,
    };
    let [mean, var] = stats else {
        return Err(Error::invalid(
            OP,
            "stats",
            "a BatchNorm layer has two running statistics",
        ));
    };
    let (y, x_hat, inv_std) = (
        b.output("bn_out", rows * d)?,
        b.output("x_hat", rows * d)?,
        b.output("inv_std", d)?,
    );
    let bufs = BatchNormFwd {
        x,
        affine,
        running_mean: writable_on(b, OP, "running_mean", mean)?,
        running_var: writable_on(b, OP, "running_var", var)?,
        y: &y,
        x_hat: &x_hat,
        inv_std: &inv_std,
    };
    batchnorm_fwd(b, &bufs, [rows, d], train, bn.eps, bn.momentum)?;
    let saved = SavedLayer::BatchNorm {
        x_hat,
        inv_std,
        weight: values.first().cloned(),
        train,
    };
    Ok((Rc::new(y), saved))
}

/// The parameter gradients of one backward, in `params()` order (`None`: not reached), and the
/// input gradient when asked for.
pub(crate) type Backward<Buf> = (Vec<Option<Buf>>, Option<Mat>);

/// Backpropagates `grad_out` through `pass` of `enc` (its layers).
pub(crate) fn backward_on<B: Backend>(
    b: &B,
    enc: &Encoder,
    pass: Pass<B::Buf>,
    grad_out: GradOut<'_>,
    want_input: bool,
) -> Result<Backward<B::Buf>> {
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
    if layers(enc).count() != pass.layers.len() {
        return Err(Error::invalid(
            OP,
            "enc",
            "its layers differ from the forward pass's encoder",
        ));
    }
    let mut grads: Vec<Option<B::Buf>> = enc.params().iter().map(|_| None).collect();
    // Parameter indices are handed out from the end, as the layers are walked backwards.
    let mut param = grads.len();
    let mut g = grad_out.to_buf(b)?;
    let mut cols = pass.out_cols;
    let first_layer = pass.layers.len().saturating_sub(1); // in backward order
    let steps = layers(enc).rev().zip(pass.layers.into_iter().rev());
    for (step, (layer, saved)) in steps.enumerate() {
        g = match (layer, saved) {
            (Layer::Linear(l), SavedLayer::Linear { input, weight }) => {
                let (out, inp) = (l.out_features(), l.in_features());
                check_param(OP, &l.weight, out * inp)?;
                param -= l.params().len();
                // dW = dy^T x (out x in), db = column sums of dy, dx = dy W (rows x in).
                let grad_w = b.output("grad_weight", out * inp)?;
                b.gemm(
                    &GemmShape::product(out, inp, rows, true, false),
                    &g,
                    &input,
                    &grad_w,
                )?;
                grads[param] = Some(grad_w);
                if let Some(bias) = &l.bias {
                    check_param(OP, bias, out)?;
                    let grad_b = b.output("grad_bias", out)?;
                    column_sum(b, &g, &grad_b, [rows, out])?;
                    grads[param + 1] = Some(grad_b);
                }
                if step == first_layer && !want_input {
                    return Ok((grads, None));
                }
                let dx = b.output("grad_in", rows * inp)?;
                b.gemm(
                    &GemmShape::product(rows, inp, out, false, false),
                    &g,
                    buffer_of(b, "weight", &weight)?,
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
                param -= bn.params().len();
                let affine_grads = match weight {
                    Some(_) => Some((
                        b.output("grad_bn_weight", cols)?,
                        b.output("grad_bn_bias", cols)?,
                    )),
                    None => None,
                };
                let dx = b.output("grad_in", rows * cols)?;
                let weight = match &weight {
                    Some(w) => Some(buffer_of(b, "bn_weight", w)?),
                    None => None,
                };
                let bufs = BatchNormBwd {
                    dy: &g,
                    x_hat: &x_hat,
                    inv_std: &inv_std,
                    weight,
                    dx: &dx,
                    grad_affine: affine_grads.as_ref().map(|(w, s)| (w, s)),
                };
                batchnorm_bwd(b, &bufs, [rows, cols], train)?;
                if let Some((gw, gb)) = affine_grads {
                    grads[param] = Some(gw);
                    grads[param + 1] = Some(gb);
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
    let input = match want_input {
        true => Some(Mat::from_vec(b.download(&g)?, rows, cols)?),
        false => None,
    };
    Ok((grads, input))
}
