//! InfoNCE with one positive key per query:
//! `loss = mean_i [ LSE_j (s_ij / tau) - s_{i,p_i} / tau ]`, `s_ij = q_i . k_j` (cosine when
//! `normalize`), `j = i` dropped under `self_mask`.

use super::{
    check_finite, check_temperature, matrix_dims, output_like, same_place, same_width,
    upload_features, values, with_cpu_real,
};
use crate::kernels::{self, run_on_kernels, Backend};
use crate::{cpu, Device, Error, Result, Tensor};

const OP: &str = "infonce";

/// Options of [`infonce`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InfoNceOptions {
    /// Softmax temperature `tau` (> 0).
    pub temperature: f64,
    /// Use cosine similarity (L2-normalize q and k inside, with its gradient).
    pub normalize: bool,
    /// Drop the logit of key `i` from query `i`'s softmax (q and k are the same set).
    pub self_mask: bool,
}

impl Default for InfoNceOptions {
    fn default() -> Self {
        InfoNceOptions {
            temperature: 0.1,
            normalize: true,
            self_mask: false,
        }
    }
}

/// What the backward needs from the forward: the per-query log-sum-exp (N values, never N x M).
#[derive(Clone, Debug)]
pub struct SoftmaxSaved {
    pub lse: Tensor,
}

/// Loss and saved state of a softmax-loss forward.
#[derive(Clone, Debug)]
pub struct SoftmaxForward {
    pub loss: f64,
    pub saved: SoftmaxSaved,
}

/// Loss and gradients of [`infonce`].
#[derive(Clone, Debug)]
pub struct InfoNceOutput {
    pub loss: f64,
    pub grad_q: Tensor,
    pub grad_k: Tensor,
}

/// Validates the inputs and returns `(rows, cols, dim)`.
fn validate(
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
) -> Result<(usize, usize, usize)> {
    let (rows, dim) = matrix_dims(OP, "q", q)?;
    let cols = same_width(OP, "k", k, "M", "q", dim)?;
    same_place(OP, &[("q", q), ("k", k)])?;
    check_temperature(OP, "temperature", opts.temperature)?;
    if positives.len() != rows {
        return Err(Error::shape(
            OP,
            "positives",
            &[positives.len()],
            format!("[{rows}] (one per query)"),
        ));
    }
    if opts.self_mask && rows != cols {
        return Err(Error::invalid(
            OP,
            "self_mask",
            format!("needs as many keys as queries (q has {rows} rows, k has {cols})"),
        ));
    }
    for (i, &p) in positives.iter().enumerate() {
        if p >= cols {
            return Err(Error::invalid(
                OP,
                "positives",
                format!("positives[{i}] = {p} is out of range for {cols} keys"),
            ));
        }
        if opts.self_mask && p == i {
            return Err(Error::invalid(
                OP,
                "positives",
                format!("positives[{i}] = {i} is the masked self key"),
            ));
        }
    }
    check_finite(OP, "q", q)?;
    check_finite(OP, "k", k)?;
    Ok((rows, cols, dim))
}

fn problem<'a, T>(
    q: &'a [T],
    k: &'a [T],
    dims: (usize, usize, usize),
    positives: &'a [usize],
    opts: &InfoNceOptions,
) -> cpu::infonce::Problem<'a, T> {
    cpu::infonce::Problem {
        q,
        k,
        rows: dims.0,
        cols: dims.1,
        dim: dims.2,
        positives,
        temperature: opts.temperature,
        normalize: opts.normalize,
        self_mask: opts.self_mask,
    }
}

/// The InfoNCE forward: the mean loss and the per-query log-sum-exp for [`infonce_backward`].
pub fn infonce_forward(
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
) -> Result<SoftmaxForward> {
    let dims = validate(q, k, positives, opts)?;
    run_on_kernels!(q.device(), b => {
        let inputs = KernelInputs::upload(b, q, k, positives)?;
        let (loss, lse) = inputs.problem(dims, opts).forward(b)?;
        let lse = q.host_like(b.download(&lse)?, &[dims.0]);
        Ok(SoftmaxForward { loss, saved: SoftmaxSaved { lse } })
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv) = (values::<T>(q), values::<T>(k));
        let (loss, lse) = problem(&qv, &kv, dims, positives, opts).forward();
        let lse = q.host_like(lse.into_iter().map(<T as cpu::Real>::of).collect::<Vec<T>>(), &[dims.0]);
        Ok(SoftmaxForward { loss, saved: SoftmaxSaved { lse } })
    })
}

/// The InfoNCE backward: gradients of `grad_loss * loss` with respect to q and k.
pub fn infonce_backward(
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
    saved: &SoftmaxSaved,
    grad_loss: f64,
) -> Result<(Tensor, Tensor)> {
    let dims = validate(q, k, positives, opts)?;
    check_saved_lse(OP, saved, dims.0)?;
    super::check_finite_scalar(OP, "grad_loss", grad_loss)?;
    run_on_kernels!(q.device(), b => {
        let inputs = KernelInputs::upload(b, q, k, positives)?;
        let lse = b.upload("lse", &values::<f32>(&saved.lse))?;
        let (dq, dk) = inputs.problem(dims, opts).backward(b, &lse, grad_loss)?;
        let dk = dk.expect("separate key gradient");
        Ok((output_like(q, b.download(&dq)?, q.shape()), output_like(k, b.download(&dk)?, k.shape())))
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv) = (values::<T>(q), values::<T>(k));
        let lse = saved.lse.to_vec_f64();
        let (dq, dk) = problem(&qv, &kv, dims, positives, opts).backward(&lse, grad_loss);
        Ok((output_like(q, dq, q.shape()), output_like(k, dk, k.shape())))
    })
}

/// InfoNCE loss and gradients in one call.
///
/// ```
/// use contra::{infonce, Device, InfoNceOptions, Tensor};
/// let q = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], Device::Cpu)?;
/// let k = Tensor::from_vec(vec![0.9f32, 0.1, 0.2, 0.8, -1.0, 0.0], &[3, 2], Device::Cpu)?;
/// let out = infonce(&q, &k, &[0, 1], &InfoNceOptions::default())?;
/// assert!(out.loss.is_finite());
/// assert_eq!(out.grad_k.shape(), &[3, 2]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn infonce(
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
) -> Result<InfoNceOutput> {
    if q.device() == Device::Cpu {
        // One sweep for loss and gradients (see cpu::softmax::forward_backward).
        let dims = validate(q, k, positives, opts)?;
        return with_cpu_real!(q.dtype(), T => {
            let (qv, kv) = (values::<T>(q), values::<T>(k));
            let (loss, dq, dk) = problem(&qv, &kv, dims, positives, opts).forward_backward(1.0);
            Ok(InfoNceOutput {
                loss,
                grad_q: output_like(q, dq, q.shape()),
                grad_k: output_like(k, dk, k.shape()),
            })
        });
    }
    let fwd = infonce_forward(q, k, positives, opts)?;
    let (grad_q, grad_k) = infonce_backward(q, k, positives, opts, &fwd.saved, 1.0)?;
    Ok(InfoNceOutput {
        loss: fwd.loss,
        grad_q,
        grad_k,
    })
}

/// Checks that a saved log-sum-exp has one finite value per row.
pub(crate) fn check_saved_lse(op: &'static str, saved: &SoftmaxSaved, rows: usize) -> Result<()> {
    super::expect_shape(op, "saved.lse", &saved.lse, &[rows])?;
    check_finite(op, "saved.lse", &saved.lse)
}

/// q, k and the positive indices as kernel buffers.
pub(crate) struct KernelInputs<B: Backend> {
    pub q: B::Buf,
    pub k: B::Buf,
    pub positives: B::Buf,
}

impl<B: Backend> KernelInputs<B> {
    pub fn upload(b: &B, q: &Tensor, k: &Tensor, positives: &[usize]) -> Result<Self> {
        // Indices were validated against the key count, which fits the kernels' 32-bit sizes.
        let positives: Vec<i32> = positives.iter().map(|&p| p as i32).collect();
        Ok(KernelInputs {
            q: upload_features(b, "q", q)?,
            k: upload_features(b, "k", k)?,
            positives: b.upload_i32("positives", &positives)?,
        })
    }

    pub fn problem(
        &self,
        dims: (usize, usize, usize),
        opts: &InfoNceOptions,
    ) -> kernels::infonce::Problem<'_, B> {
        kernels::infonce::Problem {
            q: &self.q,
            k: &self.k,
            positives: &self.positives,
            rows: dims.0,
            cols: dims.1,
            dim: dims.2,
            temperature: opts.temperature,
            normalize: opts.normalize,
            self_mask: opts.self_mask,
            symmetric: false,
        }
    }
}
