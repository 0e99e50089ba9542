//! A whole run of `contra train`: load the data, train, evaluate the learned encoder against the
//! untrained one and raw pixels, and write `report.json`, `curves.png` and
//! `checkpoint.safetensors` into the output folder. Also the evaluation of `contra eval`.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::checkpoint::save_checkpoint;
use super::config::{DataSet, TrainConfig};
use super::eval::evaluate;
use super::idx::{fashion_mnist, mnist, DEFAULT_FASHION_MNIST_DIR, MNIST_INSTALL};
use super::plot::{plot_curves, Curves};
use super::report::EvalTable;
use super::split::{derive_seed, digits_split, stratified_split};
use super::trainer::{build_encoder, features, monitor_scores, train, Event, TrainOutput};
use crate::data::Dataset;
use crate::nn::{DeviceEncoder, Encoder, Module};
use crate::{Error, Result};

/// Names of the files a run writes into its output folder.
pub const REPORT_FILE: &str = "report.json";
pub const PLOT_FILE: &str = "curves.png";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Largest monitor split (reference / queries) of the per-epoch kNN-1 curve.
const MONITOR_REFERENCE: usize = 5000;
const MONITOR_QUERIES: usize = 2000;

/// A stratified subset of `n` images of `data` (all of them when `n >= len`), drawn from
/// `seed`, in the original order.
pub fn stratified_subset(data: &Dataset, n: usize, seed: u64) -> Result<Dataset> {
    if n >= data.len() {
        return Ok(data.clone());
    }
    let (_, keep) = stratified_split(&data.labels, n, seed)?;
    data.subset(&keep)
}

/// The (train, held-out) images of `data`: the fixed 1347 / 450 split of the digits (seed 0),
/// the official 60 000 / 10 000 split of the IDX sets from `data_dir` (Fashion-MNIST defaults
/// to [`DEFAULT_FASHION_MNIST_DIR`]; MNIST needs a folder). `train_subset` / `test_subset`
/// keep stratified subsets.
pub fn load_data(
    data: DataSet,
    data_dir: Option<&Path>,
    train_subset: Option<usize>,
    test_subset: Option<usize>,
) -> Result<(Dataset, Dataset)> {
    let (train, test) = match data {
        DataSet::Digits => digits_split(0)?,
        DataSet::FashionMnist => {
            fashion_mnist(data_dir.unwrap_or(Path::new(DEFAULT_FASHION_MNIST_DIR)))?
        }
        DataSet::Mnist => match data_dir {
            Some(dir) => mnist(dir)?,
            None => {
                return Err(Error::invalid(
                    "load_data",
                    "data_dir",
                    format!("MNIST needs --data-dir: {MNIST_INSTALL}"),
                ))
            }
        },
    };
    let train = match train_subset {
        Some(n) => stratified_subset(&train, n, derive_seed(1, n as u64))?,
        None => train,
    };
    let test = match test_subset {
        Some(n) => stratified_subset(&test, n, derive_seed(2, n as u64))?,
        None => test,
    };
    Ok((train, test))
}

/// The full protocol ([`evaluate`]) on the trained encoder's features, the untrained
/// encoder's and the raw pixels; probes with 10 labels per class use `seeds`.
pub fn evaluate_table(
    trained: &Encoder,
    untrained: &Encoder,
    train: &Dataset,
    test: &Dataset,
    seeds: &[u64],
) -> Result<EvalTable> {
    let start = Instant::now();
    let classes = train.classes.max(test.classes);
    let on = |enc: &Encoder| -> Result<_> {
        evaluate(
            &features(enc, train)?,
            &train.labels,
            &features(enc, test)?,
            &test.labels,
            enc.feature_dim(),
            classes,
            seeds,
        )
    };
    let encoder = on(trained)?;
    let untrained = on(untrained)?;
    let raw_pixels = evaluate(
        &train.images,
        &train.labels,
        &test.images,
        &test.labels,
        train.dim(),
        classes,
        seeds,
    )?;
    Ok(EvalTable {
        encoder,
        untrained,
        raw_pixels,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `runs/<method>-<UTC date>-<time>` (with a numeric suffix if that exists already).
pub fn default_out_dir(method: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let stamp = format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    let base = PathBuf::from("runs").join(format!("{method}-{stamp}"));
    let mut dir = base.clone();
    let mut i = 1;
    while dir.exists() {
        dir = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    dir
}

/// `v` as JSON, `null` when not finite.
fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub out_dir: PathBuf,
    pub report: Value,
    pub table: EvalTable,
    pub train: TrainOutput,
}

/// Loads the data of `cfg`, trains, evaluates and writes `report.json`, `curves.png` and
/// `checkpoint.safetensors` into `out_dir` (created if needed).
pub fn run(
    cfg: &TrainConfig,
    out_dir: &Path,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunOutput> {
    cfg.validate()?;
    let start = Instant::now();
    crate::device_available(cfg.device)
        .map_err(|reason| Error::Device(format!("{} is not available: {reason}", cfg.device)))?;
    let (train_set, test_set) = load_data(
        cfg.data,
        cfg.data_dir.as_deref(),
        cfg.train_subset,
        cfg.test_subset,
    )?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let reference = stratified_subset(&train_set, MONITOR_REFERENCE, 3)?;
    let queries = stratified_subset(&test_set, MONITOR_QUERIES, 4)?;
    let untrained = build_encoder(cfg, train_set.dim())?;
    let out = train(
        cfg,
        &train_set,
        Some((&reference, &queries)),
        untrained.clone(),
        on_event,
    )?;
    let table = evaluate_table(
        &out.encoder,
        &untrained,
        &train_set,
        &test_set,
        &cfg.probe_seeds,
    )?;
    let (raw_knn1, raw_probe10) = monitor_scores(
        &reference.images,
        &reference,
        &queries.images,
        &queries,
        reference.dim(),
    )?;
    save_checkpoint(
        out_dir.join(CHECKPOINT_FILE),
        &out.encoder,
        cfg.seed,
        &[
            ("method", cfg.method.name().to_string()),
            ("data", cfg.data.name().to_string()),
            ("epochs", out.epochs.len().to_string()),
            ("config", cfg.to_json().to_string()),
        ],
    )?;
    let loss: Vec<f64> = out.epochs.iter().map(|e| e.loss).collect();
    let mi: Option<Vec<f64>> = out
        .log_candidates
        .map(|_| out.epochs.iter().filter_map(|e| e.mi_bound).collect());
    let title = format!(
        "{} on {} ({} epochs, batch {}, loss on {})",
        cfg.method,
        cfg.data,
        out.epochs.len(),
        cfg.batch.min(train_set.len()),
        cfg.device
    );
    plot_curves(
        out_dir.join(PLOT_FILE),
        &Curves {
            title: &title,
            loss: &loss,
            mi_bound: mi.as_deref(),
            monitor: &out.monitor_curve,
            raw: Some((raw_knn1, raw_probe10)),
        },
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let report = json!({
        "method": cfg.method.name(),
        "data": cfg.data.name(),
        "device": cfg.device.to_string(),
        "encoder_device": cfg.device.to_string(),
        "gemm": DeviceEncoder::new(cfg.device).gemm_library()?,
        "epochs": out.epochs.len(),
        "steps": out.steps,
        "seconds": seconds,
        "train_seconds": out.seconds,
        "eval_seconds": table.seconds,
        "train_images": train_set.len(),
        "test_images": test_set.len(),
        "loss": loss,
        "mi_bound": mi,
        "log_n": out.log_candidates,
        "step_loss": out.step_losses,
        "monitor": {
            "reference_images": reference.len(),
            "query_images": queries.len(),
            "curve": out.monitor_curve.iter().map(|p| json!({
                "epoch": p.epoch,
                "knn1": p.knn1,
                "probe_10_per_class": finite(p.probe_10_per_class),
            })).collect::<Vec<_>>(),
            "raw_pixels": {"knn1": raw_knn1, "probe_10_per_class": finite(raw_probe10)},
        },
        "eval": table.to_json(),
        "config": cfg.to_json(),
        "encoder": {
            "backbone": super::checkpoint::spec_to_json(out.encoder.backbone.spec()),
            "head": super::checkpoint::spec_to_json(out.encoder.head.spec()),
            "params": out.encoder.num_params(),
            "feature_dim": out.encoder.feature_dim(),
        },
        "machine": {
            "threads": rayon::current_num_threads(),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "files": {
            "checkpoint": CHECKPOINT_FILE,
            "plot": PLOT_FILE,
        },
        "contra_version": env!("CARGO_PKG_VERSION"),
    });
    let path = out_dir.join(REPORT_FILE);
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::format(&path, format!("serializing: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(RunOutput {
        out_dir: out_dir.to_path_buf(),
        report,
        table,
        train: out,
    })
}
