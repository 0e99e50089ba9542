//! The benchmark suite's machinery at tiny shapes: rows, table, JSON, the child protocol, the
//! kernel runners (on the interpreted backend), the scaling sweep and the "torch missing" path.

use std::path::PathBuf;

use contra::bench::{
    self, cases, child_main, measure, torch, BenchArgs, Case, Impl, Pass, Runner, Timing,
};
use contra::Device;
use serde_json::Value;

fn tiny_args() -> BenchArgs {
    BenchArgs {
        tiny: true,
        no_torch: true,
        in_process: true,
        ..Default::default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("contra-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn tiny_run_gives_agreeing_rows_a_table_and_json() {
    let report = bench::run(&tiny_args()).unwrap();
    let n_cases = cases::tiny_cases().len();
    assert_eq!(report.rows.len(), n_cases, "one naive row per case");
    for row in &report.rows {
        assert_eq!(row.reference, "naive", "{}", row.case);
        let contra = row.contra.as_ref().expect("contra measured");
        let naive = row.reference_result.as_ref().expect("naive measured");
        assert!(contra.median_ms > 0.0 && naive.median_ms > 0.0);
        assert!(row.speedup().unwrap() > 0.0);
        assert_eq!(row.agree(), Some(true), "{}: {:?}", row.case, row.note);
        assert_eq!(
            row.case.flops().is_some(),
            row.contra_gflops().is_some(),
            "{}",
            row.case
        );
        if std::path::Path::new("/proc/self/clear_refs").exists() {
            assert!(contra.peak_bytes.is_some(), "{}: peak memory", row.case);
        }
        if row.case.pass == Pass::ForwardBackward {
            assert!(contra.outcome.grad_check.is_some(), "{}", row.case);
        }
    }
    assert!(report.gemm.contra_gflops.unwrap() > 0.0);

    let text = bench::table(&report);
    assert!(text.contains("| op "), "{text}");
    assert!(text.contains("speedup"), "{text}");
    assert!(
        text.contains("ntxent") && text.contains("momentum"),
        "{text}"
    );

    let path = scratch("report.json");
    bench::write_json(&path, &bench::report_json(&report)).unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), n_cases);
    for row in rows {
        for key in [
            "op",
            "pass",
            "shape",
            "reference",
            "contra_ms",
            "reference_ms",
            "speedup",
            "contra_peak_bytes",
            "reference_peak_bytes",
            "contra_gflops",
            "agree",
        ] {
            assert!(row.get(key).is_some(), "row lacks `{key}`: {row}");
        }
        assert!(row["speedup"].as_f64().unwrap() > 0.0);
    }
    assert!(v["gemm"]["peak_gflops"].as_f64().unwrap() > 0.0);
    assert!(v["machine"]["logical_cores"].as_u64().unwrap() >= 1);
}

#[test]
fn filter_selects_cases_and_rejects_unknown_ones() {
    let args = BenchArgs {
        filter: Some("ntxent fwd+bwd".into()),
        no_naive: true,
        ..tiny_args()
    };
    let report = bench::run(&args).unwrap();
    assert_eq!(report.rows.len(), 1);
    assert_eq!(report.rows[0].reference, "-");
    assert_eq!(report.rows[0].speedup(), None);
    let args = BenchArgs {
        filter: Some("no such op".into()),
        ..tiny_args()
    };
    assert!(bench::run(&args).is_err());
}

#[test]
fn child_protocol_round_trips_a_measurement() {
    let case = Case::ntxent(Pass::ForwardBackward, 32, 8);
    let spec = bench::runner::child_spec(&case, Impl::Naive, Device::Cpu, &Timing::once());
    let line = child_main(&spec).unwrap();
    let json = line.strip_prefix("CONTRA_BENCH_RESULT ").expect("marker");
    let v: Value = serde_json::from_str(json).unwrap();
    assert!(v["median_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(v["reps"].as_u64(), Some(1));
    assert!(v["check"].as_f64().unwrap() > 0.0, "NT-Xent loss");
    assert!(v["grad_check"].as_f64().is_some());
    assert!(child_main("{not json").is_err());
}

/// The GPU paths on the interpreted backend: the public ops on device-resident tensors and the
/// kernel launches alone (device memory counted by a wrapper backend). Every tiny case runs and
/// returns contra's CPU results.
#[test]
fn kernel_runners_match_the_cpu_on_the_interpreter() {
    for case in cases::tiny_cases() {
        let mut cpu = Runner::new(&case, Impl::Contra, Device::Cpu).unwrap();
        let want = measure(&mut cpu, &Timing::once()).unwrap();
        for imp in [Impl::Contra, Impl::Kernels] {
            let mut interp = Runner::new(&case, imp, Device::Interp).unwrap();
            let got = measure(&mut interp, &Timing::once()).unwrap();
            let close =
                |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-6);
            assert!(
                close(got.outcome.check, want.outcome.check, 1e-3),
                "{case} {}: interp {:?} vs cpu {:?}",
                imp.name(),
                got.outcome,
                want.outcome
            );
            if let (Some(a), Some(b)) = (got.outcome.grad_check, want.outcome.grad_check) {
                assert!(
                    close(a.sum, b.sum, 1e-2),
                    "{case}: gradients {a:?} vs {b:?}"
                );
            }
            if imp == Impl::Kernels {
                let peak = got.peak_bytes.expect("device bytes are counted");
                if case.op != cases::Op::Momentum {
                    assert!(peak > 0, "{case}: the call allocates its outputs");
                }
            }
        }
    }
    let on_cpu = cases::tiny_cases()[0];
    assert!(Runner::new(&on_cpu, Impl::Kernels, Device::Cpu).is_err());
}

/// The unfused baseline (GEMM, then separate log-softmax / NLL / gradient kernels over the
/// materialized matrix) on the interpreted backend, at shapes that are no multiple of a tile:
/// it returns contra's CPU loss and gradient, and its device memory holds the full matrix that
/// the fused kernels never allocate.
#[test]
fn unfused_baseline_matches_contra_and_materializes_the_matrix() {
    use cases::{Case, Pass};
    for pass in [Pass::Forward, Pass::ForwardBackward] {
        for case in [Case::ntxent(pass, 38, 19), Case::infonce(pass, 23, 29, 19)] {
            let mut cpu = Runner::new(&case, Impl::Contra, Device::Cpu).unwrap();
            let want = measure(&mut cpu, &Timing::once()).unwrap();
            let mut fused = Runner::new(&case, Impl::Kernels, Device::Interp).unwrap();
            let fused = measure(&mut fused, &Timing::once()).unwrap();
            let mut unfused = Runner::new(&case, Impl::Unfused, Device::Interp).unwrap();
            let got = measure(&mut unfused, &Timing::once()).unwrap();
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-6);
            assert!(
                rel(got.outcome.check, want.outcome.check) < 1e-5,
                "{case}: unfused {:?} vs cpu {:?}",
                got.outcome,
                want.outcome
            );
            match (got.outcome.grad_check, want.outcome.grad_check) {
                (Some(a), Some(b)) => {
                    assert!(rel(a.sum, b.sum) < 1e-4, "{case}: gradients {a:?} vs {b:?}")
                }
                (None, None) => assert_eq!(pass, Pass::Forward),
                other => panic!("{case}: gradient checksums {other:?}"),
            }
            let cols = if case.op == cases::Op::Ntxent {
                case.n
            } else {
                case.k
            };
            let matrix = (4 * case.n * cols) as u64;
            let (peak, fused_peak) = (got.peak_bytes.unwrap(), fused.peak_bytes.unwrap());
            assert!(
                peak >= matrix,
                "{case}: unfused peak {peak} < the {matrix}-byte matrix"
            );
            assert!(
                fused_peak < peak,
                "{case}: fused {fused_peak} >= unfused {peak}"
            );
        }
    }
    let unsupported = Case::triplet(Pass::Forward, 32, 16, 4);
    assert!(Runner::new(&unsupported, Impl::Unfused, Device::Interp).is_err());
    let on_cpu = Case::ntxent(Pass::Forward, 64, 16);
    assert!(Runner::new(&on_cpu, Impl::Unfused, Device::Cpu).is_err());
}

/// A bf16 case on a kernel device runs the tensor-core kernels (the table's engine column says
/// so) and agrees with contra's CPU ops on the same bf16 inputs; the f32-only references refuse
/// it with a clear error.
#[test]
fn bf16_cases_run_the_tensor_core_kernels() {
    use cases::{Case, Pass};
    let case = Case::ntxent(Pass::ForwardBackward, 38, 24).at(cases::Precision::Bf16);
    assert_eq!(case.shape(), "N=38 D=24 bf16");
    assert_eq!(case.engine(Device::Interp), "tensor cores");
    assert_eq!(case.engine(Device::Cpu), "cpu");
    assert_eq!(
        Case::ntxent(Pass::ForwardBackward, 38, 24).engine(Device::Interp),
        "CUDA cores"
    );
    assert_eq!(Case::from_json(&case.to_json()).unwrap(), case);
    let mut cpu = Runner::new(&case, Impl::Contra, Device::Cpu).unwrap();
    let want = measure(&mut cpu, &Timing::once()).unwrap();
    contra::testing::take_launched_kernels();
    let mut interp = Runner::new(&case, Impl::Contra, Device::Interp).unwrap();
    let got = measure(&mut interp, &Timing::once()).unwrap();
    let launched = contra::testing::take_launched_kernels();
    for kernel in ["infonce_fwd_resident_ntxent_bf16", "infonce_bwd_fused_bf16"] {
        assert!(
            launched.contains(&kernel),
            "{kernel} did not run: {launched:?}"
        );
    }
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-6);
    assert!(
        rel(got.outcome.check, want.outcome.check) < 2e-2,
        "{:?} vs {:?}",
        got.outcome,
        want.outcome
    );
    let (a, b) = (
        got.outcome.grad_check.unwrap(),
        want.outcome.grad_check.unwrap(),
    );
    // The checksum sums 64 signed gradient entries that largely cancel, and the CPU returns its
    // gradient rounded to bf16: compare it at the scale of the magnitudes (kernels_half checks
    // the whole gradient).
    assert!(a.agrees(&b, 2e-2), "gradients {a:?} vs {b:?}");
    assert!(Runner::new(&case, Impl::Naive, Device::Cpu).is_err());
    assert!(Runner::new(&case, Impl::Unfused, Device::Interp).is_err());
}

/// A tf32 case runs contra's side under `F32Precision::Tf32` (the `_tf32` kernels, through the
/// public API and kernel-only alike) on the same f32 inputs as the naive reference, and agrees
/// with it to tf32's accuracy; the exact-f32 unfused baseline refuses it.
#[test]
fn tf32_cases_run_the_tf32_kernels() {
    use cases::{Case, Pass, Precision};
    let case = Case::ntxent(Pass::ForwardBackward, 38, 24).at(Precision::Tf32);
    assert_eq!(case.shape(), "N=38 D=24 tf32");
    assert_eq!(case.engine(Device::Interp), "tensor cores");
    assert_eq!(Case::from_json(&case.to_json()).unwrap(), case);
    let mut naive = Runner::new(&case, Impl::Naive, Device::Cpu).unwrap();
    let want = measure(&mut naive, &Timing::once()).unwrap();
    for imp in [Impl::Contra, Impl::Kernels] {
        contra::testing::take_launched_kernels();
        let mut interp = Runner::new(&case, imp, Device::Interp).unwrap();
        let got = measure(&mut interp, &Timing::once()).unwrap();
        let launched = contra::testing::take_launched_kernels();
        for kernel in [
            "infonce_fwd_resident_ntxent_tf32",
            "infonce_bwd_resident_tf32",
        ] {
            assert!(
                launched.contains(&kernel),
                "{imp:?}: {kernel} did not run: {launched:?}"
            );
        }
        let rel = (got.outcome.check - want.outcome.check).abs() / want.outcome.check.abs();
        assert!(
            rel < 5e-3,
            "{imp:?}: {:?} vs {:?}",
            got.outcome,
            want.outcome
        );
    }
    assert_eq!(contra::f32_precision(), contra::F32Precision::Highest);
    assert!(Runner::new(&case, Impl::Unfused, Device::Interp).is_err());
}

/// `contra ntxent-timing`'s measurements run the public call (the tensor-core kernels on bf16
/// features, or the tf32 ones on f32 features) and time it; the largest-N search doubles N and
/// stops at its limit.
#[test]
fn ntxent_timing_runs_the_public_call() {
    use contra::bench::ntxent_timing::{at_shape, largest};
    use contra::bench::Precision;
    for (precision, kernel) in [
        (Precision::Bf16, "infonce_fwd_resident_ntxent_bf16"),
        (Precision::Tf32, "infonce_fwd_resident_ntxent_tf32"),
        (Precision::F32, "infonce_fwd_f32"),
    ] {
        contra::testing::take_launched_kernels();
        let t = at_shape(Device::Interp, 38, 24, 2, precision).unwrap();
        let launched = contra::testing::take_launched_kernels();
        assert!(launched.contains(&kernel), "{launched:?}");
        assert!(t.median_ms > 0.0 && t.tflops() > 0.0, "{t:?}");
    }
    let (best, stop) = largest(Device::Interp, 8, 16, 70, Precision::Bf16);
    assert_eq!(best.map(|t| t.n), Some(64));
    assert!(stop.is_none());
    // A call that fails ends the search with its error (here: features of width 0).
    let (best, stop) = largest(Device::Interp, 0, 16, 64, Precision::Bf16);
    assert!(best.is_none());
    assert!(stop.unwrap().starts_with("N = 16: "));
}

#[test]
fn scaling_sweep_draws_a_png() {
    let png = scratch("scaling.png");
    let args = BenchArgs {
        scaling: true,
        out: png.clone(),
        ..tiny_args()
    };
    let report = bench::run_scaling(&args).unwrap();
    let contra: Vec<_> = report
        .points
        .iter()
        .filter(|p| p.implementation == "contra")
        .collect();
    assert_eq!(
        contra.len(),
        9,
        "N = 64, 128, 256 for NT-Xent, CLIP and SupCon"
    );
    for op in bench::scaling::SCALING_OPS {
        let ns: Vec<usize> = contra.iter().filter(|p| p.op == op).map(|p| p.n).collect();
        assert_eq!(ns, [64, 128, 256], "{op:?}");
    }
    assert!(contra.iter().all(|p| p.result.is_ok()));
    assert!(report.points.iter().any(|p| p.implementation == "naive"));
    bench::scaling::plot(&report, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
    let table = bench::scaling::table(&report);
    assert!(table.contains("contra peak / input"), "{table}");
    for op in ["ntxent", "clip", "supcon"] {
        assert!(table.contains(&format!("{op} fwd+bwd scaling")), "{table}");
    }
    let v = bench::scaling::report_json(&report);
    assert_eq!(v["points"].as_array().unwrap().len(), report.points.len());
}

/// Without torch the run still prints its table and says why the PyTorch columns are missing.
#[test]
fn missing_torch_is_reported() {
    let cases = vec![Case::momentum(100)];
    let opts = torch::TorchOptions {
        python: "/nonexistent/python-for-contra-tests".into(),
        device: Device::Cpu,
        threads: Some(1),
        compile: false,
        timing: Timing::once(),
        max_bytes: None,
        gemm: false,
    };
    match torch::run_reference(&cases, &opts) {
        torch::TorchStatus::Missing(msg) => {
            assert!(msg.contains("not found"), "{msg}");
            assert!(msg.contains("CONTRA_TORCH_PYTHON"), "{msg}");
        }
        other => panic!("expected Missing, got {other:?}"),
    }

    // Through `contra bench` itself, with CONTRA_TORCH_PYTHON naming the interpreter (the only
    // test of this file that reads the variable).
    std::env::set_var(
        "CONTRA_TORCH_PYTHON",
        "/nonexistent/python-for-contra-tests",
    );
    let args = BenchArgs {
        no_torch: false,
        filter: Some("momentum".into()),
        ..tiny_args()
    };
    let report = bench::run(&args).unwrap();
    std::env::remove_var("CONTRA_TORCH_PYTHON");
    assert!(report.torch.is_none());
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("PyTorch reference skipped")),
        "{:?}",
        report.notes
    );
    assert!(bench::table(&report).contains("note: PyTorch reference skipped"));
    assert_eq!(report.rows.len(), 1, "the naive row is still there");

    // A real interpreter without torch: the script's own message.
    if python_lacks_torch("python3") {
        let opts = torch::TorchOptions {
            python: "python3".into(),
            ..opts
        };
        match torch::run_reference(&cases, &opts) {
            torch::TorchStatus::Missing(msg) => {
                assert!(msg.contains("PyTorch is not installed"), "{msg}")
            }
            other => panic!("expected Missing, got {other:?}"),
        }
    }
}

fn python_lacks_torch(python: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| !o.status.success())
}

/// The script's built-in case lists are the suite's (ids compared; needs no torch).
#[test]
fn script_case_lists_match_the_suite() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/reference_torch.py");
    for (list, cases) in [
        ("quick", cases::quick_cases()),
        ("full", cases::full_cases()),
    ] {
        let Ok(out) = std::process::Command::new("python3")
            .args([script, "--list", list])
            .output()
        else {
            eprintln!("python3 not found: skipped");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let want: Vec<String> = cases.iter().map(Case::id).collect();
        assert_eq!(ids, want, "--list {list}");
    }
    assert_eq!(torch::SCRIPT, std::fs::read_to_string(script).unwrap());
}
