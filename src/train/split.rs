//! Deterministic, stratified splits: the held-out split of the embedded digits and the
//! "k labels per class" subsets of the semi-supervised linear probe.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::{digits, Dataset};
use crate::{Error, Result};

/// SplitMix64: a well-mixed 64-bit hash used to derive independent seeds from (seed, stream).
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The indices of each label, labels in increasing order.
fn by_class(labels: &[i64]) -> BTreeMap<i64, Vec<usize>> {
    let mut classes: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        classes.entry(l).or_default().push(i);
    }
    classes
}

/// The indices of one class shuffled by a seed derived from `seed` and the label, so that each
/// class's draw does not depend on the other classes.
fn shuffled(indices: &[usize], seed: u64, label: i64) -> Vec<usize> {
    let mut v = indices.to_vec();
    v.shuffle(&mut StdRng::seed_from_u64(derive_seed(seed, label as u64)));
    v
}

/// A stratified split of `labels` into (train, test) index lists (each sorted ascending) with
/// exactly `n_test` test indices. Class `c` with `n_c` of the `n` labels gets `n_test * n_c / n`
/// test indices rounded down, and the remaining ones go to the classes with the largest
/// remainders (ties to the smaller label); which indices of a class are held out is drawn from
/// `seed`.
pub fn stratified_split(
    labels: &[i64],
    n_test: usize,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    const OP: &str = "stratified_split";
    let n = labels.len();
    if n == 0 {
        return Err(Error::Empty {
            op: OP,
            arg: "labels",
            what: "no labels to split".into(),
        });
    }
    if n_test > n {
        return Err(Error::invalid(
            OP,
            "n_test",
            format!("{n_test} test samples out of {n}"),
        ));
    }
    let classes = by_class(labels);
    // Largest-remainder allocation of n_test over the classes.
    let mut quota: Vec<(i64, usize, usize)> = classes
        .iter()
        .map(|(&l, idx)| {
            let exact = n_test * idx.len();
            (l, exact / n, exact % n)
        })
        .collect();
    let assigned: usize = quota.iter().map(|q| q.1).sum();
    let mut order: Vec<usize> = (0..quota.len()).collect();
    order.sort_by(|&a, &b| quota[b].2.cmp(&quota[a].2).then(a.cmp(&b)));
    for &c in order.iter().take(n_test - assigned) {
        quota[c].1 += 1;
    }
    let (mut train, mut test) = (Vec::with_capacity(n - n_test), Vec::with_capacity(n_test));
    for (label, take, _) in quota {
        let idx = shuffled(&classes[&label], seed, label);
        test.extend_from_slice(&idx[..take]);
        train.extend_from_slice(&idx[take..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((train, test))
}

/// The fixed held-out split of the embedded digits: stratified, 1347 train / 450 test images
/// (25 % held out, rounded up as scikit-learn does), drawn from `seed`.
pub fn digits_split(seed: u64) -> Result<(Dataset, Dataset)> {
    let all = digits()?;
    let n_test = all.len().div_ceil(4);
    let (train, test) = stratified_split(&all.labels, n_test, seed)?;
    Ok((all.subset(&train)?, all.subset(&test)?))
}

/// `k` indices of each class present in `labels`, drawn from `seed` (sorted ascending). A class
/// with fewer than `k` samples is an error.
pub fn labels_per_class(labels: &[i64], k: usize, seed: u64) -> Result<Vec<usize>> {
    const OP: &str = "labels_per_class";
    if k == 0 {
        return Err(Error::invalid(OP, "k", "must be at least 1"));
    }
    let mut out = Vec::new();
    for (label, idx) in by_class(labels) {
        if idx.len() < k {
            return Err(Error::invalid(
                OP,
                "k",
                format!("{k} per class, but class {label} has {} samples", idx.len()),
            ));
        }
        out.extend_from_slice(&shuffled(&idx, seed, label)[..k]);
    }
    out.sort_unstable();
    Ok(out)
}
