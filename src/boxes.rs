//! Box geometry, in one leaf module that everyone may use (tasks, metrics, augmentation,
//! plug-ins) and that imports nothing of onehead: box types, IoU / GIoU (plain and as a
//! differentiable tensor op), clipping, flips and crops, per-class NMS, and the detection
//! head's box parametrisation (encode / decode).
//!
//! Boxes are `[x0, y0, x1, y1]` in pixels, x to the right, y down. Conventions follow
//! pycocotools (`maskUtils.iou` on boxes): width = `x1 - x0` (no `+1`), degenerate or
//! inverted boxes have area 0, an IoU with a zero union is 0.
//!
//! # Parametrisation of the detection head (anchor-free, one prediction per cell)
//! For the cell at column `gx`, row `gy` of a map with stride `s`, raw outputs
//! `tx, ty, tw, th` give the box
//!
//! ```text
//! cx = (gx + 0.5 + tx) · s        cy = (gy + 0.5 + ty) · s
//! w  = exp(clamp(tw, ±6)) · s     h  = exp(clamp(th, ±6)) · s
//! ```
//!
//! so `t = 0` is an `s × s` box centred on the cell. The centre offset is linear
//! (YOLOX-like, no sigmoid): positives come from centre sampling within 2.5 cells of the
//! box centre, so offsets of a few cells must be reachable. The log-size clamp only guards
//! `exp` against overflow. The formula exists once, in [`decode_boxes`]; [`encode_box`] is
//! its exact inverse.

use candle_core::{bail, Device, Result, Tensor, D};

/// One ground-truth box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetBox {
    /// `[x0, y0, x1, y1]` in pixels of the image it belongs to.
    pub bbox: [f32; 4],
    /// Contiguous class index `0..num_classes` (COCO category ids are remapped).
    pub class: usize,
    /// An ignore region rather than an object: COCO's `iscrowd` boxes (the metric neither
    /// rewards nor penalises detections inside them), and boxes that an augmentation crop
    /// cut down too far to be a fair target although part of the object is still visible
    /// (the loss treats their cells as neither positive nor negative).
    pub crowd: bool,
}

/// One predicted box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[x0, y0, x1, y1]` in pixels.
    pub bbox: [f32; 4],
    /// Confidence (objectness × class probability for onehead's head).
    pub score: f32,
    pub class: usize,
}

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

/// Generalised IoU: `iou − (enclosing − union) / enclosing`, in `[-1, 1]`. The tensor
/// version used by the loss is [`giou_tensor`].
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

/// Generalised IoU of boxes `(…, 4)`, both the same shape → `(…)`, differentiable. Small
/// epsilons keep it finite for degenerate boxes. Plain twin: [`giou`].
pub fn giou_tensor(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || a.dims().last() != Some(&4) {
        bail!(
            "giou: boxes must be (…, 4) of equal shapes, got {:?} and {:?}",
            a.dims(),
            b.dims()
        );
    }
    let col = |t: &Tensor, i: usize| t.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1);
    let (ax0, ay0, ax1, ay1) = (col(a, 0)?, col(a, 1)?, col(a, 2)?, col(a, 3)?);
    let (bx0, by0, bx1, by1) = (col(b, 0)?, col(b, 1)?, col(b, 2)?, col(b, 3)?);
    let area_a = ((&ax1 - &ax0)?.relu()? * (&ay1 - &ay0)?.relu()?)?;
    let area_b = ((&bx1 - &bx0)?.relu()? * (&by1 - &by0)?.relu()?)?;
    let iw = (ax1.minimum(&bx1)? - ax0.maximum(&bx0)?)?.relu()?;
    let ih = (ay1.minimum(&by1)? - ay0.maximum(&by0)?)?.relu()?;
    let inter = (iw * ih)?;
    let union = ((area_a + area_b)? - &inter)?;
    let union_eps = (&union + 1e-7)?;
    let ew = (ax1.maximum(&bx1)? - ax0.minimum(&bx0)?)?.relu()?;
    let eh = (ay1.maximum(&by1)? - ay0.minimum(&by0)?)?.relu()?;
    let enclosing = ((ew * eh)? + 1e-7)?;
    let iou = inter.div(&union_eps)?;
    iou - ((&enclosing - &union)? / &enclosing)?
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

/// Scale boxes by `(sx, sy)` (e.g. from model-input pixels to original-image pixels).
pub fn scale(b: &[f32; 4], sx: f32, sy: f32) -> [f32; 4] {
    [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]
}

/// Mirror boxes left-right in an image `width` pixels wide: `x0' = width - x1`, `x1' = width - x0`.
pub fn flip_boxes(boxes: &[DetBox], width: f32) -> Vec<DetBox> {
    boxes
        .iter()
        .map(|b| DetBox {
            bbox: [width - b.bbox[2], b.bbox[1], width - b.bbox[0], b.bbox[3]],
            ..*b
        })
        .collect()
}

/// A box must keep at least this fraction of its area inside a crop to stay a target.
pub const MIN_VISIBLE_AREA: f32 = 0.25;
/// A box clipped by a crop must keep sides of at least this many output pixels to stay a target.
pub const MIN_CLIPPED_SIDE: f32 = 2.0;

/// Map boxes of an image into its crop `(cx, cy, cw, ch)` (pixels of that image) resized to
/// `out_w × out_h`: shift and scale, clip to the crop. A box that keeps less than
/// [`MIN_VISIBLE_AREA`] of its area, or that the crop clipped to a side under
/// [`MIN_CLIPPED_SIDE`] output pixels, is no fair target any more: it is kept as an ignore
/// region (`crowd = true`) when part of it is still visible, so that its visible pixels are
/// not taught as background, and dropped when nothing of it is left. Boxes wholly inside
/// the crop are kept as they are (they only grow). Boxes are not flipped here.
pub fn crop_boxes(
    boxes: &[DetBox],
    crop: (f32, f32, f32, f32),
    out_w: f32,
    out_h: f32,
) -> Vec<DetBox> {
    let (cx, cy, cw, ch) = crop;
    let (kx, ky) = (out_w / cw, out_h / ch);
    boxes
        .iter()
        .filter_map(|b| {
            let [x0, y0, x1, y1] = b.bbox;
            let (vx0, vy0) = (x0.max(cx), y0.max(cy));
            let (vx1, vy1) = (x1.min(cx + cw), y1.min(cy + ch));
            if vx1 <= vx0 || vy1 <= vy0 {
                return None;
            }
            let area = (x1 - x0) * (y1 - y0);
            let visible = (vx1 - vx0) * (vy1 - vy0);
            let nb = [
                (vx0 - cx) * kx,
                (vy0 - cy) * ky,
                (vx1 - cx) * kx,
                (vy1 - cy) * ky,
            ];
            let clipped = visible < area;
            let too_small = visible < MIN_VISIBLE_AREA * area
                || (clipped
                    && (nb[2] - nb[0] < MIN_CLIPPED_SIDE || nb[3] - nb[1] < MIN_CLIPPED_SIDE));
            Some(DetBox {
                bbox: nb,
                crowd: b.crowd || too_small,
                ..*b
            })
        })
        .collect()
}

/// Greedy per-class NMS: candidates sorted by descending score (stable for ties), a box is
/// dropped if its IoU with an already kept box **of the same class** is `> iou_threshold`;
/// at most `max_keep` are returned, best first.
pub fn nms_per_class(
    mut cands: Vec<Detection>,
    iou_threshold: f32,
    max_keep: usize,
) -> Vec<Detection> {
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for c in cands {
        if kept.len() >= max_keep {
            break;
        }
        let suppressed = kept
            .iter()
            .any(|k| k.class == c.class && iou(&k.bbox, &c.bbox) > iou_threshold);
        if !suppressed {
            kept.push(c);
        }
    }
    kept
}

/// Bound of `tw`, `th` before `exp` (0.02 px … 3200 px at stride 8).
pub const MAX_LOG_SIZE: f64 = 6.0;

/// `(N, 2)` f32 tensor of `(gx, gy)` for every cell of a `(h, w)` grid, row-major.
pub fn cell_coords(grid: (usize, usize), device: &Device) -> Result<Tensor> {
    let (h, w) = grid;
    let mut v = Vec::with_capacity(h * w * 2);
    for gy in 0..h {
        for gx in 0..w {
            v.push(gx as f32);
            v.push(gy as f32);
        }
    }
    Tensor::from_vec(v, (h * w, 2), device)
}

/// THE box parametrisation (see the module docs): raw `(…, 4)` = `tx, ty, tw, th` and cell
/// coordinates broadcastable to `(…, 2)` = `gx, gy` → boxes `(…, 4)` `[x0, y0, x1, y1]` in
/// pixels. Differentiable (used by the loss on positive cells and by decoding on all).
pub fn decode_boxes(raw: &Tensor, cells: &Tensor, stride: usize) -> Result<Tensor> {
    if raw.dims().last() != Some(&4) || cells.dims().last() != Some(&2) {
        bail!(
            "decode_boxes: raw must be (…, 4) and cells (…, 2), got {:?} and {:?}",
            raw.dims(),
            cells.dims()
        );
    }
    let s = stride as f64;
    let txy = raw.narrow(D::Minus1, 0, 2)?;
    let twh = raw.narrow(D::Minus1, 2, 2)?;
    let centre = (txy.broadcast_add(&cells.to_dtype(raw.dtype())?)? + 0.5)?.affine(s, 0.0)?;
    let half = twh
        .clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE)?
        .exp()?
        .affine(0.5 * s, 0.0)?;
    Tensor::cat(&[(&centre - &half)?, (&centre + &half)?], D::Minus1)
}

/// Inverse of [`decode_boxes`] for one box and one cell: the raw `tx, ty, tw, th` that
/// decode to `bbox` from cell `(gx, gy)` (sizes floored at a tiny positive value; no clamp,
/// boxes in range round-trip exactly up to float error).
pub fn encode_box(bbox: &[f32; 4], gx: usize, gy: usize, stride: usize) -> [f32; 4] {
    let s = stride as f32;
    let cx = 0.5 * (bbox[0] + bbox[2]);
    let cy = 0.5 * (bbox[1] + bbox[3]);
    let w = (bbox[2] - bbox[0]).max(1e-6);
    let h = (bbox[3] - bbox[1]).max(1e-6);
    [
        cx / s - gx as f32 - 0.5,
        cy / s - gy as f32 - 0.5,
        (w / s).ln(),
        (h / s).ln(),
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

    #[test]
    fn giou_tensor_matches_the_plain_version() {
        let a = [[0.0f32, 0.0, 2.0, 2.0], [4.0, 0.0, 6.0, 2.0]];
        let b = [[1.0f32, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]];
        let ta = Tensor::new(&a, &Device::Cpu).unwrap();
        let tb = Tensor::new(&b, &Device::Cpu).unwrap();
        let g = giou_tensor(&ta, &tb).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((g[i] - giou(&a[i], &b[i])).abs() < 1e-5, "{i}: {}", g[i]);
        }
    }

    #[test]
    fn crops_keep_cut_boxes_as_ignore_regions() {
        let b = |bbox| DetBox {
            bbox,
            class: 1,
            crowd: false,
        };
        // Crop the left half of a 100x100 image, resized to 100x100 (x scaled by 2).
        let boxes = [
            b([10.0, 10.0, 30.0, 30.0]), // inside: kept, doubled in x
            b([40.0, 0.0, 90.0, 50.0]),  // 10 of 50 px wide visible (20 %): ignore region
            b([60.0, 0.0, 90.0, 50.0]),  // outside: dropped
        ];
        let out = crop_boxes(&boxes, (0.0, 0.0, 50.0, 100.0), 100.0, 100.0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].bbox, [20.0, 10.0, 60.0, 30.0]);
        assert!(!out[0].crowd);
        assert_eq!(out[1].bbox, [80.0, 0.0, 100.0, 50.0]);
        assert!(
            out[1].crowd,
            "a mostly cut-off box becomes an ignore region"
        );
    }

    #[test]
    fn encode_inverts_decode() {
        let bbox = [12.0f32, 30.0, 50.0, 44.0];
        let t = encode_box(&bbox, 3, 4, 8);
        let raw = Tensor::new(&[t], &Device::Cpu).unwrap();
        let cells = Tensor::new(&[[3.0f32, 4.0]], &Device::Cpu).unwrap();
        let back = decode_boxes(&raw, &cells, 8)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (x, y) in back[0].iter().zip(bbox) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}
