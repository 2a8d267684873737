//! MobileNetV3-Small (timm `mobilenetv3_small_100`, tensor names identical) as a feature
//! extractor with taps at strides 8, 16 and 32 (24, 40 and 576 channels; torchvision
//! `features[3]`, `[6]`, `[12]`).
//!
//! The architecture is the table [`SMALL_STAGES`], decoded by one builder (in the style of
//! candle-transformers' `mobilenetv4.rs` and timm's block strings).

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops::channel::channel_scale;
use crate::ops::fused::{Id, PlanBuilder};

use super::layers::{
    batch_norm, hard_sigmoid, Act, BatchNorm2d, Conv, ConvBnAct, ConvKind, KAIMING_NORMAL_FAN_OUT,
};

/// One block of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSpec {
    /// timm `DepthwiseSeparableConv`: dw k×k (stride) → BN → act → [SE] → pw 1×1 → BN.
    Ds {
        k: usize,
        stride: usize,
        out: usize,
        se: bool,
        act: Act,
    },
    /// timm `InvertedResidual`: pw expand → BN → act → dw → BN → act → [SE] → pw → BN (+ skip).
    Ir {
        k: usize,
        stride: usize,
        mid: usize,
        out: usize,
        se: bool,
        act: Act,
    },
    /// timm `ConvBnAct` 1×1 (`blocks.5.0`).
    Cba { out: usize, act: Act },
}

use Act::{HardSwish as HS, Relu as RE};
use BlockSpec::{Cba, Ds, Ir};

/// Stem: 3×3 stride 2 conv to 16 channels, BN, hard-swish.
pub const STEM_CHANNELS: usize = 16;

/// MobileNetV3-Small, one row per timm stage (`blocks.i`), one entry per block (`blocks.i.j`).
#[rustfmt::skip]
pub const SMALL_STAGES: &[&[BlockSpec]] = &[
    &[Ds { k: 3, stride: 2, out: 16, se: true, act: RE }],
    &[Ir { k: 3, stride: 2, mid: 72, out: 24, se: false, act: RE },
      Ir { k: 3, stride: 1, mid: 88, out: 24, se: false, act: RE }],
    &[Ir { k: 5, stride: 2, mid: 96, out: 40, se: true, act: HS },
      Ir { k: 5, stride: 1, mid: 240, out: 40, se: true, act: HS },
      Ir { k: 5, stride: 1, mid: 240, out: 40, se: true, act: HS }],
    &[Ir { k: 5, stride: 1, mid: 120, out: 48, se: true, act: HS },
      Ir { k: 5, stride: 1, mid: 144, out: 48, se: true, act: HS }],
    &[Ir { k: 5, stride: 2, mid: 288, out: 96, se: true, act: HS },
      Ir { k: 5, stride: 1, mid: 576, out: 96, se: true, act: HS },
      Ir { k: 5, stride: 1, mid: 576, out: 96, se: true, act: HS }],
    &[Cba { out: 576, act: HS }],
];

/// Stages after which a feature map is tapped (strides 8, 16, 32).
pub const TAP_STAGES: [usize; 3] = [1, 2, 5];

/// Channels of the three taps.
pub const TAP_CHANNELS: [usize; 3] = [24, 40, 576];

/// timm/torchvision `make_divisible(v, 8)`: round to a multiple of 8, never below 90 % of v.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0) / d).floor() * d).max(d) as usize;
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// Squeeze-excite as in timm: global mean → `conv_reduce` → ReLU → `conv_expand` →
/// hard-sigmoid gate; reduce width = `make_divisible(channels/4, 8)`.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    reduce: Conv,
    expand: Conv,
}

impl SqueezeExcite {
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let rd = make_divisible(c as f64 * 0.25, 8);
        let zero = Init::Const(0.0);
        let reduce = Conv::new(
            c,
            rd,
            1,
            1,
            ConvKind::Pointwise,
            true,
            KAIMING_NORMAL_FAN_OUT,
            zero,
            vb.pp("conv_reduce"),
        )?;
        let expand = Conv::new(
            rd,
            c,
            1,
            1,
            ConvKind::Pointwise,
            true,
            KAIMING_NORMAL_FAN_OUT,
            zero,
            vb.pp("conv_expand"),
        )?;
        Ok(Self { reduce, expand })
    }
}

impl SqueezeExcite {
    /// This SE block as a step of a fused plan.
    pub fn plan(&self, pb: &mut PlanBuilder, x: Id) -> Result<Id> {
        let (Some(br), Some(be)) = (self.reduce.bias(), self.expand.bias()) else {
            candle_core::bail!("squeeze-excite convs have biases")
        };
        pb.se(x, self.reduce.weight(), br, self.expand.weight(), be)
    }
}

impl Module for SqueezeExcite {
    /// `(B,C,H,W) -> (B,C,H,W)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let s = crate::ops::channel::relu(&self.reduce.forward(&s)?)?;
        let gate = hard_sigmoid(&self.expand.forward(&s)?)?;
        let (b, c, _, _) = x.dims4()?;
        // Fused per-plane scale: candle's broadcast_mul is slow on CPU.
        channel_scale(x, &gate.reshape((b, c))?)
    }
}

fn conv(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    kind: ConvKind,
    vb: VarBuilder,
) -> Result<Conv> {
    Conv::new(
        c_in,
        c_out,
        k,
        stride,
        kind,
        false,
        KAIMING_NORMAL_FAN_OUT,
        Init::Const(0.0),
        vb,
    )
}

fn pointwise_or_dense(k: usize) -> ConvKind {
    if k == 1 {
        ConvKind::Pointwise
    } else {
        ConvKind::Dense
    }
}

/// One built block (`blocks.i.j`).
#[derive(Debug, Clone)]
pub enum Block {
    Ds {
        conv_dw: Conv,
        bn1: BatchNorm2d,
        act: Act,
        se: Option<SqueezeExcite>,
        conv_pw: Conv,
        bn2: BatchNorm2d,
        skip: bool,
    },
    Ir {
        conv_pw: ConvBnAct,
        conv_dw: ConvBnAct,
        se: Option<SqueezeExcite>,
        conv_pwl: Conv,
        bn3: BatchNorm2d,
        skip: bool,
    },
    Cba(ConvBnAct),
}

impl Block {
    /// Build `spec` with `c_in` input channels; returns the block and its output channels.
    pub fn new(spec: BlockSpec, c_in: usize, vb: VarBuilder) -> Result<(Self, usize)> {
        Ok(match spec {
            BlockSpec::Ds {
                k,
                stride,
                out,
                se,
                act,
            } => {
                let block = Block::Ds {
                    conv_dw: conv(c_in, c_in, k, stride, ConvKind::Depthwise, vb.pp("conv_dw"))?,
                    bn1: batch_norm(c_in, vb.pp("bn1"))?,
                    act,
                    se: if se {
                        Some(SqueezeExcite::new(c_in, vb.pp("se"))?)
                    } else {
                        None
                    },
                    conv_pw: conv(c_in, out, 1, 1, ConvKind::Pointwise, vb.pp("conv_pw"))?,
                    bn2: batch_norm(out, vb.pp("bn2"))?,
                    skip: stride == 1 && c_in == out,
                };
                (block, out)
            }
            BlockSpec::Ir {
                k,
                stride,
                mid,
                out,
                se,
                act,
            } => {
                let conv_pw = ConvBnAct::new(
                    conv(c_in, mid, 1, 1, ConvKind::Pointwise, vb.pp("conv_pw"))?,
                    batch_norm(mid, vb.pp("bn1"))?,
                    act,
                );
                let conv_dw = ConvBnAct::new(
                    conv(mid, mid, k, stride, ConvKind::Depthwise, vb.pp("conv_dw"))?,
                    batch_norm(mid, vb.pp("bn2"))?,
                    act,
                );
                let block = Block::Ir {
                    conv_pw,
                    conv_dw,
                    se: if se {
                        Some(SqueezeExcite::new(mid, vb.pp("se"))?)
                    } else {
                        None
                    },
                    conv_pwl: conv(mid, out, 1, 1, ConvKind::Pointwise, vb.pp("conv_pwl"))?,
                    bn3: batch_norm(out, vb.pp("bn3"))?,
                    skip: stride == 1 && c_in == out,
                };
                (block, out)
            }
            BlockSpec::Cba { out, act } => {
                let block = Block::Cba(ConvBnAct::new(
                    conv(c_in, out, 1, 1, pointwise_or_dense(1), vb.pp("conv"))?,
                    batch_norm(out, vb.pp("bn1"))?,
                    act,
                ));
                (block, out)
            }
        })
    }
}

impl Block {
    /// This block as steps of a fused plan (the same computation as `forward_t`).
    pub fn plan(&self, pb: &mut PlanBuilder, x: Id, train: bool) -> Result<Id> {
        Ok(match self {
            Block::Ds {
                conv_dw,
                bn1,
                act,
                se,
                conv_pw,
                bn2,
                skip,
            } => {
                let y = conv_dw.plan(pb, x)?;
                let mut y = bn1.plan(pb, y, train, *act);
                if let Some(se) = se {
                    y = se.plan(pb, y)?;
                }
                let y = conv_pw.plan(pb, y)?;
                let y = bn2.plan(pb, y, train, Act::None);
                if *skip {
                    pb.add(y, x)
                } else {
                    y
                }
            }
            Block::Ir {
                conv_pw,
                conv_dw,
                se,
                conv_pwl,
                bn3,
                skip,
            } => {
                let y = conv_pw.plan(pb, x, train)?;
                let mut y = conv_dw.plan(pb, y, train)?;
                if let Some(se) = se {
                    y = se.plan(pb, y)?;
                }
                let y = conv_pwl.plan(pb, y)?;
                let y = bn3.plan(pb, y, train, Act::None);
                if *skip {
                    pb.add(y, x)
                } else {
                    y
                }
            }
            Block::Cba(cba) => cba.plan(pb, x, train)?,
        })
    }
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::Ds {
                conv_dw,
                bn1,
                act,
                se,
                conv_pw,
                bn2,
                skip,
            } => {
                let y = act.apply(&bn1.forward_t(&conv_dw.forward(x)?, train)?)?;
                let y = match se {
                    Some(se) => se.forward(&y)?,
                    None => y,
                };
                let y = bn2.forward_t(&conv_pw.forward(&y)?, train)?;
                if *skip {
                    y + x
                } else {
                    Ok(y)
                }
            }
            Block::Ir {
                conv_pw,
                conv_dw,
                se,
                conv_pwl,
                bn3,
                skip,
            } => {
                let y = conv_pw.forward_t(x, train)?;
                let y = conv_dw.forward_t(&y, train)?;
                let y = match se {
                    Some(se) => se.forward(&y)?,
                    None => y,
                };
                let y = bn3.forward_t(&conv_pwl.forward(&y)?, train)?;
                if *skip {
                    y + x
                } else {
                    Ok(y)
                }
            }
            Block::Cba(cba) => cba.forward_t(x, train),
        }
    }
}

/// The backbone: stem + `blocks`, returning the three taps.
#[derive(Debug, Clone)]
pub struct MobileNetV3 {
    stem: ConvBnAct,
    stages: Vec<Vec<Block>>,
}

impl MobileNetV3 {
    /// MobileNetV3-Small; `vb` is the backbone's root (e.g. `vb.pp("backbone")`).
    pub fn small(vb: VarBuilder) -> Result<Self> {
        Self::from_table(SMALL_STAGES, vb)
    }

    pub fn from_table(table: &[&[BlockSpec]], vb: VarBuilder) -> Result<Self> {
        // The stem is the only dense strided conv: see `Conv`'s note on parity.
        let stem = ConvBnAct::new(
            conv(3, STEM_CHANNELS, 3, 2, ConvKind::Dense, vb.pp("conv_stem"))?,
            batch_norm(STEM_CHANNELS, vb.pp("bn1"))?,
            Act::HardSwish,
        );
        let mut c = STEM_CHANNELS;
        let vb_blocks = vb.pp("blocks");
        let mut stages = Vec::with_capacity(table.len());
        for (i, row) in table.iter().enumerate() {
            let mut stage = Vec::with_capacity(row.len());
            for (j, spec) in row.iter().enumerate() {
                let (block, out) = Block::new(*spec, c, vb_blocks.pp(i).pp(j))?;
                stage.push(block);
                c = out;
            }
            stages.push(stage);
        }
        Ok(Self { stem, stages })
    }

    /// The backbone as steps of a fused plan from value `x`; returns the three taps.
    pub fn plan(&self, pb: &mut PlanBuilder, x: Id, train: bool) -> Result<Vec<Id>> {
        let mut y = self.stem.plan(pb, x, train)?;
        let mut taps = Vec::with_capacity(TAP_STAGES.len());
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                y = block.plan(pb, y, train)?;
            }
            if TAP_STAGES.contains(&i) {
                taps.push(y);
            }
        }
        Ok(taps)
    }

    /// `(B,3,H,W)` -> `[(B,24,H/8,W/8), (B,40,H/16,W/16), (B,576,H/32,W/32)]`.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut y = self.stem.forward_t(x, train)?;
        let mut taps = Vec::with_capacity(TAP_STAGES.len());
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                y = block.forward_t(&y, train)?;
            }
            if TAP_STAGES.contains(&i) {
                taps.push(y.clone());
            }
        }
        Ok(taps)
    }
}
