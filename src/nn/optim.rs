//! Optimizers: SGD (momentum, Nesterov), LARS (SimCLR's large-batch optimizer) and AdamW.
//!
//! Weight decay skips parameters with `decay == false` (biases, BatchNorm affine parameters) in
//! every optimizer, and LARS does not adapt their learning rate either, as in SimCLR.

use crate::kernels::optim::{Coefs, Slots};
use crate::kernels::{self, run_on_kernels, Backend};
use crate::nn::{DeviceParam, Param};
use crate::ops::writable_on;
use crate::{DType, Device, Error, Result, Tensor};

/// Updates parameters from their accumulated gradients.
pub trait Optimizer {
    /// One update of every parameter with learning rate `lr`. `params` must be the same list
    /// (same order and sizes) at every call, since the optimizer keeps per-parameter state by
    /// position; a different list is an error.
    fn step(&mut self, params: &mut [&mut Param], lr: f32) -> Result<()>;

    /// [`step`](Self::step) on parameters that live on a kernel device: the update runs there as
    /// kernels, in place, with its state on the device too (nothing is copied). SGD, LARS and
    /// AdamW give the host step's values (LARS's norms are summed in another order). An
    /// optimizer keeps host and device state apart: use one of the two forms.
    fn step_device(&mut self, params: &mut [DeviceParam], lr: f32) -> Result<()> {
        let _ = (params, lr);
        Err(Error::Device(
            "this optimizer has no device step; keep the parameters on the host".into(),
        ))
    }
}

fn check_lr(op: &'static str, lr: f32) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::invalid(
            op,
            "lr",
            format!("must be finite and >= 0, got {lr}"),
        ));
    }
    Ok(())
}

/// Per-parameter state tensors on a device (`slots` per parameter), created on the first step.
#[derive(Clone, Debug, Default)]
struct DeviceState {
    state: Vec<Vec<Tensor>>,
}

impl DeviceState {
    /// Checks `lr` and the parameters against the state (creating it, zeros, on the first
    /// call); returns the parameters' device.
    fn prepare(
        &mut self,
        op: &'static str,
        params: &[DeviceParam],
        lr: f32,
        slots: usize,
    ) -> Result<Device> {
        check_lr(op, lr)?;
        let device = params.first().map_or(Device::Interp, |p| p.value.device());
        for p in params {
            let same = |t: &Tensor| {
                t.device() == device && t.dtype() == DType::F32 && t.shape() == p.value.shape()
            };
            if device == Device::Cpu || !same(&p.value) || !same(&p.grad) {
                return Err(Error::Mismatch {
                    op,
                    reason: format!(
                        "`{}`: value and gradient must be f32 tensors of one shape on one kernel \
                         device (value {:?} {} on {}, gradient {:?} {} on {})",
                        p.name,
                        p.value.shape(),
                        p.value.dtype(),
                        p.value.device(),
                        p.grad.shape(),
                        p.grad.dtype(),
                        p.grad.device()
                    ),
                });
            }
        }
        if self.state.is_empty() {
            self.state = params
                .iter()
                .map(|p| {
                    (0..slots)
                        .map(|_| Tensor::zeros(p.value.shape(), DType::F32, device))
                        .collect()
                })
                .collect::<Result<_>>()?;
            return Ok(device);
        }
        let same = self.state.len() == params.len()
            && self.state.iter().zip(params).all(|(s, p)| {
                s.iter()
                    .all(|t| t.shape() == p.value.shape() && t.device() == device)
            });
        if !same {
            return Err(Error::invalid(
                op,
                "params",
                "differ from the parameters of the first step (count, sizes or device)",
            ));
        }
        Ok(device)
    }
}

/// One parameter's update on `b`: its buffers and whether it decays.
type ParamStep<'s, B> = dyn Fn(&B, &Slots<'_, <B as Backend>::Buf>, bool) -> Result<()> + 's;

/// Runs `step` on every parameter's buffers on `b` (value, gradient, state slots), with the
/// parameter's `decay`.
fn each_param<B: Backend>(
    b: &B,
    op: &'static str,
    params: &mut [DeviceParam],
    state: &mut DeviceState,
    step: &ParamStep<'_, B>,
) -> Result<()> {
    for (p, slots) in params.iter_mut().zip(&mut state.state) {
        let grad = p
            .grad
            .device_buf()
            .and_then(|buf| b.resident(buf))
            .ok_or_else(|| Error::Mismatch {
                op,
                reason: format!("the gradient of `{}` is not on the device", p.name),
            })?;
        let value = writable_on(b, op, "value", &mut p.value)?;
        let mut state = [None, None];
        for (slot, t) in state.iter_mut().zip(slots.iter_mut()) {
            *slot = Some(writable_on(b, op, "state", t)?);
        }
        step(b, &Slots { value, grad, state }, p.decay)?;
    }
    Ok(())
}

/// The error after `run_on_kernels!` for parameters on the host (`prepare` refuses them).
fn host_params(op: &'static str) -> Error {
    Error::Mismatch {
        op,
        reason: "the parameters are on the host; use `step`".into(),
    }
}

/// Per-parameter state vectors (`slots` of them per parameter), created on the first step.
#[derive(Clone, Debug, Default)]
struct State {
    /// `state[i][s]` is slot `s` of parameter `i`.
    state: Vec<Vec<Vec<f32>>>,
}

impl State {
    /// Checks `lr` and the parameters against the state (creating it on the first call).
    fn prepare(
        &mut self,
        op: &'static str,
        params: &[&mut Param],
        lr: f32,
        slots: usize,
    ) -> Result<()> {
        check_lr(op, lr)?;
        for p in params {
            if p.grad.len() != p.value.len() {
                return Err(Error::shape(
                    op,
                    "params",
                    &[p.grad.len()],
                    format!("a gradient of {} elements for `{}`", p.value.len(), p.name),
                ));
            }
        }
        if self.state.is_empty() {
            self.state = params
                .iter()
                .map(|p| vec![vec![0.0; p.len()]; slots])
                .collect();
            return Ok(());
        }
        let same = self.state.len() == params.len()
            && self
                .state
                .iter()
                .zip(params)
                .all(|(s, p)| s[0].len() == p.len());
        if !same {
            return Err(Error::invalid(
                op,
                "params",
                "differ from the parameters of the first step (count or sizes)",
            ));
        }
        Ok(())
    }
}

fn check_range(op: &'static str, arg: &'static str, v: f32, lo: f32, hi: f32) -> Result<()> {
    if !(v >= lo && v < hi) {
        return Err(Error::invalid(
            op,
            arg,
            format!("must be in [{lo}, {hi}), got {v}"),
        ));
    }
    Ok(())
}

/// Stochastic gradient descent with PyTorch's update:
/// `g = grad + wd * p` (decayed params only), `buf = momentum * buf + g`,
/// `p -= lr * (nesterov ? g + momentum * buf : buf)`.
#[derive(Clone, Debug)]
pub struct Sgd {
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
    state: State,
    device_state: DeviceState,
}

impl Sgd {
    pub fn new(momentum: f32, weight_decay: f32, nesterov: bool) -> Result<Self> {
        const OP: &str = "Sgd::new";
        check_range(OP, "momentum", momentum, 0.0, 1.0)?;
        check_range(OP, "weight_decay", weight_decay, 0.0, f32::INFINITY)?;
        if nesterov && momentum == 0.0 {
            return Err(Error::invalid(OP, "nesterov", "needs a momentum > 0"));
        }
        Ok(Sgd {
            momentum,
            weight_decay,
            nesterov,
            state: State::default(),
            device_state: DeviceState::default(),
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut [&mut Param], lr: f32) -> Result<()> {
        self.state.prepare("Sgd::step", params, lr, 1)?;
        let (mu, wd) = (self.momentum, self.weight_decay);
        for (p, s) in params.iter_mut().zip(&mut self.state.state) {
            let wd = if p.decay { wd } else { 0.0 };
            let Param { value, grad, .. } = &mut **p;
            for ((w, &g), buf) in value.iter_mut().zip(grad.iter()).zip(s[0].iter_mut()) {
                let g = g + wd * *w;
                *buf = mu * *buf + g;
                let d = if self.nesterov { g + mu * *buf } else { *buf };
                *w -= lr * d;
            }
        }
        Ok(())
    }

    fn step_device(&mut self, params: &mut [DeviceParam], lr: f32) -> Result<()> {
        const OP: &str = "Sgd::step_device";
        let device = self.device_state.prepare(OP, params, lr, 1)?;
        let coefs = |decay: bool| Coefs {
            lr,
            momentum: self.momentum,
            weight_decay: if decay { self.weight_decay } else { 0.0 },
            nesterov: self.nesterov,
            ..Coefs::default()
        };
        run_on_kernels!(device, b => {
            each_param(b, OP, params, &mut self.device_state, &|b, slots, decay| {
                kernels::optim::sgd(b, slots, &coefs(decay))
            })
        });
        Err(host_params(OP))
    }
}

/// LARS as in SimCLR: for each parameter with `decay`, `g = grad + wd * p` and the learning rate
/// is scaled by the trust ratio `eta * ||p|| / ||g||` (1 if either norm is 0); parameters
/// without `decay` get neither. Then `v = momentum * v + lr * ratio * g`, `p -= v`.
#[derive(Clone, Debug)]
pub struct Lars {
    momentum: f32,
    weight_decay: f32,
    trust_coefficient: f32,
    state: State,
    device_state: DeviceState,
}

impl Lars {
    /// SimCLR's trust coefficient `eta`.
    pub const DEFAULT_TRUST_COEFFICIENT: f32 = 0.001;

    pub fn new(momentum: f32, weight_decay: f32) -> Result<Self> {
        Lars::with_trust_coefficient(momentum, weight_decay, Self::DEFAULT_TRUST_COEFFICIENT)
    }

    pub fn with_trust_coefficient(
        momentum: f32,
        weight_decay: f32,
        trust_coefficient: f32,
    ) -> Result<Self> {
        const OP: &str = "Lars::new";
        check_range(OP, "momentum", momentum, 0.0, 1.0)?;
        check_range(OP, "weight_decay", weight_decay, 0.0, f32::INFINITY)?;
        if !(trust_coefficient > 0.0 && trust_coefficient.is_finite()) {
            return Err(Error::invalid(
                OP,
                "trust_coefficient",
                format!("must be positive and finite, got {trust_coefficient}"),
            ));
        }
        Ok(Lars {
            momentum,
            weight_decay,
            trust_coefficient,
            state: State::default(),
            device_state: DeviceState::default(),
        })
    }
}

impl Optimizer for Lars {
    fn step(&mut self, params: &mut [&mut Param], lr: f32) -> Result<()> {
        self.state.prepare("Lars::step", params, lr, 1)?;
        for (p, s) in params.iter_mut().zip(&mut self.state.state) {
            let adapt = p.decay;
            let wd = if adapt { self.weight_decay } else { 0.0 };
            let g: Vec<f32> = p
                .grad
                .iter()
                .zip(&p.value)
                .map(|(&g, &w)| g + wd * w)
                .collect();
            let mut scaled_lr = lr;
            if adapt {
                let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                let (w_norm, g_norm) = (norm(&p.value), norm(&g));
                if w_norm > 0.0 && g_norm > 0.0 {
                    scaled_lr =
                        (lr as f64 * self.trust_coefficient as f64 * w_norm / g_norm) as f32;
                }
            }
            for ((w, g), v) in p.value.iter_mut().zip(g).zip(s[0].iter_mut()) {
                *v = self.momentum * *v + scaled_lr * g;
                *w -= *v;
            }
        }
        Ok(())
    }

    fn step_device(&mut self, params: &mut [DeviceParam], lr: f32) -> Result<()> {
        const OP: &str = "Lars::step_device";
        let device = self.device_state.prepare(OP, params, lr, 1)?;
        let coefs = |decay: bool| Coefs {
            lr,
            momentum: self.momentum,
            weight_decay: if decay { self.weight_decay } else { 0.0 },
            trust: self.trust_coefficient,
            ..Coefs::default()
        };
        run_on_kernels!(device, b => {
            each_param(b, OP, params, &mut self.device_state, &|b, slots, decay| {
                kernels::optim::lars(b, slots, &coefs(decay), decay)
            })
        });
        Err(host_params(OP))
    }
}

/// Adam with decoupled weight decay (PyTorch's `AdamW`): `p *= 1 - lr * wd` (decayed params
/// only), then the bias-corrected Adam step `p -= lr * m_hat / (sqrt(v_hat) + eps)`.
#[derive(Clone, Debug)]
pub struct AdamW {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    t: u64,
    state: State,
    device_state: DeviceState,
}

impl AdamW {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn new(weight_decay: f32) -> Result<Self> {
        AdamW::with_betas(0.9, 0.999, 1e-8, weight_decay)
    }

    pub fn with_betas(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Result<Self> {
        const OP: &str = "AdamW::new";
        check_range(OP, "beta1", beta1, 0.0, 1.0)?;
        check_range(OP, "beta2", beta2, 0.0, 1.0)?;
        check_range(OP, "weight_decay", weight_decay, 0.0, f32::INFINITY)?;
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(Error::invalid(
                OP,
                "eps",
                format!("must be positive and finite, got {eps}"),
            ));
        }
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            state: State::default(),
            device_state: DeviceState::default(),
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// Counts a step and returns its step size `lr / (1 - beta1^t)` and `sqrt(1 - beta2^t)`.
    fn next_step(&mut self, lr: f32) -> (f32, f64) {
        self.t += 1;
        let t = self.t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2_sqrt = (1.0 - (self.beta2 as f64).powi(t)).sqrt();
        ((lr as f64 / bc1) as f32, bc2_sqrt)
    }
}

/// The factor AdamW's decoupled weight decay shrinks a parameter by.
fn shrink(decay: bool, lr: f32, weight_decay: f32) -> f32 {
    if decay {
        1.0 - lr * weight_decay
    } else {
        1.0
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [&mut Param], lr: f32) -> Result<()> {
        self.state.prepare("AdamW::step", params, lr, 2)?;
        let (step_size, bc2_sqrt) = self.next_step(lr);
        let (b1, b2) = (self.beta1, self.beta2);
        for (p, s) in params.iter_mut().zip(&mut self.state.state) {
            let shrink = shrink(p.decay, lr, self.weight_decay);
            let Param { value, grad, .. } = &mut **p;
            let (m, v) = s.split_at_mut(1);
            let moments = m[0].iter_mut().zip(v[0].iter_mut());
            for ((w, &g), (m, v)) in value.iter_mut().zip(grad.iter()).zip(moments) {
                *w *= shrink;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let denom = ((*v as f64).sqrt() / bc2_sqrt) as f32 + self.eps;
                *w -= step_size * *m / denom;
            }
        }
        Ok(())
    }

    fn step_device(&mut self, params: &mut [DeviceParam], lr: f32) -> Result<()> {
        const OP: &str = "AdamW::step_device";
        let device = self.device_state.prepare(OP, params, lr, 2)?;
        let (step_size, bc2_sqrt) = self.next_step(lr);
        let coefs = |decay: bool| Coefs {
            beta1: self.beta1,
            beta2: self.beta2,
            one_minus_beta1: 1.0 - self.beta1,
            one_minus_beta2: 1.0 - self.beta2,
            eps: self.eps,
            step_size,
            shrink: shrink(decay, lr, self.weight_decay),
            bc2_sqrt,
            ..Coefs::default()
        };
        run_on_kernels!(device, b => {
            each_param(b, OP, params, &mut self.device_state, &|b, slots, decay| {
                kernels::optim::adamw(b, slots, &coefs(decay))
            })
        });
        Err(host_params(OP))
    }
}
