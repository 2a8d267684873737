//! Plain box geometry on `[x0, y0, x1, y1]` pixel boxes (x right, y down), shared by the
//! mAP evaluator and NMS so that both use one definition of IoU.
//!
//! Conventions follow pycocotools (`maskUtils.iou` on boxes): width = `x1 - x0` (no `+1`),
//! degenerate or inverted boxes have area 0, an IoU with a zero union is 0.

/// Area of a box; 0 for degenerate or inverted boxes.
pub fn area(b: &[f32; 4]) -> f32 {
    area_f64(b) as f32
}

/// [`area`] computed in f64.
pub fn area_f64(b: &[f32; 4]) -> f64 {
    let w = (b[2] as f64 - b[0] as f64).max(0.0);
    let h = (b[3] as f64 - b[1] as f64).max(0.0);
    w * h
}

/// Intersection area of two boxes, in f64 (like pycocotools, so IoUs that land exactly on
/// an evaluation threshold compare the same way).
pub fn intersection_f64(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let w = (a[2] as f64).min(b[2] as f64) - (a[0] as f64).max(b[0] as f64);
    let h = (a[3] as f64).min(b[3] as f64) - (a[1] as f64).max(b[1] as f64);
    if w <= 0.0 || h <= 0.0 {
        0.0
    } else {
        w * h
    }
}

/// Intersection area of two boxes.
pub fn intersection(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    intersection_f64(a, b) as f32
}

/// Intersection over union computed in f64 (used by the mAP evaluator); 0 when the union
/// is empty.
pub fn iou_f64(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let inter = intersection_f64(a, b);
    let union = area_f64(a) + area_f64(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Intersection over union (used by NMS); 0 when the union is empty.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    iou_f64(a, b) as f32
}

/// COCO's IoU against a crowd ground truth, in f64: intersection / area of the
/// *detection* (a detection lying inside a crowd region scores 1 whatever its size).
pub fn crowd_iou_f64(det: &[f32; 4], crowd_gt: &[f32; 4]) -> f64 {
    let a = area_f64(det);
    if a <= 0.0 {
        0.0
    } else {
        intersection_f64(det, crowd_gt) / a
    }
}

/// [`crowd_iou_f64`] as f32.
pub fn crowd_iou(det: &[f32; 4], crowd_gt: &[f32; 4]) -> f32 {
    crowd_iou_f64(det, crowd_gt) as f32
}

/// Generalised IoU: `iou − (enclosing − union) / enclosing`, in `[-1, 1]`.
/// The tensor version used by the loss is [`crate::train::losses::giou`].
pub fn giou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let inter = intersection(a, b);
    let union = area(a) + area(b) - inter;
    let enclosing =
        (a[2].max(b[2]) - a[0].min(b[0])).max(0.0) * (a[3].max(b[3]) - a[1].min(b[1])).max(0.0);
    if enclosing <= 0.0 {
        return 0.0;
    }
    let iou = if union <= 0.0 { 0.0 } else { inter / union };
    iou - (enclosing - union) / enclosing
}

/// Clips a box to an image of `(height, width)` pixels.
pub fn clip(b: &[f32; 4], image_size: (usize, usize)) -> [f32; 4] {
    let (h, w) = (image_size.0 as f32, image_size.1 as f32);
    [
        b[0].clamp(0.0, w),
        b[1].clamp(0.0, h),
        b[2].clamp(0.0, w),
        b[3].clamp(0.0, h),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_ious() {
        let a = [0.0, 0.0, 2.0, 2.0];
        let b = [1.0, 1.0, 3.0, 3.0];
        // inter 1, union 4 + 4 - 1 = 7
        assert!((iou(&a, &b) - 1.0 / 7.0).abs() < 1e-7);
        // enclosing 3x3 = 9: giou = 1/7 - 2/9
        assert!((giou(&a, &b) - (1.0 / 7.0 - 2.0 / 9.0)).abs() < 1e-7);
        assert_eq!(iou(&a, &a), 1.0);
        assert_eq!(giou(&a, &a), 1.0);
        // disjoint: iou 0, giou = 0 - (enclosing - union)/enclosing
        let c = [4.0, 0.0, 6.0, 2.0];
        assert_eq!(iou(&a, &c), 0.0);
        assert!((giou(&a, &c) - (0.0 - (12.0 - 8.0) / 12.0)).abs() < 1e-7);
        // crowd iou: det fully inside the crowd box -> 1
        assert_eq!(
            crowd_iou(&[1.0, 1.0, 2.0, 2.0], &[0.0, 0.0, 10.0, 10.0]),
            1.0
        );
        // degenerate boxes
        assert_eq!(iou(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]), 0.0);
        assert_eq!(area(&[3.0, 3.0, 1.0, 1.0]), 0.0);
        assert_eq!(
            clip(&[-5.0, -1.0, 50.0, 8.0], (10, 20)),
            [0.0, 0.0, 20.0, 8.0]
        );
    }
}
