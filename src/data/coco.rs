//! The subset of the COCO JSON format onehead reads and writes (unknown fields are ignored
//! on reading, so the full COCO 2017 annotation files parse too).

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One entry of `images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
}

/// One entry of `annotations` (no `segmentation`: onehead's detection sets are box-only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoAnnotation {
    pub id: u64,
    pub image_id: u64,
    /// A COCO category id (as listed in `categories`, not a contiguous index).
    pub category_id: u64,
    /// `[x, y, width, height]` in pixels, top-left origin.
    pub bbox: [f64; 4],
    /// Object area in pixels² (COCO: of the segmentation; synth: visible pixels).
    #[serde(default)]
    pub area: f64,
    #[serde(default)]
    pub iscrowd: u8,
}

/// One entry of `categories`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub supercategory: String,
}

/// A COCO instances file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoFile {
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    pub categories: Vec<CocoCategory>,
}

impl CocoFile {
    /// Parse a COCO instances JSON file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing COCO JSON {}", path.display()))
    }

    /// Write as pretty JSON (field order fixed by the structs, so output is deterministic).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }
}

/// The 10 chosen categories ([`super::COCO_CATEGORIES`]) as COCO `categories` entries.
pub fn chosen_categories() -> Vec<CocoCategory> {
    super::COCO_CATEGORIES
        .iter()
        .map(|&(id, name, _)| CocoCategory {
            id: id as u64,
            name: name.to_string(),
            supercategory: String::new(),
        })
        .collect()
}
