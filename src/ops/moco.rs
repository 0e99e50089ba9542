//! MoCo: `q`, `k` (N x D) normalized inside, `k` gets no gradient; `l_pos = q . k`,
//! `l_neg = q . queue^T` (queue K x D used as given); `loss = CE([l_pos, l_neg] / tau, 0)`.
//! Plus the queue enqueue (ring buffer with wrap-around).

use super::infonce::{SoftmaxForward, SoftmaxSaved};
use crate::{Result, Tensor};

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
    pub loss: f64,
    pub grad_q: Tensor,
}

/// MoCo forward: the mean loss and the per-query log-sum-exp.
pub fn moco_forward(q: &Tensor, k: &Tensor, queue: &Tensor, opts: &MocoOptions) -> Result<SoftmaxForward> {
    let _ = (q, k, queue, opts);
    todo!()
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
    let _ = (q, k, queue, opts, saved, grad_loss);
    todo!()
}

/// MoCo loss and query gradient in one call.
pub fn moco(q: &Tensor, k: &Tensor, queue: &Tensor, opts: &MocoOptions) -> Result<MocoOutput> {
    let _ = (q, k, queue, opts);
    todo!()
}

/// Writes the L2-normalized keys `k` (N x D) into `queue` (K x D) at rows `(ptr + i) mod K` and
/// returns the new pointer `(ptr + N) mod K`. Wraps around; needs neither `K mod N = 0` nor
/// `N <= K` (with N > K the last keys win).
pub fn moco_enqueue(queue: &mut Tensor, k: &Tensor, ptr: usize) -> Result<usize> {
    let _ = (queue, k, ptr);
    todo!()
}
