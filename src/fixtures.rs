//! Reference cases: a folder per case with `case.json` (kind, options, array files) and `.npy`
//! arrays computed by PyTorch in float64. Every backend must reproduce them. Used by
//! `tests/fixtures.rs` and `contra check-fixtures`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Device, Error, Result, Tensor};

/// Relative-norm tolerance for results computed in f32.
pub const F32_TOLERANCE: f64 = 1e-4;

/// One case folder.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub kind: String,
    pub options: serde_json::Value,
    arrays: BTreeMap<String, String>,
}

/// A float64 or int64 array read from a `.npy` file.
#[derive(Clone, Debug)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// The outcome of one comparison of an output against its expected array.
#[derive(Clone, Debug)]
pub struct Check {
    pub output: String,
    /// `||out - ref|| / max(||ref||, 1e-12)`, or |out - ref| for exact counts.
    pub error: f64,
    pub passed: bool,
}

/// The outcome of one case.
#[derive(Clone, Debug)]
pub struct CaseReport {
    pub name: String,
    pub kind: String,
    /// Which implementation ran the case (e.g. `cpu`, `interp kernels`).
    pub path: String,
    pub checks: Vec<Check>,
    /// Set when the case could not run at all.
    pub failure: Option<String>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.failure.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// One line: `PASS name (kind, path): out err, ...` or `FAIL ...`.
    pub fn line(&self) -> String {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let details = match &self.failure {
            Some(reason) => reason.clone(),
            None => self
                .checks
                .iter()
                .map(|c| {
                    format!(
                        "{} {:.2e}{}",
                        c.output,
                        c.error,
                        if c.passed { "" } else { " (!)" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        };
        format!(
            "{verdict} {} [{}, {}]: {details}",
            self.name, self.kind, self.path
        )
    }
}

/// Reads every case folder directly under `dir` (sorted by name).
pub fn load_cases(dir: &Path) -> Result<Vec<Case>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut cases = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.join("case.json").is_file() {
            cases.push(Case::load(&path)?);
        }
    }
    if cases.is_empty() {
        return Err(Error::format(
            dir,
            "no case folders (sub-folders with a case.json) found",
        ));
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(cases)
}

impl Case {
    /// Reads `dir/case.json`.
    pub fn load(dir: &Path) -> Result<Case> {
        let path = dir.join("case.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
        let kind = json["kind"]
            .as_str()
            .ok_or_else(|| Error::format(&path, "missing string field `kind`"))?
            .to_string();
        let arrays = json["arrays"]
            .as_object()
            .ok_or_else(|| Error::format(&path, "missing object field `arrays`"))?
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    v.as_str()
                        .ok_or_else(|| Error::format(&path, format!("arrays.{k} is not a string")))?
                        .to_string(),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Case {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: dir.to_path_buf(),
            kind,
            options: json
                .get("options")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            arrays,
        })
    }

    /// Reads the array named `name` in `case.json`.
    pub fn array(&self, name: &str) -> Result<Array> {
        let file = self.arrays.get(name).ok_or_else(|| {
            Error::format(self.dir.join("case.json"), format!("no array `{name}`"))
        })?;
        read_npy(&self.dir.join(file))
    }

    /// The array as a tensor of `dtype`-compatible f32 or f64 on `device`.
    fn tensor(&self, name: &str, precision: Precision, device: Device) -> Result<Tensor> {
        let a = self.array(name)?;
        match precision {
            Precision::F64 => Tensor::from_vec(a.values, &a.shape, device),
            Precision::F32 => Tensor::from_vec(
                a.values.iter().map(|&v| v as f32).collect(),
                &a.shape,
                device,
            ),
        }
    }

    fn ints(&self, name: &str) -> Result<Vec<i64>> {
        Ok(self.array(name)?.values.iter().map(|&v| v as i64).collect())
    }

    fn indices(&self, name: &str) -> Result<Vec<usize>> {
        self.ints(name)?
            .into_iter()
            .map(|v| {
                usize::try_from(v).map_err(|_| {
                    Error::format(&self.dir, format!("{name} holds negative index {v}"))
                })
            })
            .collect()
    }

    fn option_f64(&self, key: &str) -> Result<f64> {
        self.options[key].as_f64().ok_or_else(|| {
            Error::format(
                self.dir.join("case.json"),
                format!("options.{key} is not a number"),
            )
        })
    }

    fn option_str(&self, key: &str) -> Result<&str> {
        self.options[key].as_str().ok_or_else(|| {
            Error::format(
                self.dir.join("case.json"),
                format!("options.{key} is not a string"),
            )
        })
    }
}

/// Reads a `.npy` of f64, f32 or integers into f64 values.
pub fn read_npy(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .map_err(|e| Error::format(path, format!("not a .npy file: {e}")))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = npy.dtype().descr();
    let bad = |e: std::io::Error| Error::format(path, format!("reading {descr}: {e}"));
    let values: Vec<f64> = match descr.trim_matches('\'').trim_start_matches(['<', '|', '=']) {
        "f8" => npy.into_vec::<f64>().map_err(bad)?,
        "f4" => npy
            .into_vec::<f32>()
            .map_err(bad)?
            .into_iter()
            .map(f64::from)
            .collect(),
        "i8" => npy
            .into_vec::<i64>()
            .map_err(bad)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        "i4" => npy
            .into_vec::<i32>()
            .map_err(bad)?
            .into_iter()
            .map(f64::from)
            .collect(),
        other => return Err(Error::format(path, format!("unsupported dtype {other}"))),
    };
    Ok(Array { shape, values })
}

/// Precision the case is computed in: f32 is what kernels run; f64 checks the CPU reference
/// tightly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

/// Runs every case and returns the reports in order.
pub fn run_all(cases: &[Case], device: Device) -> Vec<CaseReport> {
    cases
        .iter()
        .map(|c| run_case(c, device, Precision::F32))
        .collect()
}

/// Prints one line per report and the summary `fixtures: N passed, M failed`; returns M.
pub fn print_reports(reports: &[CaseReport]) -> usize {
    for r in reports {
        println!("{}", r.line());
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    println!(
        "fixtures: {} passed, {} failed",
        reports.len() - failed,
        failed
    );
    failed
}

/// Runs one case on `device` and compares every expected array.
pub fn run_case(case: &Case, device: Device, precision: Precision) -> CaseReport {
    let mut report = CaseReport {
        name: case.name.clone(),
        kind: case.kind.clone(),
        path: crate::ops::backend_path(&case.kind, device),
        checks: Vec::new(),
        failure: None,
    };
    let tolerance = match precision {
        Precision::F32 => F32_TOLERANCE,
        Precision::F64 => 1e-9,
    };
    let mut check = Checker {
        case,
        tolerance,
        checks: &mut report.checks,
    };
    if let Err(e) = run_kind(case, device, precision, &mut check) {
        report.failure = Some(e.to_string());
    }
    report
}

struct Checker<'a> {
    case: &'a Case,
    tolerance: f64,
    checks: &'a mut Vec<Check>,
}

impl Checker<'_> {
    fn values(&mut self, output: &str, got: &[f64], got_shape: &[usize]) -> Result<()> {
        let want = self.case.array(output)?;
        let (error, shape_ok) = if want.shape.iter().product::<usize>() == got.len()
            && (want.shape == got_shape || got_shape.is_empty() && want.values.len() == 1)
        {
            (relative_error(got, &want.values), true)
        } else {
            (f64::INFINITY, false)
        };
        self.checks.push(Check {
            output: if shape_ok {
                output.to_string()
            } else {
                format!("{output} shape {got_shape:?} vs {:?}", want.shape)
            },
            error,
            passed: shape_ok && error <= self.tolerance,
        });
        Ok(())
    }

    fn tensor(&mut self, output: &str, got: &Tensor) -> Result<()> {
        self.values(output, &got.to_vec_f64(), got.shape())
    }

    fn scalar(&mut self, output: &str, got: f64) -> Result<()> {
        self.values(output, &[got], &[])
    }

    fn count(&mut self, output: &str, got: u64) -> Result<()> {
        let want = self
            .case
            .array(output)?
            .values
            .first()
            .copied()
            .unwrap_or(f64::NAN);
        let error = (got as f64 - want).abs();
        self.checks.push(Check {
            output: format!("{output}={got}"),
            error,
            passed: error == 0.0,
        });
        Ok(())
    }
}

/// `||got - want|| / max(||want||, 1e-12)`; NaN anywhere gives infinity.
pub fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().chain(want).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    diff / norm.max(1e-12)
}

fn run_kind(
    case: &Case,
    device: Device,
    precision: Precision,
    check: &mut Checker<'_>,
) -> Result<()> {
    use crate::ops::*;
    let t = |name: &str| case.tensor(name, precision, device);
    match case.kind.as_str() {
        "normalize" => {
            let x = t("x")?;
            check.tensor("y", &normalize(&x)?)?;
            check.tensor("grad_x", &normalize_backward(&x, &t("grad_y")?)?)?;
        }
        "infonce" => {
            let opts = InfoNceOptions {
                temperature: case.option_f64("temperature")?,
                normalize: case.options["normalize"].as_bool().unwrap_or(false),
                self_mask: case.options["self_mask"].as_bool().unwrap_or(false),
            };
            let out = infonce(&t("q")?, &t("k")?, &case.indices("positives")?, &opts)?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_q", &out.grad_q)?;
            check.tensor("grad_k", &out.grad_k)?;
        }
        "ntxent" => {
            let out = ntxent(
                &t("z")?,
                &NtXentOptions {
                    temperature: case.option_f64("temperature")?,
                },
            )?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_z", &out.grad_z)?;
        }
        "clip" => {
            let log_scale = case.array("log_scale")?.values[0];
            let out = clip(&t("a")?, &t("b")?, log_scale)?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_a", &out.grad_a)?;
            check.tensor("grad_b", &out.grad_b)?;
            check.scalar("grad_log_scale", out.grad_log_scale)?;
        }
        "moco" => {
            let (q, k) = (t("q")?, t("k")?);
            let mut queue = t("queue")?;
            let opts = MocoOptions {
                temperature: case.option_f64("temperature")?,
            };
            let out = moco(&q, &k, &queue, &opts)?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_q", &out.grad_q)?;
            let ptr = case.indices("ptr")?[0];
            let ptr_after = moco_enqueue(&mut queue, &k, ptr)?;
            check.tensor("queue_after", &queue)?;
            check.count("ptr_after", ptr_after as u64)?;
        }
        "supcon" => {
            let opts = SupConOptions {
                temperature: case.option_f64("temperature")?,
                base_temperature: case.option_f64("base_temperature")?,
            };
            let out = supcon(&t("features")?, &case.ints("labels")?, &opts)?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_features", &out.grad_features)?;
        }
        "triplet" => {
            let opts = TripletOptions {
                distance: match case.option_str("distance")? {
                    "euclidean" => Distance::Euclidean,
                    "squared_euclidean" => Distance::SquaredEuclidean,
                    "cosine" => Distance::Cosine,
                    other => {
                        return Err(Error::format(
                            &case.dir,
                            format!("unknown distance `{other}`"),
                        ))
                    }
                },
                mining: match case.option_str("mining")? {
                    "batch_all" => Mining::BatchAll,
                    "batch_hard" => Mining::BatchHard,
                    "semi_hard" => Mining::SemiHard,
                    other => {
                        return Err(Error::format(
                            &case.dir,
                            format!("unknown mining `{other}`"),
                        ))
                    }
                },
                margin: case.option_f64("margin")?,
            };
            let out = triplet(&t("x")?, &case.ints("labels")?, &opts)?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_x", &out.grad_x)?;
            check.count("count", out.count)?;
        }
        "margin" => {
            let opts = MarginOptions {
                margin: case.option_f64("margin")?,
            };
            let out = margin_loss(&t("x1")?, &t("x2")?, &case.ints("y")?, &opts)?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_x1", &out.grad_x1)?;
            check.tensor("grad_x2", &out.grad_x2)?;
        }
        "nce" => {
            let out = nce(&t("s_pos")?, &t("s_neg")?, &t("logq_pos")?, &t("logq_neg")?)?;
            check.scalar("loss", out.loss)?;
            check.tensor("grad_s_pos", &out.grad_s_pos)?;
            check.tensor("grad_s_neg", &out.grad_s_neg)?;
        }
        "momentum" => {
            let mut theta_k = t("theta_k")?;
            momentum_update(&mut theta_k, &t("theta_q")?, case.option_f64("m")?)?;
            check.tensor("theta_k_after", &theta_k)?;
        }
        other => return Err(Error::format(&case.dir, format!("unknown kind `{other}`"))),
    }
    Ok(())
}
