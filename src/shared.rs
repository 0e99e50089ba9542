//! The vocabulary the layers share: the public kinds of similarity, distance and mining, the
//! triplet statistics, and the class tables, pair coefficients and power-of-two helpers that the
//! CPU backend and the kernel launches both use. A leaf: it imports nothing from `ops`, `cpu` or
//! `kernels`, which all import it.

/// Which pairwise score to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Similarity {
    /// `a_i . b_j`
    Dot,
    /// `norm(a_i) . norm(b_j)`
    Cosine,
    /// `||a_i - b_j||^2`
    SquaredEuclidean,
    /// `sqrt(max(||a_i - b_j||^2, 1e-12))`
    Euclidean,
}

/// Distance between embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distance {
    /// `sqrt(max(||a - b||^2, 1e-12))`
    Euclidean,
    /// `||a - b||^2`
    SquaredEuclidean,
    /// `1 - cos(a, b)`
    Cosine,
}

/// Which triplets contribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mining {
    /// Every valid (a, p, n); mean over the terms that are positive.
    BatchAll,
    /// Per anchor, the hardest positive and the hardest negative (Hermans et al.).
    BatchHard,
    /// Per positive pair, the nearest negative farther than the positive, else the farthest
    /// negative (FaceNet, as TF-Addons defines it).
    SemiHard,
    /// Every semi-hard triplet, `d_ap < d_an` with `d_ap - d_an + m >= 0` (pytorch-metric-
    /// learning's `TripletMarginMiner(type_of_triplets="semihard")`).
    SemiHardAll,
}

/// What the triplet loss's sum of terms is divided by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TripletReduction {
    /// The mining's own convention: batch-all and semi-hard-all average the positive terms,
    /// batch-hard every anchor with a positive and a negative, semi-hard every positive pair
    /// whose anchor has a negative (FaceNet / TF-Addons).
    #[default]
    Conventional,
    /// The mean over the terms that are positive (pytorch-metric-learning's
    /// `AvgNonZeroReducer`, its default for `TripletMarginLoss`).
    NonZero,
    /// The mean over every mined term, zeros included.
    AllMined,
}

impl TripletReduction {
    /// Whether the mean is over the positive terms only, for `mining`.
    pub(crate) fn nonzero_only(self, mining: Mining) -> bool {
        match self {
            TripletReduction::Conventional => {
                matches!(mining, Mining::BatchAll | Mining::SemiHardAll)
            }
            TripletReduction::NonZero => true,
            TripletReduction::AllMined => false,
        }
    }
}

/// How the valid triplets (a, p, n) of the batch split, as the FaceNet survey classifies them:
/// hard `d_an < d_ap`, semi-hard `d_ap <= d_an < d_ap + m`, easy otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TripletStats {
    pub hard: u64,
    pub semi_hard: u64,
    pub easy: u64,
}

/// The clamp inside euclidean distances: `d = sqrt(max(||a - b||^2, DIST_EPS))`; the derivative is
/// 0 where the squared distance is below it.
pub const DIST_EPS: f64 = 1e-12;

/// The coefficient of the "raw" pair quantity of rows `i` and `j` in the loss (already divided by
/// the loss's count): the squared distance for the euclidean distances, the cosine similarity of
/// the normalized rows for the cosine distance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairCoef {
    pub i: usize,
    pub j: usize,
    pub coef: f64,
}

/// The pair coefficients (see [`PairCoef`]) of a forward, stored densely or sparsely, whichever
/// is smaller.
#[derive(Clone)]
pub enum Coefs {
    /// `rows x rows`, row-major: entry (i, j) is the coefficient of pair (i, j).
    Dense(Vec<f64>),
    /// The pairs with a nonzero coefficient.
    Sparse(Vec<PairCoef>),
}

impl Coefs {
    /// The `rows x rows` row-major matrix of coefficients times `2^exp`, in f32 (what the kernels
    /// take).
    pub(crate) fn to_dense_f32(&self, rows: usize, exp: i32) -> Vec<f32> {
        match self {
            Coefs::Dense(w) => w.iter().map(|&c| ldexp(c, exp) as f32).collect(),
            Coefs::Sparse(pairs) => {
                let mut w = vec![0.0f32; rows * rows];
                for e in pairs {
                    w[e.i * rows + e.j] += ldexp(e.coef, exp) as f32;
                }
                w
            }
        }
    }

    /// Multiplies every coefficient by `2^exp`.
    pub(crate) fn scale_exp(&mut self, exp: i32) {
        if exp == 0 {
            return;
        }
        match self {
            Coefs::Dense(w) => w.iter_mut().for_each(|c| *c = ldexp(*c, exp)),
            Coefs::Sparse(pairs) => pairs.iter_mut().for_each(|e| e.coef = ldexp(e.coef, exp)),
        }
    }
}

/// `margin 2^exp`, kept at least `floor` when the margin is positive: a margin that underflows
/// in a scaled problem still keeps ties out of the hard triplets (below the resolution of the
/// scaled distances, it changes nothing else).
pub(crate) fn scaled_margin(margin: f64, exp: i32, floor: f64) -> f64 {
    if margin > 0.0 {
        ldexp(margin, exp).max(floor)
    } else {
        margin
    }
}

impl std::fmt::Debug for Coefs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Coefs::Dense(w) => write!(f, "Dense({} coefficients)", w.len()),
            Coefs::Sparse(pairs) => write!(f, "Sparse({} pairs)", pairs.len()),
        }
    }
}

/// Per-row class ids and `1 / |P(a)|` (0 for an anchor without positives).
pub(crate) struct Classes {
    pub class: Vec<usize>,
    pub inv_positives: Vec<f64>,
}

impl Classes {
    pub(crate) fn new(labels: &[i64], views: usize) -> Self {
        let mut distinct = labels.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let sample_class: Vec<usize> = labels
            .iter()
            .map(|l| distinct.binary_search(l).unwrap_or_default())
            .collect();
        let mut per_class = vec![0usize; distinct.len()];
        for &c in &sample_class {
            per_class[c] += views;
        }
        let class: Vec<usize> = sample_class
            .iter()
            .flat_map(|&c| std::iter::repeat_n(c, views))
            .collect();
        let inv_positives = class
            .iter()
            .map(|&c| match per_class[c] - 1 {
                0 => 0.0,
                p => 1.0 / p as f64,
            })
            .collect();
        Classes {
            class,
            inv_positives,
        }
    }

    /// The class ids (i32; dense ids are < N, which fits) and `1 / |P(a)|` (f32) the kernels take.
    pub(crate) fn for_kernels(&self) -> (Vec<i32>, Vec<f32>) {
        (
            self.class.iter().map(|&c| c as i32).collect(),
            self.inv_positives.iter().map(|&w| w as f32).collect(),
        )
    }

    pub(crate) fn has_positive(&self, row: usize) -> bool {
        self.inv_positives[row] != 0.0
    }
}

/// `x 2^k` for any `k`, exact unless the result over- or underflows (`scalbn`): multiplies by
/// normal powers of two at most 2^1000 apart.
pub fn ldexp(mut x: f64, mut k: i32) -> f64 {
    let pow2 = |k: i32| f64::from_bits(((k + 1023) as u64) << 52);
    while k > 1000 {
        x *= pow2(1000);
        k -= 1000;
    }
    while k < -1000 {
        x *= pow2(-1000);
        k += 1000;
    }
    x * pow2(k)
}

/// The mean of `values`; a sum that overflows is taken again from the values scaled by 2^-64, so
/// the mean of finite values is finite whenever it is representable.
pub fn mean(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let total: f64 = values.iter().sum();
    if total.is_finite() || values.iter().any(|v| !v.is_finite()) {
        return total / n;
    }
    ldexp(values.iter().map(|&v| ldexp(v, -64)).sum::<f64>() / n, 64)
}
