//! The fixture checker explains every mismatch: expected and actual values, an absolute error
//! for a zero reference, which side holds a NaN; an unknown kind is skipped and counted as a
//! failure; `count` and `base_temperature` are optional (issue 15, items 2 and 3).

mod common;

use std::path::{Path, PathBuf};

use contra::fixtures::{compare, print_reports, run_case, Case, Precision, F32_TOLERANCE};
use contra::Device;

/// A fresh copy of the reference case `name` of tests/fixtures under the temp dir.
fn copy_case(name: &str, test: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dst = std::env::temp_dir()
        .join(format!("contra-checker-{}-{test}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    dst
}

/// Writes `values` as a little-endian f8 `.npy` of `shape`.
fn write_f8(path: &Path, shape: &str, values: &[f64]) {
    std::fs::write(path, common::f8_npy(shape, values)).unwrap();
}

fn edit_json(dir: &Path, from: &str, to: &str) {
    let path = dir.join("case.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} not in {text}");
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

fn line_of(dir: &Path) -> (bool, String) {
    let report = run_case(&Case::load(dir).unwrap(), Device::Cpu, Precision::F32);
    (report.passed(), report.line())
}

#[test]
fn a_wrong_count_prints_both_values() {
    let dir = copy_case("triplet_batch_hard_euclidean", "count");
    let want = contra::fixtures::read_npy(&dir.join("count.npy"))
        .unwrap()
        .values[0];
    write_f8(&dir.join("count.npy"), "()", &[want + 3.0]);
    let (passed, line) = line_of(&dir);
    assert!(!passed, "{line}");
    let expected = format!("got {}, expected {}", want as u64, want as u64 + 3);
    assert!(line.contains(&expected), "{line}");
    assert!(line.contains("count 3.00e0 abs (!)"), "{line}");
}

#[test]
fn a_zero_reference_gives_an_absolute_error() {
    let check = compare("loss", &[6.35], &[0.0], F32_TOLERANCE);
    assert!(check.absolute && !check.passed);
    assert_eq!(check.error, 6.35);
    assert_eq!(
        check.detail.as_deref(),
        Some("got 6.350000e0, expected 0.000000e0")
    );
    // Within tolerance of a zero reference: an f32 result of 1e-7 passes.
    assert!(compare("grad", &[1e-7, -1e-7], &[0.0, 0.0], F32_TOLERANCE).passed);
    // In a case: a margin loss whose reference says 0.
    let dir = copy_case("margin_small", "zero");
    write_f8(&dir.join("loss.npy"), "()", &[0.0]);
    let (passed, line) = line_of(&dir);
    assert!(!passed && line.contains(" abs (!) [got "), "{line}");
    assert!(!line.contains("e12"), "{line}");
}

#[test]
fn a_nan_is_named_with_its_side() {
    let check = compare("grad", &[1.0, f64::NAN], &[1.0, 2.0], F32_TOLERANCE);
    assert_eq!(
        check.detail.as_deref(),
        Some("NaN in contra's output at index 1")
    );
    assert!(!check.passed);
    let check = compare("grad", &[1.0, 2.0], &[f64::NAN, 2.0], F32_TOLERANCE);
    assert_eq!(
        check.detail.as_deref(),
        Some("NaN in the reference at index 0")
    );
    let dir = copy_case("ntxent_small", "nan");
    write_f8(&dir.join("loss.npy"), "()", &[f64::NAN]);
    let (passed, line) = line_of(&dir);
    assert!(
        !passed && line.contains("NaN in the reference at index 0"),
        "{line}"
    );
    // A mismatched array says where it differs most.
    let check = compare("grad", &[1.0, 2.5, 3.0], &[1.0, 2.0, 3.0], F32_TOLERANCE);
    assert_eq!(
        check.detail.as_deref(),
        Some("got 2.500000e0, expected 2.000000e0 at index 1")
    );
}

#[test]
fn an_unknown_kind_is_skipped_and_fails() {
    let dir = copy_case("ntxent_small", "unknown");
    edit_json(&dir, "\"kind\": \"ntxent\"", "\"kind\": \"ntxent2\"");
    let report = run_case(&Case::load(&dir).unwrap(), Device::Interp, Precision::F32);
    assert!(!report.passed());
    assert_eq!(report.path, "not run");
    assert!(
        report.line().contains("skipped: unknown kind `ntxent2`"),
        "{}",
        report.line()
    );
    assert_eq!(print_reports(&[report]), 1);
}

#[test]
fn count_and_base_temperature_are_optional() {
    let dir = copy_case("triplet_batch_hard_euclidean", "no-count");
    edit_json(&dir, "\"count\": \"count.npy\",", "");
    let (passed, line) = line_of(&dir);
    assert!(passed && !line.contains("count"), "{line}");
    // supcon_two_views has base_temperature = temperature = 0.1.
    let dir = copy_case("supcon_two_views", "no-base");
    edit_json(&dir, "\"base_temperature\": 0.1,", "");
    let (passed, line) = line_of(&dir);
    assert!(passed, "{line}");
}

#[test]
fn fractional_labels_are_an_error() {
    let dir = copy_case("supcon_two_views", "fractional");
    let labels = contra::fixtures::read_npy(&dir.join("labels.npy")).unwrap();
    let mut values = labels.values.clone();
    values[1] += 0.5;
    write_f8(
        &dir.join("labels.npy"),
        &format!("({},)", values.len()),
        &values,
    );
    let report = run_case(&Case::load(&dir).unwrap(), Device::Cpu, Precision::F32);
    let failure = report.failure.unwrap();
    assert!(
        failure.contains("labels.npy") && failure.contains("must hold integers"),
        "{failure}"
    );
}
