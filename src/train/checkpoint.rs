//! Encoder checkpoints as safetensors files: every parameter and BatchNorm buffer under its
//! `state_dict`-style name (`backbone.0.weight`, `backbone.1.running_mean`, ...) as f32, plus
//! string metadata: `format`, `method`, `data`, `seed`, the backbone and head specifications
//! (`backbone_spec`, `head_spec`, JSON) from which [`load_checkpoint`] rebuilds the encoder, and
//! the training configuration (`config`, JSON).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};

use crate::nn::{Encoder, MlpSpec, Norm};
use crate::{Error, Result};

/// The value of the `format` metadata key.
pub const FORMAT: &str = "contra-encoder/1";

fn norm_name(n: Norm) -> &'static str {
    match n {
        Norm::None => "none",
        Norm::BatchNorm => "batchnorm",
        Norm::BatchNormNoAffine => "batchnorm_no_affine",
    }
}

/// An [`MlpSpec`] as JSON.
pub fn spec_to_json(spec: &MlpSpec) -> Value {
    json!({
        "widths": spec.widths,
        "hidden_norm": norm_name(spec.hidden_norm),
        "hidden_bias": spec.hidden_bias,
        "output_norm": norm_name(spec.output_norm),
        "output_bias": spec.output_bias,
        "output_relu": spec.output_relu,
    })
}

/// Parses the JSON of [`spec_to_json`]; `path` names the file in errors.
pub fn spec_from_json(v: &Value, path: &Path) -> Result<MlpSpec> {
    let bad = |what: &str| Error::format(path, format!("encoder spec: {what} in {v}"));
    let widths = v["widths"]
        .as_array()
        .ok_or_else(|| bad("no `widths` array"))?
        .iter()
        .map(|w| w.as_u64().and_then(|w| usize::try_from(w).ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("a width is not a non-negative integer that fits in memory"))?;
    let norm = |key: &str| -> Result<Norm> {
        match v[key].as_str() {
            Some("none") => Ok(Norm::None),
            Some("batchnorm") => Ok(Norm::BatchNorm),
            Some("batchnorm_no_affine") => Ok(Norm::BatchNormNoAffine),
            _ => Err(bad(&format!(
                "`{key}` is not none, batchnorm or batchnorm_no_affine"
            ))),
        }
    };
    let flag = |key: &str| -> Result<bool> {
        v[key]
            .as_bool()
            .ok_or_else(|| bad(&format!("`{key}` is not a boolean")))
    };
    Ok(MlpSpec {
        widths,
        hidden_norm: norm("hidden_norm")?,
        hidden_bias: flag("hidden_bias")?,
        output_norm: norm("output_norm")?,
        output_bias: flag("output_bias")?,
        output_relu: flag("output_relu")?,
    })
}

/// Most values (parameters and buffers, 4 bytes each) a checkpoint may hold: 2^31, 8 GiB.
pub const MAX_CHECKPOINT_VALUES: usize = 1 << 31;

/// The number of tensors and of f32 values (parameters and buffers) of an [`Mlp`] built from
/// `spec`, computed with checked arithmetic without building it; `None` on overflow.
///
/// [`Mlp`]: crate::nn::Mlp
fn spec_size(spec: &MlpSpec) -> Option<(usize, usize)> {
    let (mut tensors, mut values) = (0usize, 0usize);
    let layers = spec.widths.len().saturating_sub(1);
    for (i, pair) in spec.widths.windows(2).enumerate() {
        let (input, out) = (pair[0], pair[1]);
        let (bias, norm) = if i + 1 == layers {
            (spec.output_bias, spec.output_norm)
        } else {
            (spec.hidden_bias, spec.hidden_norm)
        };
        // Linear weight (out x in) and bias; BatchNorm weight, bias, running mean and variance.
        let per_out = match norm {
            Norm::None => 0,
            Norm::BatchNorm => 4,
            Norm::BatchNormNoAffine => 2,
        } + usize::from(bias);
        tensors += 1 + per_out;
        values = values
            .checked_add(out.checked_mul(input)?)?
            .checked_add(out.checked_mul(per_out)?)?;
    }
    Some((tensors, values))
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub encoder: Encoder,
    /// The encoder as it was initialised (same specifications and seed), untrained.
    pub untrained: Encoder,
    pub metadata: HashMap<String, String>,
}

impl Checkpoint {
    /// A metadata entry.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `encoder` to `path`. `extra` metadata (method, data, config, ...) is stored next to
/// `format`, `seed`, `backbone_spec` and `head_spec`.
pub fn save_checkpoint(
    path: impl AsRef<Path>,
    encoder: &Encoder,
    seed: u64,
    extra: &[(&str, String)],
) -> Result<()> {
    let path = path.as_ref();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for p in encoder.params() {
        tensors.push((p.name.clone(), p.shape.clone(), f32_bytes(&p.value)));
    }
    for b in encoder.buffers() {
        tensors.push((b.name.clone(), b.shape.clone(), f32_bytes(&b.value)));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("seed".into(), seed.to_string());
    meta.insert(
        "backbone_spec".into(),
        spec_to_json(encoder.backbone.spec()).to_string(),
    );
    meta.insert(
        "head_spec".into(),
        spec_to_json(encoder.head.spec()).to_string(),
    );
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::format(path, format!("serializing: {e}")))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Reads a checkpoint written by [`save_checkpoint`]: rebuilds the encoder from the metadata
/// and loads every parameter and buffer, checking names, shapes and dtypes.
pub fn load_checkpoint(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::format(
            path,
            format!(
                "metadata `format` is {:?}, expected {FORMAT:?} (a checkpoint of `contra train`)",
                metadata.get("format")
            ),
        ));
    }
    let json = |key: &str| -> Result<Value> {
        let s = metadata
            .get(key)
            .ok_or_else(|| Error::format(path, format!("metadata `{key}` is missing")))?;
        serde_json::from_str(s)
            .map_err(|e| Error::format(path, format!("metadata `{key}` is not JSON: {e}")))
    };
    let backbone = spec_from_json(&json("backbone_spec")?, path)?;
    let head = spec_from_json(&json("head_spec")?, path)?;
    let seed: u64 = metadata
        .get("seed")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::format(path, "metadata `seed` is missing or not an integer"))?;
    // Bound the encoder of the metadata by what the file stores before building (allocating) it.
    let implied = spec_size(&backbone)
        .zip(spec_size(&head))
        .and_then(|((bt, bv), (ht, hv))| Some((bt + ht, bv.checked_add(hv)?)))
        .filter(|&(_, values)| values <= MAX_CHECKPOINT_VALUES)
        .ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "the encoder of its metadata (backbone widths {:?}, head widths {:?}) has \
                     more than {MAX_CHECKPOINT_VALUES} parameters and buffers (or their count \
                     overflows)",
                    backbone.widths, head.widths
                ),
            )
        })?;
    let stored = header
        .tensors()
        .values()
        .try_fold(0usize, |acc, info| {
            info.shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| acc.checked_add(n))
        })
        .ok_or_else(|| Error::format(path, "tensor element counts overflow"))?;
    if implied != (header.tensors().len(), stored) {
        return Err(Error::format(
            path,
            format!(
                "the encoder of its metadata (backbone widths {:?}, head widths {:?}) has {} \
                 tensors of {} values in all, but the file stores {} tensors of {stored} values",
                backbone.widths,
                head.widths,
                implied.0,
                implied.1,
                header.tensors().len()
            ),
        ));
    }
    let untrained = Encoder::new(&backbone, &head, seed)?;
    let mut encoder = untrained.clone();
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let expected = encoder.params().len() + encoder.buffers().len();
    if st.len() != expected {
        return Err(Error::format(
            path,
            format!(
                "{} tensors, but the encoder of its metadata has {expected}",
                st.len()
            ),
        ));
    }
    let read = |name: &str, shape: &[usize], dst: &mut Vec<f32>| -> Result<()> {
        let t = st
            .tensor(name)
            .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape || t.data().len() != 4 * dst.len() {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    };
    for p in encoder.params_mut() {
        read(&p.name, &p.shape, &mut p.value)?;
    }
    for b in encoder.buffers_mut() {
        read(&b.name, &b.shape, &mut b.value)?;
    }
    Ok(Checkpoint {
        encoder,
        untrained,
        metadata,
    })
}
