//! Top-1 / Top-5 classification accuracy, sample-averaged, and the per-class mean of Top-1
//! (the default of torchmetrics' `MulticlassAccuracy`, `average="macro"`): equal on a
//! balanced split, different on an unbalanced one.

use candle_core::{bail, DType, Tensor};

use super::MetricError;

/// Accumulates Top-1 and Top-5 hits over a split.
///
/// Rank of the true label = number of classes that beat it, where class `j` beats the label
/// `y` if `s[j] > s[y]`, or `s[j] == s[y]` and `j < y` (ties go to the lower class index,
/// deterministically: with all-equal scores only class 0 is a Top-1 hit). NaN scores are
/// treated as −∞. A sample is a Top-k hit when its rank is `< k`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopK {
    num_classes: Option<usize>,
    total: u64,
    top1_hits: u64,
    top5_hits: u64,
    /// Per class (by label): `(samples, Top-1 hits)`.
    per_class: Vec<(u64, u64)>,
}

fn score(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// Rank of the true `label` among `scores` as [`TopK`] ranks it: the number of classes that
/// beat it (higher score, or equal score and lower index; NaN counts as −∞). `label` must be
/// `< scores.len()`.
pub fn label_rank(scores: &[f32], label: usize) -> usize {
    let sy = score(scores[label]);
    scores
        .iter()
        .enumerate()
        .filter(|&(j, &s)| {
            let s = score(s);
            s > sy || (s == sy && j < label)
        })
        .count()
}

impl TopK {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample: `scores` (logits or probabilities) of every class and its label.
    /// All samples must have the same number of classes.
    pub fn add(&mut self, scores: &[f32], label: usize) -> Result<(), MetricError> {
        if label >= scores.len() {
            return Err(MetricError::OutOfRange {
                what: "label",
                value: label,
                num_classes: scores.len(),
            });
        }
        if let Some(c) = self.num_classes {
            if c != scores.len() {
                return Err(MetricError::LengthMismatch {
                    what: "classes per sample",
                    left: c,
                    right: scores.len(),
                });
            }
        }
        self.num_classes = Some(scores.len());
        let rank = label_rank(scores, label);
        self.total += 1;
        if self.per_class.len() < scores.len() {
            self.per_class.resize(scores.len(), (0, 0));
        }
        self.per_class[label].0 += 1;
        if rank < 1 {
            self.top1_hits += 1;
            self.per_class[label].1 += 1;
        }
        if rank < 5 {
            self.top5_hits += 1;
        }
        Ok(())
    }

    /// Adds a batch: `logits` `(B, C)` on any device, `labels` of length B.
    pub fn add_logits(&mut self, logits: &Tensor, labels: &[usize]) -> candle_core::Result<()> {
        let (b, _c) = logits.dims2()?;
        if b != labels.len() {
            bail!(
                "TopK::add_logits: logits {:?} vs {} labels",
                logits.dims(),
                labels.len()
            );
        }
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, &y) in rows.iter().zip(labels) {
            self.add(row, y).map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    }

    pub fn merge(&mut self, other: &TopK) -> Result<(), MetricError> {
        if let (Some(a), Some(b)) = (self.num_classes, other.num_classes) {
            if a != b {
                return Err(MetricError::LengthMismatch {
                    what: "classes per sample",
                    left: a,
                    right: b,
                });
            }
        }
        self.num_classes = self.num_classes.or(other.num_classes);
        self.total += other.total;
        self.top1_hits += other.top1_hits;
        self.top5_hits += other.top5_hits;
        if self.per_class.len() < other.per_class.len() {
            self.per_class.resize(other.per_class.len(), (0, 0));
        }
        for (a, b) in self.per_class.iter_mut().zip(&other.per_class) {
            a.0 += b.0;
            a.1 += b.1;
        }
        Ok(())
    }

    /// Number of samples added.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Top-1 accuracy; 0.0 before any sample.
    pub fn top1(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.top1_hits as f64 / self.total as f64
        }
    }

    /// Mean over the classes with samples of each class's Top-1 accuracy; 0.0 before any
    /// sample.
    pub fn mean_class_accuracy(&self) -> f64 {
        let accs: Vec<f64> = self
            .per_class
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|&(n, hits)| hits as f64 / n as f64)
            .collect();
        if accs.is_empty() {
            0.0
        } else {
            accs.iter().sum::<f64>() / accs.len() as f64
        }
    }

    /// Top-5 accuracy, `None` unless there are more than 5 classes (with ≤ 5 it is always 1)
    /// and at least one sample.
    pub fn top5(&self) -> Option<f64> {
        match self.num_classes {
            Some(c) if c > 5 && self.total > 0 => Some(self.top5_hits as f64 / self.total as f64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_topk() {
        let mut t = TopK::new();
        let s = [0.0f32, 0.9, 0.1, 0.8, 0.2, 0.3, 0.4];
        t.add(&s, 1).unwrap(); // rank 0: top1 + top5
        t.add(&s, 5).unwrap(); // beaten by 1, 3, 6 -> rank 3: top5 only
        t.add(&s, 0).unwrap(); // rank 6: neither
        t.add(&s, 2).unwrap(); // beaten by 1,3,4,5,6 -> rank 5: neither
        assert_eq!(t.count(), 4);
        assert!((t.top1() - 0.25).abs() < 1e-12);
        assert!((t.top5().unwrap() - 0.5).abs() < 1e-12);
        // Per class: labels 1 (1/1), 5 (0/1), 0 (0/1), 2 (0/1) -> mean 0.25.
        assert!((t.mean_class_accuracy() - 0.25).abs() < 1e-12);
    }

    #[test]
    fn mean_class_accuracy_weighs_classes_not_samples() {
        // Class 0: 3 samples, all right; class 1: 1 sample, wrong.
        let mut t = TopK::new();
        for _ in 0..3 {
            t.add(&[1.0, 0.0], 0).unwrap();
        }
        t.add(&[1.0, 0.0], 1).unwrap();
        assert!((t.top1() - 0.75).abs() < 1e-12);
        assert!((t.mean_class_accuracy() - 0.5).abs() < 1e-12);
        let mut u = TopK::new();
        u.add(&[0.0, 1.0], 1).unwrap();
        t.merge(&u).unwrap();
        assert!((t.mean_class_accuracy() - 0.75).abs() < 1e-12);
        assert_eq!(TopK::new().mean_class_accuracy(), 0.0);
    }

    #[test]
    fn ties_nan_and_small_class_counts() {
        let mut t = TopK::new();
        // all equal: class 0 wins the tie, class 1 does not
        t.add(&[1.0, 1.0, 1.0], 0).unwrap();
        t.add(&[1.0, 1.0, 1.0], 1).unwrap();
        assert!((t.top1() - 0.5).abs() < 1e-12);
        assert_eq!(t.top5(), None); // 3 classes
                                    // NaN counts as -inf
        let mut n = TopK::new();
        n.add(&[f32::NAN, 0.0], 1).unwrap();
        n.add(&[f32::NAN, 0.0], 0).unwrap();
        assert!((n.top1() - 0.5).abs() < 1e-12);
        assert!(n.add(&[0.0, 1.0], 2).is_err());
        assert!(n.add(&[0.0, 1.0, 2.0], 0).is_err());
        assert_eq!(TopK::new().top1(), 0.0);
    }

    #[test]
    fn from_logits_tensor() {
        let l = Tensor::new(&[[0.0f32, 2.0], [3.0, 1.0]], &candle_core::Device::Cpu).unwrap();
        let mut t = TopK::new();
        t.add_logits(&l, &[1, 1]).unwrap();
        assert!((t.top1() - 0.5).abs() < 1e-12);
        assert!(t.add_logits(&l, &[1]).is_err());
    }
}
