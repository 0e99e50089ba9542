//! Multi-layer perceptrons: a `Sequential` of linear, BatchNorm and ReLU layers.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nn::{BatchNorm1d, Buffer, Linear, Mat, Module, Param, Relu};
use crate::{Error, Result};

/// One layer of an [`Mlp`].
#[derive(Clone, Debug)]
pub enum Layer {
    Linear(Linear),
    BatchNorm(BatchNorm1d),
    Relu(Relu),
}

impl Layer {
    /// Train-mode-aware forward pass that caches what `backward` needs.
    pub fn forward(&mut self, x: &Mat) -> Result<Mat> {
        match self {
            Layer::Linear(l) => l.forward(x),
            Layer::BatchNorm(l) => l.forward(x),
            Layer::Relu(l) => l.forward(x),
        }
    }

    /// Eval-mode forward pass that caches nothing.
    pub fn infer(&self, x: &Mat) -> Result<Mat> {
        match self {
            Layer::Linear(l) => l.infer(x),
            Layer::BatchNorm(l) => l.infer(x),
            Layer::Relu(_) => Relu::infer(x),
        }
    }

    pub fn backward(&mut self, grad_out: &Mat) -> Result<Mat> {
        match self {
            Layer::Linear(l) => l.backward(grad_out),
            Layer::BatchNorm(l) => l.backward(grad_out),
            Layer::Relu(l) => l.backward(grad_out),
        }
    }

    pub fn params(&self) -> Vec<&Param> {
        match self {
            Layer::Linear(l) => l.params(),
            Layer::BatchNorm(l) => l.params(),
            Layer::Relu(_) => Vec::new(),
        }
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        match self {
            Layer::Linear(l) => l.params_mut(),
            Layer::BatchNorm(l) => l.params_mut(),
            Layer::Relu(_) => Vec::new(),
        }
    }

    pub fn buffers(&self) -> Vec<&Buffer> {
        match self {
            Layer::BatchNorm(l) => l.buffers(),
            _ => Vec::new(),
        }
    }

    pub fn buffers_mut(&mut self) -> Vec<&mut Buffer> {
        match self {
            Layer::BatchNorm(l) => l.buffers_mut(),
            _ => Vec::new(),
        }
    }
}

/// Which normalisation follows a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    None,
    /// BatchNorm1d with a learnable scale and shift.
    BatchNorm,
    /// BatchNorm1d without affine parameters (e.g. a SimCLR v2 / BYOL-style output BN).
    BatchNormNoAffine,
}

impl Norm {
    fn layer(self, width: usize) -> Result<Option<BatchNorm1d>> {
        match self {
            Norm::None => Ok(None),
            Norm::BatchNorm => BatchNorm1d::new(width, true).map(Some),
            Norm::BatchNormNoAffine => BatchNorm1d::new(width, false).map(Some),
        }
    }
}

/// The architecture of an [`Mlp`]: `Linear [Norm] ReLU` for each hidden width, then
/// `Linear [Norm] [ReLU]` for the output.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpSpec {
    /// `[in, hidden_1, ..., out]`: at least two entries, all positive.
    pub widths: Vec<usize>,
    pub hidden_norm: Norm,
    /// Bias of the hidden linear layers (redundant before a BatchNorm).
    pub hidden_bias: bool,
    pub output_norm: Norm,
    pub output_bias: bool,
    /// A ReLU after the output (a backbone's features, like a ResNet's pooled output).
    pub output_relu: bool,
}

impl MlpSpec {
    /// A plain MLP: biases everywhere, no BatchNorm, linear output.
    pub fn new(widths: &[usize]) -> Self {
        MlpSpec {
            widths: widths.to_vec(),
            hidden_norm: Norm::None,
            hidden_bias: true,
            output_norm: Norm::None,
            output_bias: true,
            output_relu: false,
        }
    }

    /// A backbone: every layer `Linear (no bias) - BatchNorm - ReLU`, so its features are
    /// non-negative and normalised like a ResNet's.
    pub fn backbone(widths: &[usize]) -> Self {
        MlpSpec {
            widths: widths.to_vec(),
            hidden_norm: Norm::BatchNorm,
            hidden_bias: false,
            output_norm: Norm::BatchNorm,
            output_bias: false,
            output_relu: true,
        }
    }

    /// SimCLR v1's projection head `Linear - BN - ReLU - Linear` (the hidden linear has no
    /// bias, since the BatchNorm would cancel it).
    pub fn simclr_head(in_features: usize, hidden: usize, out: usize) -> Self {
        MlpSpec {
            widths: vec![in_features, hidden, out],
            hidden_norm: Norm::BatchNorm,
            hidden_bias: false,
            output_norm: Norm::None,
            output_bias: true,
            output_relu: false,
        }
    }

    /// MoCo v2's projection head `Linear - ReLU - Linear`, with biases.
    pub fn moco_v2_head(in_features: usize, hidden: usize, out: usize) -> Self {
        MlpSpec::new(&[in_features, hidden, out])
    }

    fn validate(&self) -> Result<()> {
        if self.widths.len() < 2 {
            return Err(Error::invalid(
                "Mlp::new",
                "widths",
                format!(
                    "needs at least [in, out], got {:?} ({} entries)",
                    self.widths,
                    self.widths.len()
                ),
            ));
        }
        if self.widths.contains(&0) {
            return Err(Error::invalid(
                "Mlp::new",
                "widths",
                format!("must all be positive, got {:?}", self.widths),
            ));
        }
        Ok(())
    }
}

/// A sequential stack of layers with PyTorch-style parameter names (`0.weight`, `1.bias`,
/// `1.running_mean`, ...).
#[derive(Clone, Debug)]
pub struct Mlp {
    spec: MlpSpec,
    layers: Vec<Layer>,
}

impl Mlp {
    /// Builds `spec` with weights drawn from a `StdRng` seeded with `seed` (reproducible).
    pub fn new(spec: &MlpSpec, seed: u64) -> Result<Self> {
        Mlp::from_rng(spec, &mut StdRng::seed_from_u64(seed))
    }

    /// Builds `spec` with weights drawn from `rng`.
    pub fn from_rng<R: Rng + ?Sized>(spec: &MlpSpec, rng: &mut R) -> Result<Self> {
        spec.validate()?;
        let mut layers = Vec::new();
        let last = spec.widths.len() - 2;
        for (i, pair) in spec.widths.windows(2).enumerate() {
            let (bias, norm, relu) = if i == last {
                (spec.output_bias, spec.output_norm, spec.output_relu)
            } else {
                (spec.hidden_bias, spec.hidden_norm, true)
            };
            layers.push(Layer::Linear(Linear::new(pair[0], pair[1], bias, rng)?));
            if let Some(bn) = norm.layer(pair[1])? {
                layers.push(Layer::BatchNorm(bn));
            }
            if relu {
                layers.push(Layer::Relu(Relu::new()));
            }
        }
        let mut mlp = Mlp {
            spec: spec.clone(),
            layers,
        };
        mlp.set_name_prefix("");
        Ok(mlp)
    }

    /// Names every parameter and buffer `{prefix}{layer index}.{field}`.
    pub(crate) fn set_name_prefix(&mut self, prefix: &str) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            match layer {
                Layer::Linear(l) => {
                    l.weight.name = format!("{prefix}{i}.weight");
                    if let Some(b) = &mut l.bias {
                        b.name = format!("{prefix}{i}.bias");
                    }
                }
                Layer::BatchNorm(l) => {
                    if let Some(w) = &mut l.weight {
                        w.name = format!("{prefix}{i}.weight");
                    }
                    if let Some(b) = &mut l.bias {
                        b.name = format!("{prefix}{i}.bias");
                    }
                    l.running_mean.name = format!("{prefix}{i}.running_mean");
                    l.running_var.name = format!("{prefix}{i}.running_var");
                }
                Layer::Relu(_) => {}
            }
        }
    }

    pub fn spec(&self) -> &MlpSpec {
        &self.spec
    }

    pub fn in_features(&self) -> usize {
        self.spec.widths[0]
    }

    pub fn out_features(&self) -> usize {
        self.spec.widths[self.spec.widths.len() - 1]
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The layers, to edit their parameters (the list itself is fixed).
    pub fn layers_mut(&mut self) -> &mut [Layer] {
        &mut self.layers
    }

    /// Puts every BatchNorm in train mode (batch statistics) or eval mode (running ones).
    pub fn set_train(&mut self, train: bool) {
        for layer in &mut self.layers {
            if let Layer::BatchNorm(bn) = layer {
                bn.set_train(train);
            }
        }
    }

    /// Runs `x` (`batch x in`) through every layer after `set_train(train)`, caching what
    /// `backward` needs. Train mode updates BatchNorm running statistics.
    pub fn forward(&mut self, x: &Mat, train: bool) -> Result<Mat> {
        self.set_train(train);
        self.layers
            .iter_mut()
            .try_fold(x.clone(), |h, layer| layer.forward(&h))
    }

    /// The eval-mode forward pass (running statistics), caching nothing: for evaluation.
    pub fn infer(&self, x: &Mat) -> Result<Mat> {
        self.layers
            .iter()
            .try_fold(x.clone(), |h, layer| layer.infer(&h))
    }

    /// Backpropagates `dL/dout` through the last forward pass: adds to every parameter's
    /// gradient and returns `dL/dx`.
    pub fn backward(&mut self, grad_out: &Mat) -> Result<Mat> {
        self.layers
            .iter_mut()
            .rev()
            .try_fold(grad_out.clone(), |g, layer| layer.backward(&g))
    }

    /// [`backward`](Self::backward) for the parameter gradients only: the first layer, when it is
    /// linear, skips `dL/dx` (a GEMM as large as its weight gradient) that a trainer discards.
    pub fn backward_params(&mut self, grad_out: &Mat) -> Result<()> {
        let Some((first, rest)) = self.layers.split_first_mut() else {
            return Ok(());
        };
        let g = rest
            .iter_mut()
            .rev()
            .try_fold(grad_out.clone(), |g, layer| layer.backward(&g))?;
        match first {
            Layer::Linear(l) => l.backward_with(&g, false).map(drop),
            other => other.backward(&g).map(drop),
        }
    }

    /// Parameters in layer order (weight before bias), like PyTorch's `parameters()`.
    pub fn params(&self) -> Vec<&Param> {
        self.layers.iter().flat_map(Layer::params).collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        self.layers.iter_mut().flat_map(Layer::params_mut).collect()
    }

    /// BatchNorm running statistics in layer order (mean before var).
    pub fn buffers(&self) -> Vec<&Buffer> {
        self.layers.iter().flat_map(Layer::buffers).collect()
    }

    pub fn buffers_mut(&mut self) -> Vec<&mut Buffer> {
        self.layers
            .iter_mut()
            .flat_map(Layer::buffers_mut)
            .collect()
    }
}

impl Module for Mlp {
    fn params(&self) -> Vec<&Param> {
        Mlp::params(self)
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        Mlp::params_mut(self)
    }

    fn buffers(&self) -> Vec<&Buffer> {
        Mlp::buffers(self)
    }

    fn buffers_mut(&mut self) -> Vec<&mut Buffer> {
        Mlp::buffers_mut(self)
    }
}
