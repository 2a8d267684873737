//! Dense conv2d as im2col (direct kernel, with a col2im backward) + one batched gemm.
//!
//! Why: candle's `conv2d` backward always computes the input gradient with a direct-loop
//! `conv_transpose2d` (even for the image input, which needs none) and the kernel gradient as
//! a conv with the batch as channels; for the 3×3 128→128 convs at 28×28 (batch 16) that is
//! ≈ 120 ms per conv. Here both gradients are gemms (candle's matmul backward) plus one
//! col2im scatter, and there is no stride-2 parity trap.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::storage::{f32_slice, valid_range};

#[derive(Debug, Clone, Copy)]
struct Im2col {
    k: usize,
    stride: usize,
    pad: usize,
}

impl Im2col {
    fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.pad - self.k) / self.stride + 1
    }

    fn valid(&self, tap: usize, len: usize, out: usize) -> (usize, usize) {
        valid_range(tap, len, out, self.stride, self.pad)
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    /// `(B,C,H,W) -> (B, C·k·k, Ho·Wo)`, row `(c·k + ky)·k + kx` (the `(O,C,k,k)` weight order).
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "im2col")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = (self.out_len(h), self.out_len(w));
        let k = self.k;
        let plane_out = k * k * ho * wo;
        let mut cols = vec![0f32; b * c * plane_out];
        cols.par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(q, dst)| {
                let xp = &x[q * h * w..(q + 1) * h * w];
                for ky in 0..k {
                    let (oy0, oy1) = self.valid(ky, h, ho);
                    for kx in 0..k {
                        let (ox0, ox1) = self.valid(kx, w, wo);
                        if ox0 == ox1 {
                            continue;
                        }
                        let row = &mut dst[(ky * k + kx) * ho * wo..(ky * k + kx + 1) * ho * wo];
                        for oy in oy0..oy1 {
                            let iy = oy * self.stride + ky - self.pad;
                            let xrow = &xp[iy * w..(iy + 1) * w];
                            let orow = &mut row[oy * wo..(oy + 1) * wo];
                            if self.stride == 1 {
                                let ix0 = ox0 + kx - self.pad;
                                orow[ox0..ox1].copy_from_slice(&xrow[ix0..ix0 + ox1 - ox0]);
                            } else {
                                for ox in ox0..ox1 {
                                    orow[ox] = xrow[ox * self.stride + kx - self.pad];
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(cols), Shape::from((b, c * k * k, ho * wo))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&Col2im { op: *self, h, w })?))
    }
}

/// The adjoint of [`Im2col`]: `(B, C·k·k, Ho·Wo) -> (B,C,H,W)`, summing overlapping taps.
struct Col2im {
    op: Im2col,
    h: usize,
    w: usize,
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = f32_slice(s, l, "im2col")?;
        let (b, ckk, _) = l.shape().dims3()?;
        let op = self.op;
        let k = op.k;
        let c = ckk / (k * k);
        let (h, w) = (self.h, self.w);
        let (ho, wo) = (op.out_len(h), op.out_len(w));
        let plane_in = k * k * ho * wo;
        let mut dx = vec![0f32; b * c * h * w];
        dx.par_chunks_mut(h * w).enumerate().for_each(|(q, xp)| {
            let src = &cols[q * plane_in..(q + 1) * plane_in];
            for ky in 0..k {
                let (oy0, oy1) = op.valid(ky, h, ho);
                for kx in 0..k {
                    let (ox0, ox1) = op.valid(kx, w, wo);
                    if ox0 == ox1 {
                        continue;
                    }
                    let row = &src[(ky * k + kx) * ho * wo..(ky * k + kx + 1) * ho * wo];
                    for oy in oy0..oy1 {
                        let iy = oy * op.stride + ky - op.pad;
                        let xrow = &mut xp[iy * w..(iy + 1) * w];
                        let grow = &row[oy * wo..(oy + 1) * wo];
                        if op.stride == 1 {
                            let ix0 = ox0 + kx - op.pad;
                            for (xv, gv) in
                                xrow[ix0..ix0 + ox1 - ox0].iter_mut().zip(&grow[ox0..ox1])
                            {
                                *xv += gv;
                            }
                        } else {
                            for ox in ox0..ox1 {
                                xrow[ox * op.stride + kx - op.pad] += grow[ox];
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, c, h, w))))
    }
}

/// Dense conv2d `x (B,C,H,W)`, `weight (O,C,k,k)` -> `(B,O,Ho,Wo)`, symmetric padding, no
/// bias, groups 1. CPU f32: im2col + gemm (gradients are gemms + col2im); elsewhere candle's
/// `conv2d`.
pub fn conv2d_im2col(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, k, k2) = weight.dims4()?;
    if wc != c || k != k2 {
        candle_core::bail!(
            "conv2d_im2col: weight {:?} does not fit input {:?}",
            weight.shape(),
            x.shape()
        )
    }
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return x.conv2d(weight, padding, stride, 1, 1);
    }
    if h + 2 * padding < k || w + 2 * padding < k || stride == 0 {
        candle_core::bail!("conv2d_im2col: empty output for {h}x{w}, k{k}, s{stride}, p{padding}")
    }
    let op = Im2col {
        k,
        stride,
        pad: padding,
    };
    let (ho, wo) = (op.out_len(h), op.out_len(w));
    let cols = x.contiguous()?.apply_op1(op)?;
    weight
        .reshape((o, c * k * k))?
        .broadcast_matmul(&cols)?
        .reshape((b, o, ho, wo))
}
