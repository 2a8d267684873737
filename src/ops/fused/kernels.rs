//! Slice kernels of the fused executor. Activations are channel-major, `(C, B, H, W)`
//! ("CNHW"): channel `c` of image `b` is the contiguous plane at `(c·B + b)·H·W`, so a whole
//! channel is one contiguous row of `B·H·W` values. A 1×1 convolution is then one gemm
//! `(O×C)·(C×B·HW)` for the whole batch, and BatchNorm statistics are row reductions.
//!
//! Every kernel writes all of its output (buffers come from [`super::pool`] with stale
//! contents). Reductions use fixed chunking and a fixed summation order, so results are
//! bit-identical run to run for a given thread count.

use rayon::prelude::*;

use crate::ops::depthwise::{bwd_input_plane, bwd_kernel_plane, fwd_plane, Geom};
use crate::ops::storage::valid_range;

/// Activation functions (PyTorch's conventions for the derivative at the kinks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    HardSwish,
    HardSigmoid,
}

impl Act {
    #[inline(always)]
    pub fn f(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::HardSwish => x * ((x + 3.0).clamp(0.0, 6.0) / 6.0),
            Act::HardSigmoid => (x + 3.0).clamp(0.0, 6.0) / 6.0,
        }
    }

    #[inline(always)]
    pub fn df(self, x: f32) -> f32 {
        match self {
            Act::None => 1.0,
            Act::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::HardSwish => {
                if x <= -3.0 {
                    0.0
                } else if x >= 3.0 {
                    1.0
                } else {
                    (2.0 * x + 3.0) / 6.0
                }
            }
            Act::HardSigmoid => {
                if x <= -3.0 || x >= 3.0 {
                    0.0
                } else {
                    1.0 / 6.0
                }
            }
        }
    }
}

fn threads() -> usize {
    rayon::current_num_threads()
}

/// `dst (m×n, row stride dst_rs, column stride 1) = [dst +] lhs (m×k) · rhs (k×n)` with
/// arbitrary element strides for lhs and rhs.
///
/// # Safety
/// Every index `i·rs + j·cs` addressed for the given sizes must lie inside the allocation
/// behind each pointer, and `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(threads()),
    )
}

/// Σ xs in f64, summed as f32 lanes over fixed blocks (vectorises; deterministic).
#[inline]
pub fn sum(xs: &[f32]) -> f64 {
    let mut total = 0f64;
    for blk in xs.chunks(1024) {
        let mut acc = [0f32; 16];
        let mut it = blk.chunks_exact(16);
        for ch in &mut it {
            for i in 0..16 {
                acc[i] += ch[i];
            }
        }
        let mut s = 0f32;
        for a in acc {
            s += a;
        }
        for &v in it.remainder() {
            s += v;
        }
        total += s as f64;
    }
    total
}

/// Σ f(a_i, b_i) for two outputs at once, as [`sum`].
#[inline]
fn sum2<F: Fn(f32, f32) -> (f32, f32)>(a: &[f32], b: &[f32], f: F) -> (f64, f64) {
    let (mut t0, mut t1) = (0f64, 0f64);
    for (ba, bb) in a.chunks(1024).zip(b.chunks(1024)) {
        let mut acc0 = [0f32; 16];
        let mut acc1 = [0f32; 16];
        let mut ia = ba.chunks_exact(16);
        let mut ib = bb.chunks_exact(16);
        for (ca, cb) in (&mut ia).zip(&mut ib) {
            for i in 0..16 {
                let (u, v) = f(ca[i], cb[i]);
                acc0[i] += u;
                acc1[i] += v;
            }
        }
        let (mut s0, mut s1) = (0f32, 0f32);
        for i in 0..16 {
            s0 += acc0[i];
            s1 += acc1[i];
        }
        for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
            let (u, v) = f(x, y);
            s0 += u;
            s1 += v;
        }
        t0 += s0 as f64;
        t1 += s1 as f64;
    }
    (t0, t1)
}

/// Σ a_i·b_i in f64, as [`sum`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    sum2(a, b, |x, y| (x * y, 0.0)).0
}

// ---------------------------------------------------------------------------------------------
// Layout conversions.

/// `(B, C, HW)` -> `(C, B, HW)` (also the inverse with B and C swapped).
pub fn swap_01(src: &[f32], d0: usize, d1: usize, hw: usize, dst: &mut [f32]) {
    if hw == 0 {
        return;
    }
    dst.par_chunks_mut(hw).enumerate().for_each(|(q, o)| {
        // dst plane q = (i1, i0) of the (d1, d0) result.
        let (i1, i0) = (q / d0, q % d0);
        let s = (i0 * d1 + i1) * hw;
        o.copy_from_slice(&src[s..s + hw]);
    });
}

// ---------------------------------------------------------------------------------------------
// Convolutions.

/// Geometry of a k×k convolution with stride `s`, padding `k/2`.
#[derive(Debug, Clone, Copy)]
pub struct ConvGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    pub fn new(b: usize, c: usize, h: usize, w: usize, k: usize, stride: usize) -> Self {
        let pad = k / 2;
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        Self {
            b,
            c,
            h,
            w,
            k,
            stride,
            pad,
            ho,
            wo,
        }
    }

    fn dw(&self) -> Geom {
        Geom {
            n: self.b,
            c: self.c,
            h: self.h,
            w: self.w,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            ho: self.ho,
            wo: self.wo,
        }
    }

    fn valid(&self, tap: usize, len: usize, out: usize) -> (usize, usize) {
        valid_range(tap, len, out, self.stride, self.pad)
    }

    /// Images per im2col chunk: about 4096 columns, at most 16 MiB of columns.
    pub fn chunk(&self) -> usize {
        let p = (self.ho * self.wo).max(1);
        let rows = self.c * self.k * self.k;
        let by_cols = 4096usize.div_ceil(p);
        let by_bytes = ((16usize << 20) / (4 * rows * p)).max(1);
        by_cols.min(by_bytes).clamp(1, self.b.max(1))
    }
}

/// im2col of images `b0..b0+g` of `x (C,B,H,W)` into `cols (C·k·k, g·Ho·Wo)`, row
/// `(c·k + ky)·k + kx`, column `(b − b0)·Ho·Wo + oy·Wo + ox`.
pub fn im2col(g: &ConvGeom, x: &[f32], b0: usize, nb: usize, cols: &mut [f32]) {
    let (k, p) = (g.k, g.ho * g.wo);
    let hw = g.h * g.w;
    cols.par_chunks_mut(k * k * nb * p)
        .enumerate()
        .for_each(|(c, dst)| {
            for bi in 0..nb {
                let xp = &x[(c * g.b + b0 + bi) * hw..(c * g.b + b0 + bi + 1) * hw];
                for ky in 0..k {
                    let (oy0, oy1) = g.valid(ky, g.h, g.ho);
                    for kx in 0..k {
                        let (ox0, ox1) = g.valid(kx, g.w, g.wo);
                        let row = &mut dst[(ky * k + kx) * nb * p + bi * p..][..p];
                        if ox0 == ox1 {
                            row.fill(0.0);
                            continue;
                        }
                        row[..oy0 * g.wo].fill(0.0);
                        row[oy1 * g.wo..].fill(0.0);
                        for oy in oy0..oy1 {
                            let iy = oy * g.stride + ky - g.pad;
                            let xrow = &xp[iy * g.w..(iy + 1) * g.w];
                            let orow = &mut row[oy * g.wo..(oy + 1) * g.wo];
                            orow[..ox0].fill(0.0);
                            orow[ox1..].fill(0.0);
                            if g.stride == 1 {
                                let ix0 = ox0 + kx - g.pad;
                                orow[ox0..ox1].copy_from_slice(&xrow[ix0..ix0 + ox1 - ox0]);
                            } else {
                                for ox in ox0..ox1 {
                                    orow[ox] = xrow[ox * g.stride + kx - g.pad];
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// The adjoint of [`im2col`]: overwrite images `b0..b0+nb` of `dx (C,B,H,W)` with the sums
/// of the taps in `cols`.
pub fn col2im(g: &ConvGeom, cols: &[f32], b0: usize, nb: usize, dx: &mut [f32]) {
    let (k, p) = (g.k, g.ho * g.wo);
    let hw = g.h * g.w;
    // Channel c owns planes (c, b0..b0+nb): contiguous in dx.
    let per_c = g.b * hw;
    dx.par_chunks_mut(per_c).enumerate().for_each(|(c, dxc)| {
        let src = &cols[c * k * k * nb * p..(c + 1) * k * k * nb * p];
        for bi in 0..nb {
            let xp = &mut dxc[(b0 + bi) * hw..(b0 + bi + 1) * hw];
            xp.fill(0.0);
            for ky in 0..k {
                let (oy0, oy1) = g.valid(ky, g.h, g.ho);
                for kx in 0..k {
                    let (ox0, ox1) = g.valid(kx, g.w, g.wo);
                    if ox0 == ox1 {
                        continue;
                    }
                    let row = &src[(ky * k + kx) * nb * p + bi * p..][..p];
                    for oy in oy0..oy1 {
                        let iy = oy * g.stride + ky - g.pad;
                        let xrow = &mut xp[iy * g.w..(iy + 1) * g.w];
                        let grow = &row[oy * g.wo..(oy + 1) * g.wo];
                        if g.stride == 1 {
                            let ix0 = ox0 + kx - g.pad;
                            for (xv, gv) in
                                xrow[ix0..ix0 + ox1 - ox0].iter_mut().zip(&grow[ox0..ox1])
                            {
                                *xv += gv;
                            }
                        } else {
                            for ox in ox0..ox1 {
                                xrow[ox * g.stride + kx - g.pad] += grow[ox];
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Depthwise forward on CNHW: `y (C,B,Ho,Wo)`.
pub fn depthwise_fwd(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    let dg = g.dw();
    let (hw, p, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    if p == 0 {
        return;
    }
    y.par_chunks_mut(p).enumerate().for_each(|(q, o)| {
        let c = q / g.b;
        o.fill(0.0);
        fwd_plane(&dg, &x[q * hw..(q + 1) * hw], &w[c * kk..(c + 1) * kk], o);
    });
}

/// Depthwise input gradient on CNHW: `dx (C,B,H,W)` (overwritten).
pub fn depthwise_bwd_input(g: &ConvGeom, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let dg = g.dw();
    let (hw, p, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    if hw == 0 {
        return;
    }
    dx.par_chunks_mut(hw).enumerate().for_each(|(q, o)| {
        let c = q / g.b;
        o.fill(0.0);
        bwd_input_plane(&dg, &dy[q * p..(q + 1) * p], &w[c * kk..(c + 1) * kk], o);
    });
}

/// Depthwise kernel gradient on CNHW: `dw (C,1,k,k)` (overwritten), summed over the batch
/// in image order.
pub fn depthwise_bwd_kernel(g: &ConvGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let dg = g.dw();
    let (hw, p, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    dw.par_chunks_mut(kk).enumerate().for_each(|(c, gk)| {
        gk.fill(0.0);
        for b in 0..g.b {
            let q = c * g.b + b;
            bwd_kernel_plane(&dg, &x[q * hw..(q + 1) * hw], &dy[q * p..(q + 1) * p], gk);
        }
    });
}

/// `y[c, :] += bias[c]` for rows of length `n`.
pub fn add_bias(y: &mut [f32], bias: &[f32], n: usize) {
    if n == 0 {
        return;
    }
    y.par_chunks_mut(n)
        .zip(bias.par_iter())
        .for_each(|(row, &b)| {
            for v in row {
                *v += b;
            }
        });
}

/// `out[c] = Σ rows[c, :]` for rows of length `n`.
pub fn row_sums(rows: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        out.fill(0.0);
        return;
    }
    out.par_iter_mut()
        .zip(rows.par_chunks(n))
        .for_each(|(o, r)| *o = sum(r) as f32);
}

// ---------------------------------------------------------------------------------------------
// BatchNorm (+ activation).

/// Per-channel `(scale, shift)` of a BatchNorm with statistics `mean`, `var`.
pub fn bn_scale_shift(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let mut scale = vec![0f32; c];
    let mut shift = vec![0f32; c];
    let mut invstd = vec![0f32; c];
    for ch in 0..c {
        let inv = 1.0 / (var[ch] as f64 + eps).sqrt() as f32;
        let s = gamma[ch] * inv;
        invstd[ch] = inv;
        scale[ch] = s;
        shift[ch] = beta[ch] - mean[ch] * s;
    }
    (scale, shift, invstd)
}

/// Per-channel mean and biased variance of rows `z (C, n)` (two-pass).
pub fn channel_stats(z: &[f32], n: usize, mean: &mut [f32], var: &mut [f32]) {
    if n == 0 {
        mean.fill(0.0);
        var.fill(0.0);
        return;
    }
    mean.par_iter_mut()
        .zip(var.par_iter_mut())
        .zip(z.par_chunks(n))
        .for_each(|((m, v), row)| {
            let mu = (sum(row) / n as f64) as f32;
            let ss = sum2(row, row, |x, _| {
                let d = x - mu;
                (d * d, 0.0)
            })
            .0;
            *m = mu;
            *v = (ss / n as f64) as f32;
        });
}

/// `y = act(z·scale[c] + shift[c])` per row of length `n`; `y` may alias nothing.
pub fn affine_act(z: &[f32], n: usize, scale: &[f32], shift: &[f32], act: Act, y: &mut [f32]) {
    if n == 0 {
        return;
    }
    y.par_chunks_mut(n)
        .zip(z.par_chunks(n))
        .enumerate()
        .for_each(|(c, (o, row))| {
            let (s, t) = (scale[c], shift[c]);
            match act {
                Act::None => o.iter_mut().zip(row).for_each(|(o, &x)| *o = x * s + t),
                Act::Relu => o
                    .iter_mut()
                    .zip(row)
                    .for_each(|(o, &x)| *o = (x * s + t).max(0.0)),
                _ => o
                    .iter_mut()
                    .zip(row)
                    .for_each(|(o, &x)| *o = act.f(x * s + t)),
            }
        });
}

/// In place: `y = act(y·scale[c] + shift[c])`.
pub fn affine_act_inplace(y: &mut [f32], n: usize, scale: &[f32], shift: &[f32], act: Act) {
    if n == 0 {
        return;
    }
    y.par_chunks_mut(n).enumerate().for_each(|(c, o)| {
        let (s, t) = (scale[c], shift[c]);
        for v in o {
            *v = act.f(*v * s + t);
        }
    });
}

/// Backward of `y = act(z·s + t)` with BatchNorm statistics: in place, `dy` becomes `dz`.
/// `train`: the statistics are the batch's (`mean`, `invstd` of z), so `dz` includes the
/// statistics' gradient; otherwise (running statistics) `dz = g·s`.
/// Returns `(dγ, dβ)` per channel.
#[allow(clippy::too_many_arguments)]
pub fn bn_act_bwd(
    z: &[f32],
    dy: &mut [f32],
    n: usize,
    scale: &[f32],
    shift: &[f32],
    mean: &[f32],
    invstd: &[f32],
    act: Act,
    train: bool,
) -> (Vec<f32>, Vec<f32>) {
    let c = scale.len();
    let mut dgamma = vec![0f32; c];
    let mut dbeta = vec![0f32; c];
    if n == 0 {
        return (dgamma, dbeta);
    }
    let m = n as f64;
    dy.par_chunks_mut(n)
        .zip(z.par_chunks(n))
        .zip(dgamma.par_iter_mut().zip(dbeta.par_iter_mut()))
        .enumerate()
        .for_each(|(ch, ((d, row), (dg, db)))| {
            let (s, t, mu, inv) = (scale[ch], shift[ch], mean[ch], invstd[ch]);
            // g = dy·act'(u), u = z·s + t; Σg and Σg·(z − μ).
            let (sg, sgz) = sum2(d, row, |dv, x| {
                let g = dv * act.df(x * s + t);
                (g, g * (x - mu))
            });
            *db = sg as f32;
            *dg = (sgz * inv as f64) as f32;
            if train {
                let k1 = (sg / m) as f32;
                let k2 = (sgz / m) as f32 * inv * inv;
                for (dv, &x) in d.iter_mut().zip(row) {
                    let g = *dv * act.df(x * s + t);
                    *dv = s * (g - k1 - (x - mu) * k2);
                }
            } else {
                for (dv, &x) in d.iter_mut().zip(row) {
                    *dv = s * (*dv * act.df(x * s + t));
                }
            }
        });
    (dgamma, dbeta)
}

/// In place `dy *= act'(x)`.
pub fn act_bwd(x: &[f32], dy: &mut [f32], act: Act) {
    dy.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(d, xs)| {
            for (dv, &xv) in d.iter_mut().zip(xs) {
                *dv *= act.df(xv);
            }
        });
}

/// `y = act(x)`.
pub fn act_fwd(x: &[f32], y: &mut [f32], act: Act) {
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, xs)| {
            for (ov, &xv) in o.iter_mut().zip(xs) {
                *ov = act.f(xv);
            }
        });
}

/// `a += b`.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(x, y)| {
            for (u, v) in x.iter_mut().zip(y) {
                *u += v;
            }
        });
}

/// `y = a + b`.
pub fn add(a: &[f32], b: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
        .for_each(|(o, (x, z))| {
            for ((ov, u), v) in o.iter_mut().zip(x).zip(z) {
                *ov = u + v;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Nearest ×2 upsampling + add (FPN top-down path).

/// `y = big + up2(small)`: `small` planes `h×w`, `big`/`y` planes `2h×2w`, same plane count.
pub fn up2_add(small: &[f32], big: &[f32], h: usize, w: usize, y: &mut [f32]) {
    let (hw, bw) = (h * w, 4 * h * w);
    if hw == 0 {
        return;
    }
    y.par_chunks_mut(bw).enumerate().for_each(|(q, o)| {
        let s = &small[q * hw..(q + 1) * hw];
        let bp = &big[q * bw..(q + 1) * bw];
        for yy in 0..2 * h {
            let srow = &s[(yy / 2) * w..(yy / 2 + 1) * w];
            let brow = &bp[yy * 2 * w..(yy + 1) * 2 * w];
            let orow = &mut o[yy * 2 * w..(yy + 1) * 2 * w];
            for xx in 0..2 * w {
                orow[xx] = brow[xx] + srow[xx / 2];
            }
        }
    });
}

/// Gradient of [`up2_add`] with respect to `small`: 2×2 block sums of `dy`.
pub fn up2_bwd(dy: &[f32], h: usize, w: usize, ds: &mut [f32]) {
    let (hw, bw) = (h * w, 4 * h * w);
    if hw == 0 {
        return;
    }
    ds.par_chunks_mut(hw).enumerate().for_each(|(q, o)| {
        let d = &dy[q * bw..(q + 1) * bw];
        for y in 0..h {
            let r0 = &d[(2 * y) * 2 * w..(2 * y + 1) * 2 * w];
            let r1 = &d[(2 * y + 1) * 2 * w..(2 * y + 2) * 2 * w];
            for x in 0..w {
                o[y * w + x] = (r0[2 * x] + r0[2 * x + 1]) + (r1[2 * x] + r1[2 * x + 1]);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Squeeze-excite: y = x · hsig(We·relu(Wr·mean(x) + br) + be), per (c, b) plane.

/// Saved forward values of one SE block; matrices are `(rows, B)`.
pub struct SeSaved {
    pub pooled: Vec<f32>,
    pub pre_r: Vec<f32>,
    pub hidden: Vec<f32>,
    pub pre_e: Vec<f32>,
    pub gate: Vec<f32>,
}

/// `out (m, B) = W (m, k) · v (k, B) + bias`, naive (tiny sizes).
fn small_mm(w: &[f32], bias: &[f32], v: &[f32], m: usize, k: usize, b: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * b];
    out.par_chunks_mut(b).enumerate().for_each(|(i, o)| {
        let wr = &w[i * k..(i + 1) * k];
        for (j, ov) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (kk, &wv) in wr.iter().enumerate() {
                acc += wv * v[kk * b + j];
            }
            *ov = acc + bias[i];
        }
    });
    out
}

#[allow(clippy::too_many_arguments)]
pub fn se_fwd(
    x: &[f32],
    c: usize,
    b: usize,
    hw: usize,
    rd: usize,
    wr: &[f32],
    br: &[f32],
    we: &[f32],
    be: &[f32],
    y: &mut [f32],
) -> SeSaved {
    let mut pooled = vec![0f32; c * b];
    pooled
        .par_iter_mut()
        .zip(x.par_chunks(hw.max(1)))
        .for_each(|(p, plane)| *p = (sum(plane) / hw.max(1) as f64) as f32);
    let pre_r = small_mm(wr, br, &pooled, rd, c, b);
    let hidden: Vec<f32> = pre_r.iter().map(|&v| v.max(0.0)).collect();
    let pre_e = small_mm(we, be, &hidden, c, rd, b);
    let gate: Vec<f32> = pre_e.iter().map(|&v| Act::HardSigmoid.f(v)).collect();
    if hw > 0 {
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(q, (o, xs))| {
                let gv = gate[q];
                for (ov, &xv) in o.iter_mut().zip(xs) {
                    *ov = xv * gv;
                }
            });
    }
    SeSaved {
        pooled,
        pre_r,
        hidden,
        pre_e,
        gate,
    }
}

/// Backward of [`se_fwd`]: `dy` becomes `dx` in place; returns `(dWr, dbr, dWe, dbe)`.
#[allow(clippy::too_many_arguments)]
pub fn se_bwd(
    x: &[f32],
    dy: &mut [f32],
    c: usize,
    b: usize,
    hw: usize,
    rd: usize,
    wr: &[f32],
    we: &[f32],
    s: &SeSaved,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let hwn = hw.max(1);
    // dgate[c,b] = Σ dy·x over the plane.
    let mut dpre_e = vec![0f32; c * b];
    dpre_e
        .par_iter_mut()
        .zip(dy.par_chunks(hwn).zip(x.par_chunks(hwn)))
        .enumerate()
        .for_each(|(q, (d, (g, xs)))| {
            *d = dot(g, xs) as f32 * Act::HardSigmoid.df(s.pre_e[q]);
        });
    // Expand conv: dWe = dpre_e · hiddenᵀ, dbe = Σ_b dpre_e, dhidden = Weᵀ · dpre_e.
    let mut dwe = vec![0f32; c * rd];
    let mut dbe = vec![0f32; c];
    for i in 0..c {
        let drow = &dpre_e[i * b..(i + 1) * b];
        for r in 0..rd {
            let hrow = &s.hidden[r * b..(r + 1) * b];
            dwe[i * rd + r] = drow.iter().zip(hrow).map(|(a, h)| a * h).sum();
        }
        dbe[i] = drow.iter().sum();
    }
    let mut dpre_r = vec![0f32; rd * b];
    for r in 0..rd {
        for j in 0..b {
            let mut acc = 0f32;
            for i in 0..c {
                acc += we[i * rd + r] * dpre_e[i * b + j];
            }
            dpre_r[r * b + j] = if s.pre_r[r * b + j] > 0.0 { acc } else { 0.0 };
        }
    }
    // Reduce conv: dWr = dpre_r · pooledᵀ, dbr = Σ_b dpre_r, dpooled = Wrᵀ · dpre_r.
    let mut dwr = vec![0f32; rd * c];
    let mut dbr = vec![0f32; rd];
    for r in 0..rd {
        let drow = &dpre_r[r * b..(r + 1) * b];
        for i in 0..c {
            let prow = &s.pooled[i * b..(i + 1) * b];
            dwr[r * c + i] = drow.iter().zip(prow).map(|(a, p)| a * p).sum();
        }
        dbr[r] = drow.iter().sum();
    }
    let mut dpooled = vec![0f32; c * b];
    dpooled.par_chunks_mut(b).enumerate().for_each(|(i, o)| {
        for (j, ov) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for r in 0..rd {
                acc += wr[r * c + i] * dpre_r[r * b + j];
            }
            *ov = acc / hwn as f32;
        }
    });
    if hw > 0 {
        dy.par_chunks_mut(hw).enumerate().for_each(|(q, d)| {
            let (gv, dp) = (s.gate[q], dpooled[q]);
            for dv in d {
                *dv = *dv * gv + dp;
            }
        });
    }
    (dwr, dbr, dwe, dbe)
}
