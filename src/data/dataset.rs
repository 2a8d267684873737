//! Loading one task's split from disk into memory and building batches.
//!
//! Formats (identical for the synthetic benchmark and the real course sets):
//! - segmentation: `ROOT/mini_voc_seg/<split>/<stem>.{jpg,jpeg,JPEG}` + `<stem>.png`, the mask
//!   an 8-bit palette (or greyscale) PNG of class ids `0..=20`, 255 = ignore. In this folder a
//!   `.png` is always a mask, so segmentation images must be JPEGs.
//! - detection: `ROOT/mini_coco_det/<split>/<file_name>` + COCO JSON
//!   `ROOT/mini_coco_det/annotations/instances_<split>.json`; category ids are remapped to
//!   contiguous indices in increasing id order.
//! - classification: `ROOT/imagenette_160/<split>/<class-folder>/*.{JPEG,jpg,jpeg,png}`;
//!   labels are the class folders' positions in name order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use super::augment::{crop_boxes, crop_pixels, resize_crop_mask, resize_crop_rgb, Augment};
use super::imageio::{
    decode_rgb, is_image, is_jpeg, read_mask, resize_mask, resize_rgb, sorted_dirs, sorted_files,
};
use super::{
    Batch, DataError, DetBox, Split, Target, CLS_DIR, DET_DIR, IGNORE_INDEX, IMAGENET_MEAN,
    IMAGENET_STD, SEG_DIR, VOC_CLASSES,
};
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
    /// Source image file of each sample, in sample order.
    pub files: Vec<PathBuf>,
    /// `(width, height)` in pixels of each source image before resizing (to map predictions
    /// back to original coordinates, e.g. for COCO-results export).
    pub orig_sizes: Vec<(u32, u32)>,
    /// Detection only: COCO image id of each sample (empty for other tasks).
    pub image_ids: Vec<u64>,
    /// Detection only: COCO category id of each contiguous class index (empty otherwise).
    pub category_ids: Vec<u64>,
    /// `image_size * image_size * 3` HWC RGB bytes per sample, already resized.
    pixels: Vec<Vec<u8>>,
    /// Unflipped targets at the model input size.
    targets: Vec<Target>,
}

/// The folder of `task`'s `split` under `root`.
pub fn split_dir(task: TaskKind, root: &Path, split: Split) -> PathBuf {
    let d = match task {
        TaskKind::Seg => SEG_DIR,
        TaskKind::Det => DET_DIR,
        TaskKind::Cls => CLS_DIR,
    };
    root.join(d).join(split.name())
}

/// The COCO JSON of a detection split under `root`.
pub fn coco_json_path(root: &Path, split: Split) -> PathBuf {
    root.join(DET_DIR)
        .join("annotations")
        .join(format!("instances_{}.json", split.name()))
}

fn missing(path: PathBuf, root: &Path) -> anyhow::Error {
    DataError::MissingDataset {
        path,
        root: root.to_path_buf(),
    }
    .into()
}

/// Decode and resize one image: `(HWC bytes at size x size, original width, height)`.
fn load_image(path: &Path, size: usize) -> Result<(Vec<u8>, u32, u32)> {
    let img = decode_rgb(path)?;
    let (w, h) = img.dimensions();
    Ok((resize_rgb(&img, size), w, h))
}

impl TaskDataset {
    /// Open `root/<task dir>/<split>` and decode every image (in parallel), resizing it to
    /// `image_size x image_size` (masks nearest-neighbour, boxes scaled alike).
    ///
    /// Errors ([`DataError`] inside the `anyhow::Error`) name the offending file: missing
    /// dataset folder, corrupt image, mask of the wrong size or with ids outside `0..=20`/255,
    /// COCO annotation pointing at an unknown image or category, missing image file, empty
    /// class folder.
    pub fn open(task: TaskKind, root: &Path, split: Split, image_size: usize) -> Result<Self> {
        anyhow::ensure!(image_size > 0, "image_size must be positive");
        let dir = split_dir(task, root, split);
        if !dir.is_dir() {
            return Err(missing(dir, root));
        }
        let mut ds = TaskDataset {
            task,
            split,
            class_names: Vec::new(),
            image_size,
            files: Vec::new(),
            orig_sizes: Vec::new(),
            image_ids: Vec::new(),
            category_ids: Vec::new(),
            pixels: Vec::new(),
            targets: Vec::new(),
        };
        match task {
            TaskKind::Seg => ds.load_seg(&dir)?,
            TaskKind::Det => ds.load_det(root, &dir)?,
            TaskKind::Cls => ds.load_cls(&dir)?,
        }
        Ok(ds)
    }

    fn load_seg(&mut self, dir: &Path) -> Result<()> {
        let size = self.image_size;
        let files = sorted_files(dir)?;
        let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut masks: BTreeMap<String, PathBuf> = BTreeMap::new();
        for f in files.into_iter().filter(|f| is_image(f)) {
            let stem = f
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if is_jpeg(&f) {
                images.insert(stem, f);
            } else {
                masks.insert(stem, f);
            }
        }
        if images.is_empty() && masks.is_empty() {
            return Err(DataError::EmptyFolder {
                path: dir.to_path_buf(),
            }
            .into());
        }
        for (stem, m) in &masks {
            if !images.contains_key(stem) {
                return Err(DataError::Unpaired {
                    path: m.clone(),
                    what: "JPEG image",
                }
                .into());
            }
        }
        let mut pairs = Vec::with_capacity(images.len());
        for (stem, img) in images {
            let Some(mask) = masks.remove(&stem) else {
                return Err(DataError::Unpaired {
                    path: img,
                    what: "mask (.png)",
                }
                .into());
            };
            pairs.push((img, mask));
        }
        let loaded: Vec<(Vec<u8>, Vec<u8>, u32, u32)> = pairs
            .par_iter()
            .map(|(img_path, mask_path)| {
                let (px, w, h) = load_image(img_path, size)?;
                let mask = read_mask(mask_path)?;
                if (mask.width, mask.height) != (w, h) {
                    return Err(DataError::MaskSizeMismatch {
                        mask: mask_path.clone(),
                        image: img_path.clone(),
                        mask_w: mask.width,
                        mask_h: mask.height,
                        image_w: w,
                        image_h: h,
                    }
                    .into());
                }
                if let Some(&v) = mask
                    .data
                    .iter()
                    .find(|&&v| v as usize >= VOC_CLASSES.len() && v != IGNORE_INDEX)
                {
                    return Err(DataError::BadMask {
                        path: mask_path.clone(),
                        reason: format!(
                            "class id {v} outside 0..={} (and not the ignore value {IGNORE_INDEX})",
                            VOC_CLASSES.len() - 1
                        ),
                    }
                    .into());
                }
                let m = resize_mask(&mask.data, w as usize, h as usize, size);
                Ok((px, m, w, h))
            })
            .collect::<Result<_>>()?;
        self.class_names = VOC_CLASSES.iter().map(|s| s.to_string()).collect();
        for ((img, _), (px, m, w, h)) in pairs.into_iter().zip(loaded) {
            self.files.push(img);
            self.orig_sizes.push((w, h));
            self.pixels.push(px);
            self.targets.push(Target::Seg(m));
        }
        Ok(())
    }

    fn load_det(&mut self, root: &Path, dir: &Path) -> Result<()> {
        let size = self.image_size as f32;
        let json_path = coco_json_path(root, self.split);
        if !json_path.is_file() {
            return Err(missing(json_path, root));
        }
        let text = std::fs::read(&json_path)
            .with_context(|| format!("reading {}", json_path.display()))?;
        let mut coco: CocoFile = serde_json::from_slice(&text)
            .with_context(|| format!("parsing COCO JSON {}", json_path.display()))?;
        coco.categories.sort_by_key(|c| c.id);
        let cat_index: BTreeMap<u64, usize> = coco
            .categories
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i))
            .collect();
        anyhow::ensure!(
            cat_index.len() == coco.categories.len(),
            "{}: duplicate category ids",
            json_path.display()
        );
        coco.images.sort_by_key(|im| im.id);
        let img_index: BTreeMap<u64, usize> = coco
            .images
            .iter()
            .enumerate()
            .map(|(i, im)| (im.id, i))
            .collect();
        let mut per_image: Vec<Vec<(usize, [f64; 4], bool)>> = vec![Vec::new(); coco.images.len()];
        for a in &coco.annotations {
            let Some(&ii) = img_index.get(&a.image_id) else {
                return Err(DataError::UnknownImage {
                    json: json_path.clone(),
                    ann_id: a.id,
                    image_id: a.image_id,
                }
                .into());
            };
            let Some(&ci) = cat_index.get(&a.category_id) else {
                return Err(DataError::UnknownCategory {
                    json: json_path.clone(),
                    ann_id: a.id,
                    category_id: a.category_id,
                }
                .into());
            };
            per_image[ii].push((ci, a.bbox, a.iscrowd != 0));
        }
        let paths: Vec<PathBuf> = coco
            .images
            .iter()
            .map(|im| dir.join(&im.file_name))
            .collect();
        for p in &paths {
            if !p.is_file() {
                return Err(DataError::MissingImageFile {
                    json: json_path.clone(),
                    path: p.clone(),
                }
                .into());
            }
        }
        if paths.is_empty() {
            return Err(DataError::EmptyFolder {
                path: json_path.clone(),
            }
            .into());
        }
        let loaded: Vec<(Vec<u8>, u32, u32)> = paths
            .par_iter()
            .map(|p| load_image(p, self.image_size))
            .collect::<Result<_>>()?;
        self.class_names = coco.categories.iter().map(|c| c.name.clone()).collect();
        self.category_ids = coco.categories.iter().map(|c| c.id).collect();
        for (((p, (px, w, h)), anns), im) in paths
            .into_iter()
            .zip(loaded)
            .zip(per_image)
            .zip(&coco.images)
        {
            // Scale with the decoded size (the JSON's width/height may be absent or stale).
            let (sx, sy) = (size / w as f32, size / h as f32);
            let boxes = anns
                .into_iter()
                .filter_map(|(class, b, crowd)| {
                    let x0 = (b[0] as f32 * sx).clamp(0.0, size);
                    let y0 = (b[1] as f32 * sy).clamp(0.0, size);
                    let x1 = ((b[0] + b[2]) as f32 * sx).clamp(0.0, size);
                    let y1 = ((b[1] + b[3]) as f32 * sy).clamp(0.0, size);
                    // Degenerate boxes (zero area after clipping) carry no signal.
                    (x1 > x0 && y1 > y0).then_some(DetBox {
                        bbox: [x0, y0, x1, y1],
                        class,
                        crowd,
                    })
                })
                .collect();
            self.files.push(p);
            self.orig_sizes.push((w, h));
            self.image_ids.push(im.id);
            self.pixels.push(px);
            self.targets.push(Target::Det(boxes));
        }
        Ok(())
    }

    fn load_cls(&mut self, dir: &Path) -> Result<()> {
        let class_dirs = sorted_dirs(dir)?;
        if class_dirs.is_empty() {
            return Err(DataError::EmptyFolder {
                path: dir.to_path_buf(),
            }
            .into());
        }
        let mut items = Vec::new();
        for (label, cd) in class_dirs.iter().enumerate() {
            let files: Vec<PathBuf> = sorted_files(cd)?
                .into_iter()
                .filter(|f| is_image(f))
                .collect();
            if files.is_empty() {
                return Err(DataError::EmptyFolder { path: cd.clone() }.into());
            }
            items.extend(files.into_iter().map(|f| (f, label)));
            self.class_names.push(
                cd.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        let loaded: Vec<(Vec<u8>, u32, u32)> = items
            .par_iter()
            .map(|(p, _)| load_image(p, self.image_size))
            .collect::<Result<_>>()?;
        for ((p, label), (px, w, h)) in items.into_iter().zip(loaded) {
            self.files.push(p);
            self.orig_sizes.push((w, h));
            self.pixels.push(px);
            self.targets.push(Target::Cls(label));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.pixels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// The unflipped target of sample `i` at the model input size.
    pub fn target(&self, i: usize) -> &Target {
        &self.targets[i]
    }

    /// The resized `S x S x 3` HWC RGB bytes of sample `i` (for overlays and checks).
    pub fn pixels(&self, i: usize) -> &[u8] {
        &self.pixels[i]
    }

    /// Build a batch from sample indices; `flips[i]` mirrors sample i horizontally
    /// (image, mask and boxes alike). Flip decisions come from the caller's seeded RNG so
    /// that the data path itself is deterministic. `flips` may be empty (no flips).
    /// Same as [`batch_augmented`](Self::batch_augmented) with no crops.
    pub fn batch(&self, indices: &[usize], flips: &[bool], device: &Device) -> Result<Batch> {
        anyhow::ensure!(
            flips.is_empty() || flips.len() == indices.len(),
            "batch: {} flips for {} indices",
            flips.len(),
            indices.len()
        );
        let augs: Vec<Augment> = (0..indices.len())
            .map(|k| Augment::flip_only(flips.get(k).copied().unwrap_or(false)))
            .collect();
        self.batch_augmented(indices, &augs, device)
    }

    /// Build a batch from sample indices, sample k transformed by `augs[k]` (see
    /// [`super::augment`]): its crop of the cached `S x S` image is resized back to `S x S`
    /// (image bilinear, mask nearest-neighbour so 255 stays "ignore", boxes shifted, scaled,
    /// clipped, and dropped when mostly cut off), then mirrored if `flip`. Classification
    /// labels are unchanged. `augs` may be empty (no augmentation). The `Augment`s come from
    /// [`AugmentConfig::draw`](super::augment::AugmentConfig::draw) on the caller's seeded
    /// RNG; this function is deterministic.
    pub fn batch_augmented(
        &self,
        indices: &[usize],
        augs: &[Augment],
        device: &Device,
    ) -> Result<Batch> {
        anyhow::ensure!(
            augs.is_empty() || augs.len() == indices.len(),
            "batch: {} augmentations for {} indices",
            augs.len(),
            indices.len()
        );
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            anyhow::bail!(
                "batch: sample index {bad} out of range ({} has {} samples)",
                self.task,
                self.len()
            );
        }
        let s = self.image_size;
        let plane = s * s;
        let aug = |k: usize| augs.get(k).copied().unwrap_or_default();
        // Crops in pixels, validated before any work.
        let crops: Vec<Option<(f32, f32, f32, f32)>> = (0..indices.len())
            .map(|k| aug(k).crop.map(|c| crop_pixels(c, s)).transpose())
            .collect::<Result<_>>()?;
        // Per-channel lookup table: u8 value -> normalised f32.
        let lut: Vec<[f32; 256]> = (0..3)
            .map(|c| {
                let mut t = [0f32; 256];
                for (v, e) in t.iter_mut().enumerate() {
                    *e = (v as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                }
                t
            })
            .collect();
        let mut data = vec![0f32; indices.len() * 3 * plane];
        data.par_chunks_mut(3 * plane)
            .enumerate()
            .for_each(|(k, out)| {
                let px = &self.pixels[indices[k]];
                let f = aug(k).flip;
                if let Some(crop) = crops[k] {
                    // Same arithmetic as the table, so integer values give identical floats.
                    let norm = |c: usize, v: f32| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                    resize_crop_rgb(px, s, crop, f, out, norm);
                    return;
                }
                for y in 0..s {
                    for x in 0..s {
                        let sx = if f { s - 1 - x } else { x };
                        let p = (y * s + sx) * 3;
                        for c in 0..3 {
                            out[c * plane + y * s + x] = lut[c][px[p + c] as usize];
                        }
                    }
                }
            });
        let images = Tensor::from_vec(data, (indices.len(), 3, s, s), device)?;
        let targets = indices
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let t = &self.targets[i];
                let f = aug(k).flip;
                match (t, crops[k]) {
                    (Target::Cls(c), _) => Target::Cls(*c),
                    (_, None) if !f => t.clone(),
                    (Target::Seg(m), None) => Target::Seg(flip_mask(m, s)),
                    (Target::Seg(m), Some(crop)) => Target::Seg(resize_crop_mask(m, s, crop, f)),
                    (Target::Det(b), None) => Target::Det(flip_boxes(b, s as f32)),
                    (Target::Det(b), Some(crop)) => {
                        let b = crop_boxes(b, s, crop);
                        Target::Det(if f { flip_boxes(&b, s as f32) } else { b })
                    }
                }
            })
            .collect();
        Ok(Batch {
            task: self.task,
            images,
            targets,
        })
    }
}

/// Mirror an `s x s` row-major mask left-right.
pub fn flip_mask(mask: &[u8], s: usize) -> Vec<u8> {
    let mut out = mask.to_vec();
    for row in out.chunks_mut(s) {
        row.reverse();
    }
    out
}

/// Mirror boxes left-right in an image `width` pixels wide: `x0' = width - x1`, `x1' = width - x0`.
pub fn flip_boxes(boxes: &[DetBox], width: f32) -> Vec<DetBox> {
    boxes
        .iter()
        .map(|b| DetBox {
            bbox: [width - b.bbox[2], b.bbox[1], width - b.bbox[0], b.bbox[3]],
            ..*b
        })
        .collect()
}

/// `(B, S, S)` u32 tensor of segmentation masks (255 stays 255) for a segmentation batch.
pub fn seg_masks(batch: &Batch, device: &Device) -> Result<Tensor> {
    let (b, _, h, w) = batch.images.dims4()?;
    let mut v = Vec::with_capacity(b * h * w);
    for t in &batch.targets {
        match t {
            Target::Seg(m) => {
                anyhow::ensure!(
                    m.len() == h * w,
                    "seg_masks: mask of {} pixels, expected {}",
                    m.len(),
                    h * w
                );
                v.extend(m.iter().map(|&x| x as u32));
            }
            _ => anyhow::bail!(
                "seg_masks: batch of task {} is not a segmentation batch",
                batch.task
            ),
        }
    }
    Ok(Tensor::from_vec(v, (b, h, w), device)?)
}

// ---- COCO JSON (only the fields the loader needs; the rest is ignored) ----

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnn>,
    categories: Vec<CocoCat>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnn {
    id: u64,
    image_id: u64,
    category_id: u64,
    /// `[x, y, w, h]` in original-image pixels.
    bbox: [f64; 4],
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Deserialize)]
struct CocoCat {
    id: u64,
    name: String,
}
