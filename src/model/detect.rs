//! Detection box parametrisation and decoding (anchor-free, one prediction per stride-8
//! cell, FCOS/YOLOX style).
//!
//! # Parametrisation (shared by [`decode`] and the loss, [`crate::train::det_loss`])
//! For the cell at column `gx`, row `gy` (cell index `gy·w + gx`) of a map with stride `s`,
//! raw outputs `tx, ty, tw, th` give the box
//!
//! ```text
//! cx = (gx + 0.5 + tx) · s        cy = (gy + 0.5 + ty) · s
//! w  = exp(clamp(tw, ±6)) · s     h  = exp(clamp(th, ±6)) · s
//! box = [cx − w/2, cy − h/2, cx + w/2, cy + h/2]   (input-image pixels)
//! ```
//!
//! so `t = 0` is an `s × s` box centred on the cell. The centre offset is linear
//! (YOLOX-like, no sigmoid): positives come from centre sampling within 2.5 cells of the
//! box centre, so offsets of a few cells must be reachable. The log-size clamp (±6, i.e.
//! 0.02 px … 3200 px at stride 8) only guards `exp` against overflow. The formula exists
//! once, in [`decode_boxes`]; [`encode_box`] is its exact inverse (for L1 targets/tests).
//!
//! # Scores
//! Channel 4 is objectness, channels `5..5+C` class logits, trained with independent
//! sigmoids (BCE): `score(c) = sigmoid(obj) · sigmoid(class_c)`. Every class of a cell
//! above the threshold is a candidate (multi-label, as FCOS).

use candle_core::{bail, DType, Device, Result, Tensor, D};

use crate::metrics::boxes;

/// Bound of `tw`, `th` before `exp`.
pub const MAX_LOG_SIZE: f64 = 6.0;

/// One decoded detection in input-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[x0, y0, x1, y1]` in pixels of the model input.
    pub bbox: [f32; 4],
    /// objectness × class probability.
    pub score: f32,
    pub class: usize,
}

/// Post-processing settings of [`decode`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeParams {
    /// Candidates with `score ≤` this are dropped.
    pub score_threshold: f32,
    /// Same-class boxes with IoU `>` this to a higher-scored kept box are suppressed.
    pub nms_iou: f32,
    /// Kept detections per image after NMS.
    pub max_detections: usize,
    /// Candidates per image entering NMS (highest scores).
    pub pre_nms_top_k: usize,
}

impl Default for DecodeParams {
    fn default() -> Self {
        Self {
            score_threshold: 0.05,
            nms_iou: 0.5,
            max_detections: 100,
            pre_nms_top_k: 1000,
        }
    }
}

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
/// pixels. Differentiable (used by the loss on positive cells and by [`decode`] on all).
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

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
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
            .any(|k| k.class == c.class && boxes::iou(&k.bbox, &c.bbox) > iou_threshold);
        if !suppressed {
            kept.push(c);
        }
    }
    kept
}

/// Decodes raw detection outputs into per-image detections.
///
/// - `det`: `(B, N, 5 + C)` raw outputs, `N = h·w` row-major (any device / float dtype);
/// - `grid`: `(h, w)`; `stride`: pixels per cell; `image_size`: `(height, width)` of the
///   model input, to which boxes are clipped.
///
/// Boxes come from [`decode_boxes`] (the same function the loss uses), then everything is
/// moved to the CPU with one `to_vec3`: score threshold, `pre_nms_top_k`, per-class NMS,
/// `max_detections`. Boxes with zero area after clipping are dropped.
pub fn decode(
    det: &Tensor,
    grid: (usize, usize),
    stride: usize,
    image_size: (usize, usize),
    p: &DecodeParams,
) -> Result<Vec<Vec<Detection>>> {
    let (_b, n, ch) = det.dims3()?;
    if n != grid.0 * grid.1 || ch < 6 {
        bail!(
            "decode: det {:?} does not match grid {grid:?} (expected (B, {}, 5 + C), C ≥ 1)",
            det.dims(),
            grid.0 * grid.1
        );
    }
    let num_classes = ch - 5;
    let cells = cell_coords(grid, det.device())?;
    let bxs = decode_boxes(&det.narrow(2, 0, 4)?, &cells, stride)?;
    let all = Tensor::cat(&[bxs, det.narrow(2, 4, ch - 4)?], 2)?
        .to_dtype(DType::F32)?
        .to_vec3::<f32>()?;
    let mut out = Vec::with_capacity(all.len());
    for img in all {
        let mut cands = Vec::new();
        for row in &img {
            let obj = sigmoid(row[4]);
            if obj <= p.score_threshold {
                continue; // score ≤ obj: nothing of this cell can pass
            }
            let bbox = boxes::clip(&[row[0], row[1], row[2], row[3]], image_size);
            if boxes::area(&bbox) <= 0.0 {
                continue;
            }
            for c in 0..num_classes {
                let score = obj * sigmoid(row[5 + c]);
                if score > p.score_threshold {
                    cands.push(Detection {
                        bbox,
                        score,
                        class: c,
                    });
                }
            }
        }
        cands.sort_by(|a, b| b.score.total_cmp(&a.score));
        cands.truncate(p.pre_nms_top_k);
        out.push(nms_per_class(cands, p.nms_iou, p.max_detections));
    }
    Ok(out)
}
