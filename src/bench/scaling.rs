//! The scaling sweep: forward + backward time and peak memory of the softmax losses (NT-Xent,
//! CLIP, SupCon) against N, the rows of their N x N logits (D = 128, powers of two), for contra
//! and the references, as tables, one PNG and JSON. contra's peak memory should grow like the
//! input (O(N·D)); the references' like the N x N matrix.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::{json, Value};

use super::cases::{Case, Op, Pass};
use super::runner::{Impl, Measurement, Timing};
use super::torch::{self, TorchOptions, TorchStatus};
use super::{check_device, fmt_bytes, fmt_ms, reference_budget, BenchArgs, Machine, RustSide};
use crate::train::plot::{register_font, FONT};
use crate::{Device, Error, Result};

/// The losses of the sweep.
pub const SCALING_OPS: [Op; 3] = [Op::Ntxent, Op::Clip, Op::Supcon];

/// The forward + backward case of `op` whose logits are `n x n`: NT-Xent's N rows, CLIP's N
/// pairs, SupCon's N / 2 samples of 2 views (10 classes).
fn scaling_case(op: Op, n: usize, d: usize) -> Case {
    match op {
        Op::Clip => Case::clip(Pass::ForwardBackward, n, d),
        Op::Supcon => Case::supcon(Pass::ForwardBackward, n / 2, 2, d, 10),
        _ => Case::ntxent(Pass::ForwardBackward, n, d),
    }
}

/// One point of the sweep.
#[derive(Clone, Debug)]
pub struct ScalingPoint {
    pub op: Op,
    /// Rows of the N x N logits.
    pub n: usize,
    pub d: usize,
    /// Bytes of the case's inputs (f32).
    pub input_bytes: usize,
    /// `contra`, `naive`, `torch-eager`, `torch-compile`.
    pub implementation: String,
    pub result: std::result::Result<Measurement, String>,
}

/// The sweep.
#[derive(Clone, Debug, Default)]
pub struct ScalingReport {
    pub device: Device,
    pub machine: Machine,
    pub d: usize,
    pub points: Vec<ScalingPoint>,
    pub notes: Vec<String>,
}

/// Runs the sweep of `args` (`--max-n`, `--quick`, `--no-naive`, `--no-torch`, `--device`).
pub fn run_scaling(args: &BenchArgs) -> Result<ScalingReport> {
    check_device(args.device)?;
    let (start, d) = if args.tiny { (64, 16) } else { (1024, 128) };
    let max_n = args
        .max_n
        .unwrap_or(if args.tiny {
            256
        } else if args.quick {
            16384
        } else {
            32768
        })
        .max(start);
    let ns: Vec<usize> = std::iter::successors(Some(start), |&n| Some(n * 2))
        .take_while(|&n| n <= max_n)
        .collect();
    let timing = if args.tiny {
        Timing::once()
    } else {
        Timing {
            min_time_s: args.min_time.unwrap_or(if args.quick { 0.3 } else { 1.0 }),
            min_reps: if args.quick { 1 } else { 3 },
            max_reps: 20,
        }
    };
    let mut report = ScalingReport {
        device: args.device,
        machine: Machine::detect(args.device),
        d,
        ..Default::default()
    };
    let side = RustSide::new(args, timing, &mut report.notes);
    let budget = reference_budget();
    let cpu = args.device == Device::Cpu;
    let cases: Vec<Case> = SCALING_OPS
        .iter()
        .flat_map(|&op| ns.iter().map(move |&n| scaling_case(op, n, d)))
        .collect();
    for case in &cases {
        let m = side.measure(case, Impl::Contra);
        super::progress("contra", case, &m);
        report
            .points
            .push(point(case, "contra", m.map_err(|e| e.to_string())));
        if !cpu || args.no_naive {
            continue;
        }
        let estimate = case.eager_bytes_estimate() as u64;
        let result = if budget.is_some_and(|b| estimate > b) {
            Err(format!("skipped: needs about {}", fmt_bytes(estimate)))
        } else {
            let m = side.measure(case, Impl::Naive);
            super::progress("naive", case, &m);
            m.map_err(|e| e.to_string())
        };
        report.points.push(point(case, "naive", result));
    }
    if !args.no_torch && args.device != Device::Interp {
        let opts = TorchOptions {
            python: torch::python(),
            device: args.device,
            threads: cpu.then_some(report.machine.rayon_threads),
            compile: args.compile,
            timing,
            max_bytes: if cpu { budget } else { None },
            gemm: false,
        };
        eprintln!(
            "bench: running the PyTorch reference with `{}`...",
            opts.python
        );
        match torch::run_reference(&cases, &opts) {
            TorchStatus::Ran(run) => {
                for case in &cases {
                    for (name, result) in run.results.get(&case.id()).into_iter().flatten() {
                        report.points.push(point(case, name, result.clone()));
                    }
                }
            }
            TorchStatus::Missing(msg) | TorchStatus::Failed(msg) => {
                eprintln!("bench: {msg}");
                report.notes.push(msg);
            }
        }
    }
    Ok(report)
}

fn point(
    case: &Case,
    name: &str,
    result: std::result::Result<Measurement, String>,
) -> ScalingPoint {
    ScalingPoint {
        op: case.op,
        n: case.n * case.v.max(1),
        d: case.d,
        input_bytes: case.input_bytes(),
        implementation: name.to_string(),
        result,
    }
}

/// The implementations in the order they first appear.
fn implementations(report: &ScalingReport) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in &report.points {
        if !names.contains(&p.implementation) {
            names.push(p.implementation.clone());
        }
    }
    names
}

/// The sweep as markdown tables, one per loss: per N, each implementation's time and peak, and
/// contra's peak divided by the input size (constant when the memory is O(N·D)).
pub fn table(report: &ScalingReport) -> String {
    let mut out = String::new();
    let names = implementations(report);
    for op in SCALING_OPS {
        let points: Vec<&ScalingPoint> = report.points.iter().filter(|p| p.op == op).collect();
        if points.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "{} fwd+bwd scaling on {} (D = {}): {}\n",
            op.name(),
            report.device,
            report.d,
            report.machine.describe()
        );
        let mut header = String::from("| N |");
        let mut rule = String::from("|---|");
        for name in &names {
            let _ = write!(header, " {name} time | {name} peak |");
            rule.push_str("---|---|");
        }
        header.push_str(" contra peak / input |");
        rule.push_str("---|");
        let _ = writeln!(out, "{header}\n{rule}");
        let mut ns: Vec<usize> = points.iter().map(|p| p.n).collect();
        ns.sort_unstable();
        ns.dedup();
        for n in ns {
            let at = |name: &str| points.iter().find(|p| p.n == n && p.implementation == name);
            let mut line = format!("| {n} |");
            for name in &names {
                match at(name).map(|p| &p.result) {
                    Some(Ok(m)) => {
                        let _ = write!(
                            line,
                            " {} | {} |",
                            fmt_ms(m.median_ms),
                            m.peak_bytes.map_or("n/a".into(), fmt_bytes)
                        );
                    }
                    Some(Err(e)) => {
                        let _ = write!(line, " {e} | - |");
                    }
                    None => line.push_str(" - | - |"),
                }
            }
            let ratio = at("contra").and_then(|p| {
                let peak = p.result.as_ref().ok()?.peak_bytes?;
                Some(peak as f64 / p.input_bytes as f64)
            });
            let _ = write!(
                line,
                " {} |",
                ratio.map_or("-".into(), |r| format!("{r:.1}"))
            );
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
    for n in &report.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

/// The sweep as JSON.
pub fn report_json(report: &ScalingReport) -> Value {
    json!({
        "ops": SCALING_OPS.iter().map(|op| format!("{} fwd+bwd", op.name())).collect::<Vec<_>>(),
        "device": report.device.to_string(),
        "d": report.d,
        "machine": report.machine.to_json(),
        "notes": report.notes,
        "points": report.points.iter().map(|p| json!({
            "op": p.op.name(),
            "n": p.n,
            "d": p.d,
            "implementation": p.implementation,
            "ms": p.result.as_ref().ok().map(|m| m.median_ms),
            "peak_bytes": p.result.as_ref().ok().and_then(|m| m.peak_bytes),
            "error": p.result.as_ref().err(),
        })).collect::<Vec<_>>(),
    })
}

fn color(name: &str) -> RGBColor {
    match name {
        "contra" => RGBColor(31, 119, 180),
        "naive" => RGBColor(44, 160, 44),
        "torch-eager" => RGBColor(214, 39, 40),
        "torch-compile" => RGBColor(255, 127, 14),
        _ => RGBColor(100, 100, 100),
    }
}

/// A log-axis label with 3 significant digits and no trailing zeros.
fn axis_label(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        return String::new();
    }
    let decimals = (2 - v.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Draws time and peak memory against N (log-log) into a 1200 x 500 PNG at `path`.
pub fn plot(report: &ScalingReport, path: &Path) -> Result<()> {
    register_font();
    let err = |e: String| Error::format(path, format!("plotting: {e}"));
    // One series per loss and implementation, in the order they first appear.
    let mut keys: Vec<(Op, String)> = Vec::new();
    for p in &report.points {
        if !keys
            .iter()
            .any(|(op, name)| *op == p.op && *name == p.implementation)
        {
            keys.push((p.op, p.implementation.clone()));
        }
    }
    type Series = Vec<(Op, String, Vec<(f64, f64)>)>;
    let series = |value: &dyn Fn(&Measurement) -> Option<f64>| -> Series {
        keys.iter()
            .map(|(op, name)| {
                let pts = report
                    .points
                    .iter()
                    .filter(|p| p.op == *op && &p.implementation == name)
                    .filter_map(|p| Some(((p.n as f64).log2(), value(p.result.as_ref().ok()?)?)))
                    .filter(|&(_, v)| v > 0.0)
                    .collect();
                (*op, name.clone(), pts)
            })
            .collect()
    };
    let times = series(&|m| Some(m.median_ms));
    let memory = series(&|m| m.peak_bytes.map(|b| b as f64 / (1u64 << 20) as f64));
    let ns: Vec<f64> = report.points.iter().map(|p| p.n as f64).collect();
    let (n_lo, n_hi) = ns.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &n| {
        (lo.min(n), hi.max(n))
    });
    if !n_lo.is_finite() {
        return Err(err("no points to plot".into()));
    }
    let input: Vec<(f64, f64)> = {
        let mut v: Vec<f64> = ns.clone();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v.into_iter()
            .map(|n| (n.log2(), 4.0 * n * report.d as f64 / (1u64 << 20) as f64))
            .collect()
    };

    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let title = format!(
        "NT-Xent, CLIP and SupCon forward + backward, D = {}, {} ({})",
        report.d, report.device, report.machine.cpu
    );
    let root = root
        .titled(&title, (FONT, 20))
        .map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    for (area, data, caption, unit, reference) in [
        (&left, &times, "time per call", "ms", None),
        (
            &right,
            &memory,
            "peak memory added by one call",
            "MiB",
            Some(("N·D f32 (the size of one input)", &input)),
        ),
    ] {
        let values: Vec<f64> = data
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|q| q.1))
            .chain(reference.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)))
            .collect();
        let (lo, hi) = values.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
        let (lo, hi) = if lo.is_finite() && hi > 0.0 {
            (lo / 2.0, hi * 2.0)
        } else {
            (0.1, 10.0)
        };
        let (x_lo, x_hi) = (n_lo.log2() - 0.3, n_hi.log2() + 0.3);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, (FONT, 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_lo..x_hi, (lo..hi).log_scale())
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("N (rows of the N x N logits)")
            .y_desc(unit)
            .label_style((FONT, 13))
            .x_labels(((x_hi - x_lo).ceil() as usize + 1).max(2))
            .x_label_formatter(&|x| {
                let r = x.round();
                if (x - r).abs() < 0.05 {
                    format!("{}", 2f64.powf(r).round())
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| axis_label(*y))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        if let Some((label, pts)) = reference {
            let c = color("");
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(1)))
                .map_err(|e| err(e.to_string()))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1))
                });
        }
        for (op, name, pts) in data {
            if pts.is_empty() {
                continue;
            }
            // Colour by implementation, marker by loss.
            let c = color(name);
            let op = *op;
            let marker = move |p: (f64, f64)| -> DynElement<'static, BitMapBackend, (f64, f64)> {
                match op {
                    Op::Clip => TriangleMarker::new(p, 5, c.filled()).into_dyn(),
                    Op::Supcon => Cross::new(p, 4, c.stroke_width(2)).into_dyn(),
                    _ => Circle::new(p, 3, c.filled()).into_dyn(),
                }
            };
            let series = chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(format!("{} {name}", op.name()));
            let line = move |(x, y): (i32, i32)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (20, 0)], c.stroke_width(2))
            };
            match op {
                Op::Clip => {
                    series.legend(move |p| line(p) + TriangleMarker::new((10, 0), 5, c.filled()))
                }
                Op::Supcon => {
                    series.legend(move |p| line(p) + Cross::new((10, 0), 4, c.stroke_width(2)))
                }
                _ => series.legend(move |p| line(p) + Circle::new((10, 0), 3, c.filled())),
            };
            chart
                .draw_series(pts.iter().map(|&p| marker(p)))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
