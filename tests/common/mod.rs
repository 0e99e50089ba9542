//! Helpers shared by the kernel test files: the kernel devices of this machine and the
//! comparison of a device's outputs with the CPU backend computed in f64 on the same inputs.
#![allow(dead_code)] // each test file uses a subset

use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Largest accepted `||device - cpu|| / max(||cpu||, 1e-12)` for every output.
pub const TOL: f64 = 1e-4;

/// The devices that run kernels here: the interpreted mode always, GPU 0 when it is usable.
pub fn kernel_devices(test: &str) -> Vec<Device> {
    let mut devices = vec![Device::Interp];
    let cuda = Device::Cuda(0);
    match device_available(cuda) {
        Ok(()) => devices.push(cuda),
        Err(reason) => println!("{test}: skipped on {cuda}: {reason}"),
    }
    devices
}

/// Runs `check` once per kernel device.
pub fn on_kernel_devices(test: &str, check: fn(Device)) {
    for device in kernel_devices(test) {
        println!("{test}: running on {device}");
        check(device);
    }
}

/// `||a - b|| / max(||b||, 1e-12)` (`b` is the reference); NaN anywhere or a length mismatch gives
/// infinity, so it can never pass.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max(1e-12)
}

/// `values` as an f64 tensor of `shape` on the CPU.
pub fn t64(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, Device::Cpu).unwrap()
}

/// `values` as an f32 tensor of `shape` on the CPU.
pub fn t32(values: &[f64], shape: &[usize]) -> Tensor {
    t64(values, shape).to_dtype(DType::F32).unwrap()
}

/// The values of `t` as f64.
pub fn v64(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// d f / d x by central differences with h = 1e-6.
pub fn numeric_grad(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
    const H: f64 = 1e-6;
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + H;
            let up = f(&probe);
            probe[i] = x[i] - H;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// A `rows x cols` matrix (row-major) of uniform values in [-1, 1).
pub fn random_matrix(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|_| (2.0 * rng.random::<f64>() - 1.0) as f32)
        .collect()
}

/// Rows near one random centre per cluster (`cluster[r]` of row r), so rows of a cluster have
/// large logits with each other: centre + `noise` x uniform noise in [-1, 1].
pub fn clustered_rows(rng: &mut StdRng, cluster: &[usize], d: usize, noise: f32) -> Vec<f32> {
    let clusters = cluster.iter().max().map_or(0, |&c| c + 1);
    let centres = random_matrix(rng, clusters, d);
    let jitter = random_matrix(rng, cluster.len(), d);
    cluster
        .iter()
        .enumerate()
        .flat_map(|(r, &c)| (0..d).map(move |j| (r, c, j)))
        .map(|(r, c, j)| centres[c * d + j] + noise * jitter[r * d + j])
        .collect()
}

/// Like [`random_matrix`], except that with one feature (`cols == 1`) the entries are signed powers
/// of two. Then f32 normalization is exact (y = +-1) and the gradient through it, exactly 0 in every
/// precision, comes out exactly 0 rather than as f32 rounding noise, which no relative tolerance
/// against an all-zero reference accepts. Used wherever a gradient passes through normalization.
pub fn feature_matrix(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f32> {
    if cols != 1 {
        return random_matrix(rng, rows, cols);
    }
    (0..rows)
        .map(|_| {
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            sign * 2f32.powi(rng.random_range(-3..3))
        })
        .collect()
}

/// One positive key in `0..cols` per query; with `self_mask`, never the query's own index.
pub fn random_positives(rng: &mut StdRng, rows: usize, cols: usize, self_mask: bool) -> Vec<usize> {
    (0..rows)
        .map(|i| {
            if self_mask {
                let p = rng.random_range(0..cols - 1);
                if p >= i {
                    p + 1
                } else {
                    p
                }
            } else {
                rng.random_range(0..cols)
            }
        })
        .collect()
}

/// The named outputs of one op call, flattened to f64 (a scalar loss is a one-element vector).
pub type Outputs = Vec<(&'static str, Vec<f64>)>;

/// One input matrix: f32 values and their shape.
pub type Input<'a> = (&'a [f32], &'a [usize]);

/// Runs `op` on the CPU with f64 copies of `inputs` (the reference) and on `device` with the f32
/// `inputs`, checks that every output of the device is within `TOL` of the reference, and returns
/// the device's outputs.
#[track_caller]
pub fn compare_with_cpu(
    device: Device,
    case: &str,
    inputs: &[Input],
    op: impl Fn(&[Tensor]) -> Result<Outputs>,
) -> Outputs {
    compare_with_cpu_within(device, case, inputs, TOL, op)
}

/// [`compare_with_cpu`] with a tolerance of its own.
#[track_caller]
pub fn compare_with_cpu_within(
    device: Device,
    case: &str,
    inputs: &[Input],
    tolerance: f64,
    op: impl Fn(&[Tensor]) -> Result<Outputs>,
) -> Outputs {
    let run = |on: Device| {
        let tensors: Vec<Tensor> = inputs
            .iter()
            .map(|&(values, shape)| {
                let tensor = if on == Device::Cpu {
                    Tensor::from_vec(values.iter().map(|&v| v as f64).collect(), shape, on)
                } else {
                    Tensor::from_vec(values.to_vec(), shape, on)
                };
                tensor.unwrap_or_else(|e| panic!("{case}: input on {on}: {e}"))
            })
            .collect();
        op(&tensors).unwrap_or_else(|e| panic!("{case} on {on}: {e}"))
    };
    let want = run(Device::Cpu);
    let got = run(device);
    let names = |o: &Outputs| o.iter().map(|(name, _)| *name).collect::<Vec<_>>();
    assert_eq!(
        names(&got),
        names(&want),
        "{case}: outputs differ between {device} and cpu"
    );
    let mut worst = 0.0f64;
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        let err = rel_err(g, w);
        assert!(
            err <= tolerance,
            "{case} on {device}: `{name}` relative error {err:e} > {tolerance:e} against the cpu (f64)"
        );
        worst = worst.max(err);
    }
    println!("  {device} {case}: worst relative error {worst:.2e}");
    got
}

/// The output named `name`.
pub fn output<'a>(outputs: &'a Outputs, name: &str) -> &'a [f64] {
    &outputs
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no output `{name}`"))
        .1
}

pub fn scaled(values: &[f64], factor: f64) -> Vec<f64> {
    values.iter().map(|v| v * factor).collect()
}

/// A version 1.0 `.npy` file with the header dict `dict` (padded like numpy) and `payload`.
pub fn npy(dict: &str, payload: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// A little-endian f8 `.npy` of `shape` (a Python tuple, e.g. `(3,)`) holding `values`.
pub fn f8_npy(shape: &str, values: &[f64]) -> Vec<u8> {
    let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy(
        &format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"),
        &payload,
    )
}

/// An op under test: the tensors in, every output out.
pub type TestOp = Box<dyn Fn(&[Tensor]) -> Result<Outputs>>;

/// One case of the softmax-loss family for the precision tests (kernels_half, kernels_tf32): its
/// name, its inputs (values and shape) and the op, forward and backward, with every output.
pub struct LossCase {
    pub name: String,
    pub inputs: Vec<(Vec<f32>, Vec<usize>)>,
    pub op: TestOp,
}

impl LossCase {
    pub fn input_refs(&self) -> Vec<Input<'_>> {
        self.inputs
            .iter()
            .map(|(values, shape)| (values.as_slice(), shape.as_slice()))
            .collect()
    }
}

/// InfoNCE of `n` queries against `m` keys: cosine with tau = 0.1, or raw dot products with
/// tau = 1 (logits of uniform rows then spread by sqrt(D / 9), so each row's lse depends on
/// which keys it met).
pub fn infonce_case(rng: &mut StdRng, n: usize, m: usize, d: usize, normalize: bool) -> LossCase {
    let q = random_matrix(rng, n, d);
    let k = random_matrix(rng, m, d);
    let positives = random_positives(rng, n, m, false);
    let opts = InfoNceOptions {
        temperature: if normalize { 0.1 } else { 1.0 },
        normalize,
        self_mask: false,
    };
    LossCase {
        name: format!("infonce {n}x{m}x{d} normalize={normalize}"),
        inputs: vec![(q, vec![n, d]), (k, vec![m, d])],
        op: Box::new(move |t| {
            let out = infonce(&t[0], &t[1], &positives, &opts)?;
            loss_outputs(
                &out.loss,
                &[("grad_q", &out.grad_q), ("grad_k", &out.grad_k)],
                &[],
            )
        }),
    }
}

/// NT-Xent of `rows` rows whose two views are close (large positive logits, so a lost target
/// term shows in the loss), tau = 0.2.
pub fn ntxent_case(rng: &mut StdRng, rows: usize, d: usize) -> LossCase {
    let cluster: Vec<usize> = (0..rows).map(|i| i % (rows / 2)).collect();
    let z = clustered_rows(rng, &cluster, d, 0.3);
    let opts = NtXentOptions { temperature: 0.2 };
    LossCase {
        name: format!("ntxent {rows}x{d}"),
        inputs: vec![(z, vec![rows, d])],
        op: Box::new(move |t| {
            let out = ntxent(&t[0], &opts)?;
            loss_outputs(&out.loss, &[("grad_z", &out.grad_z)], &[])
        }),
    }
}

/// The InfoNCE family's four instantiated losses at `d` features, each with the name its
/// per-loss kernels carry (`infonce_fwd_<path>_<loss>_<type>`): NT-Xent of 130 rows (three row
/// tiles), SupCon of 45 samples x 3 views, CLIP of 130 pairs, InfoNCE of 70 x 150, normalized.
pub fn fixed_loss_cases(rng: &mut StdRng, d: usize) -> [(&'static str, LossCase); 4] {
    [
        ("ntxent", ntxent_case(rng, 130, d)),
        ("supcon", supcon_case(rng, 45, 3, d)),
        ("clip", clip_case(rng, 130, d)),
        ("infonce", infonce_case(rng, 70, 150, d, true)),
    ]
}

/// CLIP of `n` pairs at the CLIP init scale (1 / 0.07).
pub fn clip_case(rng: &mut StdRng, n: usize, d: usize) -> LossCase {
    let a = random_matrix(rng, n, d);
    let b = random_matrix(rng, n, d);
    LossCase {
        name: format!("clip {n}x{d}"),
        inputs: vec![(a, vec![n, d]), (b, vec![n, d])],
        op: Box::new(|t| {
            let out = clip(&t[0], &t[1], (1.0f64 / 0.07).ln())?;
            loss_outputs(
                &out.loss,
                &[("grad_a", &out.grad_a), ("grad_b", &out.grad_b)],
                &[("grad_log_scale", &out.grad_log_scale)],
            )
        }),
    }
}

/// MoCo of `n` queries against a `queue_len`-key queue, tau = 0.2.
pub fn moco_case(rng: &mut StdRng, n: usize, queue_len: usize, d: usize) -> LossCase {
    let q = random_matrix(rng, n, d);
    let k = random_matrix(rng, n, d);
    let queue = random_matrix(rng, queue_len, d);
    let opts = MocoOptions { temperature: 0.2 };
    LossCase {
        name: format!("moco {n}x{queue_len}x{d}"),
        inputs: vec![
            (q, vec![n, d]),
            (k, vec![n, d]),
            (queue, vec![queue_len, d]),
        ],
        op: Box::new(move |t| {
            let out = moco(&t[0], &t[1], &t[2], &opts)?;
            loss_outputs(&out.loss, &[("grad_q", &out.grad_q)], &[])
        }),
    }
}

/// SupCon of `samples` x `views` rows in 5 classes, each view near its class's centre
/// (closer views make the gradient a small difference of large terms, which a bf16 backward
/// product cannot resolve to 2e-2), tau = 0.1.
pub fn supcon_case(rng: &mut StdRng, samples: usize, views: usize, d: usize) -> LossCase {
    let labels: Vec<i64> = (0..samples as i64).map(|i| i % 5).collect();
    let classes: Vec<usize> = (0..samples * views).map(|r| (r / views) % 5).collect();
    let features = clustered_rows(rng, &classes, d, 1.0);
    let opts = SupConOptions {
        temperature: 0.1,
        base_temperature: 0.07,
        ..Default::default()
    };
    LossCase {
        name: format!("supcon {samples}x{views}x{d}"),
        inputs: vec![(features, vec![samples, views, d])],
        op: Box::new(move |t| {
            let out = supcon(&t[0], &labels, &opts)?;
            loss_outputs(&out.loss, &[("grad_features", &out.grad_features)], &[])
        }),
    }
}

/// SigLIP of `n` pairs, cosine, at log_scale ln 10 and bias -10 (the paper's initial values).
pub fn siglip_case(rng: &mut StdRng, n: usize, d: usize) -> LossCase {
    let a = random_matrix(rng, n, d);
    let b = random_matrix(rng, n, d);
    LossCase {
        name: format!("siglip {n}x{d}"),
        inputs: vec![(a, vec![n, d]), (b, vec![n, d])],
        op: Box::new(|t| {
            let out = siglip(&t[0], &t[1], 10f64.ln(), -10.0, &SigLipOptions::default())?;
            loss_outputs(
                &out.loss,
                &[("grad_a", &out.grad_a), ("grad_b", &out.grad_b)],
                &[
                    ("grad_log_scale", &out.grad_log_scale),
                    ("grad_bias", &out.grad_bias),
                ],
            )
        }),
    }
}

/// What a loss case compares: its loss, then each named tensor's values and each named scalar
/// (a scalar must hold one value).
pub fn loss_outputs(
    loss: &Tensor,
    tensors: &[(&'static str, &Tensor)],
    scalars: &[(&'static str, &Tensor)],
) -> Result<Outputs> {
    let mut out = vec![("loss", vec![loss.to_scalar()?])];
    for &(name, tensor) in tensors {
        out.push((name, tensor.to_vec_f64()?));
    }
    for &(name, scalar) in scalars {
        out.push((name, vec![scalar.to_scalar()?]));
    }
    Ok(out)
}

/// On the interpreted mode, which records its launches, asserts that `kernel` is among them (a GPU
/// runs the same host-side choice of kernel).
#[track_caller]
pub fn assert_ran_on_interp(device: Device, launched: &[&str], kernel: &str, case: &str) {
    if device == Device::Interp {
        assert!(
            launched.contains(&kernel),
            "{case}: {kernel} did not run: {launched:?}"
        );
    }
}

/// Asserts that the InfoNCE forward and backward that ran (`launched`) are the resident
/// instantiations (the forward's for InfoNCE, `infonce_fwd_resident_infonce_{suffix}`, and
/// `infonce_bwd_resident_{suffix}`) or the plain ones, as expected.
#[track_caller]
pub fn assert_resident_kernels(
    launched: &[&str],
    case: &str,
    suffix: &str,
    forward: bool,
    backward: bool,
) {
    for (pass, resident) in [("fwd", forward), ("bwd", backward)] {
        let want = match resident {
            true if pass == "fwd" => format!("infonce_fwd_resident_infonce_{suffix}"),
            true => format!("infonce_{pass}_resident_{suffix}"),
            false => format!("infonce_{pass}_{suffix}"),
        };
        assert!(
            launched.iter().any(|k| *k == want),
            "{case}: {want} did not run: {launched:?}"
        );
    }
}

/// The kernel names of `launches`.
pub fn kernel_names(launches: &[testing::LaunchRecord]) -> Vec<&'static str> {
    launches.iter().map(|launch| launch.kernel).collect()
}

/// While it lives, the interpreted mode answers on this thread as a device that runs a given
/// number of blocks at once (`testing::model_concurrent_blocks`), so the launch layer makes the
/// choices against the wave tail that it makes on a GPU; dropping it restores the setting.
pub struct ModelledDevice(Option<usize>);

impl ModelledDevice {
    pub fn running(blocks: usize) -> Self {
        ModelledDevice(testing::model_concurrent_blocks(Some(blocks)))
    }
}

impl Drop for ModelledDevice {
    fn drop(&mut self) {
        testing::model_concurrent_blocks(self.0);
    }
}

/// While it lives, the interpreted mode answers on this thread as a Hopper GPU
/// (`testing::model_hopper`): the launch layer picks the sm_90a kernels, whose wgmma it emulates;
/// dropping it restores the setting.
pub struct ModelledHopper(bool);

impl ModelledHopper {
    pub fn on() -> Self {
        ModelledHopper(testing::model_hopper(true))
    }
}

impl Drop for ModelledHopper {
    fn drop(&mut self) {
        testing::model_hopper(self.0);
    }
}

/// A loss whose kernels cut their rows of key tiles into ranges on a modelled device.
pub struct SplitCase {
    /// The blocks the modelled device runs at once.
    pub blocks: usize,
    pub case: LossCase,
    /// Each sweep kernel, by the start of its name, with the grid it must run on (the key
    /// ranges along y).
    pub grids: Vec<(&'static str, [u32; 3])>,
}

impl SplitCase {
    /// The sweep kernels' names (starts), as the precision tests' `sweeps`.
    pub fn sweeps(&self) -> Vec<&'static str> {
        self.grids.iter().map(|&(sweep, _)| sweep).collect()
    }
}

/// The split cases. 450 rows: 8 row tiles; at 24 blocks the symmetric forward's half-rows of 5
/// (lower half) and 4 (upper half) tiles take ranges of 2, 3 per row, the upper half's third one
/// empty; rows of 8 tiles (the backwards, CLIP's forward, SigLIP) take 3 ranges of 3 (the last one
/// 2), and InfoNCE's rows of 5 keys 3 ranges of 2. 520 rows: 9 tiles; at 18 blocks the forward's
/// ranges of 3 (the second starts 3 tiles on and holds 2), the backward's of 5. MoCo, 70 queries
/// against 700 keys (2 row tiles, 11 key tiles): at 8 blocks 4 ranges of 3, the last one 2.
pub fn split_cases(rng: &mut StdRng, d: usize) -> Vec<SplitCase> {
    let softmax = |blocks, case, forward, backward| SplitCase {
        blocks,
        case,
        grids: vec![("infonce_fwd", forward), ("infonce_bwd", backward)],
    };
    vec![
        softmax(24, ntxent_case(rng, 450, d), [8, 3, 1], [8, 3, 1]),
        softmax(24, supcon_case(rng, 150, 3, d), [8, 3, 1], [8, 3, 1]),
        softmax(24, clip_case(rng, 450, d), [8, 3, 1], [8, 3, 1]),
        softmax(
            24,
            infonce_case(rng, 450, 300, d, true),
            [8, 3, 1],
            [8, 3, 1],
        ),
        softmax(18, ntxent_case(rng, 520, d), [9, 2, 1], [9, 2, 1]),
        softmax(8, moco_case(rng, 70, 700, d), [2, 4, 1], [2, 4, 1]),
        SplitCase {
            blocks: 24,
            case: siglip_case(rng, 450, d),
            grids: vec![("siglip_sweep", [8, 3, 1])],
        },
    ]
}

/// Runs `compare` (a precision test's comparison with the CPU, returning the device's launches)
/// on each of the split cases (`d` features, inputs from `seed`) on its modelled device, and
/// asserts that each sweep ran once, on its grid.
pub fn check_split_cases(
    seed: u64,
    d: usize,
    what: &str,
    compare: impl Fn(&SplitCase) -> Vec<testing::LaunchRecord>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    for split in split_cases(&mut rng, d) {
        let _device = ModelledDevice::running(split.blocks);
        let launches = compare(&split);
        assert_split_grids(&launches, &split, &format!("{} {what}", split.case.name));
    }
}

/// Asserts that each of `split`'s sweeps ran once among `launches`, on its grid.
#[track_caller]
fn assert_split_grids(launches: &[testing::LaunchRecord], split: &SplitCase, what: &str) {
    for &(prefix, grid) in &split.grids {
        let sweeps: Vec<_> = launches
            .iter()
            .filter(|launch| launch.kernel.starts_with(prefix))
            .collect();
        assert!(
            sweeps.len() == 1 && sweeps[0].grid == grid,
            "{what}: want one {prefix}* on grid {grid:?}, got {sweeps:?}"
        );
    }
}
