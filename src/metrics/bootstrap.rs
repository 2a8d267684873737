//! Bootstrap intervals over per-image scores ([`PerImage`]): how sure is a drop from a
//! task's baseline to its final value, or a difference between two strategies, given that
//! the split is a sample of images (and, with several seeds, that training is a sample of
//! runs)? Pure and deterministic: the same inputs and seed give the same output.
//!
//! Scheme: one seed — resample the images with replacement (the same resampled counts for
//! both sides of a pair, since they were scored on the same images); several seeds —
//! hierarchical: resample the seeds with replacement, then the images within each chosen
//! seed, and average over the chosen seeds. Intervals are percentile intervals (linear
//! interpolation between order statistics, numpy's default), the simple standard choice.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::per_image::PerImage;

/// How to bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootstrapSpec {
    /// Number of resamples (≥ 1; 2,000 is usual).
    pub resamples: usize,
    /// Two-sided coverage of the intervals, in (0, 1) (0.95 is usual).
    pub confidence: f64,
    /// Seed of the resampling.
    pub seed: u64,
}

impl Default for BootstrapSpec {
    fn default() -> Self {
        Self {
            resamples: 2000,
            confidence: 0.95,
            seed: 0,
        }
    }
}

/// A drop from baseline to final with its bootstrap intervals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DropInterval {
    /// Point estimates on all images (mean over seeds when several).
    pub baseline: f64,
    pub final_value: f64,
    /// `(baseline − final) / baseline` (0 when the baseline is 0, see [`relative_drop`]) and
    /// its percentile interval at the spec's confidence.
    pub drop_rel: f64,
    pub rel: (f64, f64),
    /// `baseline − final` and its interval.
    pub drop_abs: f64,
    pub abs: (f64, f64),
    /// One-sided lower bound of the baseline at the spec's confidence.
    pub baseline_lo: f64,
    /// Share of resamples whose baseline is at or below `chance`.
    pub p_not_above_chance: f64,
}

/// The relative drop `(b − f) / b`; 0 for a baseline `b ≤ 0`. A zero baseline has nothing
/// to lose, and a relative change from it is undefined: rather than leave such resamples out
/// (which would condition the interval on the baseline being learned) they count as no drop,
/// and the verdict must read [`DropInterval::p_not_above_chance`] first, which counts every
/// one of them (chance is never negative).
pub fn relative_drop(baseline: f64, final_value: f64) -> f64 {
    if baseline > 0.0 {
        (baseline - final_value) / baseline
    } else {
        0.0
    }
}

/// The chance level a baseline is tested against.
#[derive(Debug, Clone, Copy)]
pub enum Chance<'a> {
    /// A constant (classification's `1/C`: a guess's expected Top-1 on any image set).
    Level(f64),
    /// The chance predictor's per-image scores on the same images, valued on every
    /// resample with the baseline's counts: a metric that is a ratio over the resampled
    /// images (mIoU, mAP) moves with the resample for a predictor that knows nothing too,
    /// so only the paired comparison is fair.
    Scores(&'a PerImage),
}

/// Paired bootstrap of the drop from baseline to final. `pairs[s]` = (baseline scores, final
/// scores) of seed `s` on the SAME images (an error if their lengths or kinds differ). One
/// pair: resample images (the same resampled counts for baseline and final). Several pairs:
/// hierarchical — resample seeds with replacement, then images within each chosen seed; the
/// statistic is the drop of the mean baseline to the mean final over the chosen seeds.
pub fn paired_drop(
    pairs: &[(&PerImage, &PerImage)],
    metric: &str,
    chance: Chance,
    spec: &BootstrapSpec,
) -> Result<DropInterval> {
    check(pairs, spec)?;
    let (baseline, final_value) = point(pairs, metric)?;
    let chance_scores = match chance {
        Chance::Scores(c) => {
            anyhow::ensure!(
                pairs.iter().all(|(b, _)| b.len() == c.len()),
                "bootstrap: chance scores of {} images for baselines of other sizes",
                c.len()
            );
            Some(c)
        }
        Chance::Level(_) => None,
    };
    let draws = resample(pairs, chance_scores, metric, spec)?;
    let alpha = 1.0 - spec.confidence;
    let interval = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (
            percentile(&v, alpha / 2.0),
            percentile(&v, 1.0 - alpha / 2.0),
        )
    };
    let mut baselines: Vec<f64> = draws.iter().map(|d| d.0).collect();
    baselines.sort_by(f64::total_cmp);
    let not_above = draws
        .iter()
        .filter(|d| match chance {
            Chance::Level(c) => d.0 <= c,
            Chance::Scores(_) => d.0 <= d.2,
        })
        .count();
    Ok(DropInterval {
        baseline,
        final_value,
        drop_rel: relative_drop(baseline, final_value),
        rel: interval(draws.iter().map(|d| relative_drop(d.0, d.1)).collect()),
        drop_abs: baseline - final_value,
        abs: interval(draws.iter().map(|d| d.0 - d.1).collect()),
        baseline_lo: percentile(&baselines, alpha),
        p_not_above_chance: not_above as f64 / draws.len() as f64,
    })
}

/// Paired difference of finals between two strategies, seed by seed (`a[s]` and `b[s]`
/// share seed and images): `mean(a − b)` over seeds and its percentile interval, resampled
/// as [`paired_drop`] does.
pub fn paired_difference(
    a: &[&PerImage],
    b: &[&PerImage],
    metric: &str,
    spec: &BootstrapSpec,
) -> Result<(f64, (f64, f64))> {
    anyhow::ensure!(
        a.len() == b.len(),
        "paired difference: {} seeds on one side, {} on the other",
        a.len(),
        b.len()
    );
    let pairs: Vec<(&PerImage, &PerImage)> = a.iter().copied().zip(b.iter().copied()).collect();
    check(&pairs, spec)?;
    let (ma, mb) = point(&pairs, metric)?;
    let mut d: Vec<f64> = resample(&pairs, None, metric, spec)?
        .into_iter()
        .map(|(x, y, _)| x - y)
        .collect();
    d.sort_by(f64::total_cmp);
    let alpha = 1.0 - spec.confidence;
    let interval = (
        percentile(&d, alpha / 2.0),
        percentile(&d, 1.0 - alpha / 2.0),
    );
    Ok((ma - mb, interval))
}

/// Inputs a bootstrap can run on: a sane spec, at least one pair, both sides of a pair of
/// the same kind and length (not empty). (The metric is checked by the first value.)
fn check(pairs: &[(&PerImage, &PerImage)], spec: &BootstrapSpec) -> Result<()> {
    anyhow::ensure!(
        spec.resamples >= 1,
        "bootstrap: resamples must be at least 1"
    );
    anyhow::ensure!(
        spec.confidence > 0.0 && spec.confidence < 1.0,
        "bootstrap: confidence {} must be in (0, 1)",
        spec.confidence
    );
    anyhow::ensure!(!pairs.is_empty(), "bootstrap: no seeds to resample");
    for (s, (x, y)) in pairs.iter().enumerate() {
        anyhow::ensure!(
            std::mem::discriminant(*x) == std::mem::discriminant(*y),
            "bootstrap: seed {s} pairs scores of different kinds"
        );
        anyhow::ensure!(
            x.len() == y.len() && !x.is_empty(),
            "bootstrap: seed {s} pairs {} images with {} (both sides must score the same, non-empty, images)",
            x.len(),
            y.len()
        );
    }
    Ok(())
}

/// `metric` on all images of `p`, or an error naming the metric.
fn full_value(p: &PerImage, metric: &str) -> Result<f64> {
    p.value(metric, &vec![1; p.len()]).with_context(|| {
        format!("bootstrap: metric '{metric}' cannot be recomputed from these per-image scores")
    })
}

/// Mean over seeds of each side's metric on all images.
fn point(pairs: &[(&PerImage, &PerImage)], metric: &str) -> Result<(f64, f64)> {
    let (mut x, mut y) = (0.0, 0.0);
    for (a, b) in pairs {
        x += full_value(a, metric)?;
        y += full_value(b, metric)?;
    }
    let n = pairs.len() as f64;
    Ok((x / n, y / n))
}

/// `spec.resamples` draws of (mean left, mean right, mean chance) over resampled seeds and
/// images; the chance scores (0 without them) are valued with each left side's counts.
fn resample(
    pairs: &[(&PerImage, &PerImage)],
    chance: Option<&PerImage>,
    metric: &str,
    spec: &BootstrapSpec,
) -> Result<Vec<(f64, f64, f64)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut counts = Vec::new();
    let mut out = Vec::with_capacity(spec.resamples);
    let seeds = pairs.len();
    for _ in 0..spec.resamples {
        let (mut x, mut y, mut c) = (0.0, 0.0, 0.0);
        for k in 0..seeds {
            // One seed: no seed level to resample.
            let (a, b) = pairs[if seeds == 1 {
                k
            } else {
                rng.random_range(0..seeds)
            }];
            draw_counts(&mut rng, a.len(), &mut counts);
            let fail = || format!("bootstrap: metric '{metric}' cannot be recomputed");
            x += a.value(metric, &counts).with_context(fail)?;
            y += b.value(metric, &counts).with_context(fail)?;
            if let Some(ch) = chance {
                c += ch.value(metric, &counts).with_context(fail)?;
            }
        }
        let n = seeds as f64;
        out.push((x / n, y / n, c / n));
    }
    Ok(out)
}

/// Counts of a resample with replacement of `n` images (`n` draws).
fn draw_counts(rng: &mut ChaCha8Rng, n: usize, counts: &mut Vec<u32>) {
    counts.clear();
    counts.resize(n, 0);
    for _ in 0..n {
        counts[rng.random_range(0..n)] += 1;
    }
}

/// The `q`-quantile of sorted `v` with linear interpolation (numpy's default); `v` not empty.
fn percentile(v: &[f64], q: f64) -> f64 {
    let h = (v.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (h - lo as f64) * (v[hi] - v[lo])
}

/// Exact Clopper–Pearson interval of `k` successes in `n` trials at two-sided `confidence`
/// (`n = 0` → (0, 1); `k > n` is taken as `n`).
///
/// The bounds are Beta quantiles; rather than add a statistics crate for the inverse
/// incomplete Beta function, each bound is found by bisection on the binomial CDF, which is
/// monotone in `p` (60 halvings reach f64 resolution; each CDF is O(n) in log space).
pub fn clopper_pearson(k: usize, n: usize, confidence: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let k = k.min(n);
    let a = (1.0 - confidence) / 2.0;
    // Lower: P(X ≥ k | p) = a, rising in p. Upper: P(X ≤ k | p) = a, falling in p.
    let lo = match k {
        0 => 0.0,
        _ => bisect(|p| 1.0 - binomial_cdf(k - 1, n, p) < a),
    };
    let hi = match k == n {
        true => 1.0,
        false => bisect(|p| binomial_cdf(k, n, p) > a),
    };
    (lo, hi)
}

/// The boundary in (0, 1) below which `below(p)` holds (it holds for small `p` only).
fn bisect(below: impl Fn(f64) -> bool) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if below(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// `P(X ≤ k)` for `X ~ Binomial(n, p)`, `0 < p < 1`, summed in log space (no overflow of
/// the binomial coefficients for large `n`).
fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut ln_choose = 0.0f64;
    let mut sum = 0.0;
    for i in 0..=k.min(n) {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        sum += (ln_choose + i as f64 * lp + (n - i) as f64 * lq).exp();
    }
    sum.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::per_image::TopHits;

    /// Classification scores of `hits.len()` images, 10 classes: hit = rank 0, else rank 5.
    fn hits(hits: &[bool]) -> PerImage {
        PerImage::Hits(TopHits {
            num_classes: 10,
            labels: (0..hits.len() as u32).map(|i| i % 10).collect(),
            ranks: hits.iter().map(|&h| if h { 0 } else { 5 }).collect(),
        })
    }

    fn spec(seed: u64) -> BootstrapSpec {
        BootstrapSpec {
            seed,
            ..BootstrapSpec::default()
        }
    }

    #[test]
    fn identical_scores_drop_nothing_with_a_zero_width_interval() {
        let p = hits(&(0..50).map(|i| i % 3 != 0).collect::<Vec<_>>());
        let d = paired_drop(&[(&p, &p)], "top1", Chance::Level(0.1), &spec(1)).unwrap();
        assert_eq!(
            (d.drop_abs, d.abs, d.drop_rel, d.rel),
            (0.0, (0.0, 0.0), 0.0, (0.0, 0.0))
        );
        assert_eq!(d.baseline, d.final_value);
        assert_eq!(d.p_not_above_chance, 0.0);
        let (m, ci) = paired_difference(&[&p, &p], &[&p, &p], "top1", &spec(1)).unwrap();
        assert_eq!((m, ci), (0.0, (0.0, 0.0)));
    }

    #[test]
    fn a_ten_percent_drop_on_300_images_is_clearly_above_five_percent() {
        let base = hits(&[true; 300]);
        let fin = hits(&(0..300).map(|i| i % 10 != 0).collect::<Vec<_>>());
        let d = paired_drop(&[(&base, &fin)], "top1", Chance::Level(0.1), &spec(2)).unwrap();
        assert!((d.drop_rel - 0.1).abs() < 1e-12 && (d.drop_abs - 0.1).abs() < 1e-12);
        assert!(d.rel.0 > 0.05 && d.rel.1 < 0.15, "{d:?}");
        assert!(d.rel.0 < 0.1 && d.rel.1 > 0.1, "{d:?}");
        assert_eq!((d.baseline_lo, d.p_not_above_chance), (1.0, 0.0));
    }

    #[test]
    fn a_coin_flip_difference_on_20_images_straddles_five_percent() {
        // Baseline right on 0..15, final on 2..16: 0.75 → 0.70, three discordant images.
        let base = hits(&(0..20).map(|i| i < 15).collect::<Vec<_>>());
        let fin = hits(&(0..20).map(|i| (2..16).contains(&i)).collect::<Vec<_>>());
        let d = paired_drop(&[(&base, &fin)], "top1", Chance::Level(0.1), &spec(3)).unwrap();
        assert!((d.drop_abs - 0.05).abs() < 1e-12);
        assert!(d.rel.0 < 0.05 && d.rel.1 > 0.05, "{d:?}");
        assert!(d.abs.0 < 0.0, "final better on some resamples: {d:?}");
    }

    #[test]
    fn a_baseline_at_chance_is_flagged() {
        // 10 classes, 10 of 100 right: exactly the chance level 0.1.
        let base = hits(&(0..100).map(|i| i % 10 == 0).collect::<Vec<_>>());
        let d = paired_drop(&[(&base, &base)], "top1", Chance::Level(0.1), &spec(4)).unwrap();
        assert!(d.p_not_above_chance > 0.4, "{d:?}");
        assert!(d.baseline_lo < 0.1);
        // A zero baseline: no relative drop (see relative_drop), always "not above chance".
        let zero = hits(&[false; 30]);
        let d = paired_drop(&[(&zero, &zero)], "top1", Chance::Level(0.1), &spec(4)).unwrap();
        assert_eq!(
            (d.drop_rel, d.rel, d.p_not_above_chance),
            (0.0, (0.0, 0.0), 1.0)
        );
    }

    #[test]
    fn seeded_deterministic_and_hierarchical_over_seeds() {
        let a = hits(&(0..40).map(|i| i % 4 != 0).collect::<Vec<_>>());
        let b = hits(&(0..40).map(|i| i % 3 != 0).collect::<Vec<_>>());
        let run = |seed| paired_drop(&[(&a, &b)], "top1", Chance::Level(0.1), &spec(seed)).unwrap();
        assert_eq!(run(5), run(5));
        assert_ne!(run(5).abs, run(6).abs);
        // Two seeds: the point estimates are means over seeds.
        let c = hits(&(0..40).map(|i| i % 5 != 0).collect::<Vec<_>>());
        let d = paired_drop(&[(&a, &b), (&a, &c)], "top1", Chance::Level(0.1), &spec(5)).unwrap();
        let (va, vb, vc) = (30.0 / 40.0, 26.0 / 40.0, 32.0 / 40.0);
        assert!((d.baseline - va).abs() < 1e-12);
        assert!((d.final_value - (vb + vc) / 2.0).abs() < 1e-12);
        assert!(d.abs.0 <= d.drop_abs && d.drop_abs <= d.abs.1);
        let (m, ci) = paired_difference(&[&b, &c], &[&a, &a], "top1", &spec(5)).unwrap();
        assert!((m - ((vb + vc) / 2.0 - va)).abs() < 1e-12 && ci.0 <= m && m <= ci.1);
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let a = hits(&[true; 10]);
        let b = hits(&[true; 11]);
        assert!(paired_drop(&[(&a, &b)], "top1", Chance::Level(0.1), &spec(0)).is_err());
        assert!(paired_drop(&[], "top1", Chance::Level(0.1), &spec(0)).is_err());
        assert!(paired_drop(&[(&a, &a)], "miou", Chance::Level(0.1), &spec(0)).is_err());
        assert!(paired_difference(&[&a], &[], "top1", &spec(0)).is_err());
        let bad = BootstrapSpec {
            confidence: 1.0,
            ..spec(0)
        };
        assert!(paired_drop(&[(&a, &a)], "top1", Chance::Level(0.1), &bad).is_err());
    }

    #[test]
    fn clopper_pearson_known_values() {
        let near =
            |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() < 5e-5 && (a.1 - b.1).abs() < 5e-5;
        assert!(near(clopper_pearson(0, 10, 0.95), (0.0, 0.3085)));
        assert!(near(clopper_pearson(5, 10, 0.95), (0.1871, 0.8129)));
        assert!(near(clopper_pearson(10, 10, 0.95), (0.6915, 1.0)));
        // k = 0: the upper bound is 1 − (α/2)^(1/n) exactly.
        let (_, hi) = clopper_pearson(0, 10, 0.95);
        assert!((hi - (1.0 - 0.025f64.powf(0.1))).abs() < 1e-12);
        assert_eq!(clopper_pearson(0, 0, 0.95), (0.0, 1.0));
        // Large n stays finite (log-space CDF).
        let (lo, hi) = clopper_pearson(500, 1000, 0.95);
        assert!(lo > 0.46 && lo < 0.5 && hi > 0.5 && hi < 0.54, "{lo} {hi}");
    }

    /// Segmentation masks of `n` images: background and one object class each, a share
    /// `fg` of the pixels; predicted as `pred` (0 = background everywhere).
    fn seg(n: usize, predict_object: bool) -> PerImage {
        use crate::metrics::miou::ConfusionMatrix;
        use crate::metrics::per_image::IouCounts;
        let mut counts = IouCounts::new(4);
        for i in 0..n {
            let class = 1 + (i % 3) as u8;
            let fg = 10 + 7 * (i % 5);
            let gt: Vec<u8> = (0..100).map(|p| if p < fg { class } else { 0 }).collect();
            let pred: Vec<u8> = if predict_object {
                gt.clone()
            } else {
                vec![0; 100]
            };
            let mut cm = ConfusionMatrix::new(4).unwrap();
            cm.add(&pred, &gt).unwrap();
            counts.push(&cm).unwrap();
        }
        PerImage::Iou(counts)
    }

    #[test]
    fn above_chance_is_tested_against_the_chance_predictor_on_the_same_resample() {
        // A model that predicts background everywhere *is* the chance predictor: never above
        // it, whatever the resample. Against the fixed chance level of all images its
        // resamples scatter on both sides of it (the class set and the background share move
        // with the resample): a coin flip, where the paired test is certain.
        let chance = seg(20, false);
        let fixed = chance.value("miou", &[1; 20]).unwrap();
        let d = paired_drop(
            &[(&chance, &chance)],
            "miou",
            Chance::Scores(&chance),
            &spec(6),
        )
        .unwrap();
        assert_eq!(d.p_not_above_chance, 1.0);
        let biased = paired_drop(
            &[(&chance, &chance)],
            "miou",
            Chance::Level(fixed),
            &spec(6),
        )
        .unwrap();
        assert!(
            biased.p_not_above_chance > 0.05 && biased.p_not_above_chance < 0.95,
            "{biased:?}"
        );
        // A model that segments every object is above it on every resample.
        let good = seg(20, true);
        let d = paired_drop(&[(&good, &good)], "miou", Chance::Scores(&chance), &spec(6)).unwrap();
        assert_eq!(d.p_not_above_chance, 0.0);
        // Chance scores of other images are refused.
        assert!(paired_drop(
            &[(&good, &good)],
            "miou",
            Chance::Scores(&seg(5, false)),
            &spec(6)
        )
        .is_err());
    }

    /// Speed of 2,000 resamples on 300 images of each kind (not a test): `cargo test
    /// --release --lib bootstrap_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bootstrap_speed() {
        use crate::boxes::{DetBox, Detection};
        use crate::metrics::miou::ConfusionMatrix;
        use crate::metrics::per_image::IouCounts;
        use crate::metrics::MapEvaluator;
        use rand::{Rng, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // Detection: 300 images, 10 classes, 3 objects and 100 detections per image.
        let mut map = MapEvaluator::new(10);
        for _ in 0..300 {
            let mut bx = || {
                let (x, y) = (
                    rng.random_range(0.0..120.0f32),
                    rng.random_range(0.0..120.0f32),
                );
                [
                    x,
                    y,
                    x + rng.random_range(8.0..40.0),
                    y + rng.random_range(8.0..40.0),
                ]
            };
            let gts: Vec<DetBox> = (0..3)
                .map(|k| DetBox {
                    bbox: bx(),
                    class: k * 3,
                    crowd: false,
                })
                .collect();
            let mut dets: Vec<Detection> = gts
                .iter()
                .map(|g| Detection {
                    bbox: g.bbox,
                    score: 0.9,
                    class: g.class,
                })
                .collect();
            for k in 0..97 {
                dets.push(Detection {
                    bbox: bx(),
                    score: 0.001 * k as f32,
                    class: k % 10,
                });
            }
            map.add_image(&dets, &gts).unwrap();
        }
        let det = PerImage::Boxes(map.per_image());
        let mut seg = IouCounts::new(21);
        for i in 0..300u64 {
            let gt: Vec<u8> = (0..160 * 120)
                .map(|p| ((p / 4000 + i) % 21) as u8)
                .collect();
            let pred: Vec<u8> = gt.iter().map(|&g| if g % 5 == 0 { 0 } else { g }).collect();
            let mut one = ConfusionMatrix::new(21).unwrap();
            one.add(&pred, &gt).unwrap();
            seg.push(&one).unwrap();
        }
        let seg = PerImage::Iou(seg);
        let cls = hits(&(0..300).map(|i| i % 7 != 0).collect::<Vec<_>>());
        eprintln!(
            "det JSON: {} bytes",
            serde_json::to_string(&det).unwrap().len()
        );
        for (p, metric) in [
            (&seg, "miou"),
            (&det, "map50"),
            (&det, "map50_95"),
            (&cls, "top1"),
        ] {
            let t = std::time::Instant::now();
            paired_drop(
                &[(p, p)],
                metric,
                Chance::Level(0.0),
                &BootstrapSpec::default(),
            )
            .unwrap();
            eprintln!(
                "{metric}: 2000 resamples of 300 images in {:.3} s",
                t.elapsed().as_secs_f64()
            );
        }
    }
}
