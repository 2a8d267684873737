//! Resizing ops with working gradients.
//!
//! - [`resize_bilinear`]: candle's `upsample_bilinear2d` has no backward; two matmuls with
//!   per-axis interpolation matrices do the same (PyTorch `align_corners=False`) and train.
//! - [`upsample_nearest2x`]: candle's `upsample_nearest2d` backward is slow and overwrites
//!   instead of accumulating gradients in some graphs; reshape + broadcast + reshape is exact.
//! - [`subsample2`]: `max_pool2d` with kernel 1 stride 2 (torchvision's `LastLevelMaxPool`) has
//!   no backward in candle when kernel ≠ stride; it is just every second row and column.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Interpolation matrix `(out, in)` for 1-D linear resizing with PyTorch's
/// `align_corners=False` rule: `src = max((dst + 0.5)·in/out − 0.5, 0)`.
pub fn linear_interp_matrix(in_len: usize, out_len: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_len * in_len];
    let scale = in_len as f64 / out_len as f64;
    for d in 0..out_len {
        let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_len - 1);
        let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f64).clamp(0.0, 1.0);
        m[d * in_len + i0] += (1.0 - l1) as f32;
        m[d * in_len + i1] += l1 as f32;
    }
    m
}

fn interp_tensor(in_len: usize, out_len: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        linear_interp_matrix(in_len, out_len),
        (out_len, in_len),
        dev,
    )?
    .to_dtype(dtype)
}

/// Bilinear resize `(B,C,H,W) -> (B,C,out_h,out_w)`, `align_corners=False` (PyTorch's
/// `F.interpolate(mode="bilinear")`), differentiable. CPU f32: a direct separable kernel
/// (two taps per axis) with a direct backward; elsewhere [`resize_bilinear_matmul`].
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Bilinear { out_h, out_w })
    } else {
        resize_bilinear_matmul(x, out_h, out_w)
    }
}

/// Two taps per output index along one axis: `(i0, i1, w0, w1)`.
pub(crate) fn taps(in_len: usize, out_len: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = in_len as f64 / out_len as f64;
    (0..out_len)
        .map(|d| {
            let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(in_len - 1);
            let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f64).clamp(0.0, 1.0);
            (i0, i1, (1.0 - l1) as f32, l1 as f32)
        })
        .collect()
}

fn f32_contig<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("bilinear: only f32 on CPU, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("bilinear: input must be contiguous"),
    }
}

/// Direct bilinear resize, `(B,C,H,W) -> (B,C,out_h,out_w)`: along W into an `(H, out_w)`
/// buffer, then along H.
struct Bilinear {
    out_h: usize,
    out_w: usize,
}

impl CustomOp1 for Bilinear {
    fn name(&self) -> &'static str {
        "bilinear-resize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contig(s, l)?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = (self.out_h, self.out_w);
        let (ty, tx) = (taps(h, oh), taps(w, ow));
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, xp)| {
                let mut tmp = vec![0f32; h * ow];
                for y in 0..h {
                    let xr = &xp[y * w..(y + 1) * w];
                    for (t, &(i0, i1, w0, w1)) in tmp[y * ow..(y + 1) * ow].iter_mut().zip(&tx) {
                        *t = xr[i0] * w0 + xr[i1] * w1;
                    }
                }
                for (oy, &(i0, i1, w0, w1)) in ty.iter().enumerate() {
                    let (r0, r1) = (&tmp[i0 * ow..(i0 + 1) * ow], &tmp[i1 * ow..(i1 + 1) * ow]);
                    for ((ov, a), bb) in o[oy * ow..(oy + 1) * ow].iter_mut().zip(r0).zip(r1) {
                        *ov = a * w0 + bb * w1;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&BilinearBwd { h, w })?,
        ))
    }
}

/// The adjoint of [`Bilinear`]: `(B,C,oh,ow) -> (B,C,h,w)`.
struct BilinearBwd {
    h: usize,
    w: usize,
}

impl CustomOp1 for BilinearBwd {
    fn name(&self) -> &'static str {
        "bilinear-resize-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_contig(s, l)?;
        let (b, c, oh, ow) = l.shape().dims4()?;
        let (h, w) = (self.h, self.w);
        let (ty, tx) = (taps(h, oh), taps(w, ow));
        let mut dx = vec![0f32; b * c * h * w];
        dx.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .for_each(|(dp, gp)| {
                let mut tmp = vec![0f32; h * ow];
                for (oy, &(i0, i1, w0, w1)) in ty.iter().enumerate() {
                    let gr = &gp[oy * ow..(oy + 1) * ow];
                    for (t, gv) in tmp[i0 * ow..(i0 + 1) * ow].iter_mut().zip(gr) {
                        *t += w0 * gv;
                    }
                    for (t, gv) in tmp[i1 * ow..(i1 + 1) * ow].iter_mut().zip(gr) {
                        *t += w1 * gv;
                    }
                }
                for y in 0..h {
                    let dr = &mut dp[y * w..(y + 1) * w];
                    for (&(i0, i1, w0, w1), &t) in tx.iter().zip(&tmp[y * ow..(y + 1) * ow]) {
                        dr[i0] += w0 * t;
                        dr[i1] += w1 * t;
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((b, c, h, w))))
    }
}

/// Bilinear resize as `y = M_h · x · M_wᵀ` per plane (two matmuls with interpolation
/// matrices; any device, differentiable through candle's matmul).
pub fn resize_bilinear_matmul(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let (dev, dt) = (x.device(), x.dtype());
    // Width: (B·C·H, W) · (W, out_w).
    let mw_t = interp_tensor(w, out_w, dt, dev)?.t()?;
    let y = x.reshape((b * c * h, w))?.matmul(&mw_t)?;
    // Height: bring H last, (B·C·out_w, H) · (H, out_h), then back.
    let mh_t = interp_tensor(h, out_h, dt, dev)?.t()?;
    let y = y
        .reshape((b * c, h, out_w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * c * out_w, h))?
        .matmul(&mh_t)?;
    y.reshape((b * c, out_w, out_h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, out_h, out_w))
}

/// The class map of one image's logits `x` `(1, C, h, w)` (any device, any float dtype) at
/// `out_h × out_w`: the argmax over `C` of [`resize_bilinear`]`(x, out_h, out_w)` on the CPU
/// (the first maximum wins, as candle's argmax), bit-identical to that resize followed by the
/// argmax, computed row by row without the `(C, out_h, out_w)` map: a 12-megapixel photo
/// needs a few megabytes instead of a gigabyte. Returns `out_h · out_w` ids, row-major.
pub fn resize_bilinear_argmax(x: &Tensor, out_h: usize, out_w: usize) -> Result<Vec<u32>> {
    let (b, c, h, w) = x.dims4()?;
    if b != 1 || c == 0 || out_h == 0 || out_w == 0 {
        candle_core::bail!(
            "resize_bilinear_argmax: expected logits (1, C ≥ 1, h, w) and a non-empty size, got {:?} → {out_h} × {out_w}",
            x.dims()
        );
    }
    let v = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let argmax = |at: &dyn Fn(usize) -> f32| {
        let (mut acc, mut val) = (0u32, at(0));
        for k in 1..c {
            let s = at(k);
            if val < s {
                acc = k as u32;
                val = s;
            }
        }
        acc
    };
    let mut out = vec![0u32; out_h * out_w];
    if (h, w) == (out_h, out_w) {
        // resize_bilinear is the identity here.
        let plane = h * w;
        out.par_iter_mut()
            .enumerate()
            .for_each(|(p, o)| *o = argmax(&|k| v[k * plane + p]));
        return Ok(out);
    }
    let (ty, tx) = (taps(h, out_h), taps(w, out_w));
    // Along W first, as the kernel does: `(C, h, out_w)`.
    let mut tmp = vec![0f32; c * h * out_w];
    tmp.par_chunks_mut(out_w).enumerate().for_each(|(r, t)| {
        let xr = &v[r * w..(r + 1) * w];
        for (t, &(i0, i1, w0, w1)) in t.iter_mut().zip(&tx) {
            *t = xr[i0] * w0 + xr[i1] * w1;
        }
    });
    let plane = h * out_w;
    out.par_chunks_mut(out_w)
        .zip(&ty)
        .for_each(|(row, &(i0, i1, w0, w1))| {
            for (ox, o) in row.iter_mut().enumerate() {
                *o = argmax(&|k| {
                    tmp[k * plane + i0 * out_w + ox] * w0 + tmp[k * plane + i1 * out_w + ox] * w1
                });
            }
        });
    Ok(out)
}

/// Nearest-neighbour ×2 upsampling `(B,C,H,W) -> (B,C,2H,2W)`, by reshape + broadcast.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))
}

/// Every second row and column starting at 0: `(B,C,H,W) -> (B,C,⌈H/2⌉,⌈W/2⌉)`.
/// Equals `max_pool2d(x, kernel=1, stride=2)`.
pub fn subsample2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dev = x.device();
    let rows: Vec<u32> = (0..h as u32).step_by(2).collect();
    let cols: Vec<u32> = (0..w as u32).step_by(2).collect();
    let rows = Tensor::new(rows.as_slice(), dev)?;
    let cols = Tensor::new(cols.as_slice(), dev)?;
    x.index_select(&rows, 2)?.index_select(&cols, 3)
}
