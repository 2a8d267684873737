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

    /// Mean IoU over the classes present in the ground truth or the predictions;
    /// 0.0 when no pixel has been counted.
    pub fn miou(&self) -> f64 {
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
        assert!((cm.miou() - 1.0 / 3.0).abs() < 1e-12);
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
        assert!((a.miou() - 0.45).abs() < 1e-12);
        assert!(a.merge(&ConfusionMatrix::new(3).unwrap()).is_err());
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
