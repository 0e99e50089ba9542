//! The contrastive encoder: a backbone whose features are kept for evaluation, and a projection
//! head whose output feeds the loss (SimCLR found the loss is best applied after the head while
//! the representation before it transfers better).

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::nn::{Buffer, Mat, Mlp, MlpSpec, Module, Param};
use crate::{Error, Result};

/// Backbone MLP followed by a projection-head MLP. Parameter and buffer names are prefixed with
/// `backbone.` and `head.`.
#[derive(Clone, Debug)]
pub struct Encoder {
    pub backbone: Mlp,
    pub head: Mlp,
}

impl Encoder {
    /// Builds both networks from one `StdRng` seeded with `seed`; the head's input width must
    /// equal the backbone's output width.
    pub fn new(backbone: &MlpSpec, head: &MlpSpec, seed: u64) -> Result<Self> {
        let (b_out, h_in) = (backbone.widths.last(), head.widths.first());
        if b_out != h_in {
            return Err(Error::invalid(
                "Encoder::new",
                "head",
                format!("input width {h_in:?} differs from the backbone's output width {b_out:?}"),
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut backbone = Mlp::from_rng(backbone, &mut rng)?;
        let mut head = Mlp::from_rng(head, &mut rng)?;
        backbone.set_name_prefix("backbone.");
        head.set_name_prefix("head.");
        Ok(Encoder { backbone, head })
    }

    /// `backbone` plus SimCLR's `Linear - BN - ReLU - Linear` head of width `hidden` -> `out`.
    pub fn simclr(backbone: &MlpSpec, hidden: usize, out: usize, seed: u64) -> Result<Self> {
        let feat = backbone.widths.last().copied().unwrap_or(0);
        Encoder::new(backbone, &MlpSpec::simclr_head(feat, hidden, out), seed)
    }

    /// `backbone` plus MoCo v2's `Linear - ReLU - Linear` head of width `hidden` -> `out`.
    pub fn moco_v2(backbone: &MlpSpec, hidden: usize, out: usize, seed: u64) -> Result<Self> {
        let feat = backbone.widths.last().copied().unwrap_or(0);
        Encoder::new(backbone, &MlpSpec::moco_v2_head(feat, hidden, out), seed)
    }

    pub fn in_features(&self) -> usize {
        self.backbone.in_features()
    }

    /// Width of the representation returned by `features`.
    pub fn feature_dim(&self) -> usize {
        self.backbone.out_features()
    }

    /// Width of the projection returned by `forward`.
    pub fn out_dim(&self) -> usize {
        self.head.out_features()
    }

    /// The projection `head(backbone(x))`, caching for `backward`; `train` selects batch or
    /// running BatchNorm statistics (and is remembered, see `set_train`).
    pub fn forward(&mut self, x: &Mat, train: bool) -> Result<Mat> {
        let h = self.backbone.forward(x, train)?;
        self.head.forward(&h, train)
    }

    /// Backpropagates `dL/dprojection` through head and backbone; returns `dL/dx`.
    pub fn backward(&mut self, grad_out: &Mat) -> Result<Mat> {
        let g = self.head.backward(grad_out)?;
        self.backbone.backward(&g)
    }

    /// [`backward`](Self::backward) for the parameter gradients only (what training needs):
    /// the input gradient of the first layer is not computed.
    pub fn backward_params(&mut self, grad_out: &Mat) -> Result<()> {
        let g = self.head.backward(grad_out)?;
        self.backbone.backward_params(&g)
    }

    /// The backbone's representation in eval mode (running statistics), caching nothing: what
    /// kNN and linear-probe evaluation use.
    pub fn features(&self, x: &Mat) -> Result<Mat> {
        self.backbone.infer(x)
    }

    /// The projection in eval mode, caching nothing.
    pub fn infer(&self, x: &Mat) -> Result<Mat> {
        self.head.infer(&self.backbone.infer(x)?)
    }

    pub fn set_train(&mut self, train: bool) {
        self.backbone.set_train(train);
        self.head.set_train(train);
    }

    /// Backbone parameters, then head parameters.
    pub fn params(&self) -> Vec<&Param> {
        let mut p = self.backbone.params();
        p.extend(self.head.params());
        p
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut p = self.backbone.params_mut();
        p.extend(self.head.params_mut());
        p
    }

    /// Backbone buffers, then head buffers.
    pub fn buffers(&self) -> Vec<&Buffer> {
        let mut b = self.backbone.buffers();
        b.extend(self.head.buffers());
        b
    }

    pub fn buffers_mut(&mut self) -> Vec<&mut Buffer> {
        let mut b = self.backbone.buffers_mut();
        b.extend(self.head.buffers_mut());
        b
    }
}

impl Module for Encoder {
    fn params(&self) -> Vec<&Param> {
        Encoder::params(self)
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        Encoder::params_mut(self)
    }

    fn buffers(&self) -> Vec<&Buffer> {
        Encoder::buffers(self)
    }

    fn buffers_mut(&mut self) -> Vec<&mut Buffer> {
        Encoder::buffers_mut(self)
    }
}
