//! Seeded, reproducible augmentations of small grayscale images (the 8 x 8 digits, 28 x 28
//! MNIST / Fashion-MNIST) for contrastive training.
//!
//! One [`Augment`] applies, in this order: a random resized crop resampled bilinearly back to
//! the full size, a random integer translation (zero fill), a horizontal flip, brightness and
//! contrast jitter, gaussian noise, random erasing, and a final clamp to [0, 1]. Each step has
//! its own probability or strength; a zero strength disables it.
//!
//! [`Augment::views`] augments a whole batch in parallel. Image `i` of view `v` draws from its
//! own generator seeded by `(seed, v, i)`, so the result depends on the seed only, not on the
//! thread count or on the batch being split differently.
//!
//! ```
//! use contra::train::augment::Augment;
//! let aug = Augment::for_size(8, 8);
//! let batch = vec![0.5f32; 3 * 64];
//! let z = aug.two_views(&batch, 3, 8, 8, 42)?;
//! assert_eq!(z.len(), 2 * 3 * 64); // rows 0..3 view 0, rows 3..6 view 1
//! assert_eq!(z, aug.two_views(&batch, 3, 8, 8, 42)?);
//! # Ok::<(), contra::Error>(())
//! ```

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::split::derive_seed;
use crate::{Error, Result};

/// The augmentation pipeline and its strengths. Build one with [`Augment::for_size`] and adjust
/// fields as needed.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Probability of the random resized crop.
    pub crop_prob: f32,
    /// Range of the crop's area as a fraction of the image, within (0, 1].
    pub crop_scale: (f32, f32),
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    pub crop_ratio: (f32, f32),
    /// Largest translation in pixels along each axis (uniform in `-max_shift..=max_shift`).
    pub max_shift: usize,
    /// Probability of a horizontal flip (0 for digits, whose mirror images are other symbols).
    pub flip_prob: f32,
    /// Probability of the brightness and contrast jitter.
    pub jitter_prob: f32,
    /// Brightness: adds a value uniform in `[-brightness, brightness]`.
    pub brightness: f32,
    /// Contrast: scales the deviation from the image mean by a factor uniform in
    /// `[1 - contrast, 1 + contrast]` (at most 1).
    pub contrast: f32,
    /// Standard deviation of the additive gaussian noise.
    pub noise_std: f32,
    /// Probability of erasing one random rectangle.
    pub erase_prob: f32,
    /// Range of the erased area as a fraction of the image, within (0, 1].
    pub erase_scale: (f32, f32),
    /// Range of the erased rectangle's aspect ratio, sampled log-uniformly.
    pub erase_ratio: (f32, f32),
    /// Value written into the erased rectangle.
    pub erase_value: f32,
    /// Clamp the result to [0, 1].
    pub clamp: bool,
}

impl Augment {
    /// The identity: every step disabled (only the clamp stays on).
    pub fn none() -> Self {
        Augment {
            crop_prob: 0.0,
            crop_scale: (1.0, 1.0),
            crop_ratio: (1.0, 1.0),
            max_shift: 0,
            flip_prob: 0.0,
            jitter_prob: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            noise_std: 0.0,
            erase_prob: 0.0,
            erase_scale: (0.02, 0.2),
            erase_ratio: (0.3, 3.3),
            erase_value: 0.0,
            clamp: true,
        }
    }

    /// Defaults suited to the image size: gentle for 8 x 8 digits (a crop of 60-100 % of the
    /// area, tiny erasures), stronger from 16 pixels up (28 x 28: a crop of 50-100 %, erasing
    /// up to a fifth of the image), brightness / contrast jitter and light noise for both. The
    /// crop also moves the content, so the extra translation is off (a 1 pixel shift of an
    /// 8 x 8 digit already halves the raw-pixel 1-NN accuracy); no flips (set `flip_prob` for
    /// data sets with mirror symmetry such as Fashion-MNIST).
    pub fn for_size(height: usize, width: usize) -> Self {
        if height.min(width) < 16 {
            Augment {
                crop_prob: 0.8,
                crop_scale: (0.6, 1.0),
                crop_ratio: (0.8, 1.25),
                jitter_prob: 0.8,
                brightness: 0.2,
                contrast: 0.3,
                noise_std: 0.05,
                erase_prob: 0.2,
                erase_scale: (0.02, 0.12),
                ..Augment::none()
            }
        } else {
            Augment {
                crop_prob: 1.0,
                crop_scale: (0.5, 1.0),
                crop_ratio: (0.75, 4.0 / 3.0),
                jitter_prob: 0.8,
                brightness: 0.3,
                contrast: 0.4,
                noise_std: 0.05,
                erase_prob: 0.25,
                erase_scale: (0.02, 0.2),
                ..Augment::none()
            }
        }
    }

    /// Checks every field is in its legal range.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "Augment";
        let prob = |arg: &'static str, p: f32| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(Error::invalid(OP, arg, format!("{p} is not in [0, 1]")))
            }
        };
        prob("crop_prob", self.crop_prob)?;
        prob("flip_prob", self.flip_prob)?;
        prob("jitter_prob", self.jitter_prob)?;
        prob("erase_prob", self.erase_prob)?;
        prob("contrast", self.contrast)?;
        let fraction_range = |arg: &'static str, (lo, hi): (f32, f32)| {
            if lo > 0.0 && lo <= hi && hi <= 1.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    OP,
                    arg,
                    format!("({lo}, {hi}) is not a range within (0, 1]"),
                ))
            }
        };
        fraction_range("crop_scale", self.crop_scale)?;
        fraction_range("erase_scale", self.erase_scale)?;
        let ratio_range = |arg: &'static str, (lo, hi): (f32, f32)| {
            if lo > 0.0 && lo <= hi && hi.is_finite() {
                Ok(())
            } else {
                Err(Error::invalid(
                    OP,
                    arg,
                    format!("({lo}, {hi}) is not a positive, finite range"),
                ))
            }
        };
        ratio_range("crop_ratio", self.crop_ratio)?;
        ratio_range("erase_ratio", self.erase_ratio)?;
        for (arg, v) in [
            ("brightness", self.brightness),
            ("noise_std", self.noise_std),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!("{v} is not a finite value >= 0"),
                ));
            }
        }
        if !self.erase_value.is_finite() {
            return Err(Error::invalid(
                OP,
                "erase_value",
                format!("{} is not finite", self.erase_value),
            ));
        }
        Ok(())
    }

    /// One augmented copy of `image` (`height x width`, row-major), drawing from `rng`.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        image: &[f32],
        height: usize,
        width: usize,
        rng: &mut R,
    ) -> Result<Vec<f32>> {
        self.validate()?;
        check_batch("Augment::apply", image, 1, height, width)?;
        let mut out = vec![0.0; image.len()];
        self.apply_into(image, height, width, rng, &mut out);
        Ok(out)
    }

    /// `views` augmented copies of a batch of `n` images (`n x height * width`, row-major):
    /// `(views * n) x (height * width)`, view-major (row `v * n + i` is view `v` of image `i`,
    /// the layout of [`crate::ntxent()`] for two views). Deterministic in `seed`; image `i` of
    /// view `v` uses a generator seeded from `(seed, v, i)`.
    pub fn views(
        &self,
        images: &[f32],
        n: usize,
        height: usize,
        width: usize,
        views: usize,
        seed: u64,
    ) -> Result<Vec<f32>> {
        self.validate()?;
        check_batch("Augment::views", images, n, height, width)?;
        let dim = height * width;
        let mut out = vec![0.0f32; views * n * dim];
        if out.is_empty() {
            return Ok(out);
        }
        out.par_chunks_mut(dim).enumerate().for_each(|(row, dst)| {
            let (v, i) = (row / n, row % n);
            let mut rng = StdRng::seed_from_u64(derive_seed(derive_seed(seed, v as u64), i as u64));
            self.apply_into(
                &images[i * dim..(i + 1) * dim],
                height,
                width,
                &mut rng,
                dst,
            );
        });
        Ok(out)
    }

    /// Two augmented views of a batch: `2n x (height * width)`, rows `i` and `i + n` are the
    /// views of image `i`. See [`Augment::views`].
    pub fn two_views(
        &self,
        images: &[f32],
        n: usize,
        height: usize,
        width: usize,
        seed: u64,
    ) -> Result<Vec<f32>> {
        self.views(images, n, height, width, 2, seed)
    }

    /// The pipeline on validated inputs; `out` has `height * width` elements.
    fn apply_into<R: Rng + ?Sized>(
        &self,
        image: &[f32],
        h: usize,
        w: usize,
        rng: &mut R,
        out: &mut [f32],
    ) {
        out.copy_from_slice(image);
        let mut tmp = vec![0.0f32; h * w];
        if self.crop_prob > 0.0 && rng.random::<f32>() < self.crop_prob {
            let (y0, x0, ch, cw) = sample_box(rng, h, w, self.crop_scale, self.crop_ratio);
            resample(out, h, w, (y0, x0, ch, cw), &mut tmp);
            out.copy_from_slice(&tmp);
        }
        if self.max_shift > 0 {
            let s = self.max_shift as i64;
            let (dy, dx) = (rng.random_range(-s..=s), rng.random_range(-s..=s));
            if dy != 0 || dx != 0 {
                shift(out, h, w, dy, dx, &mut tmp);
                out.copy_from_slice(&tmp);
            }
        }
        if self.flip_prob > 0.0 && rng.random::<f32>() < self.flip_prob {
            for row in out.chunks_mut(w) {
                row.reverse();
            }
        }
        if self.jitter_prob > 0.0 && rng.random::<f32>() < self.jitter_prob {
            let b = if self.brightness > 0.0 {
                rng.random_range(-self.brightness..=self.brightness)
            } else {
                0.0
            };
            let c = if self.contrast > 0.0 {
                rng.random_range(1.0 - self.contrast..=1.0 + self.contrast)
            } else {
                1.0
            };
            let mean = out.iter().sum::<f32>() / out.len() as f32;
            for v in out.iter_mut() {
                *v = (*v - mean) * c + mean + b;
            }
        }
        if self.noise_std > 0.0 {
            for v in out.iter_mut() {
                let z: f32 = StandardNormal.sample(rng);
                *v += self.noise_std * z;
            }
        }
        if self.erase_prob > 0.0 && rng.random::<f32>() < self.erase_prob {
            if let Some((y0, x0, eh, ew)) =
                sample_erase(rng, h, w, self.erase_scale, self.erase_ratio)
            {
                for y in y0..y0 + eh {
                    out[y * w + x0..y * w + x0 + ew].fill(self.erase_value);
                }
            }
        }
        if self.clamp {
            for v in out.iter_mut() {
                *v = v.clamp(0.0, 1.0);
            }
        }
    }
}

/// Checks a batch is `n x height * width` and finite.
fn check_batch(op: &'static str, images: &[f32], n: usize, h: usize, w: usize) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(Error::invalid(
            op,
            "height, width",
            format!("{h} x {w} images have no pixels"),
        ));
    }
    let expected = n.checked_mul(h * w);
    if expected != Some(images.len()) {
        return Err(Error::shape(
            op,
            "images",
            &[images.len()],
            format!("{n} x {h} x {w} elements"),
        ));
    }
    if let Some(k) = images.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            op,
            arg: "images",
            row: k / (h * w),
            value: images[k] as f64,
        });
    }
    Ok(())
}

/// A log-uniform sample of `(lo, hi)`.
fn log_uniform<R: Rng + ?Sized>(rng: &mut R, (lo, hi): (f32, f32)) -> f32 {
    if lo >= hi {
        return lo;
    }
    rng.random_range(lo.ln()..=hi.ln()).exp()
}

/// A uniform sample of `(lo, hi)`.
fn uniform<R: Rng + ?Sized>(rng: &mut R, (lo, hi): (f32, f32)) -> f32 {
    if lo >= hi {
        lo
    } else {
        rng.random_range(lo..=hi)
    }
}

/// A crop box `(y0, x0, height, width)` in continuous pixel coordinates inside the image: area
/// a fraction in `scale` of the image, aspect ratio in `ratio` (clipped to the image).
fn sample_box<R: Rng + ?Sized>(
    rng: &mut R,
    h: usize,
    w: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
) -> (f32, f32, f32, f32) {
    let (hf, wf) = (h as f32, w as f32);
    let area = hf * wf * uniform(rng, scale);
    let r = log_uniform(rng, ratio);
    let cw = (area * r).sqrt().min(wf);
    let ch = (area / r).sqrt().min(hf);
    let y0 = uniform(rng, (0.0, hf - ch));
    let x0 = uniform(rng, (0.0, wf - cw));
    (y0, x0, ch, cw)
}

/// Bilinear resampling of the box `(y0, x0, ch, cw)` of `src` to the full `h x w` in `dst`
/// (pixel centres at half-integers, edges clamped).
fn resample(
    src: &[f32],
    h: usize,
    w: usize,
    (y0, x0, ch, cw): (f32, f32, f32, f32),
    dst: &mut [f32],
) {
    let coord = |start: f32, len: f32, n: usize, i: usize| -> (usize, usize, f32) {
        let s = (start + (i as f32 + 0.5) * len / n as f32 - 0.5).clamp(0.0, (n - 1) as f32);
        let lo = s.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        (lo, hi, s - lo as f32)
    };
    for i in 0..h {
        let (ya, yb, fy) = coord(y0, ch, h, i);
        for j in 0..w {
            let (xa, xb, fx) = coord(x0, cw, w, j);
            let top = src[ya * w + xa] * (1.0 - fx) + src[ya * w + xb] * fx;
            let bottom = src[yb * w + xa] * (1.0 - fx) + src[yb * w + xb] * fx;
            dst[i * w + j] = top * (1.0 - fy) + bottom * fy;
        }
    }
}

/// `dst` = `src` moved down by `dy` and right by `dx` pixels, zero fill.
fn shift(src: &[f32], h: usize, w: usize, dy: i64, dx: i64, dst: &mut [f32]) {
    for i in 0..h as i64 {
        for j in 0..w as i64 {
            let (si, sj) = (i - dy, j - dx);
            dst[(i * w as i64 + j) as usize] =
                if (0..h as i64).contains(&si) && (0..w as i64).contains(&sj) {
                    src[(si * w as i64 + sj) as usize]
                } else {
                    0.0
                };
        }
    }
}

/// A rectangle `(y0, x0, height, width)` of integer pixels to erase, or `None` when ten draws
/// found none that fits (torchvision's rule).
fn sample_erase<R: Rng + ?Sized>(
    rng: &mut R,
    h: usize,
    w: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
) -> Option<(usize, usize, usize, usize)> {
    let area = (h * w) as f32;
    for _ in 0..10 {
        let target = area * uniform(rng, scale);
        let r = log_uniform(rng, ratio);
        let eh = (target / r).sqrt().round() as usize;
        let ew = (target * r).sqrt().round() as usize;
        if eh >= 1 && ew >= 1 && eh < h && ew < w {
            let y0 = rng.random_range(0..=h - eh);
            let x0 = rng.random_range(0..=w - ew);
            return Some((y0, x0, eh, ew));
        }
    }
    None
}
