//! Fully connected layer `y = x W^T + b`.

use rand::Rng;

use crate::cpu::gemm::{Gemm, MatRef};
use crate::nn::{Mat, Param};
use crate::{Error, Result};

/// A linear layer with weight `out x in` (PyTorch's layout) and an optional bias.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    /// The last forward input, kept for the weight gradient.
    input: Option<Mat>,
}

impl Linear {
    /// PyTorch's default initialisation (`kaiming_uniform_(a = sqrt(5))`): weight and bias
    /// uniform in `[-1/sqrt(in), 1/sqrt(in)]`, so that initial activations keep their scale.
    pub fn new<R: Rng + ?Sized>(
        in_features: usize,
        out_features: usize,
        bias: bool,
        rng: &mut R,
    ) -> Result<Self> {
        if in_features == 0 || out_features == 0 {
            return Err(Error::invalid(
                "Linear::new",
                "in_features / out_features",
                format!("must be positive, got {in_features} -> {out_features}"),
            ));
        }
        let bound = 1.0 / (in_features as f32).sqrt();
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..=bound)).collect() };
        let weight = Param::new(
            "weight",
            vec![out_features, in_features],
            uniform(out_features * in_features),
            true,
        )?;
        let bias = if bias {
            Some(Param::new(
                "bias",
                vec![out_features],
                uniform(out_features),
                false,
            )?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            input: None,
        })
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }

    /// `x W^T + b` for `x` of shape `(batch, in)`; caches `x` for `backward`.
    pub fn forward(&mut self, x: &Mat) -> Result<Mat> {
        let y = self.infer(x)?;
        self.input = Some(x.clone());
        Ok(y)
    }

    /// The forward pass without caching anything (evaluation).
    pub fn infer(&self, x: &Mat) -> Result<Mat> {
        self.check_self("Linear::forward")?;
        x.check_input("Linear::forward", "x", self.in_features())?;
        let (out, inp) = (self.out_features(), self.in_features());
        let mut y = Mat::zeros(x.rows, out);
        let beta = match &self.bias {
            Some(b) => {
                y.data
                    .chunks_exact_mut(out)
                    .for_each(|row| row.copy_from_slice(&b.value));
                1.0
            }
            None => 0.0,
        };
        let w = MatRef::row_major(&self.weight.value, out, inp);
        f32::gemm(1.0, x.view(), w.t(), beta, &mut y.data);
        Ok(y)
    }

    /// Given `dL/dy` (`batch x out`), adds `dL/dW = grad_out^T x` and `dL/db = sum_rows
    /// grad_out` to the parameter gradients and returns `dL/dx = grad_out W`.
    pub fn backward(&mut self, grad_out: &Mat) -> Result<Mat> {
        // Asked for, the input gradient is always there.
        self.backward_with(grad_out, true)
            .map(|g| g.unwrap_or_else(|| Mat::zeros(0, 0)))
    }

    /// [`backward`](Self::backward); `dL/dx` (one more GEMM) only when `want_input`.
    pub(crate) fn backward_with(
        &mut self,
        grad_out: &Mat,
        want_input: bool,
    ) -> Result<Option<Mat>> {
        const OP: &str = "Linear::backward";
        self.check_self(OP)?;
        let x = self
            .input
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "self", "backward called before forward"))?;
        grad_out.check_input(OP, "grad_out", self.out_features())?;
        if x.cols != self.in_features() {
            return Err(Error::invalid(
                OP,
                "weight",
                "its shape changed since the forward pass",
            ));
        }
        if grad_out.rows != x.rows {
            return Err(Error::shape(
                OP,
                "grad_out",
                &grad_out.shape(),
                format!(
                    "({}, {}) like the forward output",
                    x.rows,
                    self.out_features()
                ),
            ));
        }
        let (out, inp) = (self.out_features(), self.in_features());
        f32::gemm(
            1.0,
            grad_out.view().t(),
            x.view(),
            1.0,
            &mut self.weight.grad,
        );
        if let Some(b) = &mut self.bias {
            for row in grad_out.data.chunks_exact(out) {
                b.grad.iter_mut().zip(row).for_each(|(g, &d)| *g += d);
            }
        }
        if !want_input {
            return Ok(None);
        }
        let mut grad_in = Mat::zeros(x.rows, inp);
        let w = MatRef::row_major(&self.weight.value, out, inp);
        f32::gemm(1.0, grad_out.view(), w, 0.0, &mut grad_in.data);
        Ok(Some(grad_in))
    }

    /// Parameters in PyTorch order: weight, then bias.
    pub fn params(&self) -> Vec<&Param> {
        std::iter::once(&self.weight).chain(&self.bias).collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        std::iter::once(&mut self.weight)
            .chain(&mut self.bias)
            .collect()
    }

    /// Parameters are public, so a caller may have resized them: check before the GEMM (whose
    /// wrapper panics on inconsistent views).
    fn check_self(&self, op: &'static str) -> Result<()> {
        let w = &self.weight;
        let bad_weight = w.shape.len() != 2
            || w.value.len() != w.shape.iter().product::<usize>()
            || w.grad.len() != w.value.len();
        if bad_weight {
            return Err(Error::shape(
                op,
                "weight",
                &[w.value.len(), w.grad.len()],
                format!("value and grad of shape {:?}", w.shape),
            ));
        }
        if let Some(b) = &self.bias {
            if b.value.len() != w.shape[0] || b.grad.len() != w.shape[0] {
                return Err(Error::shape(
                    op,
                    "bias",
                    &[b.value.len(), b.grad.len()],
                    format!("value and grad of {} elements", w.shape[0]),
                ));
            }
        }
        Ok(())
    }
}
