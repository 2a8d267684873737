//! Loading one task's split from disk into memory and building batches.

use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::{Batch, Split};
use crate::TaskKind;

/// One split of one task's dataset, decoded and resized once (300 small images fit easily
/// in memory as `u8`), normalised to f32 only when a batch is built.
pub struct TaskDataset {
    pub task: TaskKind,
    pub split: Split,
    /// Class names in index order (COCO: category names in sorted-id order; folders: sorted).
    pub class_names: Vec<String>,
    /// Square side of the model input in pixels.
    pub image_size: usize,
}

impl TaskDataset {
    /// Open `root/<task dir>/<split>` and decode every image (in parallel).
    pub fn open(_task: TaskKind, _root: &Path, _split: Split, _image_size: usize) -> Result<Self> {
        anyhow::bail!("TaskDataset::open is not implemented yet")
    }

    pub fn len(&self) -> usize {
        0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Build a batch from sample indices; `flips[i]` mirrors sample i horizontally
    /// (image, mask and boxes alike). Flip decisions come from the caller's seeded RNG so
    /// that the data path itself is deterministic.
    pub fn batch(&self, _indices: &[usize], _flips: &[bool], _device: &Device) -> Result<Batch> {
        anyhow::bail!("TaskDataset::batch is not implemented yet")
    }
}

/// `(B, S, S)` u32 tensor of segmentation masks (255 stays 255) for a segmentation batch.
pub fn seg_masks(_batch: &Batch, _device: &Device) -> Result<Tensor> {
    anyhow::bail!("seg_masks is not implemented yet")
}
