//! contra's kernels on a GPU (feature `cuda`), forward and forward + backward, at the suite's
//! shapes: inputs resident on the device, rotated over 3 sets, warm-up first (criterion's), every
//! launch synchronized so the wall time of a call is its device time.
//!
//! ```sh
//! cargo bench --features cuda --bench ops_cuda
//! CONTRA_BENCH_QUICK=1 cargo bench --features cuda --bench ops_cuda
//! ```
//!
//! Without a usable GPU it prints why and measures nothing. The PyTorch side (cuBLAS GEMM, then
//! separate softmax and cross-entropy kernels: the unfused baseline) is
//! `contra bench --device cuda`.

use std::time::Duration;

use contra::bench::{cases, Case, Impl, Runner};
use contra::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn suite() -> Vec<Case> {
    if std::env::var_os("CONTRA_BENCH_QUICK").is_some() {
        cases::quick_cases()
    } else {
        cases::full_cases()
    }
}

fn bench_kernels(c: &mut Criterion) {
    let device = Device::Cuda(0);
    if let Err(reason) = contra::device_available(device) {
        eprintln!("ops_cuda: no GPU ({reason}); nothing measured");
        return;
    }
    for case in suite() {
        let mut group = c.benchmark_group(format!("cuda/{}", case.op.name()));
        group.sample_size(20);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        if let Some(flops) = case.flops() {
            group.throughput(Throughput::Elements(flops as u64));
        }
        let mut runner = match Runner::new(&case, Impl::Contra, device) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{case}: {e}");
                continue;
            }
        };
        let id = BenchmarkId::new("contra", format!("{} {}", case.pass.name(), case.shape()));
        group.bench_function(id, |b| b.iter(|| runner.run().expect("the kernels run")));
        group.finish();
    }
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
