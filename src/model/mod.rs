//! The model: MobileNetV3-Small backbone (timm tensor names) -> FPN (128 ch, torchvision
//! layout + extra max-pool level) -> one two-layer head on the stride-8 map whose output
//! channels are split into segmentation, detection and classification outputs.

pub mod detect;
pub mod fpn;
pub mod info;
pub mod init;
pub mod layers;
pub mod mobilenetv3;
pub mod weights;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use fpn::Fpn;
pub use info::{count_params, info_report, InfoReport, ParamCounts};
pub use mobilenetv3::MobileNetV3;
pub use weights::{load_backbone, resolve, LoadReport, WeightsSpec};

use crate::ops;
use layers::{torch_default_init, Conv, ConvKind};

/// Stride of the map the unified head runs on.
pub const OUTPUT_STRIDE: usize = 8;

/// Class counts per task and neck width; class counts come from the datasets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneHeadConfig {
    pub fpn_channels: usize,
    pub seg_classes: usize,
    pub det_classes: usize,
    pub cls_classes: usize,
}

impl OneHeadConfig {
    /// Output channels of the head's last 1x1 conv: `seg + (5 + det) + cls`, in that order.
    pub fn head_out_channels(&self) -> usize {
        self.seg_classes + 5 + self.det_classes + self.cls_classes
    }
}

/// The three outputs of one forward pass.
#[derive(Debug, Clone)]
pub struct HeadOutputs {
    /// `(B, seg_classes, H/8, W/8)` logits.
    pub seg: Tensor,
    /// `(B, N, 5 + det_classes)` raw outputs per grid cell, N = (H/8)·(W/8) row-major;
    /// channels `tx, ty, tw, th, objectness, class logits…` (see [`detect`]).
    pub det: Tensor,
    /// `(B, cls_classes)` logits (global average pool of the class channels).
    pub cls: Tensor,
    /// `(H/8, W/8)`.
    pub grid: (usize, usize),
}

impl Default for OneHeadConfig {
    /// The report's configuration: FPN 128, VOC 21, mini-COCO 10, Imagenette 10.
    fn default() -> Self {
        Self {
            fpn_channels: 128,
            seg_classes: 21,
            det_classes: 10,
            cls_classes: 10,
        }
    }
}

/// Inputs must have H and W multiples of this (the backbone's output stride).
pub const INPUT_MULTIPLE: usize = 32;

/// The unified head: `Conv3x3(C->C, bias) -> ReLU -> Conv1x1(C -> head_out_channels, bias)`.
#[derive(Debug, Clone)]
pub struct UnifiedHead {
    conv: Conv,
    out: Conv,
}

impl UnifiedHead {
    /// `vb` is the head's root (`head.conv.*`, `head.out.*`); PyTorch's default conv init.
    pub fn new(cfg: &OneHeadConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.fpn_channels;
        let init3 = torch_default_init(c * 9);
        let init1 = torch_default_init(c);
        Ok(Self {
            conv: Conv::new(
                c,
                c,
                3,
                1,
                ConvKind::Dense,
                true,
                init3,
                init3,
                vb.pp("conv"),
            )?,
            out: Conv::new(
                c,
                cfg.head_out_channels(),
                1,
                1,
                ConvKind::Pointwise,
                true,
                init1,
                init1,
                vb.pp("out"),
            )?,
        })
    }
}

impl UnifiedHead {
    /// The head as steps of a fused plan.
    pub fn plan(
        &self,
        pb: &mut ops::fused::PlanBuilder,
        x: ops::fused::Id,
    ) -> Result<ops::fused::Id> {
        let y = self.conv.plan(pb, x)?;
        let y = pb.act(y, ops::fused::Act::Relu);
        self.out.plan(pb, y)
    }
}

impl Module for UnifiedHead {
    /// `(B, C, h, w) -> (B, head_out_channels, h, w)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&ops::channel::relu(&self.conv.forward(x)?)?)
    }
}

/// MobileNetV3-Small (`backbone.`) -> FPN (`fpn.`) -> unified head (`head.`).
#[derive(Debug, Clone)]
pub struct OneHead {
    cfg: OneHeadConfig,
    backbone: MobileNetV3,
    fpn: Fpn,
    head: UnifiedHead,
}

impl OneHead {
    /// Build with `vb` at the model root; variables are created in the VarMap behind `vb`
    /// (random init as torchvision) and can then be overwritten by [`load_backbone`].
    pub fn new(cfg: &OneHeadConfig, vb: VarBuilder) -> Result<Self> {
        let backbone = MobileNetV3::small(vb.pp("backbone"))?;
        let fpn = Fpn::new(&mobilenetv3::TAP_CHANNELS, cfg.fpn_channels, vb.pp("fpn"))?;
        let head = UnifiedHead::new(cfg, vb.pp("head"))?;
        Ok(Self {
            cfg: cfg.clone(),
            backbone,
            fpn,
            head,
        })
    }

    pub fn config(&self) -> &OneHeadConfig {
        &self.cfg
    }

    /// `x (B,3,H,W)`, H and W multiples of 32 -> the three outputs. `train` switches
    /// BatchNorm to batch statistics (and updates the running ones).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<HeadOutputs> {
        self.forward_parts(x, train, train)
    }

    /// As [`OneHead::forward_t`] with separate modes: `backbone_train = false` freezes the
    /// backbone's BatchNorm statistics while the rest trains. (Neck and head have no
    /// BatchNorm or dropout today; `head_train` is kept for when they do.)
    pub fn forward_parts(
        &self,
        x: &Tensor,
        backbone_train: bool,
        head_train: bool,
    ) -> Result<HeadOutputs> {
        let _ = head_train;
        let (_, c, h, w) = x.dims4()?;
        // Multiples of 32 keep every level exactly half the previous one (FPN sums) and keep
        // H and W of equal parity for the stride-2 dense stem conv, whose candle backward
        // fails otherwise (shared/CANDLE_NOTES.md).
        if c != 3 || h % INPUT_MULTIPLE != 0 || w % INPUT_MULTIPLE != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "onehead: input must be (B, 3, H, W) with H and W positive multiples of {INPUT_MULTIPLE}, got {:?}; resize or pad the images",
                x.dims()
            )
        }
        if ops::fused::enabled() && ops::fused::supported(x) {
            // CPU: the whole network as one fused op (ops::fused), same computation.
            let mut pb = ops::fused::PlanBuilder::new();
            let input = pb.input();
            let taps = self.backbone.plan(&mut pb, input, backbone_train)?;
            let level0 = self.fpn.plan_finest(&mut pb, &taps)?;
            let y = self.head.plan(&mut pb, level0)?;
            let y = pb.finish(y).run(x, backbone_train || head_train)?;
            return split_head(&self.cfg, &y);
        }
        let taps = self.backbone.forward_features(x, backbone_train)?;
        let levels = self.fpn.forward(&taps)?;
        let y = self.head.forward(&levels[0])?;
        split_head(&self.cfg, &y)
    }
}

/// Split the head's `(B, seg + 5 + det + cls, h, w)` output into [`HeadOutputs`].
pub fn split_head(cfg: &OneHeadConfig, y: &Tensor) -> Result<HeadOutputs> {
    let (b, ch, h, w) = y.dims4()?;
    if ch != cfg.head_out_channels() {
        candle_core::bail!(
            "head output has {ch} channels, config wants {}",
            cfg.head_out_channels()
        )
    }
    let nd = 5 + cfg.det_classes;
    let seg = y.narrow(1, 0, cfg.seg_classes)?;
    let det = y
        .narrow(1, cfg.seg_classes, nd)?
        .reshape((b, nd, h * w))?
        .transpose(1, 2)?
        .contiguous()?;
    let cls = y
        .narrow(1, cfg.seg_classes + nd, cfg.cls_classes)?
        .mean_keepdim(3)?
        .mean_keepdim(2)?
        .reshape((b, cfg.cls_classes))?;
    Ok(HeadOutputs {
        seg,
        det,
        cls,
        grid: (h, w),
    })
}
