//! NT-Xent (SimCLR): `z` is 2N x D, rows `i` and `i + N` are two views of sample `i`; cosine
//! similarity, self excluded, mean over the 2N rows.

use super::infonce::{
    kernel_forward, InfoNceOptions, SoftmaxForward, SoftmaxSaved, GRADIENT_BLAME, TEMPERATURE_BLAME,
};
use super::{
    check_grad_loss, check_host_finite, check_result, check_scalar_result,
    check_softmax_temperature, compute_dtype, host_loss, kernel_grads, matrix_dims, output_like,
    state_like, upload_features, values, with_cpu_real, Fingerprint, Origin,
};
use crate::checks::Recorder;
use crate::kernels::{self, run_on_kernels, Backend, Operand};
use crate::{cpu, Error, Result, Tensor};

/// NT-Xent as the kernels see it: InfoNCE of z against itself, cosine, self excluded.
fn kernel_options(opts: &NtXentOptions) -> InfoNceOptions {
    InfoNceOptions {
        temperature: opts.temperature,
        normalize: true,
        self_mask: true,
    }
}

/// z (one operand: it is both q and k) and the positive indices as kernel buffers.
struct SymmetricInputs<'t, B: Backend> {
    z: Operand<'t, B::Buf>,
    positives: B::Buf,
}

impl<'t, B: Backend> SymmetricInputs<'t, B> {
    /// z where it is (copied in from the host), its scan recorded, and the positives
    /// `(i + N) mod 2N` built on the device.
    fn new(b: &B, rec: &mut Recorder<'_, B>, z: &'t Tensor, rows: usize) -> Result<Self> {
        let inputs = SymmetricInputs {
            z: upload_features(b, "z", z)?,
            positives: kernels::elementwise::index_ring(b, rows, rows / 2)?,
        };
        rec.input("z", z, &inputs.z)?;
        Ok(inputs)
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
    /// The mean loss, a 0-d f64 tensor on z's device.
    pub loss: Tensor,
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
    check_host_finite(op, "z", z)?;
    Ok((rows, dim))
}

/// The origin of ntxent's saved state.
fn origin(z: &Tensor, opts: &NtXentOptions) -> Origin {
    Origin::new(OP, opts, Fingerprint::new().tensor(z))
}

/// The NT-Xent forward: the mean loss and the per-row log-sum-exp for [`ntxent_backward`].
pub fn ntxent_forward(z: &Tensor, opts: &NtXentOptions) -> Result<SoftmaxForward> {
    let (rows, dim) = validate(OP, z, opts)?;
    run_on_kernels!(z.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = SymmetricInputs::new(b, &mut rec, z, rows)?;
        let (row_loss, lse) = inputs.problem(rows, dim, opts).forward(b)?;
        kernel_forward(b, rec, row_loss, lse, rows as f64, origin(z, opts))
    });
    with_cpu_real!(z.dtype(), T => {
        let zv = values::<T>(z)?;
        let positives = cpu::infonce::ntxent_positives(rows);
        let (loss, lse) = cpu::infonce::ntxent_problem(&zv, rows, dim, &positives, opts.temperature).forward();
        SoftmaxSaved::checked(OP, loss, state_like(z, lse, &[rows])?, origin(z, opts), TEMPERATURE_BLAME)
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
    run_on_kernels!(z.device(), b => {
        let mut rec = Recorder::new(b, BACKWARD)?;
        let inputs = SymmetricInputs::new(b, &mut rec, z, rows)?;
        let lse = saved.operand(b, &mut rec)?;
        let (dz, _) = inputs.problem(rows, dim, opts).backward(b, &lse, grad_loss)?;
        let ((), [grad_z]) = kernel_grads(b, rec, [("grad_z", dz, z)], GRADIENT_BLAME, |rec| Ok(((), rec.finish()?)))?;
        Ok(grad_z)
    });
    with_cpu_real!(z.dtype(), T => {
        let zv = values::<T>(z)?;
        let positives = cpu::infonce::ntxent_positives(rows);
        let problem = cpu::infonce::ntxent_problem(&zv, rows, dim, &positives, opts.temperature);
        let grad = cpu::infonce::ntxent_backward(&problem, &saved.lse.to_vec_f64()?, grad_loss);
        let grad = output_like(z, grad, z.shape())?;
        check_result(BACKWARD, "grad_z", &grad, GRADIENT_BLAME)?;
        Ok(grad)
    })
}

/// NT-Xent loss and gradient in one call (on a kernel device: one normalization, the forward
/// and the backward, with no copy to or from the host).
pub fn ntxent(z: &Tensor, opts: &NtXentOptions) -> Result<NtXentOutput> {
    // Validated once; no saved state to fingerprint or verify.
    let (rows, dim) = validate(OP, z, opts)?;
    run_on_kernels!(z.device(), b => {
        let mut rec = Recorder::new(b, OP)?;
        let inputs = SymmetricInputs::new(b, &mut rec, z, rows)?;
        let sweep = inputs.problem(rows, dim, opts).forward_backward(b)?;
        rec.result("lse", TEMPERATURE_BLAME, &sweep.lse, 1)?;
        let row_loss = sweep.row_loss;
        let finish = |rec: Recorder<'_, _>| rec.finish_loss(&row_loss, rows as f64, TEMPERATURE_BLAME);
        let grads = [("grad_z", sweep.grad_q, z)];
        let (loss, [grad_z]) = kernel_grads(b, rec, grads, GRADIENT_BLAME, finish)?;
        Ok(NtXentOutput { loss, grad_z })
    });
    // One sweep for loss and gradient (see cpu::softmax::forward_backward).
    with_cpu_real!(z.dtype(), T => {
        let zv = values::<T>(z)?;
        let positives = cpu::infonce::ntxent_positives(rows);
        let problem = cpu::infonce::ntxent_problem(&zv, rows, dim, &positives, opts.temperature);
        let (loss, grad) = cpu::infonce::ntxent_forward_backward(&problem, 1.0);
        check_scalar_result(OP, "loss", loss, TEMPERATURE_BLAME)?;
        let grad_z = output_like(z, grad, z.shape())?;
        check_result(OP, "grad_z", &grad_z, GRADIENT_BLAME)?;
        Ok(NtXentOutput { loss: host_loss(loss, z.device())?, grad_z })
    })
}
