//! InfoNCE with one positive key per query:
//! `loss = mean_i [ LSE_j (s_ij / tau) - s_{i,p_i} / tau ]`, `s_ij = q_i . k_j` (cosine when
//! `normalize`), `j = i` dropped under `self_mask`.

use super::{
    check_grad_loss, check_host_finite, check_result, check_scalar_result,
    check_softmax_temperature, compute_dtype, host_loss, index_operand, kernel_grads, kernel_state,
    matrix_dims, output_like, place, same_place, same_width, state_like, upload_f32,
    upload_features, values, with_cpu_real, Fingerprint, Origin, Placed,
};
use crate::checks::{IndexRule, Recorder};
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, AsIndices, Error, Result, Tensor};

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
    /// The mean loss, a 0-d f64 tensor on the inputs' device (reading it is the one copy to
    /// the host a training step needs).
    pub loss: Tensor,
    pub saved: SoftmaxSaved,
}

/// Loss and gradients of [`infonce`].
#[derive(Clone, Debug)]
pub struct InfoNceOutput {
    /// The mean loss, a 0-d f64 tensor on q's device.
    pub loss: Tensor,
    pub grad_q: Tensor,
    pub grad_k: Tensor,
}

/// The problem's `(rows, cols, dim)`.
type Dims = (usize, usize, usize);

/// Validates the inputs (errors named after `op`) and returns `(rows, cols, dim)` and the
/// placed positives.
fn validate<'p>(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    positives: &'p (impl AsIndices<usize> + ?Sized),
    opts: &InfoNceOptions,
) -> Result<(Dims, Placed<'p, usize>)> {
    let (rows, dim) = matrix_dims(op, "q", q)?;
    let cols = same_width(op, "k", k, "M", "q", dim)?;
    same_place(op, &[("q", q), ("k", k)])?;
    check_softmax_temperature(op, opts.temperature, compute_dtype(q.device(), q.dtype()))?;
    let positives = place(op, "positives", positives.index_view(), q.device())?;
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
    for (i, &p) in positives.host().unwrap_or_default().iter().enumerate() {
        if p >= cols {
            return Err(Error::invalid(
                op,
                "positives",
                format!("positives[{i}] = {p} {}", out_of_range(cols)),
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
    check_host_finite(op, "q", q)?;
    check_host_finite(op, "k", k)?;
    Ok(((rows, cols, dim), positives))
}

/// What a positive index beyond the keys is told.
fn out_of_range(cols: usize) -> String {
    format!("is out of range for {cols} keys")
}

/// The positives of the CPU path (placed on the host: the CPU is no kernel device).
fn host_positives<'p>(positives: &'p Placed<'_, usize>) -> Result<&'p [usize]> {
    positives
        .host()
        .ok_or_else(|| Error::Device("infonce: device positives on the CPU path".into()))
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
    positives: &(impl AsIndices<usize> + ?Sized),
    opts: &InfoNceOptions,
) -> Result<SoftmaxForward> {
    let (dims, positives) = validate(OP, q, k, positives, opts)?;
    let origin = origin(q, k, &positives, opts);
    run_on_kernels!(q.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = KernelInputs::new(b, &mut rec, q, k, &positives, dims, opts)?;
        let (row_loss, lse) = inputs.problem(dims, opts).forward(b)?;
        kernel_forward(b, rec, row_loss, lse, dims.0 as f64, origin)
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv) = (values::<T>(q)?, values::<T>(k)?);
        let (loss, lse) = problem(&qv, &kv, dims, host_positives(&positives)?, opts).forward();
        SoftmaxSaved::checked(OP, loss, state_like(q, lse, &[dims.0])?, origin, TEMPERATURE_BLAME)
    })
}

/// A softmax forward on a kernel backend: the 0-d loss `sum(row_loss) / divisor` and the lse,
/// both left on the device with the call's checks (the inputs recorded in `rec`, and the lse,
/// which must be finite).
pub(crate) fn kernel_forward<B: Backend>(
    b: &B,
    mut rec: Recorder<'_, B>,
    row_loss: B::Buf,
    lse: B::Buf,
    divisor: f64,
    origin: Origin,
) -> Result<SoftmaxForward> {
    rec.result("lse", TEMPERATURE_BLAME, &lse, 1)?;
    let rows = b.info(&lse).count;
    let (loss, checks) = rec.finish_loss(&row_loss, divisor, TEMPERATURE_BLAME)?;
    let lse = kernel_state(b, lse, &[rows])?.with_checks(&checks);
    Ok(SoftmaxForward {
        loss,
        saved: SoftmaxSaved { lse, origin },
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
fn origin(q: &Tensor, k: &Tensor, positives: &Placed<'_, usize>, opts: &InfoNceOptions) -> Origin {
    let inputs = Fingerprint::new().tensor(q).tensor(k).placed(positives);
    Origin::new(OP, opts, inputs)
}

impl SoftmaxSaved {
    /// A host forward's result, once its loss and lse are known to be finite.
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
            loss: host_loss(loss, lse.device())?,
            saved: SoftmaxSaved { lse, origin },
        })
    }

    /// The lse as an f32 kernel operand (where it is on the device, else copied in), its scan
    /// recorded.
    pub(crate) fn operand<'s, B: Backend>(
        &'s self,
        b: &B,
        rec: &mut Recorder<'_, B>,
    ) -> Result<Operand<'s, B::Buf>> {
        let lse = upload_f32(b, "saved.lse", &self.lse)?;
        rec.input("saved.lse", &self.lse, &lse)?;
        Ok(lse)
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
        check_host_finite(backward_op, "saved.lse", &self.lse)?;
        self.origin.check(backward_op, origin)
    }
}

/// The InfoNCE backward: gradients of `grad_loss * loss` with respect to q and k.
pub fn infonce_backward(
    q: &Tensor,
    k: &Tensor,
    positives: &(impl AsIndices<usize> + ?Sized),
    opts: &InfoNceOptions,
    saved: &SoftmaxSaved,
    grad_loss: f64,
) -> Result<(Tensor, Tensor)> {
    let (dims, positives) = validate(BACKWARD, q, k, positives, opts)?;
    saved.check(BACKWARD, &origin(q, k, &positives, opts), dims.0)?;
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(q.device(), q.dtype()))?;
    run_on_kernels!(q.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let inputs = KernelInputs::new(b, &mut rec, q, k, &positives, dims, opts)?;
        let lse = saved.operand(b, &mut rec)?;
        let (dq, dk) = inputs.problem(dims, opts).backward(b, &lse, grad_loss)?;
        let dk = dk.ok_or_else(|| Error::Device("infonce: the kernels returned no key gradient".into()))?;
        let grads = [("grad_q", dq, q), ("grad_k", dk, k)];
        let ((), [dq, dk]) = kernel_grads(b, rec, grads, GRADIENT_BLAME, |rec| Ok(((), rec.finish()?)))?;
        Ok((dq, dk))
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv) = (values::<T>(q)?, values::<T>(k)?);
        let (dq, dk) = problem(&qv, &kv, dims, host_positives(&positives)?, opts)
            .backward(&saved.lse.to_vec_f64()?, grad_loss);
        let (dq, dk) = (output_like(q, dq, q.shape())?, output_like(k, dk, k.shape())?);
        check_result(BACKWARD, "grad_q", &dq, GRADIENT_BLAME)?;
        check_result(BACKWARD, "grad_k", &dk, GRADIENT_BLAME)?;
        Ok((dq, dk))
    })
}

/// InfoNCE loss and gradients in one call.
///
/// ```
/// use contra::{infonce, Device, InfoNceOptions, Tensor};
/// let q = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], Device::Cpu)?;
/// let k = Tensor::from_vec(vec![0.9f32, 0.1, 0.2, 0.8, -1.0, 0.0], &[3, 2], Device::Cpu)?;
/// let out = infonce(&q, &k, &[0, 1], &InfoNceOptions::default())?;
/// assert!(out.loss.to_scalar()?.is_finite());
/// assert_eq!(out.grad_k.shape(), &[3, 2]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn infonce(
    q: &Tensor,
    k: &Tensor,
    positives: &(impl AsIndices<usize> + ?Sized),
    opts: &InfoNceOptions,
) -> Result<InfoNceOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let (dims, positives) = validate(OP, q, k, positives, opts)?;
    run_on_kernels!(q.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = KernelInputs::new(b, &mut rec, q, k, &positives, dims, opts)?;
        let sweep = inputs.problem(dims, opts).forward_backward(b)?;
        let dk = sweep.grad_k.ok_or_else(|| Error::Device("infonce: the kernels returned no key gradient".into()))?;
        rec.result("lse", TEMPERATURE_BLAME, &sweep.lse, 1)?;
        let row_loss = sweep.row_loss;
        let finish = |rec: Recorder<'_, _>| rec.finish_loss(&row_loss, dims.0 as f64, TEMPERATURE_BLAME);
        let grads = [("grad_q", sweep.grad_q, q), ("grad_k", dk, k)];
        let (loss, [grad_q, grad_k]) = kernel_grads(b, rec, grads, GRADIENT_BLAME, finish)?;
        Ok(InfoNceOutput { loss, grad_q, grad_k })
    });
    // One sweep for loss and gradients (see cpu::softmax::forward_backward).
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv) = (values::<T>(q)?, values::<T>(k)?);
        let (loss, dq, dk) =
            problem(&qv, &kv, dims, host_positives(&positives)?, opts).forward_backward(1.0);
        check_scalar_result(OP, "loss", loss, TEMPERATURE_BLAME)?;
        let (grad_q, grad_k) = (output_like(q, dq, q.shape())?, output_like(k, dk, k.shape())?);
        check_result(OP, "grad_q", &grad_q, GRADIENT_BLAME)?;
        check_result(OP, "grad_k", &grad_k, GRADIENT_BLAME)?;
        Ok(InfoNceOutput { loss: host_loss(loss, q.device())?, grad_q, grad_k })
    })
}

/// The positive indices on the device: a ring `(i + shift) mod N` (the aligned pairs of most
/// uses, `shift` 0, or two views side by side) is built there; any other list is copied in.
fn positives_on<B: Backend>(b: &B, positives: &[usize]) -> Result<B::Buf> {
    let n = positives.len();
    let shift = positives.first().copied().unwrap_or(0);
    if shift < n.max(1)
        && positives
            .iter()
            .enumerate()
            .all(|(i, &p)| p == (i + shift) % n)
    {
        return kernels::elementwise::index_ring(b, n, shift);
    }
    // Indices were validated against the key count, which fits the kernels' 32-bit sizes.
    let positives: Vec<i32> = positives.iter().map(|&p| p as i32).collect();
    b.upload_i32("positives", &positives)
}

/// q, k and the positive indices as kernel buffers.
pub(crate) struct KernelInputs<'t, B: Backend> {
    pub q: Operand<'t, B::Buf>,
    pub k: Operand<'t, B::Buf>,
    pub positives: Operand<'t, B::Buf>,
}

impl<'t, B: Backend> KernelInputs<'t, B> {
    /// q and k where they are (copied in from the host), their scans recorded; the positive
    /// indices copied in.
    pub fn new(
        b: &B,
        rec: &mut Recorder<'_, B>,
        q: &'t Tensor,
        k: &'t Tensor,
        positives: &'t Placed<'_, usize>,
        (_, cols, _): Dims,
        opts: &InfoNceOptions,
    ) -> Result<Self> {
        let rule = IndexRule {
            lo: 0,
            hi: cols as i64,
            forbid_self: opts.self_mask,
            range: out_of_range(cols),
        };
        let inputs = KernelInputs {
            q: upload_features(b, "q", q)?,
            k: upload_features(b, "k", k)?,
            positives: index_operand(b, rec, "positives", positives, Some(rule), |p| {
                positives_on(b, p)
            })?,
        };
        rec.input("q", q, &inputs.q)?;
        rec.input("k", k, &inputs.k)?;
        Ok(inputs)
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
