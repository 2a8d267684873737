//! The measurement protocol around the metric formulas: detection mAP without a score cut,
//! segmentation scored at each val image's original resolution over a fixed class set.

use candle_core::{Device, Tensor};
use onehead::boxes::{DetBox, Detection};
use onehead::data::imageio::{encode_jpeg, encode_mask_png};
use onehead::metrics::MapEvaluator;
use onehead::tasks::det::{decode, DetSettings};
use onehead::tasks::{OpenOptions, Split, Task};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn map50(dets: &[Vec<Detection>], gts: &[Vec<DetBox>]) -> f64 {
    let mut e = MapEvaluator::new(3);
    for (d, g) in dets.iter().zip(gts) {
        e.add_image(d, g).unwrap();
    }
    e.summarize().map50
}

/// Random raw head outputs on an 8×8 grid and random ground truth, decoded as the detection
/// task evaluates: scaling every score by one positive constant keeps the ranking, so with
/// the default (no score cut) the mAP stays exactly the same; the old 0.05 cut changed it.
#[test]
fn scaling_every_score_leaves_map_unchanged() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n_img, grid) = (6, (8usize, 8usize));
    let raw: Vec<f32> = (0..n_img * 64 * 8)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let det = Tensor::from_vec(raw, (n_img, 64, 8), &Device::Cpu).unwrap();
    let settings = DetSettings::default();
    assert_eq!(
        settings.score_threshold, 0.0,
        "evaluation keeps every candidate"
    );
    let dets = decode(&det, grid, (64, 64), &settings).unwrap();
    assert!(dets.iter().all(|d| d.len() == settings.max_detections));
    // Ground truth near some of the detections, high- and low-ranked alike.
    let gts: Vec<Vec<DetBox>> = dets
        .iter()
        .map(|d| {
            [0, 7, 40, 90]
                .iter()
                .map(|&k| {
                    let b = d[k].bbox;
                    let j = rng.random_range(-1.0f32..1.0);
                    DetBox {
                        bbox: [b[0] + j, b[1] - j, b[2] + j, b[3]],
                        class: d[k].class,
                        crowd: false,
                    }
                })
                .collect()
        })
        .collect();
    let scaled: Vec<Vec<Detection>> = dets
        .iter()
        .map(|d| {
            d.iter()
                .map(|x| Detection {
                    score: x.score * 0.1,
                    ..*x
                })
                .collect()
        })
        .collect();
    let base = map50(&dets, &gts);
    assert!(base > 0.0);
    assert_eq!(map50(&scaled, &gts), base);
}

/// The old protocol dropped candidates scoring ≤ 0.05 before NMS: a uniform drift in
/// confidence (every score × 0.1, ranking unchanged) then counts as forgetting.
#[test]
fn a_score_cut_turns_a_confidence_drift_into_a_map_drop() {
    let gt = |x: f32| DetBox {
        bbox: [x, 0.0, x + 10.0, 10.0],
        class: 0,
        crowd: false,
    };
    let det = |x: f32, score: f32| Detection {
        bbox: [x, 0.0, x + 10.0, 10.0],
        score,
        class: 0,
    };
    let gts = vec![vec![gt(0.0), gt(20.0)]];
    // A hit, a miss, a hit.
    let dets = vec![vec![det(0.0, 0.9), det(40.0, 0.6), det(20.0, 0.4)]];
    let scaled: Vec<Vec<Detection>> = vec![dets[0]
        .iter()
        .map(|d| Detection {
            score: d.score * 0.1,
            ..*d
        })
        .collect()];
    let cut = |d: &[Vec<Detection>]| -> Vec<Vec<Detection>> {
        d.iter()
            .map(|v| v.iter().filter(|x| x.score > 0.05).copied().collect())
            .collect()
    };
    let full = map50(&dets, &gts);
    assert_eq!(
        map50(&scaled, &gts),
        full,
        "no cut: the drift changes nothing"
    );
    assert_eq!(map50(&cut(&dets), &gts), full);
    // With the cut, the drifted model loses its second hit: recall stops at 1/2, so AP is
    // 51/101 of the 101 recall points instead of about 0.83.
    assert!((map50(&cut(&scaled), &gts) - 51.0 / 101.0).abs() < 1e-9);
    assert!(full > 0.8);
}

/// A 64×48 val image scored with a 32-px model input: the logits are resized to 64×48 and
/// compared with the mask as read. A one-pixel class that nearest-neighbour downsampling
/// would drop still belongs to the split's class set.
#[test]
fn segmentation_is_scored_at_the_original_resolution() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, h) = (64u32, 48u32);
    for split in ["train", "val"] {
        let dir = tmp.path().join("mini_voc_seg").join(split);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.jpg"),
            encode_jpeg(w, h, &vec![128u8; (w * h * 3) as usize], 90).unwrap(),
        )
        .unwrap();
        // Left half class 1, right half background, one class-3 pixel at (0, 0).
        let mut mask: Vec<u8> = (0..w * h)
            .map(|i| if i % w < w / 2 { 1 } else { 0 })
            .collect();
        mask[0] = 3;
        std::fs::write(dir.join("a.png"), encode_mask_png(w, h, &mask).unwrap()).unwrap();
    }
    let task = onehead::tasks::seg::SegTask::open(&OpenOptions::new(tmp.path(), 32)).unwrap();
    let dev = Device::Cpu;
    let batch = task.batch(Split::Val, &[0], &[], &dev).unwrap();
    // A 4×4 logit map: class 1 wins in the left two columns, background in the right two.
    let mut v = vec![0f32; 21 * 16];
    for y in 0..4 {
        for x in 0..4 {
            let c = if x < 2 { 1 } else { 0 };
            v[c * 16 + y * 4 + x] = 10.0;
        }
    }
    let out = Tensor::from_vec(v, (1, 21, 4, 4), &dev).unwrap();
    let mut ev = task.evaluator(Split::Val);
    ev.add(&out, &batch).unwrap();
    let m = ev.finish().unwrap();
    // Classes with ground truth: 0, 1 and the single pixel of 3.
    assert_eq!(m["miou_classes"], 3.0);
    // Background and class 1 are exact except the class-3 pixel (predicted 1); class 3 is 0.
    let n1 = (w / 2 * h) as f64;
    let expected = (1.0 + (n1 - 1.0) / n1 + 0.0) / 3.0;
    assert!((m["miou"] - expected).abs() < 1e-9, "{m:?}");
    assert!((m["pixel_acc"] - (1.0 - 1.0 / (w * h) as f64)).abs() < 1e-9);
    // The chance level: background everywhere, over the same fixed class set.
    let bg = (w * h / 2) as f64 / (w * h) as f64;
    assert!((task.chance("miou", Split::Val).unwrap() - bg / 3.0).abs() < 1e-9);
    // No test folder: no test split, no chance level on it.
    assert_eq!(task.len(Split::Test), 0);
    assert_eq!(task.chance("miou", Split::Test), None);
}
