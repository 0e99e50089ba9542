//! NT-Xent forward + backward on the CPU backend at z = 4096 x 128 (2048 positive pairs), f32.
//! The side-by-side with PyTorch lives in the benchmark suite.

use contra::{ntxent, ntxent_forward, Device, NtXentOptions, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};

fn random_z(rows: usize, dim: usize, seed: u64) -> Tensor {
    // A small xorshift keeps the bench free of RNG-crate details; values in [-1, 1).
    let mut state = seed | 1;
    let values: Vec<f32> = (0..rows * dim)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(values, &[rows, dim], Device::Cpu).expect("shape")
}

fn bench_ntxent(c: &mut Criterion) {
    let (rows, dim) = (4096, 128);
    let z = random_z(rows, dim, 7);
    let opts = NtXentOptions { temperature: 0.5 };
    let mut group = c.benchmark_group("ntxent_cpu_f32");
    group.sample_size(10);
    group.bench_function("forward/4096x128", |b| {
        b.iter(|| {
            ntxent_forward(&z, &opts)
                .expect("ntxent")
                .loss
                .to_scalar()
                .unwrap()
        })
    });
    group.bench_function("forward_backward/4096x128", |b| {
        b.iter(|| ntxent(&z, &opts).expect("ntxent").loss.to_scalar().unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_ntxent);
criterion_main!(benches);
