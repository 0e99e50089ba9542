//! An encoder that lives on its device: parameters, gradients, BatchNorm running statistics and
//! (through [`Optimizer::step_device`]) optimizer state stay there between steps, so a training
//! step moves only the input batch in and the loss out. The host copy is made when asked for
//! ([`ResidentEncoder::to_encoder`]: checkpoints, evaluation).
//!
//! ```
//! use contra::nn::{Encoder, Mat, MlpSpec, Optimizer, ResidentEncoder, Sgd};
//! use contra::{ntxent_backward, ntxent_forward, Device, NtXentOptions, Transfers};
//!
//! let enc = Encoder::simclr(&MlpSpec::backbone(&[8, 16, 16]), 16, 4, 0)?;
//! let mut model = ResidentEncoder::new(enc, Device::Interp)?; // uploaded once
//! let mut opt = Sgd::new(0.9, 1e-4, false)?;
//! let x = Mat::from_vec((0..6 * 8).map(|i| (i as f32 * 0.37).sin()).collect(), 6, 8)?;
//!
//! let before = Transfers::current();
//! model.zero_grad()?;
//! let z = model.forward(&x, true)?; // the batch is copied in
//! let opts = NtXentOptions::default();
//! let fwd = ntxent_forward(&z, &opts)?;
//! let grad = ntxent_backward(&z, &opts, &fwd.saved, 1.0)?;
//! model.backward_params(&grad)?;
//! model.step(&mut opt, 0.1)?;
//! let loss = fwd.loss.to_scalar()?; // the loss is copied out
//! assert_eq!((Transfers::current() - before).copies(), 2);
//! assert!(loss.is_finite());
//!
//! let trained: Encoder = model.to_encoder()?; // the parameters come back
//! # Ok::<(), contra::Error>(())
//! ```

use crate::kernels::{self, run_on_kernels, Backend};
use crate::nn::device::{Batch, GradOut, Weights};
use crate::nn::{DeviceEncoder, DeviceParam, Encoder, Mat, Module, Optimizer};
use crate::ops::writable_on;
use crate::{momentum_update, DType, Device, Error, Result, Tensor};

/// An [`Encoder`] whose state lives on `device` (on [`Device::Cpu`], the encoder itself).
pub struct ResidentEncoder {
    /// The layers; on the CPU also the parameters. On a kernel device its values are those it
    /// was made with (the device holds the current ones).
    enc: Encoder,
    device: Device,
    /// Parameters and gradients on the device, in `Encoder::params` order (empty on the CPU).
    params: Vec<DeviceParam>,
    /// BatchNorm running statistics on the device, in `Encoder::buffers` order.
    running: Vec<Tensor>,
    passes: DeviceEncoder,
    /// Whether the last forward kept what a backward needs (and no backward used it yet).
    pass_kept: bool,
}

impl ResidentEncoder {
    /// Moves `enc` to `device`: its parameters and running statistics are copied there once,
    /// with zero gradients.
    pub fn new(enc: Encoder, device: Device) -> Result<Self> {
        let (params, running) = match device {
            Device::Cpu => (Vec::new(), Vec::new()),
            _ => {
                let Weights { values, running } = Weights::upload(&enc, device)?;
                let params = enc
                    .params()
                    .into_iter()
                    .zip(values)
                    .map(|(p, value)| {
                        Ok(DeviceParam {
                            name: p.name.clone(),
                            shape: p.shape.clone(),
                            grad: Tensor::zeros(value.shape(), DType::F32, device)?,
                            value,
                            decay: p.decay,
                        })
                    })
                    .collect::<Result<_>>()?;
                (params, running)
            }
        };
        Ok(ResidentEncoder {
            enc,
            device,
            params,
            running,
            passes: DeviceEncoder::new(device),
            pass_kept: false,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// `head(backbone(x))` as an f32 tensor on the device (`rows x out_dim`); `x` is a host
    /// [`Mat`] (copied in) or an f32 tensor on the device (used there). `train` picks batch or
    /// running BatchNorm statistics (train mode updates the running statistics). What
    /// [`backward_params`](Self::backward_params) needs stays on the device.
    pub fn forward<'x>(&mut self, x: impl Into<Batch<'x>>, train: bool) -> Result<Tensor> {
        self.pass_kept = false;
        let x = x.into();
        if self.device == Device::Cpu {
            let host;
            let x = match x {
                Batch::Host(m) => m,
                Batch::Device(t) => {
                    host = Mat::from_tensor(t)?;
                    &host
                }
            };
            let z = self.passes.forward_tensor(&mut self.enc, x, train)?;
            self.pass_kept = true;
            return Ok(z);
        }
        self.enc.set_train(train);
        let mut weights = Weights {
            values: self.params.iter().map(|p| p.value.clone()).collect(),
            running: std::mem::take(&mut self.running),
        };
        let z = self.passes.forward_with(&self.enc, &mut weights, x);
        self.running = weights.running;
        self.pass_kept = z.is_ok();
        z
    }

    /// [`forward`](Self::forward) without keeping anything for a backward (MoCo's key encoder).
    pub fn forward_detached<'x>(&mut self, x: impl Into<Batch<'x>>, train: bool) -> Result<Tensor> {
        let z = self.forward(x, train)?;
        self.passes.clear();
        self.pass_kept = false;
        Ok(z)
    }

    /// Adds the parameter gradients of the last forward, from `dL/dz` (`grad_out`, an f32
    /// tensor on the device, like the forward's output), into the accumulated gradients.
    pub fn backward_params(&mut self, grad_out: &Tensor) -> Result<()> {
        const OP: &str = "ResidentEncoder::backward_params";
        if !std::mem::take(&mut self.pass_kept) {
            return Err(Error::invalid(
                OP,
                "self",
                "backward called without a forward pass before it (or after forward_detached)",
            ));
        }
        if self.device == Device::Cpu {
            return self.passes.backward_params_tensor(&mut self.enc, grad_out);
        }
        let (grads, _) = self
            .passes
            .backward_with(&self.enc, GradOut::Device(grad_out), false)?;
        for (p, delta) in self.params.iter_mut().zip(grads) {
            if let Some(delta) = delta {
                accumulate(OP, &mut p.grad, &delta)?;
            }
        }
        Ok(())
    }

    /// Clears the accumulated gradients.
    pub fn zero_grad(&mut self) -> Result<()> {
        if self.device == Device::Cpu {
            self.enc.zero_grad();
            return Ok(());
        }
        for p in &mut self.params {
            p.grad = Tensor::zeros(p.value.shape(), DType::F32, self.device)?;
        }
        Ok(())
    }

    /// One optimizer step with learning rate `lr`, where the parameters are.
    pub fn step(&mut self, opt: &mut dyn Optimizer, lr: f32) -> Result<()> {
        match self.device {
            Device::Cpu => opt.step(&mut self.enc.params_mut(), lr),
            _ => opt.step_device(&mut self.params, lr),
        }
    }

    /// MoCo's key update `self = m self + (1 - m) query` over the parameters (the running
    /// statistics are left alone), with [`momentum_update`] where the parameters are.
    /// `query` must have the same architecture on the same device.
    pub fn momentum_from(&mut self, query: &ResidentEncoder, m: f64) -> Result<()> {
        const OP: &str = "ResidentEncoder::momentum_from";
        if query.device != self.device {
            return Err(Error::Mismatch {
                op: OP,
                reason: format!("query on {}, key on {}", query.device, self.device),
            });
        }
        let key_params = self.enc.params();
        let query_params = query.enc.params();
        crate::nn::param::check_same_layout(
            OP,
            "query",
            key_params
                .iter()
                .map(|p| (p.name.as_str(), p.shape.as_slice())),
            query_params
                .iter()
                .map(|p| (p.name.as_str(), p.shape.as_slice())),
        )?;
        if self.device != Device::Cpu {
            for (k, q) in self.params.iter_mut().zip(&query.params) {
                momentum_update(&mut k.value, &q.value, m)?;
            }
            return Ok(());
        }
        for (k, q) in self.enc.params_mut().into_iter().zip(query.enc.params()) {
            let shape = [k.value.len()];
            let mut theta_k = Tensor::from_slice(&k.value, &shape, Device::Cpu)?;
            momentum_update(
                &mut theta_k,
                &Tensor::from_slice(&q.value, &shape, Device::Cpu)?,
                m,
            )?;
            k.value = theta_k.to_vec::<f32>()?;
        }
        Ok(())
    }

    /// The encoder with the current parameters and running statistics (copied from the
    /// device; its gradients are zero there).
    pub fn to_encoder(&self) -> Result<Encoder> {
        let mut enc = self.enc.clone();
        if self.device == Device::Cpu {
            return Ok(enc);
        }
        for (p, resident) in enc.params_mut().into_iter().zip(&self.params) {
            p.value = resident.value.to_vec::<f32>()?;
            p.zero_grad();
        }
        for (buffer, stats) in enc.buffers_mut().into_iter().zip(&self.running) {
            buffer.value = stats.to_vec::<f32>()?;
        }
        Ok(enc)
    }

    /// The parameters on the device (empty on the CPU), for an optimizer or a custom update.
    pub fn params_mut(&mut self) -> &mut [DeviceParam] {
        &mut self.params
    }
}

/// `grad += delta` on their kernel device.
fn accumulate(op: &'static str, grad: &mut Tensor, delta: &Tensor) -> Result<()> {
    run_on_kernels!(grad.device(), b => {
        let delta = delta
            .device_buf()
            .and_then(|buf| b.resident(buf))
            .ok_or_else(|| Error::Device(format!("{op}: a gradient is not on the device")))?;
        let into = writable_on(b, op, "grad", grad)?;
        kernels::optim::accumulate(b, into, delta)
    });
    Err(Error::Device(format!("{op}: gradients on the host")))
}
