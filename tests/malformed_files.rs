//! Malformed files read by the library or the `contra` command line are errors that name the
//! file and the problem, never a panic, an abort or a silently wrong value (issue 13, part 6).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{f8_npy, npy};

use contra::data::parse_digits_csv;
use contra::fixtures::{read_npy, run_case, Case, Precision};
use contra::nn::{Encoder, MlpSpec};
use contra::train::checkpoint::{load_checkpoint, save_checkpoint};
use contra::train::idx::{load_idx_dataset, read_idx, write_idx};
use contra::Device;

/// A fresh, empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("contra-malformed-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `read_npy` of `bytes` written to `dir/name`: the error message, which must name the file.
fn npy_error(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = read_npy(&path)
        .expect_err("a malformed .npy must be an error")
        .to_string();
    assert!(err.contains(name), "the error names the file: {err}");
    err
}

/// Copies the reference case `name` of tests/fixtures into `dir`.
fn copy_case(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    dst
}

/// Runs the case in `dir` on the CPU: the failure message, which must name `file`.
fn case_failure(dir: &Path, file: &str) -> String {
    let case = Case::load(dir).unwrap();
    let report = run_case(&case, Device::Cpu, Precision::F64);
    let failure = report
        .failure
        .clone()
        .unwrap_or_else(|| panic!("the case must fail: {}", report.line()));
    assert!(failure.contains(file), "the error names {file}: {failure}");
    failure
}

/// Check 1: the element count and byte size of an npy shape use checked arithmetic.
#[test]
fn npy_shape_overflow_is_an_error() {
    let dir = temp_dir("npy-overflow");
    // 2 * (2^63 + 1) wraps to 2, and the file holds 2 elements.
    let wraps = f8_npy("(2, 9223372036854775809)", &[1.0, 2.0]);
    let err = npy_error(&dir, "wraps.npy", &wraps);
    assert!(
        err.contains("overflows") && err.contains("(2, 9223372036854775809)"),
        "{err}"
    );
    // 2^61 elements fit, 2^61 * 8 bytes wrap to 0: an empty payload.
    let bytes_wrap = npy(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (2305843009213693952,), }",
        &[],
    );
    let err = npy_error(&dir, "bytes_wrap.npy", &bytes_wrap);
    assert!(
        err.contains("overflows") && err.contains("8 bytes"),
        "{err}"
    );

    // The reproducer of the issue: `check-fixtures` reached a segfault.
    let case = copy_case("ntxent_small", &dir);
    std::fs::write(case.join("z.npy"), &wraps).unwrap();
    let failure = case_failure(&case, "z.npy");
    assert!(failure.contains("overflows"), "{failure}");
    let out = Command::new(env!("CARGO_BIN_EXE_contra"))
        .args(["check-fixtures", "--device", "cpu"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL ntxent_small") && stdout.contains("overflows"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Check 1: the payload must hold exactly the bytes of the shape.
#[test]
fn npy_payload_must_match_the_shape() {
    let dir = temp_dir("npy-payload");
    let short = f8_npy("(3,)", &[1.0, 2.0]);
    let err = npy_error(&dir, "short.npy", &short);
    assert!(
        err.contains("truncated") && err.contains("needs 24 data bytes") && err.contains("16"),
        "{err}"
    );
    let long = f8_npy("(3,)", &[1.0, 2.0, 3.0, 4.0]);
    let err = npy_error(&dir, "long.npy", &long);
    assert!(err.contains("trailing bytes"), "{err}");
    // A correct file still reads, scalars included.
    let ok = dir.join("ok.npy");
    std::fs::write(&ok, f8_npy("(2, 1)", &[1.5, -2.0])).unwrap();
    let a = read_npy(&ok).unwrap();
    assert_eq!((a.shape, a.values), (vec![2, 1], vec![1.5, -2.0]));
    std::fs::write(&ok, f8_npy("()", &[7.0])).unwrap();
    assert_eq!(read_npy(&ok).unwrap().values, vec![7.0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sweep: malformed headers are errors naming the problem (no panic, no huge allocation).
#[test]
fn npy_bad_headers_are_errors() {
    let dir = temp_dir("npy-headers");
    let header = |dict: &str| npy(dict, &[0; 8]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.npy", vec![], "not a .npy file"),
        (
            "magic.npy",
            b"PK\x03\x04 not numpy".to_vec(),
            "not a .npy file",
        ),
        (
            "version.npy",
            b"\x93NUMPY\x09\x00\x10\x00".to_vec(),
            "version 9.0",
        ),
        (
            "cut_header.npy",
            b"\x93NUMPY\x01\x00\xff\x00{'descr'".to_vec(),
            "truncated",
        ),
        (
            "huge_header.npy",
            b"\x93NUMPY\x02\x00\xff\xff\xff\xff{".to_vec(),
            "truncated",
        ),
        ("not_dict.npy", header("(1, 2)"), "not a dict"),
        ("syntax.npy", header("{'descr': '<f8', "), "bad header"),
        (
            "no_shape.npy",
            header("{'descr': '<f8', 'fortran_order': False}"),
            "no `shape`",
        ),
        (
            "negative.npy",
            header("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,)}"),
            "extent -1 is negative",
        ),
        (
            "float_extent.npy",
            header("{'descr': '<f8', 'fortran_order': False, 'shape': (1.0,)}"),
            "bad header",
        ),
        (
            "big_int.npy",
            header(
                "{'descr': '<f8', 'fortran_order': False, \
                 'shape': (99999999999999999999999999999999999999999,)}",
            ),
            "too large",
        ),
        (
            "deep.npy",
            header(&format!(
                "{{'descr': {}1{}}}",
                "(".repeat(500),
                ")".repeat(500)
            )),
            "nested deeper",
        ),
        (
            "dtype.npy",
            header("{'descr': '<c16', 'fortran_order': False, 'shape': (1,)}"),
            "unsupported dtype",
        ),
        (
            "record.npy",
            header("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,)}"),
            "unexpected header entry",
        ),
        (
            "order_type.npy",
            header("{'descr': '<f8', 'fortran_order': 0, 'shape': (1,)}"),
            "unexpected header entry",
        ),
    ];
    for (name, bytes, reason) in cases {
        let err = npy_error(&dir, name, &bytes);
        assert!(err.contains(reason), "{name}: expected {reason:?} in {err}");
    }
    // int64 values beyond 2^53 have no exact f64 value.
    let big = npy(
        "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }",
        &[1i64, (1 << 53) + 1]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    );
    let err = npy_error(&dir, "big.npy", &big);
    assert!(err.contains("index 1") && err.contains("2^53"), "{err}");
    // Big-endian and int32 files read correctly.
    let path = dir.join("be.npy");
    let payload: Vec<u8> = [-3i32, 5].iter().flat_map(|v| v.to_be_bytes()).collect();
    std::fs::write(
        &path,
        npy(
            "{'descr': '>i4', 'fortran_order': False, 'shape': (2,), }",
            &payload,
        ),
    )
    .unwrap();
    assert_eq!(read_npy(&path).unwrap().values, vec![-3.0, 5.0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Check 3: Fortran-order arrays are refused, not read as C order.
#[test]
fn npy_fortran_order_is_refused() {
    let dir = temp_dir("npy-fortran");
    let bytes = npy(
        "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }",
        &[1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    );
    let err = npy_error(&dir, "fortran.npy", &bytes);
    assert!(
        err.contains("fortran_order arrays are not supported, save with C order"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Check 2: a single-value array (`log_scale`, `ptr`, counts) must hold exactly one value.
#[test]
fn empty_scalar_arrays_are_errors() {
    let dir = temp_dir("scalars");
    let empty = f8_npy("(0,)", &[]);
    let clip = copy_case("clip_small", &dir);
    std::fs::write(clip.join("log_scale.npy"), &empty).unwrap();
    let failure = case_failure(&clip, "log_scale.npy");
    assert!(
        failure.contains("must hold exactly one value, it holds 0"),
        "{failure}"
    );
    let moco = copy_case("moco_small", &dir);
    std::fs::write(moco.join("ptr.npy"), &empty).unwrap();
    let failure = case_failure(&moco, "ptr.npy");
    assert!(
        failure.contains("must hold exactly one value, it holds 0"),
        "{failure}"
    );
    // Two values where one is expected.
    let moco = copy_case("moco_wrap", &dir);
    std::fs::write(moco.join("ptr_after.npy"), f8_npy("(2,)", &[1.0, 2.0])).unwrap();
    let failure = case_failure(&moco, "ptr_after.npy");
    assert!(
        failure.contains("must hold exactly one value, it holds 2"),
        "{failure}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Check 4: integer arrays (y, labels, positives) refuse non-integral and non-finite floats,
/// naming the file and the index of the first bad value; integral floats are accepted.
#[test]
fn non_integral_integer_arrays_are_errors() {
    let dir = temp_dir("ints");
    let case = copy_case("margin_small", &dir);
    let y = read_npy(&case.join("y.npy")).unwrap();
    let shape = format!("({},)", y.values.len());
    // Integral floats: the case still passes.
    std::fs::write(case.join("y.npy"), f8_npy(&shape, &y.values)).unwrap();
    let report = run_case(&Case::load(&case).unwrap(), Device::Cpu, Precision::F64);
    assert!(report.passed(), "{}", report.line());
    // y = 0.5 was read as 0.
    let mut bad = y.values.clone();
    bad[2] = 0.5;
    std::fs::write(case.join("y.npy"), f8_npy(&shape, &bad)).unwrap();
    let failure = case_failure(&case, "y.npy");
    assert!(
        failure.contains("`y` must hold integers, but value 0.5 at index 2"),
        "{failure}"
    );

    // NaN labels were read as 0.
    let case = copy_case("supcon_two_views", &dir);
    let labels = read_npy(&case.join("labels.npy")).unwrap();
    let mut bad = labels.values.clone();
    bad[1] = f64::NAN;
    let shape = format!("({},)", bad.len());
    std::fs::write(case.join("labels.npy"), f8_npy(&shape, &bad)).unwrap();
    let failure = case_failure(&case, "labels.npy");
    assert!(
        failure.contains("`labels` must hold integers, but value NaN at index 1"),
        "{failure}"
    );

    // Positive index 2.7 was read as 2.
    let case = copy_case("infonce_pairs", &dir);
    let pos = read_npy(&case.join("positives.npy")).unwrap();
    let mut bad = pos.values.clone();
    bad[0] = 2.7;
    let shape = format!("({},)", bad.len());
    std::fs::write(case.join("positives.npy"), f8_npy(&shape, &bad)).unwrap();
    let failure = case_failure(&case, "positives.npy");
    assert!(
        failure.contains("`positives` must hold integers, but value 2.7 at index 0"),
        "{failure}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny checkpoint whose `backbone_spec` metadata has `widths` replaced.
fn checkpoint_with_widths(dir: &Path, name: &str, widths: serde_json::Value) -> PathBuf {
    let encoder = Encoder::new(&MlpSpec::backbone(&[4, 3]), &MlpSpec::new(&[3, 2]), 7).unwrap();
    let path = dir.join(name);
    save_checkpoint(&path, &encoder, 7, &[("method", "simclr".into())]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = &mut header["__metadata__"];
    let mut spec: serde_json::Value =
        serde_json::from_str(meta["backbone_spec"].as_str().unwrap()).unwrap();
    spec["widths"] = widths;
    meta["backbone_spec"] = spec.to_string().into();
    let mut text = header.to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    path
}

/// Check 5: checkpoint metadata is bounded (checked arithmetic, a cap, and the sizes stored
/// in the file) before the encoder is allocated.
#[test]
fn checkpoint_metadata_is_bounded_before_allocating() {
    let dir = temp_dir("checkpoint");
    // Unchanged widths load.
    let ok = checkpoint_with_widths(&dir, "ok.safetensors", serde_json::json!([4, 3]));
    assert_eq!(load_checkpoint(&ok).unwrap().encoder.in_features(), 4);
    // 1 TB of parameters: refused by the cap before allocating.
    let huge = checkpoint_with_widths(
        &dir,
        "huge.safetensors",
        serde_json::json!([4, 4_000_000_000u64, 3]),
    );
    let err = load_checkpoint(&huge).unwrap_err().to_string();
    assert!(
        err.contains("huge.safetensors")
            && err.contains("more than 2147483648 parameters")
            && err.contains("4000000000"),
        "{err}"
    );
    // Products that overflow.
    let overflow = checkpoint_with_widths(
        &dir,
        "overflow.safetensors",
        serde_json::json!([4, 1u64 << 62, 1u64 << 62, 3]),
    );
    let err = load_checkpoint(&overflow).unwrap_err().to_string();
    assert!(err.contains("overflows"), "{err}");
    // Small, but not what the file stores.
    let other = checkpoint_with_widths(&dir, "other.safetensors", serde_json::json!([4, 1000, 3]));
    let err = load_checkpoint(&other).unwrap_err().to_string();
    assert!(
        err.contains("other.safetensors")
            && err.contains("12 tensors of")
            && err.contains("but the file stores 7 tensors of 32 values"),
        "{err}"
    );
    // The command line of the issue: `contra eval` aborted allocating 1 TB.
    let out = Command::new(env!("CARGO_BIN_EXE_contra"))
        .arg("eval")
        .arg("--checkpoint")
        .arg(&huge)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: ") && stderr.contains("more than 2147483648 parameters"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sweep: IDX headers whose extents overflow, and image files with no images.
#[test]
fn idx_overflow_and_empty_files_are_errors() {
    let dir = temp_dir("idx");
    let path = dir.join("overflow");
    let mut bytes = vec![0u8, 0, 8, 3];
    for _ in 0..3 {
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    }
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(&path, &bytes).unwrap();
    let err = read_idx(&path).unwrap_err().to_string();
    assert!(
        err.contains("overflow") && err.contains("4294967295"),
        "{err}"
    );
    // No images: an error, not an empty data set.
    let (images, labels) = (dir.join("images"), dir.join("labels"));
    write_idx(&images, &[0, 28, 28], &[], false).unwrap();
    write_idx(&labels, &[0], &[], false).unwrap();
    let err = load_idx_dataset(&images, &labels, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no images"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sweep: a digits CSV without data lines is an error, not an empty data set.
#[test]
fn empty_digits_csv_is_an_error() {
    let err = parse_digits_csv("\n  \n").unwrap_err().to_string();
    assert!(err.contains("no data lines"), "{err}");
}
