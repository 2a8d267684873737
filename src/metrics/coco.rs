//! COCO's evaluation protocol constants (pycocotools' `Params`), shared by the mAP evaluator
//! ([`super::map`]) and the per-image scores it hands the bootstrap ([`super::per_image`]).

/// Detections kept per image and category (COCO's `maxDets[-1]`).
pub const MAX_DETS: usize = 100;
/// Number of IoU thresholds (0.50, 0.55, …, 0.95).
pub const NUM_IOU_THRESHOLDS: usize = 10;
/// Number of recall sampling points (0, 0.01, …, 1).
pub const NUM_RECALL_POINTS: usize = 101;

/// The IoU thresholds exactly as numpy's `linspace(.5, 0.95, 10)` computes them.
pub fn iou_thresholds() -> [f64; NUM_IOU_THRESHOLDS] {
    let step = (0.95 - 0.5) / 9.0;
    let mut t = [0.0; NUM_IOU_THRESHOLDS];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f64 * step + 0.5;
    }
    t[NUM_IOU_THRESHOLDS - 1] = 0.95;
    t
}

/// The recall points exactly as numpy's `linspace(0, 1, 101)` computes them.
pub fn recall_points() -> [f64; NUM_RECALL_POINTS] {
    let step = 1.0 / 100.0;
    let mut r = [0.0; NUM_RECALL_POINTS];
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as f64 * step;
    }
    r[NUM_RECALL_POINTS - 1] = 1.0;
    r
}
