//! A dense row-major f32 matrix: the activations and gradients that flow between layers.
//!
//! Layers see a batch as `rows = batch`, `cols = features`, so a linear layer is one GEMM and
//! per-feature statistics (BatchNorm) are column reductions.

use crate::cpu::gemm::{Gemm, MatRef};
use crate::{DType, Device, Error, Result, Tensor};

/// A `rows x cols` matrix stored row-major in `data` (`data.len() == rows * cols`).
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    /// A `rows x cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Wraps `data` (row-major); errors unless it holds exactly `rows * cols` values.
    pub fn from_vec(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::shape(
                "Mat::from_vec",
                "data",
                &[data.len()],
                format!("{rows} x {cols} elements"),
            ));
        }
        Ok(Mat { rows, cols, data })
    }

    /// Copies a rank-2 tensor (any dtype, converted to f32) into a matrix.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        if t.rank() != 2 {
            return Err(Error::shape(
                "Mat::from_tensor",
                "t",
                t.shape(),
                "a rank-2 tensor",
            ));
        }
        let data = t.to_dtype(DType::F32)?.to_vec::<f32>()?;
        Mat::from_vec(data, t.shape()[0], t.shape()[1])
    }

    /// Copies the matrix into a `[rows, cols]` f32 tensor on `device` (to feed the losses).
    pub fn to_tensor(&self, device: Device) -> Result<Tensor> {
        Tensor::from_slice(&self.data, &[self.rows, self.cols], device)
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Row `i`. Panics if `i >= rows`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Row `i`, mutable. Panics if `i >= rows`, like slice indexing.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// A borrowed GEMM view of the matrix.
    pub fn view(&self) -> MatRef<'_, f32> {
        MatRef::row_major(&self.data, self.rows, self.cols)
    }

    /// `self * b` (`rows x b.cols`).
    pub fn matmul(&self, b: &Mat) -> Result<Mat> {
        product("Mat::matmul", ["self", "b"], self.view(), b.view())
    }

    /// `self * b^T` (`rows x b.rows`): a batch times a `out x in` weight gives `batch x out`.
    pub fn matmul_t(&self, b: &Mat) -> Result<Mat> {
        product("Mat::matmul_t", ["self", "b^T"], self.view(), b.view().t())
    }

    /// `self^T * b` (`cols x b.cols`): the weight-gradient shape `grad_out^T * input`.
    pub fn t_matmul(&self, b: &Mat) -> Result<Mat> {
        product("Mat::t_matmul", ["self^T", "b"], self.view().t(), b.view())
    }

    /// Errors unless the matrix has `cols` columns and at least one row (what every layer
    /// needs from its input).
    pub(crate) fn check_input(
        &self,
        op: &'static str,
        arg: &'static str,
        cols: usize,
    ) -> Result<()> {
        if self.cols != cols {
            return Err(Error::shape(
                op,
                arg,
                &self.shape(),
                format!("(batch, {cols})"),
            ));
        }
        if self.rows == 0 {
            return Err(Error::Empty {
                op,
                arg,
                what: "batch of 0 rows".into(),
            });
        }
        if self.data.len() != self.rows * self.cols {
            return Err(Error::shape(
                op,
                arg,
                &[self.data.len()],
                format!("{} x {} elements", self.rows, self.cols),
            ));
        }
        Ok(())
    }
}

/// `a * b` for views whose inner extents and data lengths are checked here, so that the GEMM
/// wrapper (which panics on bad views) never sees user-made inconsistencies.
fn product(
    op: &'static str,
    names: [&'static str; 2],
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
) -> Result<Mat> {
    for (arg, v) in names.into_iter().zip([&a, &b]) {
        if v.data.len() != v.rows * v.cols {
            return Err(Error::shape(
                op,
                arg,
                &[v.data.len()],
                format!("{} x {} elements", v.rows, v.cols),
            ));
        }
    }
    if a.cols != b.rows {
        return Err(Error::shape(
            op,
            names[1],
            &[b.rows, b.cols],
            format!("{} rows (the columns of `{}`)", a.cols, names[0]),
        ));
    }
    let mut c = Mat::zeros(a.rows, b.cols);
    f32::gemm(1.0, a, b, 0.0, &mut c.data);
    Ok(c)
}
