//! The CPU backend's fast paths against the plain computation they replace, at shapes that are
//! not multiples of any block: f32 element loops (vectorized, run-time dispatched) against the f64
//! ones, and the blocked whole-tensor scans (content hash, finiteness) across block boundaries.
//! (The softmax sweeps' tiles are checked in tests/softmax_losses.rs, section 7.)

use contra::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::{rel_err, t32, t64, v64};

fn uniform(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Asserts `||got - want|| / ||want|| < tol` for every named `(got, want)` pair.
fn assert_all_close(pairs: [(&str, &Tensor, &Tensor); 3], tol: f64) {
    for (what, got, want) in pairs {
        let err = rel_err(&v64(got), &v64(want));
        assert!(err < tol, "{what} (tolerance {tol:e}): {err:e}");
    }
}

/// NCE's f32 loops (softplus and sigmoid in f32 over 256-element blocks, rows summed in f64)
/// against the exact f64 path, with k = 300 (one block and a tail) and scores up to +-30.
#[test]
fn nce_f32_matches_f64() {
    let mut r = StdRng::seed_from_u64(91);
    let (b, k) = (37, 300);
    let inputs = [
        (uniform(&mut r, b, 30.0), vec![b]),
        (uniform(&mut r, b * k, 30.0), vec![b, k]),
        (uniform(&mut r, b, 5.0), vec![b]),
        (uniform(&mut r, b * k, 5.0), vec![b, k]),
    ];
    let run = |to: fn(&[f64], &[usize]) -> Tensor| {
        let t: Vec<Tensor> = inputs.iter().map(|(v, s)| to(v, s)).collect();
        nce(&t[0], &t[1], &t[2], &t[3]).unwrap()
    };
    let (exact, fast) = (run(t64), run(t32));
    assert_all_close(
        [
            ("loss", &fast.loss, &exact.loss),
            ("grad_s_pos", &fast.grad_s_pos, &exact.grad_s_pos),
            ("grad_s_neg", &fast.grad_s_neg, &exact.grad_s_neg),
        ],
        1e-6,
    );
}

/// NCE's one call (one pass for the loss and both gradients) against the forward and the
/// backward called separately, in f64 and f32.
#[test]
fn nce_one_call_matches_forward_and_backward() {
    let mut r = StdRng::seed_from_u64(94);
    let (b, k) = (29, 301);
    let inputs = [
        (uniform(&mut r, b, 20.0), vec![b]),
        (uniform(&mut r, b * k, 20.0), vec![b, k]),
        (uniform(&mut r, b, 5.0), vec![b]),
        (uniform(&mut r, b * k, 5.0), vec![b, k]),
    ];
    for (to, tol) in [(t64 as fn(&[f64], &[usize]) -> Tensor, 1e-12), (t32, 1e-6)] {
        let t: Vec<Tensor> = inputs.iter().map(|(v, s)| to(v, s)).collect();
        let one = nce(&t[0], &t[1], &t[2], &t[3]).unwrap();
        let fwd = nce_forward(&t[0], &t[1], &t[2], &t[3]).unwrap();
        let (gp, gn) = nce_backward(&t[0], &t[1], &t[2], &t[3], &fwd.saved, 1.0).unwrap();
        assert_all_close(
            [
                ("loss", &one.loss, &fwd.loss),
                ("grad_s_pos", &one.grad_s_pos, &gp),
                ("grad_s_neg", &one.grad_s_neg, &gn),
            ],
            tol,
        );
    }
}

/// The margin loss's eight-lane distances at D = 37 (four chunks and a tail), f32 against f64.
#[test]
fn margin_f32_matches_f64() {
    let mut r = StdRng::seed_from_u64(92);
    let (n, d) = (53, 37);
    let (x1, x2) = (uniform(&mut r, n * d, 1.0), uniform(&mut r, n * d, 1.0));
    let y: Vec<i64> = (0..n as i64).map(|i| i % 2).collect();
    let opts = MarginOptions {
        margin: 3.0,
        ..Default::default()
    };
    let exact = margin_loss(&t64(&x1, &[n, d]), &t64(&x2, &[n, d]), &y, &opts).unwrap();
    let fast = margin_loss(&t32(&x1, &[n, d]), &t32(&x2, &[n, d]), &y, &opts).unwrap();
    assert_all_close(
        [
            ("loss", &fast.loss, &exact.loss),
            ("grad_x1", &fast.grad_x1, &exact.grad_x1),
            ("grad_x2", &fast.grad_x2, &exact.grad_x2),
        ],
        1e-6,
    );
}

/// The margin loss's one call (each distance once) against the forward and the backward called
/// separately, in f64 and f32, with similar and dissimilar pairs inside and beyond the margin.
#[test]
fn margin_one_call_matches_forward_and_backward() {
    let mut r = StdRng::seed_from_u64(95);
    let (n, d) = (61, 13);
    let (x1, x2) = (uniform(&mut r, n * d, 1.0), uniform(&mut r, n * d, 1.0));
    let y: Vec<i64> = (0..n as i64).map(|i| (i / 3) % 2).collect();
    let opts = MarginOptions {
        margin: 2.0,
        ..Default::default()
    };
    for (to, tol) in [(t64 as fn(&[f64], &[usize]) -> Tensor, 1e-12), (t32, 1e-6)] {
        let (a, b) = (to(&x1, &[n, d]), to(&x2, &[n, d]));
        let one = margin_loss(&a, &b, &y, &opts).unwrap();
        let fwd = margin_forward(&a, &b, &y, &opts).unwrap();
        let (g1, g2) = margin_backward(&a, &b, &y, &opts, &fwd.saved, 1.0).unwrap();
        assert_all_close(
            [
                ("loss", &one.loss, &fwd.loss),
                ("grad_x1", &one.grad_x1, &g1),
                ("grad_x2", &one.grad_x2, &g2),
            ],
            tol,
        );
    }
}

/// The content hash runs over 65536-element blocks: a saved state must still refuse a backward
/// whose input differs from the forward's in one element of a later block (and in the tail).
#[test]
fn saved_state_sees_a_change_past_the_first_block() {
    let mut r = StdRng::seed_from_u64(93);
    let (n, d) = (1100, 130); // 143 000 elements: two whole blocks and a tail
    let (x1, x2) = (uniform(&mut r, n * d, 1.0), uniform(&mut r, n * d, 1.0));
    let y: Vec<i64> = (0..n as i64).map(|i| i % 2).collect();
    let opts = MarginOptions::default();
    let (a, b) = (t32(&x1, &[n, d]), t32(&x2, &[n, d]));
    let fwd = margin_forward(&a, &b, &y, &opts).unwrap();
    assert!(margin_backward(&a, &b, &y, &opts, &fwd.saved, 1.0).is_ok());
    for index in [70_000, n * d - 1] {
        let mut changed = x1.clone();
        changed[index] += 0.25;
        let err = margin_backward(&t32(&changed, &[n, d]), &b, &y, &opts, &fwd.saved, 1.0)
            .expect_err("a changed input must not pass the saved state's check");
        assert!(err.to_string().contains("saved"), "{err}");
    }
}

/// The finiteness scan runs over blocks in parallel: it must still name the first non-finite
/// value's row when the first one lies past the first block and another lies further on.
#[test]
fn first_non_finite_value_past_the_first_block_is_named() {
    let (n, d) = (1100, 130);
    let mut x = vec![0.5; n * d];
    x[100_000] = f64::NAN;
    x[140_000] = f64::INFINITY;
    let z = t32(&x, &[n, d]);
    let err = ntxent(&z, &NtXentOptions::default()).expect_err("NaN input");
    let row = 100_000 / d;
    assert!(err.to_string().contains(&format!("row {row}")), "{err}");
}
