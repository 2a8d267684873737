//! Datasets: the three on-disk formats (VOC-style segmentation, COCO-style detection,
//! class-folder classification), the built-in synthetic benchmark written in those same
//! formats, `prepare` for the real course sets, and batching.
//!
//! Layout under a data root (identical for the synthetic benchmark and the real sets):
//! ```text
//! ROOT/mini_voc_seg/{train,val}/<stem>.jpg + <stem>.png   (palette PNG, ids 0..C-1, 255 = ignore)
//! ROOT/mini_coco_det/{train,val}/<file_name>              (images)
//! ROOT/mini_coco_det/annotations/instances_{train,val}.json
//! ROOT/imagenette_160/{train,val}/<class-folder>/*.JPEG
//! ```

use candle_core::Tensor;

use crate::TaskKind;

/// Folder names of the three datasets under a data root.
pub const SEG_DIR: &str = "mini_voc_seg";
pub const DET_DIR: &str = "mini_coco_det";
pub const CLS_DIR: &str = "imagenette_160";

/// ImageNet normalisation (the pretrained backbone expects it).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Mask value meaning "ignore this pixel" (VOC convention).
pub const IGNORE_INDEX: u8 = 255;

/// Which split of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// One ground-truth box in the *resized* image's pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetBox {
    /// `[x0, y0, x1, y1]`, x to the right, y down, in pixels of the resized (model input) image.
    pub bbox: [f32; 4],
    /// Contiguous class index `0..num_classes` (COCO category ids are remapped).
    pub class: usize,
    /// COCO `iscrowd` flag: crowd boxes are ignored by the metric, not counted as misses.
    pub crowd: bool,
}

/// The label of one sample, already transformed like its image (resize, flip).
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `H*W` class ids, row-major, at the model input size; `IGNORE_INDEX` = ignore.
    Seg(Vec<u8>),
    /// Boxes of one image.
    Det(Vec<DetBox>),
    /// Class index.
    Cls(usize),
}

/// A batch of one task's samples.
#[derive(Debug, Clone)]
pub struct Batch {
    pub task: TaskKind,
    /// `(B, 3, S, S)` f32, ImageNet-normalised.
    pub images: Tensor,
    /// One target per image, in batch order.
    pub targets: Vec<Target>,
}

pub use crate::data::dataset::TaskDataset;

pub mod dataset;
