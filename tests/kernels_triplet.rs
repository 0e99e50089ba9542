//! The triplet kernels (pair quantities, mining, backward) on every kernel device, against the
//! CPU backend computed in f64 on the same f32 inputs: the loss, its count, the hard / semi-hard /
//! easy statistics and the gradient, for every distance and mining.
//!
//! Kernel devices: `Device::Interp` always, `Device::Cuda(0)` when it can run here (otherwise each
//! test prints `skipped on cuda:0: <reason>`). Batches are not multiples of the 256-thread mining
//! block or the 4 x 128 backward tile, and include one row, two rows, a class seen once, a single
//! class (no valid triplet) and a batch larger than one block's stride.

use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::*;

const DISTANCES: [Distance; 3] = [
    Distance::Euclidean,
    Distance::SquaredEuclidean,
    Distance::Cosine,
];
const REDUCTIONS: [TripletReduction; 3] = [
    TripletReduction::Conventional,
    TripletReduction::NonZero,
    TripletReduction::AllMined,
];
const MININGS: [Mining; 4] = [
    Mining::BatchAll,
    Mining::BatchHard,
    Mining::SemiHard,
    Mining::SemiHardAll,
];

/// Labels drawn from `classes` classes (large, sparse label values: the kernels take dense ids).
fn random_labels(rng: &mut StdRng, rows: usize, classes: i64) -> Vec<i64> {
    (0..rows)
        .map(|_| 1_000_003 * rng.random_range(0..classes) - 7)
        .collect()
}

/// Runs one triplet case on `device` and on the CPU and compares loss, count, stats and gradient.
fn check_case(
    device: Device,
    case: &str,
    x: &[f32],
    dim: usize,
    labels: &[i64],
    opts: &TripletOptions,
) {
    let rows = labels.len();
    let run = |on: Device| {
        let t = if on == Device::Cpu {
            Tensor::from_vec(x.iter().map(|&v| v as f64).collect(), &[rows, dim], on)
        } else {
            Tensor::from_vec(x.to_vec(), &[rows, dim], on)
        }
        .unwrap();
        triplet(&t, labels, opts).unwrap_or_else(|e| panic!("{case} on {on}: {e}"))
    };
    let want = run(Device::Cpu);
    let got = run(device);
    let case = format!("{case} {:?} {:?}", opts.distance, opts.mining);
    assert_eq!(
        got.counts.count().unwrap(),
        want.counts.count().unwrap(),
        "{case} on {device}: count"
    );
    assert_eq!(
        got.counts.stats().unwrap(),
        want.counts.stats().unwrap(),
        "{case} on {device}: stats"
    );
    let loss_err = rel_err(
        &[got.loss.to_scalar().unwrap()],
        &[want.loss.to_scalar().unwrap()],
    );
    let grad_err = rel_err(
        &got.grad_x.to_vec_f64().unwrap(),
        &want.grad_x.to_vec_f64().unwrap(),
    );
    assert!(
        loss_err <= TOL && grad_err <= TOL,
        "{case} on {device}: loss error {loss_err:e}, gradient error {grad_err:e} > {TOL:e}"
    );
    println!(
        "  {device} {case}: loss {:.5} count {} errors {loss_err:.1e} / {grad_err:.1e}",
        got.loss.to_scalar().unwrap(),
        got.counts.count().unwrap()
    );
}

/// Every distance and mining at odd batch sizes with a few classes.
#[test]
fn triplet_matches_cpu_at_odd_shapes() {
    on_kernel_devices("triplet_matches_cpu_at_odd_shapes", |device| {
        let mut rng = StdRng::seed_from_u64(41);
        // (rows, dim, classes): odd sizes, one feature, and more rows than one block's stride.
        for &(rows, dim, classes) in &[(37, 13, 4), (23, 1, 3), (300, 9, 7)] {
            let x = feature_matrix(&mut rng, rows, dim);
            let labels = random_labels(&mut rng, rows, classes);
            for distance in DISTANCES {
                for mining in MININGS {
                    for reduction in REDUCTIONS {
                        let opts = TripletOptions {
                            distance,
                            mining,
                            margin: 0.3,
                            reduction,
                        };
                        let case = format!("{rows}x{dim} {reduction:?}");
                        check_case(device, &case, &x, dim, &labels, &opts);
                    }
                }
            }
        }
    });
}

/// Degenerate batches: one row, two rows of one class (a positive, no negative), two classes of
/// one row each (no positive), one class seen once among others, margin 0.
#[test]
fn triplet_edge_batches_match_cpu() {
    on_kernel_devices("triplet_edge_batches_match_cpu", |device| {
        let mut rng = StdRng::seed_from_u64(42);
        let cases: [(&str, Vec<i64>); 5] = [
            ("one row", vec![3]),
            ("one class", vec![5, 5]),
            ("no positive", vec![1, 2]),
            ("singleton class", vec![0, 0, 1, 1, 1, 2, 0, 1, 0]),
            ("all one class", vec![4; 11]),
        ];
        for (name, labels) in cases {
            let dim = 6;
            let x = random_matrix(&mut rng, labels.len(), dim);
            for distance in DISTANCES {
                for mining in MININGS {
                    for margin in [0.0, 0.5] {
                        let opts = TripletOptions {
                            distance,
                            mining,
                            margin,
                            ..Default::default()
                        };
                        check_case(device, name, &x, dim, &labels, &opts);
                    }
                }
            }
        }
    });
}

/// Equal distances must pick the same rows as the CPU (lowest index): points on a grid give
/// many exactly equal distances.
#[test]
fn triplet_ties_pick_the_same_rows_as_cpu() {
    on_kernel_devices("triplet_ties_pick_the_same_rows_as_cpu", |device| {
        let rows = 19;
        let x: Vec<f32> = (0..rows)
            .flat_map(|i| [(i % 4) as f32, (i / 4 % 3) as f32])
            .collect();
        let labels: Vec<i64> = (0..rows as i64).map(|i| i % 3).collect();
        for distance in [Distance::Euclidean, Distance::SquaredEuclidean] {
            for mining in MININGS {
                let opts = TripletOptions {
                    distance,
                    mining,
                    margin: 1.0,
                    ..Default::default()
                };
                check_case(device, "grid", &x, 2, &labels, &opts);
            }
        }
    });
}

/// A kernel forward's saved state drives the CPU backward and the other way round.
#[test]
fn triplet_saved_state_crosses_backends() {
    on_kernel_devices("triplet_saved_state_crosses_backends", |device| {
        let mut rng = StdRng::seed_from_u64(43);
        let (rows, dim) = (29, 5);
        let x = random_matrix(&mut rng, rows, dim);
        let labels = random_labels(&mut rng, rows, 4);
        let opts = TripletOptions {
            distance: Distance::Euclidean,
            mining: Mining::SemiHard,
            margin: 0.4,
            ..Default::default()
        };
        let on_cpu = Tensor::from_vec(x.clone(), &[rows, dim], Device::Cpu).unwrap();
        let on_device = Tensor::from_vec(x, &[rows, dim], device).unwrap();
        let cpu_fwd = triplet_forward(&on_cpu, &labels, &opts).unwrap();
        let dev_fwd = triplet_forward(&on_device, &labels, &opts).unwrap();
        let reference = triplet_backward(&on_cpu, &labels, &opts, &cpu_fwd.saved, 2.0).unwrap();
        for (name, g) in [
            (
                "cpu saved, kernel backward",
                triplet_backward(&on_device, &labels, &opts, &cpu_fwd.saved, 2.0).unwrap(),
            ),
            (
                "kernel saved, cpu backward",
                triplet_backward(&on_cpu, &labels, &opts, &dev_fwd.saved, 2.0).unwrap(),
            ),
        ] {
            let err = rel_err(&g.to_vec_f64().unwrap(), &reference.to_vec_f64().unwrap());
            assert!(err <= TOL, "{name} on {device}: relative error {err:e}");
        }
    });
}
