//! Tests of the temperature-softmax losses (InfoNCE, NT-Xent, CLIP, MoCo, SupCon) and normalize
//! through the public API only: finite-difference gradients, identities between the losses,
//! permutation behaviour, the MoCo queue, f32 against f64, and one test per input error.

use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::{numeric_grad, rel_err, t32, t64, v64};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1).
fn uniform(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| 2.0 * rng.random::<f64>() - 1.0).collect()
}

#[track_caller]
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let err = rel_err(got, want);
    assert!(
        err < tol,
        "{what}: relative error {err:e} >= {tol:e}\n got  {got:?}\n want {want:?}"
    );
}

#[track_caller]
fn assert_scalar_close(got: f64, want: f64, tol: f64, what: &str) {
    assert_close(&[got], &[want], tol, what);
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit(row: &[f64]) -> Vec<f64> {
    let n = dot(row, row).sqrt().max(1e-12);
    row.iter().map(|x| x / n).collect()
}

fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Rows `perm[0], perm[1], ...` of a rows x dim matrix.
fn permute_rows(x: &[f64], dim: usize, perm: &[usize]) -> Vec<f64> {
    perm.iter()
        .flat_map(|&p| x[p * dim..(p + 1) * dim].to_vec())
        .collect()
}

/// A random permutation of 0..n (Fisher-Yates), never the identity for n > 1.
fn permutation(rng: &mut StdRng, n: usize) -> Vec<usize> {
    loop {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, rng.random_range(0..=i));
        }
        if n < 2 || p.iter().enumerate().any(|(i, &v)| i != v) {
            return p;
        }
    }
}

const FD_TOL: f64 = 1e-6;

// ---------------------------------------------------------------------------------------------
// 1. Finite-difference gradient checks (f64)
// ---------------------------------------------------------------------------------------------

fn check_infonce_grad(normalize: bool, self_mask: bool, seed: u64) {
    let mut r = rng(seed);
    let (n, d) = (5, 3);
    let m = if self_mask { n } else { 7 };
    let q = uniform(&mut r, n * d);
    let k = uniform(&mut r, m * d);
    let positives: Vec<usize> = (0..n)
        .map(|i| loop {
            let p = r.random_range(0..m);
            if !(self_mask && p == i) {
                break p;
            }
        })
        .collect();
    let opts = InfoNceOptions {
        temperature: 0.3,
        normalize,
        self_mask,
    };
    let out = infonce(&t64(&q, &[n, d]), &t64(&k, &[m, d]), &positives, &opts).unwrap();
    let what = format!("infonce normalize={normalize} self_mask={self_mask}");

    let loss_at = |q: &[f64], k: &[f64]| {
        infonce(&t64(q, &[n, d]), &t64(k, &[m, d]), &positives, &opts)
            .unwrap()
            .loss
            .to_scalar()
            .unwrap()
    };
    let num_q = numeric_grad(|x| loss_at(x, &k), &q);
    let num_k = numeric_grad(|x| loss_at(&q, x), &k);
    assert_close(
        &v64(&out.grad_q),
        &num_q,
        FD_TOL,
        &format!("{what}: grad_q"),
    );
    assert_close(
        &v64(&out.grad_k),
        &num_k,
        FD_TOL,
        &format!("{what}: grad_k"),
    );
}

#[test]
fn grad_infonce_raw() {
    check_infonce_grad(false, false, 1);
}

#[test]
fn grad_infonce_normalized() {
    check_infonce_grad(true, false, 2);
}

#[test]
fn grad_infonce_raw_self_mask() {
    check_infonce_grad(false, true, 3);
}

#[test]
fn grad_infonce_normalized_self_mask() {
    check_infonce_grad(true, true, 4);
}

#[test]
fn grad_ntxent() {
    let mut r = rng(5);
    let (rows, d) = (6, 5);
    let z = uniform(&mut r, rows * d);
    let opts = NtXentOptions { temperature: 0.4 };
    let out = ntxent(&t64(&z, &[rows, d]), &opts).unwrap();
    let num = numeric_grad(
        |x| {
            ntxent(&t64(x, &[rows, d]), &opts)
                .unwrap()
                .loss
                .to_scalar()
                .unwrap()
        },
        &z,
    );
    assert_close(&v64(&out.grad_z), &num, FD_TOL, "ntxent grad_z");
}

#[test]
fn grad_clip() {
    let mut r = rng(6);
    let (n, d) = (5, 3);
    let a = uniform(&mut r, n * d);
    let b = uniform(&mut r, n * d);
    let ls = 1.3;
    let out = clip(&t64(&a, &[n, d]), &t64(&b, &[n, d]), ls).unwrap();
    let loss_at = |a: &[f64], b: &[f64], ls: f64| {
        clip(&t64(a, &[n, d]), &t64(b, &[n, d]), ls)
            .unwrap()
            .loss
            .to_scalar()
            .unwrap()
    };
    let num_a = numeric_grad(|x| loss_at(x, &b, ls), &a);
    let num_b = numeric_grad(|x| loss_at(&a, x, ls), &b);
    let num_ls = numeric_grad(|x| loss_at(&a, &b, x[0]), &[ls]);
    assert_close(&v64(&out.grad_a), &num_a, FD_TOL, "clip grad_a");
    assert_close(&v64(&out.grad_b), &num_b, FD_TOL, "clip grad_b");
    assert_scalar_close(
        out.grad_log_scale.to_scalar().unwrap(),
        num_ls[0],
        FD_TOL,
        "clip grad_log_scale",
    );
    assert!(
        out.grad_log_scale.to_scalar().unwrap().abs() > 1e-3,
        "degenerate check: d loss / d log_scale is ~0"
    );
}

#[test]
fn grad_moco() {
    let mut r = rng(7);
    let (n, kq, d) = (4, 7, 3);
    let q = uniform(&mut r, n * d);
    let k = uniform(&mut r, n * d);
    // A queue that is not normalized, to check it is used as given.
    let queue: Vec<f64> = uniform(&mut r, kq * d).iter().map(|x| 1.7 * x).collect();
    let opts = MocoOptions { temperature: 0.3 };
    let (kt, queue_t) = (t64(&k, &[n, d]), t64(&queue, &[kq, d]));
    let out = moco(&t64(&q, &[n, d]), &kt, &queue_t, &opts).unwrap();
    let num = numeric_grad(
        |x| {
            moco(&t64(x, &[n, d]), &kt, &queue_t, &opts)
                .unwrap()
                .loss
                .to_scalar()
                .unwrap()
        },
        &q,
    );
    assert_close(&v64(&out.grad_q), &num, FD_TOL, "moco grad_q");
}

fn check_supcon_grad(n: usize, v: usize, d: usize, labels: &[i64], opts: SupConOptions, seed: u64) {
    let mut r = rng(seed);
    let f = uniform(&mut r, n * v * d);
    let out = supcon(&t64(&f, &[n, v, d]), labels, &opts).unwrap();
    assert!(
        out.loss.to_scalar().unwrap() > 0.0,
        "supcon loss {}",
        out.loss.to_scalar().unwrap()
    );
    let num = numeric_grad(
        |x| {
            supcon(&t64(x, &[n, v, d]), labels, &opts)
                .unwrap()
                .loss
                .to_scalar()
                .unwrap()
        },
        &f,
    );
    assert_close(
        &v64(&out.grad_features),
        &num,
        FD_TOL,
        &format!("supcon V={v} grad_features"),
    );
}

#[test]
fn grad_supcon_three_views_singleton_class() {
    // Label 2 is seen once: that sample's positives are only its own other views.
    let opts = SupConOptions {
        temperature: 0.5,
        base_temperature: 0.7,
        ..Default::default()
    };
    check_supcon_grad(5, 3, 4, &[0, 1, 0, 2, 1], opts, 8);
}

#[test]
fn grad_supcon_one_view_anchor_without_positive() {
    // V = 1 and label 2 seen once: anchor 3 has no positive (adds 0, still counts in the mean).
    let opts = SupConOptions {
        temperature: 0.4,
        base_temperature: 0.4,
        ..Default::default()
    };
    check_supcon_grad(5, 1, 3, &[0, 1, 0, 2, 1], opts, 9);
}

#[test]
fn grad_normalize() {
    let mut r = rng(10);
    let (n, d) = (4, 5);
    let x = uniform(&mut r, n * d);
    let gy = uniform(&mut r, n * d);
    let got = normalize_backward(&t64(&x, &[n, d]), &t64(&gy, &[n, d])).unwrap();
    let num = numeric_grad(
        |x| dot(&v64(&normalize(&t64(x, &[n, d])).unwrap()), &gy),
        &x,
    );
    assert_close(&v64(&got), &num, FD_TOL, "normalize grad_x");
}

// ---------------------------------------------------------------------------------------------
// 2. Identities between the losses
// ---------------------------------------------------------------------------------------------

#[test]
fn infonce_with_one_negative_is_softplus() {
    let mut r = rng(11);
    let (n, d, tau) = (6, 4, 0.35);
    let q = uniform(&mut r, n * d);
    let k = uniform(&mut r, 2 * d);
    let positives: Vec<usize> = (0..n).map(|_| r.random_range(0..2)).collect();
    let opts = InfoNceOptions {
        temperature: tau,
        normalize: false,
        self_mask: false,
    };
    let out = infonce(&t64(&q, &[n, d]), &t64(&k, &[2, d]), &positives, &opts).unwrap();
    let want: f64 = (0..n)
        .map(|i| {
            let qi = &q[i * d..(i + 1) * d];
            let s = |j: usize| dot(qi, &k[j * d..(j + 1) * d]);
            let (p, neg) = (positives[i], 1 - positives[i]);
            softplus((s(neg) - s(p)) / tau)
        })
        .sum::<f64>()
        / n as f64;
    assert_scalar_close(
        out.loss.to_scalar().unwrap(),
        want,
        1e-12,
        "infonce vs softplus",
    );
}

#[test]
fn supcon_two_views_distinct_labels_is_ntxent() {
    let mut r = rng(12);
    let (n, d, tau) = (5, 4, 0.3);
    let f = uniform(&mut r, n * 2 * d);
    let labels: Vec<i64> = vec![40, -3, 7, 12, 0];
    let sc = supcon(
        &t64(&f, &[n, 2, d]),
        &labels,
        &SupConOptions {
            temperature: tau,
            base_temperature: tau,
            ..Default::default()
        },
    )
    .unwrap();
    // supcon row (s, v) is features[s][v]; ntxent row v * n + s.
    let z: Vec<f64> = (0..2)
        .flat_map(|v| (0..n).flat_map(move |s| (0..d).map(move |c| (s, v, c))))
        .map(|(s, v, c)| f[(s * 2 + v) * d + c])
        .collect();
    let nt = ntxent(&t64(&z, &[2 * n, d]), &NtXentOptions { temperature: tau }).unwrap();
    assert_scalar_close(
        sc.loss.to_scalar().unwrap(),
        nt.loss.to_scalar().unwrap(),
        1e-12,
        "supcon vs ntxent loss",
    );
    let gz = v64(&nt.grad_z);
    let mapped: Vec<f64> = (0..n)
        .flat_map(|s| (0..2).flat_map(move |v| (0..d).map(move |c| (s, v, c))))
        .map(|(s, v, c)| gz[(v * n + s) * d + c])
        .collect();
    assert_close(
        &v64(&sc.grad_features),
        &mapped,
        1e-12,
        "supcon vs ntxent grad",
    );
}

#[test]
fn moco_equals_infonce_per_row() {
    let mut r = rng(13);
    let (n, kq, d, tau) = (4, 6, 5, 0.2);
    let q = uniform(&mut r, n * d);
    let k = uniform(&mut r, n * d);
    let queue: Vec<f64> = uniform(&mut r, kq * d).iter().map(|x| 0.6 * x).collect();
    let qt = t64(&q, &[n, d]);
    let out = moco(
        &qt,
        &t64(&k, &[n, d]),
        &t64(&queue, &[kq, d]),
        &MocoOptions { temperature: tau },
    )
    .unwrap();

    // Row i: InfoNCE of q'_i against [k'_i ; queue] with positive 0, no normalization inside.
    let opts = InfoNceOptions {
        temperature: tau,
        normalize: false,
        self_mask: false,
    };
    let mut loss = 0.0;
    let mut grad_qn = Vec::new();
    let mut naive = 0.0;
    for i in 0..n {
        let qn = unit(&q[i * d..(i + 1) * d]);
        let kn = unit(&k[i * d..(i + 1) * d]);
        let keys: Vec<f64> = kn.iter().chain(&queue).copied().collect();
        let row = infonce(&t64(&qn, &[1, d]), &t64(&keys, &[kq + 1, d]), &[0], &opts).unwrap();
        loss += row.loss.to_scalar().unwrap() / n as f64;
        grad_qn.extend(v64(&row.grad_q).iter().map(|g| g / n as f64));
        // And directly: LSE([l_pos, l_neg]) - l_pos.
        let logits: Vec<f64> = keys.chunks(d).map(|kj| dot(&qn, kj) / tau).collect();
        naive += (log_sum_exp(&logits) - logits[0]) / n as f64;
    }
    assert_scalar_close(
        out.loss.to_scalar().unwrap(),
        loss,
        1e-12,
        "moco vs per-row infonce",
    );
    assert_scalar_close(out.loss.to_scalar().unwrap(), naive, 1e-12, "moco vs naive");
    let grad_q = normalize_backward(&qt, &t64(&grad_qn, &[n, d])).unwrap();
    assert_close(
        &v64(&out.grad_q),
        &v64(&grad_q),
        1e-12,
        "moco grad_q vs infonce",
    );
}

#[test]
fn clip_is_mean_of_two_infonce() {
    check_clip_against_two_infonce(6, 4, 14);
}

/// CLIP's one sweep gathers the row and the column log-sum-exps from the same logit tiles: across
/// several row tiles and key tiles (N beyond the CPU's 1024-key tile) it must still equal the
/// two InfoNCE passes, each computed on its own, and its log-scale gradient the loss's slope.
#[test]
fn clip_across_tiles_is_mean_of_two_infonce() {
    check_clip_against_two_infonce(1100, 5, 15);
}

fn check_clip_against_two_infonce(n: usize, d: usize, seed: u64) {
    let mut r = rng(seed);
    let ls = 2.1f64;
    let (a, b) = (
        t64(&uniform(&mut r, n * d), &[n, d]),
        t64(&uniform(&mut r, n * d), &[n, d]),
    );
    let out = clip(&a, &b, ls).unwrap();
    let diag: Vec<usize> = (0..n).collect();
    let opts = InfoNceOptions {
        temperature: (-ls).exp(),
        normalize: true,
        self_mask: false,
    };
    let ab = infonce(&a, &b, &diag, &opts).unwrap();
    let ba = infonce(&b, &a, &diag, &opts).unwrap();
    assert_scalar_close(
        out.loss.to_scalar().unwrap(),
        (ab.loss.to_scalar().unwrap() + ba.loss.to_scalar().unwrap()) / 2.0,
        1e-12,
        "clip loss",
    );
    let half_sum = |x: &Tensor, y: &Tensor| {
        v64(x)
            .iter()
            .zip(v64(y))
            .map(|(p, q)| (p + q) / 2.0)
            .collect::<Vec<_>>()
    };
    assert_close(
        &v64(&out.grad_a),
        &half_sum(&ab.grad_q, &ba.grad_k),
        1e-12,
        "clip grad_a",
    );
    assert_close(
        &v64(&out.grad_b),
        &half_sum(&ab.grad_k, &ba.grad_q),
        1e-12,
        "clip grad_b",
    );
    let h = 1e-5;
    let loss_at = |s: f64| clip_forward(&a, &b, s).unwrap().loss.to_scalar().unwrap();
    let slope = (loss_at(ls + h) - loss_at(ls - h)) / (2.0 * h);
    assert_scalar_close(
        out.grad_log_scale.to_scalar().unwrap(),
        slope,
        1e-7,
        "clip d log_scale",
    );
    // f32 through the same sweeps, against the f64 results.
    let (a32, b32) = (t32(&v64(&a), &[n, d]), t32(&v64(&b), &[n, d]));
    let out32 = clip(&a32, &b32, ls).unwrap();
    assert_scalar_close(
        out32.loss.to_scalar().unwrap(),
        out.loss.to_scalar().unwrap(),
        1e-5,
        "f32 loss",
    );
    assert_close(&v64(&out32.grad_a), &v64(&out.grad_a), 1e-5, "f32 grad_a");
    assert_close(&v64(&out32.grad_b), &v64(&out.grad_b), 1e-5, "f32 grad_b");
    assert_scalar_close(
        out32.grad_log_scale.to_scalar().unwrap(),
        out.grad_log_scale.to_scalar().unwrap(),
        1e-5,
        "f32 d log_scale",
    );
}

#[test]
fn supcon_without_any_positive_is_zero() {
    let mut r = rng(15);
    let (n, d) = (4, 3);
    let f = t64(&uniform(&mut r, n * d), &[n, 1, d]);
    let out = supcon(&f, &[1, 2, 3, 4], &SupConOptions::default()).unwrap();
    assert_eq!(out.loss.to_scalar().unwrap(), 0.0);
    assert!(v64(&out.grad_features).iter().all(|&g| g == 0.0));
    // A single anchor has nothing to contrast with: still no error and a zero loss.
    let one = supcon(
        &t64(&[0.3, -0.2], &[1, 1, 2]),
        &[5],
        &SupConOptions::default(),
    )
    .unwrap();
    assert_eq!(one.loss.to_scalar().unwrap(), 0.0);
    assert_eq!(v64(&one.grad_features), vec![0.0, 0.0]);
}

// ---------------------------------------------------------------------------------------------
// 3. Permutations
// ---------------------------------------------------------------------------------------------

#[test]
fn infonce_permuting_queries_permutes_grad_q() {
    let mut r = rng(16);
    let (n, m, d) = (7, 9, 4);
    let q = uniform(&mut r, n * d);
    let kt = t64(&uniform(&mut r, m * d), &[m, d]);
    let positives: Vec<usize> = (0..n).map(|_| r.random_range(0..m)).collect();
    let opts = InfoNceOptions {
        temperature: 0.25,
        normalize: true,
        self_mask: false,
    };
    let base = infonce(&t64(&q, &[n, d]), &kt, &positives, &opts).unwrap();

    let perm = permutation(&mut r, n);
    let pq = permute_rows(&q, d, &perm);
    let pp: Vec<usize> = perm.iter().map(|&i| positives[i]).collect();
    let out = infonce(&t64(&pq, &[n, d]), &kt, &pp, &opts).unwrap();
    assert_scalar_close(
        out.loss.to_scalar().unwrap(),
        base.loss.to_scalar().unwrap(),
        1e-12,
        "loss under query permutation",
    );
    assert_close(
        &v64(&out.grad_q),
        &permute_rows(&v64(&base.grad_q), d, &perm),
        1e-12,
        "grad_q permuted",
    );
    assert_close(
        &v64(&out.grad_k),
        &v64(&base.grad_k),
        1e-12,
        "grad_k unchanged",
    );
    // The permuted gradient really differs from the unpermuted one.
    assert!(rel_err(&v64(&out.grad_q), &v64(&base.grad_q)) > 1e-3);
}

#[test]
fn infonce_permuting_keys_permutes_grad_k() {
    let mut r = rng(17);
    let (n, m, d) = (6, 8, 3);
    let qt = t64(&uniform(&mut r, n * d), &[n, d]);
    let k = uniform(&mut r, m * d);
    let positives: Vec<usize> = (0..n).map(|_| r.random_range(0..m)).collect();
    let opts = InfoNceOptions {
        temperature: 0.5,
        normalize: false,
        self_mask: false,
    };
    let base = infonce(&qt, &t64(&k, &[m, d]), &positives, &opts).unwrap();

    // New key j is old key perm[j]; old key p is now at inverse[p].
    let perm = permutation(&mut r, m);
    let mut inverse = vec![0; m];
    for (j, &p) in perm.iter().enumerate() {
        inverse[p] = j;
    }
    let pk = permute_rows(&k, d, &perm);
    let pp: Vec<usize> = positives.iter().map(|&p| inverse[p]).collect();
    let out = infonce(&qt, &t64(&pk, &[m, d]), &pp, &opts).unwrap();
    assert_scalar_close(
        out.loss.to_scalar().unwrap(),
        base.loss.to_scalar().unwrap(),
        1e-12,
        "loss under key permutation",
    );
    assert_close(
        &v64(&out.grad_k),
        &permute_rows(&v64(&base.grad_k), d, &perm),
        1e-12,
        "grad_k permuted",
    );
    assert_close(
        &v64(&out.grad_q),
        &v64(&base.grad_q),
        1e-12,
        "grad_q unchanged",
    );
}

#[test]
fn supcon_invariant_under_sample_permutation() {
    let mut r = rng(18);
    let (n, v, d) = (7, 2, 5);
    let f = uniform(&mut r, n * v * d);
    let labels: Vec<i64> = vec![3, 1, 3, 9, 1, 3, 4];
    let opts = SupConOptions {
        temperature: 0.2,
        base_temperature: 0.07,
        ..Default::default()
    };
    let base = supcon(&t64(&f, &[n, v, d]), &labels, &opts).unwrap();
    let perm = permutation(&mut r, n);
    let pf = permute_rows(&f, v * d, &perm);
    let pl: Vec<i64> = perm.iter().map(|&i| labels[i]).collect();
    let out = supcon(&t64(&pf, &[n, v, d]), &pl, &opts).unwrap();
    assert_scalar_close(
        out.loss.to_scalar().unwrap(),
        base.loss.to_scalar().unwrap(),
        1e-12,
        "supcon loss under permutation",
    );
    let want = permute_rows(&v64(&base.grad_features), v * d, &perm);
    assert_close(
        &v64(&out.grad_features),
        &want,
        1e-12,
        "supcon grad permuted",
    );
    // Permuting the samples but not their labels changes the loss.
    assert_ne!(pl, labels, "pick a seed whose permutation moves the labels");
    let shuffled = supcon(&t64(&pf, &[n, v, d]), &labels, &opts).unwrap();
    assert!(
        (shuffled.loss.to_scalar().unwrap() - base.loss.to_scalar().unwrap()).abs() > 1e-6,
        "labels must travel with their samples"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. MoCo queue
// ---------------------------------------------------------------------------------------------

#[test]
fn moco_enqueue_wraps_around() {
    let mut r = rng(19);
    let (kq, n, d) = (5, 3, 4);
    let before = uniform(&mut r, kq * d);
    let k = uniform(&mut r, n * d);
    let mut queue = t64(&before, &[kq, d]);
    let ptr = moco_enqueue(&mut queue, &t64(&k, &[n, d]), 4).unwrap();
    assert_eq!(ptr, 2);
    let after = v64(&queue);
    let row = |x: &[f64], i: usize| x[i * d..(i + 1) * d].to_vec();
    for (key, slot) in [(0, 4), (1, 0), (2, 1)] {
        assert_close(
            &row(&after, slot),
            &unit(&row(&k, key)),
            1e-15,
            &format!("queue row {slot}"),
        );
    }
    for slot in [2, 3] {
        assert_eq!(
            row(&after, slot),
            row(&before, slot),
            "queue row {slot} must be untouched"
        );
    }
}

#[test]
fn moco_enqueue_more_keys_than_queue() {
    let mut r = rng(20);
    let (kq, n, d) = (3, 7, 2);
    let k = uniform(&mut r, n * d);
    let mut queue = t64(&vec![9.0; kq * d], &[kq, d]);
    let ptr = moco_enqueue(&mut queue, &t64(&k, &[n, d]), 1).unwrap();
    assert_eq!(ptr, (1 + n) % kq);
    let after = v64(&queue);
    // Key i goes to slot (1 + i) mod 3; the last writer of each slot wins: keys 4, 5, 6.
    for (key, slot) in [(4, 2), (5, 0), (6, 1)] {
        assert_close(
            &after[slot * d..(slot + 1) * d],
            &unit(&k[key * d..(key + 1) * d]),
            1e-15,
            "last key wins",
        );
    }
}

#[test]
fn moco_enqueue_writes_unit_rows_in_queue_dtype() {
    let mut r = rng(21);
    let (kq, n, d) = (4, 4, 6);
    let k: Vec<f64> = uniform(&mut r, n * d).iter().map(|x| 10.0 * x).collect();
    let mut queue = t32(&vec![0.0; kq * d], &[kq, d]);
    let ptr = moco_enqueue(&mut queue, &t32(&k, &[n, d]), 0).unwrap();
    assert_eq!(ptr, 0);
    assert_eq!(queue.dtype(), DType::F32);
    for row in v64(&queue).chunks(d) {
        let norm = dot(row, row).sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "row norm {norm}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. f32 against f64 at shapes that are not multiples of the tiles
// ---------------------------------------------------------------------------------------------

const F32_TOL: f64 = 1e-4;

#[test]
fn f32_matches_f64_infonce() {
    let mut r = rng(22);
    let (n, m, d) = (300, 301, 33);
    let q = uniform(&mut r, n * d);
    let k = uniform(&mut r, m * d);
    let positives: Vec<usize> = (0..n).map(|_| r.random_range(0..m)).collect();
    for normalize in [true, false] {
        let opts = InfoNceOptions {
            temperature: 0.1,
            normalize,
            self_mask: false,
        };
        let hi = infonce(&t64(&q, &[n, d]), &t64(&k, &[m, d]), &positives, &opts).unwrap();
        let lo = infonce(&t32(&q, &[n, d]), &t32(&k, &[m, d]), &positives, &opts).unwrap();
        assert_eq!(lo.grad_q.dtype(), DType::F32);
        assert_scalar_close(
            lo.loss.to_scalar().unwrap(),
            hi.loss.to_scalar().unwrap(),
            F32_TOL,
            "infonce f32 loss",
        );
        assert_close(
            &v64(&lo.grad_q),
            &v64(&hi.grad_q),
            F32_TOL,
            "infonce f32 grad_q",
        );
        assert_close(
            &v64(&lo.grad_k),
            &v64(&hi.grad_k),
            F32_TOL,
            "infonce f32 grad_k",
        );
    }
}

#[test]
fn f32_matches_f64_ntxent() {
    let mut r = rng(23);
    let (rows, d) = (302, 33);
    let z = uniform(&mut r, rows * d);
    let opts = NtXentOptions { temperature: 0.1 };
    let hi = ntxent(&t64(&z, &[rows, d]), &opts).unwrap();
    let lo = ntxent(&t32(&z, &[rows, d]), &opts).unwrap();
    assert_scalar_close(
        lo.loss.to_scalar().unwrap(),
        hi.loss.to_scalar().unwrap(),
        F32_TOL,
        "ntxent f32 loss",
    );
    assert_close(
        &v64(&lo.grad_z),
        &v64(&hi.grad_z),
        F32_TOL,
        "ntxent f32 grad_z",
    );
}

#[test]
fn f32_matches_f64_clip_moco_supcon() {
    let mut r = rng(24);
    let (n, d) = (131, 33);
    let a = uniform(&mut r, n * d);
    let b = uniform(&mut r, n * d);
    let ls = (1.0f64 / 0.07).ln();
    let hi = clip(&t64(&a, &[n, d]), &t64(&b, &[n, d]), ls).unwrap();
    let lo = clip(&t32(&a, &[n, d]), &t32(&b, &[n, d]), ls).unwrap();
    assert_scalar_close(
        lo.loss.to_scalar().unwrap(),
        hi.loss.to_scalar().unwrap(),
        F32_TOL,
        "clip f32 loss",
    );
    assert_close(
        &v64(&lo.grad_a),
        &v64(&hi.grad_a),
        F32_TOL,
        "clip f32 grad_a",
    );
    assert_close(
        &v64(&lo.grad_b),
        &v64(&hi.grad_b),
        F32_TOL,
        "clip f32 grad_b",
    );
    assert_scalar_close(
        lo.grad_log_scale.to_scalar().unwrap(),
        hi.grad_log_scale.to_scalar().unwrap(),
        F32_TOL,
        "clip f32 grad_log_scale",
    );

    let kq = 300;
    let queue: Vec<f64> = (0..kq).flat_map(|_| unit(&uniform(&mut r, d))).collect();
    let opts = MocoOptions { temperature: 0.07 };
    let hi = moco(
        &t64(&a, &[n, d]),
        &t64(&b, &[n, d]),
        &t64(&queue, &[kq, d]),
        &opts,
    )
    .unwrap();
    let lo = moco(
        &t32(&a, &[n, d]),
        &t32(&b, &[n, d]),
        &t32(&queue, &[kq, d]),
        &opts,
    )
    .unwrap();
    assert_scalar_close(
        lo.loss.to_scalar().unwrap(),
        hi.loss.to_scalar().unwrap(),
        F32_TOL,
        "moco f32 loss",
    );
    assert_close(
        &v64(&lo.grad_q),
        &v64(&hi.grad_q),
        F32_TOL,
        "moco f32 grad_q",
    );

    let (samples, views) = (101, 3);
    let f = uniform(&mut r, samples * views * d);
    let labels: Vec<i64> = (0..samples).map(|_| r.random_range(0..20)).collect();
    let opts = SupConOptions {
        temperature: 0.1,
        base_temperature: 0.07,
        ..Default::default()
    };
    let hi = supcon(&t64(&f, &[samples, views, d]), &labels, &opts).unwrap();
    let lo = supcon(&t32(&f, &[samples, views, d]), &labels, &opts).unwrap();
    assert_scalar_close(
        lo.loss.to_scalar().unwrap(),
        hi.loss.to_scalar().unwrap(),
        F32_TOL,
        "supcon f32 loss",
    );
    assert_close(
        &v64(&lo.grad_features),
        &v64(&hi.grad_features),
        F32_TOL,
        "supcon f32 grad",
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Input errors: the variant and a message that names the argument
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn expect_err<T: std::fmt::Debug>(result: Result<T>, arg: &str, needles: &[&str]) -> Error {
    let err = result.expect_err("expected an error");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("`{arg}`")),
        "message does not name `{arg}`: {msg}"
    );
    for needle in needles {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }
    err
}

fn ones(rows: usize, cols: usize) -> Tensor {
    t64(&vec![1.0; rows * cols], &[rows, cols])
}

fn ramp(rows: usize, cols: usize) -> Tensor {
    t64(
        &(0..rows * cols)
            .map(|i| (i as f64 * 0.37).sin())
            .collect::<Vec<_>>(),
        &[rows, cols],
    )
}

#[test]
fn error_infonce_key_width() {
    let err = expect_err(
        infonce(
            &ones(4, 3),
            &ones(5, 4),
            &[0, 1, 2, 3],
            &InfoNceOptions::default(),
        ),
        "k",
        &["[5, 4]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "infonce",
                arg: "k",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_clip_shape_mismatch() {
    let err = expect_err(
        clip(&ones(3, 2), &ones(4, 2), 1.0),
        "b",
        &["[4, 2]", "[3, 2]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "clip",
                arg: "b",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_supcon_features_rank() {
    let err = expect_err(
        supcon(&ones(4, 3), &[0, 1, 0, 1], &SupConOptions::default()),
        "features",
        &["rank 3"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "supcon",
                arg: "features",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_empty_batch() {
    let err = expect_err(
        infonce(&ones(0, 3), &ones(2, 3), &[], &InfoNceOptions::default()),
        "q",
        &["0 rows"],
    );
    assert!(matches!(err, Error::Empty { arg: "q", .. }), "{err:?}");
    let empty = t64(&[], &[0, 2, 3]);
    let err = expect_err(
        supcon(&empty, &[], &SupConOptions::default()),
        "features",
        &["0 samples"],
    );
    assert!(
        matches!(
            err,
            Error::Empty {
                arg: "features",
                ..
            }
        ),
        "{err:?}"
    );
    let err = expect_err(
        moco(
            &ones(2, 3),
            &ones(2, 3),
            &ones(0, 3),
            &MocoOptions::default(),
        ),
        "queue",
        &["0 rows"],
    );
    assert!(matches!(err, Error::Empty { arg: "queue", .. }), "{err:?}");
}

#[test]
fn error_zero_feature_dim() {
    let err = expect_err(clip(&ones(3, 0), &ones(3, 0), 1.0), "a", &["D is 0"]);
    assert!(
        matches!(
            err,
            Error::Empty {
                op: "clip",
                arg: "a",
                ..
            }
        ),
        "{err:?}"
    );
    let err = expect_err(
        supcon(&t64(&[], &[3, 2, 0]), &[0, 1, 2], &SupConOptions::default()),
        "features",
        &["D is 0"],
    );
    assert!(
        matches!(
            err,
            Error::Empty {
                arg: "features",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_temperature() {
    for tau in [0.0, -0.5, f64::NAN, f64::INFINITY] {
        let opts = InfoNceOptions {
            temperature: tau,
            ..Default::default()
        };
        let err = expect_err(
            infonce(&ramp(2, 3), &ramp(2, 3), &[0, 1], &opts),
            "temperature",
            &["> 0"],
        );
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    arg: "temperature",
                    ..
                }
            ),
            "{err:?}"
        );

        let err = expect_err(
            moco(
                &ramp(2, 3),
                &ramp(2, 3),
                &ramp(4, 3),
                &MocoOptions { temperature: tau },
            ),
            "temperature",
            &["moco"],
        );
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    arg: "temperature",
                    ..
                }
            ),
            "{err:?}"
        );

        let features = t64(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], &[2, 2, 2]);
        let opts = SupConOptions {
            temperature: tau,
            base_temperature: 0.07,
            ..Default::default()
        };
        let err = expect_err(
            supcon(&features, &[0, 1], &opts),
            "temperature",
            &["supcon"],
        );
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    arg: "temperature",
                    ..
                }
            ),
            "{err:?}"
        );
        let opts = SupConOptions {
            temperature: 0.07,
            base_temperature: tau,
            ..Default::default()
        };
        let err = expect_err(
            supcon(&features, &[0, 1], &opts),
            "base_temperature",
            &["supcon"],
        );
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    arg: "base_temperature",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    let err = expect_err(
        ntxent(&ramp(4, 3), &NtXentOptions { temperature: 0.0 }),
        "temperature",
        &[],
    );
    assert!(
        matches!(err, Error::InvalidArgument { op: "ntxent", .. }),
        "{err:?}"
    );
}

#[test]
fn error_clip_log_scale() {
    for ls in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e3] {
        let err = expect_err(clip(&ramp(3, 2), &ramp(3, 2), ls), "log_scale", &["clip"]);
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    arg: "log_scale",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    // exp(100) fits f64 but not f32.
    assert!(clip(&ramp(3, 2), &ramp(3, 2), 100.0).is_ok());
    let f32_in = ramp(3, 2).to_dtype(DType::F32).unwrap();
    let err = expect_err(clip(&f32_in, &f32_in, 100.0), "log_scale", &["f32"]);
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                arg: "log_scale",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_positive_out_of_range() {
    let err = expect_err(
        infonce(
            &ramp(3, 2),
            &ramp(4, 2),
            &[0, 3, 9],
            &InfoNceOptions::default(),
        ),
        "positives",
        &["positives[2] = 9"],
    );
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                arg: "positives",
                ..
            }
        ),
        "{err:?}"
    );
    let err = expect_err(
        infonce(
            &ramp(3, 2),
            &ramp(4, 2),
            &[0, 1],
            &InfoNceOptions::default(),
        ),
        "positives",
        &["[2]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "positives",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_positive_is_self_under_mask() {
    let opts = InfoNceOptions {
        self_mask: true,
        ..Default::default()
    };
    let err = expect_err(
        infonce(&ramp(3, 2), &ramp(3, 2), &[1, 1, 0], &opts),
        "positives",
        &["positives[1] = 1"],
    );
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                arg: "positives",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_labels_length() {
    let features = t64(&[0.1; 12], &[3, 2, 2]);
    let err = expect_err(
        supcon(&features, &[0, 1], &SupConOptions::default()),
        "labels",
        &["[2]", "[3]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "supcon",
                arg: "labels",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_non_finite_input_names_row() {
    let mut q = v64(&ramp(5, 3));
    q[3 * 3 + 1] = f64::NAN;
    let err = expect_err(
        infonce(
            &t64(&q, &[5, 3]),
            &ramp(4, 3),
            &[0; 5],
            &InfoNceOptions::default(),
        ),
        "q",
        &["row 3"],
    );
    assert!(
        matches!(
            err,
            Error::NonFinite {
                arg: "q",
                row: 3,
                ..
            }
        ),
        "{err:?}"
    );

    let mut queue = v64(&ramp(6, 3));
    queue[4 * 3] = f64::INFINITY;
    let err = expect_err(
        moco(
            &ramp(2, 3),
            &ramp(2, 3),
            &t64(&queue, &[6, 3]),
            &MocoOptions::default(),
        ),
        "queue",
        &["row 4"],
    );
    assert!(
        matches!(
            err,
            Error::NonFinite {
                arg: "queue",
                row: 4,
                ..
            }
        ),
        "{err:?}"
    );

    let mut b = v64(&ramp(4, 2));
    b[2 * 2 + 1] = f64::NEG_INFINITY;
    let err = expect_err(clip(&ramp(4, 2), &t64(&b, &[4, 2]), 1.0), "b", &["row 2"]);
    assert!(
        matches!(
            err,
            Error::NonFinite {
                arg: "b",
                row: 2,
                ..
            }
        ),
        "{err:?}"
    );

    // For supcon the row is the sample.
    let mut f = vec![0.5; 4 * 2 * 3];
    f[2 * 6 + 4] = f64::NAN;
    let err = expect_err(
        supcon(
            &t64(&f, &[4, 2, 3]),
            &[0, 1, 0, 1],
            &SupConOptions::default(),
        ),
        "features",
        &["row 2"],
    );
    assert!(
        matches!(
            err,
            Error::NonFinite {
                arg: "features",
                row: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_moco_queue_width() {
    let err = expect_err(
        moco(
            &ramp(2, 3),
            &ramp(2, 3),
            &ramp(5, 4),
            &MocoOptions::default(),
        ),
        "queue",
        &["[5, 4]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "moco",
                arg: "queue",
                ..
            }
        ),
        "{err:?}"
    );
    let err = expect_err(
        moco(
            &ramp(2, 3),
            &ramp(3, 3),
            &ramp(5, 3),
            &MocoOptions::default(),
        ),
        "k",
        &["[3, 3]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "moco",
                arg: "k",
                ..
            }
        ),
        "{err:?}"
    );
    let mut queue = ramp(5, 3);
    let err = expect_err(moco_enqueue(&mut queue, &ramp(2, 4), 0), "k", &["[2, 4]"]);
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "moco_enqueue",
                arg: "k",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_dtype_mismatch() {
    let q32 = ramp(3, 2).to_dtype(DType::F32).unwrap();
    let err = expect_err(
        infonce(&q32, &ramp(3, 2), &[0, 1, 2], &InfoNceOptions::default()),
        "q",
        &["`k`", "f32", "f64"],
    );
    assert!(
        matches!(err, Error::Mismatch { op: "infonce", .. }),
        "{err:?}"
    );
    let err = expect_err(clip(&q32, &ramp(3, 2), 1.0), "a", &["`b`", "f32", "f64"]);
    assert!(matches!(err, Error::Mismatch { op: "clip", .. }), "{err:?}");
    let err = expect_err(
        moco(&q32, &q32, &ramp(4, 2), &MocoOptions::default()),
        "queue",
        &["f32", "f64"],
    );
    assert!(matches!(err, Error::Mismatch { op: "moco", .. }), "{err:?}");
    let mut queue = ramp(4, 2);
    let err = expect_err(
        moco_enqueue(&mut queue, &q32, 0),
        "k",
        &["`queue`", "f32", "f64"],
    );
    assert!(
        matches!(
            err,
            Error::Mismatch {
                op: "moco_enqueue",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_enqueue_ptr_out_of_range() {
    let before = ramp(5, 3);
    let mut queue = before.clone();
    let err = expect_err(
        moco_enqueue(&mut queue, &ramp(2, 3), 5),
        "ptr",
        &["5", "5 rows"],
    );
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "moco_enqueue",
                arg: "ptr",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        v64(&queue),
        v64(&before),
        "a rejected enqueue must leave the queue alone"
    );
    assert_eq!(moco_enqueue(&mut queue, &ramp(2, 3), 4).unwrap(), 1);
}

#[test]
fn error_ntxent_odd_rows() {
    let err = expect_err(
        ntxent(&ramp(5, 3), &NtXentOptions::default()),
        "z",
        &["[5, 3]", "even"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "ntxent",
                arg: "z",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn error_bad_saved_state_and_grad_loss() {
    let (q, k, queue) = (ramp(3, 2), ramp(3, 2), ramp(4, 2));
    let opts = MocoOptions::default();
    let fwd = moco_forward(&q, &k, &queue, &opts).unwrap();
    let mut wrong = fwd.saved.clone();
    wrong.lse = t64(&[0.0; 2], &[2]);
    let err = expect_err(
        moco_backward(&q, &k, &queue, &opts, &wrong, 1.0),
        "saved.lse",
        &["[2]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "saved.lse",
                ..
            }
        ),
        "{err:?}"
    );
    let err = expect_err(
        moco_backward(&q, &k, &queue, &opts, &fwd.saved, f64::NAN),
        "grad_loss",
        &[],
    );
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                arg: "grad_loss",
                ..
            }
        ),
        "{err:?}"
    );
    // The split forward/backward matches the one call, and grad_loss scales the gradient.
    let g2 = moco_backward(&q, &k, &queue, &opts, &fwd.saved, 2.0).unwrap();
    let one = moco(&q, &k, &queue, &opts).unwrap();
    let doubled: Vec<f64> = v64(&one.grad_q).iter().map(|g| 2.0 * g).collect();
    assert_close(&v64(&g2), &doubled, 1e-12, "moco grad_loss scaling");

    let (a, b) = (ramp(3, 2), ramp(3, 2));
    let fwd = clip_forward(&a, &b, 1.0).unwrap();
    let mut bad = fwd.saved.clone();
    bad.col_lse = t64(&[f64::NAN, 0.0, 0.0], &[3]);
    let err = expect_err(
        clip_backward(&a, &b, 1.0, &bad, 1.0),
        "saved.col_lse",
        &["row 0"],
    );
    assert!(
        matches!(
            err,
            Error::NonFinite {
                arg: "saved.col_lse",
                ..
            }
        ),
        "{err:?}"
    );

    let features = t64(&[0.5; 8], &[2, 2, 2]);
    let sopts = SupConOptions::default();
    let mut wrong = supcon_forward(&features, &[0, 1], &sopts).unwrap().saved;
    wrong.lse = t64(&[0.0; 2], &[2]);
    let err = expect_err(
        supcon_backward(&features, &[0, 1], &sopts, &wrong, 1.0),
        "saved.lse",
        &["[4]"],
    );
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "supcon_backward",
                arg: "saved.lse",
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. The one-call forms (one fused sweep on the CPU) against forward + backward
// ---------------------------------------------------------------------------------------------

/// `infonce` / `ntxent` in one call take a single sweep over row strips of 256 rows; they must
/// agree with `*_forward` + `*_backward` (two sweeps) across several strips, in f32 and f64.
#[test]
fn one_call_matches_forward_backward_across_strips() {
    let mut r = rng(71);
    let (n, m, d) = (600, 523, 7);
    let q = uniform(&mut r, n * d);
    let k = uniform(&mut r, m * d);
    let positives: Vec<usize> = (0..n).map(|_| r.random_range(0..m)).collect();
    let z = uniform(&mut r, 2 * 301 * d);
    for (to, tol) in [(t64 as fn(&[f64], &[usize]) -> Tensor, 1e-12), (t32, 1e-5)] {
        for normalize in [true, false] {
            let opts = InfoNceOptions {
                temperature: 0.2,
                normalize,
                self_mask: false,
            };
            let (qt, kt) = (to(&q, &[n, d]), to(&k, &[m, d]));
            let one = infonce(&qt, &kt, &positives, &opts).unwrap();
            let fwd = infonce_forward(&qt, &kt, &positives, &opts).unwrap();
            let (gq, gk) = infonce_backward(&qt, &kt, &positives, &opts, &fwd.saved, 1.0).unwrap();
            let what = format!("infonce one call, normalize={normalize}, tol {tol:e}");
            assert_scalar_close(
                one.loss.to_scalar().unwrap(),
                fwd.loss.to_scalar().unwrap(),
                tol,
                &what,
            );
            assert_close(&v64(&one.grad_q), &v64(&gq), tol, &what);
            assert_close(&v64(&one.grad_k), &v64(&gk), tol, &what);
        }
        let opts = NtXentOptions { temperature: 0.3 };
        let zt = to(&z, &[602, d]);
        let one = ntxent(&zt, &opts).unwrap();
        let fwd = ntxent_forward(&zt, &opts).unwrap();
        let g = ntxent_backward(&zt, &opts, &fwd.saved, 1.0).unwrap();
        assert_scalar_close(
            one.loss.to_scalar().unwrap(),
            fwd.loss.to_scalar().unwrap(),
            tol,
            "ntxent one call",
        );
        assert_close(&v64(&one.grad_z), &v64(&g), tol, "ntxent one call");
    }
}

/// `moco` in one call takes one sweep with the positive as each row's extra logit; across several
/// row strips and a queue longer than a key tile it must agree with `moco_forward` +
/// `moco_backward` (a forward sweep, then a backward sweep), in f32 and f64.
#[test]
fn moco_one_call_matches_forward_backward_across_strips() {
    let mut r = rng(73);
    let (n, kq, d) = (300, 1100, 7);
    let (q, k, queue) = (
        uniform(&mut r, n * d),
        uniform(&mut r, n * d),
        uniform(&mut r, kq * d),
    );
    let opts = MocoOptions { temperature: 0.1 };
    for (to, tol) in [(t64 as fn(&[f64], &[usize]) -> Tensor, 1e-12), (t32, 1e-5)] {
        let (qt, kt, queue_t) = (to(&q, &[n, d]), to(&k, &[n, d]), to(&queue, &[kq, d]));
        let one = moco(&qt, &kt, &queue_t, &opts).unwrap();
        let fwd = moco_forward(&qt, &kt, &queue_t, &opts).unwrap();
        let g = moco_backward(&qt, &kt, &queue_t, &opts, &fwd.saved, 1.0).unwrap();
        let what = format!("moco one call, tol {tol:e}");
        assert_scalar_close(
            one.loss.to_scalar().unwrap(),
            fwd.loss.to_scalar().unwrap(),
            tol,
            &what,
        );
        assert_close(&v64(&one.grad_q), &v64(&g), tol, &what);
    }
}

/// Beyond 65536 keys the one call falls back to two sweeps (a row strip would be too large).
#[test]
fn one_call_with_more_keys_than_a_strip_holds() {
    let mut r = rng(72);
    let (n, m, d) = (3, 65_537, 2);
    let q = uniform(&mut r, n * d);
    let k = uniform(&mut r, m * d);
    let positives = [0, 65_536, 7];
    let opts = InfoNceOptions::default();
    let (qt, kt) = (t64(&q, &[n, d]), t64(&k, &[m, d]));
    let one = infonce(&qt, &kt, &positives, &opts).unwrap();
    let fwd = infonce_forward(&qt, &kt, &positives, &opts).unwrap();
    let (gq, _) = infonce_backward(&qt, &kt, &positives, &opts, &fwd.saved, 1.0).unwrap();
    assert_scalar_close(
        one.loss.to_scalar().unwrap(),
        fwd.loss.to_scalar().unwrap(),
        1e-12,
        "many keys: loss",
    );
    assert_close(&v64(&one.grad_q), &v64(&gq), 1e-12, "many keys: grad_q");
}
