//! Peer compatibility: the cases of tests/peers (made by tests/peers/make_cases.py from each peer
//! library's formula, PyTorch float64) run with the option that asks for that library's
//! convention, on the CPU and every kernel device, within 1e-4 relative.

mod common;

use std::path::PathBuf;

use common::kernel_devices;
use contra::fixtures::{load_cases, print_reports, run_all};
use contra::Device;

fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

#[test]
fn every_peer_case_passes_on_every_backend() {
    let cases = load_cases(&peers_dir()).unwrap();
    assert!(cases.len() >= 3, "{} peer cases", cases.len());
    let mut devices = vec![Device::Cpu];
    devices.extend(kernel_devices("peers"));
    for device in devices {
        println!("peer cases on {device}:");
        let failed = print_reports(&run_all(&cases, device));
        assert_eq!(failed, 0, "{failed} peer case(s) failed on {device}");
    }
}

/// The options matter: with contra's defaults the peers' numbers are not reproduced.
#[test]
fn the_defaults_give_other_numbers() {
    let cases = load_cases(&peers_dir()).unwrap();
    let mut changed = 0;
    for mut case in cases {
        let options = case.options.as_object_mut().unwrap();
        if options["default_differs"] != true {
            continue;
        }
        options.retain(|key, _| !["reduction", "mining", "variant"].contains(&key.as_str()));
        let report =
            contra::fixtures::run_case(&case, Device::Cpu, contra::fixtures::Precision::F64);
        assert!(!report.passed(), "{} passes without its option", case.name);
        changed += 1;
    }
    assert!(changed >= 2, "{changed} cases depend on their option");
}
