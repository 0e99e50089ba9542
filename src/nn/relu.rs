//! Rectified linear unit `max(x, 0)`.

use crate::nn::Mat;
use crate::{Error, Result};

/// ReLU. The gradient at exactly 0 is taken as 0, like PyTorch.
#[derive(Clone, Debug, Default)]
pub struct Relu {
    /// Which inputs of the last forward were positive (`rows x cols`).
    mask: Option<(usize, usize, Vec<bool>)>,
}

impl Relu {
    pub fn new() -> Self {
        Relu::default()
    }

    /// `max(x, 0)`; remembers where `x > 0` for `backward`.
    pub fn forward(&mut self, x: &Mat) -> Result<Mat> {
        let y = Self::infer(x)?;
        self.mask = Some((x.rows, x.cols, x.data.iter().map(|&v| v > 0.0).collect()));
        Ok(y)
    }

    /// `max(x, 0)` without caching anything (evaluation).
    pub fn infer(x: &Mat) -> Result<Mat> {
        x.check_input("Relu::forward", "x", x.cols)?;
        Ok(Mat {
            rows: x.rows,
            cols: x.cols,
            // `v <= 0` is false for NaN, so a NaN passes through instead of being hidden.
            data: x
                .data
                .iter()
                .map(|&v| if v <= 0.0 { 0.0 } else { v })
                .collect(),
        })
    }

    /// `grad_out` where the forward input was positive, 0 elsewhere.
    pub fn backward(&mut self, grad_out: &Mat) -> Result<Mat> {
        const OP: &str = "Relu::backward";
        let (rows, cols, mask) = self
            .mask
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "self", "backward called before forward"))?;
        grad_out.check_input(OP, "grad_out", *cols)?;
        if grad_out.rows != *rows {
            return Err(Error::shape(
                OP,
                "grad_out",
                &grad_out.shape(),
                format!("({rows}, {cols}) like the forward output"),
            ));
        }
        let data = grad_out
            .data
            .iter()
            .zip(mask)
            .map(|(&g, &on)| if on { g } else { 0.0 })
            .collect();
        Ok(Mat {
            rows: *rows,
            cols: *cols,
            data,
        })
    }
}
