//! The benchmark suite behind `contra bench`: contra against the references a user would
//! otherwise run, in one command and one table.
//!
//! For every case (an op, a pass and a shape, `cases`) the suite measures
//!
//! - contra: the public ops on the CPU, or the kernels on device-resident buffers on a GPU;
//! - the naive Rust reference (`naive`, CPU only): the loss written the way PyTorch eager runs
//!   it, materializing the N x N matrix, on the same GEMM as contra;
//! - on a kernel device, the unfused kernel sequence (`src/bench/unfused.rs`: GEMM, then separate
//!   log-softmax and cross-entropy kernels) for NT-Xent and InfoNCE;
//! - PyTorch eager (and `torch.compile` with `--compile`) through `bench/reference_torch.py`,
//!   run in the same command with the interpreter named by `CONTRA_TORCH_PYTHON` (default
//!   `python3`); when torch is missing the table says so and keeps the other columns.
//!
//! Every implementation gets the same inputs (a counter-based hash the script reproduces bit for
//! bit), one warm-up call, one call whose peak memory is read, then timed calls over 3 rotated
//! input sets until a minimum count and time are reached; the table shows the median. On the CPU
//! each Rust measurement runs in a child process (`contra bench --child ...`), so one case's
//! freed memory cannot hide another's peak. The losses and the first gradient entries of every
//! implementation are compared (column `agree`).
//!
//! Achieved GFLOP/s use the nominal flop model of `Case::flops` (the matrix products of the
//! eager formulation, the same count for every implementation) and are set against the
//! machine's GEMM peak, which the command measures itself (`gemm_peak`).

pub mod cases;
pub(crate) mod kernel;
pub mod naive;
pub mod ntxent_timing;
pub mod runner;
pub mod scaling;
pub mod torch;
pub(crate) mod unfused;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

pub use cases::{Case, Op, Pass, Precision};
pub use runner::{child_main, measure, GradCheck, Impl, Measurement, Outcome, Runner, Timing};
pub use scaling::{run_scaling, ScalingPoint, ScalingReport};
pub use torch::{TorchOptions, TorchRun, TorchStatus};

use crate::cpu::gemm::MatRef;
use crate::{Device, Error, Result};

/// Arguments of `contra bench` (a clap `Args` struct: the binary flattens it into its
/// subcommand).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BenchArgs {
    /// A handful of shapes (a few minutes on 2 cores, PyTorch included) instead of the full suite.
    #[arg(long)]
    pub quick: bool,
    /// Where contra runs: cpu, or cuda or cuda:N (a build with `--features cuda`); interp runs the
    /// kernels interpreted on the CPU (slow by design: a test of the GPU path).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Also write the rows (or the scaling points) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run the scaling sweep (NT-Xent, CLIP and SupCon forward + backward time and peak memory
    /// against N) instead of the table, and draw it as a PNG (--out).
    #[arg(long)]
    pub scaling: bool,
    /// The PNG of --scaling.
    #[arg(long, default_value = "bench-scaling.png")]
    pub out: PathBuf,
    /// Largest N of --scaling (default: 16384 with --quick, 32768 otherwise).
    #[arg(long)]
    pub max_n: Option<usize>,
    /// Only the cases whose id (e.g. `ntxent fwd+bwd N=4096 D=128`) contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Leave out the PyTorch reference.
    #[arg(long)]
    pub no_torch: bool,
    /// Leave out the in-process reference: the naive Rust version on the CPU, the unfused kernel
    /// sequence (GEMM, then separate softmax and cross-entropy kernels) on a GPU.
    #[arg(long)]
    pub no_naive: bool,
    /// Also time torch.compile (compiles each case first: slow on small machines).
    #[arg(long)]
    pub compile: bool,
    /// Seconds of timed calls per case and implementation (default 0.5 with --quick, else 2).
    #[arg(long)]
    pub min_time: Option<f64>,
    /// Measure in this process instead of one child process per case (faster; peak memory may
    /// then miss allocations that reuse memory freed by earlier cases).
    #[arg(long)]
    pub in_process: bool,
    /// Internal: run one measurement and print it (what the child processes do).
    #[arg(long, hide = true)]
    pub child: Option<String>,
    /// Internal: the tiny shapes of the tests.
    #[arg(long, hide = true)]
    pub tiny: bool,
}

impl BenchArgs {
    fn timing(&self) -> Timing {
        let mut t = if self.quick || self.tiny {
            Timing::quick()
        } else {
            Timing::full()
        };
        if let Some(s) = self.min_time {
            t.min_time_s = s.max(0.0);
        }
        if self.tiny {
            t = Timing::once();
        }
        if matches!(self.device, Device::Cuda(_)) {
            t.min_reps = t.min_reps.max(20);
        }
        t
    }

    fn cases(&self) -> Vec<Case> {
        let mut all = if self.tiny {
            cases::tiny_cases()
        } else if self.quick {
            cases::quick_cases()
        } else {
            cases::full_cases()
        };
        if matches!(self.device, Device::Cuda(_)) && !self.tiny {
            all.extend(cases::tensor_core_cases(self.quick));
        }
        all.into_iter()
            .filter(|c| {
                self.filter
                    .as_ref()
                    .is_none_or(|f| c.id().contains(f.as_str()))
            })
            .collect()
    }
}

/// The machine a run was measured on.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub cpu: String,
    pub logical_cores: usize,
    pub rayon_threads: usize,
    pub memory_bytes: Option<u64>,
    /// 1-minute load average when the run started (a loaded machine gives noisy times).
    pub load_average: Option<f64>,
    pub os: String,
    /// The GPU's name for a CUDA run.
    pub gpu: Option<String>,
}

impl Machine {
    pub fn detect(device: Device) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse().ok());
        let os = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| format!("{} {}", std::env::consts::OS, r.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_string());
        Machine {
            cpu,
            logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            rayon_threads: rayon::current_num_threads(),
            memory_bytes: runner::memory::total_bytes(),
            load_average,
            os,
            gpu: gpu_name(device),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "cpu": self.cpu,
            "logical_cores": self.logical_cores,
            "rayon_threads": self.rayon_threads,
            "memory_bytes": self.memory_bytes,
            "load_average": self.load_average,
            "os": self.os,
            "gpu": self.gpu,
        })
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{}, {} logical cores (rayon: {} threads)",
            self.cpu, self.logical_cores, self.rayon_threads
        );
        if let Some(m) = self.memory_bytes {
            let _ = write!(s, ", {} RAM", fmt_bytes(m));
        }
        if let Some(l) = self.load_average {
            let _ = write!(s, ", load average {l:.2} at start");
        }
        if let Some(g) = &self.gpu {
            let _ = write!(s, "; GPU: {g}");
        }
        s
    }
}

#[cfg(feature = "cuda")]
fn gpu_name(device: Device) -> Option<String> {
    match device {
        Device::Cuda(i) => crate::kernels::cuda::Cuda::get(i).ok()?.name().ok(),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_: Device) -> Option<String> {
    None
}

/// GFLOP/s of an f32 `size`^3 GEMM through contra's GEMM (`crate::cpu::gemm`, rows split over
/// the rayon pool as the naive reference and the ops split their work): best of 3 after a
/// warm-up.
pub fn gemm_peak(size: usize) -> f64 {
    let a = cases::uniform(size * size, 101);
    let b = cases::uniform(size * size, 102);
    let mut c = vec![0.0f32; size * size];
    let mut best = f64::INFINITY;
    for i in 0..4 {
        let start = Instant::now();
        naive::par_gemm(
            1.0,
            MatRef::row_major(&a, size, size),
            MatRef::row_major(&b, size, size),
            0.0,
            &mut c,
        );
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&c);
    2.0 * (size as f64).powi(3) / best / 1e9
}

/// The GEMM peak of a run: contra's GEMM (CPU) and torch's (CPU or GPU), and the one used.
#[derive(Clone, Debug, Default)]
pub struct GemmPeak {
    pub contra_gflops: Option<f64>,
    pub contra_shape: Option<String>,
    pub torch_gflops: Option<f64>,
    pub torch_shape: Option<String>,
}

impl GemmPeak {
    /// The machine's peak: the best GEMM measured.
    pub fn peak(&self) -> Option<f64> {
        match (self.contra_gflops, self.torch_gflops) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One line of the table: a case, contra's measurement and one reference's.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub case: Case,
    /// Where contra ran.
    pub device: Device,
    /// `naive` (Rust, CPU), `unfused` (kernels, GPU), `torch-eager`, `torch-compile`, or `-` when no reference ran.
    pub reference: String,
    pub contra: Option<Measurement>,
    pub reference_result: Option<Measurement>,
    /// Why a measurement is missing, or a disagreement of the checksums.
    pub note: Option<String>,
}

impl BenchRow {
    /// Reference time / contra time.
    pub fn speedup(&self) -> Option<f64> {
        Some(self.reference_result.as_ref()?.median_ms / self.contra.as_ref()?.median_ms)
    }

    fn gflops(&self, m: Option<&Measurement>) -> Option<f64> {
        Some(self.case.flops()? / (m?.median_ms * 1e-3) / 1e9)
    }

    /// contra's GFLOP/s: over the work its CPU backend executes ([`Case::cpu_flops`]) on the
    /// CPU, over the nominal count on a kernel device.
    pub fn contra_gflops(&self) -> Option<f64> {
        let flops = match self.device {
            Device::Cpu => self.case.cpu_flops()?,
            _ => self.case.flops()?,
        };
        Some(flops / (self.contra.as_ref()?.median_ms * 1e-3) / 1e9)
    }

    pub fn reference_gflops(&self) -> Option<f64> {
        self.gflops(self.reference_result.as_ref())
    }

    /// Whether contra's and the reference's loss (within 1e-3) and gradient checksum (within
    /// 1e-2, a sum of 64 entries) agree; `None` when either is missing.
    pub fn agree(&self) -> Option<bool> {
        let (a, b) = (
            &self.contra.as_ref()?.outcome,
            &self.reference_result.as_ref()?.outcome,
        );
        let close = |x: f64, y: f64, tol: f64| {
            (x - y).abs() <= tol * x.abs().max(y.abs()).max(1e-30) || (x - y).abs() < 1e-7
        };
        // bf16 inputs: each side rounds differently (PyTorch also keeps its logits in bf16);
        // tf32: each side rounds its operands (PyTorch's GEMMs with allow_tf32).
        let (loss_tol, grad_tol) = match self.case.precision {
            Precision::Bf16 => (2e-2, 5e-2),
            Precision::Tf32 => (5e-3, 2e-2),
            Precision::F32 => (1e-3, 1e-2),
        };
        let loss = close(a.check, b.check, loss_tol);
        let grad = match (a.grad_check, b.grad_check) {
            (Some(x), Some(y)) => x.agrees(&y, grad_tol),
            _ => true,
        };
        Some(loss && grad)
    }

    pub fn to_json(&self, peak_gflops: Option<f64>) -> Value {
        let m = |m: &Option<Measurement>| m.as_ref().map(Measurement::to_json);
        json!({
            "id": self.case.id(),
            "op": self.case.op.name(),
            "pass": self.case.pass.name(),
            "shape": self.case.shape(),
            "case": self.case.to_json(),
            "reference": self.reference,
            "contra_ms": self.contra.as_ref().map(|x| x.median_ms),
            "reference_ms": self.reference_result.as_ref().map(|x| x.median_ms),
            "speedup": self.speedup(),
            "contra_peak_bytes": self.contra.as_ref().and_then(|x| x.peak_bytes),
            "reference_peak_bytes": self.reference_result.as_ref().and_then(|x| x.peak_bytes),
            "flops": self.case.flops(),
            "contra_gflops": self.contra_gflops(),
            "reference_gflops": self.reference_gflops(),
            "contra_fraction_of_peak": self.contra_gflops().zip(peak_gflops).map(|(a, p)| a / p),
            "agree": self.agree(),
            "note": self.note,
            "contra": m(&self.contra),
            "reference_measurement": m(&self.reference_result),
        })
    }
}

/// Everything one `contra bench` run measured.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    pub version: String,
    pub device: Device,
    pub quick: bool,
    pub machine: Machine,
    pub timing: Option<Timing>,
    pub gemm: GemmPeak,
    /// Whether the Rust side measured in child processes.
    pub isolated: bool,
    pub torch: Option<TorchRun>,
    pub rows: Vec<BenchRow>,
    /// Skipped references, a missing torch, fallbacks: shown under the table.
    pub notes: Vec<String>,
}

/// Which CPU implementations to run for each case, and how.
struct RustSide {
    isolated: bool,
    exe: Option<PathBuf>,
    timing: Timing,
    device: Device,
}

/// The arguments after the executable that make it run one child measurement.
const CHILD_ARGS: [&str; 2] = ["bench", "--child"];

impl RustSide {
    fn measure(&self, case: &Case, imp: Impl) -> Result<Measurement> {
        match (&self.exe, self.isolated) {
            (Some(exe), true) => {
                let args: Vec<String> = CHILD_ARGS.iter().map(|s| s.to_string()).collect();
                runner::measure_in_child(exe, &args, case, imp, self.device, &self.timing)
            }
            _ => {
                let mut r = Runner::new(case, imp, self.device)?;
                measure(&mut r, &self.timing)
            }
        }
    }

    /// Sets up child processes (the current executable with `bench --child`), or falls back to
    /// measuring in this process with a note.
    fn new(args: &BenchArgs, timing: Timing, notes: &mut Vec<String>) -> RustSide {
        let mut side = RustSide {
            isolated: false,
            exe: None,
            timing,
            device: args.device,
        };
        if args.device != Device::Cpu {
            // Device memory is counted per call; no need for separate processes.
            return side;
        }
        if args.in_process {
            notes.push("measured in one process (--in-process): peak memory of later cases may be under-counted".into());
            return side;
        }
        let Ok(exe) = std::env::current_exe() else {
            notes.push("cannot find the current executable: measured in one process".into());
            return side;
        };
        side.exe = Some(exe);
        side.isolated = true;
        // Probe: does this executable understand `bench --child`?
        let probe = Case::ntxent(Pass::Forward, 64, 16);
        let probe_side = RustSide {
            isolated: true,
            exe: side.exe.clone(),
            timing: Timing::once(),
            device: Device::Cpu,
        };
        if let Err(e) = probe_side.measure(&probe, Impl::Contra) {
            notes.push(format!(
                "child processes unavailable ({e}): measured in one process, peak memory may be under-counted"
            ));
            side.isolated = false;
            side.exe = None;
        }
        side
    }
}

/// Runs the suite: contra, the in-process reference (naive on the CPU, unfused on a kernel device) and PyTorch on every case of `args`.
pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    check_device(args.device)?;
    let timing = args.timing();
    let cases = args.cases();
    if cases.is_empty() {
        return Err(Error::invalid(
            "bench",
            "--filter",
            format!(
                "no case id contains `{}`",
                args.filter.as_deref().unwrap_or("")
            ),
        ));
    }
    let mut report = BenchReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        device: args.device,
        quick: args.quick,
        machine: Machine::detect(args.device),
        timing: Some(timing),
        ..Default::default()
    };
    let cpu = args.device == Device::Cpu;
    if cpu {
        let size = if args.tiny { 256 } else { 2048 };
        eprintln!("bench: measuring the GEMM peak ({size}^3 f32)...");
        report.gemm.contra_gflops = Some(gemm_peak(size));
        report.gemm.contra_shape = Some(format!("{size}^3 f32, contra's GEMM"));
    }
    let side = RustSide::new(args, timing, &mut report.notes);
    report.isolated = side.isolated;
    let budget = reference_budget();

    let mut contra = Vec::new();
    let mut rust_refs = Vec::new();
    for case in &cases {
        let m = side.measure(case, Impl::Contra);
        progress("contra", case, &m);
        contra.push(m.map_err(|e| e.to_string()));
        // The in-process references: the eager-style Rust version on the CPU; on a kernel
        // device, contra's kernel launches alone (what the public calls add to them) and the
        // unfused kernel sequence (GEMM, then separate softmax and cross-entropy kernels).
        let mut refs = Vec::new();
        if !cpu {
            let m = side.measure(case, Impl::Kernels);
            progress(Impl::Kernels.name(), case, &m);
            refs.push((Impl::Kernels, m.map_err(|e| e.to_string())));
        }
        let reference = if cpu { Impl::Naive } else { Impl::Unfused };
        let covered = cpu || unfused::check_supported(case).is_ok();
        if args.no_naive || !covered {
            rust_refs.push(refs);
            continue;
        }
        let estimate = case.eager_bytes_estimate() as u64;
        if budget.is_some_and(|b| estimate > b) {
            refs.push((
                reference,
                Err(format!("skipped: needs about {}", fmt_bytes(estimate))),
            ));
            rust_refs.push(refs);
            continue;
        }
        let m = side.measure(case, reference);
        progress(reference.name(), case, &m);
        refs.push((reference, m.map_err(|e| e.to_string())));
        rust_refs.push(refs);
    }

    let mut torch_results = None;
    if args.device == Device::Interp {
        report.notes.push(
            "interp runs the kernels interpreted on the CPU (tests): no PyTorch reference".into(),
        );
    } else if !args.no_torch {
        let opts = TorchOptions {
            python: torch::python(),
            device: args.device,
            threads: cpu.then_some(report.machine.rayon_threads),
            compile: args.compile,
            timing,
            max_bytes: if cpu { budget } else { None },
            gemm: !args.tiny,
        };
        eprintln!(
            "bench: running the PyTorch reference with `{}`...",
            opts.python
        );
        match torch::run_reference(&cases, &opts) {
            TorchStatus::Ran(run) => {
                report.gemm.torch_gflops = run.gemm_gflops;
                report.gemm.torch_shape = run.gemm_shape.clone();
                torch_results = Some(run);
            }
            TorchStatus::Missing(msg) | TorchStatus::Failed(msg) => {
                eprintln!("bench: {msg}");
                report.notes.push(msg);
            }
        }
    }

    for (i, case) in cases.iter().enumerate() {
        let (contra_m, mut note) = match &contra[i] {
            Ok(m) => (Some(m.clone()), None),
            Err(e) => (None, Some(format!("contra failed: {e}"))),
        };
        let mut refs: Vec<(String, torch::RefResult)> = Vec::new();
        for (imp, n) in &rust_refs[i] {
            refs.push((imp.name().into(), n.clone()));
        }
        if let Some(run) = &torch_results {
            match run.results.get(&case.id()) {
                Some(list) => refs.extend(list.iter().cloned()),
                None => refs.push(("torch-eager".into(), Err("no result".into()))),
            }
        }
        if refs.is_empty() {
            report.rows.push(BenchRow {
                case: *case,
                device: args.device,
                reference: "-".into(),
                contra: contra_m.clone(),
                reference_result: None,
                note: note.take(),
            });
            continue;
        }
        for (name, result) in refs {
            let (reference_result, ref_note) = match result {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(e)),
            };
            let mut row = BenchRow {
                case: *case,
                device: args.device,
                reference: name,
                contra: contra_m.clone(),
                reference_result,
                note: note.take().or(ref_note),
            };
            if row.agree() == Some(false) {
                let (a, b) = (
                    row.contra.as_ref().map(|m| m.outcome),
                    row.reference_result.as_ref().map(|m| m.outcome),
                );
                row.note = Some(format!(
                    "results differ: contra {:?} vs {} {:?}",
                    a, row.reference, b
                ));
            }
            report.rows.push(row);
        }
    }
    report.torch = torch_results;
    Ok(report)
}

/// Refuses devices the suite cannot run on, with the reason.
fn check_device(device: Device) -> Result<()> {
    match device {
        Device::Cpu | Device::Interp => Ok(()),
        Device::Cuda(_) => crate::device_available(device)
            .map_err(|reason| Error::Device(format!("contra bench --device {device}: {reason}"))),
    }
}

/// Bytes a reference may use: 70% of the memory available now.
fn reference_budget() -> Option<u64> {
    runner::memory::available_bytes().map(|b| b / 10 * 7)
}

fn progress(name: &str, case: &Case, m: &Result<Measurement>) {
    match m {
        Ok(m) => eprintln!(
            "bench: {name:7} {case}: {} (peak {})",
            fmt_ms(m.median_ms),
            m.peak_bytes.map_or("n/a".into(), fmt_bytes)
        ),
        Err(e) => eprintln!("bench: {name:7} {case}: failed: {e}"),
    }
}

/// `12.3 ms`, `1.23 s`, `45.6 µs`.
pub fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        "n/a".into()
    } else if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.1} µs", ms * 1000.0)
    }
}

/// `4.0 MiB`, `1.25 GiB`.
pub fn fmt_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

fn fmt_rate(gflops: f64) -> String {
    if gflops >= 1000.0 {
        format!("{:.2} TFLOP/s", gflops / 1000.0)
    } else {
        format!("{gflops:.1}")
    }
}

/// The report as text: a header (machine, GEMM peak, method), the markdown table, the notes.
pub fn table(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "contra {} bench{} on {}: {}",
        report.version,
        if report.quick { " --quick" } else { "" },
        report.device,
        report.machine.describe()
    );
    let g = &report.gemm;
    let mut peak_line = String::from("GEMM peak: ");
    if let (Some(v), Some(s)) = (g.contra_gflops, &g.contra_shape) {
        let _ = write!(peak_line, "{} GFLOP/s ({s})", fmt_rate(v));
    }
    if let (Some(v), Some(s)) = (g.torch_gflops, &g.torch_shape) {
        if g.contra_gflops.is_some() {
            peak_line.push_str("; ");
        }
        let _ = write!(peak_line, "{} GFLOP/s (torch {s})", fmt_rate(v));
    }
    match g.peak() {
        Some(p) => {
            let _ = writeln!(
                out,
                "{peak_line}; % of peak below is against {}",
                fmt_rate(p)
            );
        }
        None => {
            let _ = writeln!(out, "GEMM peak: not measured");
        }
    }
    if let Some(t) = &report.torch {
        let _ = writeln!(
            out,
            "PyTorch {} on {}, {} threads",
            t.version, t.device_name, t.threads
        );
    }
    if let Some(t) = report.timing {
        let _ = writeln!(
            out,
            "Times: median of >= {} calls and >= {} s after a warm-up call, 3 input sets \
             rotated (1 above 64 MiB); peak: {} added by one call{}.",
            t.min_reps,
            t.min_time_s,
            if report.device == Device::Cpu {
                "resident memory"
            } else {
                "device memory"
            },
            if report.isolated {
                " (one child process per measurement)"
            } else {
                ""
            }
        );
    }
    out.push('\n');
    // On a kernel device, which kernels ran contra's side (the tensor-core ones for bf16).
    let kernel_device = report.device != Device::Cpu;
    let mut header = vec![
        "op",
        "pass",
        "shape",
        "contra",
        "reference",
        "ref time",
        "speedup",
        "contra peak",
        "ref peak",
        "contra GFLOP/s (% peak)",
        "ref GFLOP/s",
        "agree",
    ];
    if kernel_device {
        header.insert(3, "contra engine");
    }
    let peak = g.peak();
    let mut lines: Vec<Vec<String>> = Vec::new();
    let mut last_case: Option<Case> = None;
    for row in &report.rows {
        let first = last_case != Some(row.case);
        last_case = Some(row.case);
        let c = row.contra.as_ref();
        let r = row.reference_result.as_ref();
        let cell = |s: String| if first { s } else { String::new() };
        let contra_rate = row.contra_gflops().map(|v| match peak {
            Some(p) => format!("{} ({:.0}%)", fmt_rate(v), 100.0 * v / p),
            None => fmt_rate(v),
        });
        let ref_time = match (r, &row.note) {
            (Some(m), _) => fmt_ms(m.median_ms),
            (None, Some(n)) if row.contra.is_some() => n.clone(),
            _ => "-".into(),
        };
        let mut line = vec![
            cell(row.case.op.name().into()),
            cell(row.case.pass.name().into()),
            cell(row.case.shape()),
            cell(c.map_or("failed".into(), |m| fmt_ms(m.median_ms))),
            row.reference.clone(),
            ref_time,
            row.speedup().map_or("-".into(), |s| format!("{s:.2}x")),
            cell(c.and_then(|m| m.peak_bytes).map_or("n/a".into(), fmt_bytes)),
            r.and_then(|m| m.peak_bytes).map_or("-".into(), fmt_bytes),
            cell(contra_rate.unwrap_or_else(|| "-".into())),
            row.reference_gflops().map_or("-".into(), fmt_rate),
            match row.agree() {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            },
        ];
        if kernel_device {
            line.insert(3, cell(row.case.engine(report.device).into()));
        }
        lines.push(line);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let render = |cells: Vec<String>| -> String {
        let mut s = String::from("|");
        for (c, w) in cells.iter().zip(&widths) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s
    };
    let _ = writeln!(
        out,
        "{}",
        render(header.iter().map(|s| s.to_string()).collect())
    );
    let _ = writeln!(
        out,
        "{}",
        render(widths.iter().map(|&w| "-".repeat(w)).collect())
    );
    for l in lines {
        let _ = writeln!(out, "{}", render(l));
    }
    let mismatches: Vec<&BenchRow> = report
        .rows
        .iter()
        .filter(|r| r.agree() == Some(false))
        .collect();
    if !report.notes.is_empty() || !mismatches.is_empty() {
        out.push('\n');
    }
    for n in &report.notes {
        let _ = writeln!(out, "note: {n}");
    }
    for r in mismatches {
        let _ = writeln!(
            out,
            "note: {}: {}",
            r.case,
            r.note.as_deref().unwrap_or("results differ")
        );
    }
    out
}

/// Prints [`table`] to stdout.
pub fn print_table(report: &BenchReport) {
    print!("{}", table(report));
}

/// The report as JSON: machine, GEMM peak, PyTorch's versions, the rows (each with `speedup`).
pub fn report_json(report: &BenchReport) -> Value {
    let peak = report.gemm.peak();
    json!({
        "contra": report.version,
        "device": report.device.to_string(),
        "quick": report.quick,
        "machine": report.machine.to_json(),
        "timing": report.timing.map(Timing::to_json),
        "isolated": report.isolated,
        "gemm": {
            "contra_gflops": report.gemm.contra_gflops,
            "contra_shape": report.gemm.contra_shape,
            "torch_gflops": report.gemm.torch_gflops,
            "torch_shape": report.gemm.torch_shape,
            "peak_gflops": peak,
        },
        "torch": report.torch.as_ref().map(|t| json!({
            "version": t.version,
            "device_name": t.device_name,
            "threads": t.threads,
        })),
        "notes": report.notes,
        "rows": report.rows.iter().map(|r| r.to_json(peak)).collect::<Vec<_>>(),
    })
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::format(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// `contra bench`: the child mode, the scaling sweep, or the table (printed, and written as JSON
/// with `--json`).
pub fn main(args: &BenchArgs) -> Result<()> {
    if let Some(spec) = &args.child {
        println!("{}", child_main(spec)?);
        return Ok(());
    }
    if args.scaling {
        let report = run_scaling(args)?;
        print!("{}", scaling::table(&report));
        scaling::plot(&report, &args.out)?;
        println!("scaling plot: {}", args.out.display());
        if let Some(path) = &args.json {
            write_json(path, &scaling::report_json(&report))?;
            println!("json: {}", path.display());
        }
        return Ok(());
    }
    let report = run(args)?;
    print_table(&report);
    if let Some(path) = &args.json {
        write_json(path, &report_json(&report))?;
        println!("json: {}", path.display());
    }
    Ok(())
}
