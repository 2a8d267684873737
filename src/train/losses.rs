//! Task losses, all in candle ops so that gradients flow, all numerically safe at extreme
//! logits (no `log(sigmoid)`, no `exp` of an unbounded positive value).
//!
//! The detection loss lives in [`crate::train::det_loss`]; the box operations it needs in
//! tensor form ([`giou`]) are here, their plain `[f32; 4]` twins in [`crate::metrics::boxes`].

use candle_core::{bail, DType, Result, Tensor, D};

/// Mean cross-entropy over the valid pixels of a segmentation batch.
///
/// - `logits`: `(B, C, H, W)` float;
/// - `masks`: `(B, H, W)` `u32` class ids, `ignore` (255 for VOC) = not counted.
///
/// Computes log-softmax over C, gathers the target class (ignored pixels gather class 0 and are then
/// multiplied by 0, so they get exactly zero gradient), divide by the number of valid
/// pixels. All pixels ignored → 0 (not NaN). Mask values other than `ignore` must be `< C`.
pub fn seg_cross_entropy(logits: &Tensor, masks: &Tensor, ignore: u32) -> Result<Tensor> {
    let (b, _c, h, w) = match logits.dims() {
        &[b, c, h, w] => (b, c, h, w),
        d => bail!("seg_cross_entropy: logits must be (B, C, H, W), got {d:?}"),
    };
    if masks.dims() != [b, h, w] {
        bail!(
            "seg_cross_entropy: masks {:?} do not match logits {:?} (expected ({b}, {h}, {w}))",
            masks.dims(),
            logits.dims()
        );
    }
    if masks.dtype() != DType::U32 {
        bail!(
            "seg_cross_entropy: masks must be u32, got {:?}",
            masks.dtype()
        );
    }
    // The fused kernel (one pass each way on CPU; the composed form above elsewhere):
    // the unfused composition cost ~780 ms per 224² batch-16 step.
    crate::ops::loss::pixel_cross_entropy(logits, masks, Some(ignore))
}

/// Mean cross-entropy of classification logits `(B, C)` against labels `(B,)` `u32`.
pub fn cls_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, _c) = match logits.dims() {
        &[b, c] => (b, c),
        d => bail!("cls_cross_entropy: logits must be (B, C), got {d:?}"),
    };
    if labels.dims() != [b] {
        bail!(
            "cls_cross_entropy: labels {:?} do not match logits {:?}",
            labels.dims(),
            logits.dims()
        );
    }
    candle_nn::loss::cross_entropy(logits, &labels.to_dtype(DType::U32)?)
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

/// Generalised IoU of boxes `(…, 4)` `[x0, y0, x1, y1]`, both the same shape → `(…)`.
/// Small epsilons keep it finite for degenerate boxes. Plain twin:
/// [`crate::metrics::boxes::giou`].
pub fn giou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
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
