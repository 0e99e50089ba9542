//! The `contra` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use contra::fixtures::{load_cases, print_reports, run_all};
use contra::Device;

#[derive(Parser)]
#[command(
    name = "contra",
    version,
    about = "Fused contrastive-learning losses: checks and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check contra against reference cases (folders with case.json and .npy arrays, e.g. exported
    /// from your own PyTorch code). Prints one line per case and a summary; exits 1 on any failure.
    CheckFixtures {
        /// Folder holding one sub-folder per case.
        dir: PathBuf,
        /// Where to run: cpu, interp or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: Device,
    },
    /// Show the devices this build can use.
    Info,
    /// Time every kernel on a GPU (feature `cuda`); prints a markdown table.
    #[command(hide = true)]
    KernelTiming {
        #[arg(long, default_value_t = 0)]
        gpu: usize,
        #[arg(long, default_value_t = 20)]
        repeats: usize,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckFixtures { dir, device } => check_fixtures(&dir, device),
        Command::Info => {
            println!("contra {}", env!("CARGO_PKG_VERSION"));
            for device in [Device::Cpu, Device::Interp, Device::Cuda(0)] {
                match contra::device_available(device) {
                    Ok(()) => println!("  {device}: available"),
                    Err(reason) => println!("  {device}: unavailable ({reason})"),
                }
            }
            ExitCode::SUCCESS
        }
        Command::KernelTiming { gpu, repeats } => kernel_timing(gpu, repeats),
    }
}

#[cfg(feature = "cuda")]
fn kernel_timing(gpu: usize, repeats: usize) -> ExitCode {
    let rows = match contra::testing::kernel_timings(gpu, repeats) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "GPU: {}",
        contra::testing::gpu_name(gpu).unwrap_or_default()
    );
    println!("| kernel | shape | median ms | GFLOP/s |");
    println!("|---|---|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.3} | {:.0} |",
            r.kernel,
            r.shape,
            r.median_ms,
            r.flops / r.median_ms / 1e6
        );
    }
    ExitCode::SUCCESS
}

#[cfg(not(feature = "cuda"))]
fn kernel_timing(_gpu: usize, _repeats: usize) -> ExitCode {
    eprintln!("error: kernel-timing needs a build with --features cuda");
    ExitCode::from(2)
}

fn check_fixtures(dir: &std::path::Path, device: Device) -> ExitCode {
    if let Err(reason) = contra::device_available(device) {
        eprintln!("error: {device} is not available: {reason}");
        return ExitCode::from(2);
    }
    let cases = match load_cases(dir) {
        Ok(cases) => cases,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let failed = print_reports(&run_all(&cases, device));
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
