//! InfoNCE with one positive key per query:
//! `loss = mean_i [ LSE_j (s_ij / tau) - s_{i,p_i} / tau ]`, `s_ij = q_i . k_j` (cosine when
//! `normalize`), `j = i` dropped under `self_mask`.

use super::{
    check_finite, check_grad_loss, check_result, check_scalar_result, check_softmax_temperature,
    compute_dtype, kernel_output, kernel_state, matrix_dims, output_like, same_place, same_width,
    state_like, upload_features, values, with_cpu_real, Fingerprint, Origin,
};
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, Device, Error, Result, Tensor};

const OP: &str = "infonce";
const BACKWARD: &str = "infonce_backward";

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
/// It also records the op, options and inputs that made it: a backward given the state of
/// another call is an error.
#[derive(Clone, Debug)]
pub struct SoftmaxSaved {
    /// Natural-log units; f64 on the CPU (a rounded lse would blur a dominant positive's
    /// gradient), f32 from the kernels.
    pub lse: Tensor,
    pub(crate) origin: Origin,
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

/// Validates the inputs (errors named after `op`) and returns `(rows, cols, dim)`.
fn validate(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
) -> Result<(usize, usize, usize)> {
    let (rows, dim) = matrix_dims(op, "q", q)?;
    let cols = same_width(op, "k", k, "M", "q", dim)?;
    same_place(op, &[("q", q), ("k", k)])?;
    check_softmax_temperature(op, opts.temperature, compute_dtype(q.device(), q.dtype()))?;
    if positives.len() != rows {
        return Err(Error::shape(
            op,
            "positives",
            &[positives.len()],
            format!("[{rows}] (one per query)"),
        ));
    }
    if opts.self_mask && rows != cols {
        return Err(Error::invalid(
            op,
            "self_mask",
            format!("needs as many keys as queries (q has {rows} rows, k has {cols})"),
        ));
    }
    for (i, &p) in positives.iter().enumerate() {
        if p >= cols {
            return Err(Error::invalid(
                op,
                "positives",
                format!("positives[{i}] = {p} is out of range for {cols} keys"),
            ));
        }
        if opts.self_mask && p == i {
            return Err(Error::invalid(
                op,
                "positives",
                format!("positives[{i}] = {i} is the masked self key"),
            ));
        }
    }
    check_finite(op, "q", q)?;
    check_finite(op, "k", k)?;
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
    let dims = validate(OP, q, k, positives, opts)?;
    let (loss, lse) = forward_lse(q, k, positives, opts, dims)?;
    let origin = origin(q, k, positives, opts);
    SoftmaxSaved::checked(OP, loss, lse, origin, TEMPERATURE_BLAME)
}

/// The loss and the per-query log-sum-exp, on validated inputs.
fn forward_lse(
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
    dims: (usize, usize, usize),
) -> Result<(f64, Tensor)> {
    run_on_kernels!(q.device(), b => {
        let inputs = KernelInputs::upload(b, q, k, positives)?;
        let (loss, lse) = inputs.problem(dims, opts).forward(b)?;
        Ok((loss, kernel_state(b, lse, &[dims.0])?))
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv) = (values::<T>(q)?, values::<T>(k)?);
        let (loss, lse) = problem(&qv, &kv, dims, positives, opts).forward();
        Ok((loss, state_like(q, lse, &[dims.0])?))
    })
}

/// What scales the softmax losses' results, named when one overflows.
pub(crate) const TEMPERATURE_BLAME: &str =
    "the logits `q . k / temperature` overflow: raise `temperature`, normalize the inputs, or \
     compute in f64 on Device::Cpu";

/// What scales the softmax losses' gradients, named when one overflows.
pub(crate) const GRADIENT_BLAME: &str =
    "the gradient scales as `grad_loss / temperature`: lower `grad_loss`, raise `temperature`, \
     or compute in f64 on Device::Cpu";

/// The origin of infonce's saved state.
fn origin(q: &Tensor, k: &Tensor, positives: &[usize], opts: &InfoNceOptions) -> Origin {
    let inputs = Fingerprint::new().tensor(q).tensor(k).indices(positives);
    Origin::new(OP, opts, inputs)
}

impl SoftmaxSaved {
    /// The forward's result, once its loss and lse are known to be finite.
    pub(crate) fn checked(
        op: &'static str,
        loss: f64,
        lse: Tensor,
        origin: Origin,
        blame: &str,
    ) -> Result<SoftmaxForward> {
        check_scalar_result(op, "loss", loss, blame)?;
        check_result(op, "lse", &lse, blame)?;
        Ok(SoftmaxForward {
            loss,
            saved: SoftmaxSaved { lse, origin },
        })
    }

    /// Errors (from `backward_op`) unless this state was saved by the forward of `origin`'s
    /// call and has one finite value per row.
    pub(crate) fn check(
        &self,
        backward_op: &'static str,
        origin: &Origin,
        rows: usize,
    ) -> Result<()> {
        super::expect_shape(backward_op, "saved.lse", &self.lse, &[rows])?;
        check_finite(backward_op, "saved.lse", &self.lse)?;
        self.origin.check(backward_op, origin)
    }
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
    let dims = validate(BACKWARD, q, k, positives, opts)?;
    saved.check(BACKWARD, &origin(q, k, positives, opts), dims.0)?;
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(q.device(), q.dtype()))?;
    let (dq, dk) = input_grads(q, k, positives, opts, dims, &saved.lse, grad_loss)?;
    check_result(BACKWARD, "grad_q", &dq, GRADIENT_BLAME)?;
    check_result(BACKWARD, "grad_k", &dk, GRADIENT_BLAME)?;
    Ok((dq, dk))
}

/// dq and dk from the forward's `lse`, on validated inputs.
fn input_grads(
    q: &Tensor,
    k: &Tensor,
    positives: &[usize],
    opts: &InfoNceOptions,
    dims: (usize, usize, usize),
    lse: &Tensor,
    grad_loss: f64,
) -> Result<(Tensor, Tensor)> {
    run_on_kernels!(q.device(), b => {
        let inputs = KernelInputs::upload(b, q, k, positives)?;
        let lse = b.upload("lse", &values::<f32>(lse)?)?;
        let (dq, dk) = inputs.problem(dims, opts).backward(b, &lse, grad_loss)?;
        let dk = dk.ok_or_else(|| Error::Device("infonce: the kernels returned no key gradient".into()))?;
        Ok((kernel_output(b, q, dq, q.shape())?, kernel_output(b, k, dk, k.shape())?))
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv) = (values::<T>(q)?, values::<T>(k)?);
        let (dq, dk) = problem(&qv, &kv, dims, positives, opts).backward(&lse.to_vec_f64()?, grad_loss);
        Ok((output_like(q, dq, q.shape())?, output_like(k, dk, k.shape())?))
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
    // Validated once; no saved state to fingerprint or verify.
    let dims = validate(OP, q, k, positives, opts)?;
    let out = if q.device() == Device::Cpu {
        // One sweep for loss and gradients (see cpu::softmax::forward_backward).
        with_cpu_real!(q.dtype(), T => {
            let (qv, kv) = (values::<T>(q)?, values::<T>(k)?);
            let (loss, dq, dk) = problem(&qv, &kv, dims, positives, opts).forward_backward(1.0);
            InfoNceOutput {
                loss,
                grad_q: output_like(q, dq, q.shape())?,
                grad_k: output_like(k, dk, k.shape())?,
            }
        })
    } else {
        let (loss, lse) = forward_lse(q, k, positives, opts, dims)?;
        check_result(OP, "lse", &lse, TEMPERATURE_BLAME)?;
        let (grad_q, grad_k) = input_grads(q, k, positives, opts, dims, &lse, 1.0)?;
        InfoNceOutput {
            loss,
            grad_q,
            grad_k,
        }
    };
    check_scalar_result(OP, "loss", out.loss, TEMPERATURE_BLAME)?;
    check_result(OP, "grad_q", &out.grad_q, GRADIENT_BLAME)?;
    check_result(OP, "grad_k", &out.grad_k, GRADIENT_BLAME)?;
    Ok(out)
}

/// q, k and the positive indices as kernel buffers.
pub(crate) struct KernelInputs<'t, B: Backend> {
    pub q: Operand<'t, B::Buf>,
    pub k: Operand<'t, B::Buf>,
    pub positives: B::Buf,
}

impl<'t, B: Backend> KernelInputs<'t, B> {
    pub fn upload(b: &B, q: &'t Tensor, k: &'t Tensor, positives: &[usize]) -> Result<Self> {
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
