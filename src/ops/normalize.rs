//! Row-wise L2 normalization: `y = x / max(||x||_2, 1e-12)`.

use super::{
    check_host_finite, kernel_grads, kernel_output, matrix_dims, output_like, same_place,
    upload_f32, upload_features, values, with_cpu_real,
};
use crate::checks::Recorder;
use crate::kernels::{self, run_on_kernels};
use crate::{cpu, Result, Tensor};

const OP: &str = "normalize";

/// L2-normalizes each row of `x` (N x D). A zero row stays zero.
///
/// ```
/// use contra::{normalize, Device, Tensor};
/// let x = Tensor::from_vec(vec![3.0f32, 4.0, 0.0, 0.0], &[2, 2], Device::Cpu)?;
/// let y = normalize(&x)?;
/// assert_eq!(y.to_vec::<f32>()?, vec![0.6, 0.8, 0.0, 0.0]);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let (_, dim) = matrix_dims(OP, "x", x)?;
    check_host_finite(OP, "x", x)?;
    run_on_kernels!(x.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let xb = upload_features(b, "x", x)?;
        rec.input("x", x, &xb)?;
        let y = kernels::normalize::forward(b, &xb, x.shape()[0], dim)?;
        let checks = rec.finish()?;
        Ok(kernel_output(b, x, y, x.shape())?.with_checks(&checks))
    });
    with_cpu_real!(x.dtype(), T => {
        let y = cpu::normalize::forward::<T>(&values::<T>(x)?, dim);
        output_like(x, y, x.shape())
    })
}

/// The gradient of [`normalize`] with respect to `x`, given the upstream gradient `grad_y`:
/// `dx = (dy - y (y . dy)) / max(||x||, 1e-12)`.
pub fn normalize_backward(x: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
    const BACKWARD: &str = "normalize_backward";
    let (_, dim) = matrix_dims(BACKWARD, "x", x)?;
    same_place(BACKWARD, &[("x", x), ("grad_y", grad_y)])?;
    super::expect_shape(BACKWARD, "grad_y", grad_y, x.shape())?;
    check_host_finite(BACKWARD, "x", x)?;
    check_host_finite(BACKWARD, "grad_y", grad_y)?;
    // dx scales as grad_y / ||x|| (with ||x|| clamped at 1e-12): it can overflow.
    const BLAME: &str = "the gradient scales as `grad_y` / max(||x||, 1e-12); scale `grad_y` \
                         down or compute in f64 on Device::Cpu";
    run_on_kernels!(x.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let (xb, gyb) = (upload_features(b, "x", x)?, upload_f32(b, "grad_y", grad_y)?);
        rec.input("x", x, &xb)?;
        rec.input("grad_y", grad_y, &gyb)?;
        let gx = kernels::normalize::backward(b, &xb, &gyb, x.shape()[0], dim)?;
        let finish = |rec: Recorder<'_, _>| Ok(((), rec.finish()?));
        let ((), [grad_x]) = kernel_grads(b, rec, [("grad_x", gx, x)], BLAME, finish)?;
        Ok(grad_x)
    });
    with_cpu_real!(x.dtype(), T => {
        let gx = cpu::normalize::backward::<T>(&values::<T>(x)?, &values::<T>(grad_y)?, dim);
        let grad_x = output_like(x, gx, x.shape())?;
        super::check_result(BACKWARD, "grad_x", &grad_x, BLAME)?;
        Ok(grad_x)
    })
}
