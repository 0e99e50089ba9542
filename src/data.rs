//! Data sets. The UCI optical digits (1797 8x8 images, CC BY 4.0; see data/README.md) are
//! embedded in the crate, so examples and the trainer need no download.

use std::io::Read;

use crate::{Error, Result};

const DIGITS_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Images with one label each. `images` is row-major `len x (height * width)`, scaled to [0, 1].
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image.
    pub fn dim(&self) -> usize {
        self.height * self.width
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * self.dim()..(i + 1) * self.dim()]
    }

    /// The images at `indices` (in that order, repeats allowed) as a new data set.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::invalid(
                "Dataset::subset",
                "indices",
                format!("index {bad} out of range for {} images", self.len()),
            ));
        }
        let mut images = Vec::with_capacity(indices.len() * self.dim());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Ok(Dataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            height: self.height,
            width: self.width,
            classes: self.classes,
        })
    }
}

/// The embedded UCI digits: 1797 images of 8 x 8 pixels, labels 0..9.
///
/// ```
/// let digits = contra::data::digits()?;
/// assert_eq!(digits.len(), 1797);
/// assert_eq!(digits.dim(), 64);
/// # Ok::<(), contra::Error>(())
/// ```
pub fn digits() -> Result<Dataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::io("digits.csv.gz (embedded)", e))?;
    parse_digits_csv(&text)
}

/// Parses the digits CSV: 64 pixel values in 0..=16 then the label, per line.
pub fn parse_digits_csv(text: &str) -> Result<Dataset> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad =
            |reason: String| Error::format("digits.csv", format!("line {}: {reason}", line_no + 1));
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != 65 {
            return Err(bad(format!("{} fields, expected 65", fields.len())));
        }
        for field in &fields[..64] {
            let v: f32 = field
                .trim()
                .parse()
                .map_err(|_| bad(format!("pixel `{field}` is not a number")))?;
            if !(0.0..=16.0).contains(&v) {
                return Err(bad(format!("pixel {v} outside 0..=16")));
            }
            images.push(v / 16.0);
        }
        let label: i64 = fields[64]
            .trim()
            .parse()
            .map_err(|_| bad(format!("label `{}` is not an integer", fields[64])))?;
        if !(0..10).contains(&label) {
            return Err(bad(format!("label {label} outside 0..=9")));
        }
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(Error::format("digits.csv", "no data lines"));
    }
    Ok(Dataset {
        images,
        labels,
        height: 8,
        width: 8,
        classes: 10,
    })
}
