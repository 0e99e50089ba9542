//! Smoke tests of the trainer: a few epochs of SimCLR, MoCo v2 and SupCon on a small digits
//! subset where the loss goes down, the kernel path (interp) reproducing the CPU losses, the
//! checkpoint round trip and the files of a whole run.

use contra::data::Dataset;
use contra::nn::Module;
use contra::train::checkpoint::{load_checkpoint, save_checkpoint};
use contra::train::config::{DataSet, Method, TrainConfig};
use contra::train::run::{load_data, run, stratified_subset, CHECKPOINT_FILE, PLOT_FILE};
use contra::train::trainer::{build_encoder, features, train, Event};
use contra::Device;

/// A small, fast configuration: 64 -> 128 -> 64 backbone, 64 -> 64 -> 32 head, batch 64.
fn small(method: Method, epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::defaults(method, DataSet::Digits);
    c.epochs = epochs;
    c.batch = 64;
    c.backbone = vec![128, 64];
    c.head_hidden = 64;
    c.head_out = 32;
    c.warmup_epochs = 1;
    c.moco_k = 128;
    c.eval_every = 0;
    c.probe_seeds = vec![0, 1];
    c
}

fn digits_subset(n: usize) -> (Dataset, Dataset) {
    let (train, test) = load_data(DataSet::Digits, None, None, None).unwrap();
    (stratified_subset(&train, n, 7).unwrap(), test)
}

/// Trains and returns the per-epoch mean losses.
fn epoch_losses(cfg: &TrainConfig, data: &Dataset) -> Vec<f64> {
    let enc = build_encoder(cfg, data.dim()).unwrap();
    let mut steps = 0;
    let out = train(cfg, data, None, enc, &mut |e| {
        if let Event::Step(_) = e {
            steps += 1;
        }
    })
    .unwrap();
    assert_eq!(steps, out.steps);
    assert_eq!(out.step_losses.len(), out.steps);
    assert_eq!(out.epochs.len(), cfg.epochs);
    out.epochs.iter().map(|e| e.loss).collect()
}

fn assert_goes_down(method: Method, epochs: usize) {
    let (data, _) = digits_subset(320);
    let losses = epoch_losses(&small(method, epochs), &data);
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(losses.iter().all(|l| l.is_finite()), "{method}: {losses:?}");
    assert!(
        last < first - 0.05,
        "{method}: the loss did not go down: {losses:?}"
    );
}

#[test]
fn simclr_loss_goes_down() {
    assert_goes_down(Method::SimClr, 8);
}

#[test]
fn moco_loss_goes_down() {
    assert_goes_down(Method::Moco, 8);
}

#[test]
fn supcon_loss_goes_down() {
    assert_goes_down(Method::SupCon, 8);
}

#[test]
fn siglip_loss_goes_down() {
    assert_goes_down(Method::SigLip, 8);
}

#[test]
fn training_is_reproducible_and_mi_bound_is_log_n_minus_loss() {
    let (data, _) = digits_subset(200);
    let cfg = small(Method::SimClr, 2);
    let run_once = || {
        let enc = build_encoder(&cfg, data.dim()).unwrap();
        train(&cfg, &data, None, enc, &mut |_| {}).unwrap()
    };
    let (a, b) = (run_once(), run_once());
    assert_eq!(a.step_losses, b.step_losses);
    assert_eq!(a.encoder.flat_params(), b.encoder.flat_params());
    let log_n = ((2 * 64 - 1) as f64).ln();
    assert_eq!(a.log_candidates, Some(log_n));
    for e in &a.epochs {
        assert!((e.mi_bound.unwrap() - (log_n - e.loss)).abs() < 1e-12);
    }
}

/// The losses, momentum update and enqueue as interpreted CUDA kernels give the CPU run's first
/// losses (what the GPU check does with `--device cuda`).
#[test]
fn kernel_device_reproduces_cpu_losses() {
    let (data, _) = digits_subset(128);
    for method in Method::ALL {
        let mut cfg = small(method, 1);
        cfg.batch = 32;
        cfg.max_steps = Some(3);
        cfg.moco_k = 64;
        let mut losses = Vec::new();
        for device in [Device::Cpu, Device::Interp] {
            cfg.device = device;
            let enc = build_encoder(&cfg, data.dim()).unwrap();
            losses.push(
                train(&cfg, &data, None, enc, &mut |_| {})
                    .unwrap()
                    .step_losses,
            );
        }
        assert_eq!(losses[0].len(), 3);
        for (c, k) in losses[0].iter().zip(&losses[1]) {
            assert!(
                (c - k).abs() <= 1e-4 * c.abs().max(1.0),
                "{method}: cpu {:?} vs interp {:?}",
                losses[0],
                losses[1]
            );
        }
    }
}

#[test]
fn checkpoint_round_trip_gives_identical_features() {
    let (data, test) = digits_subset(128);
    let cfg = small(Method::Moco, 1);
    let untrained = build_encoder(&cfg, data.dim()).unwrap();
    let out = train(&cfg, &data, None, untrained.clone(), &mut |_| {}).unwrap();
    let dir = std::env::temp_dir().join(format!("contra-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("enc.safetensors");
    save_checkpoint(&path, &out.encoder, cfg.seed, &[("method", "moco".into())]).unwrap();
    let ck = load_checkpoint(&path).unwrap();
    assert_eq!(ck.get("method"), Some("moco"));
    assert_eq!(ck.encoder.flat_params(), out.encoder.flat_params());
    assert_eq!(ck.encoder.flat_buffers(), out.encoder.flat_buffers());
    assert_eq!(
        features(&ck.encoder, &test).unwrap(),
        features(&out.encoder, &test).unwrap()
    );
    // The untrained encoder is rebuilt from the specs and the seed.
    assert_eq!(ck.untrained.flat_params(), untrained.flat_params());
    // Not a checkpoint: a clear error.
    std::fs::write(dir.join("bad"), b"not safetensors").unwrap();
    let err = load_checkpoint(dir.join("bad")).unwrap_err().to_string();
    assert!(err.contains("bad"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_writes_report_plot_and_checkpoint() {
    let mut cfg = small(Method::SimClr, 2);
    cfg.train_subset = Some(300);
    cfg.eval_every = 1;
    let dir = std::env::temp_dir().join(format!("contra-run-{}", std::process::id()));
    let out = run(&cfg, &dir, &mut |_| {}).unwrap();
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["steps"], out.report["steps"]);
    assert_eq!(r["method"], "simclr");
    assert_eq!(r["data"], "digits");
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["epochs"], 2);
    assert!(r["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(r["loss"].as_array().unwrap().len(), 2);
    assert_eq!(r["mi_bound"].as_array().unwrap().len(), 2);
    assert_eq!(r["monitor"]["curve"].as_array().unwrap().len(), 3);
    for row in ["encoder", "untrained", "raw_pixels"] {
        for key in ["knn1", "knn5", "probe_full", "probe_10_per_class"] {
            let v = r["eval"][row][key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{row}.{key} = {v}");
        }
    }
    let png = std::fs::read(dir.join(PLOT_FILE)).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let ck = load_checkpoint(dir.join(CHECKPOINT_FILE)).unwrap();
    assert_eq!(ck.get("data"), Some("digits"));
    assert_eq!(ck.encoder.flat_params(), out.train.encoder.flat_params());
    // The table has the three rows.
    let table = out.table.format();
    assert!(
        table.contains("encoder") && table.contains("untrained") && table.contains("raw pixels")
    );
    // SupCon reports no InfoNCE bound.
    let mut sc = small(Method::SupCon, 1);
    sc.train_subset = Some(200);
    sc.max_steps = Some(2);
    let out = run(&sc, &dir.join("supcon"), &mut |_| {}).unwrap();
    assert!(out.report["mi_bound"].is_null());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_settings_are_clear_errors() {
    assert!("simclrr".parse::<Method>().is_err());
    assert_eq!("moco".parse::<Method>().unwrap(), Method::Moco);
    assert_eq!(
        "fashion-mnist".parse::<DataSet>().unwrap(),
        DataSet::FashionMnist
    );
    let err = load_data(DataSet::Mnist, None, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--data-dir"), "{err}");
    let missing = std::env::temp_dir().join("contra-no-such-dir");
    let err = load_data(DataSet::FashionMnist, Some(&missing), None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("apt-get install dataset-fashion-mnist"),
        "{err}"
    );
    let mut cfg = small(Method::SimClr, 1);
    cfg.batch = 1;
    assert!(cfg.validate().is_err());
}
