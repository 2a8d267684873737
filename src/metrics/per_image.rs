//! Per-image scores: what each image of a split contributes to its metric, kept so that the
//! metric can be recomputed on any bootstrap resample of the images without the model
//! ([`super::bootstrap`]). Each kind reproduces its evaluator exactly: with every image
//! counted once, [`PerImage::value`] is the metric the evaluator reports.
//!
//! A resample is given as `counts[i]` = how many times image `i` is in it (0 drops it). It
//! is scored as the split in which image `i` appears `counts[i]` times: its pixels, boxes,
//! detections and hits are counted that many times.
//!
//! JSON (written per task at every stage end, so kept compact):
//! ```json
//! {"kind": "iou", "num_classes": 21, "images": [[[0, 9000, 9400, 9100], [15, 700, 900, 800]], …]}
//! {"kind": "boxes", "num_classes": 10, "images": [{"gt": [1, 0, …], "class": [0, 0, 3],
//!   "score": [0.91, 0.2, 0.5], "matched": [1023, 0, 31]}, …]}
//! {"kind": "hits", "num_classes": 10, "labels": [3, 7, …], "ranks": [0, 5, …]}
//! ```

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::coco::{recall_points, NUM_IOU_THRESHOLDS, NUM_RECALL_POINTS};
use super::miou::ConfusionMatrix;
use super::MetricError;

/// The per-image scores of one task's evaluation of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PerImage {
    /// Segmentation: per image, per class, pixel counts.
    Iou(IouCounts),
    /// Detection: what COCO's accumulate needs, per image.
    Boxes(BoxScores),
    /// Classification: per image, the label and its rank.
    Hits(TopHits),
}

impl PerImage {
    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            PerImage::Iou(x) => x.images.len(),
            PerImage::Boxes(x) => x.images.len(),
            PerImage::Hits(x) => x.labels.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The metric on a bootstrap resample in which image `i` appears `counts[i]` times
    /// (counts all 1: the metric on the split, equal to what the evaluator reports). `None`
    /// for a metric this kind cannot recompute, `counts` of the wrong length, or malformed
    /// scores (a class out of range, arrays of different lengths).
    pub fn value(&self, metric: &str, counts: &[u32]) -> Option<f64> {
        if counts.len() != self.len() {
            return None;
        }
        match self {
            PerImage::Iou(x) => x.value(metric, counts),
            PerImage::Boxes(x) => x.value(metric, counts),
            PerImage::Hits(x) => x.value(metric, counts),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Segmentation.

/// Per image, for every class it has pixels of (in ground truth or prediction), the entry
/// `[class, intersection, ground-truth pixels, predicted pixels]`; pixels whose ground truth
/// is ignored are not counted. Summed over images these are the diagonal, row and column
/// sums of [`ConfusionMatrix`], which is all its mIoU and pixel accuracy read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IouCounts {
    pub num_classes: usize,
    pub images: Vec<Vec<[u64; 4]>>,
}

impl IouCounts {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            images: Vec::new(),
        }
    }

    /// Appends one image given its own confusion matrix.
    pub fn push(&mut self, cm: &ConfusionMatrix) -> Result<(), MetricError> {
        if cm.num_classes() != self.num_classes {
            return Err(MetricError::LengthMismatch {
                what: "per-image confusion matrix classes",
                left: self.num_classes,
                right: cm.num_classes(),
            });
        }
        let entries = (0..self.num_classes)
            .map(|k| [k as u64, cm.count(k, k), cm.gt_pixels(k), cm.pred_pixels(k)])
            .filter(|e| e[2] > 0 || e[3] > 0)
            .collect();
        self.images.push(entries);
        Ok(())
    }

    /// `[intersection, ground truth, predicted]` per class over the resample.
    fn totals(&self, counts: &[u32]) -> Option<Vec<[u64; 3]>> {
        let mut tot = vec![[0u64; 3]; self.num_classes];
        for (img, &w) in self.images.iter().zip(counts).filter(|(_, &w)| w > 0) {
            for e in img {
                let t = tot.get_mut(usize::try_from(e[0]).ok()?)?;
                for j in 0..3 {
                    t[j] += w as u64 * e[j + 1];
                }
            }
        }
        Some(tot)
    }

    /// `miou` (over the classes with ground truth in the resample, as
    /// [`ConfusionMatrix::miou`]), `miou_nanmean`, `pixel_acc`.
    fn value(&self, metric: &str, counts: &[u32]) -> Option<f64> {
        let tot = self.totals(counts)?;
        // IoU = TP / (TP + FP + FN) = inter / (gt + pred − inter), as per_class_iou.
        let iou = |t: &[u64; 3]| t[0] as f64 / (t[1] + t[2] - t[0]) as f64;
        let mean = |v: Vec<f64>| match v.len() {
            0 => 0.0,
            n => v.iter().sum::<f64>() / n as f64,
        };
        match metric {
            "miou" => Some(mean(tot.iter().filter(|t| t[1] > 0).map(iou).collect())),
            "miou_nanmean" => Some(mean(
                tot.iter().filter(|t| t[1] + t[2] > 0).map(iou).collect(),
            )),
            "pixel_acc" => {
                let total: u64 = tot.iter().map(|t| t[1]).sum();
                let correct: u64 = tot.iter().map(|t| t[0]).sum();
                Some(if total == 0 {
                    0.0
                } else {
                    correct as f64 / total as f64
                })
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Detection.

/// Every IoU threshold index, for `map50_95`.
const ALL_THRESHOLDS: [usize; NUM_IOU_THRESHOLDS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

/// One image's part of a COCO evaluation: its non-crowd ground truths per class and its kept
/// detections (COCO's `maxDets` applied), grouped by class in increasing order and, within a
/// class, in COCO's order (score descending, stable). Flags are bit masks over the IoU
/// thresholds: bit `t` is threshold `0.50 + 0.05·t`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageBoxes {
    /// Non-crowd ground truths per class (`num_classes` entries).
    pub gt: Vec<u32>,
    /// Class of each detection.
    pub class: Vec<u32>,
    /// Score of each detection.
    pub score: Vec<f32>,
    /// Bit `t`: the detection matched a ground truth at threshold `t`.
    pub matched: Vec<u16>,
    /// Bit `t`: the detection matched a crowd box at threshold `t` (neither TP nor FP);
    /// empty when no detection of the image ever is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<u16>,
}

/// The per-image detection scores of a split, with each class's detections of all images
/// ranked once (lazily, on the first [`BoxScores::value`]) so that a resample costs one pass
/// over the detections, not a sort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxScores {
    pub num_classes: usize,
    pub images: Vec<ImageBoxes>,
    #[serde(skip)]
    ranked: Ranked,
}

/// One class's detections of all images in COCO's accumulate order: score descending,
/// ties by image, then by the image's own order.
#[derive(Debug, Clone)]
struct RankedClass {
    image: Vec<u32>,
    matched: Vec<u16>,
    ignored: Vec<u16>,
}

/// The ranking cache: derived data, equal whenever the scores are (so not compared).
#[derive(Debug, Clone, Default)]
struct Ranked(OnceLock<Option<Vec<RankedClass>>>);

impl PartialEq for Ranked {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl BoxScores {
    pub fn new(num_classes: usize, images: Vec<ImageBoxes>) -> Self {
        Self {
            num_classes,
            images,
            ranked: Ranked::default(),
        }
    }

    /// The ranking, `None` when the scores are malformed.
    fn ranked(&self) -> Option<&[RankedClass]> {
        self.ranked.0.get_or_init(|| self.rank()).as_deref()
    }

    fn rank(&self) -> Option<Vec<RankedClass>> {
        let mut per_class: Vec<Vec<(f64, u32, u16, u16)>> = vec![Vec::new(); self.num_classes];
        for (i, im) in self.images.iter().enumerate() {
            let n = im.class.len();
            let ok = im.gt.len() == self.num_classes
                && im.score.len() == n
                && im.matched.len() == n
                && (im.ignored.is_empty() || im.ignored.len() == n);
            if !ok {
                return None;
            }
            for d in 0..n {
                let ignored = im.ignored.get(d).copied().unwrap_or(0);
                let entry = (im.score[d] as f64, i as u32, im.matched[d], ignored);
                per_class.get_mut(im.class[d] as usize)?.push(entry);
            }
        }
        let ranked = per_class
            .into_iter()
            .map(|mut v| {
                // Stable: equal scores keep image order, then the image's own order (as the
                // evaluator's stable sort of the concatenation); NaN last.
                v.sort_by(|a, b| {
                    b.0.partial_cmp(&a.0)
                        .unwrap_or_else(|| a.0.is_nan().cmp(&b.0.is_nan()))
                });
                RankedClass {
                    image: v.iter().map(|e| e.1).collect(),
                    matched: v.iter().map(|e| e.2).collect(),
                    ignored: v.iter().map(|e| e.3).collect(),
                }
            })
            .collect();
        Some(ranked)
    }

    /// `map50`, `map75`, `map50_95` as [`super::MapEvaluator::summarize`] computes them.
    ///
    /// An image counted `w` times enters with its ground truths `w` times and each of its
    /// detections `w` times in a row at the detection's place in the ranking. That is the
    /// split in which the image's copies are adjacent, except where two detections of one
    /// image and class have exactly equal scores (then every copy of the first precedes
    /// every copy of the second), an order that COCO's tie rule leaves to the input order
    /// anyway. `w` equal steps in a row are taken as one step of `w`: the interpolated
    /// precision is the same (within a run of true positives precision rises, within a run
    /// of false positives recall stays put, so the points in between never decide a
    /// sampled value).
    fn value(&self, metric: &str, counts: &[u32]) -> Option<f64> {
        let thresholds: &[usize] = match metric {
            "map50" => &[0],
            "map75" => &[5],
            "map50_95" => &ALL_THRESHOLDS,
            _ => return None,
        };
        let ranked = self.ranked()?;
        let mut buf: [Vec<(f64, f64)>; NUM_IOU_THRESHOLDS] = Default::default();
        let (mut sum, mut n) = (0.0, 0usize);
        for (c, rc) in ranked.iter().enumerate() {
            let npig: u64 = self
                .images
                .iter()
                .zip(counts)
                .map(|(im, &w)| w as u64 * im.gt[c] as u64)
                .sum();
            // Categories without non-crowd ground truth are excluded (COCO's −1).
            if npig == 0 {
                continue;
            }
            n += 1;
            let aps = class_aps(rc, counts, npig, thresholds, &mut buf);
            sum += thresholds.iter().map(|&t| aps[t]).sum::<f64>() / thresholds.len() as f64;
        }
        Some(if n == 0 { 0.0 } else { sum / n as f64 })
    }
}

/// AP of one class on a resample at each threshold of `thresholds`: COCO's accumulate
/// (precision made monotone, sampled at the 101 recall points, `searchsorted` left).
///
/// One pass over the ranked detections serves every threshold, and only the points right
/// after a true positive are kept: the monotone precision at recall `r` is the highest
/// precision of any point with recall ≥ `r`, and a point after a false positive has the
/// recall of an earlier point with a higher precision (or precision 0 before any true
/// positive), so it never is that highest. Most detections are false positives at every
/// threshold; they only bump one shared counter.
fn class_aps(
    rc: &RankedClass,
    counts: &[u32],
    npig: u64,
    thresholds: &[usize],
    pts: &mut [Vec<(f64, f64)>; NUM_IOU_THRESHOLDS],
) -> [f64; NUM_IOU_THRESHOLDS] {
    let npig = npig as f64;
    let wanted = thresholds.iter().fold(0u16, |m, &t| m | 1 << t);
    let (mut tp, mut fp) = ([0.0f64; NUM_IOU_THRESHOLDS], [0.0f64; NUM_IOU_THRESHOLDS]);
    let mut fp_all = 0.0f64;
    for p in pts.iter_mut() {
        p.clear();
    }
    for k in 0..rc.image.len() {
        let w = counts[rc.image[k] as usize] as f64;
        let (matched, ignored) = (rc.matched[k] & wanted, rc.ignored[k] & wanted);
        if w == 0.0 {
            continue;
        }
        if matched | ignored == 0 {
            fp_all += w;
            continue;
        }
        for &t in thresholds {
            // Ignored detections only repeat the previous point: dropping them changes nothing.
            if (ignored >> t) & 1 == 1 {
                continue;
            }
            if (matched >> t) & 1 == 1 {
                tp[t] += w;
                let f = fp_all + fp[t];
                pts[t].push((tp[t] / npig, tp[t] / (f + tp[t] + f64::EPSILON)));
            } else {
                fp[t] += w;
            }
        }
    }
    let mut aps = [0.0; NUM_IOU_THRESHOLDS];
    for &t in thresholds {
        aps[t] = sampled_precision(&mut pts[t]);
    }
    aps
}

/// The mean over the 101 recall points of the monotone precision of `pts` (recall, precision)
/// in order of non-decreasing recall.
fn sampled_precision(pts: &mut [(f64, f64)]) -> f64 {
    for i in (1..pts.len()).rev() {
        if pts[i].1 > pts[i - 1].1 {
            pts[i - 1].1 = pts[i].1;
        }
    }
    // Recall is non-decreasing: one forward walk finds every searchsorted-left index.
    let (mut sum, mut idx) = (0.0, 0);
    for r in recall_points() {
        while idx < pts.len() && pts[idx].0 < r {
            idx += 1;
        }
        if idx < pts.len() {
            sum += pts[idx].1;
        }
    }
    sum / NUM_RECALL_POINTS as f64
}

// ---------------------------------------------------------------------------------------------
// Classification.

/// Per image, the true label and its rank among the scores ([`super::topk::label_rank`]),
/// capped at 5 (all that Top-1 and Top-5 read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopHits {
    pub num_classes: usize,
    pub labels: Vec<u32>,
    pub ranks: Vec<u8>,
}

impl TopHits {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            labels: Vec::new(),
            ranks: Vec::new(),
        }
    }

    /// Appends one image: its label and the label's rank.
    pub fn push(&mut self, label: usize, rank: usize) -> Result<(), MetricError> {
        if label >= self.num_classes {
            return Err(MetricError::OutOfRange {
                what: "label",
                value: label,
                num_classes: self.num_classes,
            });
        }
        self.labels.push(label as u32);
        self.ranks.push(rank.min(5) as u8);
        Ok(())
    }

    /// `top1`, `top5` (`None` with 5 classes or fewer, as [`super::TopK::top5`]), `mean_acc`.
    fn value(&self, metric: &str, counts: &[u32]) -> Option<f64> {
        if self.ranks.len() != self.labels.len() {
            return None;
        }
        let rows = || {
            let ranks = self.labels.iter().zip(&self.ranks);
            ranks
                .zip(counts)
                .map(|((&y, &r), &w)| (y as usize, r, w as u64))
        };
        let total: u64 = rows().map(|(_, _, w)| w).sum();
        let share = |k: u8| {
            let hits: u64 = rows().filter(|&(_, r, _)| r < k).map(|(_, _, w)| w).sum();
            if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            }
        };
        match metric {
            "top1" => Some(share(1)),
            "top5" => (self.num_classes > 5).then(|| share(5)),
            "mean_acc" => {
                let mut per_class = vec![(0u64, 0u64); self.num_classes];
                for (y, r, w) in rows() {
                    let c = per_class.get_mut(y)?;
                    c.0 += w;
                    c.1 += if r < 1 { w } else { 0 };
                }
                let accs: Vec<f64> = per_class
                    .iter()
                    .filter(|(n, _)| *n > 0)
                    .map(|&(n, hits)| hits as f64 / n as f64)
                    .collect();
                Some(match accs.len() {
                    0 => 0.0,
                    n => accs.iter().sum::<f64>() / n as f64,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::boxes::{DetBox, Detection};
    use crate::metrics::topk::{label_rank, TopK};
    use crate::metrics::MapEvaluator;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Round trip through JSON (what is written to disk) before scoring.
    fn json(p: PerImage) -> PerImage {
        serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap()
    }

    fn seg_image(rng: &mut ChaCha8Rng) -> (Vec<u8>, Vec<u8>) {
        let n = rng.random_range(1..60);
        let gt = (0..n)
            .map(|_| match rng.random_range(0..10) {
                0 => 255,
                _ => rng.random_range(0..4),
            })
            .collect();
        let pred = (0..n).map(|_| rng.random_range(0..5)).collect();
        (pred, gt)
    }

    #[test]
    fn iou_counts_reproduce_the_confusion_matrix_and_its_resamples() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let images: Vec<_> = (0..30).map(|_| seg_image(&mut rng)).collect();
        let counts: Vec<u32> = (0..30).map(|_| rng.random_range(0..3)).collect();
        let (mut all, mut resampled) = (
            ConfusionMatrix::new(6).unwrap(),
            ConfusionMatrix::new(6).unwrap(),
        );
        let mut per = IouCounts::new(6);
        for ((p, g), &w) in images.iter().zip(&counts) {
            let mut one = ConfusionMatrix::new(6).unwrap();
            one.add(p, g).unwrap();
            all.merge(&one).unwrap();
            per.push(&one).unwrap();
            for _ in 0..w {
                resampled.merge(&one).unwrap();
            }
        }
        let per = json(PerImage::Iou(per));
        let ones = vec![1; 30];
        assert!(close(per.value("miou", &ones).unwrap(), all.miou()));
        assert!(close(
            per.value("miou_nanmean", &ones).unwrap(),
            all.miou_nanmean()
        ));
        assert!(close(
            per.value("pixel_acc", &ones).unwrap(),
            all.pixel_accuracy()
        ));
        assert!(close(per.value("miou", &counts).unwrap(), resampled.miou()));
        assert!(close(
            per.value("pixel_acc", &counts).unwrap(),
            resampled.pixel_accuracy()
        ));
        assert_eq!(per.value("map50", &ones), None);
        assert_eq!(per.value("miou", &[1, 1]), None);
    }

    #[test]
    fn iou_resamples_hand_computed() {
        // Image 0: gt [0,0,1,1], pred [0,0,1,0]; image 1: gt [1,1], pred [0,0].
        let mut per = IouCounts::new(2);
        for (p, g) in [
            (&[0u8, 0, 1, 0][..], &[0u8, 0, 1, 1][..]),
            (&[0, 0], &[1, 1]),
        ] {
            let mut one = ConfusionMatrix::new(2).unwrap();
            one.add(p, g).unwrap();
            per.push(&one).unwrap();
        }
        let per = PerImage::Iou(per);
        // Both once: class 0 inter 2 / union 5, class 1 inter 1 / union 4.
        assert!(close(
            per.value("miou", &[1, 1]).unwrap(),
            (0.4 + 0.25) / 2.0
        ));
        // Image 0 twice: class 0 4/8, class 1 2/6.
        assert!(close(
            per.value("miou", &[2, 1]).unwrap(),
            (0.5 + 2.0 / 6.0) / 2.0
        ));
        assert!(close(per.value("pixel_acc", &[2, 1]).unwrap(), 6.0 / 10.0));
        // Image 0 dropped: class 0 has no ground truth left (out of the mean), class 1 is 0.
        assert_eq!(per.value("miou", &[0, 1]).unwrap(), 0.0);
        // Image 1 dropped: class 0 2/3, class 1 1/2.
        assert!(close(
            per.value("miou", &[1, 0]).unwrap(),
            (2.0 / 3.0 + 0.5) / 2.0
        ));
    }

    fn det_image(rng: &mut ChaCha8Rng, classes: usize) -> (Vec<Detection>, Vec<DetBox>) {
        let bx = |rng: &mut ChaCha8Rng| {
            let (x, y) = (
                rng.random_range(0.0..80.0f32),
                rng.random_range(0.0..80.0f32),
            );
            [
                x,
                y,
                x + rng.random_range(5.0..40.0),
                y + rng.random_range(5.0..40.0),
            ]
        };
        let gts: Vec<DetBox> = (0..rng.random_range(0..5))
            .map(|_| DetBox {
                bbox: bx(rng),
                class: rng.random_range(0..classes),
                crowd: rng.random_bool(0.1),
            })
            .collect();
        // Scores on a coarse grid, so that ties across images are common, but distinct within
        // an image (there copies of an image and a resample differ, see BoxScores::value).
        let mut grid: Vec<f32> = (1..20).map(|k| k as f32 / 20.0).collect();
        let mut score = |rng: &mut ChaCha8Rng| grid.swap_remove(rng.random_range(0..grid.len()));
        let mut dets = Vec::new();
        for g in &gts {
            if rng.random_bool(0.3) {
                continue; // missed
            }
            let j = rng.random_range(-4.0..4.0f32);
            dets.push(Detection {
                bbox: [g.bbox[0] + j, g.bbox[1], g.bbox[2] + j, g.bbox[3]],
                score: score(rng),
                class: g.class,
            });
        }
        for _ in 0..rng.random_range(0..4) {
            dets.push(Detection {
                bbox: bx(rng),
                score: score(rng),
                class: rng.random_range(0..classes),
            });
        }
        (dets, gts)
    }

    #[test]
    fn box_scores_reproduce_map_and_its_resamples() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for round in 0..20 {
            let images: Vec<_> = (0..25).map(|_| det_image(&mut rng, 4)).collect();
            let counts: Vec<u32> = (0..25).map(|_| rng.random_range(0..3)).collect();
            let (mut all, mut resampled) = (MapEvaluator::new(4), MapEvaluator::new(4));
            for ((d, g), &w) in images.iter().zip(&counts) {
                all.add_image(d, g).unwrap();
                for _ in 0..w {
                    resampled.add_image(d, g).unwrap();
                }
            }
            let per = json(PerImage::Boxes(all.per_image()));
            let (s, r) = (all.summarize(), resampled.summarize());
            let ones = vec![1; 25];
            for (metric, a, b) in [
                ("map50", s.map50, r.map50),
                ("map75", s.map75, r.map75),
                ("map50_95", s.map50_95, r.map50_95),
            ] {
                assert!(
                    close(per.value(metric, &ones).unwrap(), a),
                    "{round} {metric}"
                );
                // Copies adjacent in image order = what the resample scores (these images
                // have no equal scores within one class of one image, almost surely).
                let v = per.value(metric, &counts).unwrap();
                assert!(close(v, b), "{round} {metric}: {v} vs {b}");
            }
            // With ties everywhere (two score levels), the split itself is still exact.
            let mut tied = MapEvaluator::new(4);
            for (d, g) in &images {
                let d: Vec<Detection> = d
                    .iter()
                    .map(|x| Detection {
                        score: if x.score > 0.5 { 1.0 } else { 0.5 },
                        ..*x
                    })
                    .collect();
                tied.add_image(&d, g).unwrap();
            }
            let per = PerImage::Boxes(tied.per_image());
            let s = tied.summarize();
            assert!(close(per.value("map50_95", &ones).unwrap(), s.map50_95));
            assert!(close(per.value("map50", &ones).unwrap(), s.map50));
        }
    }

    #[test]
    fn box_resamples_hand_computed() {
        let gt = |class| DetBox {
            bbox: [10.0, 10.0, 50.0, 50.0],
            class,
            crowd: false,
        };
        let det = |x: f32, score| Detection {
            bbox: [x, 10.0, x + 40.0, 50.0],
            score,
            class: 0,
        };
        // Image 0: a TP at 0.9; image 1: its object missed, an FP at 0.8 elsewhere.
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(10.0, 0.9)], &[gt(0)]).unwrap();
        e.add_image(&[det(200.0, 0.8)], &[gt(0)]).unwrap();
        let per = PerImage::Boxes(e.per_image());
        // Recall 1/2 at precision 1: recall points 0..0.50 → 51/101.
        assert!(close(per.value("map50", &[1, 1]).unwrap(), 51.0 / 101.0));
        // Image 1 twice: recall 1/3 at precision 1 → points 0..0.33 → 34/101.
        assert!(close(per.value("map50", &[1, 2]).unwrap(), 34.0 / 101.0));
        // Image 0 twice: recall 2/3 at precision 1 → points 0..0.66 → 67/101.
        assert!(close(per.value("map50", &[2, 1]).unwrap(), 67.0 / 101.0));
        // Image 1 only: no TP → 0; image 0 only: perfect (1 − ε as COCO's precision).
        assert_eq!(per.value("map50", &[0, 1]).unwrap(), 0.0);
        assert!(close(per.value("map50_95", &[3, 0]).unwrap(), 1.0));
        assert_eq!(per.value("top1", &[1, 1]), None);
    }

    #[test]
    fn hits_reproduce_topk_and_its_resamples() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut all, mut resampled) = (TopK::new(), TopK::new());
        let mut hits = TopHits::new(8);
        let mut counts = Vec::new();
        for _ in 0..40 {
            let scores: Vec<f32> = (0..8).map(|_| rng.random_range(0..4) as f32).collect();
            let y = rng.random_range(0..8);
            let w = rng.random_range(0..3);
            all.add(&scores, y).unwrap();
            hits.push(y, label_rank(&scores, y)).unwrap();
            for _ in 0..w {
                resampled.add(&scores, y).unwrap();
            }
            counts.push(w);
        }
        let per = json(PerImage::Hits(hits));
        let ones = vec![1; 40];
        assert!(close(per.value("top1", &ones).unwrap(), all.top1()));
        assert!(close(
            per.value("top5", &ones).unwrap(),
            all.top5().unwrap()
        ));
        assert!(close(
            per.value("mean_acc", &ones).unwrap(),
            all.mean_class_accuracy()
        ));
        assert!(close(per.value("top1", &counts).unwrap(), resampled.top1()));
        assert!(close(
            per.value("mean_acc", &counts).unwrap(),
            resampled.mean_class_accuracy()
        ));
    }

    #[test]
    fn hits_resamples_hand_computed() {
        let per = PerImage::Hits(TopHits {
            num_classes: 10,
            labels: vec![0, 1, 2, 3],
            ranks: vec![0, 0, 3, 5],
        });
        assert_eq!(per.len(), 4);
        assert!(close(per.value("top1", &[1, 1, 1, 1]).unwrap(), 0.5));
        assert!(close(per.value("top5", &[1, 1, 1, 1]).unwrap(), 0.75));
        // Image 2 twice: 2 hits of 5.
        assert!(close(per.value("top1", &[1, 1, 2, 1]).unwrap(), 0.4));
        // Misses dropped: 1.
        assert!(close(per.value("top1", &[3, 1, 0, 0]).unwrap(), 1.0));
        // Per class: classes 0 and 1 right, 2 and 3 wrong → 0.5 whatever the weights.
        assert!(close(per.value("mean_acc", &[3, 1, 2, 1]).unwrap(), 0.5));
    }
}
