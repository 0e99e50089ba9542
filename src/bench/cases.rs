//! What the suite measures: the ops, their shapes, the flop model and the inputs.
//!
//! Inputs are a counter-based hash (splitmix64 of `seed * 2^32 + index`), so the reference script
//! (`bench/reference_torch.py`) builds exactly the same tensors and the losses of every
//! implementation can be compared within one run.

use std::fmt;

use serde_json::{json, Value};

use crate::shared::Mining;

use crate::{Error, Result};

/// One op of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// z (N x D), rows i and i + N/2 are positives, tau = 0.1.
    Ntxent,
    /// q (N x D) against k (M x D), positive of row i is key i, cosine, tau = 0.1.
    Infonce,
    /// a, b (N x D), log_scale = ln(1 / 0.07).
    Clip,
    /// a, b (N x D), cosine, log_scale = ln 10, bias = -10 (the SigLIP init).
    Siglip,
    /// q, k (N x D), queue (K x D), tau = 0.2.
    Moco,
    /// features (N x V x D), labels `i % C`, tau = 0.1, base tau = 0.07.
    Supcon,
    /// x (N x D), labels `i % C`, Euclidean, batch-hard, margin 0.2.
    Triplet,
    /// x1, x2 (N x D), y = i % 2, margin 1.
    Margin,
    /// s_pos (B), s_neg (B x k), log q = 0.5 u - ln k.
    Nce,
    /// x (N x D).
    Normalize,
    /// Cosine similarity of a (N x D) and b (M x D): the N x M matrix.
    Similarity,
    /// theta_k, theta_q (P), m = 0.999, in place.
    Momentum,
}

impl Op {
    pub const ALL: [Op; 12] = [
        Op::Ntxent,
        Op::Infonce,
        Op::Clip,
        Op::Siglip,
        Op::Moco,
        Op::Supcon,
        Op::Triplet,
        Op::Margin,
        Op::Nce,
        Op::Normalize,
        Op::Similarity,
        Op::Momentum,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Ntxent => "ntxent",
            Op::Infonce => "infonce",
            Op::Clip => "clip",
            Op::Siglip => "siglip",
            Op::Moco => "moco",
            Op::Supcon => "supcon",
            Op::Triplet => "triplet",
            Op::Margin => "margin",
            Op::Nce => "nce",
            Op::Normalize => "normalize",
            Op::Similarity => "similarity",
            Op::Momentum => "momentum",
        }
    }

    pub fn parse(name: &str) -> Result<Op> {
        Op::ALL
            .into_iter()
            .find(|op| op.name() == name)
            .ok_or_else(|| Error::invalid("bench", "op", format!("unknown op `{name}`")))
    }

    /// Ops with a backward pass (similarity is forward only, momentum is an in-place update).
    pub fn has_backward(self) -> bool {
        !matches!(self, Op::Similarity | Op::Momentum)
    }
}

/// Forward only, or forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    ForwardBackward,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::ForwardBackward => "fwd+bwd",
        }
    }

    pub fn parse(name: &str) -> Result<Pass> {
        match name {
            "fwd" => Ok(Pass::Forward),
            "fwd+bwd" => Ok(Pass::ForwardBackward),
            _ => Err(Error::invalid(
                "bench",
                "pass",
                format!("unknown pass `{name}`"),
            )),
        }
    }
}

/// A case's inputs and the arithmetic of its softmax-loss products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 inputs, exact f32 products (CUDA cores).
    F32,
    /// f32 inputs, products on the TF32 tensor cores ([`crate::F32Precision::Tf32`]; PyTorch's
    /// side runs with `allow_tf32`).
    Tf32,
    /// bf16 inputs (tensor cores).
    Bf16,
}

impl Precision {
    /// The name in case labels and JSON (`dtype`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn parse(name: &str) -> Option<Precision> {
        [Precision::F32, Precision::Tf32, Precision::Bf16]
            .into_iter()
            .find(|p| p.name() == name)
    }

    /// The library setting contra's side runs under.
    pub fn f32_precision(self) -> crate::F32Precision {
        match self {
            Precision::Tf32 => crate::F32Precision::Tf32,
            Precision::F32 | Precision::Bf16 => crate::F32Precision::Highest,
        }
    }
}

/// One measured case: an op, a pass and its sizes. Unused sizes are 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Case {
    pub op: Op,
    pub pass: Pass,
    /// Rows (N, or B for NCE, or P parameters for momentum).
    pub n: usize,
    /// Feature dimension D (0 for NCE and momentum).
    pub d: usize,
    /// Second size: M keys (InfoNCE, similarity), K queue entries (MoCo), k noise samples (NCE).
    pub k: usize,
    /// Views per sample (SupCon).
    pub v: usize,
    /// Classes (SupCon, triplet).
    pub c: usize,
    /// The inputs' type and the arithmetic of the softmax losses' products.
    pub precision: Precision,
    /// The triplet mining (batch-hard unless a triplet case says otherwise).
    pub mining: Mining,
}

/// A mining's name in case ids and JSON.
pub fn mining_name(mining: Mining) -> &'static str {
    match mining {
        Mining::BatchAll => "batch-all",
        Mining::BatchHard => "batch-hard",
        Mining::SemiHard => "semi-hard",
        Mining::SemiHardAll => "semi-hard-all",
    }
}

fn parse_mining(name: &str) -> Result<Mining> {
    [
        Mining::BatchAll,
        Mining::BatchHard,
        Mining::SemiHard,
        Mining::SemiHardAll,
    ]
    .into_iter()
    .find(|&m| mining_name(m) == name)
    .ok_or_else(|| Error::invalid("bench", "mining", format!("unknown mining `{name}`")))
}

impl Case {
    fn new(op: Op, pass: Pass, n: usize, d: usize) -> Case {
        Case {
            op,
            pass,
            n,
            d,
            k: 0,
            v: 0,
            c: 0,
            precision: Precision::F32,
            mining: Mining::BatchHard,
        }
    }

    /// The same case at `precision`.
    pub fn at(self, precision: Precision) -> Case {
        Case { precision, ..self }
    }

    /// What runs contra's side of the case on `device`: "cpu", or on a kernel device
    /// "tensor cores" (bf16 and tf32 softmax losses: mma.sync kernels) or "CUDA cores".
    pub fn engine(&self, device: crate::Device) -> &'static str {
        let softmax = matches!(
            self.op,
            Op::Ntxent | Op::Infonce | Op::Clip | Op::Siglip | Op::Moco | Op::Supcon
        );
        match device {
            crate::Device::Cpu => "cpu",
            _ if self.precision != Precision::F32 && softmax => "tensor cores",
            _ => "CUDA cores",
        }
    }

    pub fn ntxent(pass: Pass, n: usize, d: usize) -> Case {
        Case::new(Op::Ntxent, pass, n, d)
    }
    pub fn infonce(pass: Pass, n: usize, m: usize, d: usize) -> Case {
        Case {
            k: m,
            ..Case::new(Op::Infonce, pass, n, d)
        }
    }
    pub fn clip(pass: Pass, n: usize, d: usize) -> Case {
        Case::new(Op::Clip, pass, n, d)
    }
    pub fn siglip(pass: Pass, n: usize, d: usize) -> Case {
        Case::new(Op::Siglip, pass, n, d)
    }
    pub fn moco(pass: Pass, n: usize, queue: usize, d: usize) -> Case {
        Case {
            k: queue,
            ..Case::new(Op::Moco, pass, n, d)
        }
    }
    pub fn supcon(pass: Pass, n: usize, views: usize, d: usize, classes: usize) -> Case {
        Case {
            v: views,
            c: classes,
            ..Case::new(Op::Supcon, pass, n, d)
        }
    }
    pub fn triplet(pass: Pass, n: usize, d: usize, classes: usize) -> Case {
        Case {
            c: classes,
            ..Case::new(Op::Triplet, pass, n, d)
        }
    }
    /// A triplet case with another mining than batch-hard.
    pub fn triplet_mined(pass: Pass, n: usize, d: usize, classes: usize, mining: Mining) -> Case {
        Case {
            mining,
            ..Case::triplet(pass, n, d, classes)
        }
    }
    pub fn margin(pass: Pass, n: usize, d: usize) -> Case {
        Case::new(Op::Margin, pass, n, d)
    }
    pub fn nce(pass: Pass, b: usize, k: usize) -> Case {
        Case {
            k,
            ..Case::new(Op::Nce, pass, b, 0)
        }
    }
    pub fn normalize(pass: Pass, n: usize, d: usize) -> Case {
        Case::new(Op::Normalize, pass, n, d)
    }
    pub fn similarity(n: usize, m: usize, d: usize) -> Case {
        Case {
            k: m,
            ..Case::new(Op::Similarity, Pass::Forward, n, d)
        }
    }
    pub fn momentum(params: usize) -> Case {
        Case::new(Op::Momentum, Pass::Forward, params, 0)
    }

    /// The sizes as a short label, e.g. `N=4096 D=128` (with ` bf16` or ` tf32` unless exact
    /// f32).
    pub fn shape(&self) -> String {
        let dims = self.dims();
        match self.precision {
            Precision::F32 => dims,
            other => format!("{dims} {}", other.name()),
        }
    }

    fn dims(&self) -> String {
        let (n, d, k, v, c) = (self.n, self.d, self.k, self.v, self.c);
        match self.op {
            Op::Ntxent | Op::Clip | Op::Siglip | Op::Margin | Op::Normalize => {
                format!("N={n} D={d}")
            }
            Op::Infonce | Op::Similarity => format!("N={n} M={k} D={d}"),
            Op::Moco => format!("N={n} K={k} D={d}"),
            Op::Supcon => format!("N={n} V={v} D={d} C={c}"),
            // Batch-hard, the first triplet case, keeps its id without a suffix.
            Op::Triplet if self.mining == Mining::BatchHard => format!("N={n} D={d} C={c}"),
            Op::Triplet => format!("N={n} D={d} C={c} {}", mining_name(self.mining)),
            Op::Nce => format!("B={n} k={k}"),
            Op::Momentum => format!("P={n}"),
        }
    }

    /// `op pass shape`, unique within a run.
    pub fn id(&self) -> String {
        format!("{} {} {}", self.op.name(), self.pass.name(), self.shape())
    }

    /// Rows of the softmax (the N of an N x N logit matrix): N·V for SupCon, else N.
    fn softmax_rows(&self) -> usize {
        match self.op {
            Op::Supcon => self.n * self.v,
            _ => self.n,
        }
    }

    /// Nominal floating-point work per call: the matrix products of the eager (PyTorch)
    /// formulation, multiply-add = 2: what the references execute, and contra's count on a
    /// kernel device (on the CPU, [`Case::cpu_flops`]). `None` for the memory-bound element-wise
    /// ops.
    ///
    /// | op | fwd | fwd+bwd |
    /// |---|---|---|
    /// | ntxent, supcon (R rows), clip, siglip | 2 R² D | 6 R² D (one GEMM forward, two backward) |
    /// | infonce (N x M) | 2 N M D | 6 N M D |
    /// | moco | 2 N K D | 4 N K D (no gradient for the queue) |
    /// | triplet | 2 N² D (Gram matrix) | 6 N² D (autograd through the Gram matrix) |
    /// | similarity | 2 N M D | - |
    pub fn flops(&self) -> Option<f64> {
        let (n, d, k) = (self.n as f64, self.d as f64, self.k as f64);
        let r = self.softmax_rows() as f64;
        let (fwd, bwd) = match self.op {
            Op::Ntxent | Op::Supcon | Op::Clip | Op::Siglip | Op::Triplet => {
                (2.0 * r * r * d, 4.0 * r * r * d)
            }
            Op::Infonce => (2.0 * n * k * d, 4.0 * n * k * d),
            Op::Moco => (2.0 * n * k * d, 2.0 * n * k * d),
            Op::Similarity => (2.0 * n * k * d, 0.0),
            Op::Margin | Op::Nce | Op::Normalize | Op::Momentum => return None,
        };
        Some(match self.pass {
            Pass::Forward => fwd,
            Pass::ForwardBackward => fwd + bwd,
        })
    }

    /// The floating-point work contra's CPU backend executes per call (multiply-add = 2), where
    /// it differs from the nominal [`Case::flops`]: CLIP fwd+bwd 8 R² D (one forward GEMM gives
    /// both directions' statistics; the backward recomputes the logits, then two products);
    /// triplet fwd+bwd with batch-hard or semi-hard mining 2 N² D (the Gram matrix; the backward
    /// walks the few mined pairs, O(N D) per pair list, no GEMM). The other softmax losses'
    /// one-call sweeps execute the nominal count (NT-Xent, SupCon, InfoNCE: three GEMMs; MoCo: two;
    /// SigLIP: three), and so are batch-all and semi-hard-all counted (their coefficients go
    /// dense, two GEMMs backward, when most pairs occur in a term).
    pub fn cpu_flops(&self) -> Option<f64> {
        let nominal = self.flops()?;
        let (r, d) = (self.softmax_rows() as f64, self.d as f64);
        Some(match (self.op, self.pass, self.mining) {
            (Op::Clip, Pass::ForwardBackward, _) => 8.0 * r * r * d,
            (Op::Triplet, Pass::ForwardBackward, Mining::BatchHard | Mining::SemiHard) => {
                2.0 * r * r * d
            }
            _ => nominal,
        })
    }

    /// Bytes of one input set (all tensors of one call), f32.
    pub fn input_bytes(&self) -> usize {
        let (n, d, k, v) = (self.n, self.d, self.k, self.v);
        4 * match self.op {
            Op::Ntxent | Op::Triplet | Op::Normalize => n * d * self.pass_inputs(),
            Op::Infonce | Op::Similarity => (n + k) * d,
            Op::Clip | Op::Siglip | Op::Margin => 2 * n * d,
            Op::Moco => (2 * n + k) * d,
            Op::Supcon => n * v * d,
            Op::Nce => 2 * n * (k + 1),
            Op::Momentum => 2 * n,
        }
    }

    fn pass_inputs(&self) -> usize {
        match (self.op, self.pass) {
            (Op::Normalize, Pass::ForwardBackward) => 2,
            _ => 1,
        }
    }

    /// How many input sets the timed calls rotate through: 3, so that consecutive calls do not
    /// find their inputs in cache, unless one set exceeds 64 MiB (no cache holds it anyway).
    pub fn rotations(&self) -> usize {
        if self.input_bytes() > 64 << 20 {
            1
        } else {
            3
        }
    }

    /// A rough upper bound of the bytes a materializing (eager) reference needs for one call:
    /// five logit-sized matrices (PyTorch keeps about that many alive in fwd+bwd), plus inputs.
    pub fn eager_bytes_estimate(&self) -> usize {
        let r = self.softmax_rows();
        let matrix = 4 * match self.op {
            Op::Ntxent | Op::Supcon | Op::Clip | Op::Siglip | Op::Triplet => r * r,
            Op::Infonce | Op::Similarity => self.n * self.k,
            Op::Moco => self.n * (self.k + 1),
            Op::Nce => self.n * self.k,
            Op::Margin | Op::Normalize => self.n * self.d,
            Op::Momentum => self.n,
        };
        // PyTorch eager's batch-all and semi-hard build N x N x N tensors (a few of them).
        let cube = match (self.op, self.mining) {
            (Op::Triplet, Mining::BatchAll | Mining::SemiHard | Mining::SemiHardAll) => {
                4 * 4 * self.n * self.n * self.n
            }
            _ => 0,
        };
        5 * matrix + cube + 3 * self.input_bytes()
    }

    /// The case as the JSON object the child processes and the reference script read.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id(),
            "op": self.op.name(),
            "pass": self.pass.name(),
            "n": self.n, "d": self.d, "k": self.k, "v": self.v, "c": self.c,
            "dtype": self.precision.name(),
            "mining": mining_name(self.mining),
            "rotations": self.rotations(),
        })
    }

    pub fn from_json(v: &Value) -> Result<Case> {
        let bad = |what: &str| Error::invalid("bench", "case", format!("{what} in {v}"));
        let size = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(&format!("no size `{key}`")))
        };
        let text = |key: &str| -> Result<&str> {
            v.get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("no `{key}`")))
        };
        Ok(Case {
            op: Op::parse(text("op")?)?,
            pass: Pass::parse(text("pass")?)?,
            n: size("n")?,
            d: size("d")?,
            k: size("k")?,
            v: size("v")?,
            c: size("c")?,
            precision: match v.get("dtype").and_then(Value::as_str) {
                None => Precision::F32,
                Some(name) => {
                    Precision::parse(name).ok_or_else(|| bad(&format!("unknown dtype `{name}`")))?
                }
            },
            mining: match v.get("mining").and_then(Value::as_str) {
                None => Mining::BatchHard,
                Some(name) => parse_mining(name)?,
            },
        })
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

/// Both passes of an op at one shape.
fn both(make: impl Fn(Pass) -> Case) -> [Case; 2] {
    [make(Pass::Forward), make(Pass::ForwardBackward)]
}

/// The cases of `contra bench --quick`: a few minutes on 2 cores, PyTorch included.
pub fn quick_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for n in [1024, 4096] {
        cases.extend(both(|p| Case::ntxent(p, n, 128)));
    }
    cases.push(Case::clip(Pass::ForwardBackward, 1024, 128));
    cases.push(Case::siglip(Pass::ForwardBackward, 4096, 128));
    cases.push(Case::moco(Pass::ForwardBackward, 256, 4096, 128));
    cases.push(Case::supcon(Pass::ForwardBackward, 512, 2, 128, 10));
    cases.push(Case::triplet(Pass::ForwardBackward, 1024, 128, 16));
    for mining in [Mining::BatchAll, Mining::SemiHard, Mining::SemiHardAll] {
        cases.push(Case::triplet_mined(
            Pass::ForwardBackward,
            256,
            128,
            16,
            mining,
        ));
    }
    cases.push(Case::margin(Pass::ForwardBackward, 16384, 128));
    cases.push(Case::nce(Pass::ForwardBackward, 1024, 4096));
    cases
}

/// The cases of the full run: the shapes of the benchmark issue, plus every other op once.
pub fn full_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for d in [128, 512] {
        for n in [1024, 4096, 16384] {
            cases.extend(both(|p| Case::ntxent(p, n, d)));
        }
    }
    cases.extend(both(|p| Case::infonce(p, 4096, 4096, 128)));
    cases.extend(both(|p| Case::clip(p, 4096, 512)));
    for n in [4096, 16384] {
        cases.extend(both(|p| Case::siglip(p, n, 128)));
    }
    cases.extend(both(|p| Case::moco(p, 256, 65536, 128)));
    cases.extend(both(|p| Case::supcon(p, 2048, 2, 128, 100)));
    for n in [256, 1024, 4096] {
        cases.extend(both(|p| Case::triplet(p, n, 128, 64.min(n / 4))));
    }
    // The other minings: PyTorch eager builds N x N x N masks for them.
    for mining in [Mining::BatchAll, Mining::SemiHard, Mining::SemiHardAll] {
        for n in [256, 512] {
            cases.extend(both(|p| Case::triplet_mined(p, n, 128, 16, mining)));
        }
    }
    cases.extend(both(|p| Case::margin(p, 65536, 128)));
    cases.extend(both(|p| Case::nce(p, 4096, 4096)));
    cases.extend(both(|p| Case::normalize(p, 65536, 128)));
    cases.push(Case::similarity(4096, 4096, 128));
    cases.push(Case::momentum(25_000_000));
    cases
}

/// Tiny versions of every case (tests, smoke runs).
pub fn tiny_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.extend(both(|p| Case::ntxent(p, 64, 16)));
    cases.extend(both(|p| Case::infonce(p, 32, 32, 16)));
    cases.extend(both(|p| Case::clip(p, 32, 16)));
    cases.extend(both(|p| Case::siglip(p, 32, 16)));
    cases.extend(both(|p| Case::moco(p, 16, 64, 16)));
    cases.extend(both(|p| Case::supcon(p, 16, 2, 16, 4)));
    cases.extend(both(|p| Case::triplet(p, 32, 16, 4)));
    cases.extend(both(|p| Case::margin(p, 32, 16)));
    cases.extend(both(|p| Case::nce(p, 16, 8)));
    cases.extend(both(|p| Case::normalize(p, 32, 16)));
    cases.push(Case::similarity(32, 24, 16));
    cases.push(Case::momentum(1000));
    cases
}

/// The tensor-core cases of a GPU run, each in bf16 and in tf32 (f32 inputs, `F32Precision::Tf32`):
/// NT-Xent forward + backward at N = 4096 and 16384, D = 128 (quick); the full run adds the
/// tensor-core issue's shape, D = 256 at a 65536-row softmax, for NT-Xent, CLIP, SupCon
/// (32768 samples x 2 views) and MoCo (256 queries against a 65536-key queue, the MoCo v2 shape).
pub fn tensor_core_cases(quick: bool) -> Vec<Case> {
    let mut cases: Vec<Case> = [(4096, 128), (16384, 128)]
        .into_iter()
        .map(|(n, d)| Case::ntxent(Pass::ForwardBackward, n, d))
        .collect();
    if !quick {
        let pass = Pass::ForwardBackward;
        cases.extend([
            Case::ntxent(pass, 65536, 256),
            Case::clip(pass, 65536, 256),
            Case::supcon(pass, 32768, 2, 256, 1000),
            Case::moco(pass, 256, 65536, 256),
        ]);
    }
    cases
        .into_iter()
        .flat_map(|c| [c.at(Precision::Bf16), c.at(Precision::Tf32)])
        .collect()
}

/// splitmix64.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` values uniform in [-1, 1): element i is `(mix(seed * 2^32 + i) >> 40) / 2^23 - 1`,
/// exact in f32 (the reference script computes the same values).
pub fn uniform(len: usize, seed: u64) -> Vec<f32> {
    let base = seed << 32;
    (0..len as u64)
        .map(|i| (mix(base + i) >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

/// The seed of tensor `tensor` of input set `set`.
pub fn seed(set: usize, tensor: usize) -> u64 {
    1 + 8 * set as u64 + tensor as u64
}

/// Labels `i % classes` of `rows` rows.
pub fn labels(rows: usize, classes: usize) -> Vec<i64> {
    (0..rows).map(|i| (i % classes.max(1)) as i64).collect()
}

/// NT-Xent's temperature in the suite.
pub const NTXENT_TAU: f64 = 0.1;
/// InfoNCE's temperature in the suite.
pub const INFONCE_TAU: f64 = 0.1;
/// MoCo's temperature in the suite.
pub const MOCO_TAU: f64 = 0.2;
/// SupCon's temperature and base temperature.
pub const SUPCON_TAU: (f64, f64) = (0.1, 0.07);
/// CLIP's `log_scale`: ln(1 / 0.07).
pub fn clip_log_scale() -> f64 {
    (1.0f64 / 0.07).ln()
}
/// SigLIP's `log_scale` and `bias` in the suite (the paper's initialization).
pub const SIGLIP_LOG_SCALE: f64 = std::f64::consts::LN_10;
pub const SIGLIP_BIAS: f64 = -10.0;
/// Triplet margin.
pub const TRIPLET_MARGIN: f64 = 0.2;
/// Margin of the margin loss.
pub const MARGIN_MARGIN: f64 = 1.0;
/// Momentum of the momentum update.
pub const MOMENTUM_M: f64 = 0.999;

/// The NCE noise log-probabilities from uniform values: `0.5 u - ln k`.
pub fn nce_logq(u: &[f32], k: usize) -> Vec<f32> {
    let ln_k = (k as f64).ln() as f32;
    u.iter().map(|&x| 0.5 * x - ln_k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_reproducible() {
        let a = uniform(1000, 3);
        assert_eq!(a, uniform(1000, 3));
        assert!(a.iter().all(|&x| (-1.0..1.0).contains(&x)));
        assert_ne!(a, uniform(1000, 4));
        // Pinned: the same values as the reference script's `uniform(torch, 4, 9)` and a plain
        // Python splitmix64.
        assert_eq!(
            uniform(4, 9),
            [0.391_074_66, -0.419_191_12, -0.050_855_04, -0.549_195_2]
        );
    }

    #[test]
    fn cases_round_trip_through_json() {
        for case in full_cases()
            .into_iter()
            .chain(tiny_cases())
            .chain(quick_cases())
        {
            assert_eq!(Case::from_json(&case.to_json()).unwrap(), case);
        }
    }

    #[test]
    fn cpu_flops_count_what_the_cpu_backend_runs() {
        let fb = Pass::ForwardBackward;
        let ratio = |c: Case| c.cpu_flops().unwrap() / c.flops().unwrap();
        // CLIP: four GEMMs where eager PyTorch runs three; triplet batch-hard and semi-hard:
        // the Gram matrix only; the others: the nominal count.
        assert_eq!(ratio(Case::clip(fb, 64, 8)), 8.0 / 6.0);
        assert_eq!(ratio(Case::triplet(fb, 64, 8, 4)), 1.0 / 3.0);
        let semi = Case::triplet_mined(fb, 64, 8, 4, Mining::SemiHard);
        assert_eq!(ratio(semi), 1.0 / 3.0);
        let all = Case::triplet_mined(fb, 64, 8, 4, Mining::BatchAll);
        assert_eq!(ratio(all), 1.0);
        for case in [
            Case::ntxent(fb, 64, 8),
            Case::clip(Pass::Forward, 64, 8),
            Case::moco(fb, 16, 64, 8),
            Case::supcon(fb, 16, 2, 8, 4),
        ] {
            assert_eq!(ratio(case), 1.0, "{case}");
        }
        assert_eq!(Case::margin(fb, 64, 8).cpu_flops(), None);
    }
}
