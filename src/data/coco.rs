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

    /// Check what pycocotools would trip over or silently mis-score, before anything trains
    /// (`path` names the file in messages). Errors: no categories, a duplicate image,
    /// annotation or category id, a box with a negative or non-finite size. Boxes reaching
    /// outside their image are kept (the loader clips them to the image) and reported in
    /// the returned warnings, with their annotation ids.
    pub fn check(&self, path: &Path) -> Result<Vec<String>> {
        let at = path.display();
        anyhow::ensure!(
            !self.categories.is_empty(),
            "{at}: `categories` is empty: a detection set needs at least one category"
        );
        let dup = |ids: Vec<u64>| {
            let mut ids = ids;
            ids.sort_unstable();
            ids.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
        };
        if let Some(id) = dup(self.images.iter().map(|i| i.id).collect()) {
            anyhow::bail!("{at}: image id {id} is listed twice in `images`");
        }
        if let Some(id) = dup(self.annotations.iter().map(|a| a.id).collect()) {
            anyhow::bail!("{at}: annotation id {id} is listed twice in `annotations`");
        }
        if let Some(id) = dup(self.categories.iter().map(|c| c.id).collect()) {
            anyhow::bail!("{at}: category id {id} is listed twice in `categories`");
        }
        let sizes: std::collections::BTreeMap<u64, (u32, u32)> = self
            .images
            .iter()
            .map(|i| (i.id, (i.width, i.height)))
            .collect();
        let (mut outside, mut empty) = (Vec::new(), Vec::new());
        for a in &self.annotations {
            let [x, y, w, h] = a.bbox;
            anyhow::ensure!(
                a.bbox.iter().all(|v| v.is_finite()) && w >= 0.0 && h >= 0.0,
                "{at}: annotation {} has bbox {:?}: width and height must be finite and >= 0 ([x, y, width, height])",
                a.id,
                a.bbox
            );
            if w == 0.0 || h == 0.0 {
                empty.push(a.id);
            }
            if let Some(&(iw, ih)) = sizes.get(&a.image_id).filter(|(iw, ih)| *iw > 0 && *ih > 0) {
                if x < 0.0 || y < 0.0 || x + w > iw as f64 || y + h > ih as f64 {
                    outside.push(a.id);
                }
            }
        }
        let ids = |v: &[u64]| {
            let shown: Vec<String> = v.iter().take(5).map(u64::to_string).collect();
            format!(
                "{}{}",
                shown.join(", "),
                if v.len() > 5 { ", …" } else { "" }
            )
        };
        let mut warnings = Vec::new();
        if !outside.is_empty() {
            warnings.push(format!(
                "{at}: {} box(es) reach outside their image and are clipped to it (annotation ids {})",
                outside.len(),
                ids(&outside)
            ));
        }
        if !empty.is_empty() {
            warnings.push(format!(
                "{at}: {} box(es) of zero width or height carry nothing to learn and are dropped (annotation ids {})",
                empty.len(),
                ids(&empty)
            ));
        }
        Ok(warnings)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> CocoFile {
        CocoFile {
            images: vec![
                CocoImage {
                    id: 1,
                    file_name: "a.jpg".into(),
                    width: 100,
                    height: 80,
                },
                CocoImage {
                    id: 2,
                    file_name: "b.jpg".into(),
                    width: 100,
                    height: 80,
                },
            ],
            annotations: vec![CocoAnnotation {
                id: 7,
                image_id: 1,
                category_id: 3,
                bbox: [10.0, 10.0, 20.0, 20.0],
                area: 400.0,
                iscrowd: 0,
            }],
            categories: vec![CocoCategory {
                id: 3,
                name: "cat".into(),
                supercategory: String::new(),
            }],
        }
    }

    #[test]
    fn what_pycocotools_would_trip_over_is_named() {
        let p = Path::new("instances_val.json");
        assert!(file().check(p).unwrap().is_empty());
        let mut f = file();
        f.images[1].id = 1;
        let msg = f.check(p).unwrap_err().to_string();
        assert!(msg.contains("image id 1 is listed twice"), "{msg}");
        let mut f = file();
        f.annotations.push(f.annotations[0].clone());
        let msg = f.check(p).unwrap_err().to_string();
        assert!(msg.contains("annotation id 7"), "{msg}");
        let mut f = file();
        f.categories.clear();
        assert!(f
            .check(p)
            .unwrap_err()
            .to_string()
            .contains("`categories` is empty"));
        let mut f = file();
        f.annotations[0].bbox = [10.0, 10.0, -5.0, 20.0];
        let msg = f.check(p).unwrap_err().to_string();
        assert!(
            msg.contains("annotation 7") && msg.contains("instances_val.json"),
            "{msg}"
        );
        let mut f = file();
        f.annotations[0].bbox = [90.0, 70.0, 20.0, 20.0];
        let w = f.check(p).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("clipped") && w[0].contains("7"), "{}", w[0]);
        let mut f = file();
        f.annotations[0].bbox = [10.0, 10.0, 0.0, 20.0];
        let w = f.check(p).unwrap();
        assert!(
            w.len() == 1 && w[0].contains("dropped") && w[0].contains("7"),
            "{w:?}"
        );
    }
}
