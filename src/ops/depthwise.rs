//! Depthwise 2-D convolution (`groups = C`) as a direct kernel.
//!
//! Why: candle's `conv2d` with `groups > 1` runs one convolution per channel and concatenates;
//! its backward goes through `narrow`, whose backward pads each group's gradient back to the
//! full size, so the cost grows with C² (1.6–4.4 s per training step for MobileNetV3-Small's
//! depthwise convs at 224×224, batch 16, see docs/CANDLE_NOTES.md). The direct loops here are
//! ≈ 20× faster and, unlike candle's strided dense conv backward, have no H/W parity trap.
//!
//! CPU, f32 only. On other devices [`depthwise_conv2d`] falls back to candle's grouped conv.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::storage::{f32_slice, valid_range};

/// Geometry shared by the forward and both backward kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    pub(crate) fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        if stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!(
                "depthwise_conv2d: input {h}x{w}, kernel {k}, stride {stride}, padding {pad} gives an empty output"
            )
        }
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        Ok(Self {
            n,
            c,
            h,
            w,
            k,
            stride,
            pad,
            ho,
            wo,
        })
    }

    fn valid(&self, tap: usize, len: usize, out: usize) -> (usize, usize) {
        valid_range(tap, len, out, self.stride, self.pad)
    }
}

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    l.shape()
        .dims4()
        .map_err(|_| candle_core::Error::Msg(format!("depthwise_conv2d: {what} must be rank 4")))
}

/// Forward: `(x (N,C,H,W), kernel (C,1,k,k)) -> (N,C,Ho,Wo)`.
struct DepthwiseFwd {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for DepthwiseFwd {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "depthwise_conv2d input")?;
        let kw = f32_slice(s2, l2, "depthwise_conv2d kernel")?;
        let (kc, _, k, _) = dims4(l2, "kernel")?;
        let g = Geom::new(dims4(l1, "input")?, k, self.stride, self.pad)?;
        if kc != g.c {
            candle_core::bail!("depthwise_conv2d: kernel has {kc} channels, input {}", g.c)
        }
        let mut out = vec![0f32; g.n * g.c * g.ho * g.wo];
        out.par_chunks_mut(g.ho * g.wo)
            .enumerate()
            .for_each(|(plane, o)| {
                let c = plane % g.c;
                let xp = &x[plane * g.h * g.w..(plane + 1) * g.h * g.w];
                let wp = &kw[c * k * k..(c + 1) * k * k];
                fwd_plane(&g, xp, wp, o);
            });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (_, _, h, w) = x.dims4()?;
        let gx = grad.apply_op2_no_bwd(
            kernel,
            &DepthwiseBwdInput {
                stride: self.stride,
                pad: self.pad,
                h,
                w,
            },
        )?;
        let gk = x.apply_op2_no_bwd(
            &grad,
            &DepthwiseBwdKernel {
                stride: self.stride,
                pad: self.pad,
                k: kernel.dim(2)?,
            },
        )?;
        Ok((Some(gx), Some(gk)))
    }
}

/// One (n, c) plane: `o[oy,ox] = Σ_{ky,kx} x[oy·s+ky−p, ox·s+kx−p] · w[ky,kx]`.
/// Loops are ordered tap-outer so the innermost loop is a contiguous axpy for stride 1.
pub(crate) fn fwd_plane(g: &Geom, x: &[f32], w: &[f32], o: &mut [f32]) {
    for ky in 0..g.k {
        let (oy0, oy1) = g.valid(ky, g.h, g.ho);
        for kx in 0..g.k {
            let wv = w[ky * g.k + kx];
            let (ox0, ox1) = g.valid(kx, g.w, g.wo);
            if ox0 == ox1 {
                continue; // tap entirely in the padding (map smaller than the kernel)
            }
            for oy in oy0..oy1 {
                let iy = oy * g.stride + ky - g.pad;
                let xrow = &x[iy * g.w..(iy + 1) * g.w];
                let orow = &mut o[oy * g.wo..(oy + 1) * g.wo];
                if g.stride == 1 {
                    let ix0 = ox0 + kx - g.pad;
                    let n = ox1 - ox0;
                    for (ov, xv) in orow[ox0..ox1].iter_mut().zip(&xrow[ix0..ix0 + n]) {
                        *ov += wv * xv;
                    }
                } else {
                    for ox in ox0..ox1 {
                        orow[ox] += wv * xrow[ox * g.stride + kx - g.pad];
                    }
                }
            }
        }
    }
}

/// One plane of the input gradient (accumulated into `gx`): the transpose of [`fwd_plane`].
pub(crate) fn bwd_input_plane(g: &Geom, gy: &[f32], w: &[f32], gx: &mut [f32]) {
    let k = g.k;
    for ky in 0..k {
        let (oy0, oy1) = g.valid(ky, g.h, g.ho);
        for kx in 0..k {
            let wv = w[ky * k + kx];
            let (ox0, ox1) = g.valid(kx, g.w, g.wo);
            if ox0 == ox1 {
                continue; // tap entirely in the padding (map smaller than the kernel)
            }
            for oy in oy0..oy1 {
                let iy = oy * g.stride + ky - g.pad;
                let grow = &gy[oy * g.wo..(oy + 1) * g.wo];
                let xrow = &mut gx[iy * g.w..(iy + 1) * g.w];
                if g.stride == 1 {
                    let ix0 = ox0 + kx - g.pad;
                    let len = ox1 - ox0;
                    for (xv, gv) in xrow[ix0..ix0 + len].iter_mut().zip(&grow[ox0..ox1]) {
                        *xv += wv * gv;
                    }
                } else {
                    for ox in ox0..ox1 {
                        xrow[ox * g.stride + kx - g.pad] += wv * grow[ox];
                    }
                }
            }
        }
    }
}

/// One plane's contribution to the kernel gradient, added to `gk` (k·k taps).
pub(crate) fn bwd_kernel_plane(g: &Geom, x: &[f32], gy: &[f32], gk: &mut [f32]) {
    let k = g.k;
    for ky in 0..k {
        let (oy0, oy1) = g.valid(ky, g.h, g.ho);
        for kx in 0..k {
            let (ox0, ox1) = g.valid(kx, g.w, g.wo);
            if ox0 == ox1 {
                continue; // tap entirely in the padding (map smaller than the kernel)
            }
            // f64 accumulator: sums run over N·Ho·Wo terms.
            let mut acc = 0f64;
            for oy in oy0..oy1 {
                let iy = oy * g.stride + ky - g.pad;
                let xrow = &x[iy * g.w..(iy + 1) * g.w];
                let grow = &gy[oy * g.wo..(oy + 1) * g.wo];
                let mut row = 0f32;
                if g.stride == 1 {
                    let ix0 = ox0 + kx - g.pad;
                    for (xv, gv) in xrow[ix0..ix0 + ox1 - ox0].iter().zip(&grow[ox0..ox1]) {
                        row += xv * gv;
                    }
                } else {
                    for ox in ox0..ox1 {
                        row += xrow[ox * g.stride + kx - g.pad] * grow[ox];
                    }
                }
                acc += row as f64;
            }
            gk[ky * k + kx] += acc as f32;
        }
    }
}

/// Input gradient: `(grad_out (N,C,Ho,Wo), kernel (C,1,k,k)) -> (N,C,H,W)`.
struct DepthwiseBwdInput {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for DepthwiseBwdInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-bwd-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gy = f32_slice(s1, l1, "depthwise_conv2d grad")?;
        let kw = f32_slice(s2, l2, "depthwise_conv2d kernel")?;
        let (n, c, _, _) = dims4(l1, "grad")?;
        let k = dims4(l2, "kernel")?.2;
        let g = Geom::new((n, c, self.h, self.w), k, self.stride, self.pad)?;
        let mut gx = vec![0f32; n * c * g.h * g.w];
        gx.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(plane, gxp)| {
                let ch = plane % c;
                let gyp = &gy[plane * g.ho * g.wo..(plane + 1) * g.ho * g.wo];
                let wp = &kw[ch * k * k..(ch + 1) * k * k];
                bwd_input_plane(&g, gyp, wp, gxp);
            });
        Ok((CpuStorage::F32(gx), Shape::from((n, c, g.h, g.w))))
    }
}

/// Kernel gradient: `(x (N,C,H,W), grad_out (N,C,Ho,Wo)) -> (C,1,k,k)`, reduced over N.
struct DepthwiseBwdKernel {
    stride: usize,
    pad: usize,
    k: usize,
}

impl CustomOp2 for DepthwiseBwdKernel {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-bwd-kernel"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "depthwise_conv2d input")?;
        let gy = f32_slice(s2, l2, "depthwise_conv2d grad")?;
        let k = self.k;
        let g = Geom::new(dims4(l1, "input")?, k, self.stride, self.pad)?;
        let mut gk = vec![0f32; g.c * k * k];
        gk.par_chunks_mut(k * k).enumerate().for_each(|(ch, gkc)| {
            for b in 0..g.n {
                let plane = b * g.c + ch;
                let xp = &x[plane * g.h * g.w..(plane + 1) * g.h * g.w];
                let gyp = &gy[plane * g.ho * g.wo..(plane + 1) * g.ho * g.wo];
                bwd_kernel_plane(&g, xp, gyp, gkc);
            }
        });
        Ok((CpuStorage::F32(gk), Shape::from((g.c, 1, k, k))))
    }
}

/// Depthwise conv2d: `x (N,C,H,W)`, `kernel (C,1,k,k)` -> `(N,C,Ho,Wo)` with
/// `Ho = (H + 2·padding − k)/stride + 1` (square kernel, symmetric padding, no bias).
///
/// On CPU: the direct kernels of this module (f32 only; any other dtype errors).
/// Elsewhere (CUDA): candle's grouped `conv2d`.
pub fn depthwise_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (kc, one, kh, kw) = kernel.dims4()?;
    if kc != c || one != 1 || kh != kw {
        candle_core::bail!(
            "depthwise_conv2d: kernel {:?} does not fit input {:?} (want ({c},1,k,k))",
            kernel.shape(),
            x.shape()
        )
    }
    if x.device().is_cpu() {
        if x.dtype() != DType::F32 {
            candle_core::bail!(
                "depthwise_conv2d: only f32 is implemented on CPU, got {:?}",
                x.dtype()
            )
        }
        x.contiguous()?.apply_op2(
            &kernel.contiguous()?,
            DepthwiseFwd {
                stride,
                pad: padding,
            },
        )
    } else {
        x.conv2d(kernel, padding, stride, 1, c)
    }
}
