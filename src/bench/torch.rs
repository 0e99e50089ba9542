//! Running the PyTorch reference script (`bench/reference_torch.py`, embedded in the binary) in
//! the same run, and reading its results.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::cases::Case;
use super::runner::{Measurement, Timing};
use crate::{Device, Error, Result};

/// The script, as shipped in `bench/reference_torch.py`.
pub const SCRIPT: &str = include_str!("../../bench/reference_torch.py");

/// The exit status of the script when `import torch` fails.
const EXIT_NO_TORCH: i32 = 3;

/// The interpreter that runs the script: `CONTRA_TORCH_PYTHON`, default `python3`.
pub fn python() -> String {
    std::env::var("CONTRA_TORCH_PYTHON")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// How to run the reference.
#[derive(Clone, Debug)]
pub struct TorchOptions {
    pub python: String,
    pub device: Device,
    /// CPU threads for torch (contra uses every core; so does the default).
    pub threads: Option<usize>,
    /// Also time `torch.compile`.
    pub compile: bool,
    pub timing: Timing,
    /// Skip cases whose eager memory estimate exceeds this.
    pub max_bytes: Option<u64>,
    /// Measure torch's GEMM peak.
    pub gemm: bool,
}

/// One reference measurement, or why there is none.
pub type RefResult = std::result::Result<Measurement, String>;

/// What the reference produced.
#[derive(Clone, Debug, Default)]
pub struct TorchRun {
    pub version: String,
    pub device_name: String,
    pub threads: usize,
    /// torch's large f32 GEMM, GFLOP/s, and its shape.
    pub gemm_gflops: Option<f64>,
    pub gemm_shape: Option<String>,
    /// Per case id: `(implementation, measurement or error)`, e.g. `("torch-eager", Ok(..))`.
    pub results: HashMap<String, Vec<(String, RefResult)>>,
}

/// The outcome of [`run_reference`]: PyTorch ran, is missing, or failed.
#[derive(Clone, Debug)]
pub enum TorchStatus {
    Ran(TorchRun),
    /// The interpreter does not exist or has no torch: the message says which and what to do.
    Missing(String),
    Failed(String),
}

/// A scratch folder for the script, its case list and its output.
fn scratch_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "contra-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Runs the reference script on `cases` and collects its results. Progress goes to stderr.
pub fn run_reference(cases: &[Case], opts: &TorchOptions) -> TorchStatus {
    match run_inner(cases, opts) {
        Ok(status) => status,
        Err(e) => TorchStatus::Failed(e.to_string()),
    }
}

fn run_inner(cases: &[Case], opts: &TorchOptions) -> Result<TorchStatus> {
    let dir = scratch_dir()?;
    let script = dir.join("reference_torch.py");
    write(&script, SCRIPT)?;
    let case_file = dir.join("cases.json");
    let list: Vec<Value> = cases.iter().map(Case::to_json).collect();
    write(&case_file, &json!({ "cases": list }).to_string())?;
    let out_file = dir.join("torch.json");
    let device = match opts.device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    let mut cmd = Command::new(&opts.python);
    cmd.arg(&script)
        .arg("--cases")
        .arg(&case_file)
        .arg("--json")
        .arg(&out_file)
        .arg("--device")
        .arg(&device)
        .arg("--min-time")
        .arg(opts.timing.min_time_s.to_string())
        .arg("--min-reps")
        .arg(opts.timing.min_reps.to_string())
        .arg("--max-reps")
        .arg(opts.timing.max_reps.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(t) = opts.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    if opts.compile {
        cmd.arg("--compile");
    }
    if let Some(b) = opts.max_bytes {
        cmd.arg("--max-bytes").arg(b.to_string());
    }
    if !opts.gemm {
        cmd.arg("--no-gemm");
    }
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(TorchStatus::Missing(format!(
                "PyTorch reference skipped: the interpreter `{}` was not found (set \
                 CONTRA_TORCH_PYTHON to a Python that has torch)",
                opts.python
            )));
        }
        Err(e) => return Err(Error::io(&opts.python, e)),
    };
    let text = std::fs::read_to_string(&out_file).ok();
    let _ = std::fs::remove_dir_all(&dir);
    if status.code() == Some(EXIT_NO_TORCH) {
        let detail = text
            .as_deref()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| format!("`{}` cannot import torch", opts.python));
        return Ok(TorchStatus::Missing(format!(
            "PyTorch reference skipped: {detail}"
        )));
    }
    let Some(text) = text else {
        return Ok(TorchStatus::Failed(format!(
            "the PyTorch reference script exited with {status} and wrote no results"
        )));
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format("reference_torch.py output", e.to_string()))?;
    if let Some(msg) = v.get("message").and_then(Value::as_str) {
        return Ok(TorchStatus::Failed(format!("PyTorch reference: {msg}")));
    }
    Ok(TorchStatus::Ran(parse_run(&v)))
}

/// Reads the script's JSON.
pub(crate) fn parse_run(v: &Value) -> TorchRun {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut run = TorchRun {
        version: text("torch"),
        device_name: text("device_name"),
        threads: v.get("threads").and_then(Value::as_u64).unwrap_or(0) as usize,
        gemm_gflops: v.get("gemm_gflops").and_then(Value::as_f64),
        gemm_shape: v
            .get("gemm_shape")
            .and_then(Value::as_str)
            .map(str::to_string),
        results: HashMap::new(),
    };
    for row in v
        .get("results")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = row
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let imp = row
            .get("impl")
            .and_then(Value::as_str)
            .unwrap_or("torch")
            .to_string();
        let result = match row.get("error").and_then(Value::as_str) {
            Some(e) => Err(e.to_string()),
            None => Measurement::from_json(row).ok_or_else(|| "no timing in the output".into()),
        };
        run.results.entry(id).or_default().push((imp, result));
    }
    run
}
