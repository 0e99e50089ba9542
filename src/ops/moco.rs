//! MoCo: `q`, `k` (N x D) normalized inside, `k` gets no gradient; `l_pos = q . k`,
//! `l_neg = q . queue^T` (queue K x D used as given); `loss = CE([l_pos, l_neg] / tau, 0)`.
//! Plus the queue enqueue (ring buffer with wrap-around).

use super::infonce::{
    kernel_forward, SoftmaxForward, SoftmaxSaved, GRADIENT_BLAME, TEMPERATURE_BLAME,
};
use super::{
    check_finite, check_grad_loss, check_host_finite, check_result, check_scalar_result,
    check_softmax_temperature, compute_dtype, host_loss, kernel_grads, matrix_dims, output_like,
    same_place, same_width, state_like, upload_f32, upload_features, values, with_cpu_real,
    writable_on, Fingerprint, Origin,
};
use crate::checks::Recorder;
use crate::cpu::Real;
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, DType, Device, Element, Error, Result, Tensor};

const OP: &str = "moco";
const BACKWARD: &str = "moco_backward";
const ENQUEUE: &str = "moco_enqueue";

/// Options of [`moco`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MocoOptions {
    /// Softmax temperature (MoCo v2 uses 0.2).
    pub temperature: f64,
}

impl Default for MocoOptions {
    fn default() -> Self {
        MocoOptions { temperature: 0.2 }
    }
}

/// Loss and query gradient of [`moco`].
#[derive(Clone, Debug)]
pub struct MocoOutput {
    /// The mean loss, a 0-d f64 tensor on q's device.
    pub loss: Tensor,
    pub grad_q: Tensor,
}

/// Validates the inputs (errors named after `op`) and returns `(rows, queue_len, dim)`.
fn validate(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    opts: &MocoOptions,
) -> Result<(usize, usize, usize)> {
    let (rows, dim) = matrix_dims(op, "q", q)?;
    matrix_dims(op, "k", k)?;
    let queue_len = same_width(op, "queue", queue, "K", "q", dim)?;
    same_place(op, &[("q", q), ("k", k), ("queue", queue)])?;
    if k.shape() != q.shape() {
        return Err(Error::shape(
            op,
            "k",
            k.shape(),
            format!(
                "{:?} (the same shape as q: one positive key per query)",
                q.shape()
            ),
        ));
    }
    check_softmax_temperature(op, opts.temperature, compute_dtype(q.device(), q.dtype()))?;
    check_host_finite(op, "q", q)?;
    check_host_finite(op, "k", k)?;
    check_host_finite(op, "queue", queue)?;
    Ok((rows, queue_len, dim))
}

/// The origin of moco's saved state: the queue is part of it (a backward against another queue
/// would use a log-sum-exp over other negatives).
fn origin(q: &Tensor, k: &Tensor, queue: &Tensor, opts: &MocoOptions) -> Origin {
    let inputs = Fingerprint::new().tensor(q).tensor(k).tensor(queue);
    Origin::new(OP, opts, inputs)
}

fn problem<'a, T>(
    q: &'a [T],
    k: &'a [T],
    queue: &'a [T],
    (rows, queue_len, dim): (usize, usize, usize),
    opts: &MocoOptions,
) -> cpu::moco::Problem<'a, T> {
    cpu::moco::Problem {
        q,
        k,
        queue,
        rows,
        queue_len,
        dim,
        temperature: opts.temperature,
    }
}

/// MoCo forward: the mean loss and the per-query log-sum-exp over `[l_pos, l_neg] / tau`.
pub fn moco_forward(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    opts: &MocoOptions,
) -> Result<SoftmaxForward> {
    let dims = validate(OP, q, k, queue, opts)?;
    let origin = origin(q, k, queue, opts);
    run_on_kernels!(q.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = KernelInputs::new(b, &mut rec, [q, k, queue])?;
        let (row_loss, lse) = inputs.problem(dims, opts).forward(b)?;
        kernel_forward(b, rec, row_loss, lse, dims.0 as f64, origin)
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv, queue_v) = (values::<T>(q)?, values::<T>(k)?, values::<T>(queue)?);
        let (loss, lse) = problem(&qv, &kv, &queue_v, dims, opts).forward();
        SoftmaxSaved::checked(OP, loss, state_like(q, lse, &[dims.0])?, origin, TEMPERATURE_BLAME)
    })
}

/// MoCo backward: the gradient of `grad_loss * loss` with respect to q (k and the queue get none).
pub fn moco_backward(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    opts: &MocoOptions,
    saved: &SoftmaxSaved,
    grad_loss: f64,
) -> Result<Tensor> {
    let dims = validate(BACKWARD, q, k, queue, opts)?;
    saved.check(BACKWARD, &origin(q, k, queue, opts), dims.0)?;
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(q.device(), q.dtype()))?;
    run_on_kernels!(q.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let inputs = KernelInputs::new(b, &mut rec, [q, k, queue])?;
        let lse = saved.operand(b, &mut rec)?;
        let grad = inputs.problem(dims, opts).backward(b, &lse, grad_loss)?;
        let ((), [grad_q]) = kernel_grads(b, rec, [("grad_q", grad, q)], GRADIENT_BLAME, |rec| Ok(((), rec.finish()?)))?;
        Ok(grad_q)
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv, queue_v) = (values::<T>(q)?, values::<T>(k)?, values::<T>(queue)?);
        let grad = problem(&qv, &kv, &queue_v, dims, opts).backward(&saved.lse.to_vec_f64()?, grad_loss);
        let grad = output_like(q, grad, q.shape())?;
        check_result(BACKWARD, "grad_q", &grad, GRADIENT_BLAME)?;
        Ok(grad)
    })
}

/// MoCo loss and query gradient in one call: queries `q` and their positive keys `k` (N x D,
/// L2-normalized inside) against the negatives in `queue` (K x D, used as given).
///
/// ```
/// use contra::{moco, Device, MocoOptions, Tensor};
/// let q = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 2.0], &[2, 2], Device::Cpu)?;
/// let k = Tensor::from_vec(vec![0.9f32, 0.1, 0.1, 0.9], &[2, 2], Device::Cpu)?;
/// let queue = Tensor::from_vec(vec![-1.0f32, 0.0, 0.0, -1.0, 0.6, 0.8], &[3, 2], Device::Cpu)?;
/// let out = moco(&q, &k, &queue, &MocoOptions::default())?;
/// assert!(out.loss.to_scalar()? > 0.0);
/// assert_eq!(out.grad_q.shape(), &[2, 2]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn moco(q: &Tensor, k: &Tensor, queue: &Tensor, opts: &MocoOptions) -> Result<MocoOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let dims = validate(OP, q, k, queue, opts)?;
    run_on_kernels!(q.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = KernelInputs::new(b, &mut rec, [q, k, queue])?;
        let (row_loss, lse, grad) = inputs.problem(dims, opts).forward_backward(b)?;
        rec.result("lse", TEMPERATURE_BLAME, &lse, 1)?;
        let finish = |rec: Recorder<'_, _>| rec.finish_loss(&row_loss, dims.0 as f64, TEMPERATURE_BLAME);
        let (loss, [grad_q]) = kernel_grads(b, rec, [("grad_q", grad, q)], GRADIENT_BLAME, finish)?;
        Ok(MocoOutput { loss, grad_q })
    });
    with_cpu_real!(q.dtype(), T => {
        let (qv, kv, queue_v) = (values::<T>(q)?, values::<T>(k)?, values::<T>(queue)?);
        let problem = problem(&qv, &kv, &queue_v, dims, opts);
        let (loss, _, grad) = problem.forward_backward(1.0);
        check_scalar_result(OP, "loss", loss, TEMPERATURE_BLAME)?;
        let grad_q = output_like(q, grad, q.shape())?;
        check_result(OP, "grad_q", &grad_q, GRADIENT_BLAME)?;
        Ok(MocoOutput { loss: host_loss(loss, q.device())?, grad_q })
    })
}

/// Writes the L2-normalized keys `k` (N x D) into `queue` (K x D) at rows `(ptr + i) mod K` and
/// returns the new pointer `(ptr + N) mod K`. Wraps around; needs neither `K mod N = 0` nor
/// `N <= K` (with N > K the last keys win). This is MoCo's ring buffer: every key enters the
/// queue. (lightly's memory bank instead truncates a batch that passes the end of the queue and
/// resets the pointer to 0, so those keys never enter it.)
///
/// ```
/// use contra::{moco_enqueue, Device, Tensor};
/// let mut queue = Tensor::zeros(&[3, 2], contra::DType::F32, Device::Cpu)?;
/// let k = Tensor::from_vec(vec![3.0f32, 4.0, 0.0, 2.0], &[2, 2], Device::Cpu)?;
/// // Pointer 2: key 0 goes to row 2, key 1 wraps around to row 0.
/// let ptr = moco_enqueue(&mut queue, &k, 2)?;
/// assert_eq!(ptr, 1);
/// assert_eq!(queue.to_vec::<f32>()?, vec![0.0, 1.0, 0.0, 0.0, 0.6, 0.8]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn moco_enqueue(queue: &mut Tensor, k: &Tensor, ptr: usize) -> Result<usize> {
    let (queue_len, dim) = matrix_dims(ENQUEUE, "queue", queue)?;
    let rows = same_width(ENQUEUE, "k", k, "N", "the queue", dim)?;
    same_place(ENQUEUE, &[("queue", queue), ("k", k)])?;
    if ptr >= queue_len {
        return Err(Error::invalid(
            ENQUEUE,
            "ptr",
            format!("{ptr} is out of range for a queue of {queue_len} rows"),
        ));
    }
    // The same NaN policy as moco, which would reject this queue at its next call (on a
    // device both are scanned there, and reading the queue reports what they held).
    check_host_finite(ENQUEUE, "k", k)?;
    check_host_finite(ENQUEUE, "queue", queue)?;
    if queue.device() != Device::Cpu {
        // f32 queues: the kernel writes the N new rows in place in the queue's device buffer.
        if queue.dtype() == DType::F32 {
            crate::kernels::run_on_kernels!(queue.device(), b => {
                let mut rec = Recorder::new(b, ENQUEUE)?;
                let keys = upload_f32(b, "k", k)?;
                rec.input("k", k, &keys)?;
                let slots = writable_on(b, ENQUEUE, "queue", queue)?;
                rec.target("queue", slots, dim)?;
                let next = crate::kernels::queue::enqueue(b, slots, &keys, rows, queue_len, dim, ptr)?;
                queue.set_checks(&rec.finish()?);
                Ok(next)
            });
        }
        // The 16-bit and f64 queues are written on the host and go back.
        check_finite(ENQUEUE, "k", k)?;
        check_finite(ENQUEUE, "queue", queue)?;
        let mut host = queue.to_host()?;
        let next = moco_enqueue(&mut host, &k.to_host()?, ptr)?;
        *queue = host.to_device(queue.device())?;
        return Ok(next);
    }
    with_cpu_real!(k.dtype(), T => {
        let kv = values::<T>(k)?;
        match queue.dtype() {
            DType::F32 => enqueue_into::<T, f32>(queue, &kv, rows, dim, ptr),
            DType::F64 => enqueue_into::<T, f64>(queue, &kv, rows, dim, ptr),
            DType::Bf16 => enqueue_into::<T, half::bf16>(queue, &kv, rows, dim, ptr),
            DType::F16 => enqueue_into::<T, half::f16>(queue, &kv, rows, dim, ptr),
        }
    })
}

fn enqueue_into<T: Real, E: Element>(
    queue: &mut Tensor,
    k: &[T],
    rows: usize,
    dim: usize,
    ptr: usize,
) -> Result<usize> {
    let device = queue.device();
    let slots = queue.host_mut::<E>().ok_or_else(|| Error::Mismatch {
        op: ENQUEUE,
        reason: format!("`queue` is not in host memory as {} on {device}", E::DTYPE),
    })?;
    Ok(cpu::moco::enqueue(slots, k, rows, dim, ptr))
}

/// q, k and the queue as kernel operands.
struct KernelInputs<'t, B: Backend> {
    operands: [Operand<'t, B::Buf>; 3],
}

impl<'t, B: Backend> KernelInputs<'t, B> {
    /// `[q, k, queue]` where they are (copied in from the host), their scans recorded.
    fn new(b: &B, rec: &mut Recorder<'_, B>, inputs: [&'t Tensor; 3]) -> Result<Self> {
        let names = ["q", "k", "queue"];
        let mut operands = Vec::with_capacity(3);
        for (name, t) in names.into_iter().zip(inputs) {
            let operand = upload_features(b, name, t)?;
            rec.input(name, t, &operand)?;
            operands.push(operand);
        }
        let operands = operands
            .try_into()
            .map_err(|_| Error::Device("moco: three operands".into()))?;
        Ok(KernelInputs { operands })
    }

    fn problem(
        &self,
        (rows, queue_len, dim): (usize, usize, usize),
        opts: &MocoOptions,
    ) -> kernels::moco::Moco<'_, B> {
        let [q, k, queue] = &self.operands;
        kernels::moco::Moco {
            q,
            k,
            queue,
            rows,
            queue_len,
            dim,
            temperature: opts.temperature,
        }
    }
}
