//! The MoCo momentum (EMA) update, elementwise in f64 and in parallel chunks.

use rayon::prelude::*;

use crate::tensor::Element;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `theta_k <- m theta_k + (1 - m) theta_q`, computed in f64 and rounded once to the element
/// type; `m = 1` leaves `theta_k` unchanged and `m = 0` copies `theta_q` exactly.
pub fn update<E: Element>(theta_k: &mut [E], theta_q: &[E], m: f64) {
    theta_k
        .par_chunks_mut(CHUNK)
        .zip(theta_q.par_chunks(CHUNK))
        .for_each(|(k, q)| {
            for (tk, &tq) in k.iter_mut().zip(q) {
                *tk = E::from_f64(m * tk.to_f64() + (1.0 - m) * tq.to_f64());
            }
        });
}
