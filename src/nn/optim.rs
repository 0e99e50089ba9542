//! Optimizers: SGD (momentum, Nesterov), LARS (SimCLR's large-batch optimizer) and AdamW.
//!
//! Weight decay skips parameters with `decay == false` (biases, BatchNorm affine parameters) in
//! every optimizer, and LARS does not adapt their learning rate either, as in SimCLR.

use crate::nn::Param;
use crate::{Error, Result};

/// Updates parameters from their accumulated gradients.
pub trait Optimizer {
    /// One update of every parameter with learning rate `lr`. `params` must be the same list
    /// (same order and sizes) at every call, since the optimizer keeps per-parameter state by
    /// position; a different list is an error.
    fn step(&mut self, params: &mut [&mut Param], lr: f32) -> Result<()>;
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
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid(
                op,
                "lr",
                format!("must be finite and >= 0, got {lr}"),
            ));
        }
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
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [&mut Param], lr: f32) -> Result<()> {
        self.state.prepare("AdamW::step", params, lr, 2)?;
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let t = self.t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (b1 as f64).powi(t);
        let bc2_sqrt = (1.0 - (b2 as f64).powi(t)).sqrt();
        let step_size = (lr as f64 / bc1) as f32;
        for (p, s) in params.iter_mut().zip(&mut self.state.state) {
            let shrink = if p.decay {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
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
}
