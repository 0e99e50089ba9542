//! Runs every reference case under `CONTRA_FIXTURES` (default: tests/fixtures) on
//! `CONTRA_DEVICE` (cpu | interp | cuda; default cpu) and compares every expected array by
//! relative norm. Prints one line per case and a summary; fails on any failed case.

use std::path::PathBuf;

use contra::fixtures::{load_cases, print_reports, run_all};
use contra::Device;

#[test]
fn fixtures() {
    let dir = std::env::var_os("CONTRA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    let device = match std::env::var("CONTRA_DEVICE") {
        Ok(name) => Device::parse(&name).expect("CONTRA_DEVICE"),
        Err(_) => Device::Cpu,
    };
    if let Device::Cuda(_) = device {
        if let Err(reason) = contra::device_available(device) {
            println!("fixtures: skipped on {device}: {reason}");
            return;
        }
    }
    let cases = load_cases(&dir)
        .unwrap_or_else(|e| panic!("cannot load fixtures from {}: {e}", dir.display()));
    let failed = print_reports(&run_all(&cases, device));
    assert_eq!(failed, 0, "{failed} fixture case(s) failed on {device}");
}
