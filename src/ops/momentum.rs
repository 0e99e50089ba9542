//! The MoCo momentum (EMA) update of the key encoder: `theta_k <- m theta_k + (1 - m) theta_q`.

use crate::{Result, Tensor};

/// Updates `theta_k` in place from `theta_q` (same shape) with momentum `m` in [0, 1].
pub fn momentum_update(theta_k: &mut Tensor, theta_q: &Tensor, m: f64) -> Result<()> {
    let _ = (theta_k, theta_q, m);
    todo!()
}
