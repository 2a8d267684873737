//! Task metrics as pure functions of predictions and targets: mIoU (confusion matrix),
//! COCO-style mAP, Top-k accuracy, the forgetting summaries of a task × stage matrix, the
//! per-image scores the metrics are computed from and bootstrap intervals over them.
//! They import no model or training code.

pub mod bootstrap;
pub mod coco;
pub mod forgetting;
pub mod map;
pub mod miou;
pub mod per_image;
pub mod topk;

pub use map::{MapEvaluator, MapSummary};
pub use miou::{argmax_masks, ConfusionMatrix};
pub use per_image::PerImage;
pub use topk::TopK;

/// Invalid input to a metric accumulator (wrong lengths, labels out of range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    #[error("length mismatch: {what}: {left} vs {right}")]
    LengthMismatch {
        what: &'static str,
        left: usize,
        right: usize,
    },
    #[error("{what} value {value} out of range for {num_classes} classes")]
    OutOfRange {
        what: &'static str,
        value: usize,
        num_classes: usize,
    },
}
