//! Runs NT-Xent forward + backward a few times on the CPU (for profiling with perf).
use contra::{ntxent, Device, NtXentOptions, Tensor};

fn main() -> contra::Result<()> {
    let (rows, dim) = (4096, 128);
    let values: Vec<f32> = (0..rows * dim)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let z = Tensor::from_vec(values, &[rows, dim], Device::Cpu)?;
    let start = std::time::Instant::now();
    for _ in 0..3 {
        ntxent(&z, &NtXentOptions { temperature: 0.5 })?;
    }
    println!(
        "ntxent fwd+bwd {rows}x{dim}: {:.1} ms per call",
        start.elapsed().as_secs_f64() * 1e3 / 3.0
    );
    Ok(())
}
