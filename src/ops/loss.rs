//! Fused pixel-wise cross-entropy with an ignore index, and the same loss on logits
//! upsampled bilinearly on the fly.
//!
//! Why: `candle_nn::loss::cross_entropy` is rank-2 only and has no ignore index, and the
//! composed form (log-softmax over dim 1 + gather + mask) runs several broadcast ops over the
//! full-resolution logits: ≈ 130 ms forward and ≈ 580 ms backward for `(16,21,224,224)`.
//! [`pixel_cross_entropy`] is one pass forward and one pass backward.
//!
//! [`upsampled_pixel_cross_entropy`] computes `pixel_cross_entropy(resize_bilinear(logits, H,
//! W), targets)` (the report's segmentation loss: stride-8 logits upsampled to the mask's full
//! resolution) without ever materialising the upsampled logits or their gradient: at 224×224,
//! batch 16 those are two 67 MB tensors (plus candle's zero-filled gradient accumulator),
//! fresh pages every step. Each output row is interpolated into a small scratch, its
//! cross-entropy taken, and in the backward its gradient is pushed straight back through the
//! interpolation weights. Same value and gradient as the composed pair (same interpolation
//! arithmetic; see the tests).
//!
//! Rows are processed in parallel and summed sequentially in a fixed order: the loss is
//! bit-reproducible run to run (exact resume).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath;
use super::resize::{resize_bilinear, taps};
use super::simd::multiversion;
use super::storage::{f32_slice, u32_slice};

/// No ignore index.
const NO_IGNORE: u32 = u32::MAX;

/// Check targets against `c` classes; count valid pixels.
fn count_valid(t: &[u32], c: usize, ignore: u32) -> Result<usize> {
    let mut n = 0;
    for &v in t {
        if v == ignore {
            continue;
        }
        if v as usize >= c {
            candle_core::bail!(
                "pixel_cross_entropy: target {v} out of range for {c} classes (ignore index {})",
                if ignore == NO_IGNORE {
                    "none".to_string()
                } else {
                    ignore.to_string()
                }
            )
        }
        n += 1;
    }
    Ok(n)
}

/// Per-pixel max `m` and `s = Σ_c exp(l_c − m)` of a row of `w` pixels whose class `c` values
/// start at `l[c·stride]`.
#[inline(always)]
fn row_max_sum(l: &[f32], stride: usize, c: usize, m: &mut [f32], s: &mut [f32]) {
    let w = m.len();
    m.copy_from_slice(&l[..w]);
    for ch in 1..c {
        for (mv, &v) in m.iter_mut().zip(&l[ch * stride..ch * stride + w]) {
            *mv = mv.max(v);
        }
    }
    s.fill(0.0);
    for ch in 0..c {
        for ((sv, &v), &mv) in s.iter_mut().zip(&l[ch * stride..ch * stride + w]).zip(&*m) {
            *sv += fastmath::exp(v - mv);
        }
    }
}

multiversion! {
    /// Σ over the valid pixels of one row of `−log softmax(l)[target]`, in f64.
    fn ce_row(l: &[f32], stride: usize, c: usize, t: &[u32], ignore: u32, m: &mut [f32], s: &mut [f32]) -> f64 {
        row_max_sum(l, stride, c, m, s);
        for sv in s.iter_mut() {
            *sv = fastmath::ln(*sv);
        }
        let mut acc = 0f64;
        for (x, &tv) in t.iter().enumerate() {
            if tv == ignore {
                continue;
            }
            acc += (s[x] + m[x] - l[tv as usize * stride + x]) as f64;
        }
        acc
    }
}

multiversion! {
    /// Gradient of one row: `out[c·ostride + x] = k·(softmax − onehot)`, 0 at ignored pixels.
    #[allow(clippy::too_many_arguments)]
    fn ce_grad_row(l: &[f32], stride: usize, c: usize, t: &[u32], ignore: u32, k: f32, out: &mut [f32], ostride: usize, m: &mut [f32], s: &mut [f32]) {
        let w = t.len();
        row_max_sum(l, stride, c, m, s);
        // k / s per pixel (0 where ignored).
        for (sv, &tv) in s.iter_mut().zip(t) {
            *sv = if tv == ignore { 0.0 } else { k / *sv };
        }
        for ch in 0..c {
            let o = &mut out[ch * ostride..ch * ostride + w];
            for ((ov, &v), (&mv, &sv)) in o.iter_mut().zip(&l[ch * stride..ch * stride + w]).zip(m.iter().zip(&*s)) {
                *ov = fastmath::exp(v - mv) * sv;
            }
        }
        for (x, &tv) in t.iter().enumerate() {
            if tv != ignore {
                out[tv as usize * ostride + x] -= k;
            }
        }
    }
}

struct PixelCe {
    ignore: u32,
}

impl CustomOp2 for PixelCe {
    fn name(&self) -> &'static str {
        "pixel-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let l = f32_slice(s1, l1, "pixel_cross_entropy logits")?;
        let t = u32_slice(s2, l2, "pixel_cross_entropy targets")?;
        let (b, c, h, w) = l1.shape().dims4()?;
        if l2.shape().dims() != [b, h, w] {
            candle_core::bail!(
                "pixel_cross_entropy: targets {:?} do not match logits {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let n = count_valid(t, c, self.ignore)?;
        // Per-row sums in parallel, then one sequential sum: a parallel `sum()` would associate
        // differently from run to run, and runs must be bit-reproducible (exact resume).
        let rows: Vec<f64> = (0..b * h)
            .into_par_iter()
            .map(|r| {
                let (bi, y) = (r / h, r % h);
                let (mut m, mut s) = (vec![0f32; w], vec![0f32; w]);
                let base = (bi * c * h + y) * w;
                let tr = &t[(bi * h + y) * w..(bi * h + y + 1) * w];
                ce_row(&l[base..], h * w, c, tr, self.ignore, &mut m, &mut s)
            })
            .collect();
        let total: f64 = rows.iter().sum();
        // No valid pixel: loss 0 (and zero gradient), as a masked mean with a clamped count.
        let loss = if n == 0 { 0.0 } else { total / n as f64 };
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let d = logits.apply_op2_no_bwd(
            targets,
            &PixelCeGrad {
                ignore: self.ignore,
                scale: g,
            },
        )?;
        Ok((Some(d), None))
    }
}

/// `(logits, targets) -> scale · (softmax − onehot) · valid / n_valid`.
struct PixelCeGrad {
    ignore: u32,
    scale: f32,
}

impl CustomOp2 for PixelCeGrad {
    fn name(&self) -> &'static str {
        "pixel-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let l = f32_slice(s1, l1, "pixel_cross_entropy logits")?;
        let t = u32_slice(s2, l2, "pixel_cross_entropy targets")?;
        let (_b, c, h, w) = l1.shape().dims4()?;
        let n = count_valid(t, c, self.ignore)?;
        let k = if n == 0 { 0.0 } else { self.scale / n as f32 };
        let mut out = vec![0f32; l.len()];
        let plane = (c * h * w).max(1);
        out.par_chunks_mut(plane).enumerate().for_each(|(bi, ob)| {
            let (mut m, mut s) = (vec![0f32; w], vec![0f32; w]);
            for y in 0..h {
                let tr = &t[(bi * h + y) * w..(bi * h + y + 1) * w];
                let lb = &l[bi * plane + y * w..];
                ce_grad_row(
                    lb,
                    h * w,
                    c,
                    tr,
                    self.ignore,
                    k,
                    &mut ob[y * w..],
                    h * w,
                    &mut m,
                    &mut s,
                );
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

fn ignore_code(ignore: Option<u32>) -> Result<u32> {
    match ignore {
        Some(NO_IGNORE) => {
            candle_core::bail!("pixel_cross_entropy: ignore index {NO_IGNORE} is reserved")
        }
        Some(i) => Ok(i),
        None => Ok(NO_IGNORE),
    }
}

/// Mean cross-entropy over the valid pixels: `logits (B,C,H,W)` f32, `targets (B,H,W)` u32
/// with values in `0..C` or `ignore` -> scalar. Ignored pixels get zero gradient; with no
/// valid pixel the loss is 0. CPU: one fused pass each way; elsewhere composed candle ops.
pub fn pixel_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits.contiguous()?.apply_op2(
            &targets.to_dtype(DType::U32)?.contiguous()?,
            PixelCe {
                ignore: ignore_code(ignore)?,
            },
        );
    }
    // Composed form (CANDLE_NOTES): log-softmax over classes, gather with ignored pixels
    // mapped to class 0, mask, divide by the number of valid pixels.
    let targets = targets.to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let valid = match ignore {
        Some(i) => targets.ne(i)?,
        None => targets.ones_like()?.to_dtype(DType::U8)?,
    };
    let safe = valid.where_cond(&targets, &targets.zeros_like()?)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let validf = valid.to_dtype(logits.dtype())?;
    let n = validf.sum_all()?.maximum(1f32)?;
    (picked * &validf)?.sum_all()?.neg()?.div(&n)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy of bilinearly upsampled logits, without the upsampled tensor.

struct UpsampledPixelCe {
    ignore: u32,
}

/// Geometry and interpolation taps of one upsampled loss.
struct Up {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    ty: Vec<(usize, usize, f32, f32)>,
    tx: Vec<(usize, usize, f32, f32)>,
}

impl Up {
    fn new(l: &Layout, t: &Layout) -> Result<Self> {
        let (b, c, h, w) = l.shape().dims4()?;
        let (tb, oh, ow) = t.shape().dims3()?;
        if tb != b || oh == 0 || ow == 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "upsampled_pixel_cross_entropy: targets {:?} do not fit logits {:?}",
                t.shape(),
                l.shape()
            )
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            oh,
            ow,
            ty: taps(h, oh),
            tx: taps(w, ow),
        })
    }

    /// Rows of batch item `lb (C, h, w)` interpolated along W: `tmp (C, h, ow)`; the same
    /// arithmetic as `resize_bilinear`'s first pass.
    fn widen(&self, lb: &[f32], tmp: &mut [f32]) {
        for (src, dst) in lb.chunks_exact(self.w).zip(tmp.chunks_exact_mut(self.ow)) {
            for (d, &(i0, i1, w0, w1)) in dst.iter_mut().zip(&self.tx) {
                *d = src[i0] * w0 + src[i1] * w1;
            }
        }
    }

    /// Output row `oy` of all channels: `up (C, ow)` from `tmp` (second pass).
    fn row(&self, tmp: &[f32], oy: usize, up: &mut [f32]) {
        let (i0, i1, w0, w1) = self.ty[oy];
        let plane = self.h * self.ow;
        for (ch, u) in up.chunks_exact_mut(self.ow).enumerate() {
            let r0 = &tmp[ch * plane + i0 * self.ow..ch * plane + (i0 + 1) * self.ow];
            let r1 = &tmp[ch * plane + i1 * self.ow..ch * plane + (i1 + 1) * self.ow];
            for ((o, a), bb) in u.iter_mut().zip(r0).zip(r1) {
                *o = a * w0 + bb * w1;
            }
        }
    }
}

impl CustomOp2 for UpsampledPixelCe {
    fn name(&self) -> &'static str {
        "upsampled-pixel-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let l = f32_slice(s1, l1, "upsampled_pixel_cross_entropy logits")?;
        let t = u32_slice(s2, l2, "upsampled_pixel_cross_entropy targets")?;
        let g = Up::new(l1, l2)?;
        let n = count_valid(t, g.c, self.ignore)?;
        let (c, ow, oh) = (g.c, g.ow, g.oh);
        // Per (image, output row) sums, then one sequential sum (bit-reproducible).
        let per_image: Vec<Vec<f64>> = (0..g.b)
            .into_par_iter()
            .map(|bi| {
                let mut tmp = vec![0f32; c * g.h * ow];
                g.widen(&l[bi * c * g.h * g.w..(bi + 1) * c * g.h * g.w], &mut tmp);
                let mut up = vec![0f32; c * ow];
                let (mut m, mut s) = (vec![0f32; ow], vec![0f32; ow]);
                (0..oh)
                    .map(|oy| {
                        g.row(&tmp, oy, &mut up);
                        let tr = &t[(bi * oh + oy) * ow..(bi * oh + oy + 1) * ow];
                        ce_row(&up, ow, c, tr, self.ignore, &mut m, &mut s)
                    })
                    .collect()
            })
            .collect();
        let total: f64 = per_image.iter().flatten().sum();
        let loss = if n == 0 { 0.0 } else { total / n as f64 };
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let d = logits.apply_op2_no_bwd(
            targets,
            &UpsampledPixelCeGrad {
                ignore: self.ignore,
                scale: g,
            },
        )?;
        Ok((Some(d), None))
    }
}

struct UpsampledPixelCeGrad {
    ignore: u32,
    scale: f32,
}

impl CustomOp2 for UpsampledPixelCeGrad {
    fn name(&self) -> &'static str {
        "upsampled-pixel-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let l = f32_slice(s1, l1, "upsampled_pixel_cross_entropy logits")?;
        let t = u32_slice(s2, l2, "upsampled_pixel_cross_entropy targets")?;
        let g = Up::new(l1, l2)?;
        let n = count_valid(t, g.c, self.ignore)?;
        let k = if n == 0 { 0.0 } else { self.scale / n as f32 };
        let (c, h, w, oh, ow) = (g.c, g.h, g.w, g.oh, g.ow);
        let mut out = vec![0f32; l.len()];
        out.par_chunks_mut((c * h * w).max(1))
            .enumerate()
            .for_each(|(bi, ob)| {
                let mut tmp = vec![0f32; c * h * ow];
                g.widen(&l[bi * c * h * w..(bi + 1) * c * h * w], &mut tmp);
                let mut up = vec![0f32; c * ow];
                let mut gup = vec![0f32; c * ow];
                let (mut m, mut s) = (vec![0f32; ow], vec![0f32; ow]);
                // Adjoint of the H pass, accumulated per channel row (as BilinearBwd).
                let mut dtmp = vec![0f32; c * h * ow];
                for oy in 0..oh {
                    g.row(&tmp, oy, &mut up);
                    let tr = &t[(bi * oh + oy) * ow..(bi * oh + oy + 1) * ow];
                    ce_grad_row(&up, ow, c, tr, self.ignore, k, &mut gup, ow, &mut m, &mut s);
                    let (i0, i1, w0, w1) = g.ty[oy];
                    for ch in 0..c {
                        let gr = &gup[ch * ow..(ch + 1) * ow];
                        let base = ch * h * ow;
                        for (d, gv) in dtmp[base + i0 * ow..base + (i0 + 1) * ow]
                            .iter_mut()
                            .zip(gr)
                        {
                            *d += w0 * gv;
                        }
                        for (d, gv) in dtmp[base + i1 * ow..base + (i1 + 1) * ow]
                            .iter_mut()
                            .zip(gr)
                        {
                            *d += w1 * gv;
                        }
                    }
                }
                // Adjoint of the W pass.
                for (dr, tr) in ob.chunks_exact_mut(w).zip(dtmp.chunks_exact(ow)) {
                    for (&(i0, i1, w0, w1), &tv) in g.tx.iter().zip(tr) {
                        dr[i0] += w0 * tv;
                        dr[i1] += w1 * tv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `pixel_cross_entropy(resize_bilinear(logits, H, W), targets, ignore)` for `logits
/// (B,C,h,w)` and `targets (B,H,W)`, computed without materialising the upsampled logits
/// (CPU f32; elsewhere exactly that composition). Same value and gradient.
pub fn upsampled_pixel_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Tensor> {
    let (_, oh, ow) = targets.dims3()?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits.contiguous()?.apply_op2(
            &targets.to_dtype(DType::U32)?.contiguous()?,
            UpsampledPixelCe {
                ignore: ignore_code(ignore)?,
            },
        );
    }
    pixel_cross_entropy(&resize_bilinear(logits, oh, ow)?, targets, ignore)
}
