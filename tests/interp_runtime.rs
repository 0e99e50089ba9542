//! The interpreted-mode runtime's own C++ self-test (kernels/interp/selftest.cpp): shared
//! memory, barriers, warp shuffles and votes, atomics across blocks, dynamic shared memory,
//! partial warps, half/bf16 conversions, and the errors for divergent barriers.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn interp_runtime_selftest() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::temp_dir().join(format!("contra-interp-selftest-{}", std::process::id()));
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let status = Command::new(&compiler)
        .args(["-std=c++17", "-O2", "-pthread"])
        .arg(root.join("kernels/interp/selftest.cpp"))
        .arg(root.join("kernels/interp/runtime.cpp"))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{compiler}`: {e}"));
    assert!(status.success(), "compiling the interp selftest failed");
    let output = Command::new(&exe).output().expect("run the selftest");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "interp selftest failed:\n{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
