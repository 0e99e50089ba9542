//! Every op of the suite on the CPU, forward and forward + backward, contra next to the naive
//! eager-style reference (`contra::bench::naive`: the N x N matrix materialized, as PyTorch eager
//! does) in the same run, at the shapes of the benchmark issue (`contra::bench::cases`).
//!
//! ```sh
//! cargo bench --bench ops_cpu                          # every case (long: N = 16384 included)
//! CONTRA_BENCH_QUICK=1 cargo bench --bench ops_cpu     # the `contra bench --quick` shapes
//! cargo bench --bench ops_cpu -- 'ntxent/contra'       # criterion's name filter
//! ```
//!
//! Throughput is reported in "elements" per second where one element is one nominal flop
//! (`Case::flops`), so criterion's Gelem/s reads as GFLOP/s. The side-by-side with PyTorch is
//! `contra bench`.

use std::time::Duration;

use contra::bench::{cases, Case, Impl, Runner};
use contra::Device;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

fn suite() -> Vec<Case> {
    if std::env::var_os("CONTRA_BENCH_QUICK").is_some() {
        cases::quick_cases()
    } else {
        cases::full_cases()
    }
}

/// `MemAvailable` in bytes, to leave out references that would not fit.
fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn bench_ops(c: &mut Criterion) {
    let budget = available_bytes().map(|b| b / 10 * 7);
    for case in suite() {
        let mut group = c.benchmark_group(case.op.name());
        group.sample_size(10);
        group.sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(5));
        if let Some(flops) = case.flops() {
            group.throughput(Throughput::Elements(flops as u64));
        }
        for imp in [Impl::Contra, Impl::Naive] {
            if imp == Impl::Naive && budget.is_some_and(|b| case.eager_bytes_estimate() as u64 > b)
            {
                eprintln!(
                    "{case}: naive reference skipped (needs about {} bytes)",
                    case.eager_bytes_estimate()
                );
                continue;
            }
            let mut runner = Runner::new(&case, imp, Device::Cpu).expect("a suite case");
            let id = BenchmarkId::new(imp.name(), format!("{} {}", case.pass.name(), case.shape()));
            group.bench_function(id, |b| b.iter(|| runner.run().expect("the op runs")));
        }
        group.finish();
    }
}

criterion_group!(benches, bench_ops);
criterion_main!(benches);
