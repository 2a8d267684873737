//! COCO-style box mAP, following pycocotools' `COCOeval` (`evaluateImg` + `accumulate` +
//! `summarize`) for `iouType = "bbox"`, area range "all", `maxDets = 100`:
//!
//! - per image and category, detections sorted by score (descending, stable: ties keep
//!   their input order, like numpy's mergesort), only the first 100 kept (COCO applies
//!   `maxDets` per image *and category*; the detection task's decoding already caps the
//!   whole image at 100);
//! - ground truths ordered non-crowd first; at each IoU threshold 0.50:0.05:0.95 each
//!   detection greedily takes the unmatched ground truth with the highest IoU ≥ threshold,
//!   preferring a non-crowd one; crowd ground truths may be matched many times and use the
//!   crowd IoU (intersection / detection area); a detection matched to a crowd box is ignored
//!   (neither TP nor FP), crowd boxes never count as misses;
//! - per category, detections of all images are merged by score (stable, image order
//!   first), precision is made monotone and sampled at the 101 recall points 0:0.01:1
//!   (`searchsorted` left; beyond the reached recall the precision is 0);
//! - categories without any non-crowd ground truth are excluded (COCO's −1), the summary
//!   averages over the remaining categories.

use super::per_image::{BoxScores, ImageBoxes};
use super::MetricError;
use crate::boxes::{self, DetBox, Detection};

pub use super::coco::{
    iou_thresholds, recall_points, MAX_DETS, NUM_IOU_THRESHOLDS, NUM_RECALL_POINTS,
};

/// Summary of an evaluation. With no category having ground truth every value is 0.0 and
/// every per-class entry `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct MapSummary {
    /// AP at IoU 0.50, mean over categories with ground truth.
    pub map50: f64,
    /// AP averaged over IoU 0.50:0.05:0.95 (COCO's headline "AP").
    pub map50_95: f64,
    /// AP at IoU 0.75.
    pub map75: f64,
    /// AP@0.50 per category; `None` for categories without non-crowd ground truth.
    pub per_class_ap50: Vec<Option<f64>>,
    /// AP@[0.50:0.95] per category; `None` likewise.
    pub per_class_ap: Vec<Option<f64>>,
    /// Number of categories averaged.
    pub num_classes_with_gt: usize,
}

/// Accumulates detections and ground truths image by image; [`MapEvaluator::summarize`]
/// runs the COCO evaluation.
#[derive(Debug, Clone)]
pub struct MapEvaluator {
    num_classes: usize,
    images: Vec<(Vec<Detection>, Vec<DetBox>)>,
}

/// Per image × category matching result (COCO's `evaluateImg` output).
struct ImageEval {
    /// Scores of the kept detections, sorted descending.
    scores: Vec<f64>,
    /// `[t][d]` detection matched to a ground truth at threshold t.
    matched: Vec<Vec<bool>>,
    /// `[t][d]` detection ignored (matched to a crowd box) at threshold t.
    ignored: Vec<Vec<bool>>,
    /// Non-crowd ground truths.
    num_gt: usize,
}

impl MapEvaluator {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            images: Vec::new(),
        }
    }

    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    /// Adds one image's detections (any order) and ground truths. Classes must be
    /// `< num_classes`; on error nothing is added.
    pub fn add_image(&mut self, dets: &[Detection], gts: &[DetBox]) -> Result<(), MetricError> {
        for c in dets
            .iter()
            .map(|d| d.class)
            .chain(gts.iter().map(|g| g.class))
        {
            if c >= self.num_classes {
                return Err(MetricError::OutOfRange {
                    what: "detection class",
                    value: c,
                    num_classes: self.num_classes,
                });
            }
        }
        self.images.push((dets.to_vec(), gts.to_vec()));
        Ok(())
    }

    /// Appends the images of another evaluator (after this one's, as COCO orders by image).
    pub fn merge(&mut self, other: &MapEvaluator) -> Result<(), MetricError> {
        if other.num_classes != self.num_classes {
            return Err(MetricError::LengthMismatch {
                what: "mAP evaluator classes",
                left: self.num_classes,
                right: other.num_classes,
            });
        }
        self.images.extend(other.images.iter().cloned());
        Ok(())
    }

    fn evaluate_image(dets: &[Detection], gts: &[DetBox], class: usize) -> Option<ImageEval> {
        // Ground truths: non-crowd first, stable (COCO sorts by the ignore flag).
        let mut g: Vec<&DetBox> = gts
            .iter()
            .filter(|b| b.class == class && !b.crowd)
            .collect();
        let num_gt = g.len();
        g.extend(gts.iter().filter(|b| b.class == class && b.crowd));
        let mut d: Vec<&Detection> = dets.iter().filter(|x| x.class == class).collect();
        if g.is_empty() && d.is_empty() {
            return None;
        }
        // Stable sort by descending score; NaN scores sort last.
        d.sort_by(|a, b| {
            let (sa, sb) = (a.score as f64, b.score as f64);
            sb.partial_cmp(&sa)
                .unwrap_or_else(|| sa.is_nan().cmp(&sb.is_nan()))
        });
        d.truncate(MAX_DETS);
        let ious: Vec<Vec<f64>> = d
            .iter()
            .map(|det| {
                g.iter()
                    .map(|gt| {
                        if gt.crowd {
                            boxes::crowd_iou_f64(&det.bbox, &gt.bbox)
                        } else {
                            boxes::iou_f64(&det.bbox, &gt.bbox)
                        }
                    })
                    .collect()
            })
            .collect();
        let thresholds = iou_thresholds();
        let mut matched = vec![vec![false; d.len()]; NUM_IOU_THRESHOLDS];
        let mut ignored = vec![vec![false; d.len()]; NUM_IOU_THRESHOLDS];
        for (ti, &t) in thresholds.iter().enumerate() {
            let mut gt_taken = vec![false; g.len()];
            for di in 0..d.len() {
                let mut best_iou = t.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                for gi in 0..g.len() {
                    // A matched non-crowd gt cannot be taken again; crowds can.
                    if gt_taken[gi] && !g[gi].crowd {
                        continue;
                    }
                    // Already matched a real gt and reached the crowd ones: stop.
                    if let Some(mi) = m {
                        if !g[mi].crowd && g[gi].crowd {
                            break;
                        }
                    }
                    if ious[di][gi] < best_iou {
                        continue;
                    }
                    best_iou = ious[di][gi];
                    m = Some(gi);
                }
                if let Some(mi) = m {
                    ignored[ti][di] = g[mi].crowd;
                    matched[ti][di] = true;
                    gt_taken[mi] = true;
                }
            }
        }
        Some(ImageEval {
            scores: d.iter().map(|x| x.score as f64).collect(),
            matched,
            ignored,
            num_gt,
        })
    }

    /// What every image contributes to the evaluation (COCO's `evaluateImg` output, per
    /// image), in the order the images were added: [`BoxScores::value`] recomputes the
    /// summary from it, and on any resample of the images.
    pub fn per_image(&self) -> BoxScores {
        let images = self
            .images
            .iter()
            .map(|(dets, gts)| {
                let mut im = ImageBoxes {
                    gt: vec![0; self.num_classes],
                    ..ImageBoxes::default()
                };
                for class in 0..self.num_classes {
                    if let Some(e) = Self::evaluate_image(dets, gts, class) {
                        im.gt[class] = e.num_gt as u32;
                        for (di, &score) in e.scores.iter().enumerate() {
                            let bits = |flags: &[Vec<bool>]| {
                                (0..NUM_IOU_THRESHOLDS)
                                    .filter(|&t| flags[t][di])
                                    .fold(0u16, |m, t| m | 1 << t)
                            };
                            im.class.push(class as u32);
                            // Exact: the scores were f32 before evaluate_image widened them.
                            im.score.push(score as f32);
                            im.matched.push(bits(&e.matched));
                            im.ignored.push(bits(&e.ignored));
                        }
                    }
                }
                // Most images have no crowd box: leave the ignored flags out (all zero).
                if im.ignored.iter().all(|&m| m == 0) {
                    im.ignored.clear();
                }
                im
            })
            .collect();
        BoxScores::new(self.num_classes, images)
    }

    /// AP of one category per IoU threshold, `None` without non-crowd ground truth.
    fn class_ap(&self, class: usize) -> Option<[f64; NUM_IOU_THRESHOLDS]> {
        let evals: Vec<ImageEval> = self
            .images
            .iter()
            .filter_map(|(d, g)| Self::evaluate_image(d, g, class))
            .collect();
        let npig: usize = evals.iter().map(|e| e.num_gt).sum();
        if npig == 0 {
            return None;
        }
        // Concatenate in image order, then a stable sort by descending score.
        let mut all: Vec<(f64, usize, usize)> = Vec::new(); // (score, image, det)
        for (ei, e) in evals.iter().enumerate() {
            for (di, &s) in e.scores.iter().enumerate() {
                all.push((s, ei, di));
            }
        }
        all.sort_by(|a, b| {
            b.0.partial_cmp(&a.0)
                .unwrap_or_else(|| a.0.is_nan().cmp(&b.0.is_nan()))
        });
        let recalls = recall_points();
        let mut ap = [0.0; NUM_IOU_THRESHOLDS];
        for (ti, ap_t) in ap.iter_mut().enumerate() {
            let mut tp = 0.0f64;
            let mut fp = 0.0f64;
            let mut rc = Vec::with_capacity(all.len());
            let mut pr = Vec::with_capacity(all.len());
            for &(_, ei, di) in &all {
                let e = &evals[ei];
                if e.ignored[ti][di] {
                    // Ignored detections still occupy a slot in COCO's arrays with tp/fp
                    // unchanged, which repeats the previous (rc, pr) point: harmless for
                    // the monotone precision, so it is kept for fidelity.
                } else if e.matched[ti][di] {
                    tp += 1.0;
                } else {
                    fp += 1.0;
                }
                rc.push(tp / npig as f64);
                pr.push(tp / (fp + tp + f64::EPSILON));
            }
            // Monotone (non-increasing) precision envelope.
            for i in (1..pr.len()).rev() {
                if pr[i] > pr[i - 1] {
                    pr[i - 1] = pr[i];
                }
            }
            let mut sum = 0.0;
            for &r in &recalls {
                // searchsorted(rc, r, side="left"): first index with rc >= r.
                let idx = rc.partition_point(|&x| x < r);
                if idx < pr.len() {
                    sum += pr[idx];
                }
            }
            *ap_t = sum / NUM_RECALL_POINTS as f64;
        }
        Some(ap)
    }

    /// Runs the evaluation over everything added so far.
    pub fn summarize(&self) -> MapSummary {
        let per: Vec<Option<[f64; NUM_IOU_THRESHOLDS]>> =
            (0..self.num_classes).map(|c| self.class_ap(c)).collect();
        let valid: Vec<&[f64; NUM_IOU_THRESHOLDS]> = per.iter().flatten().collect();
        let n = valid.len();
        let mean = |f: &dyn Fn(&[f64; NUM_IOU_THRESHOLDS]) -> f64| {
            if n == 0 {
                0.0
            } else {
                valid.iter().map(|a| f(a)).sum::<f64>() / n as f64
            }
        };
        let avg = |a: &[f64; NUM_IOU_THRESHOLDS]| a.iter().sum::<f64>() / NUM_IOU_THRESHOLDS as f64;
        MapSummary {
            map50: mean(&|a| a[0]),
            map50_95: mean(&avg),
            map75: mean(&|a| a[5]),
            per_class_ap50: per.iter().map(|a| a.map(|a| a[0])).collect(),
            per_class_ap: per.iter().map(|a| a.map(|a| avg(&a))).collect(),
            num_classes_with_gt: n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(b: [f32; 4], class: usize) -> DetBox {
        DetBox {
            bbox: b,
            class,
            crowd: false,
        }
    }
    fn crowd(b: [f32; 4], class: usize) -> DetBox {
        DetBox {
            bbox: b,
            class,
            crowd: true,
        }
    }
    fn det(b: [f32; 4], score: f32, class: usize) -> Detection {
        Detection {
            bbox: b,
            score,
            class,
        }
    }
    /// Precision is tp / (tp + fp + eps) as in pycocotools, so a perfect AP is 1 − 1e-16.
    fn approx(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }
    const A: [f32; 4] = [10.0, 10.0, 50.0, 50.0];
    const B: [f32; 4] = [60.0, 60.0, 100.0, 120.0];
    const FAR: [f32; 4] = [200.0, 200.0, 220.0, 220.0];

    #[test]
    fn perfect_and_empty() {
        let mut e = MapEvaluator::new(3);
        e.add_image(&[det(A, 0.9, 0), det(B, 0.8, 2)], &[gt(A, 0), gt(B, 2)])
            .unwrap();
        e.add_image(&[det(B, 0.7, 0)], &[gt(B, 0)]).unwrap();
        let s = e.summarize();
        assert!(approx(s.map50, 1.0));
        assert!(approx(s.map50_95, 1.0));
        assert!(approx(s.map75, 1.0));
        // class 1 has no gt: excluded
        let pc = &s.per_class_ap50;
        assert!(approx(pc[0].unwrap(), 1.0) && pc[1].is_none() && approx(pc[2].unwrap(), 1.0));
        assert_eq!(s.num_classes_with_gt, 2);

        let mut none = MapEvaluator::new(2);
        none.add_image(&[], &[gt(A, 0)]).unwrap();
        let s = none.summarize();
        assert_eq!(s.map50, 0.0);
        assert_eq!(s.map50_95, 0.0);
        assert_eq!(s.per_class_ap50, vec![Some(0.0), None]);

        let nothing = MapEvaluator::new(2).summarize();
        assert_eq!(nothing.map50, 0.0);
        assert_eq!(nothing.num_classes_with_gt, 0);
        assert!(MapEvaluator::new(2)
            .add_image(&[det(A, 1.0, 2)], &[])
            .is_err());
    }

    #[test]
    fn fp_ranked_above_tp_hand_computed() {
        // Two gts, one FP (score .9) above one TP (score .8), second gt missed.
        // tp = [0,1], fp = [1,1], rc = [0, .5], pr = [0, .5] -> envelope [.5, .5].
        // recall points 0.00..0.50 (51 of them) get .5, 0.51..1.00 get 0:
        // AP = 51 * 0.5 / 101.
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(FAR, 0.9, 0), det(A, 0.8, 0)], &[gt(A, 0), gt(B, 0)])
            .unwrap();
        let s = e.summarize();
        let expected = 51.0 * 0.5 / 101.0;
        assert!((s.map50 - expected).abs() < 1e-12, "{}", s.map50);
        assert!((s.map50_95 - expected).abs() < 1e-12);

        // Reversed ranking (TP first): rc = [.5, .5], pr = [1, .5] -> envelope [1, .5];
        // points 0..0.5 -> 1.0, others 0: AP = 51/101.
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(FAR, 0.8, 0), det(A, 0.9, 0)], &[gt(A, 0), gt(B, 0)])
            .unwrap();
        assert!((e.summarize().map50 - 51.0 / 101.0).abs() < 1e-12);
    }

    #[test]
    fn crowd_region_gives_no_fp() {
        // A detection inside a crowd region: ignored, so AP stays 1 for the real gt.
        let mut e = MapEvaluator::new(1);
        e.add_image(
            &[
                det([150.0, 150.0, 160.0, 160.0], 0.95, 0),
                det([170.0, 170.0, 190.0, 190.0], 0.94, 0),
                det(A, 0.9, 0),
            ],
            &[gt(A, 0), crowd([140.0, 140.0, 300.0, 300.0], 0)],
        )
        .unwrap();
        assert!(approx(e.summarize().map50, 1.0));
        // Without the crowd box those two detections are FPs ranked first:
        // rc = [0, 0, 1], pr = [0, 0, 1/3] -> envelope 1/3 everywhere.
        let mut e = MapEvaluator::new(1);
        e.add_image(
            &[
                det([150.0, 150.0, 160.0, 160.0], 0.95, 0),
                det([170.0, 170.0, 190.0, 190.0], 0.94, 0),
                det(A, 0.9, 0),
            ],
            &[gt(A, 0)],
        )
        .unwrap();
        assert!((e.summarize().map50 - 1.0 / 3.0).abs() < 1e-9);
        // An image with only a crowd gt: category excluded, not a 0.
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(A, 0.9, 0)], &[crowd(A, 0)]).unwrap();
        assert_eq!(e.summarize().per_class_ap50, vec![None]);
        // A real gt is preferred over a crowd with higher IoU.
        let mut e = MapEvaluator::new(1);
        e.add_image(
            &[det(A, 0.9, 0)],
            &[crowd(A, 0), gt([10.0, 10.0, 50.0, 41.0], 0)],
        )
        .unwrap();
        // IoU with the real gt = 31/40 = 0.775 -> TP at 0.50..0.75 (6 thresholds), crowd above
        // (ignored there: no TP, no FP, gt missed -> AP 0).
        let s = e.summarize();
        assert!(approx(s.map50, 1.0));
        assert!((s.map50_95 - 0.6).abs() < 1e-12);
    }

    #[test]
    fn score_ties_are_stable_by_input_order() {
        // Two dets with equal score in one image: FP listed first stays first.
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(FAR, 0.5, 0), det(A, 0.5, 0)], &[gt(A, 0)])
            .unwrap();
        // rc = [0, 1], pr = [0, .5] -> envelope .5 -> AP .5
        assert!((e.summarize().map50 - 0.5).abs() < 1e-9);
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(A, 0.5, 0), det(FAR, 0.5, 0)], &[gt(A, 0)])
            .unwrap();
        assert!((e.summarize().map50 - 1.0).abs() < 1e-9);
        // Across images: ties keep image order.
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(FAR, 0.5, 0)], &[]).unwrap();
        e.add_image(&[det(A, 0.5, 0)], &[gt(A, 0)]).unwrap();
        assert!((e.summarize().map50 - 0.5).abs() < 1e-9);
    }

    #[test]
    fn iou_threshold_boundary() {
        // gt 100x100; det shifted so IoU is just above / below 0.5.
        let g = [0.0f32, 0.0, 100.0, 100.0];
        // det [0,0,100,h]: IoU = h/100 when h <= 100... use width shift instead:
        // det [s, 0, 100+s, 100]: inter = (100-s)*100, union = (100+s)*100, IoU=(100-s)/(100+s)
        // s = 33 -> 67/133 = 0.5038; s = 34 -> 66/134 = 0.4925.
        let above = [33.0f32, 0.0, 133.0, 100.0];
        let below = [34.0f32, 0.0, 134.0, 100.0];
        assert!(boxes::iou(&above, &g) > 0.5 && boxes::iou(&below, &g) < 0.5);
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(above, 0.9, 0)], &[gt(g, 0)]).unwrap();
        let s = e.summarize();
        assert!(approx(s.map50, 1.0));
        assert_eq!(s.map75, 0.0);
        assert!((s.map50_95 - 0.1).abs() < 1e-12);
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(below, 0.9, 0)], &[gt(g, 0)]).unwrap();
        assert_eq!(e.summarize().map50, 0.0);
    }

    #[test]
    fn one_det_cannot_match_two_gts_and_max_dets() {
        // Two identical gts, one det: recall 0.5 -> AP = 51/101.
        let mut e = MapEvaluator::new(1);
        e.add_image(&[det(A, 0.9, 0)], &[gt(A, 0), gt(A, 0)])
            .unwrap();
        assert!((e.summarize().map50 - 51.0 / 101.0).abs() < 1e-12);
        // 100 FPs scored above the TP: the TP is cut by maxDets=100 -> AP 0.
        let mut dets: Vec<Detection> = (0..100).map(|_| det(FAR, 0.9, 0)).collect();
        dets.push(det(A, 0.1, 0));
        let mut e = MapEvaluator::new(1);
        e.add_image(&dets, &[gt(A, 0)]).unwrap();
        assert_eq!(e.summarize().map50, 0.0);
    }

    #[test]
    fn thresholds_match_numpy() {
        let t = iou_thresholds();
        assert_eq!(t[0], 0.5);
        assert_eq!(t[9], 0.95);
        assert!((t[5] - 0.75).abs() < 1e-12);
        let r = recall_points();
        assert_eq!(r[50], 0.5);
        assert!(approx(r[100], 1.0));
    }
}
