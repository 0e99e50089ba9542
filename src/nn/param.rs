//! Trainable parameters and non-trainable buffers.

use crate::{Error, Result, Tensor};

/// A trainable tensor with its gradient.
///
/// `decay` is false for biases and BatchNorm affine parameters: weight decay and LARS trust-ratio
/// adaptation skip them (as in SimCLR), because shrinking a bias or a BatchNorm scale towards
/// zero only hurts.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// Dotted path like PyTorch's `state_dict` keys, e.g. `backbone.0.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
    /// Accumulated by `backward` (`+=`); cleared by `zero_grad`.
    pub grad: Vec<f32>,
    pub decay: bool,
}

impl Param {
    /// A parameter holding `value` (row-major, `shape`) with a zero gradient.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        value: Vec<f32>,
        decay: bool,
    ) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != value.len() {
            return Err(Error::shape(
                "Param::new",
                "value",
                &[value.len()],
                format!("{numel} elements for shape {shape:?}"),
            ));
        }
        Ok(Param {
            name: name.into(),
            shape,
            grad: vec![0.0; value.len()],
            value,
            decay,
        })
    }

    /// A parameter of `shape` filled with `fill`.
    pub fn filled(name: impl Into<String>, shape: Vec<usize>, fill: f32, decay: bool) -> Self {
        let numel = shape.iter().product();
        Param {
            name: name.into(),
            shape,
            value: vec![fill; numel],
            grad: vec![0.0; numel],
            decay,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }
}

/// A trainable parameter whose value and gradient live on a device: f32 tensors of the
/// parameter's shape, flattened (what [`ResidentEncoder`](crate::nn::ResidentEncoder) keeps and
/// [`Optimizer::step_device`](crate::nn::Optimizer::step_device) updates in place).
#[derive(Clone, Debug)]
pub struct DeviceParam {
    /// The host parameter's name (`backbone.0.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Tensor,
    pub grad: Tensor,
    /// As [`Param::decay`].
    pub decay: bool,
}

/// A non-trainable state tensor (BatchNorm running mean / variance): saved in checkpoints and
/// copied between encoders, never touched by an optimizer.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// Dotted path like PyTorch's `state_dict` keys, e.g. `backbone.1.running_mean`.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
}

impl Buffer {
    /// A buffer of `shape` filled with `fill`.
    pub fn filled(name: impl Into<String>, shape: Vec<usize>, fill: f32) -> Self {
        let numel = shape.iter().product();
        Buffer {
            name: name.into(),
            shape,
            value: vec![fill; numel],
        }
    }
}

/// The values of `params` end to end, in order (the flat vector of a momentum update or a
/// checkpoint).
pub(crate) fn flatten<'a>(values: impl IntoIterator<Item = &'a [f32]>) -> Vec<f32> {
    values.into_iter().flatten().copied().collect()
}

/// Overwrites `dst` (in order) with consecutive slices of `flat`; errors unless the lengths
/// add up exactly, before writing anything.
pub(crate) fn unflatten(op: &'static str, dst: Vec<&mut Vec<f32>>, flat: &[f32]) -> Result<()> {
    let total: usize = dst.iter().map(|v| v.len()).sum();
    if flat.len() != total {
        return Err(Error::shape(
            op,
            "flat",
            &[flat.len()],
            format!("[{total}] (the number of values of the model)"),
        ));
    }
    let mut rest = flat;
    for v in dst {
        let (head, tail) = rest.split_at(v.len());
        v.copy_from_slice(head);
        rest = tail;
    }
    Ok(())
}

/// Errors unless two lists of (name, shape) describe the same architecture.
pub(crate) fn check_same_layout<'a>(
    op: &'static str,
    arg: &'static str,
    ours: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    theirs: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<()> {
    let ours: Vec<_> = ours.into_iter().collect();
    let theirs: Vec<_> = theirs.into_iter().collect();
    if ours.len() != theirs.len() {
        return Err(Error::invalid(
            op,
            arg,
            format!("has {} tensors, expected {}", theirs.len(), ours.len()),
        ));
    }
    for ((n0, s0), (n1, s1)) in ours.iter().zip(&theirs) {
        if n0 != n1 || s0 != s1 {
            return Err(Error::invalid(
                op,
                arg,
                format!("holds `{n1}` of shape {s1:?} where `{n0}` of shape {s0:?} was expected"),
            ));
        }
    }
    Ok(())
}
