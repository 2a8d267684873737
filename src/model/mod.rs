//! The model: MobileNetV3-Small backbone (timm tensor names) -> FPN (128 ch, torchvision
//! layout + extra max-pool level) -> one two-layer head on the stride-8 map whose output
//! channels are split into segmentation, detection and classification outputs.

pub mod detect;
pub mod init;

use candle_core::Tensor;

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
