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

use std::sync::Mutex;

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

/// Per-pixel max `m` over the `c` classes of a row of `m.len()` pixels whose class `c` values
/// start at `l[c·stride]`.
#[inline(always)]
fn row_max(l: &[f32], stride: usize, c: usize, m: &mut [f32]) {
    let w = m.len();
    m.copy_from_slice(&l[..w]);
    for ch in 1..c {
        for (mv, &v) in m.iter_mut().zip(&l[ch * stride..ch * stride + w]) {
            *mv = mv.max(v);
        }
    }
}

/// Per-pixel max `m` and `s = Σ_c exp(l_c − m)` of a row of `w` pixels whose class `c` values
/// start at `l[c·stride]`.
#[inline(always)]
fn row_max_sum(l: &[f32], stride: usize, c: usize, m: &mut [f32], s: &mut [f32]) {
    let w = m.len();
    row_max(l, stride, c, m);
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

multiversion! {
    /// [`ce_row`] and [`ce_grad_row`] of one row in one pass: the loss summed over the valid
    /// pixels, and `out` set to the gradient (each exponential taken once; the same bits as
    /// the two apart).
    #[allow(clippy::too_many_arguments)]
    fn ce_and_grad_row(l: &[f32], stride: usize, c: usize, t: &[u32], ignore: u32, k: f32, out: &mut [f32], ostride: usize, m: &mut [f32], s: &mut [f32]) -> f64 {
        let w = t.len();
        row_max(l, stride, c, m);
        s.fill(0.0);
        for ch in 0..c {
            let o = &mut out[ch * ostride..ch * ostride + w];
            for (((ov, sv), &v), &mv) in o.iter_mut().zip(s.iter_mut()).zip(&l[ch * stride..ch * stride + w]).zip(&*m) {
                *ov = fastmath::exp(v - mv);
                *sv += *ov;
            }
        }
        // Vector passes first (log-sum-exp, the per-pixel scale), then the one sequential
        // f64 sum: the loss bits are those of `ce_row`.
        for (mv, &sv) in m.iter_mut().zip(&*s) {
            *mv += fastmath::ln(sv);
        }
        for (sv, &tv) in s.iter_mut().zip(t) {
            *sv = if tv == ignore { 0.0 } else { k / *sv };
        }
        let mut acc = 0f64;
        for (x, &tv) in t.iter().enumerate() {
            if tv != ignore {
                acc += (m[x] - l[tv as usize * stride + x]) as f64;
            }
        }
        for ch in 0..c {
            for (ov, &sv) in out[ch * ostride..ch * ostride + w].iter_mut().zip(&*s) {
                *ov *= sv;
            }
        }
        for (x, &tv) in t.iter().enumerate() {
            if tv != ignore {
                out[tv as usize * ostride + x] -= k;
            }
        }
        acc
    }
}

multiversion! {
    /// `out = a·w0 + b·w1`, element by element (the interpolation's second pass).
    fn lerp(out: &mut [f32], a: &[f32], b: &[f32], w0: f32, w1: f32) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x * w0 + y * w1;
        }
    }
}

multiversion! {
    /// `dst += w · src`, element by element (the interpolation's adjoint).
    fn axpy(dst: &mut [f32], src: &[f32], w: f32) {
        for (d, &g) in dst.iter_mut().zip(src) {
            *d += w * g;
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
    /// The forward computes the gradient too (the logits need one); kept for `bwd`.
    with_grad: bool,
    grad: Mutex<Option<Vec<f32>>>,
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
    /// Per input column, the `(output column, weight)` pairs that read it, in the order
    /// the forward's taps visit them (the adjoint sums them in that order).
    tx_adj: Vec<Vec<(usize, f32)>>,
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
        let tx = taps(w, ow);
        let mut tx_adj = vec![Vec::new(); w];
        for (x, &(i0, i1, w0, w1)) in tx.iter().enumerate() {
            tx_adj[i0].push((x, w0));
            tx_adj[i1].push((x, w1));
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            oh,
            ow,
            ty: taps(h, oh),
            tx,
            tx_adj,
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
            lerp(u, r0, r1, w0, w1);
        }
    }

    /// Image `bi` of logits `l` and targets `t`: the loss of each output row over its valid
    /// pixels; with `grad = Some((k, out))` also `out (C, h, w)` = the gradient of
    /// `k · Σ loss` with respect to the image's logits, the softmax gradient of each output
    /// row pushed back through the interpolation weights as it is made.
    fn image(
        &self,
        bi: usize,
        l: &[f32],
        t: &[u32],
        ignore: u32,
        grad: Option<(f32, &mut [f32])>,
    ) -> Vec<f64> {
        let (c, h, w, oh, ow) = (self.c, self.h, self.w, self.oh, self.ow);
        let mut tmp = vec![0f32; c * h * ow];
        self.widen(&l[bi * c * h * w..(bi + 1) * c * h * w], &mut tmp);
        let mut up = vec![0f32; c * ow];
        let (mut m, mut s) = (vec![0f32; ow], vec![0f32; ow]);
        let target_row = |oy: usize| &t[(bi * oh + oy) * ow..(bi * oh + oy + 1) * ow];
        let Some((k, out)) = grad else {
            return (0..oh)
                .map(|oy| {
                    self.row(&tmp, oy, &mut up);
                    ce_row(&up, ow, c, target_row(oy), ignore, &mut m, &mut s)
                })
                .collect();
        };
        let mut gup = vec![0f32; c * ow];
        // Adjoint of the H pass, accumulated per channel row (as BilinearBwd).
        let mut dtmp = vec![0f32; c * h * ow];
        let mut losses = Vec::with_capacity(oh);
        for oy in 0..oh {
            self.row(&tmp, oy, &mut up);
            let tr = target_row(oy);
            losses.push(ce_and_grad_row(
                &up, ow, c, tr, ignore, k, &mut gup, ow, &mut m, &mut s,
            ));
            let (i0, i1, w0, w1) = self.ty[oy];
            for (gr, dt) in gup.chunks_exact(ow).zip(dtmp.chunks_exact_mut(h * ow)) {
                axpy(&mut dt[i0 * ow..(i0 + 1) * ow], gr, w0);
                axpy(&mut dt[i1 * ow..(i1 + 1) * ow], gr, w1);
            }
        }
        // Adjoint of the W pass, gathered per input column: the same sums in the same
        // order as scattering `out[i0] += w0·g; out[i1] += w1·g` output by output, without
        // the chain of dependent read-modify-writes to memory (8 outputs share a column).
        for (dr, tr) in out.chunks_exact_mut(w).zip(dtmp.chunks_exact(ow)) {
            for (d, reads) in dr.iter_mut().zip(&self.tx_adj) {
                *d = reads.iter().fold(*d, |acc, &(x, wt)| acc + wt * tr[x]);
            }
        }
        losses
    }

    /// The gradient of `k · Σ loss` over the whole batch (images in parallel), and the loss
    /// rows of each image.
    fn grad(&self, l: &[f32], t: &[u32], ignore: u32, k: f32) -> (Vec<f32>, Vec<Vec<f64>>) {
        let mut out = vec![0f32; l.len()];
        let losses = out
            .par_chunks_mut((self.c * self.h * self.w).max(1))
            .enumerate()
            .map(|(bi, ob)| self.image(bi, l, t, ignore, Some((k, ob))))
            .collect();
        (out, losses)
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
        // Per (image, output row) sums, then one sequential sum (bit-reproducible).
        let per_image: Vec<Vec<f64>> = if self.with_grad {
            // The gradient of the loss itself (scale 1), what `bwd` hands out for an
            // unweighted term.
            let k = if n == 0 { 0.0 } else { 1.0 / n as f32 };
            let (grad, losses) = g.grad(l, t, self.ignore, k);
            *self.grad.lock().expect("loss gradient") = Some(grad);
            losses
        } else {
            (0..g.b)
                .into_par_iter()
                .map(|bi| g.image(bi, l, t, self.ignore, None))
                .collect()
        };
        let total: f64 = per_image.iter().flatten().sum();
        let loss = if n == 0 { 0.0 } else { total / n as f64 };
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    /// The gradient the forward made when the incoming one is 1 (an unweighted loss term: the
    /// segmentation task's own loss); recomputed with the incoming scale otherwise (a
    /// weighted term, e.g. replay's, where scaling the made gradient afterwards would round
    /// differently and change a run's values), or if the forward made none or an earlier
    /// backward used it.
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let saved = self.grad.lock().expect("loss gradient").take();
        let d = match saved {
            Some(d) if g == 1.0 => Tensor::from_vec(d, logits.shape(), logits.device())?,
            _ => logits.apply_op2_no_bwd(
                targets,
                &UpsampledPixelCeGrad {
                    ignore: self.ignore,
                    scale: g,
                },
            )?,
        };
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
        Ok((
            CpuStorage::F32(g.grad(l, t, self.ignore, k).0),
            l1.shape().clone(),
        ))
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
                with_grad: logits.track_op(),
                grad: Mutex::new(None),
            },
        );
    }
    pixel_cross_entropy(&resize_bilinear(logits, oh, ow)?, targets, ignore)
}
