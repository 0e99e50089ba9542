//! BatchNorm1d over `(batch, features)`, with PyTorch's semantics.

use crate::nn::{Buffer, Mat, Param};
use crate::{Error, Result};

/// Batch normalisation of each feature (column).
///
/// Train mode normalises with the batch mean and biased variance and updates the running
/// statistics as `running = (1 - momentum) * running + momentum * batch_stat`, with the
/// *unbiased* batch variance for `running_var` (as PyTorch does). Eval mode normalises with the
/// running statistics. With `affine`, `y = weight * x_hat + bias` (weight starts at 1, bias at
/// 0; both are excluded from weight decay).
#[derive(Clone, Debug)]
pub struct BatchNorm1d {
    pub weight: Option<Param>,
    pub bias: Option<Param>,
    pub running_mean: Buffer,
    pub running_var: Buffer,
    /// Added to the variance before the square root (default 1e-5).
    pub eps: f32,
    /// Weight of the new batch statistic in the running averages (default 0.1).
    pub momentum: f32,
    training: bool,
    cache: Option<Cache>,
}

/// What the backward pass needs from the forward pass.
#[derive(Clone, Debug)]
struct Cache {
    x_hat: Mat,
    inv_std: Vec<f32>,
    /// Whether the forward used batch statistics (their gradient has two more terms).
    train: bool,
}

impl BatchNorm1d {
    pub const DEFAULT_EPS: f32 = 1e-5;
    pub const DEFAULT_MOMENTUM: f32 = 0.1;

    /// A BatchNorm over `num_features` columns, in train mode.
    pub fn new(num_features: usize, affine: bool) -> Result<Self> {
        if num_features == 0 {
            return Err(Error::invalid(
                "BatchNorm1d::new",
                "num_features",
                "must be positive",
            ));
        }
        let shape = vec![num_features];
        Ok(BatchNorm1d {
            weight: affine.then(|| Param::filled("weight", shape.clone(), 1.0, false)),
            bias: affine.then(|| Param::filled("bias", shape.clone(), 0.0, false)),
            running_mean: Buffer::filled("running_mean", shape.clone(), 0.0),
            running_var: Buffer::filled("running_var", shape, 1.0),
            eps: Self::DEFAULT_EPS,
            momentum: Self::DEFAULT_MOMENTUM,
            training: true,
            cache: None,
        })
    }

    pub fn num_features(&self) -> usize {
        self.running_mean.value.len()
    }

    /// Train mode (batch statistics) or eval mode (running statistics).
    pub fn set_train(&mut self, train: bool) {
        self.training = train;
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Normalises `x` (`batch x features`) in the current mode and caches what `backward`
    /// needs. Train mode needs a batch of at least 2 (a variance of one sample is undefined).
    pub fn forward(&mut self, x: &Mat) -> Result<Mat> {
        const OP: &str = "BatchNorm1d::forward";
        self.check_self(OP)?;
        x.check_input(OP, "x", self.num_features())?;
        let (mean, inv_std) = if self.training {
            self.batch_stats(x)?
        } else {
            (self.running_mean.value.clone(), self.running_inv_std())
        };
        let (y, x_hat) = self.normalize(x, &mean, &inv_std);
        self.cache = Some(Cache {
            x_hat,
            inv_std,
            train: self.training,
        });
        Ok(y)
    }

    /// The eval-mode forward pass (running statistics) without caching anything.
    pub fn infer(&self, x: &Mat) -> Result<Mat> {
        const OP: &str = "BatchNorm1d::forward";
        self.check_self(OP)?;
        x.check_input(OP, "x", self.num_features())?;
        Ok(self
            .normalize(x, &self.running_mean.value, &self.running_inv_std())
            .0)
    }

    /// Given `dL/dy`, adds `dL/dweight = sum dy * x_hat` and `dL/dbias = sum dy` to the
    /// parameter gradients and returns `dL/dx`. In train mode that is
    /// `inv_std / n * (n * g - sum g - x_hat * sum(g * x_hat))` with `g = dy * weight`, because
    /// the batch mean and variance depend on every row; in eval mode it is `g * inv_std`.
    pub fn backward(&mut self, grad_out: &Mat) -> Result<Mat> {
        const OP: &str = "BatchNorm1d::backward";
        self.check_self(OP)?;
        let cache = self
            .cache
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "self", "backward called before forward"))?;
        let (n, d) = (cache.x_hat.rows, cache.x_hat.cols);
        grad_out.check_input(OP, "grad_out", d)?;
        if grad_out.rows != n || d != self.num_features() {
            return Err(Error::shape(
                OP,
                "grad_out",
                &grad_out.shape(),
                format!("({n}, {d}) like the forward output"),
            ));
        }
        let x_hat = &cache.x_hat;
        // Column sums of dy and dy * x_hat, in f64 so that large batches lose nothing.
        let mut sum_dy = vec![0f64; d];
        let mut sum_dy_xhat = vec![0f64; d];
        for (g_row, h_row) in grad_out
            .data
            .chunks_exact(d)
            .zip(x_hat.data.chunks_exact(d))
        {
            for j in 0..d {
                sum_dy[j] += g_row[j] as f64;
                sum_dy_xhat[j] += g_row[j] as f64 * h_row[j] as f64;
            }
        }
        if let Some(w) = &mut self.weight {
            w.grad
                .iter_mut()
                .zip(&sum_dy_xhat)
                .for_each(|(g, &s)| *g += s as f32);
        }
        if let Some(b) = &mut self.bias {
            b.grad
                .iter_mut()
                .zip(&sum_dy)
                .for_each(|(g, &s)| *g += s as f32);
        }
        let gamma: Vec<f32> = match &self.weight {
            Some(w) => w.value.clone(),
            None => vec![1.0; d],
        };
        let mut grad_in = Mat::zeros(n, d);
        let rows = grad_in
            .data
            .chunks_exact_mut(d)
            .zip(grad_out.data.chunks_exact(d))
            .zip(x_hat.data.chunks_exact(d));
        if cache.train {
            let inv_n = 1.0 / n as f64;
            for ((dx, dy), h) in rows {
                for j in 0..d {
                    let centered =
                        dy[j] as f64 - sum_dy[j] * inv_n - h[j] as f64 * sum_dy_xhat[j] * inv_n;
                    dx[j] = (gamma[j] as f64 * cache.inv_std[j] as f64 * centered) as f32;
                }
            }
        } else {
            for ((dx, dy), _) in rows {
                for j in 0..d {
                    dx[j] = dy[j] * gamma[j] * cache.inv_std[j];
                }
            }
        }
        Ok(grad_in)
    }

    /// Parameters in PyTorch order: weight, then bias (none without `affine`).
    pub fn params(&self) -> Vec<&Param> {
        self.weight.iter().chain(&self.bias).collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        self.weight.iter_mut().chain(&mut self.bias).collect()
    }

    /// The running statistics: `running_mean`, then `running_var`.
    pub fn buffers(&self) -> Vec<&Buffer> {
        vec![&self.running_mean, &self.running_var]
    }

    pub fn buffers_mut(&mut self) -> Vec<&mut Buffer> {
        vec![&mut self.running_mean, &mut self.running_var]
    }

    /// Batch mean and `1 / sqrt(biased var + eps)`; updates the running statistics.
    fn batch_stats(&mut self, x: &Mat) -> Result<(Vec<f32>, Vec<f32>)> {
        let (n, d) = (x.rows, x.cols);
        if n < 2 {
            return Err(Error::invalid(
                "BatchNorm1d::forward",
                "x",
                "train mode needs more than 1 value per feature (got a batch of 1)",
            ));
        }
        let mut mean = vec![0f64; d];
        for row in x.data.chunks_exact(d) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut sq = vec![0f64; d];
        for row in x.data.chunks_exact(d) {
            for j in 0..d {
                let c = row[j] as f64 - mean[j];
                sq[j] += c * c;
            }
        }
        let m = self.momentum as f64;
        let mut inv_std = vec![0f32; d];
        for j in 0..d {
            let biased = sq[j] / n as f64;
            let unbiased = sq[j] / (n - 1) as f64;
            inv_std[j] = (1.0 / (biased + self.eps as f64).sqrt()) as f32;
            let rm = &mut self.running_mean.value[j];
            *rm = ((1.0 - m) * *rm as f64 + m * mean[j]) as f32;
            let rv = &mut self.running_var.value[j];
            *rv = ((1.0 - m) * *rv as f64 + m * unbiased) as f32;
        }
        Ok((mean.into_iter().map(|v| v as f32).collect(), inv_std))
    }

    fn running_inv_std(&self) -> Vec<f32> {
        self.running_var
            .value
            .iter()
            .map(|&v| (1.0 / (v as f64 + self.eps as f64).sqrt()) as f32)
            .collect()
    }

    /// `(y, x_hat)` with `x_hat = (x - mean) * inv_std` and `y = weight * x_hat + bias`.
    fn normalize(&self, x: &Mat, mean: &[f32], inv_std: &[f32]) -> (Mat, Mat) {
        let d = x.cols;
        let mut x_hat = x.clone();
        for row in x_hat.data.chunks_exact_mut(d) {
            for j in 0..d {
                row[j] = (row[j] - mean[j]) * inv_std[j];
            }
        }
        let mut y = x_hat.clone();
        if let (Some(w), Some(b)) = (&self.weight, &self.bias) {
            for row in y.data.chunks_exact_mut(d) {
                for ((v, &scale), &shift) in row.iter_mut().zip(&w.value).zip(&b.value) {
                    *v = scale * *v + shift;
                }
            }
        }
        (y, x_hat)
    }

    /// Fields are public (so checkpoints can load them): check they still fit together.
    fn check_self(&self, op: &'static str) -> Result<()> {
        let d = self.running_mean.value.len();
        if self.running_var.value.len() != d {
            return Err(Error::shape(
                op,
                "running_var",
                &[self.running_var.value.len()],
                format!("[{d}] like running_mean"),
            ));
        }
        if d == 0 {
            return Err(Error::invalid(op, "running_mean", "has no features"));
        }
        if self.weight.is_some() != self.bias.is_some() {
            return Err(Error::invalid(
                op,
                "weight / bias",
                "must both be present (affine) or both absent",
            ));
        }
        for p in self.params() {
            if p.value.len() != d || p.grad.len() != d {
                return Err(Error::shape(
                    op,
                    "weight / bias",
                    &[p.value.len(), p.grad.len()],
                    format!("value and grad of {d} elements"),
                ));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(
                op,
                "eps",
                format!("must be positive and finite, got {}", self.eps),
            ));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::invalid(
                op,
                "momentum",
                format!("must be in [0, 1], got {}", self.momentum),
            ));
        }
        Ok(())
    }
}
