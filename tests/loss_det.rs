//! Losses and the detection parametrisation: hand-computed values, numerical safety,
//! decode/NMS behaviour, and a tiny optimisation proving that decode and loss agree.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use onehead::boxes::{
    self, decode_boxes, encode_box, giou_tensor as giou, nms_per_class, DetBox, Detection,
};
use onehead::tasks::cls::cross_entropy as cls_cross_entropy;
use onehead::tasks::det::{decode, DetSettings as DecodeParams};
use onehead::tasks::det_loss::{
    assign, det_loss, sigmoid_focal_loss, stable_bce_with_logits, stable_bce_with_logits_mean,
    DetLossParams,
};
use onehead::tasks::seg::pixel_cross_entropy as seg_cross_entropy;

const CPU: Device = Device::Cpu;

fn gt(b: [f32; 4], class: usize) -> DetBox {
    DetBox {
        bbox: b,
        class,
        crowd: false,
    }
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

// ---------------------------------------------------------------- plain losses

#[test]
fn seg_ce_hand_computed_and_ignored_pixels_get_zero_grad() {
    // B=1, C=2, H=1, W=3; pixel 2 ignored.
    let logits = Var::from_tensor(
        &Tensor::new(&[[[[0.0f32, 1.0, 5.0]], [[0.0, -1.0, -5.0]]]], &CPU).unwrap(),
    )
    .unwrap();
    let masks = Tensor::new(&[[[0u32, 1, 255]]], &CPU).unwrap();
    let loss = seg_cross_entropy(logits.as_tensor(), &masks, 255).unwrap();
    // px0: logits (0,0), target 0 -> ln 2; px1: (1,-1) target 1 -> ln(1 + e^2)
    let expected = (2f32.ln() + (1.0 + 2f32.exp()).ln()) / 2.0;
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(close(got, expected, 1e-5), "{got} vs {expected}");
    let grads = loss.backward().unwrap();
    let g4: Vec<f32> = grads
        .get(&logits)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // layout (c, w): index c*3 + w; pixel 2 is w = 2
    assert_eq!(g4[2], 0.0);
    assert_eq!(g4[5], 0.0);
    assert!(g4[0] != 0.0 && g4[1] != 0.0);

    // All ignored -> exactly 0, no NaN.
    let all_ign = Tensor::new(&[[[255u32, 255, 255]]], &CPU).unwrap();
    let l0 = seg_cross_entropy(logits.as_tensor(), &all_ign, 255)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(l0, 0.0);
    // Shape mismatch is an error.
    assert!(seg_cross_entropy(
        logits.as_tensor(),
        &Tensor::zeros((1, 1, 2), DType::U32, &CPU).unwrap(),
        255
    )
    .is_err());
}

#[test]
fn cls_ce_hand_computed() {
    let logits = Tensor::new(&[[0.0f32, 0.0], [2.0, 0.0]], &CPU).unwrap();
    let got = cls_cross_entropy(&logits, &[1, 0])
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let expected = (2f32.ln() + (1.0 + (-2f32).exp()).ln()) / 2.0;
    assert!(close(got, expected, 1e-6));
    assert!(cls_cross_entropy(&logits, &[1]).is_err());
    assert!(
        cls_cross_entropy(&logits, &[1, 2]).is_err(),
        "label out of range"
    );
}

#[test]
fn bce_and_focal_are_finite_at_extreme_logits() {
    let x =
        Var::from_tensor(&Tensor::new(&[-100f32, -30.0, 0.0, 30.0, 100.0], &CPU).unwrap()).unwrap();
    for tv in [0f32, 1.0] {
        let t = Tensor::new(&[tv; 5], &CPU).unwrap();
        let l = stable_bce_with_logits(x.as_tensor(), &t)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(l.iter().all(|v| v.is_finite()), "{l:?}");
        // hand values: x=0 -> ln 2; wrong-side 100 -> 100; right-side -> ~0
        assert!(close(l[2], 2f32.ln(), 1e-6));
        if tv == 0.0 {
            assert!(close(l[4], 100.0, 1e-3) && l[0] < 1e-12);
        } else {
            assert!(close(l[0], 100.0, 1e-3) && l[4] < 1e-12);
        }
        let f = sigmoid_focal_loss(x.as_tensor(), &t, 0.25, 2.0).unwrap();
        let fv = f.to_vec1::<f32>().unwrap();
        assert!(fv.iter().all(|v| v.is_finite()), "{fv:?}");
        let g = f.sum_all().unwrap().backward().unwrap();
        let gv = g.get(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!(gv.iter().all(|v| v.is_finite()), "{gv:?}");
        let gb = stable_bce_with_logits_mean(x.as_tensor(), &t)
            .unwrap()
            .backward()
            .unwrap();
        assert!(gb
            .get(&x)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }
    // gamma = 0, alpha < 0 is exactly BCE
    let t = Tensor::new(&[1f32, 0.0, 1.0, 0.0, 1.0], &CPU).unwrap();
    let a = sigmoid_focal_loss(x.as_tensor(), &t, -1.0, 0.0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = stable_bce_with_logits(x.as_tensor(), &t)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn tensor_giou_matches_plain_giou() {
    let a = [
        [0f32, 0.0, 2.0, 2.0],
        [0.0, 0.0, 2.0, 2.0],
        [5.0, 5.0, 9.0, 8.0],
    ];
    let b = [
        [1f32, 1.0, 3.0, 3.0],
        [4.0, 0.0, 6.0, 2.0],
        [5.0, 5.0, 9.0, 8.0],
    ];
    let ta = Tensor::new(&a, &CPU).unwrap();
    let tb = Tensor::new(&b, &CPU).unwrap();
    let g = giou(&ta, &tb).unwrap().to_vec1::<f32>().unwrap();
    for i in 0..3 {
        assert!(
            close(g[i], boxes::giou(&a[i], &b[i]), 1e-5),
            "{i}: {} vs {}",
            g[i],
            boxes::giou(&a[i], &b[i])
        );
    }
}

// ---------------------------------------------------------------- detection

const GRID: (usize, usize) = (8, 8);
const S: usize = 8;
const C: usize = 3;

/// Raw outputs (1, 64, 5+C) that exactly encode `boxes` on their assigned cells with
/// confident objectness / class logits, and confident negatives elsewhere.
fn encode_targets(boxes_: &[DetBox], logit: f32) -> Tensor {
    let a = assign(GRID, S, boxes_, 2.5);
    let n = GRID.0 * GRID.1;
    let mut v = vec![0f32; n * (5 + C)];
    for cell in 0..n {
        let row = &mut v[cell * (5 + C)..(cell + 1) * (5 + C)];
        for c in 0..C {
            row[5 + c] = -logit;
        }
        row[4] = -logit;
        if let Some(gi) = a.positive[cell] {
            let g = &boxes_[gi];
            row[..4].copy_from_slice(&encode_box(&g.bbox, cell % GRID.1, cell / GRID.1, S));
            row[4] = logit;
            row[5 + g.class] = logit;
        }
    }
    Tensor::from_vec(v, (1, n, 5 + C), &CPU).unwrap()
}

#[test]
fn decode_hand_set_outputs() {
    let n = 64;
    let mut v = vec![-20f32; n * (5 + C)];
    // cell (gx=2, gy=3): tx=0.25, ty=-0.5, tw=ln 2, th=0 -> centre (22, 24), 16 x 8
    let cell = 3 * 8 + 2;
    let row = &mut v[cell * (5 + C)..(cell + 1) * (5 + C)];
    row[..4].copy_from_slice(&[0.25, -0.5, 2f32.ln(), 0.0]);
    row[4] = 20.0;
    row[5 + 1] = 20.0;
    // cell 0: a box hanging off the image, class 2 -> clipped
    let row0 = &mut v[0..5 + C];
    row0[..4].copy_from_slice(&[0.0, 0.0, 2f32.ln() + 1f32.ln(), 2f32.ln()]); // 16x16 at (4,4)
    row0[4] = 0.0; // obj 0.5
    row0[5 + 2] = 0.0; // cls 0.5 -> score 0.25
    let det = Tensor::from_vec(v, (1, n, 5 + C), &CPU).unwrap();
    let p = DecodeParams {
        score_threshold: 0.05,
        ..DecodeParams::default()
    };
    let out = decode(&det, GRID, (64, 64), &p).unwrap();
    assert_eq!(out.len(), 1);
    let d = &out[0];
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[0].class, 1);
    assert!(d[0].score > 0.99);
    let e = [14.0, 20.0, 30.0, 28.0];
    for (got, want) in d[0].bbox.iter().zip(e) {
        assert!(close(*got, want, 1e-4), "{:?}", d[0].bbox);
    }
    assert_eq!(d[1].class, 2);
    assert!(close(d[1].score, 0.25, 1e-6));
    assert_eq!(d[1].bbox, [0.0, 0.0, 12.0, 12.0]);
    // threshold above 0.25 drops the second one
    let p = DecodeParams {
        score_threshold: 0.3,
        ..DecodeParams::default()
    };
    assert_eq!(decode(&det, GRID, (64, 64), &p).unwrap()[0].len(), 1);
    // shape mismatch
    assert!(decode(&det, (4, 4), (64, 64), &p).is_err());
}

#[test]
fn encode_decode_round_trip() {
    let b = [13.0f32, 7.5, 41.0, 30.0];
    let raw = encode_box(&b, 3, 2, S);
    let t = Tensor::new(&[raw], &CPU).unwrap();
    let cells = Tensor::new(&[[3f32, 2.0]], &CPU).unwrap();
    let d = decode_boxes(&t, &cells, S)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for k in 0..4 {
        assert!(close(d[0][k], b[k], 1e-4), "{:?}", d[0]);
    }
}

#[test]
fn nms_suppresses_same_class_only() {
    let d = |b: [f32; 4], score: f32, class: usize| Detection {
        bbox: b,
        score,
        class,
    };
    let a = [0.0, 0.0, 10.0, 10.0];
    let a2 = [1.0, 0.0, 11.0, 10.0]; // IoU 9/11 with a
    let far = [30.0, 30.0, 40.0, 40.0];
    let kept = nms_per_class(vec![d(a2, 0.8, 0), d(a, 0.9, 0), d(far, 0.7, 0)], 0.5, 100);
    assert_eq!(kept, vec![d(a, 0.9, 0), d(far, 0.7, 0)]);
    // different classes: both kept
    let kept = nms_per_class(vec![d(a2, 0.8, 1), d(a, 0.9, 0)], 0.5, 100);
    assert_eq!(kept.len(), 2);
    // max_keep
    assert_eq!(
        nms_per_class(vec![d(a, 0.9, 0), d(far, 0.7, 0)], 0.5, 1).len(),
        1
    );
    // IoU exactly below the threshold survives
    let half = [5.0, 0.0, 15.0, 10.0]; // IoU 1/3 with a
    assert_eq!(
        nms_per_class(vec![d(a, 0.9, 0), d(half, 0.8, 0)], 0.34, 10).len(),
        2
    );
    assert_eq!(
        nms_per_class(vec![d(a, 0.9, 0), d(half, 0.8, 0)], 0.33, 10).len(),
        1
    );
}

#[test]
fn assignment_centre_sampling_smallest_box_and_crowd() {
    // big box over the whole 64x64 image, small box inside it
    let big = gt([0.0, 0.0, 64.0, 64.0], 0);
    let small = gt([16.0, 16.0, 24.0, 24.0], 1); // one cell: (2, 2), centre (20, 20)
    let a = assign(GRID, S, &[big, small], 2.5);
    assert_eq!(a.positive[2 * 8 + 2], Some(1));
    // big box: centre (32, 32), radius 20 px (strict) -> cell centres 20, 28, 36, 44
    // -> gx, gy in 2..=5, minus the small box's cell (2, 2)
    let big_cells = a.positive.iter().filter(|p| **p == Some(0)).count();
    assert_eq!(big_cells, 4 * 4 - 1);
    assert!(a.positive[0].is_none());
    // a tiny box gets its centre cell even though no cell centre is inside it
    let tiny = gt([9.0, 9.0, 10.0, 10.0], 2);
    let a = assign(GRID, S, &[tiny], 2.5);
    assert_eq!(a.positive[8 + 1], Some(0));
    assert_eq!(a.positive.iter().flatten().count(), 1);
    // crowd: its cells ignored, never positive
    let crowd = DetBox {
        bbox: [32.0, 32.0, 64.0, 64.0],
        class: 0,
        crowd: true,
    };
    let a = assign(GRID, S, &[crowd], 2.5);
    assert_eq!(a.positive.iter().flatten().count(), 0);
    assert_eq!(a.ignored.iter().filter(|&&i| i).count(), 16);
}

#[test]
fn det_loss_near_zero_on_exact_encoding_and_large_otherwise() {
    let boxes_ = vec![
        gt([10.0, 12.0, 34.0, 40.0], 1),
        gt([40.0, 40.0, 60.0, 52.0], 2),
    ];
    let p = DetLossParams {
        l1_weight: 1.0,
        ..DetLossParams::default()
    };
    let exact = encode_targets(&boxes_, 20.0);
    let l = det_loss(&exact, GRID, S, std::slice::from_ref(&boxes_), &p).unwrap();
    let total = l.total.to_scalar::<f32>().unwrap();
    assert!(l.num_pos > 2);
    assert!(total < 1e-3, "total {total} {l:?}");
    // all-zero outputs: large
    let zeros = Tensor::zeros((1, 64, 5 + C), DType::F32, &CPU).unwrap();
    let l0 = det_loss(&zeros, GRID, S, std::slice::from_ref(&boxes_), &p).unwrap();
    assert!(l0.total.to_scalar::<f32>().unwrap() > 1.0, "{l0:?}");
    // wrong classes: cls term large
    let swapped = vec![
        gt([10.0, 12.0, 34.0, 40.0], 2),
        gt([40.0, 40.0, 60.0, 52.0], 1),
    ];
    let ls = det_loss(&exact, GRID, S, &[swapped], &p).unwrap();
    assert!(ls.cls > 10.0 && ls.bbox < 1e-3, "{ls:?}");
    // no boxes: only objectness; all-negative outputs give ~0, finite
    let ln = det_loss(&exact.affine(0.0, -20.0).unwrap(), GRID, S, &[vec![]], &p).unwrap();
    assert_eq!(ln.num_pos, 0);
    assert!(ln.total.to_scalar::<f32>().unwrap() < 1e-3);
    // shape errors
    assert!(det_loss(&exact, (4, 4), S, std::slice::from_ref(&boxes_), &p).is_err());
    assert!(det_loss(&exact, GRID, S, &[], &p).is_err());
}

#[test]
fn det_loss_is_finite_with_finite_gradient_at_extremes() {
    let boxes_ = vec![
        gt([10.0, 12.0, 34.0, 40.0], 1),
        DetBox {
            bbox: [0.0, 0.0, 20.0, 20.0],
            class: 0,
            crowd: true,
        },
    ];
    for (v, gamma) in [
        (100f32, 0.0),
        (-100.0, 0.0),
        (100.0, 2.0),
        (-100.0, 2.0),
        (1e4, 0.0),
    ] {
        let x = Var::from_tensor(&Tensor::full(v, (2, 64, 5 + C), &CPU).unwrap()).unwrap();
        let p = DetLossParams {
            focal_gamma: gamma,
            l1_weight: 1.0,
            ..DetLossParams::default()
        };
        let l = det_loss(x.as_tensor(), GRID, S, &[boxes_.clone(), vec![]], &p).unwrap();
        let total = l.total.to_scalar::<f32>().unwrap();
        assert!(total.is_finite(), "{v}: {l:?}");
        let g = l.total.backward().unwrap();
        let gv: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(gv.iter().all(|x| x.is_finite()), "{v}: non-finite gradient");
    }
}

#[test]
fn optimising_raw_outputs_recovers_the_box() {
    // Proves decode and loss agree: fit raw outputs with the loss, then decode.
    let target = gt([13.0, 9.0, 45.0, 33.0], 1);
    let x = Var::from_tensor(&Tensor::zeros((1, 64, 5 + C), DType::F32, &CPU).unwrap()).unwrap();
    let mut opt = AdamW::new(
        vec![x.clone()],
        ParamsAdamW {
            lr: 0.05,
            ..Default::default()
        },
    )
    .unwrap();
    let p = DetLossParams::default();
    for _ in 0..200 {
        let l = det_loss(x.as_tensor(), GRID, S, &[vec![target]], &p).unwrap();
        opt.backward_step(&l.total).unwrap();
    }
    let out = decode(x.as_tensor(), GRID, (64, 64), &DecodeParams::default()).unwrap();
    let best = out[0][0];
    assert_eq!(best.class, 1);
    let iou = boxes::iou(&best.bbox, &target.bbox);
    assert!(iou > 0.9, "iou {iou}, {best:?}");
    assert!(best.score > 0.5, "{best:?}");
    // NMS leaves essentially one detection of the box
    let strong: Vec<_> = out[0].iter().filter(|d| d.score > 0.3).collect();
    assert_eq!(strong.len(), 1, "{strong:?}");
}

#[test]
fn det_loss_gradient_matches_finite_differences() {
    // f64 so that central differences are accurate; every term on (focal obj, L1).
    let boxes_ = vec![
        gt([10.0, 12.0, 34.0, 40.0], 1),
        gt([40.0, 40.0, 60.0, 52.0], 2),
    ];
    let p = DetLossParams {
        l1_weight: 1.0,
        focal_gamma: 2.0,
        ..DetLossParams::default()
    };
    let n = 64 * (5 + C);
    // deterministic pseudo-random values in [-1, 1]
    let v: Vec<f64> = (0..n)
        .map(|i| ((i as f64 * 12.9898).sin() * 43758.5453).fract())
        .collect();
    let x = Var::from_tensor(&Tensor::from_vec(v.clone(), (1, 64, 5 + C), &CPU).unwrap()).unwrap();
    let loss = |t: &Tensor| {
        det_loss(t, GRID, S, std::slice::from_ref(&boxes_), &p)
            .unwrap()
            .total
            .to_scalar::<f64>()
            .unwrap()
    };
    let l = det_loss(x.as_tensor(), GRID, S, std::slice::from_ref(&boxes_), &p).unwrap();
    let g: Vec<f64> = l
        .total
        .backward()
        .unwrap()
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // positive cells of box 0 around (22, 26) -> cell (2, 3) = 26; a negative cell 63.
    let a = assign(GRID, S, &boxes_, 2.5);
    assert!(a.positive[3 * 8 + 2].is_some() && a.positive[63].is_none());
    let eps = 1e-6;
    for cell in [3 * 8 + 2, 63] {
        for ch in 0..5 + C {
            let i = cell * (5 + C) + ch;
            let mut plus = v.clone();
            plus[i] += eps;
            let mut minus = v.clone();
            minus[i] -= eps;
            let tp = Tensor::from_vec(plus, (1, 64, 5 + C), &CPU).unwrap();
            let tm = Tensor::from_vec(minus, (1, 64, 5 + C), &CPU).unwrap();
            let fd = (loss(&tp) - loss(&tm)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-5 * (1.0 + fd.abs()),
                "cell {cell} ch {ch}: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}
