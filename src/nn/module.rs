//! What the networks ([`Mlp`](crate::nn::Mlp), [`Encoder`](crate::nn::Encoder)) share: their
//! parameters and buffers as flat vectors (checkpoints, the MoCo momentum kernel), gradient
//! clearing, and MoCo's key-encoder update.

use crate::nn::param::{check_same_layout, flatten, unflatten};
use crate::nn::{Buffer, Param};
use crate::{Error, Result};

/// A network with parameters (trained) and buffers (BatchNorm running statistics, not trained).
/// Implementors list them in a fixed order; everything else is provided.
pub trait Module {
    /// Parameters in a fixed order (layer order, weight before bias, like PyTorch's
    /// `parameters()`).
    fn params(&self) -> Vec<&Param>;
    fn params_mut(&mut self) -> Vec<&mut Param>;
    /// Buffers in a fixed order (layer order, running mean before running var).
    fn buffers(&self) -> Vec<&Buffer>;
    fn buffers_mut(&mut self) -> Vec<&mut Buffer>;

    fn zero_grad(&mut self) {
        self.params_mut().into_iter().for_each(Param::zero_grad);
    }

    /// Total number of trainable values.
    fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.len()).sum()
    }

    /// All parameter values end to end, in `params()` order.
    fn flat_params(&self) -> Vec<f32> {
        flatten(self.params().into_iter().map(|p| p.value.as_slice()))
    }

    /// Overwrites the parameter values from a vector laid out like `flat_params()`.
    fn load_flat(&mut self, flat: &[f32]) -> Result<()> {
        let dst = self
            .params_mut()
            .into_iter()
            .map(|p| &mut p.value)
            .collect();
        unflatten("Module::load_flat", dst, flat)
    }

    /// All buffer values end to end, in `buffers()` order.
    fn flat_buffers(&self) -> Vec<f32> {
        flatten(self.buffers().into_iter().map(|b| b.value.as_slice()))
    }

    /// Overwrites the buffers from a vector laid out like `flat_buffers()`.
    fn load_flat_buffers(&mut self, flat: &[f32]) -> Result<()> {
        let dst = self
            .buffers_mut()
            .into_iter()
            .map(|b| &mut b.value)
            .collect();
        unflatten("Module::load_flat_buffers", dst, flat)
    }

    /// MoCo's key-encoder update `self = m * self + (1 - m) * query` over the parameters;
    /// buffers are left alone as in MoCo (the key encoder keeps its own running statistics; use
    /// `copy_buffers_from` to copy them instead). `query` must have the same architecture.
    fn momentum_update_from(&mut self, query: &Self, m: f32) -> Result<()> {
        momentum_update(
            "Module::momentum_update_from",
            self.params_mut(),
            query.params(),
            m,
        )
    }

    /// Copies the BatchNorm running statistics of `other` (same architecture).
    fn copy_buffers_from(&mut self, other: &Self) -> Result<()> {
        copy_buffers(
            "Module::copy_buffers_from",
            self.buffers_mut(),
            other.buffers(),
        )
    }
}

/// `key = m * key + (1 - m) * query`, element-wise over matching parameters.
fn momentum_update(
    op: &'static str,
    key: Vec<&mut Param>,
    query: Vec<&Param>,
    m: f32,
) -> Result<()> {
    if !(0.0..=1.0).contains(&m) {
        return Err(Error::invalid(
            op,
            "m",
            format!("must be in [0, 1], got {m}"),
        ));
    }
    check_same_layout(
        op,
        "query",
        key.iter().map(|p| (p.name.as_str(), p.shape.as_slice())),
        query.iter().map(|p| (p.name.as_str(), p.shape.as_slice())),
    )?;
    if key.iter().zip(&query).any(|(k, q)| k.len() != q.len()) {
        return Err(Error::invalid(
            op,
            "query",
            "a parameter's value length differs from the key's",
        ));
    }
    for (k, q) in key.into_iter().zip(query) {
        for (a, &b) in k.value.iter_mut().zip(&q.value) {
            *a = m * *a + (1.0 - m) * b;
        }
    }
    Ok(())
}

/// Copies matching buffers from `src` into `dst`.
fn copy_buffers(op: &'static str, dst: Vec<&mut Buffer>, src: Vec<&Buffer>) -> Result<()> {
    check_same_layout(
        op,
        "other",
        dst.iter().map(|b| (b.name.as_str(), b.shape.as_slice())),
        src.iter().map(|b| (b.name.as_str(), b.shape.as_slice())),
    )?;
    if dst
        .iter()
        .zip(&src)
        .any(|(d, s)| d.value.len() != s.value.len())
    {
        return Err(Error::invalid(
            op,
            "other",
            "a buffer's value length differs",
        ));
    }
    for (d, s) in dst.into_iter().zip(src) {
        d.value.copy_from_slice(&s.value);
    }
    Ok(())
}
