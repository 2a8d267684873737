//! Semantic segmentation (PASCAL VOC style).
//!
//! - Data: `ROOT/mini_voc_seg/<split>/<stem>.{jpg,jpeg,JPEG}` + `<stem>.png`, the mask an
//!   8-bit palette (or greyscale) PNG of class ids `0..=20`, 255 = ignore. In this folder a
//!   `.png` is always a mask, so images must be JPEGs. The 21 VOC classes are fixed by the
//!   format (the mask values are the class ids).
//! - Head slice: one logit map per class at stride 8, `(B, 21, S/8, S/8)`.
//! - Loss: pixel cross-entropy on the logits upsampled bilinearly to the input size, 255
//!   ignored.
//! - Metrics: from one confusion matrix over the whole split (not averaged per image), at
//!   each val image's **original resolution** (logits resized bilinearly to the image's own
//!   size before the argmax, masks never resampled), as the VOC devkit and mmseg score:
//!   `miou` averages over the fixed set of classes with ground truth in the split (its size
//!   is `miou_classes`), `miou_nanmean` over classes in ground truth or prediction (mmseg /
//!   torchmetrics style, for comparison), `pixel_acc`, and `iou.<class>` per class.
//! - Splits: train and val; a held-out `test` split when its folder exists (the synthetic
//!   benchmark), scored exactly as val.
//! - Chance: the mIoU of predicting background everywhere on the scored split (val, test).
//! - Predictions (`onehead predict`) and exports (`onehead eval --export`): the class map at
//!   the image's own size, computed exactly as scored, as a VOC-palette PNG (exports are
//!   named like the ground-truth masks, so any VOC tool scores them).
//! - Distillation: per-pixel KL divergence of temperature-softened class distributions at
//!   the head's own resolution (LwF, T² scaling).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::images::{crop_rect, flip_mask, resize_crop_mask, ImageSet};
use super::{
    aug_at, check_request, no_split, require_dir, Augment, Batch, DistillParams, Evaluator,
    Exporter, Mark, OpenOptions, PerImage, PredictInput, Prediction, Split, Task, TaskLoss,
    TaskMetrics,
};
use crate::data::imageio::{
    encode_mask_png, is_image, is_jpeg, read_mask, resize_mask, sorted_files, voc_palette,
};
use crate::data::{DataError, IGNORE_INDEX, SEG_DIR, VOC_CLASSES};
use crate::metrics::miou::ConfusionMatrix;
use crate::metrics::per_image::IouCounts;
use crate::ops::resize::resize_bilinear_argmax;

/// The metrics segmentation reports (`miou` is its verdict metric by default).
pub const METRICS: [&str; 4] = ["miou", "miou_classes", "miou_nanmean", "pixel_acc"];

/// One split: images and their masks at the model input size (nearest-neighbour), and at
/// their original size when kept (val splits: scoring; train splits with crops: cropping).
pub struct SegSplit {
    pub images: ImageSet,
    /// `S × S` class ids per sample, row-major; 255 = ignore.
    masks: Vec<Vec<u8>>,
    /// The masks as read, `orig_sizes[i]` in size; empty when not kept.
    originals: Vec<Vec<u8>>,
}

/// The folder of a segmentation split under `root`.
pub fn split_dir(root: &Path, split: Split) -> PathBuf {
    root.join(SEG_DIR).join(split.name())
}

impl SegSplit {
    /// Open `root/mini_voc_seg/<split>` and decode every image and mask (in parallel).
    /// `keep_originals` keeps the masks at their own size and, for images larger than the
    /// model input, a crop-source copy of the image (for scoring at the original resolution
    /// and for random crops). Errors name the file: missing folder, unpaired image or mask,
    /// corrupt image, mask of the wrong size or with ids outside `0..=20`/255.
    pub fn open(
        root: &Path,
        split: Split,
        image_size: usize,
        keep_originals: bool,
    ) -> Result<Self> {
        let dir = require_dir(split_dir(root, split), root)?;
        let pairs = pair_images_and_masks(&dir)?;
        let loaded: Vec<(Vec<u8>, Vec<u8>)> = pairs
            .par_iter()
            .map(|(img, mask)| load_mask(img, mask, image_size))
            .collect::<Result<_>>()?;
        let images = ImageSet::load(
            pairs.into_iter().map(|(img, _)| img).collect(),
            image_size,
            keep_originals,
        )?;
        let (masks, originals): (Vec<_>, Vec<_>) = loaded.into_iter().unzip();
        Ok(Self {
            images,
            masks,
            originals: if keep_originals { originals } else { vec![] },
        })
    }

    /// The mask of sample `i` as read from its file (`None` unless kept).
    pub fn original_mask(&self, i: usize) -> Option<(&[u8], usize, usize)> {
        let (w, h) = self.images.orig_sizes[i];
        self.originals
            .get(i)
            .map(|m| (m.as_slice(), w as usize, h as usize))
    }

    pub fn len(&self) -> usize {
        self.masks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// The unaugmented mask of sample `i` at the model input size.
    pub fn mask(&self, i: usize) -> &[u8] {
        &self.masks[i]
    }

    /// Images and masks of `indices`, sample k transformed by `augs[k]`.
    pub fn batch(
        &self,
        indices: &[usize],
        augs: &[Augment],
        device: &Device,
    ) -> Result<(Tensor, Vec<Vec<u8>>)> {
        check_request("seg", indices, augs, self.len())?;
        let s = self.images.image_size;
        let masks = indices
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let a = aug_at(augs, k);
                let m = &self.masks[i];
                Ok(match (a.crop, self.original_mask(i)) {
                    // Crops come from the mask as read, like the image's (never upsampled
                    // from the S × S copy).
                    (Some(c), Some((o, w, h))) => {
                        resize_crop_mask((o, w, h), crop_rect(c, w, h)?, s, a.flip)
                    }
                    (Some(c), None) => resize_crop_mask((m, s, s), crop_rect(c, s, s)?, s, a.flip),
                    (None, _) if a.flip => flip_mask(m, s),
                    (None, _) => m.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok((self.images.tensor(indices, augs, device)?, masks))
    }
}

/// Image/mask pairs of a folder, sorted by stem; an image without a mask (or the reverse)
/// is an error.
fn pair_images_and_masks(dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut masks: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in sorted_files(dir)?.into_iter().filter(|f| is_image(f)) {
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
    if let Some((_, m)) = masks.iter().find(|(stem, _)| !images.contains_key(*stem)) {
        return Err(DataError::Unpaired {
            path: m.clone(),
            what: "JPEG image",
        }
        .into());
    }
    images
        .into_iter()
        .map(|(stem, img)| match masks.remove(&stem) {
            Some(mask) => Ok((img, mask)),
            None => Err(DataError::Unpaired {
                path: img,
                what: "mask (.png)",
            }
            .into()),
        })
        .collect()
}

/// Read and check one mask against its image: `(resized to size × size, as read)`.
fn load_mask(img_path: &Path, mask_path: &Path, size: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    let (w, h) = crate::data::imageio::image_dimensions(img_path)?;
    let mask = read_mask(mask_path)?;
    if (mask.width, mask.height) != (w, h) {
        return Err(DataError::MaskSizeMismatch {
            mask: mask_path.to_path_buf(),
            image: img_path.to_path_buf(),
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
            path: mask_path.to_path_buf(),
            reason: format!(
                "class id {v} outside 0..={} (and not the ignore value {IGNORE_INDEX})",
                VOC_CLASSES.len() - 1
            ),
        }
        .into());
    }
    let small = resize_mask(&mask.data, w as usize, h as usize, size);
    Ok((small, mask.data))
}

/// Segmentation as a [`Task`].
pub struct SegTask {
    pub train: SegSplit,
    pub val: SegSplit,
    /// The held-out test split, when the data has one (the synthetic benchmark).
    pub test: Option<SegSplit>,
    class_names: Vec<String>,
    /// mIoU of "background everywhere" on the val and (if any) the test split.
    chance_val: f64,
    chance_test: Option<f64>,
}

impl SegTask {
    pub fn open(o: &OpenOptions) -> Result<Self> {
        let train = SegSplit::open(&o.root, Split::Train, o.image_size, o.train_crops)?;
        let val = SegSplit::open(&o.root, Split::Val, o.image_size, true)?;
        // A missing test folder means the data has no test split (the course sets).
        let test = match split_dir(&o.root, Split::Test).is_dir() {
            true => Some(SegSplit::open(&o.root, Split::Test, o.image_size, true)?),
            false => None,
        };
        let class_names: Vec<String> = VOC_CLASSES.iter().map(|s| s.to_string()).collect();
        Ok(Self {
            chance_val: background_miou(&val, class_names.len())?,
            chance_test: match &test {
                Some(t) => Some(background_miou(t, class_names.len())?),
                None => None,
            },
            train,
            val,
            test,
            class_names,
        })
    }

    /// The split, `None` for a test split the data does not have.
    fn split(&self, split: Split) -> Option<&SegSplit> {
        match split {
            Split::Train => Some(&self.train),
            Split::Val => Some(&self.val),
            Split::Test => self.test.as_ref(),
        }
    }

    /// The predicted masks of the samples of `batch` (of `split`) at their original sizes, as
    /// they are scored: logits resized bilinearly to each image's own size, then the argmax.
    fn predictions(&self, split: Split, out: &Tensor, batch: &Batch) -> Result<Vec<Vec<u8>>> {
        let data = self.split(split).ok_or_else(|| no_split("seg", split))?;
        batch
            .indices
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let (w, h) = data.images.orig_sizes[i];
                mask_at(&out.narrow(0, k, 1)?, w as usize, h as usize)
            })
            .collect()
    }
}

/// The mIoU of predicting background everywhere on a split whose original masks are kept.
fn background_miou(split: &SegSplit, num_classes: usize) -> Result<f64> {
    let mut cm = ConfusionMatrix::new(num_classes)?;
    for m in &split.originals {
        cm.add(&vec![0u8; m.len()], m)?;
    }
    Ok(cm.miou())
}

/// The per-image scores of predicting background everywhere (the chance predictor).
fn background_scores(split: &SegSplit, num_classes: usize) -> Result<PerImage> {
    let mut counts = IouCounts::new(num_classes);
    for m in &split.originals {
        let mut cm = ConfusionMatrix::new(num_classes)?;
        cm.add(&vec![0u8; m.len()], m)?;
        counts.push(&cm)?;
    }
    Ok(PerImage::Iou(counts))
}

/// The predicted class map of one image at `w × h` from its logits `(1, C, h', w')`:
/// resized bilinearly to that size, then the argmax over classes (row-major ids). Computed
/// on the CPU row by row ([`resize_bilinear_argmax`]), so any image size fits in memory,
/// and the same on every device.
pub fn mask_at(out: &Tensor, w: usize, h: usize) -> Result<Vec<u8>> {
    let c = out.dim(1)?;
    anyhow::ensure!(c <= 255, "mask_at: {c} classes do not fit u8 ids below 255");
    Ok(resize_bilinear_argmax(out, h, w)?
        .into_iter()
        .map(|v| v as u8)
        .collect())
}

/// `(B, S, S)` u32 tensor of masks (255 stays 255).
pub fn masks_tensor(masks: &[Vec<u8>], s: usize, device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(masks.len() * s * s);
    for m in masks {
        anyhow::ensure!(
            m.len() == s * s,
            "mask of {} pixels, expected {}",
            m.len(),
            s * s
        );
        v.extend(m.iter().map(|&x| x as u32));
    }
    Ok(Tensor::from_vec(v, (masks.len(), s, s), device)?)
}

/// Mean cross-entropy over the valid pixels of `logits (B, C, h, w)` resized bilinearly to
/// the masks' `H × W` (`masks (B, H, W)` u32 class ids; `ignore` not counted and given exactly
/// zero gradient; all pixels ignored → 0). One fused op on the CPU, the composition
/// resize → cross-entropy elsewhere; same value and gradient (tests/model_ops.rs).
pub fn upsampled_pixel_cross_entropy(
    logits: &Tensor,
    masks: &Tensor,
    ignore: u32,
) -> Result<Tensor> {
    let b = logits.dim(0)?;
    anyhow::ensure!(
        masks.rank() == 3 && masks.dim(0)? == b && masks.dtype() == DType::U32,
        "upsampled_pixel_cross_entropy: masks {:?} {:?} do not match logits {:?} (expected u32 ({b}, H, W))",
        masks.dims(),
        masks.dtype(),
        logits.dims()
    );
    Ok(crate::ops::upsampled_pixel_cross_entropy(
        logits,
        masks,
        Some(ignore),
    )?)
}

/// Mean cross-entropy over the valid pixels: `logits (B, C, H, W)`, `masks (B, H, W)` u32
/// class ids, `ignore` not counted (and given exactly zero gradient); all pixels ignored → 0.
pub fn pixel_cross_entropy(logits: &Tensor, masks: &Tensor, ignore: u32) -> Result<Tensor> {
    let (b, _c, h, w) = logits.dims4()?;
    anyhow::ensure!(
        masks.dims() == [b, h, w] && masks.dtype() == DType::U32,
        "pixel_cross_entropy: masks {:?} {:?} do not match logits {:?} (expected u32 ({b}, {h}, {w}))",
        masks.dims(),
        masks.dtype(),
        logits.dims()
    );
    Ok(crate::ops::loss::pixel_cross_entropy(
        logits,
        masks,
        Some(ignore),
    )?)
}

/// `T² · mean over pixels of KL(softmax(t/T) ‖ softmax(s/T))` over dim 1 of `(B, C, …)`
/// logits: the LwF/Hinton distillation term, 0 when student equals teacher.
pub fn kl_distill(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    anyhow::ensure!(
        student.dims() == teacher.dims(),
        "distill: student {:?} vs teacher {:?}",
        student.dims(),
        teacher.dims()
    );
    let t = temperature;
    let ls = candle_nn::ops::log_softmax(&(student / t)?, 1)?;
    let lt = candle_nn::ops::log_softmax(&(teacher.detach() / t)?, 1)?;
    let pt = lt.exp()?;
    // Σ_c p_t (log p_t − log p_s), then the mean over every other position.
    let kl = (pt * (lt - ls)?)?.sum(1)?;
    Ok((kl.mean_all()? * (t * t))?)
}

impl Task for SegTask {
    fn name(&self) -> &str {
        "seg"
    }

    fn class_names(&self) -> &[String] {
        &self.class_names
    }

    fn head_channels(&self) -> usize {
        self.class_names.len()
    }

    fn metric_names(&self) -> Vec<String> {
        METRICS.map(String::from).to_vec()
    }

    fn primary_metric(&self) -> &str {
        "miou"
    }

    fn chance(&self, metric: &str, split: Split) -> Option<f64> {
        let chance = match split {
            // Training masks at their own size are not always kept: no chance level there.
            Split::Train => None,
            Split::Val => Some(self.chance_val),
            Split::Test => self.chance_test,
        };
        chance.filter(|_| metric == "miou")
    }

    fn chance_scores(&self, split: Split) -> Option<PerImage> {
        let data = self.split(split).filter(|_| split != Split::Train)?;
        background_scores(data, self.class_names.len()).ok()
    }

    fn image_aspect(&self, split: Split, i: usize) -> f32 {
        self.split(split).map_or(1.0, |s| s.images.aspect(i))
    }

    /// Its most frequent foreground class (background 0 and ignore 255 aside).
    fn image_class(&self, split: Split, i: usize) -> Option<usize> {
        let s = self.split(split)?;
        let mask = (i < s.len()).then(|| s.mask(i))?;
        let mut counts = [0usize; 256];
        for &c in mask {
            counts[c as usize] += 1;
        }
        (1..255)
            .filter(|&c| counts[c] > 0)
            .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
    }

    fn len(&self, split: Split) -> usize {
        self.split(split).map_or(0, |s| s.len())
    }

    fn batch(
        &self,
        split: Split,
        indices: &[usize],
        augs: &[Augment],
        device: &Device,
    ) -> Result<Batch> {
        let data = self.split(split).ok_or_else(|| no_split("seg", split))?;
        let (images, masks) = data.batch(indices, augs, device)?;
        Ok(Batch::new(images, indices, masks))
    }

    fn loss(&self, out: &Tensor, batch: &Batch) -> Result<TaskLoss> {
        let s = batch.images.dim(2)?;
        let masks: &Vec<Vec<u8>> = batch.targets()?;
        // Cross-entropy on logits upsampled bilinearly to the mask's size (255 ignored), as
        // one op: the upsampled (B, 21, S, S) logits (67 MB at 224², batch 16) are never built.
        let masks = masks_tensor(masks, s, out.device())?;
        Ok(TaskLoss {
            total: upsampled_pixel_cross_entropy(out, &masks, IGNORE_INDEX as u32)?,
            parts: vec![],
        })
    }

    fn evaluator(&self, split: Split) -> Box<dyn Evaluator + '_> {
        Box::new(SegEvaluator {
            task: self,
            split,
            cm: ConfusionMatrix::new(self.class_names.len()).expect("≤ 255 VOC classes"),
            per_image: IouCounts::new(self.class_names.len()),
        })
    }

    fn distill(&self, student: &Tensor, teacher: &Tensor, p: &DistillParams) -> Result<Tensor> {
        kl_distill(student, teacher, p.temperature)
    }

    fn predict(&self, out: &Tensor, input: &PredictInput) -> Result<Option<Prediction>> {
        let (w, h) = input.orig_size;
        let mask = mask_at(out, w as usize, h as usize)?;
        let mut counts = vec![0u64; self.class_names.len()];
        for &c in &mask {
            counts[c as usize] += 1;
        }
        let total = mask.len().max(1) as f64;
        let present: Vec<usize> = (0..counts.len()).filter(|&c| counts[c] > 0).collect();
        let file = format!("{}.seg.png", input.stem);
        let json = serde_json::json!({
            "mask": file,
            "mask_format": "8-bit palette PNG (VOC palette) of the image's size, pixel value = class id",
            "classes": present.iter().map(|&c| serde_json::json!({
                "class_id": c,
                "name": self.class_names[c],
                "pixels": counts[c],
                "fraction": counts[c] as f64 / total,
            })).collect::<Vec<_>>(),
        });
        let palette = voc_palette();
        let items = present
            .iter()
            .filter(|&&c| c != 0)
            .map(|&c| {
                (
                    format!(
                        "{} {}",
                        self.class_names[c],
                        percent(counts[c] as f64 / total)
                    ),
                    Some([palette[3 * c], palette[3 * c + 1], palette[3 * c + 2]]),
                )
            })
            .collect::<Vec<_>>();
        let png = encode_mask_png(w, h, &mask)?;
        Ok(Some(Prediction {
            json,
            marks: vec![
                Mark::Mask {
                    width: w,
                    height: h,
                    classes: mask,
                },
                Mark::Legend {
                    title: "seg".into(),
                    items: if items.is_empty() {
                        vec![("background only".into(), None)]
                    } else {
                        items
                    },
                },
            ],
            files: vec![(file, png)],
        }))
    }

    fn exporter(&self, dir: &Path) -> Result<Option<Box<dyn Exporter + '_>>> {
        let dir = dir.join("seg");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Some(Box::new(SegExporter {
            task: self,
            dir,
            written: 0,
        })))
    }
}

struct SegEvaluator<'a> {
    task: &'a SegTask,
    split: Split,
    cm: ConfusionMatrix,
    /// Each image's own counts, for resampling.
    per_image: IouCounts,
}

impl Evaluator for SegEvaluator<'_> {
    fn add(&mut self, out: &Tensor, batch: &Batch) -> Result<()> {
        let preds = self.task.predictions(self.split, out, batch)?;
        let data = self.task.split(self.split).context("split checked above")?;
        for (p, &i) in preds.iter().zip(&batch.indices) {
            let (gt, _, _) = data
                .original_mask(i)
                .context("the masks of scored splits are kept")?;
            let mut one = ConfusionMatrix::new(self.cm.num_classes())?;
            one.add(p, gt)?;
            self.cm.merge(&one)?;
            self.per_image.push(&one)?;
        }
        Ok(())
    }

    fn finish_scored(self: Box<Self>) -> Result<(TaskMetrics, Option<PerImage>)> {
        let metrics = self.metrics();
        Ok((metrics, Some(PerImage::Iou(self.per_image))))
    }

    fn finish(self: Box<Self>) -> Result<TaskMetrics> {
        Ok(self.metrics())
    }
}

impl SegEvaluator<'_> {
    fn metrics(&self) -> TaskMetrics {
        let mut m = TaskMetrics::new();
        m.insert("miou".into(), self.cm.miou());
        m.insert(
            "miou_classes".into(),
            self.cm.classes_with_gt().len() as f64,
        );
        m.insert("miou_nanmean".into(), self.cm.miou_nanmean());
        m.insert("pixel_acc".into(), self.cm.pixel_accuracy());
        for (name, iou) in self.task.class_names.iter().zip(self.cm.per_class_iou()) {
            if let Some(iou) = iou {
                m.insert(format!("iou.{name}"), iou);
            }
        }
        m
    }
}

/// Writes the predicted masks of the val split as palette PNGs named like the ground-truth
/// masks (`<stem>.png`), at the ground truth's size: exactly the masks the evaluator scores.
struct SegExporter<'a> {
    task: &'a SegTask,
    dir: PathBuf,
    written: usize,
}

impl Exporter for SegExporter<'_> {
    fn add(&mut self, out: &Tensor, batch: &Batch) -> Result<()> {
        let preds = self.task.predictions(Split::Val, out, batch)?;
        let val = &self.task.val;
        preds
            .par_iter()
            .zip(&batch.indices)
            .try_for_each(|(p, &i)| -> Result<()> {
                let (w, h) = val.images.orig_sizes[i];
                let file = self.dir.join(mask_file_name(&val.images.files[i]));
                std::fs::write(&file, encode_mask_png(w, h, p)?)
                    .with_context(|| format!("writing {}", file.display()))
            })?;
        self.written += preds.len();
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<serde_json::Value> {
        let gt_dir = self.task.val.images.files[0]
            .parent()
            .map(super::absolute_display)
            .unwrap_or_default();
        Ok(serde_json::json!({
            "masks": "seg/",
            "count": self.written,
            "format": "8-bit palette PNG (VOC palette), pixel value = class id 0..=20, one per val image, named and sized like its ground-truth mask",
            "ground_truth": gt_dir,
            "classes": self.task.class_names,
        }))
    }
}

/// A share as a whole percentage, `<1%` for a small non-zero one.
fn percent(f: f64) -> String {
    if f > 0.0 && f < 0.005 {
        "<1%".into()
    } else {
        format!("{:.0}%", 100.0 * f)
    }
}

/// The file name of the mask of image `img` (`<stem>.png`, as in the dataset).
fn mask_file_name(img: &Path) -> String {
    format!(
        "{}.png",
        img.file_stem().unwrap_or_default().to_string_lossy()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distillation_is_zero_at_the_teacher_and_positive_elsewhere() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[[[1.0f32, -2.0]], [[0.5, 3.0]], [[0.0, 0.0]]]], &dev).unwrap();
        let same = kl_distill(&t, &t, 2.0).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-7, "{same}");
        let other = (&t * 0.5).unwrap();
        let d = kl_distill(&other, &t, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 1e-4, "{d}");
    }
}
