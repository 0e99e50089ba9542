//! Learning-rate schedules.

use std::f64::consts::PI;

/// Cosine decay with linear warm-up, the schedule of SimCLR and MoCo v2.
///
/// For `step < warmup_steps` the rate rises linearly, `base_lr * (step + 1) / warmup_steps`,
/// so that the first step already moves (and step `warmup_steps - 1` uses `base_lr`). After
/// that it follows `final_lr + (base_lr - final_lr) * (1 + cos(pi * p)) / 2` with
/// `p = (step - warmup_steps) / (total_steps - warmup_steps)`: `base_lr` at `warmup_steps`,
/// `final_lr` at `total_steps` and beyond.
pub fn lr_at(
    step: usize,
    total_steps: usize,
    warmup_steps: usize,
    base_lr: f32,
    final_lr: f32,
) -> f32 {
    if step < warmup_steps {
        return (base_lr as f64 * (step + 1) as f64 / warmup_steps as f64) as f32;
    }
    if step >= total_steps {
        return final_lr;
    }
    let progress = (step - warmup_steps) as f64 / (total_steps - warmup_steps) as f64;
    let (base, last) = (base_lr as f64, final_lr as f64);
    (last + (base - last) * 0.5 * (1.0 + (PI * progress).cos())) as f32
}
