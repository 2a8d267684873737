//! Fused pixel-wise cross-entropy with an ignore index.
//!
//! Why: `candle_nn::loss::cross_entropy` is rank-2 only and has no ignore index, and the
//! composed form (log-softmax over dim 1 + gather + mask) runs several broadcast ops over the
//! full-resolution logits: ≈ 130 ms forward and ≈ 580 ms backward for `(16,21,224,224)`.
//! This is one pass forward and one pass backward.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::storage::{f32_slice, u32_slice};

struct PixelCe {
    ignore: Option<u32>,
}

impl PixelCe {
    /// Check targets, count valid pixels.
    fn count_valid(&self, t: &[u32], c: usize) -> Result<usize> {
        let mut n = 0;
        for &v in t {
            if Some(v) == self.ignore {
                continue;
            }
            if v as usize >= c {
                candle_core::bail!(
                    "pixel_cross_entropy: target {v} out of range for {c} classes (ignore index {:?})",
                    self.ignore
                )
            }
            n += 1;
        }
        Ok(n)
    }

    /// Per row `(b, y)`: per-pixel max and Σ exp(l − max) over classes.
    fn row_stats(
        l: &[f32],
        b: usize,
        y: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut m = vec![f32::NEG_INFINITY; w];
        let row = |ch: usize| &l[((b * c + ch) * h + y) * w..((b * c + ch) * h + y + 1) * w];
        for ch in 0..c {
            for (mv, &v) in m.iter_mut().zip(row(ch)) {
                *mv = mv.max(v);
            }
        }
        let mut s = vec![0f32; w];
        for ch in 0..c {
            for ((sv, &v), &mv) in s.iter_mut().zip(row(ch)).zip(&m) {
                *sv += (v - mv).exp();
            }
        }
        (m, s)
    }
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
        let n = self.count_valid(t, c)?;
        // Per-row sums in parallel, then one sequential sum: a parallel `sum()` would associate
        // differently from run to run, and runs must be bit-reproducible (exact resume).
        let rows: Vec<f64> = (0..b * h)
            .into_par_iter()
            .map(|r| {
                let (bi, y) = (r / h, r % h);
                let (m, s) = Self::row_stats(l, bi, y, c, h, w);
                let mut acc = 0f64;
                for x in 0..w {
                    let tv = t[(bi * h + y) * w + x];
                    if Some(tv) == self.ignore {
                        continue;
                    }
                    let lt = l[((bi * c + tv as usize) * h + y) * w + x];
                    acc += (s[x].ln() + m[x] - lt) as f64;
                }
                acc
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
    ignore: Option<u32>,
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
        let ce = PixelCe {
            ignore: self.ignore,
        };
        let n = ce.count_valid(t, c)?;
        let k = if n == 0 { 0.0 } else { self.scale / n as f32 };
        let mut out = vec![0f32; l.len()];
        // Parallel over (b, c) planes would need the row stats per plane: compute per batch
        // item instead (each writes its own C·H·W block).
        out.par_chunks_mut(c * h * w)
            .enumerate()
            .for_each(|(bi, ob)| {
                for y in 0..h {
                    let (m, s) = PixelCe::row_stats(l, bi, y, c, h, w);
                    let trow = &t[(bi * h + y) * w..(bi * h + y + 1) * w];
                    for ch in 0..c {
                        let off = (ch * h + y) * w;
                        let lrow = &l[bi * c * h * w + off..bi * c * h * w + off + w];
                        let orow = &mut ob[off..off + w];
                        for x in 0..w {
                            let tv = trow[x];
                            if Some(tv) == self.ignore {
                                continue;
                            }
                            let p = (lrow[x] - m[x]).exp() / s[x];
                            let onehot = if tv as usize == ch { 1.0 } else { 0.0 };
                            orow[x] = k * (p - onehot);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
            PixelCe { ignore },
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
