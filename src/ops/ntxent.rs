//! NT-Xent (SimCLR): `z` is 2N x D, rows `i` and `i + N` are two views of sample `i`; cosine
//! similarity, self excluded, mean over the 2N rows.

use super::infonce::{
    InfoNceOptions, SoftmaxForward, SoftmaxSaved, GRADIENT_BLAME, TEMPERATURE_BLAME,
};
use super::{
    check_finite, check_grad_loss, check_result, check_scalar_result, check_softmax_temperature,
    compute_dtype, kernel_output, kernel_state, matrix_dims, output_like, state_like,
    upload_features, values, with_cpu_real, Fingerprint, Origin,
};
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, Device, Error, Result, Tensor};

/// NT-Xent as the kernels see it: InfoNCE of z against itself, cosine, self excluded.
fn kernel_options(opts: &NtXentOptions) -> InfoNceOptions {
    InfoNceOptions {
        temperature: opts.temperature,
        normalize: true,
        self_mask: true,
    }
}

/// z (uploaded once: it is both q and k) and the positive indices as kernel buffers.
struct SymmetricInputs<'t, B: Backend> {
    z: Operand<'t, B::Buf>,
    positives: B::Buf,
}

impl<'t, B: Backend> SymmetricInputs<'t, B> {
    fn upload(b: &B, z: &'t Tensor, rows: usize) -> Result<Self> {
        let positives: Vec<i32> = cpu::infonce::ntxent_positives(rows)
            .iter()
            .map(|&p| p as i32)
            .collect();
        Ok(SymmetricInputs {
            z: upload_features(b, "z", z)?,
            positives: b.upload_i32("positives", &positives)?,
        })
    }

    /// The kernels' problem: z against itself, symmetric (half the forward tiles, one backward
    /// product dz = (G + G^T) z).
    fn problem(
        &self,
        rows: usize,
        dim: usize,
        opts: &NtXentOptions,
    ) -> kernels::infonce::Problem<'_, B> {
        let options = kernel_options(opts);
        kernels::infonce::Problem {
            q: &self.z,
            k: &self.z,
            positives: &self.positives,
            rows,
            cols: rows,
            dim,
            temperature: options.temperature,
            normalize: options.normalize,
            self_mask: options.self_mask,
            symmetric: true,
        }
    }
}

const OP: &str = "ntxent";
const BACKWARD: &str = "ntxent_backward";

/// Options of [`ntxent`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NtXentOptions {
    /// Softmax temperature `tau` (> 0).
    pub temperature: f64,
}

impl Default for NtXentOptions {
    fn default() -> Self {
        NtXentOptions { temperature: 0.5 }
    }
}

/// Loss and gradient of [`ntxent`].
#[derive(Clone, Debug)]
pub struct NtXentOutput {
    pub loss: f64,
    pub grad_z: Tensor,
}

fn validate(op: &'static str, z: &Tensor, opts: &NtXentOptions) -> Result<(usize, usize)> {
    let (rows, dim) = matrix_dims(op, "z", z)?;
    if rows % 2 != 0 || rows < 2 {
        return Err(Error::shape(
            op,
            "z",
            z.shape(),
            "[2N, D]: an even number of rows (two views per sample)",
        ));
    }
    check_softmax_temperature(op, opts.temperature, compute_dtype(z.device(), z.dtype()))?;
    check_finite(op, "z", z)?;
    Ok((rows, dim))
}

/// The origin of ntxent's saved state.
fn origin(z: &Tensor, opts: &NtXentOptions) -> Origin {
    Origin::new(OP, opts, Fingerprint::new().tensor(z))
}

/// The NT-Xent forward: the mean loss and the per-row log-sum-exp for [`ntxent_backward`].
pub fn ntxent_forward(z: &Tensor, opts: &NtXentOptions) -> Result<SoftmaxForward> {
    let (rows, dim) = validate(OP, z, opts)?;
    let (loss, lse) = forward_lse(z, opts, rows, dim)?;
    SoftmaxSaved::checked(OP, loss, lse, origin(z, opts), TEMPERATURE_BLAME)
}

/// The loss and the per-row log-sum-exp, on validated inputs.
fn forward_lse(z: &Tensor, opts: &NtXentOptions, rows: usize, dim: usize) -> Result<(f64, Tensor)> {
    run_on_kernels!(z.device(), b => {
        let inputs = SymmetricInputs::upload(b, z, rows)?;
        let (loss, lse) = inputs.problem(rows, dim, opts).forward(b)?;
        Ok((loss, kernel_state(b, lse, &[rows])?))
    });
    with_cpu_real!(z.dtype(), T => {
        let zv = values::<T>(z)?;
        let positives = cpu::infonce::ntxent_positives(rows);
        let (loss, lse) = cpu::infonce::ntxent_problem(&zv, rows, dim, &positives, opts.temperature).forward();
        Ok((loss, state_like(z, lse, &[rows])?))
    })
}

/// The NT-Xent backward: the gradient of `grad_loss * loss` with respect to z.
pub fn ntxent_backward(
    z: &Tensor,
    opts: &NtXentOptions,
    saved: &SoftmaxSaved,
    grad_loss: f64,
) -> Result<Tensor> {
    let (rows, dim) = validate(BACKWARD, z, opts)?;
    saved.check(BACKWARD, &origin(z, opts), rows)?;
    check_grad_loss(BACKWARD, grad_loss, compute_dtype(z.device(), z.dtype()))?;
    let grad = input_grad(z, opts, rows, dim, &saved.lse, grad_loss)?;
    check_result(BACKWARD, "grad_z", &grad, GRADIENT_BLAME)?;
    Ok(grad)
}

/// dz from the forward's `lse`, on validated inputs.
fn input_grad(
    z: &Tensor,
    opts: &NtXentOptions,
    rows: usize,
    dim: usize,
    lse: &Tensor,
    grad_loss: f64,
) -> Result<Tensor> {
    run_on_kernels!(z.device(), b => {
        let inputs = SymmetricInputs::upload(b, z, rows)?;
        let lse = b.upload("lse", &values::<f32>(lse)?)?;
        let (dz, _) = inputs.problem(rows, dim, opts).backward(b, &lse, grad_loss)?;
        kernel_output(b, z, dz, z.shape())
    });
    with_cpu_real!(z.dtype(), T => {
        let zv = values::<T>(z)?;
        let positives = cpu::infonce::ntxent_positives(rows);
        let problem = cpu::infonce::ntxent_problem(&zv, rows, dim, &positives, opts.temperature);
        let grad = cpu::infonce::ntxent_backward(&problem, &lse.to_vec_f64()?, grad_loss);
        output_like(z, grad, z.shape())
    })
}

/// NT-Xent loss and gradient in one call.
pub fn ntxent(z: &Tensor, opts: &NtXentOptions) -> Result<NtXentOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let (rows, dim) = validate(OP, z, opts)?;
    let out = if z.device() == Device::Cpu {
        // One sweep for loss and gradient (see cpu::softmax::forward_backward).
        with_cpu_real!(z.dtype(), T => {
            let zv = values::<T>(z)?;
            let positives = cpu::infonce::ntxent_positives(rows);
            let problem = cpu::infonce::ntxent_problem(&zv, rows, dim, &positives, opts.temperature);
            let (loss, grad) = cpu::infonce::ntxent_forward_backward(&problem, 1.0);
            NtXentOutput { loss, grad_z: output_like(z, grad, z.shape())? }
        })
    } else {
        let (loss, lse) = forward_lse(z, opts, rows, dim)?;
        check_result(OP, "lse", &lse, TEMPERATURE_BLAME)?;
        let grad_z = input_grad(z, opts, rows, dim, &lse, 1.0)?;
        NtXentOutput { loss, grad_z }
    };
    check_scalar_result(OP, "loss", out.loss, TEMPERATURE_BLAME)?;
    check_result(OP, "grad_z", &out.grad_z, GRADIENT_BLAME)?;
    Ok(out)
}
