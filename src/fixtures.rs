//! Reference cases: a folder per case with `case.json` (kind, options, array files) and `.npy`
//! arrays computed by PyTorch in float64. Every backend must reproduce them. Used by
//! `tests/fixtures.rs`, `tests/peers.rs` and `contra check-fixtures`.
//!
//! Options beyond tests/fixtures/README.md (each optional, defaulting to contra's convention):
//! supcon `base_temperature` (the temperature) and `reduction` (`all_anchors`,
//! `anchors_with_positives`); triplet `reduction` (`conventional`, `nonzero`, `all_mined`) and
//! the mining `semi_hard_all`; margin `variant` (`hadsell`, `pml_contrastive`). A triplet case's
//! `count` array is optional. Labels must be integers.

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
    /// `||out - ref|| / ||ref||`; `||out - ref||` where the reference is zero (`absolute`);
    /// `|out - ref|` for exact counts.
    pub error: f64,
    /// The error is absolute: the reference is zero (its norm below 1e-12), or a count.
    pub absolute: bool,
    pub passed: bool,
    /// On a mismatch, what contra gave against what the reference holds (and where), or which
    /// side holds a NaN.
    pub detail: Option<String>,
}

impl Check {
    fn describe(&self) -> String {
        let abs = if self.absolute { " abs" } else { "" };
        match (&self.detail, self.passed) {
            (_, true) => format!("{} {:.2e}{abs}", self.output, self.error),
            (Some(detail), false) => {
                format!("{} {:.2e}{abs} (!) [{detail}]", self.output, self.error)
            }
            (None, false) => format!("{} {:.2e}{abs} (!)", self.output, self.error),
        }
    }
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
                .map(Check::describe)
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

    /// The file of the array named `name` in `case.json`.
    fn array_path(&self, name: &str) -> Result<PathBuf> {
        let file = self.arrays.get(name).ok_or_else(|| {
            Error::format(self.dir.join("case.json"), format!("no array `{name}`"))
        })?;
        Ok(self.dir.join(file))
    }

    /// Reads the array named `name` in `case.json`.
    pub fn array(&self, name: &str) -> Result<Array> {
        read_npy(&self.array_path(name)?)
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

    /// The only value of the array `name`: an error unless it holds exactly one.
    fn single_value(&self, name: &str) -> Result<f64> {
        let path = self.array_path(name)?;
        single_of(&read_npy(&path)?, name, &path)
    }

    /// The array `name` as integers: every value must be finite and integral (3.0 is accepted,
    /// 2.7 or NaN are errors naming the file and the index of the first bad value).
    fn ints(&self, name: &str) -> Result<Vec<i64>> {
        let path = self.array_path(name)?;
        ints_of(&read_npy(&path)?.values, name, &path)
    }

    /// The array `name` as non-negative integers (indices).
    fn indices(&self, name: &str) -> Result<Vec<usize>> {
        let path = self.array_path(name)?;
        self.ints(name)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                usize::try_from(v).map_err(|_| {
                    Error::format(
                        &path,
                        format!("`{name}` holds negative index {v} at index {i}"),
                    )
                })
            })
            .collect()
    }

    /// The only value of the array `name` as a non-negative integer.
    fn single_index(&self, name: &str) -> Result<usize> {
        let path = self.array_path(name)?;
        let v = single_of(&read_npy(&path)?, name, &path)?;
        let v = ints_of(&[v], name, &path)?[0];
        usize::try_from(v)
            .map_err(|_| Error::format(&path, format!("`{name}` holds negative value {v}")))
    }

    /// A boolean option: false when absent, an error when present but not a boolean.
    fn option_bool(&self, key: &str) -> Result<bool> {
        match &self.options[key] {
            serde_json::Value::Null => Ok(false),
            v => v.as_bool().ok_or_else(|| {
                Error::format(
                    self.dir.join("case.json"),
                    format!("options.{key} is {v}, not a boolean"),
                )
            }),
        }
    }

    fn option_f64(&self, key: &str) -> Result<f64> {
        self.options[key].as_f64().ok_or_else(|| {
            Error::format(
                self.dir.join("case.json"),
                format!("options.{key} is not a number"),
            )
        })
    }

    /// A number option, `default` when absent.
    fn option_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match &self.options[key] {
            serde_json::Value::Null => Ok(default),
            _ => self.option_f64(key),
        }
    }

    /// A string option, `default` when absent.
    fn option_str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        match &self.options[key] {
            serde_json::Value::Null => Ok(default),
            _ => self.option_str(key),
        }
    }

    /// The error for option `key` holding a value the checker does not know.
    fn unknown_option(&self, key: &str, value: &str) -> Error {
        Error::format(
            self.dir.join("case.json"),
            format!("options.{key} = `{value}` is not one the checker knows"),
        )
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
///
/// Only C-order arrays of `f8`, `f4`, `i8` and `i4` (either byte order) are accepted. The
/// shape's element count and byte size are computed with checked arithmetic and the payload
/// must hold exactly that many bytes; any other file is an [`Error::Format`] naming it.
pub fn read_npy(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(&bytes, path)
}

/// Largest integer an f64 holds exactly (2^53); larger `i8` values are refused.
const F64_EXACT_INT: i64 = 1 << 53;

/// Nesting depth accepted in a `.npy` header (numpy writes depth 2: a dict holding a tuple).
const NPY_MAX_DEPTH: usize = 8;

/// Parses the bytes of a `.npy` file; `path` names it in errors.
fn parse_npy(bytes: &[u8], path: &Path) -> Result<Array> {
    let bad = |reason: String| Error::format(path, reason);
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(format!(
            "not a .npy file: {} bytes without the \\x93NUMPY magic and header length",
            bytes.len()
        )));
    }
    let (prefix, header_len): (usize, usize) = match (bytes[6], bytes[7]) {
        (1, 0) => (10, usize::from(u16::from_le_bytes([bytes[8], bytes[9]]))),
        (2, 0) | (3, 0) if bytes.len() >= 12 => {
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            let len = usize::try_from(len)
                .map_err(|_| bad(format!("header length {len} does not fit in memory")))?;
            (12, len)
        }
        (2, 0) | (3, 0) => return Err(bad("truncated .npy header length".into())),
        (major, minor) => {
            return Err(bad(format!(
                "unsupported .npy version {major}.{minor} (1.0, 2.0 and 3.0 are read)"
            )))
        }
    };
    let data_start = prefix
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "truncated: the header says it is {header_len} bytes, the file holds {} after \
                 the {prefix}-byte prefix",
                bytes.len() - prefix
            ))
        })?;
    let text = std::str::from_utf8(&bytes[prefix..data_start])
        .map_err(|e| bad(format!("header is not UTF-8 text: {e}")))?;
    let header = PyParser::parse(text).map_err(|e| bad(format!("bad header {text:?}: {e}")))?;
    let PyValue::Dict(entries) = header else {
        return Err(bad(format!("header {text:?} is not a dict")));
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (key, value) in entries {
        match (key.as_str(), value) {
            ("descr", PyValue::Str(s)) => descr = Some(s),
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Seq(dims)) => shape = Some(dims),
            (key, value) => {
                return Err(bad(format!(
                    "unexpected header entry {key:?}: {value:?} (expected the string `descr`, \
                     the boolean `fortran_order` and the tuple `shape`)"
                )))
            }
        }
    }
    let missing = |key: &str| bad(format!("header {text:?} has no `{key}`"));
    let descr = descr.ok_or_else(|| missing("descr"))?;
    let fortran = fortran.ok_or_else(|| missing("fortran_order"))?;
    let dims = shape.ok_or_else(|| missing("shape"))?;
    // The shape as written, for messages (Python tuple syntax).
    let shape_text = format!(
        "({}{})",
        dims.iter()
            .map(|d| match d {
                PyValue::Int(v) => v.to_string(),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        if dims.len() == 1 { "," } else { "" }
    );
    let mut shape = Vec::with_capacity(dims.len());
    for d in &dims {
        let extent = match d {
            PyValue::Int(v) => usize::try_from(*v).map_err(|_| {
                bad(format!(
                    "shape {shape_text}: extent {v} is negative or does not fit in memory"
                ))
            })?,
            other => {
                return Err(bad(format!(
                    "shape {shape_text}: extent {other:?} is not an integer"
                )))
            }
        };
        shape.push(extent);
    }
    if fortran {
        return Err(bad(format!(
            "fortran_order arrays are not supported, save with C order \
             (np.save(path, np.ascontiguousarray(a))); shape {shape_text}"
        )));
    }
    let (order, kind) = match descr.as_bytes() {
        [o @ (b'<' | b'>' | b'=' | b'|'), rest @ ..] => (*o, rest),
        _ => (b'=', descr.as_bytes()),
    };
    let big = order == b'>' || order == b'=' && cfg!(target_endian = "big");
    let item: usize = match kind {
        b"f8" | b"i8" => 8,
        b"f4" | b"i4" => 4,
        _ => {
            return Err(bad(format!(
                "unsupported dtype {descr:?} (f8, f4, i8 and i4 are read)"
            )))
        }
    };
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            bad(format!(
                "shape {shape_text} overflows: its element count does not fit in 64 bits"
            ))
        })?;
    let size = count.checked_mul(item).ok_or_else(|| {
        bad(format!(
            "shape {shape_text} overflows: {count} elements of {item} bytes do not fit in 64 bits"
        ))
    })?;
    let payload = &bytes[data_start..];
    if payload.len() != size {
        return Err(bad(format!(
            "{}: shape {shape_text} of {descr} needs {size} data bytes, the file holds {}",
            if payload.len() < size {
                "truncated"
            } else {
                "trailing bytes"
            },
            payload.len()
        )));
    }
    let word = |c: &[u8]| -> u64 {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        if big {
            b[..c.len()].reverse();
        }
        u64::from_le_bytes(b)
    };
    let chunks = payload.chunks_exact(item);
    let values: Vec<f64> = match kind {
        b"f8" => chunks.map(|c| f64::from_bits(word(c))).collect(),
        b"f4" => chunks
            .map(|c| f64::from(f32::from_bits(word(c) as u32)))
            .collect(),
        b"i4" => chunks.map(|c| f64::from(word(c) as u32 as i32)).collect(),
        _ => {
            let ints: Vec<i64> = chunks.map(|c| word(c) as i64).collect();
            if let Some((i, v)) = ints
                .iter()
                .enumerate()
                .find(|(_, v)| v.unsigned_abs() > F64_EXACT_INT as u64)
            {
                return Err(bad(format!(
                    "int64 value {v} at index {i} is beyond 2^53 and has no exact f64 value"
                )));
            }
            ints.into_iter().map(|v| v as f64).collect()
        }
    };
    Ok(Array { shape, values })
}

/// The only value of `a`; `name` and `path` name the array in errors.
fn single_of(a: &Array, name: &str, path: &Path) -> Result<f64> {
    match a.values[..] {
        [v] => Ok(v),
        _ => Err(Error::format(
            path,
            format!(
                "`{name}` must hold exactly one value, it holds {} (shape {:?})",
                a.values.len(),
                a.shape
            ),
        )),
    }
}

/// `values` as integers; `name` and `path` name the array in errors.
fn ints_of(values: &[f64], name: &str, path: &Path) -> Result<Vec<i64>> {
    // i64::MIN is -2^63 exactly; 2^63 itself is out of range.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v.is_finite() && v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v) {
                Ok(v as i64)
            } else {
                Err(Error::format(
                    path,
                    format!("`{name}` must hold integers, but value {v} at index {i} is not one"),
                ))
            }
        })
        .collect()
}

/// A Python literal of a `.npy` header.
#[derive(Debug)]
enum PyValue {
    Dict(Vec<(String, PyValue)>),
    /// A tuple or a list.
    Seq(Vec<PyValue>),
    Str(String),
    Bool(bool),
    None,
    Int(i128),
}

/// A recursive-descent parser for the Python literals numpy writes in `.npy` headers.
struct PyParser<'a> {
    text: &'a str,
    pos: usize,
}

impl PyParser<'_> {
    fn parse(text: &str) -> std::result::Result<PyValue, String> {
        let mut p = PyParser { text, pos: 0 };
        let value = p.value(0)?;
        p.skip_ws();
        if p.pos != text.len() {
            return Err(format!(
                "unexpected text after the literal at byte {}",
                p.pos
            ));
        }
        Ok(value)
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    /// Skips whitespace, then consumes `c` if it comes next.
    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> std::result::Result<PyValue, String> {
        if depth > NPY_MAX_DEPTH {
            return Err(format!("nested deeper than {NPY_MAX_DEPTH} levels"));
        }
        self.skip_ws();
        let at = self.pos;
        if self.eat('{') {
            let mut entries = Vec::new();
            while !self.eat('}') {
                let key = match self.value(depth + 1)? {
                    PyValue::Str(s) => s,
                    other => return Err(format!("dict key {other:?} is not a string")),
                };
                if !self.eat(':') {
                    return Err(format!("expected `:` after key {key:?}"));
                }
                let value = self.value(depth + 1)?;
                if entries.iter().any(|(k, _)| *k == key) {
                    return Err(format!("duplicate key {key:?}"));
                }
                entries.push((key, value));
                if !self.eat(',') && !self.rest().trim_start().starts_with('}') {
                    return Err(format!("expected `,` or `}}` at byte {}", self.pos));
                }
            }
            return Ok(PyValue::Dict(entries));
        }
        for (open, close) in [('(', ')'), ('[', ']')] {
            if self.eat(open) {
                let mut items = Vec::new();
                while !self.eat(close) {
                    items.push(self.value(depth + 1)?);
                    if !self.eat(',') && !self.rest().trim_start().starts_with(close) {
                        return Err(format!("expected `,` or `{close}` at byte {}", self.pos));
                    }
                }
                return Ok(PyValue::Seq(items));
            }
        }
        let rest = self.rest();
        if let Some(quote) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') {
            let mut s = String::new();
            let mut chars = rest[1..].char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    c if c == quote => {
                        self.pos += 1 + i + 1;
                        return Ok(PyValue::Str(s));
                    }
                    '\\' => match chars.next() {
                        Some((_, e)) => s.push(e),
                        None => break,
                    },
                    c => s.push(c),
                }
            }
            return Err(format!("unterminated string at byte {at}"));
        }
        for (word, value) in [("True", true), ("False", false)] {
            if rest.starts_with(word) {
                self.pos += word.len();
                return Ok(PyValue::Bool(value));
            }
        }
        if rest.starts_with("None") {
            self.pos += 4;
            return Ok(PyValue::None);
        }
        let sign_len = usize::from(rest.starts_with(['-', '+']));
        let digits = rest[sign_len..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        if digits == 0 {
            return Err(format!(
                "unexpected {:?} at byte {at}",
                rest.chars()
                    .next()
                    .map_or(String::from("end"), String::from)
            ));
        }
        let literal = &rest[..sign_len + digits];
        let v: i128 = literal
            .parse()
            .map_err(|_| format!("integer {literal} is too large"))?;
        self.pos += literal.len();
        // Python 2 wrote long integers with an `L` suffix.
        if self.rest().starts_with(['L', 'l']) {
            self.pos += 1;
        }
        Ok(PyValue::Int(v))
    }
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

/// The kinds the checker runs.
pub const KINDS: &[&str] = &[
    "normalize",
    "infonce",
    "ntxent",
    "clip",
    "siglip",
    "moco",
    "supcon",
    "triplet",
    "margin",
    "nce",
    "momentum",
];

/// Runs one case on `device` and compares every expected array. A case of a kind the checker
/// does not know is reported as skipped, and counts as a failure.
pub fn run_case(case: &Case, device: Device, precision: Precision) -> CaseReport {
    if !KINDS.contains(&case.kind.as_str()) {
        return CaseReport {
            name: case.name.clone(),
            kind: case.kind.clone(),
            path: "not run".into(),
            checks: Vec::new(),
            failure: Some(format!("skipped: unknown kind `{}`", case.kind)),
        };
    }
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
        let shape_ok = want.shape.iter().product::<usize>() == got.len()
            && (want.shape == got_shape || got_shape.is_empty() && want.values.len() == 1);
        let check = if shape_ok {
            compare(output, got, &want.values, self.tolerance)
        } else {
            Check {
                output: output.to_string(),
                error: f64::INFINITY,
                absolute: false,
                passed: false,
                detail: Some(format!("shape {got_shape:?}, expected {:?}", want.shape)),
            }
        };
        self.checks.push(check);
        Ok(())
    }

    fn tensor(&mut self, output: &str, got: &Tensor) -> Result<()> {
        self.values(output, &got.to_vec_f64()?, got.shape())
    }

    fn scalar(&mut self, output: &str, got: f64) -> Result<()> {
        self.values(output, &[got], &[])
    }

    /// An exact count; skipped when the case has no such array (it is optional).
    fn count(&mut self, output: &str, got: u64) -> Result<()> {
        if !self.case.arrays.contains_key(output) {
            return Ok(());
        }
        let want = self.case.single_index(output)? as u64;
        self.checks.push(Check {
            output: output.to_string(),
            error: got.abs_diff(want) as f64,
            absolute: true,
            passed: got == want,
            detail: (got != want).then(|| format!("got {got}, expected {want}")),
        });
        Ok(())
    }
}

/// Compares `got` with the reference `want` (same length): the relative norm error, or the
/// absolute one where the reference is zero; on a mismatch, the values where they differ most,
/// or the first NaN and whose it is.
pub fn compare(output: &str, got: &[f64], want: &[f64], tolerance: f64) -> Check {
    let nan = |side: &str, values: &[f64]| {
        values
            .iter()
            .position(|v| v.is_nan())
            .map(|i| format!("NaN in {side} at index {i}"))
    };
    if let Some(detail) = nan("contra's output", got).or_else(|| nan("the reference", want)) {
        return Check {
            output: output.to_string(),
            error: f64::NAN,
            absolute: false,
            passed: false,
            detail: Some(detail),
        };
    }
    let (error, absolute) = error_of(got, want);
    let passed = error <= tolerance;
    let detail = (!passed).then(|| {
        let (i, _) = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold(
                (0, -1.0),
                |best, (i, d)| if d > best.1 { (i, d) } else { best },
            );
        let at = if want.len() == 1 {
            String::new()
        } else {
            format!(" at index {i}")
        };
        format!("got {:.6e}, expected {:.6e}{at}", got[i], want[i])
    });
    Check {
        output: output.to_string(),
        error,
        absolute,
        passed,
        detail,
    }
}

/// `||got - want|| / ||want||`, or `||got - want||` when `||want||` is below 1e-12 (`true`);
/// infinity for a NaN or a length mismatch.
fn error_of(got: &[f64], want: &[f64]) -> (f64, bool) {
    if got.len() != want.len() || got.iter().chain(want).any(|v| v.is_nan()) {
        return (f64::INFINITY, false);
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    if norm < 1e-12 {
        (diff, true)
    } else {
        (diff / norm, false)
    }
}

/// `||got - want|| / ||want||` (the absolute error for a zero reference); NaN anywhere gives
/// infinity.
pub fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    error_of(got, want).0
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
                normalize: case.option_bool("normalize")?,
                self_mask: case.option_bool("self_mask")?,
            };
            let out = infonce(&t("q")?, &t("k")?, &case.indices("positives")?, &opts)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
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
            check.scalar("loss", out.loss.to_scalar()?)?;
            check.tensor("grad_z", &out.grad_z)?;
        }
        "clip" => {
            let log_scale = case.single_value("log_scale")?;
            let out = clip(&t("a")?, &t("b")?, log_scale)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
            check.tensor("grad_a", &out.grad_a)?;
            check.tensor("grad_b", &out.grad_b)?;
            check.scalar("grad_log_scale", out.grad_log_scale.to_scalar()?)?;
        }
        "siglip" => {
            let opts = SigLipOptions {
                normalize: case.option_bool("normalize")?,
                negatives_only: case.option_bool("negatives_only")?,
            };
            match case.option_str_or("reduction", "sum over pairs / N")? {
                "sum over pairs / N" => {}
                other => return Err(case.unknown_option("reduction", other)),
            }
            let (a, b) = (t("a")?, t("b")?);
            let (log_scale, bias) = (case.single_value("log_scale")?, case.single_value("bias")?);
            let out = siglip(&a, &b, log_scale, bias, &opts)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
            check.tensor("grad_a", &out.grad_a)?;
            check.tensor("grad_b", &out.grad_b)?;
            check.scalar("grad_log_scale", out.grad_log_scale.to_scalar()?)?;
            check.scalar("grad_bias", out.grad_bias.to_scalar()?)?;
            // The two-call form, from the same inputs.
            let loss = siglip_forward(&a, &b, log_scale, bias, &opts)?;
            check.scalar("loss", loss.to_scalar()?)?;
            let grads = siglip_backward(&a, &b, log_scale, bias, &opts, 1.0)?;
            check.tensor("grad_a", &grads.grad_a)?;
            check.scalar("grad_bias", grads.grad_bias.to_scalar()?)?;
        }
        "moco" => {
            let (q, k) = (t("q")?, t("k")?);
            let mut queue = t("queue")?;
            let opts = MocoOptions {
                temperature: case.option_f64("temperature")?,
            };
            let out = moco(&q, &k, &queue, &opts)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
            check.tensor("grad_q", &out.grad_q)?;
            let ptr = case.single_index("ptr")?;
            let ptr_after = moco_enqueue(&mut queue, &k, ptr)?;
            check.tensor("queue_after", &queue)?;
            check.count("ptr_after", ptr_after as u64)?;
        }
        "supcon" => {
            let temperature = case.option_f64("temperature")?;
            let opts = SupConOptions {
                temperature,
                // Optional (PML and TF-Addons have none): the temperature itself.
                base_temperature: case.option_f64_or("base_temperature", temperature)?,
                reduction: match case.option_str_or("reduction", "all_anchors")? {
                    "all_anchors" => SupConReduction::AllAnchors,
                    "anchors_with_positives" => SupConReduction::AnchorsWithPositives,
                    other => return Err(case.unknown_option("reduction", other)),
                },
            };
            let out = supcon(&t("features")?, &case.ints("labels")?, &opts)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
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
                    "semi_hard_all" => Mining::SemiHardAll,
                    other => return Err(case.unknown_option("mining", other)),
                },
                margin: case.option_f64("margin")?,
                reduction: match case.option_str_or("reduction", "conventional")? {
                    "conventional" => TripletReduction::Conventional,
                    "nonzero" => TripletReduction::NonZero,
                    "all_mined" => TripletReduction::AllMined,
                    other => return Err(case.unknown_option("reduction", other)),
                },
            };
            let out = triplet(&t("x")?, &case.ints("labels")?, &opts)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
            check.tensor("grad_x", &out.grad_x)?;
            check.count("count", out.counts.count()?)?;
        }
        "margin" => {
            let opts = MarginOptions {
                margin: case.option_f64("margin")?,
                variant: match case.option_str_or("variant", "hadsell")? {
                    "hadsell" => MarginVariant::Hadsell,
                    "pml_contrastive" => MarginVariant::PmlContrastive,
                    other => return Err(case.unknown_option("variant", other)),
                },
            };
            let out = margin_loss(&t("x1")?, &t("x2")?, &case.ints("y")?, &opts)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
            check.tensor("grad_x1", &out.grad_x1)?;
            check.tensor("grad_x2", &out.grad_x2)?;
        }
        "nce" => {
            let out = nce(&t("s_pos")?, &t("s_neg")?, &t("logq_pos")?, &t("logq_neg")?)?;
            check.scalar("loss", out.loss.to_scalar()?)?;
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
