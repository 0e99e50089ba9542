//! The `contra` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use contra::bench::cases::Precision;
use contra::fixtures::{load_cases, print_reports, run_all};
use contra::train::config::{DataSet, Method, OptimizerKind, TrainConfig};
use contra::train::trainer::Event;
use contra::Device;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "contra",
    version,
    about = "Fused contrastive-learning losses: checks, tools and a small contrastive trainer"
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
    /// Train an MLP encoder with SimCLR, MoCo v2, SupCon or SigLIP, evaluate it (kNN, linear probe with
    /// all labels and with 10 per class) against the untrained encoder and raw pixels, and write
    /// report.json, curves.png and checkpoint.safetensors into --out.
    ///
    /// --device picks where each step runs: the encoder's forward and backward passes, the loss
    /// and, for MoCo, the key encoder, momentum update and queue enqueue. With `cuda` these are
    /// cuBLAS and the crate's CUDA kernels, with `interp` the same kernels interpreted on the CPU.
    /// The optimizer step and evaluation run on the CPU. Unset flags take the per-method, per-data-set defaults (the README's trainer
    /// section and `contra::train::config::TrainConfig::defaults` say which and why).
    Train(Box<TrainArgs>),
    /// Train a few steps of SimCLR, MoCo v2, SupCon and SigLIP on the digits from the same seed with the
    /// whole step (encoder and loss) on the CPU and on --device, print both loss sequences and
    /// fail when they differ (relative 1e-4 at the first step, 1e-3 after): the trainer's GPU
    /// check.
    TrainCheck {
        /// The device to compare with the CPU: interp or cuda[:N].
        #[arg(long, default_value = "interp")]
        device: Device,
        /// Optimizer steps per method.
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Evaluate a checkpoint of `contra train`: rebuild the encoder from its metadata and print
    /// the table (encoder, the same encoder untrained, raw pixels).
    Eval {
        /// The checkpoint.safetensors of a run.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Data set (default: the one the checkpoint was trained on).
        #[arg(long)]
        data: Option<DataSet>,
        /// Folder of the IDX files (Fashion-MNIST: /usr/share/datasets/fashion-mnist by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Evaluate with a stratified subset of this many training images (labels for the probes).
        #[arg(long)]
        train_subset: Option<usize>,
        /// Evaluate on a stratified subset of this many held-out images.
        #[arg(long)]
        test_subset: Option<usize>,
        /// Number of 10-labels-per-class draws (seeds 0..N).
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Also write the table as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Benchmark contra against PyTorch eager (and torch.compile) and a naive Rust reference:
    /// one table of time, speedup, peak memory and GFLOP/s; --scaling for the NT-Xent / CLIP / SupCon sweep.
    Bench(contra::bench::BenchArgs),
    /// The tensor-core NT-Xent through the public API (features on the device: bf16, or f32
    /// multiplied as tf32 with --precision tf32; the loss read after each call): forward +
    /// backward at N x --dim, median wall time and TFLOP/s over 8 N^2 D; with --largest MAX,
    /// also the largest N (doubling from N up to MAX) that runs.
    NtxentTiming {
        #[arg(long, default_value = "cuda")]
        device: Device,
        #[arg(long, default_value_t = 65536)]
        n: usize,
        #[arg(long, default_value_t = 256)]
        dim: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long)]
        largest: Option<usize>,
        /// bf16, tf32 (f32 features on the TF32 tensor cores) or f32 (exact, CUDA cores).
        #[arg(long, default_value = "bf16", value_parser = parse_precision)]
        precision: Precision,
    },
}

fn parse_precision(name: &str) -> Result<Precision, String> {
    Precision::parse(name).ok_or_else(|| format!("`{name}`: expected bf16, tf32 or f32"))
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
        Command::NtxentTiming {
            device,
            n,
            dim,
            repeats,
            largest,
            precision,
        } => ntxent_timing(device, n, dim, repeats, largest, precision),
        Command::Bench(args) => match contra::bench::main(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Train(args) => train(*args),
        Command::TrainCheck { device, steps } => train_check(device, steps),
        Command::Eval {
            checkpoint,
            data,
            data_dir,
            train_subset,
            test_subset,
            seeds,
            json,
        } => eval(
            &checkpoint,
            data,
            data_dir,
            (train_subset, test_subset),
            seeds,
            json,
        ),
    }
}

#[derive(Args)]
struct TrainArgs {
    /// simclr, moco, supcon or siglip (the sigmoid loss between the two views, its scale and
    /// bias learned).
    method: Method,
    /// digits (embedded, default), fashion-mnist or mnist.
    #[arg(long, default_value = "digits")]
    data: DataSet,
    /// Folder of the IDX files (Fashion-MNIST: /usr/share/datasets/fashion-mnist by default;
    /// MNIST: required).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where each step runs (encoder passes and losses): cpu, interp or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Epochs (default: 200 on digits, 20 on 28 x 28 data).
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per step (default 256).
    #[arg(long)]
    batch: Option<usize>,
    /// Output folder (default: a fresh runs/<method>-<date>-<time>/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// sgd, lars or adamw.
    #[arg(long)]
    optimizer: Option<OptimizerKind>,
    /// Peak learning rate (after the warm-up; cosine decay afterwards).
    #[arg(long)]
    lr: Option<f32>,
    /// Final learning rate as a fraction of --lr.
    #[arg(long)]
    final_lr_frac: Option<f32>,
    /// Epochs of linear learning-rate warm-up (default: 10 on digits, 2 on 28 x 28 data).
    #[arg(long)]
    warmup_epochs: Option<usize>,
    /// Weight decay of weights (not biases or BatchNorm parameters; default 1e-4).
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Loss temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Backbone widths after the input, comma-separated (e.g. 512,256).
    #[arg(long, value_delimiter = ',')]
    backbone: Option<Vec<usize>>,
    /// Hidden width of the projection head.
    #[arg(long)]
    head_hidden: Option<usize>,
    /// Output width of the projection head.
    #[arg(long)]
    head_out: Option<usize>,
    /// MoCo: key-encoder momentum m.
    #[arg(long)]
    moco_m: Option<f64>,
    /// MoCo: queue length K.
    #[arg(long)]
    moco_k: Option<usize>,
    /// MoCo: symmetric loss (both view orders), true or false.
    #[arg(long)]
    moco_symmetric: Option<bool>,
    /// SupCon: views per image.
    #[arg(long)]
    views: Option<usize>,
    /// Augmentation changes, comma-separated key=value: crop_prob, crop_min, crop_max (area
    /// fractions of the random resized crop), max_shift, flip_prob, jitter_prob, brightness,
    /// contrast, noise_std, erase_prob, erase_min, erase_max.
    #[arg(long, value_delimiter = ',', value_parser = parse_aug)]
    aug: Vec<(String, f32)>,
    /// Seed of the weights, batch order, augmentations and MoCo queue (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Train (and fit the probes) on a stratified subset of this many training images.
    #[arg(long)]
    train_subset: Option<usize>,
    /// Evaluate on a stratified subset of this many held-out images.
    #[arg(long)]
    test_subset: Option<usize>,
    /// Monitor kNN-1 every this many epochs (0: only at the start and the end).
    #[arg(long)]
    eval_every: Option<usize>,
    /// No progress bar or per-epoch lines.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_aug(s: &str) -> Result<(String, f32), String> {
    contra::train::config::parse_augment(s).map_err(|e| e.to_string())
}

impl TrainArgs {
    fn config(self) -> TrainConfig {
        let mut c = TrainConfig::defaults(self.method, self.data);
        c.data_dir = self.data_dir;
        c.device = self.device;
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { c.$field = v; })* };
        }
        set!(
            epochs,
            batch,
            optimizer,
            lr,
            final_lr_frac,
            warmup_epochs,
            weight_decay,
            temperature,
            backbone,
            head_hidden,
            head_out,
            moco_m,
            moco_k,
            moco_symmetric,
            views,
            seed,
            eval_every
        );
        c.max_steps = self.max_steps;
        c.augment.extend(self.aug);
        c.train_subset = self.train_subset;
        c.test_subset = self.test_subset;
        c
    }
}

fn train(args: TrainArgs) -> ExitCode {
    let quiet = args.quiet;
    let out_dir = args.out.clone();
    let cfg = args.config();
    let out_dir = out_dir.unwrap_or_else(|| contra::train::default_out_dir(cfg.method.name()));
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let mut desc = format!(
        "{} on {}: {} epochs, batch {}, {} lr {}, temperature {}, backbone {:?}, on {}",
        cfg.method,
        cfg.data,
        cfg.epochs,
        cfg.batch,
        cfg.optimizer,
        cfg.lr,
        cfg.temperature,
        cfg.backbone,
        cfg.device
    );
    if cfg.method == Method::Moco {
        desc += &format!(
            ", m {}, K {}{}",
            cfg.moco_m,
            cfg.moco_k,
            if cfg.moco_symmetric {
                ", symmetric"
            } else {
                ""
            }
        );
    }
    if cfg.method == Method::SupCon {
        desc += &format!(", {} views", cfg.views);
    }
    match cfg.device {
        Device::Cpu => eprintln!(
            "{desc} (step on the CPU, {} threads)",
            rayon::current_num_threads()
        ),
        device => eprintln!(
            "{desc} (step on {device}: encoder GEMMs by {}; optimizer and evaluation on the CPU)",
            contra::nn::DeviceEncoder::new(device)
                .gemm_library()
                .unwrap_or_else(|e| e.to_string())
        ),
    }
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::no_length()
    };
    let tty = !bar.is_hidden();
    let epochs = cfg.epochs;
    let mut on_event = |event: Event| match event {
        Event::Start { total_steps, .. } => {
            bar.set_length(total_steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("epoch 1/{epochs}"));
        }
        Event::Step(s) => {
            bar.set_message(format!("epoch {}/{epochs} loss {:.4}", s.epoch, s.loss));
            bar.inc(1);
        }
        Event::Epoch(e) => {
            if let Some(p) = e.monitor {
                let mi = e
                    .mi_bound
                    .map_or(String::new(), |m| format!(" mi_bound {m:.3}"));
                let line = format!(
                    "epoch {:>4} loss {:.4}{mi} knn1 {:.4} probe10 {:.4} ({:.0} s)",
                    e.epoch, e.loss, p.knn1, p.probe_10_per_class, e.seconds
                );
                if tty {
                    bar.println(line);
                } else if !quiet {
                    eprintln!("{line}");
                }
            }
        }
    };
    let result = contra::train::run(&cfg, &out_dir, &mut on_event);
    bar.finish_and_clear();
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = &out.report;
    println!(
        "{} on {}: {} epochs ({} steps), {:.0} s training + {:.0} s evaluation; {} train / {} held-out images",
        cfg.method,
        cfg.data,
        r["epochs"],
        r["steps"],
        r["train_seconds"].as_f64().unwrap_or(0.0),
        r["eval_seconds"].as_f64().unwrap_or(0.0),
        r["train_images"],
        r["test_images"],
    );
    print!("{}", out.table.format());
    println!("wrote {}", out.out_dir.display());
    ExitCode::SUCCESS
}

fn train_check(device: Device, steps: usize) -> ExitCode {
    if let Err(reason) = contra::device_available(device) {
        eprintln!("error: {device} is not available: {reason}");
        return ExitCode::from(2);
    }
    let (data, _) = match contra::train::load_data(DataSet::Digits, None, None, None) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match contra::nn::DeviceEncoder::new(device).gemm_library() {
        Ok(gemm) => println!("encoder GEMMs on {device}: {gemm}"),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut ok = true;
    for method in Method::ALL {
        let mut cfg = TrainConfig::defaults(method, DataSet::Digits);
        cfg.max_steps = Some(steps.max(1));
        let mut losses = Vec::new();
        for d in [Device::Cpu, device] {
            cfg.device = d;
            let before = contra::Transfers::current();
            // The traffic at the end of each step: between two ends, one whole step.
            let mut ends = Vec::new();
            let mut on_event = |event: contra::train::Event| {
                if let contra::train::Event::Step(_) = event {
                    ends.push(contra::Transfers::current());
                }
            };
            let result = contra::train::build_encoder(&cfg, data.dim())
                .and_then(|enc| contra::train::train(&cfg, &data, None, enc, &mut on_event));
            let moved = contra::Transfers::current() - before;
            match result {
                Ok(out) => {
                    if let (Some(first), Some(last), false) =
                        (ends.first(), ends.last(), d == Device::Cpu)
                    {
                        let steps = (ends.len() as u64 - 1).max(1);
                        let per_step = *last - *first;
                        println!(
                            "{method} on {d}: {} bytes moved per step ({} copies; steps 2 to {}), \
                             {moved} in all with the set-up and the trained encoder's copy back",
                            per_step.bytes() / steps,
                            per_step.copies() / steps,
                            ends.len()
                        );
                    }
                    losses.push(out.step_losses)
                }
                Err(e) => {
                    eprintln!("error: {method} on {d}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        for (i, (c, k)) in losses[0].iter().zip(&losses[1]).enumerate() {
            let rel = (c - k).abs() / c.abs().max(1e-12);
            let tol = if i == 0 { 1e-4 } else { 1e-3 };
            let pass = rel <= tol;
            ok &= pass;
            println!(
                "{method} step {i}: cpu {c:.6} {device} {k:.6} rel diff {rel:.2e} {}",
                if pass { "ok" } else { "FAIL" }
            );
        }
        ok &= losses[0].len() == losses[1].len();
    }
    println!(
        "train-check: {} on {device}",
        if ok { "passed" } else { "FAILED" }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn eval(
    checkpoint: &std::path::Path,
    data: Option<DataSet>,
    data_dir: Option<PathBuf>,
    (train_subset, test_subset): (Option<usize>, Option<usize>),
    seeds: u64,
    json: Option<PathBuf>,
) -> ExitCode {
    let run = || -> contra::Result<()> {
        let ck = contra::train::load_checkpoint(checkpoint)?;
        let data = match data {
            Some(d) => d,
            None => ck.get("data").unwrap_or("digits").parse()?,
        };
        let (train, test) =
            contra::train::load_data(data, data_dir.as_deref(), train_subset, test_subset)?;
        let seeds: Vec<u64> = (0..seeds.max(1)).collect();
        let table =
            contra::train::evaluate_table(&ck.encoder, &ck.untrained, &train, &test, &seeds)?;
        println!(
            "{} encoder from {} evaluated on {data}: {} train / {} held-out images",
            ck.get("method").unwrap_or("?"),
            checkpoint.display(),
            train.len(),
            test.len()
        );
        print!("{}", table.format());
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "checkpoint": checkpoint.display().to_string(),
                "method": ck.get("method"),
                "data": data.name(),
                "eval": table.to_json(),
            }))
            .unwrap_or_default();
            std::fs::write(&path, text + "\n").map_err(|e| contra::Error::Io {
                path: path.display().to_string(),
                source: e,
            })?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `contra ntxent-timing`: see [`contra::bench::ntxent_timing`].
fn ntxent_timing(
    device: Device,
    n: usize,
    dim: usize,
    repeats: usize,
    largest: Option<usize>,
    precision: Precision,
) -> ExitCode {
    use contra::bench::ntxent_timing::{at_shape, largest as largest_n};
    if let Err(reason) = contra::device_available(device) {
        eprintln!("error: {device} is not available: {reason}");
        return ExitCode::from(2);
    }
    match at_shape(device, n, dim, repeats, precision) {
        Ok(t) => println!(
            "ntxent fwd+bwd {} {n}x{dim} on {device} (public API, loss read): {:.3} ms \
             (median of {repeats}), {:.1} TFLOP/s over 8 N^2 D",
            precision.name(),
            t.median_ms,
            t.tflops()
        ),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(max_n) = largest {
        let (best, stop) = largest_n(device, dim, n, max_n, precision);
        match best {
            Some(t) => println!(
                "largest N that ran: {}x{dim} ({:.1} ms, {:.1} TFLOP/s)",
                t.n,
                t.median_ms,
                t.tflops()
            ),
            None => println!("largest N that ran: none"),
        }
        match stop {
            Some(why) => println!("stopped at {why}"),
            None => println!("every N up to {max_n} ran"),
        }
    }
    ExitCode::SUCCESS
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
