//! Semantic segmentation metrics from one confusion matrix accumulated over a whole split
//! (not averaged per image): per-class IoU, mIoU and pixel accuracy.

use candle_core::{bail, DType, Tensor};

use super::MetricError;
use crate::data::IGNORE_INDEX;

/// `counts[gt * C + pred]` = number of pixels with ground truth `gt` predicted as `pred`.
/// Pixels whose ground truth is [`IGNORE_INDEX`] (255) are not counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_classes: usize,
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    /// An empty `num_classes × num_classes` matrix. Masks are `u8` with 255 reserved for
    /// "ignore", so `num_classes` must be in `1..=255`; anything else is an error.
    pub fn new(num_classes: usize) -> Result<Self, MetricError> {
        if !(1..=255).contains(&num_classes) {
            return Err(MetricError::OutOfRange {
                what: "segmentation class count (masks hold ids 0..=254)",
                value: num_classes,
                num_classes: 255,
            });
        }
        Ok(Self {
            num_classes,
            counts: vec![0; num_classes * num_classes],
        })
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Count of pixels with ground truth `gt` predicted as `pred`.
    pub fn count(&self, gt: usize, pred: usize) -> u64 {
        self.counts[gt * self.num_classes + pred]
    }

    /// Adds one image (or any pixel list): `pred` and `gt` are class ids, same length.
    /// Pixels with `gt == 255` are skipped (their prediction is irrelevant). Any other
    /// `gt ≥ C`, or a `pred ≥ C` on a counted pixel, is an error (not clamped: it means a
    /// mismatch between the model and the dataset); on error nothing is added.
    pub fn add(&mut self, pred: &[u8], gt: &[u8]) -> Result<(), MetricError> {
        if pred.len() != gt.len() {
            return Err(MetricError::LengthMismatch {
                what: "prediction vs ground-truth pixels",
                left: pred.len(),
                right: gt.len(),
            });
        }
        let c = self.num_classes;
        // Validate first so that a bad input leaves the matrix untouched.
        for (&p, &g) in pred.iter().zip(gt) {
            if g == IGNORE_INDEX {
                continue;
            }
            if g as usize >= c {
                return Err(MetricError::OutOfRange {
                    what: "ground-truth class",
                    value: g as usize,
                    num_classes: c,
                });
            }
            if p as usize >= c {
                return Err(MetricError::OutOfRange {
                    what: "predicted class",
                    value: p as usize,
                    num_classes: c,
                });
            }
        }
        for (&p, &g) in pred.iter().zip(gt) {
            if g != IGNORE_INDEX {
                self.counts[g as usize * c + p as usize] += 1;
            }
        }
        Ok(())
    }

    /// Adds the counts of another matrix (e.g. from another worker or batch).
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<(), MetricError> {
        if other.num_classes != self.num_classes {
            return Err(MetricError::LengthMismatch {
                what: "confusion matrix classes",
                left: self.num_classes,
                right: other.num_classes,
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    /// IoU per class = TP / (TP + FP + FN); `None` for a class absent from both the ground
    /// truth and the predictions (its IoU is undefined, 0/0).
    pub fn per_class_iou(&self) -> Vec<Option<f64>> {
        let c = self.num_classes;
        (0..c)
            .map(|k| {
                let tp = self.count(k, k);
                let gt_total: u64 = (0..c).map(|p| self.count(k, p)).sum();
                let pred_total: u64 = (0..c).map(|g| self.count(g, k)).sum();
                let union = gt_total + pred_total - tp;
                if union == 0 {
                    None
                } else {
                    Some(tp as f64 / union as f64)
                }
            })
            .collect()
    }

    /// Number of ground-truth pixels of class `k` (ignored pixels excluded).
    pub fn gt_pixels(&self, k: usize) -> u64 {
        (0..self.num_classes).map(|p| self.count(k, p)).sum()
    }

    /// Number of counted pixels predicted as class `k` (pixels whose ground truth is ignored
    /// are not counted).
    pub fn pred_pixels(&self, k: usize) -> u64 {
        (0..self.num_classes).map(|g| self.count(g, k)).sum()
    }

    /// The classes with at least one ground-truth pixel: the fixed class set of the split,
    /// which no prediction can change.
    pub fn classes_with_gt(&self) -> Vec<usize> {
        (0..self.num_classes)
            .filter(|&k| self.gt_pixels(k) > 0)
            .collect()
    }

    /// Mean IoU over the classes present in the ground truth ([`Self::classes_with_gt`]), the
    /// VOC devkit's choice on a split: baseline and final model are averaged over the same
    /// classes, so a class the model starts or stops predicting somewhere cannot enter or
    /// leave the mean. 0.0 when no pixel has been counted.
    pub fn miou(&self) -> f64 {
        let per = self.per_class_iou();
        let set = self.classes_with_gt();
        if set.is_empty() {
            return 0.0;
        }
        set.iter().map(|&k| per[k].unwrap_or(0.0)).sum::<f64>() / set.len() as f64
    }

    /// Mean IoU over the classes present in the ground truth *or* the predictions (NaN-mean
    /// over defined IoUs, as mmseg and torchmetrics compute it): a class absent from the
    /// ground truth counts as 0 as soon as it is predicted somewhere. Reported for
    /// comparison; not the verdict's metric. 0.0 when no pixel has been counted.
    pub fn miou_nanmean(&self) -> f64 {
        let ious: Vec<f64> = self.per_class_iou().into_iter().flatten().collect();
        if ious.is_empty() {
            0.0
        } else {
            ious.iter().sum::<f64>() / ious.len() as f64
        }
    }

    /// Fraction of counted (non-ignored) pixels predicted correctly; 0.0 when none counted.
    pub fn pixel_accuracy(&self) -> f64 {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let correct: u64 = (0..self.num_classes).map(|k| self.count(k, k)).sum();
        correct as f64 / total as f64
    }

    /// Total number of counted pixels.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Per-image predicted masks from segmentation logits `(B, C, H, W)` (any float dtype, any
/// device): argmax over C, returned as `B` row-major `H·W` vectors of class ids. Upsample the
/// logits to the mask size first (the caller's job). Exact ties go to whichever index
/// candle's `argmax` returns (not specified here).
pub fn argmax_masks(logits: &Tensor) -> candle_core::Result<Vec<Vec<u8>>> {
    let (_b, c, _h, _w) = match logits.dims() {
        &[b, c, h, w] => (b, c, h, w),
        d => bail!("argmax_masks: expected logits (B, C, H, W), got shape {d:?}"),
    };
    if c == 0 || c > 255 {
        bail!("argmax_masks: {c} classes do not fit u8 ids below 255");
    }
    let idx = logits.argmax(1)?.to_dtype(DType::U32)?.to_vec3::<u32>()?;
    Ok(idx
        .into_iter()
        .map(|img| img.into_iter().flatten().map(|v| v as u8).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed_miou() {
        // 3 classes; gt / pred over 8 pixels, one ignored.
        let gt = [0u8, 0, 0, 1, 1, 2, 255, 0];
        let pred = [0u8, 0, 1, 1, 2, 2, 1, 0];
        let mut cm = ConfusionMatrix::new(3).unwrap();
        cm.add(&pred, &gt).unwrap();
        // class 0: tp 3 (px 0,1,7), fn 1 (px 2 -> 1), fp 0 -> 3/4
        // class 1: tp 1 (px 3), fn 1 (px 4 -> 2), fp 1 (px 2) -> 1/3
        // class 2: tp 1 (px 5), fn 0, fp 1 (px 4) -> 1/2
        let per = cm.per_class_iou();
        assert_eq!(per, vec![Some(0.75), Some(1.0 / 3.0), Some(0.5)]);
        assert!((cm.miou() - (0.75 + 1.0 / 3.0 + 0.5) / 3.0).abs() < 1e-12);
        assert_eq!(cm.miou(), cm.miou_nanmean(), "every class has ground truth");
        // 5 correct of 7 counted (the ignored pixel is not counted)
        assert!((cm.pixel_accuracy() - 5.0 / 7.0).abs() < 1e-12);
        assert_eq!(cm.total(), 7);
    }

    #[test]
    fn absent_classes_skipped_and_errors() {
        let mut cm = ConfusionMatrix::new(4).unwrap();
        // class 2 in neither gt nor pred; class 3 only predicted (IoU 0, counted)
        cm.add(&[0, 0, 3], &[0, 0, 1]).unwrap();
        let per = cm.per_class_iou();
        assert_eq!(per, vec![Some(1.0), Some(0.0), None, Some(0.0)]);
        // Fixed set {0, 1}: (1 + 0) / 2; nanmean adds the predicted-only class 3.
        assert_eq!(cm.classes_with_gt(), vec![0, 1]);
        assert!((cm.miou() - 0.5).abs() < 1e-12);
        assert!((cm.miou_nanmean() - 1.0 / 3.0).abs() < 1e-12);
        // errors leave the matrix unchanged
        let before = cm.clone();
        assert!(cm.add(&[0, 4], &[0, 0]).is_err());
        assert!(cm.add(&[0, 0], &[0, 7]).is_err());
        assert!(cm.add(&[0], &[0, 0]).is_err());
        assert_eq!(cm, before);
        // a prediction >= C on an ignored pixel is irrelevant
        cm.add(&[200], &[255]).unwrap();
        assert_eq!(cm, before);
        // empty matrix
        let empty = ConfusionMatrix::new(2).unwrap();
        assert!(ConfusionMatrix::new(300).is_err() && ConfusionMatrix::new(0).is_err());
        assert_eq!(empty.miou(), 0.0);
        assert_eq!(empty.miou_nanmean(), 0.0);
        assert_eq!(empty.pixel_accuracy(), 0.0);
    }

    #[test]
    fn accumulated_not_per_image_average_and_merge() {
        // image A: 1 pixel of class 1 missed; image B: 9 pixels of class 1 correct.
        let mut a = ConfusionMatrix::new(2).unwrap();
        a.add(&[0], &[1]).unwrap();
        let mut b = ConfusionMatrix::new(2).unwrap();
        b.add(&[1; 9], &[1; 9]).unwrap();
        a.merge(&b).unwrap();
        // class 1: tp 9, fn 1 -> 0.9; class 0: tp 0, fp 1 -> 0
        assert_eq!(a.per_class_iou(), vec![Some(0.0), Some(0.9)]);
        // Class 0 has no ground truth: the fixed set is {1}.
        assert!((a.miou() - 0.9).abs() < 1e-12);
        assert!((a.miou_nanmean() - 0.45).abs() < 1e-12);
        assert!(a.merge(&ConfusionMatrix::new(3).unwrap()).is_err());
    }

    /// The foreground class gets 20 % worse, and the worse model also stops predicting a
    /// class that has no ground truth in the split. Over the fixed set of ground-truth
    /// classes the mIoU drops by more than 5 %; the nanmean even reports an improvement.
    #[test]
    fn a_class_leaving_the_predictions_cannot_hide_a_drop() {
        // 3 classes: 0 background, 1 foreground (ground truth), 2 absent from the ground truth.
        // Baseline: class 1 IoU 0.5 (50 of 100 right, 50 → bg); 10 px predicted as class 2.
        let mut base = ConfusionMatrix::new(3).unwrap();
        let mut gt = vec![1u8; 100];
        gt.extend(vec![0u8; 1000]);
        let mut pred = vec![1u8; 50];
        pred.extend(vec![0u8; 50]);
        pred.extend(vec![2u8; 10]);
        pred.extend(vec![0u8; 990]);
        base.add(&pred, &gt).unwrap();
        // Final: class 1 IoU 0.40 (40 right), and class 2 is no longer predicted.
        let mut fin = ConfusionMatrix::new(3).unwrap();
        let mut pred = vec![1u8; 40];
        pred.extend(vec![0u8; 1060]);
        fin.add(&pred, &gt).unwrap();
        let drop = |a: f64, b: f64| (a - b) / a;
        // nanmean: class 2 (IoU 0) leaves the mean and masks the drop.
        let nan = drop(base.miou_nanmean(), fin.miou_nanmean());
        let fixed = drop(base.miou(), fin.miou());
        assert!(nan < 0.0, "nanmean drop {nan}");
        assert!(fixed > 0.05, "fixed-set drop {fixed}");
        assert_eq!(base.classes_with_gt(), fin.classes_with_gt());
    }

    #[test]
    fn argmax_of_logits() {
        // B=1, C=3, H=1, W=2
        let t = Tensor::new(
            &[[[[0.1f32, 5.0]], [[2.0, 0.0]], [[1.0, 0.0]]]],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(argmax_masks(&t).unwrap(), vec![vec![1u8, 0]]);
        assert!(argmax_masks(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}
