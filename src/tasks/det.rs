//! Object detection (COCO style), anchor-free on the head's stride-8 grid.
//!
//! - Data: `ROOT/mini_coco_det/<split>/<file_name>` + COCO JSON
//!   `ROOT/mini_coco_det/annotations/instances_<split>.json`. The classes are the JSON's
//!   categories, remapped to contiguous indices in increasing id order.
//! - Head slice: `5 + C` channels per cell: `tx, ty, tw, th` (box, see [`crate::boxes`]),
//!   objectness, `C` class logits (independent sigmoids).
//! - Loss: [`det_loss`] (centre sampling, BCE objectness and class, GIoU box).
//! - Metric: COCO mAP (pycocotools' protocol) at IoU 0.5 and 0.5:0.95.
//! - Splits: train and val; a held-out `test` split when its folder exists (the synthetic
//!   benchmark), scored exactly as val.
//! - Chance: the mAP of a prior-box predictor on the split ([`prior_boxes`],
//!   [`prior_box_map`]): each class's mean training box, relative to the image, predicted
//!   in every image with one constant score. A detector that has learned nothing about the
//!   image still knows where objects tend to be; random boxes would set the bar too low.
//! - Predictions (`onehead predict`) and exports (`onehead eval --export`): the evaluator's
//!   detections (model-input pixels, the image stretched to `S × S`) scaled to the original
//!   image's pixels; exports as a COCO results JSON with the dataset's own image and category
//!   ids. AP is the same in either frame: IoU is invariant to scaling each axis.
//! - Distillation: objectness BCE toward the teacher's probabilities on every cell; class
//!   KL and box L1 where the teacher is confident (Shmelkov et al. 2017, ERD 2022).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::det_loss::{det_loss, stable_bce_with_logits, DetLossParams};
use super::images::{crop_rect, ImageSet};
use super::{
    aug_at, check_request, no_split, require_dir, Augment, Batch, DistillParams, Evaluator,
    Exporter, Mark, OpenOptions, PerImage, PredictInput, Prediction, Split, Task, TaskLoss,
    TaskMetrics,
};
use crate::boxes::{self, cell_coords, crop_boxes, decode_boxes, flip_boxes, DetBox, Detection};
use crate::data::coco::CocoFile;
use crate::data::{DataError, DET_DIR};
use crate::metrics::map::{MapEvaluator, MapSummary};
use crate::model::OUTPUT_STRIDE;

/// The metrics detection reports (`map50` is its verdict metric by default).
pub const METRICS: [&str; 3] = ["map50", "map50_95", "map75"];

/// Detection settings of an experiment (`[tasks.det]`).
///
/// Evaluation keeps every candidate (`score_threshold = 0`, as pycocotools expects: it
/// applies no threshold), at most `max_detections` per image after NMS; a score cut would
/// count a uniform drift in confidence as forgetting although the ranking, which is all
/// that AP measures, is unchanged. `display_score_threshold` is for pictures only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetSettings {
    /// Candidates with a score at or below this are dropped before NMS when evaluating (a
    /// speed cut only; keep it 0 or at most 0.001 for mAP).
    pub score_threshold: f64,
    /// Boxes drawn on overlays (`onehead predict`) score above this.
    pub display_score_threshold: f64,
    /// Same-class boxes with IoU above this to a better kept box are suppressed.
    pub nms_iou: f64,
    /// Detections kept per image after NMS (COCO's maxDets).
    pub max_detections: usize,
    /// Candidates per image entering NMS (highest scores first).
    pub pre_nms_top_k: usize,
}

impl Default for DetSettings {
    fn default() -> Self {
        Self {
            score_threshold: 0.0,
            display_score_threshold: 0.3,
            nms_iou: 0.5,
            max_detections: 100,
            pre_nms_top_k: 1000,
        }
    }
}

impl DetSettings {
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            [
                self.score_threshold,
                self.display_score_threshold,
                self.nms_iou
            ]
            .iter()
            .all(|v| (0.0..=1.0).contains(v)),
            "tasks.det: score_threshold, display_score_threshold and nms_iou must be in [0, 1]"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.max_detections)
                && (1..=100_000).contains(&self.pre_nms_top_k),
            "tasks.det: max_detections must be from 1 to 10000 and pre_nms_top_k from 1 to 100000"
        );
        Ok(())
    }

    /// Parse and validate a `[tasks.det]` table (defaults for absent keys).
    pub fn check(table: &toml::Value) -> Result<()> {
        let s: DetSettings = table.clone().try_into().map_err(|e: toml::de::Error| {
            anyhow::anyhow!("[tasks.det]: {}", e.message().trim_end())
        })?;
        s.validate()
    }
}

/// The COCO JSON of a detection split under `root`.
pub fn coco_json_path(root: &Path, split: Split) -> PathBuf {
    root.join(DET_DIR)
        .join("annotations")
        .join(format!("instances_{}.json", split.name()))
}

/// One split: images and their boxes in model-input pixels.
pub struct DetSplit {
    pub images: ImageSet,
    /// Boxes per sample in pixels of the `S × S` model input.
    boxes: Vec<Vec<DetBox>>,
    /// Category names in contiguous-index order.
    pub class_names: Vec<String>,
    /// COCO image id of each sample.
    pub image_ids: Vec<u64>,
    /// COCO category id of each contiguous class index.
    pub category_ids: Vec<u64>,
}

impl DetSplit {
    /// Open `root/mini_coco_det/<split>` with its COCO JSON (`keep_originals`: keep a
    /// crop-source copy of images larger than the model input). Errors name the file:
    /// missing folder or JSON, annotation of an unknown image or category, missing image
    /// file, corrupt image.
    pub fn open(
        root: &Path,
        split: Split,
        image_size: usize,
        keep_originals: bool,
    ) -> Result<Self> {
        let dir = require_dir(root.join(DET_DIR).join(split.name()), root)?;
        let json_path = coco_json_path(root, split);
        if !json_path.is_file() {
            return Err(DataError::MissingDataset {
                path: json_path,
                root: root.to_path_buf(),
            }
            .into());
        }
        let mut coco = CocoFile::read(&json_path)?;
        for w in coco.check(&json_path)? {
            tracing::warn!("{w}");
        }
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
            let &ii = img_index.get(&a.image_id).ok_or(DataError::UnknownImage {
                json: json_path.clone(),
                ann_id: a.id,
                image_id: a.image_id,
            })?;
            let &ci = cat_index
                .get(&a.category_id)
                .ok_or(DataError::UnknownCategory {
                    json: json_path.clone(),
                    ann_id: a.id,
                    category_id: a.category_id,
                })?;
            per_image[ii].push((ci, a.bbox, a.iscrowd != 0));
        }
        let paths: Vec<PathBuf> = coco
            .images
            .iter()
            .map(|im| dir.join(&im.file_name))
            .collect();
        if let Some(p) = paths.iter().find(|p| !p.is_file()) {
            return Err(DataError::MissingImageFile {
                json: json_path.clone(),
                path: p.clone(),
            }
            .into());
        }
        if paths.is_empty() {
            return Err(DataError::EmptyFolder { path: json_path }.into());
        }
        let images = ImageSet::load(paths, image_size, keep_originals)?;
        let size = image_size as f32;
        let boxes = per_image
            .into_iter()
            .zip(&images.orig_sizes)
            .map(|(anns, &(w, h))| {
                // Scale with the decoded size (the JSON's width/height may be absent or stale).
                let (sx, sy) = (size / w as f32, size / h as f32);
                anns.into_iter()
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
                    .collect()
            })
            .collect();
        Ok(Self {
            images,
            boxes,
            class_names: coco.categories.iter().map(|c| c.name.clone()).collect(),
            image_ids: coco.images.iter().map(|im| im.id).collect(),
            category_ids: coco.categories.iter().map(|c| c.id).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    /// The boxes of sample `i` (model-input pixels); `None` past the end.
    pub fn boxes_of(&self, i: usize) -> Option<&[DetBox]> {
        self.boxes.get(i).map(|b| b.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }

    /// The unaugmented boxes of sample `i` in model-input pixels.
    pub fn boxes(&self, i: usize) -> &[DetBox] {
        &self.boxes[i]
    }

    /// Images and boxes of `indices`, sample k transformed by `augs[k]` (crop, then flip).
    pub fn batch(
        &self,
        indices: &[usize],
        augs: &[Augment],
        device: &Device,
    ) -> Result<(Tensor, Vec<Vec<DetBox>>)> {
        check_request("det", indices, augs, self.len())?;
        let s = self.images.image_size;
        let sf = s as f32;
        let targets = indices
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let a = aug_at(augs, k);
                let b = match a.crop {
                    Some(c) => crop_boxes(&self.boxes[i], crop_rect(c, s, s)?, sf, sf),
                    None => self.boxes[i].clone(),
                };
                Ok(if a.flip { flip_boxes(&b, sf) } else { b })
            })
            .collect::<Result<_>>()?;
        Ok((self.images.tensor(indices, augs, device)?, targets))
    }
}

/// The head slice `(B, 5 + C, h, w)` as `(B, N, 5 + C)` per-cell rows, `N = h·w` row-major.
pub fn cells(out: &Tensor) -> Result<Tensor> {
    let (b, ch, h, w) = out.dims4()?;
    Ok(out.reshape((b, ch, h * w))?.transpose(1, 2)?.contiguous()?)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Decode raw per-cell outputs `(B, N, 5 + C)` on a `(h, w)` grid into detections per image,
/// in pixels of the `(height, width)` model input: boxes from [`decode_boxes`] (the loss's
/// own parametrisation), scores `σ(obj)·σ(class)` for every class of every cell (multi-label,
/// as FCOS), score threshold, `pre_nms_top_k`, per-class NMS, `max_detections`. Boxes with
/// zero area after clipping are dropped.
pub fn decode(
    det: &Tensor,
    grid: (usize, usize),
    image_size: (usize, usize),
    p: &DetSettings,
) -> Result<Vec<Vec<Detection>>> {
    let (_b, n, ch) = det.dims3()?;
    anyhow::ensure!(
        n == grid.0 * grid.1 && ch >= 6,
        "decode: det {:?} does not match grid {grid:?} (expected (B, {}, 5 + C), C ≥ 1)",
        det.dims(),
        grid.0 * grid.1
    );
    let num_classes = ch - 5;
    let thr = p.score_threshold as f32;
    let cells = cell_coords(grid, det.device())?;
    let bxs = decode_boxes(&det.narrow(2, 0, 4)?, &cells, OUTPUT_STRIDE)?;
    let all = Tensor::cat(&[bxs, det.narrow(2, 4, ch - 4)?], 2)?
        .to_dtype(DType::F32)?
        .to_vec3::<f32>()?;
    let mut out = Vec::with_capacity(all.len());
    for img in all {
        let mut cands = Vec::new();
        for row in &img {
            let obj = sigmoid(row[4]);
            if obj <= thr {
                continue; // score ≤ obj: nothing of this cell can pass
            }
            let bbox = boxes::clip(&[row[0], row[1], row[2], row[3]], image_size);
            if boxes::area(&bbox) <= 0.0 {
                continue;
            }
            for c in 0..num_classes {
                let score = obj * sigmoid(row[5 + c]);
                if score > thr {
                    cands.push(Detection {
                        bbox,
                        score,
                        class: c,
                    });
                }
            }
        }
        cands.sort_by(|a, b| b.score.total_cmp(&a.score));
        cands.truncate(p.pre_nms_top_k);
        out.push(boxes::nms_per_class(
            cands,
            p.nms_iou as f32,
            p.max_detections,
        ));
    }
    Ok(out)
}

/// The mean box of each class over `train`'s non-crowd boxes, `None` for a class without
/// any. Every image is stretched to the same `S × S` model input, so a box in model-input
/// pixels is its box relative to the image's width and height times `S`: the mean is the
/// mean relative box, and predicting it in another image is the prior box scaled to that
/// image's size.
pub fn prior_boxes(train: &[Vec<DetBox>], num_classes: usize) -> Vec<Option<[f32; 4]>> {
    let mut sums = vec![([0f64; 4], 0usize); num_classes];
    for b in train
        .iter()
        .flatten()
        .filter(|b| !b.crowd && b.class < num_classes)
    {
        let (sum, n) = &mut sums[b.class];
        for (s, v) in sum.iter_mut().zip(b.bbox) {
            *s += v as f64;
        }
        *n += 1;
    }
    sums.into_iter()
        .map(|(sum, n)| (n > 0).then(|| sum.map(|v| (v / n as f64) as f32)))
        .collect()
}

/// The COCO mAP of predicting `priors` (one box per class, score 1) in every image of a
/// split with ground truths `gts`. All scores tie, so COCO's stable order (image order)
/// ranks them.
pub fn prior_box_map(priors: &[Option<[f32; 4]>], gts: &[Vec<DetBox>]) -> Result<MapSummary> {
    Ok(prior_box_evaluator(priors, gts)?.summarize())
}

/// The prior-box predictor's detections on a split, matched: its mAP and per-image scores.
fn prior_box_evaluator(priors: &[Option<[f32; 4]>], gts: &[Vec<DetBox>]) -> Result<MapEvaluator> {
    let dets: Vec<Detection> = priors
        .iter()
        .enumerate()
        .filter_map(|(class, b)| {
            b.map(|bbox| Detection {
                bbox,
                score: 1.0,
                class,
            })
        })
        .collect();
    let mut map = MapEvaluator::new(priors.len());
    for gt in gts {
        map.add_image(&dets, gt)?;
    }
    Ok(map)
}

/// Detection as a [`Task`].
pub struct DetTask {
    pub train: DetSplit,
    pub val: DetSplit,
    /// The held-out test split, when the data has one (the synthetic benchmark).
    pub test: Option<DetSplit>,
    settings: DetSettings,
    /// The val split's COCO JSON (the ground truth of exports).
    val_json: PathBuf,
    /// The prior-box predictor's mAP on each split (the chance levels), and its per-image
    /// scores (what the "learned" test resamples).
    chance: Vec<(Split, MapSummary, PerImage)>,
}

impl DetTask {
    pub fn open(o: &OpenOptions) -> Result<Self> {
        let settings: DetSettings = o.settings("det")?;
        settings.validate()?;
        let train = DetSplit::open(&o.root, Split::Train, o.image_size, o.train_crops)?;
        let val = DetSplit::open(&o.root, Split::Val, o.image_size, false)?;
        // A missing test folder means the data has no test split (the course sets).
        let test = match o.root.join(DET_DIR).join(Split::Test.name()).is_dir() {
            true => Some(DetSplit::open(&o.root, Split::Test, o.image_size, false)?),
            false => None,
        };
        for (name, other) in [("val", Some(&val)), ("test", test.as_ref())] {
            let Some(other) = other else { continue };
            anyhow::ensure!(
                train.class_names == other.class_names,
                "det: the train and {name} annotations under {} have different categories ({} vs {})",
                o.root.display(),
                train.class_names.len(),
                other.class_names.len()
            );
        }
        let priors = prior_boxes(&train.boxes, train.class_names.len());
        let mut chance = Vec::new();
        for (split, data) in [(Split::Train, Some(&train)), (Split::Val, Some(&val))]
            .into_iter()
            .chain([(Split::Test, test.as_ref())])
        {
            if let Some(data) = data {
                let ev = prior_box_evaluator(&priors, &data.boxes)?;
                chance.push((split, ev.summarize(), PerImage::Boxes(ev.per_image())));
            }
        }
        Ok(Self {
            train,
            val,
            test,
            settings,
            val_json: coco_json_path(&o.root, Split::Val),
            chance,
        })
    }

    /// The detections of the val samples of `batch` in model-input pixels, as scored.
    fn val_detections(&self, out: &Tensor, batch: &Batch) -> Result<Vec<Vec<Detection>>> {
        let (_, _, h, w) = out.dims4()?;
        let s = batch.images.dim(2)?;
        decode(&cells(out)?, (h, w), (s, s), &self.settings)
    }

    /// The split, `None` for a test split the data does not have.
    fn split(&self, split: Split) -> Option<&DetSplit> {
        match split {
            Split::Train => Some(&self.train),
            Split::Val => Some(&self.val),
            Split::Test => self.test.as_ref(),
        }
    }

    /// The COCO category id of contiguous class `c`.
    pub fn category_id(&self, c: usize) -> u64 {
        self.train.category_ids[c]
    }

    pub fn settings(&self) -> &DetSettings {
        &self.settings
    }
}

/// Objectness prior π of the detection channel: bias = −log((1 − π) / π), as RetinaNet/FCOS
/// do, so that the objectness loss does not start out swamped by 99 % negatives.
pub const OBJECTNESS_PRIOR: f64 = 0.01;

impl Task for DetTask {
    fn name(&self) -> &str {
        "det"
    }

    fn class_names(&self) -> &[String] {
        &self.train.class_names
    }

    fn head_channels(&self) -> usize {
        5 + self.train.class_names.len()
    }

    fn head_bias_init(&self) -> Vec<(usize, f32)> {
        vec![(
            4,
            (-((1.0 - OBJECTNESS_PRIOR) / OBJECTNESS_PRIOR).ln()) as f32,
        )]
    }

    fn metric_names(&self) -> Vec<String> {
        METRICS.map(String::from).to_vec()
    }

    fn primary_metric(&self) -> &str {
        "map50"
    }

    fn chance_scores(&self, split: Split) -> Option<PerImage> {
        let (_, _, scores) = self.chance.iter().find(|(sp, _, _)| *sp == split)?;
        Some(scores.clone())
    }

    fn chance(&self, metric: &str, split: Split) -> Option<f64> {
        let (_, s, _) = self.chance.iter().find(|(sp, _, _)| *sp == split)?;
        match metric {
            "map50" => Some(s.map50),
            "map50_95" => Some(s.map50_95),
            "map75" => Some(s.map75),
            _ => None,
        }
    }

    fn len(&self, split: Split) -> usize {
        self.split(split).map_or(0, |s| s.len())
    }

    fn image_aspect(&self, split: Split, i: usize) -> f32 {
        self.split(split).map_or(1.0, |s| s.images.aspect(i))
    }

    /// The class of its largest box (ignore regions aside).
    fn image_class(&self, split: Split, i: usize) -> Option<usize> {
        let s = self.split(split)?;
        s.boxes_of(i)?
            .iter()
            .filter(|b| !b.crowd)
            .max_by(|a, b| boxes::area(&a.bbox).total_cmp(&boxes::area(&b.bbox)))
            .map(|b| b.class)
    }

    fn batch(
        &self,
        split: Split,
        indices: &[usize],
        augs: &[Augment],
        device: &Device,
    ) -> Result<Batch> {
        let data = self.split(split).ok_or_else(|| no_split("det", split))?;
        let (images, boxes) = data.batch(indices, augs, device)?;
        Ok(Batch::new(images, indices, boxes))
    }

    fn loss(&self, out: &Tensor, batch: &Batch) -> Result<TaskLoss> {
        let (_, _, h, w) = out.dims4()?;
        let targets: &Vec<Vec<DetBox>> = batch.targets()?;
        let l = det_loss(
            &cells(out)?,
            (h, w),
            OUTPUT_STRIDE,
            targets,
            &DetLossParams::default(),
        )?;
        Ok(TaskLoss {
            parts: vec![
                ("obj", l.obj as f64),
                ("cls", l.cls as f64),
                ("box", l.bbox as f64),
            ],
            total: l.total,
        })
    }

    fn evaluator(&self, _split: Split) -> Box<dyn Evaluator + '_> {
        // The split's ground truths come with its batches: one evaluator serves any split.
        Box::new(DetEvaluator {
            task: self,
            map: MapEvaluator::new(self.train.class_names.len()),
        })
    }

    fn distill(&self, student: &Tensor, teacher: &Tensor, p: &DistillParams) -> Result<Tensor> {
        distill_cells(&cells(student)?, &cells(teacher)?, p.temperature)
    }

    fn predict(&self, out: &Tensor, input: &PredictInput) -> Result<Option<Prediction>> {
        let (_, _, h, w) = out.dims4()?;
        let s = input.image_size;
        let dets = decode(&cells(out)?, (h, w), (s, s), &self.settings)?
            .pop()
            .context("one image expected")?;
        let (ow, oh) = input.orig_size;
        let (sx, sy) = (ow as f32 / s as f32, oh as f32 / s as f32);
        let names = self.class_names();
        let shown = self.settings.display_score_threshold as f32;
        let mut marks = Vec::new();
        let mut rows = Vec::with_capacity(dets.len());
        for d in &dets {
            let b = boxes::scale(&d.bbox, sx, sy);
            rows.push(serde_json::json!({
                "bbox": xywh(&b),
                "score": d.score,
                "class_id": d.class,
                "category_id": self.category_id(d.class),
                "name": names[d.class],
            }));
            if d.score > shown {
                marks.push(Mark::Box {
                    bbox: b,
                    label: format!("{} {:.2}", names[d.class], d.score),
                    colour: d.class,
                });
            }
        }
        let n = marks.len();
        marks.push(Mark::Legend {
            title: "det".into(),
            items: vec![(
                format!(
                    "{} box{} above {:.2} (of {})",
                    if n == 0 {
                        "no".to_string()
                    } else {
                        n.to_string()
                    },
                    if n == 1 { "" } else { "es" },
                    shown,
                    dets.len()
                ),
                None,
            )],
        });
        Ok(Some(Prediction {
            json: serde_json::json!({
                "bbox_format": "[x, y, width, height] in pixels of the original image (COCO)",
                "display_score_threshold": self.settings.display_score_threshold,
                "detections": rows,
            }),
            marks,
            files: vec![],
        }))
    }

    fn exporter(&self, dir: &Path) -> Result<Option<Box<dyn Exporter + '_>>> {
        let dir = dir.join("det");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Some(Box::new(DetExporter {
            task: self,
            file: dir.join("coco_results.json"),
            results: Vec::new(),
        })))
    }
}

/// `[x0, y0, x1, y1]` as COCO's `[x, y, width, height]`.
pub fn xywh(b: &[f32; 4]) -> [f32; 4] {
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// One detection of a COCO results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoResult {
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]` in pixels of the original image.
    pub bbox: [f32; 4],
    pub score: f32,
}

/// Collects the val split's detections as a COCO results JSON (what pycocotools'
/// `COCO.loadRes` reads): the evaluator's detections scaled to original-image pixels.
struct DetExporter<'a> {
    task: &'a DetTask,
    file: PathBuf,
    results: Vec<CocoResult>,
}

impl Exporter for DetExporter<'_> {
    fn add(&mut self, out: &Tensor, batch: &Batch) -> Result<()> {
        let s = batch.images.dim(2)? as f32;
        let val = &self.task.val;
        for (dets, &i) in self
            .task
            .val_detections(out, batch)?
            .iter()
            .zip(&batch.indices)
        {
            let (w, h) = val.images.orig_sizes[i];
            let (sx, sy) = (w as f32 / s, h as f32 / s);
            for d in dets {
                self.results.push(CocoResult {
                    image_id: val.image_ids[i],
                    category_id: self.task.category_id(d.class),
                    bbox: xywh(&boxes::scale(&d.bbox, sx, sy)),
                    score: d.score,
                });
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<serde_json::Value> {
        crate::files::write_atomic(&self.file, &serde_json::to_vec(&self.results)?)?;
        Ok(serde_json::json!({
            "results": "det/coco_results.json",
            "count": self.results.len(),
            "format": "COCO results JSON: [{image_id, category_id, bbox: [x, y, width, height] in original-image pixels, score}]",
            "ground_truth": super::absolute_display(&self.task.val_json),
        }))
    }
}

/// Teacher objectness probability above which a cell's class and box outputs are distilled.
pub const DISTILL_CONFIDENT: f64 = 0.3;

/// Detection distillation on per-cell outputs `(B, N, 5 + C)`: objectness BCE toward the
/// teacher's probability on every cell (mean over cells); on cells where the teacher's
/// objectness ≥ [`DISTILL_CONFIDENT`], class-probability BCE toward the teacher's and L1 on the
/// raw box outputs (means over those cells). 0 at the teacher (up to the BCE's entropy floor,
/// which is subtracted so that the term is exactly 0 there).
pub fn distill_cells(student: &Tensor, teacher: &Tensor, _temperature: f64) -> Result<Tensor> {
    anyhow::ensure!(
        student.dims() == teacher.dims(),
        "distill: student {:?} vs teacher {:?}",
        student.dims(),
        teacher.dims()
    );
    let teacher = teacher.detach();
    let (b, n, ch) = student.dims3()?;
    let s = student.reshape((b * n, ch))?;
    let t = teacher.reshape((b * n, ch))?;
    let sig = |x: &Tensor| candle_nn::ops::sigmoid(x);
    // BCE(x, σ(t)) − BCE(t, σ(t)) = KL(Bern(σ t) ‖ Bern(σ x)) ≥ 0, 0 iff x = t.
    let bern_kl = |x: &Tensor, tl: &Tensor| -> Result<Tensor> {
        let p = sig(tl)?;
        Ok((stable_bce_with_logits(x, &p)? - stable_bce_with_logits(tl, &p)?)?)
    };
    let obj = bern_kl(&s.narrow(1, 4, 1)?, &t.narrow(1, 4, 1)?)?.mean_all()?;
    let conf: Vec<u32> = sig(&t.narrow(1, 4, 1)?)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, &p)| p as f64 >= DISTILL_CONFIDENT)
        .map(|(i, _)| i as u32)
        .collect();
    if conf.is_empty() {
        return Ok(obj);
    }
    let idx = Tensor::from_vec(conf.clone(), conf.len(), s.device())?;
    let (sp, tp) = (s.index_select(&idx, 0)?, t.index_select(&idx, 0)?);
    let cls = bern_kl(&sp.narrow(1, 5, ch - 5)?, &tp.narrow(1, 5, ch - 5)?)?
        .sum(D::Minus1)?
        .mean_all()?;
    let bx = (sp.narrow(1, 0, 4)? - tp.narrow(1, 0, 4)?)?
        .abs()?
        .sum(D::Minus1)?
        .mean_all()?;
    Ok(((obj + cls)? + bx)?)
}

struct DetEvaluator<'a> {
    task: &'a DetTask,
    map: MapEvaluator,
}

impl Evaluator for DetEvaluator<'_> {
    fn add(&mut self, out: &Tensor, batch: &Batch) -> Result<()> {
        let dets = self.task.val_detections(out, batch)?;
        let gts: &Vec<Vec<DetBox>> = batch.targets()?;
        for (d, gt) in dets.iter().zip(gts) {
            self.map.add_image(d, gt)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<TaskMetrics> {
        Ok(self.metrics())
    }

    fn finish_scored(self: Box<Self>) -> Result<(TaskMetrics, Option<PerImage>)> {
        Ok((self.metrics(), Some(PerImage::Boxes(self.map.per_image()))))
    }
}

impl DetEvaluator<'_> {
    fn metrics(&self) -> TaskMetrics {
        let s = self.map.summarize();
        let mut m = TaskMetrics::new();
        m.insert("map50".into(), s.map50);
        m.insert("map50_95".into(), s.map50_95);
        m.insert("map75".into(), s.map75);
        for (name, ap) in self.task.train.class_names.iter().zip(&s.per_class_ap50) {
            if let Some(ap) = ap {
                m.insert(format!("ap50.{name}"), *ap);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(bbox: [f32; 4], class: usize) -> DetBox {
        DetBox {
            bbox,
            class,
            crowd: false,
        }
    }

    #[test]
    fn prior_box_chance_is_one_where_objects_never_move_and_low_where_they_do() {
        // Class 0 always at the same place; class 1 in every image too, but far apart.
        let fixed = [20.0, 20.0, 60.0, 60.0];
        let spread = |i: usize| {
            let x = [0.0, 150.0, 0.0, 150.0][i % 4];
            let y = [0.0, 0.0, 150.0, 150.0][i % 4];
            [x, y, x + 50.0, y + 50.0]
        };
        let train: Vec<Vec<DetBox>> = (0..8)
            .map(|i| vec![gt(fixed, 0), gt(spread(i), 1)])
            .collect();
        let priors = prior_boxes(&train, 3);
        assert_eq!(priors[0], Some(fixed));
        assert_eq!(priors[1], Some([75.0, 75.0, 125.0, 125.0]));
        assert_eq!(priors[2], None, "no training box: no prediction");
        let val: Vec<Vec<DetBox>> = (0..4)
            .map(|i| vec![gt(fixed, 0), gt(spread(i + 1), 1)])
            .collect();
        let s = prior_box_map(&priors, &val).unwrap();
        assert!((s.per_class_ap50[0].unwrap() - 1.0).abs() < 1e-9);
        // The mean box of the four corners overlaps none of them by IoU 0.5: AP 0.
        assert_eq!(s.per_class_ap50[1], Some(0.0));
        assert!((s.map50 - 0.5).abs() < 1e-9);
        // Crowd boxes do not move the prior.
        let mut crowded = train.clone();
        crowded[0].push(DetBox {
            bbox: [0.0, 0.0, 200.0, 200.0],
            class: 0,
            crowd: true,
        });
        assert_eq!(prior_boxes(&crowded, 3)[0], Some(fixed));
    }

    #[test]
    fn distillation_is_zero_at_the_teacher_and_grows_away_from_it() {
        let dev = Device::Cpu;
        // 1 image, 3 cells, 5 + 2 channels; cell 0 confident, the others not.
        let t = Tensor::new(
            &[[
                [0.1f32, -0.2, 0.3, 0.0, 3.0, 2.0, -1.0],
                [0.0, 0.0, 0.0, 0.0, -4.0, 0.0, 0.0],
                [0.5, 0.5, -0.5, 0.2, -6.0, 1.0, 1.0],
            ]],
            &dev,
        )
        .unwrap();
        let zero = distill_cells(&t, &t, 1.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(zero.abs() < 1e-6, "{zero}");
        // Moving a box output of the confident cell costs; of an unconfident cell, nothing.
        let bump = |cell: usize| {
            let mut v = t.to_vec3::<f32>().unwrap();
            v[0][cell][0] += 1.0;
            let s = Tensor::new(v, &dev).unwrap();
            distill_cells(&s, &t, 1.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(bump(0) > 0.5, "{}", bump(0));
        assert!(bump(1).abs() < 1e-6, "{}", bump(1));
    }
}
