//! Tests of the pairwise ops through the public API: similarity matrices, triplet losses (three
//! distances x three minings), the Hadsell margin loss, NCE and the momentum update.

use contra::{
    margin_backward, margin_forward, margin_loss, momentum_update, nce, nce_backward, nce_forward,
    similarity, triplet, triplet_backward, triplet_forward, DType, Device, Distance, Error,
    MarginOptions, Mining, Similarity, Tensor, TripletOptions, TripletReduction, TripletStats,
};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};

const DISTANCES: [Distance; 3] = [
    Distance::Euclidean,
    Distance::SquaredEuclidean,
    Distance::Cosine,
];
const MININGS: [Mining; 4] = [
    Mining::BatchAll,
    Mining::BatchHard,
    Mining::SemiHard,
    Mining::SemiHardAll,
];
const REDUCTIONS: [TripletReduction; 3] = [
    TripletReduction::Conventional,
    TripletReduction::NonZero,
    TripletReduction::AllMined,
];

// ---------------------------------------------------------------------------------------------
// Helpers

fn t64(values: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values, shape, Device::Cpu).unwrap()
}

fn t32(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(
        values.iter().map(|&v| v as f32).collect(),
        shape,
        Device::Cpu,
    )
    .unwrap()
}

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `||got - want|| / max(||want||, 1e-12)`; NaN gives infinity.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    if got.iter().chain(want).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    norm(&diff) / norm(want).max(1e-12)
}

/// Central-difference gradient of `f` at `x` with step 1e-6.
fn numeric_grad(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
    let h = 1e-6;
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let up = f(&probe);
            probe[i] = x[i] - h;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn assert_grad_close(analytic: &[f64], numeric: &[f64], what: &str) {
    assert!(
        norm(numeric) > 1e-6,
        "{what}: the numeric gradient vanishes, the check would be vacuous"
    );
    let err = rel_err(analytic, numeric);
    assert!(err < 1e-5, "{what}: gradient relative error {err:e}");
}

// ---------------------------------------------------------------------------------------------
// Brute-force triplet reference (O(N^3), plain loops, direct differences)

fn ref_distances(x: &[f64], n: usize, d: usize, distance: Distance) -> Vec<f64> {
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let (a, b) = (row(i), row(j));
            out[i * n + j] = match distance {
                Distance::SquaredEuclidean | Distance::Euclidean => {
                    let sq: f64 = a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum();
                    if distance == Distance::Euclidean {
                        sq.max(1e-12).sqrt()
                    } else {
                        sq
                    }
                }
                Distance::Cosine => {
                    let dot: f64 = a.iter().zip(b).map(|(u, v)| u * v).sum();
                    1.0 - dot / (norm(a).max(1e-12) * norm(b).max(1e-12))
                }
            };
        }
    }
    out
}

#[derive(Debug)]
struct RefTriplet {
    loss: f64,
    count: u64,
    stats: TripletStats,
}

fn ref_triplet(x: &[f64], labels: &[i64], d: usize, opts: &TripletOptions) -> RefTriplet {
    let n = labels.len();
    let m = opts.margin;
    let dist = ref_distances(x, n, d, opts.distance);
    let dd = |i: usize, j: usize| dist[i * n + j];
    let mut stats = TripletStats::default();
    // Every mined term, in mining order.
    let mut terms: Vec<f64> = Vec::new();
    for a in 0..n {
        for p in 0..n {
            if p == a || labels[p] != labels[a] {
                continue;
            }
            for q in 0..n {
                if labels[q] == labels[a] {
                    continue;
                }
                let (dp, dn) = (dd(a, p), dd(a, q));
                if dn < dp {
                    stats.hard += 1;
                } else if dn < dp + m {
                    stats.semi_hard += 1;
                } else {
                    stats.easy += 1;
                }
                let term = dp - dn + m;
                match opts.mining {
                    Mining::BatchAll => terms.push(term.max(0.0)),
                    Mining::SemiHardAll if dn > dp && term >= 0.0 => terms.push(term),
                    _ => {}
                }
            }
        }
    }
    match opts.mining {
        Mining::BatchAll | Mining::SemiHardAll => {}
        Mining::SemiHard => {
            for a in 0..n {
                let negs: Vec<f64> = (0..n)
                    .filter(|&q| labels[q] != labels[a])
                    .map(|q| dd(a, q))
                    .collect();
                if negs.is_empty() {
                    continue;
                }
                for p in 0..n {
                    if p == a || labels[p] != labels[a] {
                        continue;
                    }
                    let dp = dd(a, p);
                    let farther = negs
                        .iter()
                        .copied()
                        .filter(|&dn| dn > dp)
                        .fold(f64::INFINITY, f64::min);
                    let dn = if farther.is_finite() {
                        farther
                    } else {
                        negs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                    };
                    terms.push((dp - dn + m).max(0.0));
                }
            }
        }
        Mining::BatchHard => {
            for a in 0..n {
                let pos = (0..n)
                    .filter(|&p| p != a && labels[p] == labels[a])
                    .map(|p| dd(a, p))
                    .fold(f64::NEG_INFINITY, f64::max);
                let neg = (0..n)
                    .filter(|&q| labels[q] != labels[a])
                    .map(|q| dd(a, q))
                    .fold(f64::INFINITY, f64::min);
                if pos.is_finite() && neg.is_finite() {
                    terms.push((pos - neg + m).max(0.0));
                }
            }
        }
    }
    let nonzero_only = match opts.reduction {
        TripletReduction::Conventional => {
            matches!(opts.mining, Mining::BatchAll | Mining::SemiHardAll)
        }
        TripletReduction::NonZero => true,
        TripletReduction::AllMined => false,
    };
    if nonzero_only {
        terms.retain(|&t| t > 0.0);
    }
    let count = terms.len() as u64;
    RefTriplet {
        loss: if count > 0 {
            terms.iter().sum::<f64>() / count as f64
        } else {
            0.0
        },
        count,
        stats,
    }
}

/// True when no term or mining choice of the batch sits within `gap` of a kink: all distances
/// from one anchor differ pairwise by more than `gap`, and every valid triplet has
/// `|d_ap - d_an + m| > gap`.
fn well_separated(x: &[f64], labels: &[i64], d: usize, opts: &TripletOptions, gap: f64) -> bool {
    let n = labels.len();
    let dist = ref_distances(x, n, d, opts.distance);
    for a in 0..n {
        for i in 0..n {
            for j in 0..n {
                if i == a || j == a || i == j {
                    continue;
                }
                let (di, dj) = (dist[a * n + i], dist[a * n + j]);
                if (di - dj).abs() <= gap {
                    return false;
                }
                let valid = labels[i] == labels[a] && labels[j] != labels[a];
                if valid && (di - dj + opts.margin).abs() <= gap {
                    return false;
                }
            }
        }
    }
    true
}

fn triplet_loss_f64(x: &[f64], labels: &[i64], d: usize, opts: &TripletOptions) -> f64 {
    triplet_forward(&t64(x.to_vec(), &[labels.len(), d]), labels, opts)
        .unwrap()
        .loss
        .to_scalar()
        .unwrap()
}

fn random_labels(rng: &mut StdRng, n: usize, classes: i64) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(0..classes)).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Finite-difference gradient checks (f64)

#[test]
fn triplet_gradients_match_finite_differences() {
    let (n, d) = (9, 5);
    // Classes of 3, 3, 2 and a class seen once.
    let labels: Vec<i64> = vec![0, 1, 0, 2, 1, 0, 2, 1, 3];
    for distance in DISTANCES {
        for mining in MININGS {
            let opts = TripletOptions {
                distance,
                mining,
                margin: 0.5,
                ..Default::default()
            };
            // The first seed whose batch has no term or choice near a kink and a positive loss.
            let x = (0..1000u64)
                .map(|seed| uniform(&mut StdRng::seed_from_u64(seed), n * d))
                .find(|x| {
                    well_separated(x, &labels, d, &opts, 1e-3)
                        && triplet_loss_f64(x, &labels, d, &opts) > 1e-3
                })
                .unwrap_or_else(|| panic!("no well-separated batch for {opts:?}"));
            let out = triplet(&t64(x.clone(), &[n, d]), &labels, &opts).unwrap();
            let numeric = numeric_grad(|v| triplet_loss_f64(v, &labels, d, &opts), &x);
            assert_grad_close(
                &out.grad_x.to_vec::<f64>().unwrap(),
                &numeric,
                &format!("triplet {opts:?}"),
            );
        }
    }
}

#[test]
fn triplet_backward_scales_with_grad_loss() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n, d) = (12, 4);
    let x = t64(uniform(&mut rng, n * d), &[n, d]);
    let labels = random_labels(&mut rng, n, 3);
    for mining in MININGS {
        let opts = TripletOptions {
            distance: Distance::Euclidean,
            mining,
            margin: 1.0,
            ..Default::default()
        };
        let fwd = triplet_forward(&x, &labels, &opts).unwrap();
        let g1 = triplet_backward(&x, &labels, &opts, &fwd.saved, 1.0)
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        let g = triplet_backward(&x, &labels, &opts, &fwd.saved, -2.5)
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        assert!(norm(&g1) > 0.0, "{mining:?}: zero gradient");
        let want: Vec<f64> = g1.iter().map(|v| -2.5 * v).collect();
        assert!(rel_err(&g, &want) < 1e-14, "{mining:?}");
    }
}

#[test]
fn margin_gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, d) = (7, 3);
    let y: Vec<i64> = vec![0, 1, 1, 0, 1, 1, 0];
    let opts = MarginOptions {
        margin: 1.5,
        ..Default::default()
    };
    let x1 = uniform(&mut rng, b * d);
    let x2 = uniform(&mut rng, b * d);
    // Keep the dissimilar pairs off the kink d = m (random pairs in [-1, 1]^3 mostly sit inside).
    for i in 0..b {
        let d_i = norm(
            &(0..d)
                .map(|k| x1[i * d + k] - x2[i * d + k])
                .collect::<Vec<_>>(),
        );
        assert!((d_i - opts.margin).abs() > 1e-3 && d_i > 1e-3);
    }
    let loss = |a: &[f64], b_: &[f64]| {
        margin_forward(
            &t64(a.to_vec(), &[b, d]),
            &t64(b_.to_vec(), &[b, d]),
            &y,
            &opts,
        )
        .unwrap()
        .loss
        .to_scalar()
        .unwrap()
    };
    let out = margin_loss(
        &t64(x1.clone(), &[b, d]),
        &t64(x2.clone(), &[b, d]),
        &y,
        &opts,
    )
    .unwrap();
    assert_grad_close(
        &out.grad_x1.to_vec::<f64>().unwrap(),
        &numeric_grad(|v| loss(v, &x2), &x1),
        "margin x1",
    );
    assert_grad_close(
        &out.grad_x2.to_vec::<f64>().unwrap(),
        &numeric_grad(|v| loss(&x1, v), &x2),
        "margin x2",
    );
    // A dissimilar pair beyond the margin contributes neither loss nor gradient.
    let far = margin_loss(
        &t64(vec![0.0, 0.0], &[1, 2]),
        &t64(vec![3.0, 4.0], &[1, 2]),
        &[1],
        &MarginOptions {
            margin: 4.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(far.loss.to_scalar().unwrap(), 0.0);
    assert_eq!(far.grad_x1.to_vec::<f64>().unwrap(), vec![0.0, 0.0]);
}

#[test]
fn margin_loss_matches_formula() {
    // d = 5 for both pairs; margin 7: (25 / 2 + (7 - 5)^2 / 2) / 2.
    let x1 = t64(vec![0.0, 0.0, 1.0, 1.0], &[2, 2]);
    let x2 = t64(vec![3.0, 4.0, 4.0, 5.0], &[2, 2]);
    let out = margin_loss(
        &x1,
        &x2,
        &[0, 1],
        &MarginOptions {
            margin: 7.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        (out.loss.to_scalar().unwrap() - (12.5 + 2.0) / 2.0).abs() < 1e-12,
        "{}",
        out.loss.to_scalar().unwrap()
    );
    // Row 0 (similar): d(d^2/2)/dx1 = (x1 - x2) / 2 (mean over 2 rows).
    // Row 1 (dissimilar): -(m - d) / d (x1 - x2) / 2 = -(2/5)(-3, -4)/2.
    let g1 = out.grad_x1.to_vec::<f64>().unwrap();
    let want = [-1.5, -2.0, 0.6, 0.8];
    assert!(rel_err(&g1, &want) < 1e-12, "{g1:?}");
    let g2 = out.grad_x2.to_vec::<f64>().unwrap();
    assert!(rel_err(&g2, &want.map(|v| -v)) < 1e-12, "{g2:?}");
}

#[test]
fn nce_gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(9);
    let (b, k) = (5, 3);
    let s_pos = uniform(&mut rng, b);
    let s_neg = uniform(&mut rng, b * k);
    let logq_pos = t64(uniform(&mut rng, b).iter().map(|v| v - 2.0).collect(), &[b]);
    let logq_neg = t64(
        uniform(&mut rng, b * k).iter().map(|v| v - 2.0).collect(),
        &[b, k],
    );
    let loss = |sp: &[f64], sn: &[f64]| {
        nce_forward(
            &t64(sp.to_vec(), &[b]),
            &t64(sn.to_vec(), &[b, k]),
            &logq_pos,
            &logq_neg,
        )
        .unwrap()
        .loss
        .to_scalar()
        .unwrap()
    };
    let out = nce(
        &t64(s_pos.clone(), &[b]),
        &t64(s_neg.clone(), &[b, k]),
        &logq_pos,
        &logq_neg,
    )
    .unwrap();
    assert_grad_close(
        &out.grad_s_pos.to_vec::<f64>().unwrap(),
        &numeric_grad(|v| loss(v, &s_neg), &s_pos),
        "nce s_pos",
    );
    assert_grad_close(
        &out.grad_s_neg.to_vec::<f64>().unwrap(),
        &numeric_grad(|v| loss(&s_pos, v), &s_neg),
        "nce s_neg",
    );
    // The backward is linear in grad_loss.
    let inputs = [
        t64(s_pos.clone(), &[b]),
        t64(s_neg.clone(), &[b, k]),
        logq_pos.clone(),
        logq_neg.clone(),
    ];
    let [sp, sn, qp, qn] = &inputs;
    let fwd = nce_forward(sp, sn, qp, qn).unwrap();
    let (gp, _) = nce_backward(sp, sn, qp, qn, &fwd.saved, 3.0).unwrap();
    // A saved state of other inputs is refused.
    let err = nce_backward(
        &inputs[0], &inputs[1], &inputs[0], &inputs[1], &fwd.saved, 1.0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`saved`"), "{err}");
    let want: Vec<f64> = out
        .grad_s_pos
        .to_vec::<f64>()
        .unwrap()
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    assert!(rel_err(&gp.to_vec::<f64>().unwrap(), &want) < 1e-14);
}

// ---------------------------------------------------------------------------------------------
// 2. Triplet against the brute-force reference

fn check_against_reference(x: &[f64], labels: &[i64], d: usize, what: &str) {
    let n = labels.len();
    let xt = t64(x.to_vec(), &[n, d]);
    for distance in DISTANCES {
        for (mining, reduction) in MININGS.into_iter().flat_map(|m| REDUCTIONS.map(|r| (m, r))) {
            let opts = TripletOptions {
                distance,
                mining,
                margin: 0.3,
                reduction,
            };
            let got = triplet_forward(&xt, labels, &opts).unwrap();
            let want = ref_triplet(x, labels, d, &opts);
            let err =
                (got.loss.to_scalar().unwrap() - want.loss).abs() / want.loss.abs().max(1e-12);
            assert!(
                err < 1e-9,
                "{what} {opts:?}: loss {} vs {}",
                got.loss.to_scalar().unwrap(),
                want.loss
            );
            assert_eq!(
                got.counts.count().unwrap(),
                want.count,
                "{what} {opts:?}: count"
            );
            assert_eq!(
                got.counts.stats().unwrap(),
                want.stats,
                "{what} {opts:?}: stats"
            );
        }
    }
}

#[test]
fn triplet_matches_brute_force_reference() {
    let mut rng = StdRng::seed_from_u64(2024);
    for round in 0..6 {
        let n = rng.random_range(5..31);
        let d = rng.random_range(1..9);
        let mut labels = random_labels(&mut rng, n, 4);
        labels[n / 2] = 100; // a class seen once
        let x = uniform(&mut rng, n * d);
        check_against_reference(&x, &labels, d, &format!("round {round} (n={n}, d={d})"));
        let want = ref_triplet(
            &x,
            &labels,
            d,
            &TripletOptions {
                distance: Distance::Euclidean,
                mining: Mining::BatchAll,
                margin: 0.3,
                ..Default::default()
            },
        );
        assert!(
            want.count > 0 && want.loss > 0.0,
            "round {round}: vacuous batch"
        );
    }
}

#[test]
fn triplet_with_no_valid_triplet_is_zero() {
    let mut rng = StdRng::seed_from_u64(3);
    let (n, d) = (8, 3);
    let x = t64(uniform(&mut rng, n * d), &[n, d]);
    let same = vec![4i64; n];
    let distinct: Vec<i64> = (0..n as i64).collect();
    for labels in [same, distinct] {
        for distance in DISTANCES {
            for mining in MININGS {
                let opts = TripletOptions {
                    distance,
                    mining,
                    margin: 0.5,
                    ..Default::default()
                };
                let out = triplet(&x, &labels, &opts).unwrap();
                assert_eq!(out.loss.to_scalar().unwrap(), 0.0, "{opts:?} {labels:?}");
                assert_eq!(out.counts.count().unwrap(), 0, "{opts:?} {labels:?}");
                assert_eq!(
                    out.counts.stats().unwrap(),
                    TripletStats::default(),
                    "{opts:?} {labels:?}"
                );
                let g = out.grad_x.to_vec::<f64>().unwrap();
                assert!(g.iter().all(|&v| v == 0.0), "{opts:?}: nonzero gradient");
            }
        }
    }
    // A single row is a valid (empty) batch too.
    let one = triplet(
        &t64(vec![1.0, 2.0], &[1, 2]),
        &[0],
        &TripletOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (one.loss.to_scalar().unwrap(), one.counts.count().unwrap()),
        (0.0, 0)
    );
}

#[test]
fn triplet_hand_computed_cases() {
    // 1-D points: class 7 at 0.0 and 0.1, class 9 at 1.0 and 0.5; euclidean, margin 0.2.
    let x = t64(vec![0.0, 0.1, 1.0, 0.5], &[4, 1]);
    let labels = [7, 7, 9, 9];
    let opts = |mining| TripletOptions {
        distance: Distance::Euclidean,
        mining,
        margin: 0.2,
        ..Default::default()
    };
    // Triplets: (0,1,n): d_ap 0.1 vs d_an 1.0, 0.5 -> easy; (1,0,n): 0.1 vs 0.9, 0.4 -> easy;
    // (2,3,n): 0.5 vs 1.0, 0.9 -> easy; (3,2,n): 0.5 vs 0.5 (semi-hard), 0.4 (hard).
    let hard = triplet(&x, &labels, &opts(Mining::BatchHard)).unwrap();
    assert!(
        (hard.loss.to_scalar().unwrap() - 0.3 / 4.0).abs() < 1e-12,
        "{}",
        hard.loss.to_scalar().unwrap()
    );
    assert_eq!(hard.counts.count().unwrap(), 4);
    assert_eq!(
        hard.counts.stats().unwrap(),
        TripletStats {
            hard: 1,
            semi_hard: 1,
            easy: 6
        }
    );
    // Only anchor 3 (x = 0.5) is active: positive 2 (x = 1.0), negative 1 (x = 0.1).
    // d(d_ap - d_an)/dx: x3 gets -1 - 1 = -2 ... divided by count 4.
    let g = hard.grad_x.to_vec::<f64>().unwrap();
    assert!(rel_err(&g, &[0.0, 0.25, 0.25, -0.5]) < 1e-9, "{g:?}");
    // batch-all: the terms 0.5 - 0.5 + 0.2 = 0.2 and 0.5 - 0.4 + 0.2 = 0.3.
    let all = triplet(&x, &labels, &opts(Mining::BatchAll)).unwrap();
    assert!(
        (all.loss.to_scalar().unwrap() - 0.25).abs() < 1e-12,
        "{}",
        all.loss.to_scalar().unwrap()
    );
    assert_eq!(all.counts.count().unwrap(), 2);
}

// ---------------------------------------------------------------------------------------------
// 3. Permutation invariance

#[test]
fn triplet_is_permutation_invariant() {
    let mut rng = StdRng::seed_from_u64(77);
    let (n, d) = (23, 6);
    let x = uniform(&mut rng, n * d);
    let labels = random_labels(&mut rng, n, 4);
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng);
    assert!(perm.iter().enumerate().any(|(i, &p)| i != p));
    let px: Vec<f64> = perm
        .iter()
        .flat_map(|&p| x[p * d..(p + 1) * d].to_vec())
        .collect();
    let plabels: Vec<i64> = perm.iter().map(|&p| labels[p]).collect();
    for distance in DISTANCES {
        for mining in MININGS {
            let opts = TripletOptions {
                distance,
                mining,
                margin: 0.4,
                ..Default::default()
            };
            let a = triplet(&t64(x.clone(), &[n, d]), &labels, &opts).unwrap();
            let b = triplet(&t64(px.clone(), &[n, d]), &plabels, &opts).unwrap();
            assert!(a.loss.to_scalar().unwrap() > 0.0, "{opts:?}: vacuous");
            assert!(
                (a.loss.to_scalar().unwrap() - b.loss.to_scalar().unwrap()).abs()
                    <= 1e-12 * a.loss.to_scalar().unwrap(),
                "{opts:?}"
            );
            assert_eq!(
                a.counts.count().unwrap(),
                b.counts.count().unwrap(),
                "{opts:?}"
            );
            assert_eq!(
                a.counts.stats().unwrap(),
                b.counts.stats().unwrap(),
                "{opts:?}"
            );
            let ga = a.grad_x.to_vec::<f64>().unwrap();
            let gb = b.grad_x.to_vec::<f64>().unwrap();
            let ga_perm: Vec<f64> = perm
                .iter()
                .flat_map(|&p| ga[p * d..(p + 1) * d].to_vec())
                .collect();
            assert!(rel_err(&gb, &ga_perm) < 1e-10, "{opts:?}: gradient");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Similarity against a naive double loop

fn naive_similarity(
    a: &[f64],
    b: &[f64],
    n: usize,
    m: usize,
    d: usize,
    kind: Similarity,
) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            let (u, v) = (&a[i * d..(i + 1) * d], &b[j * d..(j + 1) * d]);
            let dot: f64 = u.iter().zip(v).map(|(p, q)| p * q).sum();
            let sq: f64 = u.iter().zip(v).map(|(p, q)| (p - q) * (p - q)).sum();
            out[i * m + j] = match kind {
                Similarity::Dot => dot,
                Similarity::Cosine => dot / (norm(u).max(1e-12) * norm(v).max(1e-12)),
                Similarity::SquaredEuclidean => sq,
                Similarity::Euclidean => sq.max(1e-12).sqrt(),
            };
        }
    }
    out
}

#[test]
fn similarity_matches_naive_loops() {
    let mut rng = StdRng::seed_from_u64(1);
    let (n, m, d) = (37, 53, 77);
    let a = uniform(&mut rng, n * d);
    let b = uniform(&mut rng, m * d);
    for kind in [
        Similarity::Dot,
        Similarity::Cosine,
        Similarity::SquaredEuclidean,
        Similarity::Euclidean,
    ] {
        let want = naive_similarity(&a, &b, n, m, d, kind);
        let got64 = similarity(&t64(a.clone(), &[n, d]), &t64(b.clone(), &[m, d]), kind).unwrap();
        assert_eq!(got64.shape(), &[n, m]);
        assert_eq!(got64.dtype(), DType::F64);
        let err64 = rel_err(&got64.to_vec::<f64>().unwrap(), &want);
        assert!(err64 < 1e-12, "{kind:?} f64: {err64:e}");
        let got32 = similarity(&t32(&a, &[n, d]), &t32(&b, &[m, d]), kind).unwrap();
        assert_eq!(got32.dtype(), DType::F32);
        let err32 = rel_err(&got32.to_vec_f64().unwrap(), &want);
        assert!(err32 < 1e-5, "{kind:?} f32: {err32:e}");
    }
}

#[test]
fn similarity_of_a_matrix_with_itself() {
    let mut rng = StdRng::seed_from_u64(4);
    let (n, d) = (6, 4);
    let a = t64(uniform(&mut rng, n * d), &[n, d]);
    let cos = similarity(&a, &a, Similarity::Cosine)
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    let dist = similarity(&a, &a, Similarity::Euclidean)
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    for i in 0..n {
        assert!((cos[i * n + i] - 1.0).abs() < 1e-12);
        // The clamp: sqrt(max(0, 1e-12)) = 1e-6 on the diagonal.
        assert!((dist[i * n + i] - 1e-6).abs() < 1e-7, "{}", dist[i * n + i]);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Momentum

#[test]
fn momentum_matches_formula() {
    let mut rng = StdRng::seed_from_u64(8);
    let shape = [3, 4, 5];
    let k = uniform(&mut rng, 60);
    let q = uniform(&mut rng, 60);
    let m = 0.9;
    let mut tk = t64(k.clone(), &shape);
    momentum_update(&mut tk, &t64(q.clone(), &shape), m).unwrap();
    let want: Vec<f64> = k
        .iter()
        .zip(&q)
        .map(|(a, b)| m * a + (1.0 - m) * b)
        .collect();
    assert!(rel_err(&tk.to_vec::<f64>().unwrap(), &want) < 1e-15);
    assert_eq!(tk.shape(), &shape);
    // f32 too.
    let mut tk32 = t32(&k, &shape);
    momentum_update(&mut tk32, &t32(&q, &shape), m).unwrap();
    assert!(rel_err(&tk32.to_vec_f64().unwrap(), &want) < 1e-6);
}

#[test]
fn momentum_endpoints_are_exact() {
    let mut rng = StdRng::seed_from_u64(10);
    let k = uniform(&mut rng, 40);
    let q = uniform(&mut rng, 40);
    let mut tk = t32(&k, &[8, 5]);
    let before = tk.to_vec::<f32>().unwrap();
    momentum_update(&mut tk, &t32(&q, &[8, 5]), 1.0).unwrap();
    assert_eq!(
        tk.to_vec::<f32>().unwrap(),
        before,
        "m = 1 must leave theta_k unchanged"
    );
    let tq = t32(&q, &[8, 5]);
    momentum_update(&mut tk, &tq, 0.0).unwrap();
    assert_eq!(
        tk.to_vec::<f32>().unwrap(),
        tq.to_vec::<f32>().unwrap(),
        "m = 0 must copy theta_q"
    );
    let mut tk64 = t64(k.clone(), &[40]);
    momentum_update(&mut tk64, &t64(q.clone(), &[40]), 0.0).unwrap();
    assert_eq!(tk64.to_vec::<f64>().unwrap(), q);
}

// ---------------------------------------------------------------------------------------------
// 6. NCE

fn sigmoid_direct(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn nce_with_one_noise_sample_matches_direct_formula() {
    let mut rng = StdRng::seed_from_u64(6);
    let b = 11;
    let s_pos = uniform(&mut rng, b);
    let s_neg = uniform(&mut rng, b);
    let lq_pos: Vec<f64> = uniform(&mut rng, b).iter().map(|v| v - 1.0).collect();
    let lq_neg: Vec<f64> = uniform(&mut rng, b).iter().map(|v| v - 1.0).collect();
    // k = 1: log k = 0, loss = mean[-log sigma(s_pos - lq_pos) - log(1 - sigma(s_neg - lq_neg))].
    let want: f64 = (0..b)
        .map(|i| {
            -sigmoid_direct(s_pos[i] - lq_pos[i]).ln()
                - (1.0 - sigmoid_direct(s_neg[i] - lq_neg[i])).ln()
        })
        .sum::<f64>()
        / b as f64;
    let out = nce(
        &t64(s_pos.clone(), &[b]),
        &t64(s_neg.clone(), &[b, 1]),
        &t64(lq_pos.clone(), &[b]),
        &t64(lq_neg.clone(), &[b, 1]),
    )
    .unwrap();
    assert!(
        (out.loss.to_scalar().unwrap() - want).abs() < 1e-12 * want,
        "{} vs {want}",
        out.loss.to_scalar().unwrap()
    );
    let gp_want: Vec<f64> = (0..b)
        .map(|i| (sigmoid_direct(s_pos[i] - lq_pos[i]) - 1.0) / b as f64)
        .collect();
    assert!(rel_err(&out.grad_s_pos.to_vec::<f64>().unwrap(), &gp_want) < 1e-12);
    // With k = 4 the log k shift matters: the same scores give another loss.
    let k4 = nce_forward(
        &t64(s_pos.clone(), &[b]),
        &t64(s_neg.iter().flat_map(|&v| [v; 4]).collect(), &[b, 4]),
        &t64(lq_pos.clone(), &[b]),
        &t64(lq_neg.iter().flat_map(|&v| [v; 4]).collect(), &[b, 4]),
    )
    .unwrap()
    .loss
    .to_scalar()
    .unwrap();
    let want4: f64 = (0..b)
        .map(|i| {
            let lk = 4f64.ln();
            -sigmoid_direct(s_pos[i] - lk - lq_pos[i]).ln()
                - 4.0 * (1.0 - sigmoid_direct(s_neg[i] - lk - lq_neg[i])).ln()
        })
        .sum::<f64>()
        / b as f64;
    assert!((k4 - want4).abs() < 1e-12 * want4, "{k4} vs {want4}");
}

#[test]
fn nce_large_scores_do_not_overflow() {
    // exp(1000) overflows f64 and exp(100) overflows f32; softplus must stay finite and linear.
    let s_pos = [-1000.0, 1000.0, 0.0];
    let s_neg = [1000.0, -1000.0, 0.0];
    let zeros_b = [0.0; 3];
    let zeros_bk = [0.0; 3];
    let out = nce(
        &t64(s_pos.to_vec(), &[3]),
        &t64(s_neg.to_vec(), &[3, 1]),
        &t64(zeros_b.to_vec(), &[3]),
        &t64(zeros_bk.to_vec(), &[3, 1]),
    )
    .unwrap();
    // Row 0: softplus(1000) + softplus(1000) = 2000; row 1: ~0; row 2: 2 log 2.
    let want = (2000.0 + 2.0 * 2f64.ln()) / 3.0;
    assert!(
        (out.loss.to_scalar().unwrap() - want).abs() < 1e-9,
        "{}",
        out.loss.to_scalar().unwrap()
    );
    let gp = out.grad_s_pos.to_vec::<f64>().unwrap();
    let gn = out.grad_s_neg.to_vec::<f64>().unwrap();
    assert!(gp.iter().chain(&gn).all(|v| v.is_finite()));
    assert!(
        rel_err(&gp, &[-1.0 / 3.0, 0.0, -0.5 / 3.0]) < 1e-12,
        "{gp:?}"
    );
    assert!(rel_err(&gn, &[1.0 / 3.0, 0.0, 0.5 / 3.0]) < 1e-12, "{gn:?}");
    // f32 inputs with scores whose exp overflows f32.
    let out32 = nce(
        &t32(&[-100.0, 100.0, 0.0], &[3]),
        &t32(&[100.0, -100.0, 0.0], &[3, 1]),
        &t32(&zeros_b, &[3]),
        &t32(&zeros_bk, &[3, 1]),
    )
    .unwrap();
    let want32 = (200.0 + 2.0 * 2f64.ln()) / 3.0;
    assert!(
        (out32.loss.to_scalar().unwrap() - want32).abs() < 1e-6 * want32,
        "{}",
        out32.loss.to_scalar().unwrap()
    );
    assert!(out32
        .grad_s_neg
        .to_vec_f64()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

// ---------------------------------------------------------------------------------------------
// 7. Errors

fn expect_shape_err(result: Result<impl std::fmt::Debug, Error>, arg_name: &str) {
    match result {
        Err(e @ Error::Shape { arg, .. }) => {
            assert_eq!(arg, arg_name, "{e}");
            assert!(e.to_string().contains(arg_name), "{e}");
        }
        other => panic!("expected a shape error naming `{arg_name}`, got {other:?}"),
    }
}

fn expect_empty_err(result: Result<impl std::fmt::Debug, Error>, arg_name: &str, what: &str) {
    match result {
        Err(e @ Error::Empty { arg, .. }) => {
            assert_eq!(arg, arg_name, "{e}");
            let text = e.to_string();
            assert!(text.contains(arg_name) && text.contains(what), "{text}");
        }
        other => panic!("expected an empty error naming `{arg_name}`, got {other:?}"),
    }
}

fn expect_invalid_err(result: Result<impl std::fmt::Debug, Error>, arg_name: &str, needle: &str) {
    match result {
        Err(e @ Error::InvalidArgument { arg, .. }) => {
            assert_eq!(arg, arg_name, "{e}");
            let text = e.to_string();
            assert!(text.contains(arg_name) && text.contains(needle), "{text}");
        }
        other => panic!("expected an invalid-argument error naming `{arg_name}`, got {other:?}"),
    }
}

fn expect_non_finite_err(
    result: Result<impl std::fmt::Debug, Error>,
    arg_name: &str,
    want_row: usize,
) {
    match result {
        Err(e @ Error::NonFinite { arg, row, .. }) => {
            assert_eq!((arg, row), (arg_name, want_row), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(arg_name) && text.contains(&format!("row {want_row}")),
                "{text}"
            );
        }
        other => panic!("expected a non-finite error naming `{arg_name}`, got {other:?}"),
    }
}

fn expect_mismatch_err(result: Result<impl std::fmt::Debug, Error>, names: &[&str]) {
    match result {
        Err(e @ Error::Mismatch { .. }) => {
            let text = e.to_string();
            for name in names {
                assert!(text.contains(&format!("`{name}`")), "{text}");
            }
        }
        other => panic!("expected a mismatch error naming {names:?}, got {other:?}"),
    }
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F64, Device::Cpu).unwrap()
}

#[test]
fn error_wrong_shapes() {
    let opts = TripletOptions::default();
    expect_shape_err(triplet(&zeros(&[6]), &[0; 6], &opts), "x");
    expect_shape_err(
        similarity(&zeros(&[3, 4]), &zeros(&[5, 3]), Similarity::Dot),
        "b",
    );
    expect_shape_err(
        similarity(&zeros(&[3, 4, 1]), &zeros(&[5, 4]), Similarity::Dot),
        "a",
    );
    let m = MarginOptions::default();
    expect_shape_err(
        margin_loss(&zeros(&[3, 4]), &zeros(&[3, 5]), &[0; 3], &m),
        "x2",
    );
    expect_shape_err(
        margin_loss(&zeros(&[3, 4]), &zeros(&[2, 4]), &[0; 3], &m),
        "x2",
    );
    expect_shape_err(
        nce(&zeros(&[3]), &zeros(&[4, 2]), &zeros(&[3]), &zeros(&[3, 2])),
        "s_neg",
    );
    expect_shape_err(
        nce(&zeros(&[3]), &zeros(&[3, 2]), &zeros(&[4]), &zeros(&[3, 2])),
        "logq_pos",
    );
    expect_shape_err(
        nce(&zeros(&[3]), &zeros(&[3, 2]), &zeros(&[3]), &zeros(&[3, 3])),
        "logq_neg",
    );
    expect_shape_err(
        nce(
            &zeros(&[3, 1]),
            &zeros(&[3, 2]),
            &zeros(&[3]),
            &zeros(&[3, 2]),
        ),
        "s_pos",
    );
    let mut k = zeros(&[2, 3]);
    expect_shape_err(momentum_update(&mut k, &zeros(&[3, 2]), 0.5), "theta_q");
}

#[test]
fn error_empty_batch() {
    let what = "empty batch";
    expect_empty_err(
        triplet(&zeros(&[0, 4]), &[], &TripletOptions::default()),
        "x",
        what,
    );
    expect_empty_err(
        similarity(&zeros(&[0, 4]), &zeros(&[2, 4]), Similarity::Cosine),
        "a",
        what,
    );
    expect_empty_err(
        similarity(&zeros(&[2, 4]), &zeros(&[0, 4]), Similarity::Cosine),
        "b",
        what,
    );
    expect_empty_err(
        margin_loss(
            &zeros(&[0, 4]),
            &zeros(&[0, 4]),
            &[],
            &MarginOptions::default(),
        ),
        "x1",
        what,
    );
    expect_empty_err(
        nce(&zeros(&[0]), &zeros(&[0, 2]), &zeros(&[0]), &zeros(&[0, 2])),
        "s_pos",
        what,
    );
}

#[test]
fn error_zero_feature_dimension() {
    let what = "D is 0";
    expect_empty_err(
        triplet(&zeros(&[4, 0]), &[0, 0, 1, 1], &TripletOptions::default()),
        "x",
        what,
    );
    expect_empty_err(
        similarity(&zeros(&[3, 0]), &zeros(&[2, 0]), Similarity::Dot),
        "a",
        what,
    );
    expect_empty_err(
        margin_loss(
            &zeros(&[2, 0]),
            &zeros(&[2, 0]),
            &[0, 1],
            &MarginOptions::default(),
        ),
        "x1",
        what,
    );
    // NCE with k = 0 noise samples.
    expect_empty_err(
        nce(&zeros(&[2]), &zeros(&[2, 0]), &zeros(&[2]), &zeros(&[2, 0])),
        "s_neg",
        what,
    );
}

#[test]
fn error_labels_wrong_length() {
    let x = zeros(&[4, 2]);
    expect_shape_err(
        triplet(&x, &[0, 0, 1], &TripletOptions::default()),
        "labels",
    );
    expect_shape_err(
        triplet_forward(&x, &[0, 0, 1, 1, 2], &TripletOptions::default()),
        "labels",
    );
    expect_shape_err(
        margin_loss(&x, &x, &[0, 1, 1], &MarginOptions::default()),
        "y",
    );
}

#[test]
fn error_margin_negative_or_not_finite() {
    let x = zeros(&[4, 2]);
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        let opts = TripletOptions {
            margin: bad,
            ..TripletOptions::default()
        };
        expect_invalid_err(triplet(&x, &[0, 0, 1, 1], &opts), "margin", ">= 0");
        expect_invalid_err(
            margin_loss(
                &x,
                &x,
                &[0, 1, 0, 1],
                &MarginOptions {
                    margin: bad,
                    ..Default::default()
                },
            ),
            "margin",
            ">= 0",
        );
    }
}

#[test]
fn error_non_finite_input_names_the_row() {
    let mut v = vec![0.5; 6 * 3];
    v[3 * 3 + 1] = f64::NAN;
    let bad = t64(v.clone(), &[6, 3]);
    let good = t64(vec![0.25; 18], &[6, 3]);
    expect_non_finite_err(
        triplet(&bad, &[0, 0, 1, 1, 2, 2], &TripletOptions::default()),
        "x",
        3,
    );
    expect_non_finite_err(similarity(&good, &bad, Similarity::Euclidean), "b", 3);
    expect_non_finite_err(
        margin_loss(&good, &bad, &[0; 6], &MarginOptions::default()),
        "x2",
        3,
    );
    let mut bad32 = v.clone();
    bad32[3 * 3 + 1] = 0.0;
    bad32[4 * 3] = f64::INFINITY;
    expect_non_finite_err(
        similarity(
            &t32(&bad32, &[6, 3]),
            &t32(&v[..3], &[1, 3]),
            Similarity::Dot,
        ),
        "a",
        4,
    );
    let mut lq = vec![0.0; 6];
    lq[5] = f64::NEG_INFINITY;
    expect_non_finite_err(
        nce(
            &zeros(&[3]),
            &zeros(&[3, 2]),
            &zeros(&[3]),
            &t64(lq, &[3, 2]),
        ),
        "logq_neg",
        2,
    );
    let mut k = good.clone();
    expect_non_finite_err(momentum_update(&mut k, &bad, 0.5), "theta_q", 3);
    assert_eq!(
        k.to_vec::<f64>().unwrap(),
        vec![0.25; 18],
        "theta_k changed on error"
    );
}

#[test]
fn error_margin_labels_not_binary() {
    let x = zeros(&[4, 2]);
    expect_invalid_err(
        margin_loss(&x, &x, &[0, 1, 2, 0], &MarginOptions::default()),
        "y",
        "y[2] = 2",
    );
    expect_invalid_err(
        margin_forward(&x, &x, &[-1, 1, 1, 0], &MarginOptions::default()),
        "y",
        "y[0] = -1",
    );
}

#[test]
fn error_momentum_outside_unit_interval() {
    let q = t64(vec![1.0, 2.0], &[2]);
    for bad in [-0.1, 1.5, f64::NAN] {
        let mut k = t64(vec![3.0, 4.0], &[2]);
        expect_invalid_err(momentum_update(&mut k, &q, bad), "m", "[0, 1]");
        assert_eq!(
            k.to_vec::<f64>().unwrap(),
            vec![3.0, 4.0],
            "theta_k changed on error"
        );
    }
}

#[test]
fn error_dtype_and_device_mismatch() {
    let a64 = zeros(&[3, 2]);
    let a32 = Tensor::zeros(&[3, 2], DType::F32, Device::Cpu).unwrap();
    expect_mismatch_err(similarity(&a32, &a64, Similarity::Dot), &["a", "b"]);
    expect_mismatch_err(
        margin_loss(&a64, &a32, &[0, 1, 0], &MarginOptions::default()),
        &["x1", "x2"],
    );
    let s32 = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
    expect_mismatch_err(nce(&zeros(&[3]), &a64, &s32, &a64), &["s_pos", "logq_pos"]);
    let mut k = a64.clone();
    expect_mismatch_err(momentum_update(&mut k, &a32, 0.5), &["theta_k", "theta_q"]);
    let interp = a64.to_device(Device::Interp).unwrap();
    expect_mismatch_err(similarity(&a64, &interp, Similarity::Dot), &["a", "b"]);
}

#[test]
fn error_triplet_backward_with_foreign_state() {
    let mut rng = StdRng::seed_from_u64(12);
    let x = t64(uniform(&mut rng, 8 * 3), &[8, 3]);
    let labels = [0, 0, 1, 1, 2, 2, 3, 3];
    let opts = TripletOptions::default();
    let fwd = triplet_forward(&x, &labels, &opts).unwrap();
    let other = TripletOptions {
        mining: Mining::SemiHard,
        ..opts
    };
    expect_invalid_err(
        triplet_backward(&x, &labels, &other, &fwd.saved, 1.0),
        "saved",
        "options",
    );
    let x6 = t64(uniform(&mut rng, 6 * 3), &[6, 3]);
    expect_invalid_err(
        triplet_backward(&x6, &labels[..6], &opts, &fwd.saved, 1.0),
        "saved",
        "rows",
    );
    expect_invalid_err(
        triplet_backward(&x, &labels, &opts, &fwd.saved, f64::NAN),
        "grad_loss",
        "not finite",
    );
    let margin = margin_forward(&x, &x, &[0; 8], &MarginOptions::default()).unwrap();
    expect_invalid_err(
        margin_backward(
            &x,
            &x,
            &[0; 8],
            &MarginOptions::default(),
            &margin.saved,
            f64::INFINITY,
        ),
        "grad_loss",
        "not finite",
    );
    expect_invalid_err(
        margin_backward(
            &x,
            &x,
            &[0; 8],
            &MarginOptions {
                margin: 2.0,
                ..Default::default()
            },
            &margin.saved,
            1.0,
        ),
        "saved",
        "options",
    );
}
