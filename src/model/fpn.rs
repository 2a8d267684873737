//! Feature Pyramid Network with torchvision's layout (`inner_blocks.i.0`, `layer_blocks.i.0`)
//! and its `LastLevelMaxPool` extra level.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::{Conv, ConvKind, KAIMING_UNIFORM_A1};
use crate::ops::fused::{Id, PlanBuilder};
use crate::ops::{subsample2, upsample_nearest2x};

/// Whether a variable belongs to an FPN output level the unified head never reads (every
/// `layer_blocks` conv but the finest): counted in the model's size, absent from its forward.
pub fn feeds_nothing(name: &str) -> bool {
    name.starts_with("fpn.layer_blocks.") && !name.starts_with("fpn.layer_blocks.0.")
}

/// torchvision `FeaturePyramidNetwork(in_channels_list, out_channels, LastLevelMaxPool())`.
#[derive(Debug, Clone)]
pub struct Fpn {
    /// 1×1 laterals (with bias) to `out_channels`.
    inner: Vec<Conv>,
    /// 3×3 output convs (with bias).
    layer: Vec<Conv>,
}

impl Fpn {
    /// `vb` is the neck's root (e.g. `vb.pp("fpn")`). Init as torchvision: `kaiming_uniform_(a=1)`,
    /// zero bias.
    pub fn new(in_channels: &[usize], out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let zero = Init::Const(0.0);
        let mut inner = Vec::with_capacity(in_channels.len());
        let mut layer = Vec::with_capacity(in_channels.len());
        for (i, &c) in in_channels.iter().enumerate() {
            inner.push(Conv::new(
                c,
                out_channels,
                1,
                1,
                ConvKind::Pointwise,
                true,
                KAIMING_UNIFORM_A1,
                zero,
                vb.pp("inner_blocks").pp(i).pp(0),
            )?);
            layer.push(Conv::new(
                out_channels,
                out_channels,
                3,
                1,
                ConvKind::Dense,
                true,
                KAIMING_UNIFORM_A1,
                zero,
                vb.pp("layer_blocks").pp(i).pp(0),
            )?);
        }
        Ok(Self { inner, layer })
    }

    /// The finest output level only (`layer_blocks.0` over the full top-down path): what the
    /// unified head reads. Same values as `forward(feats)[0]`, without the coarser levels'
    /// 3×3 convolutions and the max-pool level.
    pub fn forward_finest(&self, feats: &[Tensor]) -> Result<Tensor> {
        let n = self.inner.len();
        if feats.len() != n {
            candle_core::bail!("fpn: expected {n} feature maps, got {}", feats.len())
        }
        let mut last_inner = self.inner[n - 1].forward(&feats[n - 1])?;
        for i in (0..n - 1).rev() {
            last_inner = self.merge(i, &feats[i], &last_inner)?;
        }
        self.layer[0].forward(&last_inner)
    }

    /// Lateral of level `i` plus the ×2 upsampled level above it.
    fn merge(&self, i: usize, feat: &Tensor, above: &Tensor) -> Result<Tensor> {
        let lateral = self.inner[i].forward(feat)?;
        // torchvision interpolates to the lateral's size with mode "nearest"; the sizes
        // are exactly ×2 here, and the reshape-based upsample has a correct gradient.
        let top_down = upsample_nearest2x(above)?;
        if top_down.dims() != lateral.dims() {
            candle_core::bail!(
                "fpn: level {i} is {:?} but the upsampled level above is {:?} (input size must be a multiple of 32)",
                lateral.dims(),
                top_down.dims()
            )
        }
        lateral + top_down
    }

    /// The finest output level (the only one the head reads) as steps of a fused plan, from
    /// the backbone taps (finest first). The coarser output convs and the max-pool level
    /// feed nothing and are not computed.
    pub fn plan_finest(&self, pb: &mut PlanBuilder, taps: &[Id]) -> Result<Id> {
        let n = self.inner.len();
        if taps.len() != n {
            candle_core::bail!("fpn: expected {n} feature maps, got {}", taps.len())
        }
        let mut last_inner = self.inner[n - 1].plan(pb, taps[n - 1])?;
        for i in (0..n - 1).rev() {
            let lateral = self.inner[i].plan(pb, taps[i])?;
            last_inner = pb.up2_add(last_inner, lateral);
        }
        self.layer[0].plan(pb, last_inner)
    }

    /// Features finest first, each level exactly half the size of the previous one (inputs
    /// that are multiples of 32 guarantee it) -> `levels + 1` maps of `out_channels`, finest
    /// first; the last one is the extra max-pool level (kernel 1, stride 2 on the coarsest output).
    pub fn forward(&self, feats: &[Tensor]) -> Result<Vec<Tensor>> {
        let n = self.inner.len();
        if feats.len() != n {
            candle_core::bail!("fpn: expected {n} feature maps, got {}", feats.len())
        }
        let mut last_inner = self.inner[n - 1].forward(&feats[n - 1])?;
        let mut results = vec![self.layer[n - 1].forward(&last_inner)?];
        for i in (0..n - 1).rev() {
            last_inner = self.merge(i, &feats[i], &last_inner)?;
            results.insert(0, self.layer[i].forward(&last_inner)?);
        }
        let extra = subsample2(&results[n - 1])?;
        results.push(extra);
        Ok(results)
    }
}
