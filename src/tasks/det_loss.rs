//! Detection loss for the anchor-free stride-8 head (box parametrisation in
//! [`crate::boxes`]).
//!
//! # Assignment (centre sampling, FCOS/YOLOX style), built on the CPU
//! A cell is positive for a non-crowd gt box if the cell centre `((gx+0.5)s, (gy+0.5)s)`
//! lies strictly inside the box **and** within `center_radius` cells of the box centre
//! (per axis). Every non-crowd box is also forced onto the cell containing its centre, so no
//! box is left without a positive however small it is. Conflicts: a forced (centre-cell)
//! claim beats a radius claim; otherwise the smaller box wins (ties: lower index). Cells
//! whose centre lies inside a crowd box and that are not positive are *ignored* by the
//! objectness loss (neither positive nor negative). Degenerate boxes (zero area) are skipped.
//!
//! # Loss (candle ops, gradients flow), normalised by `max(#positives, 1)` over the batch
//! - objectness: stable BCE (or sigmoid focal loss when `focal_gamma > 0`) over all
//!   non-ignored cells; target 1 on positives, 0 elsewhere (a constant 1, not the
//!   YOLOX IoU target: simpler, and it keeps the exact-encoding loss at 0);
//! - class: stable BCE of the `C` class logits against the one-hot class, positives only;
//! - box: `1 − GIoU(decoded box, gt box)` on positives (the decode of
//!   [`crate::boxes::decode_boxes`]);
//! - optional L1 between raw `tx, ty, tw, th` and [`crate::boxes::encode_box`] of
//!   the gt (`l1_weight`, default 0).
//!
//! `total = obj_weight·obj + cls_weight·cls + box_weight·box + l1_weight·l1`.

use candle_core::{bail, DType, Result, Tensor};

use crate::boxes::{decode_boxes, encode_box, giou_tensor, DetBox};

/// Weights and assignment settings of [`det_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetLossParams {
    /// Centre-sampling radius, in cells.
    pub center_radius: f32,
    pub obj_weight: f64,
    pub cls_weight: f64,
    /// Weight of the GIoU term (YOLOX uses 5 for its IoU term).
    pub box_weight: f64,
    /// Weight of the L1 term on raw offsets (0 = off).
    pub l1_weight: f64,
    /// Focal γ for objectness; 0 = plain BCE.
    pub focal_gamma: f64,
    /// Focal α for objectness (only used when `focal_gamma > 0`; < 0 disables).
    pub focal_alpha: f64,
}

impl Default for DetLossParams {
    fn default() -> Self {
        Self {
            center_radius: 2.5,
            obj_weight: 1.0,
            cls_weight: 1.0,
            box_weight: 5.0,
            l1_weight: 0.0,
            focal_gamma: 0.0,
            focal_alpha: 0.25,
        }
    }
}

/// The loss and its parts; the parts are plain values for logging, unweighted, each
/// normalised by the number of positives.
#[derive(Debug, Clone)]
pub struct DetLoss {
    /// Scalar to back-propagate.
    pub total: Tensor,
    pub obj: f32,
    pub cls: f32,
    /// `mean(1 − GIoU)` term.
    pub bbox: f32,
    pub l1: f32,
    /// Positive cells in the batch.
    pub num_pos: usize,
}

/// Cell assignment of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Per cell (`gy·w + gx`): index into the image's box list of the gt it regresses.
    pub positive: Vec<Option<usize>>,
    /// Per cell: ignored by the objectness loss (inside a crowd box, not positive).
    pub ignored: Vec<bool>,
}

/// Centre-sampling assignment of one image (see the module docs).
pub fn assign(
    grid: (usize, usize),
    stride: usize,
    boxes: &[DetBox],
    center_radius: f32,
) -> Assignment {
    let (h, w) = grid;
    let s = stride as f32;
    // (forced, area, gt index): lower is better after mapping forced -> 0.
    let mut best: Vec<Option<(bool, f32, usize)>> = vec![None; h * w];
    let better = |new: (bool, f32, usize), old: Option<(bool, f32, usize)>| match old {
        None => true,
        Some(o) => {
            if new.0 != o.0 {
                new.0
            } else {
                new.1 < o.1 || (new.1 == o.1 && new.2 < o.2)
            }
        }
    };
    let mut ignored = vec![false; h * w];
    for (gi, b) in boxes.iter().enumerate() {
        let [x0, y0, x1, y1] = b.bbox;
        if !(x1 > x0 && y1 > y0) {
            continue;
        }
        if b.crowd {
            for gy in 0..h {
                let py = (gy as f32 + 0.5) * s;
                for gx in 0..w {
                    let px = (gx as f32 + 0.5) * s;
                    if px > x0 && px < x1 && py > y0 && py < y1 {
                        ignored[gy * w + gx] = true;
                    }
                }
            }
            continue;
        }
        let area = (x1 - x0) * (y1 - y0);
        let (cx, cy) = (0.5 * (x0 + x1), 0.5 * (y0 + y1));
        let r = center_radius * s;
        for gy in 0..h {
            let py = (gy as f32 + 0.5) * s;
            if !(py > y0 && py < y1 && (py - cy).abs() < r) {
                continue;
            }
            for gx in 0..w {
                let px = (gx as f32 + 0.5) * s;
                if px > x0 && px < x1 && (px - cx).abs() < r {
                    let cand = (false, area, gi);
                    if better(cand, best[gy * w + gx]) {
                        best[gy * w + gx] = Some(cand);
                    }
                }
            }
        }
        let gx = ((cx / s).floor().max(0.0) as usize).min(w.saturating_sub(1));
        let gy = ((cy / s).floor().max(0.0) as usize).min(h.saturating_sub(1));
        let cand = (true, area, gi);
        if better(cand, best[gy * w + gx]) {
            best[gy * w + gx] = Some(cand);
        }
    }
    let positive: Vec<Option<usize>> = best.iter().map(|b| b.map(|(_, _, gi)| gi)).collect();
    for (ig, p) in ignored.iter_mut().zip(&positive) {
        if p.is_some() {
            *ig = false;
        }
    }
    Assignment { positive, ignored }
}

/// Detection loss of a batch.
///
/// - `det`: `(B, N, 5 + C)` raw head outputs, `N = h·w` (row-major cells);
/// - `grid`: `(h, w)`, `stride`: pixels per cell;
/// - `targets`: per image, its boxes in model-input pixels (`targets.len() == B`).
pub fn det_loss(
    det: &Tensor,
    grid: (usize, usize),
    stride: usize,
    targets: &[Vec<DetBox>],
    p: &DetLossParams,
) -> Result<DetLoss> {
    let (b, n, ch) = det.dims3()?;
    if n != grid.0 * grid.1 || ch < 6 || targets.len() != b {
        bail!(
            "det_loss: det {:?}, grid {grid:?}, {} target lists (expected (B, h·w, 5 + C), C ≥ 1, B lists)",
            det.dims(),
            targets.len()
        );
    }
    let num_classes = ch - 5;
    let device = det.device();
    let dtype = det.dtype();
    let w = grid.1;

    // ---- targets on the CPU
    let mut obj_t = vec![0f32; b * n];
    let mut obj_w = vec![1f32; b * n];
    let mut pos_idx: Vec<u32> = Vec::new();
    let mut pos_cells: Vec<f32> = Vec::new();
    let mut pos_boxes: Vec<f32> = Vec::new();
    let mut pos_cls: Vec<f32> = Vec::new();
    let mut pos_raw: Vec<f32> = Vec::new();
    for (bi, boxes) in targets.iter().enumerate() {
        for bx in boxes {
            if !bx.crowd && bx.class >= num_classes {
                bail!(
                    "det_loss: box class {} but the head has {num_classes} classes",
                    bx.class
                );
            }
        }
        let a = assign(grid, stride, boxes, p.center_radius);
        for cell in 0..n {
            let k = bi * n + cell;
            if a.ignored[cell] {
                obj_w[k] = 0.0;
            }
            if let Some(gi) = a.positive[cell] {
                let g = &boxes[gi];
                let (gx, gy) = (cell % w, cell / w);
                obj_t[k] = 1.0;
                pos_idx.push(k as u32);
                pos_cells.extend([gx as f32, gy as f32]);
                pos_boxes.extend(g.bbox);
                let mut onehot = vec![0f32; num_classes];
                onehot[g.class] = 1.0;
                pos_cls.extend(onehot);
                pos_raw.extend(encode_box(&g.bbox, gx, gy, stride));
            }
        }
    }
    let num_pos = pos_idx.len();
    let norm = num_pos.max(1) as f64;

    // ---- losses in candle ops
    let flat = det.reshape((b * n, ch))?;
    let obj_logit = flat.narrow(1, 4, 1)?.squeeze(1)?;
    let obj_t = Tensor::from_vec(obj_t, b * n, device)?.to_dtype(dtype)?;
    let obj_w = Tensor::from_vec(obj_w, b * n, device)?.to_dtype(dtype)?;
    let obj_el = if p.focal_gamma > 0.0 {
        sigmoid_focal_loss(&obj_logit, &obj_t, p.focal_alpha, p.focal_gamma)?
    } else {
        stable_bce_with_logits(&obj_logit, &obj_t)?
    };
    let obj = ((obj_el * obj_w)?.sum_all()? / norm)?;

    let zero = Tensor::zeros((), dtype, device)?;
    let (cls, bbox, l1) = if num_pos > 0 {
        let idx = Tensor::from_vec(pos_idx, num_pos, device)?;
        let pos = flat.index_select(&idx, 0)?; // (P, 5 + C)
        let cells = Tensor::from_vec(pos_cells, (num_pos, 2), device)?;
        let gt = Tensor::from_vec(pos_boxes, (num_pos, 4), device)?.to_dtype(dtype)?;
        let raw = pos.narrow(1, 0, 4)?;
        let pred = decode_boxes(&raw, &cells, stride)?;
        let bbox = ((1.0 - giou_tensor(&pred, &gt)?)?.sum_all()? / norm)?;
        let cls_t = Tensor::from_vec(pos_cls, (num_pos, num_classes), device)?.to_dtype(dtype)?;
        let cls =
            (stable_bce_with_logits(&pos.narrow(1, 5, num_classes)?, &cls_t)?.sum_all()? / norm)?;
        let l1 = if p.l1_weight > 0.0 {
            let raw_t = Tensor::from_vec(pos_raw, (num_pos, 4), device)?.to_dtype(dtype)?;
            ((raw - raw_t)?.abs()?.sum_all()? / norm)?
        } else {
            zero.clone()
        };
        (cls, bbox, l1)
    } else {
        (zero.clone(), zero.clone(), zero)
    };
    let total = (((obj.affine(p.obj_weight, 0.0)? + cls.affine(p.cls_weight, 0.0)?)?
        + bbox.affine(p.box_weight, 0.0)?)?
        + l1.affine(p.l1_weight, 0.0)?)?;
    // One device->host copy for the four logged parts.
    let parts = Tensor::stack(&[&obj, &cls, &bbox, &l1], 0)?
        .detach()
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(DetLoss {
        total,
        obj: parts[0],
        cls: parts[1],
        bbox: parts[2],
        l1: parts[3],
        num_pos,
    })
}

/// Element-wise binary cross-entropy with logits, the stable form
/// `relu(x) − x·t + log(1 + exp(−|x|))` (finite for any finite `x`; candle_nn's version
/// returns inf at |x| ≈ 30). `x` and `t` have the same shape; `t` in `[0, 1]`.
pub fn stable_bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    if x.dims() != t.dims() {
        bail!(
            "stable_bce_with_logits: logits {:?} vs targets {:?}",
            x.dims(),
            t.dims()
        );
    }
    let log_term = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (x.relu()? - (x * t)?)? + log_term
}

/// Mean of [`stable_bce_with_logits`] over all elements.
pub fn stable_bce_with_logits_mean(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    stable_bce_with_logits(x, t)?.mean_all()
}

/// Element-wise sigmoid focal loss (Lin et al.): `α_t · (1 − p_t)^γ · BCE(x, t)` with
/// `p_t = p·t + (1−p)(1−t)`, `α_t = α·t + (1−α)(1−t)`; `alpha < 0` disables the α
/// weighting, `gamma = 0` gives the plain (stable) BCE. The modulating base is clamped to
/// `[1e-12, 1]` so that `γ < 1` has a finite gradient.
pub fn sigmoid_focal_loss(x: &Tensor, t: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let ce = stable_bce_with_logits(x, t)?;
    let mut loss = if gamma == 0.0 {
        ce
    } else {
        let p = candle_nn::ops::sigmoid(x)?;
        // 1 − p_t = p + t − 2·p·t
        let one_minus_pt = ((&p + t)? - (&p * t)?.affine(2.0, 0.0)?)?;
        let modulator = one_minus_pt.clamp(1e-12, 1.0)?.powf(gamma)?;
        (ce * modulator)?
    };
    if alpha >= 0.0 {
        // α_t = (1 − α) + (2α − 1)·t
        let alpha_t = t.affine(2.0 * alpha - 1.0, 1.0 - alpha)?;
        loss = (loss * alpha_t)?;
    }
    Ok(loss)
}
