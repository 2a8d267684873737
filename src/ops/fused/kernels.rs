//! Slice kernels of the fused executor. Activations are stored `(C, H, W, B)` ("CHWN"):
//! channel-major, so a whole channel is one contiguous row of `H·W·B` values (a 1×1
//! convolution is one gemm `(O×C)·(C×HWB)` for the whole batch; BatchNorm statistics are row
//! reductions), and batch-minor, so the B values of one pixel are contiguous (a depthwise
//! kernel tap, an im2col entry or an upsampled pixel is one vector of B lanes).
//!
//! Every kernel writes all of its output (buffers come from [`super::pool`] with stale
//! contents). Reductions use fixed chunking and a fixed summation order, so results are
//! bit-identical run to run for a given thread count.

use rayon::prelude::*;

use crate::ops::storage::valid_range;

use crate::ops::simd::multiversion;
pub use crate::ops::simd::simd_level;

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

/// Minimum items per rayon task so that each task has at least ~16 K values of work: tiny
/// maps (batch 1, 7×7) are not split into tasks that cost more to schedule than to run.
#[inline]
fn grain(work_per_item: usize) -> usize {
    (16384 / work_per_item.max(1)).max(1)
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
    sgemm_strided(
        m, n, k, dst, dst_rs, 1, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs,
    )
}

/// As [`sgemm`] with an arbitrary column stride for `dst` too. The `gemm` crate's speed
/// depends on the storage orders: for the conv shapes here a column-major destination with
/// a column-major right-hand side runs ≈ 1.2–1.45× faster than all-row-major for the weight
/// gradients (measured: `tests/model_profile.rs` `sgemm_layouts`).
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
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
                for j in 0..n {
                    *dst.add(i * dst_rs + j * dst_cs) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
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
        if SERIAL.with(|s| s.get()) {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads())
        },
    )
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with this thread's gemms single-threaded: for callers that spread independent
/// gemms over the threads themselves (the gemm crate does not split small products well
/// between threads). The values do not depend on it: the crate splits rows and columns,
/// never the sum.
pub fn serial_gemms<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|s| s.replace(true));
    let r = f();
    SERIAL.with(|s| s.set(before));
    r
}

/// `dst (cols × rows) = srcᵀ` for `src (rows × cols)`, both row-major.
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    if rows == 0 || cols == 0 {
        return;
    }
    dst.par_chunks_mut(rows * 64)
        .enumerate()
        .for_each(|(t, o)| {
            for (i, row) in o.chunks_exact_mut(rows).enumerate() {
                let j = t * 64 + i;
                for (k, v) in row.iter_mut().enumerate() {
                    *v = src[k * cols + j];
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Reductions.

multiversion! {
    /// Σ xs in f64: f32 lane accumulators over fixed blocks (vectorises; deterministic).
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
}

multiversion! {
    /// Σ (x − mu)² in f64, as [`sum`].
    fn sum_sq_dev(xs: &[f32], mu: f32) -> f64 {
        let mut total = 0f64;
        for blk in xs.chunks(1024) {
            let mut acc = [0f32; 16];
            let mut it = blk.chunks_exact(16);
            for ch in &mut it {
                for i in 0..16 {
                    let d = ch[i] - mu;
                    acc[i] = d.mul_add(d, acc[i]);
                }
            }
            let mut s = 0f32;
            for a in acc {
                s += a;
            }
            for &v in it.remainder() {
                let d = v - mu;
                s = d.mul_add(d, s);
            }
            total += s as f64;
        }
        total
    }
}

/// [`lane_sums`] for `N` lanes.
#[inline(always)]
fn lane_sums_n<const N: usize, F: Fn(f32, f32) -> f32>(
    a: &[f32],
    c: &[f32],
    f: F,
    out: &mut [f64],
) {
    for (ba, bc) in a.chunks(64 * N).zip(c.chunks(64 * N)) {
        let mut acc = [0f32; N];
        for (pa, pc) in ba.as_chunks::<N>().0.iter().zip(bc.as_chunks::<N>().0) {
            for l in 0..N {
                acc[l] += f(pa[l], pc[l]);
            }
        }
        for (o, &s) in out.iter_mut().zip(&acc) {
            *o += s as f64;
        }
    }
}

/// Per-lane sums over pixels: `out[l] = Σ_p f(a[p·b + l], c[p·b + l])` for `(P, b)` slices,
/// f32 over blocks of 64 pixels, then f64 (fixed order).
#[inline(always)]
fn lane_sums<F: Fn(f32, f32) -> f32>(a: &[f32], c: &[f32], b: usize, f: F, out: &mut [f64]) {
    out.fill(0.0);
    if b == 0 {
        return;
    }
    // 16 or 8 lanes: the sums in one register (the same order; the general loop below keeps
    // them in memory, its lane count unknown to the compiler: 3.5× the time at 8 images).
    match b {
        16 => return lane_sums_n::<16, F>(a, c, f, out),
        8 => return lane_sums_n::<8, F>(a, c, f, out),
        _ => {}
    }
    let mut acc = vec![0f32; b];
    for (ba, bc) in a.chunks(64 * b).zip(c.chunks(64 * b)) {
        acc.fill(0.0);
        for (pa, pc) in ba.chunks_exact(b).zip(bc.chunks_exact(b)) {
            for ((s, &x), &y) in acc.iter_mut().zip(pa).zip(pc) {
                *s += f(x, y);
            }
        }
        for (o, &s) in out.iter_mut().zip(&acc) {
            *o += s as f64;
        }
    }
}

/// A raw pointer shared by the tasks of one parallel loop that write disjoint parts of it.
pub(super) struct Ptr(pub(super) *mut f32);
// SAFETY: only used where every task reads shared inputs and writes its own disjoint part.
unsafe impl Sync for Ptr {}
unsafe impl Send for Ptr {}

/// Ask for the cache lines of `buf[at .. at + len]` (for writing if `write`): a hint, no
/// effect on the values; nothing past the end of `buf` is touched.
#[inline(always)]
pub(super) fn prefetch(buf: &[f32], at: usize, len: usize, write: bool) {
    let end = (at + len).min(buf.len());
    if at < end {
        prefetch_span(buf[at..].as_ptr(), end - at, write)
    }
}

/// [`prefetch`] of the `len` values from `p`: for memory other threads write meanwhile
/// (disjoint parts of one output), which no slice may cover. A prefetch neither faults nor
/// reads or writes anything, whatever the address.
#[inline(always)]
pub(super) fn prefetch_span(p: *const f32, len: usize, write: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        for a in (0..len).step_by(16) {
            let q = p.wrapping_add(a) as *const i8;
            // SAFETY: a prefetch is a hint that reads and writes nothing.
            unsafe {
                if write {
                    _mm_prefetch::<_MM_HINT_ET0>(q)
                } else {
                    _mm_prefetch::<_MM_HINT_T0>(q)
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len, write);
}

// ---------------------------------------------------------------------------------------------
// Layout conversions.

/// `(B, C, HW)` (NCHW) -> `(C, HW, B)` (CHWN), in tiles of 64 pixels (cache-friendly).
pub fn nchw_to_chwn(src: &[f32], b: usize, c: usize, hw: usize, dst: &mut [f32]) {
    if hw == 0 || b == 0 {
        return;
    }
    const T: usize = 64;
    dst.par_chunks_mut(hw * b).enumerate().for_each(|(ci, dc)| {
        dc.par_chunks_mut(T * b).enumerate().for_each(|(t, o)| {
            let (p0, np) = (t * T, o.len() / b);
            if b.is_multiple_of(16) {
                for l0 in (0..b).step_by(16) {
                    to_lanes16(src, ((l0 * c + ci) * hw + p0, c * hw), np, &mut o[l0..], b);
                }
                return;
            }
            for bi in 0..b {
                let plane = &src[(bi * c + ci) * hw + p0..(bi * c + ci) * hw + p0 + np];
                for (p, &v) in plane.iter().enumerate() {
                    o[p * b + bi] = v;
                }
            }
        });
    });
}

/// `dst[p·stride + l] = rows[l][p]` for `p < n`, 16 rows `l` of `src` starting at `at` and
/// `row_gap` apart: 16 images' runs of `n` pixels into the lanes of `(n, 16)` (the first 16 of
/// each `stride`). Through 16 × 16 blocks transposed in AVX-512 registers where the CPU has
/// them: the 16 scalar stores per pixel took ~1 ns per value (`nchw_to_chwn` 2.3 ms for a
/// 224 px batch of 16 on one thread).
pub fn to_lanes16(
    src: &[f32],
    (at, row_gap): (usize, usize),
    n: usize,
    dst: &mut [f32],
    stride: usize,
) {
    assert!(
        stride >= 16
            && (n == 0 || dst.len() >= (n - 1) * stride + 16)
            && src.len() >= at + 15 * row_gap + n,
        "to_lanes16: buffer sizes"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd_level() == 2 {
        // SAFETY: AVX-512 is present (checked); the sizes are checked above.
        done = unsafe { to_lanes16_avx512(src, (at, row_gap), n, dst, stride) };
    }
    for p in done..n {
        for l in 0..16 {
            dst[p * stride + l] = src[at + l * row_gap + p];
        }
    }
}

/// [`to_lanes16`]'s whole blocks of 16 pixels; returns how many pixels it did.
///
/// # Safety
/// AVX-512F must be available, and the sizes [`to_lanes16`] asserts must hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn to_lanes16_avx512(
    src: &[f32],
    (at, row_gap): (usize, usize),
    n: usize,
    dst: &mut [f32],
    stride: usize,
) -> usize {
    use std::arch::x86_64::*;
    let (s, d) = (src.as_ptr().add(at), dst.as_mut_ptr());
    let blocks = n / 16;
    for blk in 0..blocks {
        let p0 = blk * 16;
        let r: [__m512; 16] = std::array::from_fn(|l| _mm512_loadu_ps(s.add(l * row_gap + p0)));
        // 32-bit, then 64-bit interleaves within each 128-bit lane: u[4g + j] holds, in lane k,
        // rows 4g .. 4g + 4 of pixel 4k + j.
        let lo = |a, b| _mm512_unpacklo_ps(a, b);
        let hi = |a, b| _mm512_unpackhi_ps(a, b);
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
            if i % 2 == 0 {
                lo(a, b)
            } else {
                hi(a, b)
            }
        });
        let pd = |x: __m512| _mm512_castps_pd(x);
        let u: [__m512; 16] = std::array::from_fn(|i| {
            // Group g = i / 4 (rows 4g ..), pixel offset j = i % 4.
            let (g, j) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + j / 2], t[4 * g + j / 2 + 2]);
            if j % 2 == 0 {
                _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(b)))
            } else {
                _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(b)))
            }
        });
        // 128-bit lanes: pixel 4k + j of the 4 groups side by side.
        for j in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            let v1 = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
            let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            let v3 = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
            let out = [
                (j, _mm512_shuffle_f32x4::<0x88>(v0, v2)),
                (8 + j, _mm512_shuffle_f32x4::<0xDD>(v0, v2)),
                (4 + j, _mm512_shuffle_f32x4::<0x88>(v1, v3)),
                (12 + j, _mm512_shuffle_f32x4::<0xDD>(v1, v3)),
            ];
            for (p, v) in out {
                _mm512_storeu_ps(d.add((p0 + p) * stride), v);
            }
        }
    }
    blocks * 16
}

/// `(C, HW, B)` (CHWN) -> `(B, C, HW)` (NCHW).
pub fn chwn_to_nchw(src: &[f32], c: usize, hw: usize, b: usize, dst: &mut [f32]) {
    if hw == 0 || c == 0 {
        return;
    }
    if b == 16 {
        // 16 images: blocks of 16 pixels × 16 lanes transposed in registers, a channel per
        // task (one value per iteration, as below, read with a stride of 16).
        let out = Ptr(dst.as_mut_ptr());
        assert!(src.len() == c * hw * 16 && dst.len() == src.len());
        (0..c)
            .into_par_iter()
            .with_min_len(grain(hw * 16))
            .for_each(|ci| {
                let out = &out;
                // SAFETY: channel ci writes only rows (bi, ci) of dst: hw values at
                // (bi·c + ci)·hw, disjoint across channels, inside dst (asserted above).
                let rows: [&mut [f32]; 16] = std::array::from_fn(|bi| unsafe {
                    std::slice::from_raw_parts_mut(out.0.add((bi * c + ci) * hw), hw)
                });
                from_lanes16(&src[ci * hw * 16..(ci + 1) * hw * 16], rows);
            });
        return;
    }
    dst.par_chunks_mut(hw)
        .with_min_len(grain(hw))
        .enumerate()
        .for_each(|(q, o)| {
            let (bi, ci) = (q / c, q % c);
            let s = &src[ci * hw * b..(ci + 1) * hw * b];
            for (p, v) in o.iter_mut().enumerate() {
                *v = s[p * b + bi];
            }
        });
}

multiversion! {
    /// One channel's `(HW, 16)` lanes into 16 rows of `HW` values.
    fn from_lanes16(sc: &[f32], rows: [&mut [f32]; 16]) {
        let mut rows = rows;
        let lanes = sc.as_chunks::<16>().0;
        let mut p = 0;
        for blk in lanes.chunks_exact(16) {
            for (bi, r) in rows.iter_mut().enumerate() {
                let v: [f32; 16] = std::array::from_fn(|q| blk[q][bi]);
                r[p..p + 16].copy_from_slice(&v);
            }
            p += 16;
        }
        for (q, lane) in lanes[p..].iter().enumerate() {
            for (bi, r) in rows.iter_mut().enumerate() {
                r[p + q] = lane[bi];
            }
        }
    }
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

    /// Output positions whose tap `tap` reads inside an input axis of `len` (`out` outputs).
    fn valid(&self, tap: usize, len: usize, out: usize) -> (usize, usize) {
        valid_range(tap, len, out, self.stride, self.pad)
    }

    /// Taps `ky` with `o·s + ky − pad` inside `0..len`.
    #[inline(always)]
    pub fn taps(&self, o: usize, len: usize) -> (usize, usize) {
        let base = o * self.stride;
        let t0 = self.pad.saturating_sub(base);
        let t1 = (len + self.pad).saturating_sub(base).min(self.k);
        (t0, t1.max(t0))
    }

    /// Output rows per im2col chunk: about 4096 columns, at most 16 MiB of columns.
    pub fn chunk_rows(&self) -> usize {
        let per_row = (self.wo * self.b).max(1);
        let rows = self.c * self.k * self.k;
        let by_cols = 4096usize.div_ceil(per_row);
        let by_bytes = ((16usize << 20) / (4 * rows * per_row)).max(1);
        by_cols.min(by_bytes).clamp(1, self.ho.max(1))
    }
}

/// im2col of output rows `oy0..oy1`: `cols (C·k·k, (oy1−oy0)·Wo·B)`, row `(c·k + ky)·k + kx`,
/// column `((oy − oy0)·Wo + ox)·B + b`.
pub fn im2col(g: &ConvGeom, x: &[f32], oy0: usize, oy1: usize, cols: &mut [f32]) {
    let (k, b) = (g.k, g.b);
    let ncols = (oy1 - oy0) * g.wo * b;
    let plane = g.h * g.w * b;
    cols.par_chunks_mut(k * k * ncols)
        .with_min_len(grain(k * k * ncols))
        .enumerate()
        .for_each(|(c, dst)| {
            let xc = &x[c * plane..(c + 1) * plane];
            for ky in 0..k {
                for kx in 0..k {
                    let (ox0, ox1) = g.valid(kx, g.w, g.wo);
                    let row = &mut dst[(ky * k + kx) * ncols..(ky * k + kx + 1) * ncols];
                    for oy in oy0..oy1 {
                        let seg = &mut row[(oy - oy0) * g.wo * b..(oy - oy0 + 1) * g.wo * b];
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize || ox0 == ox1 {
                            seg.fill(0.0);
                            continue;
                        }
                        let xrow = &xc[iy as usize * g.w * b..(iy as usize + 1) * g.w * b];
                        seg[..ox0 * b].fill(0.0);
                        seg[ox1 * b..].fill(0.0);
                        if g.stride == 1 {
                            let ix0 = ox0 + kx - g.pad;
                            seg[ox0 * b..ox1 * b]
                                .copy_from_slice(&xrow[ix0 * b..(ix0 + ox1 - ox0) * b]);
                        } else {
                            for ox in ox0..ox1 {
                                let ix = ox * g.stride + kx - g.pad;
                                seg[ox * b..(ox + 1) * b]
                                    .copy_from_slice(&xrow[ix * b..(ix + 1) * b]);
                            }
                        }
                    }
                }
            }
        });
}

multiversion! {
    /// `dst += src`.
    fn add_into(dst: &mut [f32], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// The adjoint of [`im2col`]: add the taps in `cols` (output rows `oy0..oy1`) into
/// `dx (C, H, W, B)` (zero it before the first chunk).
pub fn col2im(g: &ConvGeom, cols: &[f32], oy0: usize, oy1: usize, dx: &mut [f32]) {
    let (k, b) = (g.k, g.b);
    let ncols = (oy1 - oy0) * g.wo * b;
    let plane = g.h * g.w * b;
    if plane == 0 {
        return;
    }
    dx.par_chunks_mut(plane)
        .with_min_len(grain(k * k * ncols))
        .enumerate()
        .for_each(|(c, dxc)| {
            let src = &cols[c * k * k * ncols..(c + 1) * k * k * ncols];
            for ky in 0..k {
                for kx in 0..k {
                    let (ox0, ox1) = g.valid(kx, g.w, g.wo);
                    if ox0 == ox1 {
                        continue;
                    }
                    let row = &src[(ky * k + kx) * ncols..(ky * k + kx + 1) * ncols];
                    for oy in oy0..oy1 {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let seg = &row[(oy - oy0) * g.wo * b..(oy - oy0 + 1) * g.wo * b];
                        let xrow = &mut dxc[iy as usize * g.w * b..(iy as usize + 1) * g.w * b];
                        if g.stride == 1 {
                            let ix0 = ox0 + kx - g.pad;
                            add_into(
                                &mut xrow[ix0 * b..(ix0 + ox1 - ox0) * b],
                                &seg[ox0 * b..ox1 * b],
                            );
                        } else {
                            for ox in ox0..ox1 {
                                let ix = ox * g.stride + kx - g.pad;
                                add_into(
                                    &mut xrow[ix * b..(ix + 1) * b],
                                    &seg[ox * b..(ox + 1) * b],
                                );
                            }
                        }
                    }
                }
            }
        });
}

// Depthwise convolutions on CHWN: the B values of a pixel are contiguous, so every kernel tap
// is one vector operation over the batch (lane blocks of 16, 8, 4, 1) and an output pixel is
// a register accumulator over its valid taps. No padding copies, stride 2 costs nothing.

/// Lane blocks `(start, width)` covering `0..b`: widths 16, then 8, 4, 1.
#[inline(always)]
fn lane_blocks(b: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut out = [(0usize, 0usize); 24];
    let mut n = 0;
    let mut j = 0;
    for w in [16usize, 8, 4, 1] {
        while b - j >= w && n < out.len() {
            out[n] = (j, w);
            n += 1;
            j += w;
        }
    }
    out.into_iter().take(n)
}

/// One lane block of the depthwise correlation of `x (h, w, B)` with `wt (k, k)`, stride `s`,
/// padding `pad`: `y (ho, wo, B)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn corr_lanes<const L: usize>(
    x: &[f32],
    (h, w, b): (usize, usize, usize),
    j0: usize,
    wt: &[f32],
    (k, s, pad): (usize, usize, usize),
    (ho, wo): (usize, usize),
    y: &mut [f32],
) {
    let g = ConvGeom {
        b,
        c: 1,
        h,
        w,
        k,
        stride: s,
        pad,
        ho,
        wo,
    };
    // Outputs whose taps all lie inside the row: from `ox_in` up to `ox_out`.
    let (ox_in, ox_out) = inside_cols((k, s, pad), w, wo);
    for oy in 0..ho {
        let (ky0, ky1) = g.taps(oy, h);
        // The input rows that the next output row reads and this one does not: a map written
        // by the layer before (the expanded 1×1 conv's, up to 14 MB) is mostly out of cache,
        // and the row streams were not prefetched in time (an inference batch 1–4 % faster).
        let r0 = (oy * s + k).saturating_sub(pad).min(h);
        let r1 = ((oy + 1) * s + k).saturating_sub(pad).min(h);
        prefetch(x, r0 * w * b, (r1 - r0) * w * b, false);
        let mut next = 0;
        while next < wo {
            // NB neighbouring outputs at once: independent accumulators hide the FMA latency
            // (one accumulator is a chain of k² dependent FMAs); each output still sums its
            // taps in the same order, so the values are those of the one-output loop. A
            // block that would pass the row's end ends at it instead (redoing outputs of the
            // block before: the same values), as on padded planes every block can.
            let ox = if next + NB > wo && wo >= NB {
                wo - NB
            } else {
                next
            };
            if ox >= ox_in && ox + NB <= ox_out && ky0 < ky1 {
                // Every tap of the block lies inside the row: the reads run from `row0(ky0)`
                // (row ky0, column ox·s − pad) to `end` (row ky1 − 1, column
                // (ox + NB − 1)·s − pad + k − 1, lanes to j0 + L ≤ b), checked once here
                // rather than per load (the checks and their index arithmetic took more
                // instructions than the FMAs).
                let row0 = |ky: usize| ((oy * s + ky - pad) * w + ox * s - pad) * b + j0;
                let end = row0(ky1 - 1) + ((NB - 1) * s + k - 1) * b + L;
                assert!(
                    end <= x.len() && j0 + L <= b,
                    "depthwise block out of bounds"
                );
                let mut acc = [[0f32; L]; NB];
                for ky in ky0..ky1 {
                    let wr = &wt[ky * k..ky * k + k];
                    let at = row0(ky);
                    for (kx, &wv) in wr.iter().enumerate() {
                        for (j, a) in acc.iter_mut().enumerate() {
                            // SAFETY: at + (kx + j·s)·b + L ≤ end ≤ x.len() (asserted above).
                            let src = unsafe {
                                &*x.as_ptr().add(at + (kx + j * s) * b).cast::<[f32; L]>()
                            };
                            for l in 0..L {
                                a[l] = wv.mul_add(src[l], a[l]);
                            }
                        }
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    let o = (oy * wo + ox + j) * b + j0;
                    y[o..o + L].copy_from_slice(a);
                }
                next = ox + NB;
                continue;
            }
            let ox = next;
            let (kx0, kx1) = g.taps(ox, w);
            let mut acc = [0f32; L];
            for ky in ky0..ky1 {
                let iy = oy * s + ky - pad;
                for kx in kx0..kx1 {
                    let ix = ox * s + kx - pad;
                    let wv = wt[ky * k + kx];
                    let o = (iy * w + ix) * b + j0;
                    let src: &[f32; L] = x[o..o + L].try_into().unwrap();
                    for l in 0..L {
                        acc[l] = wv.mul_add(src[l], acc[l]);
                    }
                }
            }
            let o = (oy * wo + ox) * b + j0;
            y[o..o + L].copy_from_slice(&acc);
            next += 1;
        }
    }
}

/// [`corr_lanes`] for 8 images at stride 1: two neighbouring outputs to a 16-wide vector. A
/// pixel's 8 images are contiguous, so the 16 values from pixel `p` are pixels `p` and `p + 1`:
/// a tap's input for outputs `ox` and `ox + 1` in one load (8-wide vectors left half of each
/// FMA unused: depthwise at 8 images on one thread took 1.6× half of 16's time). Every output
/// sums its taps in the order `(ky, kx)`, as in [`corr_lanes`]: the same values.
#[inline(always)]
fn corr_pairs(
    x: &[f32],
    (h, w): (usize, usize),
    wt: &[f32],
    (k, s, pad): (usize, usize, usize),
    (ho, wo): (usize, usize),
    y: &mut [f32],
) {
    const P: usize = 8;
    debug_assert_eq!(s, 1);
    let g = ConvGeom {
        b: P,
        c: 1,
        h,
        w,
        k,
        stride: 1,
        pad,
        ho,
        wo,
    };
    let (ox_in, ox_out) = inside_cols((k, 1, pad), w, wo);
    for oy in 0..ho {
        let (ky0, ky1) = g.taps(oy, h);
        let r0 = (oy + k).saturating_sub(pad).min(h);
        let r1 = (oy + 1 + k).saturating_sub(pad).min(h);
        prefetch(x, r0 * w * P, (r1 - r0) * w * P, false);
        let mut ox = 0;
        while ox < wo {
            // Up to NB pairs of outputs (independent sums: one alone waits on each FMA's
            // latency), every tap inside the row.
            let pairs = if ox >= ox_in {
                (ox_out.saturating_sub(ox) / 2).min(NB)
            } else {
                0
            };
            if pairs > 0 && ky0 < ky1 {
                let row0 = |ky: usize| ((oy + ky - pad) * w + ox - pad) * P;
                // The last load: pixels ox + 2·pairs − 2 + k − 1 − pad and the one after it.
                let end = row0(ky1 - 1) + (2 * pairs + k - 1) * P;
                assert!(end <= x.len(), "depthwise pair block out of bounds");
                let mut acc = [[0f32; 2 * P]; NB];
                for ky in ky0..ky1 {
                    let wr = &wt[ky * k..ky * k + k];
                    let at = row0(ky);
                    for (kx, &wv) in wr.iter().enumerate() {
                        for (j, a) in acc.iter_mut().enumerate().take(pairs) {
                            // SAFETY: at + (kx + 2j)·P + 2P ≤ end ≤ x.len() (asserted above).
                            let src = unsafe {
                                &*x.as_ptr().add(at + (kx + 2 * j) * P).cast::<[f32; 2 * P]>()
                            };
                            for l in 0..2 * P {
                                a[l] = wv.mul_add(src[l], a[l]);
                            }
                        }
                    }
                }
                for (j, a) in acc.iter().enumerate().take(pairs) {
                    let o = (oy * wo + ox + 2 * j) * P;
                    let d: &mut [f32; 2 * P] =
                        (&mut y[o..o + 2 * P]).try_into().expect("two pixels");
                    *d = *a;
                }
                ox += 2 * pairs;
                continue;
            }
            let (kx0, kx1) = g.taps(ox, w);
            let mut acc = [0f32; P];
            for ky in ky0..ky1 {
                let iy = oy + ky - pad;
                for kx in kx0..kx1 {
                    let ix = ox + kx - pad;
                    let wv = wt[ky * k + kx];
                    let o = (iy * w + ix) * P;
                    let src: &[f32; P] = x[o..o + P].try_into().expect("a pixel");
                    for l in 0..P {
                        acc[l] = wv.mul_add(src[l], acc[l]);
                    }
                }
            }
            let o = (oy * wo + ox) * P;
            let d: &mut [f32; P] = (&mut y[o..o + P]).try_into().expect("a pixel");
            *d = acc;
            ox += 1;
        }
    }
}

/// The outputs of a row of `wo` (from `w` inputs, kernel `k`, stride `s`, padding `pad`) whose
/// taps all lie inside the row: `ox_in .. ox_out`.
#[inline(always)]
fn inside_cols((k, s, pad): (usize, usize, usize), w: usize, wo: usize) -> (usize, usize) {
    let ox_in = pad.div_ceil(s).min(wo);
    let ox_out = if w + pad >= k {
        ((w + pad - k) / s + 1).clamp(ox_in, wo)
    } else {
        ox_in
    };
    (ox_in, ox_out)
}

/// Outputs per block of [`corr_lanes`]'s interior.
const NB: usize = 4;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn corr(
    x: &[f32],
    hwb: (usize, usize, usize),
    wt: &[f32],
    ksp: (usize, usize, usize),
    howo: (usize, usize),
    y: &mut [f32],
) {
    if hwb.2 == 8 && ksp.1 == 1 {
        return corr_pairs(x, (hwb.0, hwb.1), wt, ksp, howo, y);
    }
    for (j0, l) in lane_blocks(hwb.2) {
        match l {
            16 => corr_lanes::<16>(x, hwb, j0, wt, ksp, howo, y),
            8 => corr_lanes::<8>(x, hwb, j0, wt, ksp, howo, y),
            4 => corr_lanes::<4>(x, hwb, j0, wt, ksp, howo, y),
            _ => corr_lanes::<1>(x, hwb, j0, wt, ksp, howo, y),
        }
    }
}

/// One lane block of the depthwise input gradient for stride > 1: every input pixel gathers
/// the output pixels whose taps read it.
#[inline(always)]
fn bwd_in_lanes<const L: usize>(g: &ConvGeom, dy: &[f32], j0: usize, wt: &[f32], dx: &mut [f32]) {
    let (k, s, b) = (g.k, g.stride, g.b);
    // Per input position: the (tap, output) pairs that read it (at most ⌈k/s⌉ ≤ 4 each).
    let table = |len: usize, outs: usize| -> Vec<([(usize, usize); 4], usize)> {
        (0..len)
            .map(|i| {
                let mut e = [(0usize, 0usize); 4];
                let mut n = 0;
                let p = i + g.pad;
                for t in 0..k.min(p + 1) {
                    if (p - t).is_multiple_of(s) && (p - t) / s < outs && n < 4 {
                        e[n] = (t, (p - t) / s);
                        n += 1;
                    }
                }
                (e, n)
            })
            .collect()
    };
    let (ty, tx) = (table(g.h, g.ho), table(g.w, g.wo));
    // Every read below is of an output pixel (oy < ho, ox < wo: the tables') and a tap: checked
    // once here rather than per load (the checks outnumbered the FMAs, as in `corr_lanes`).
    assert!(dy.len() >= g.ho * g.wo * b && j0 + L <= b && wt.len() >= k * k);
    for (iy, &(ey, ny)) in ty.iter().enumerate() {
        for (ix, &(ex, nx)) in tx.iter().enumerate() {
            let mut acc = [0f32; L];
            for &(ky, oy) in &ey[..ny] {
                for &(kx, ox) in &ex[..nx] {
                    // SAFETY: ky, kx < k and (oy·wo + ox)·b + j0 + L ≤ ho·wo·b (asserted above).
                    let wv = unsafe { *wt.get_unchecked(ky * k + kx) };
                    let o = (oy * g.wo + ox) * b + j0;
                    let src = unsafe { &*dy.as_ptr().add(o).cast::<[f32; L]>() };
                    for l in 0..L {
                        acc[l] = wv.mul_add(src[l], acc[l]);
                    }
                }
            }
            let o = (iy * g.w + ix) * b + j0;
            dx[o..o + L].copy_from_slice(&acc);
        }
    }
}

/// One lane block of one kernel row's gradient: for each tap `kx`, `Σ_{oy,ox} dy · x(shifted)`
/// (lanes summed in order). The row's `K` taps run side by side — independent accumulators
/// instead of one chain of dependent FMAs per tap — and each tap still adds its pixels in
/// row-major order, so the sums are those of one tap at a time.
#[inline(always)]
fn tap_row_lanes<const L: usize, const K: usize>(
    g: &ConvGeom,
    x: &[f32],
    dy: &[f32],
    j0: usize,
    ky: usize,
) -> [f32; K] {
    let s = g.stride;
    let (oy0, oy1) = g.valid(ky, g.h, g.ho);
    let ranges: [(usize, usize); K] = std::array::from_fn(|kx| g.valid(kx, g.w, g.wo));
    let first = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let last = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    // Where every tap is valid (empty on maps narrower than the kernel).
    let lo = ranges.iter().map(|r| r.0).max().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.1).min().unwrap_or(0).max(lo);
    // `tap_pixel` reads only output pixels and, for taps valid there, input pixels of the
    // map: checked once here rather than per load.
    assert!(dy.len() >= g.ho * g.wo * g.b && x.len() >= g.h * g.w * g.b && j0 + L <= g.b);
    let mut acc = [[0f32; L]; K];
    for oy in oy0..oy1 {
        let iy = oy * s + ky - g.pad;
        let row = (g, x, dy, j0, oy, iy);
        for ox in first..lo.min(last) {
            tap_pixel(row, &ranges, ox, false, &mut acc);
        }
        for ox in lo..hi {
            tap_pixel(row, &ranges, ox, true, &mut acc);
        }
        for ox in hi.max(first)..last {
            tap_pixel(row, &ranges, ox, false, &mut acc);
        }
    }
    acc.map(|a| {
        let mut total = 0f32;
        for v in a {
            total += v;
        }
        total
    })
}

/// One output pixel's terms of [`tap_row_lanes`]: every tap valid there (`all`: every tap).
/// A function, not a closure: closures do not inherit the caller's target features, and
/// `mul_add` without FMA is a library call.
#[inline(always)]
fn tap_pixel<const L: usize, const K: usize>(
    (g, x, dy, j0, oy, iy): (&ConvGeom, &[f32], &[f32], usize, usize, usize),
    ranges: &[(usize, usize); K],
    ox: usize,
    all: bool,
    acc: &mut [[f32; L]; K],
) {
    let b = g.b;
    let d = (oy * g.wo + ox) * b + j0;
    // SAFETY: oy < ho, ox < wo, j0 + L ≤ b: inside dy (asserted by `tap_row_lanes`).
    let ds = unsafe { &*dy.as_ptr().add(d).cast::<[f32; L]>() };
    for (kx, a) in acc.iter_mut().enumerate() {
        if all || (ranges[kx].0..ranges[kx].1).contains(&ox) {
            let xo = (iy * g.w + ox * g.stride + kx - g.pad) * b + j0;
            // SAFETY: tap kx is valid at (oy, ox): input pixel (iy, ox·s + kx − pad) is in
            // the map, so xo + L ≤ h·w·b ≤ x.len() (asserted by `tap_row_lanes`).
            let xs = unsafe { &*x.as_ptr().add(xo).cast::<[f32; L]>() };
            for l in 0..L {
                a[l] = ds[l].mul_add(xs[l], a[l]);
            }
        }
    }
}

/// Each tap's gradient of kernel row `ky` (`gk[ky·k ..]`), lane blocks summed in f64 in a
/// fixed order.
#[inline(always)]
fn tap_row<const K: usize>(g: &ConvGeom, xc: &[f32], dyc: &[f32], ky: usize, gk: &mut [f32]) {
    let mut total = [0f64; K];
    for (j0, l) in lane_blocks(g.b) {
        let part: [f32; K] = match l {
            16 => tap_row_lanes::<16, K>(g, xc, dyc, j0, ky),
            8 => tap_row_lanes::<8, K>(g, xc, dyc, j0, ky),
            4 => tap_row_lanes::<4, K>(g, xc, dyc, j0, ky),
            _ => tap_row_lanes::<1, K>(g, xc, dyc, j0, ky),
        };
        for (t, p) in total.iter_mut().zip(part) {
            *t += p as f64;
        }
    }
    for (kx, t) in total.iter().enumerate() {
        gk[ky * K + kx] = *t as f32;
    }
}

/// Small batches (< 8 images: too few lanes to vectorise over): each image's plane is copied
/// into a zero-padded scratch split into `S` (the stride) column phases, so that every tap
/// reads a contiguous run of the row.
/// The stride is a constant so that the phase split is shifts, not divisions (the copy with a
/// run-time `% s` and `/ s` per pixel took most of the kernel's time at batch 1).
#[inline(always)]
fn dw_fwd_rows<const S: usize>(
    g: &ConvGeom,
    xc: &[f32],
    wc: &[f32],
    yc: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let (b, pad) = (g.b, g.pad);
    let (hp, wp) = (g.h + 2 * pad, g.w + 2 * pad);
    let pw = wp.div_ceil(S) + DW_W;
    buf.clear();
    buf.resize(S * hp * pw, 0.0);
    for bi in 0..b {
        if bi > 0 {
            buf.fill(0.0);
        }
        pad_phases::<S>(g, xc, bi, (hp, pw), buf);
        let mut oy = 0;
        while oy < g.ho {
            let rows = (g.ho - oy).min(4);
            let at = (oy, bi);
            match rows {
                4 => dw_rows_block::<S, 4>(g, buf, (hp, pw), wc, at, yc),
                3 => dw_rows_block::<S, 3>(g, buf, (hp, pw), wc, at, yc),
                2 => dw_rows_block::<S, 2>(g, buf, (hp, pw), wc, at, yc),
                _ => dw_rows_block::<S, 1>(g, buf, (hp, pw), wc, at, yc),
            }
            oy += rows;
        }
    }
}

/// Output pixels per register row of [`dw_rows_block`]: one AVX-512 register (the rows are
/// 7 to 112 pixels; 8 per register took twice the loads and FMAs at 14 and 28 pixels).
const DW_W: usize = 16;

/// `R` output rows from `oy` of image `bi` for [`dw_fwd_rows`], [`DW_W`] pixels of each row
/// per register: the `R` rows' sums are independent chains (one chain per output would wait
/// on each FMA's latency), each still summed tap by tap in order.
#[inline(always)]
fn dw_rows_block<const S: usize, const R: usize>(
    g: &ConvGeom,
    buf: &[f32],
    (hp, pw): (usize, usize),
    wc: &[f32],
    (oy, bi): (usize, usize),
    yc: &mut [f32],
) {
    let (k, b) = (g.k, g.b);
    for ox0 in (0..g.wo).step_by(DW_W) {
        // The largest read below (last phase, row and tap) checked once: a check per load
        // and its index arithmetic outnumbered the FMAs (as in `corr_lanes`).
        let last = ((S - 1) * hp + (oy + R - 1) * S + k - 1) * pw + ox0 + (k - 1) / S + DW_W;
        assert!(
            last <= buf.len() && wc.len() >= k * k,
            "depthwise rows out of bounds"
        );
        let mut acc = [[0f32; DW_W]; R];
        for ky in 0..k {
            for kx in 0..k {
                let wv = wc[ky * k + kx];
                let base = (kx % S) * hp * pw + ox0 + kx / S;
                for (rr, a) in acc.iter_mut().enumerate() {
                    let o = base + ((oy + rr) * S + ky) * pw;
                    // SAFETY: o + DW_W ≤ last ≤ buf.len() (asserted above).
                    let src = unsafe { &*buf.as_ptr().add(o).cast::<[f32; DW_W]>() };
                    for l in 0..DW_W {
                        a[l] = wv.mul_add(src[l], a[l]);
                    }
                }
            }
        }
        let n = (g.wo - ox0).min(DW_W);
        for (rr, a) in acc.iter().enumerate() {
            // A copy: indexing the accumulators by the run-time `n` would keep them in memory.
            let a: [f32; DW_W] = *a;
            let p = (oy + rr) * g.wo + ox0;
            if b == 1 && n == DW_W {
                // A fixed-size copy: a run-time length is a `memcpy` call per row block.
                yc[p..p + DW_W].copy_from_slice(&a);
            } else {
                for (l, &v) in a[..n].iter().enumerate() {
                    yc[(p + l) * b + bi] = v;
                }
            }
        }
    }
}

/// Image `bi`'s plane of one channel (`xc (h, w, b)`) into `p`, zeroed by the caller:
/// `stride` column phases of `(hp, pw)` with `pad` rows and columns of border; input column
/// `ix` lands in phase `(ix + pad) % s` at column `(ix + pad) / s`, so that a strided tap
/// reads a contiguous run of its phase row (the small-batch depthwise and stem kernels).
/// `S` is the stride (`g.stride`), a constant so that the per-row phase arithmetic is shifts.
#[inline(always)]
pub fn pad_phases<const S: usize>(
    g: &ConvGeom,
    xc: &[f32],
    bi: usize,
    (hp, pw): (usize, usize),
    p: &mut [f32],
) {
    let (s, pad) = (S, g.pad);
    for iy in 0..g.h {
        let src = &xc[iy * g.w * g.b..(iy + 1) * g.w * g.b];
        for ph in 0..s {
            // The first column of phase `ph`, then one phase column per `s` input columns (a
            // `%` and a `/` per pixel took most of these kernels' time at batch 1).
            let ix0 = (ph + s - pad % s) % s;
            let at = (ph * hp + iy + pad) * pw + (ix0 + pad) / s;
            let row = &mut p[at..at + g.w.saturating_sub(ix0).div_ceil(s)];
            if g.b == 1 {
                // One image: the row's every s-th value from ix0, as fixed-size chunks (a
                // strided load that vectorises; `chunks(s)` copied one value per iteration,
                // ~1/5 of a batch-1 depthwise conv, and the general loop below also checked
                // bounds per value).
                let (whole, rest) = src[ix0..].as_chunks::<S>();
                for (d, v) in row.iter_mut().zip(whole) {
                    *d = v[0];
                }
                if let (Some(d), Some(&v)) = (row.get_mut(whole.len()), rest.first()) {
                    *d = v;
                }
                continue;
            }
            for (d, ix) in row.iter_mut().zip((ix0..g.w).step_by(s)) {
                *d = src[ix * g.b + bi];
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch of the small-batch depthwise forward (one padded plane).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

multiversion! {
    /// One channel of the depthwise forward: `yc (Ho, Wo, B)` from `xc (H, W, B)`.
    fn dw_fwd_channel(g: &ConvGeom, xc: &[f32], wc: &[f32], yc: &mut [f32]) {
        if g.b < 8 && g.stride <= 2 {
            // Taken out of the thread-local and put back: a closure would not inherit this
            // function's target features (its `mul_add` would become a libm call).
            let mut buf = SCRATCH.take();
            match g.stride {
                1 => dw_fwd_rows::<1>(g, xc, wc, yc, &mut buf),
                _ => dw_fwd_rows::<2>(g, xc, wc, yc, &mut buf),
            }
            SCRATCH.set(buf);
        } else if pad_plane_wins(g) {
            let mut buf = SCRATCH.take();
            let (hp, wp) = pad_plane(g, xc, &mut buf);
            corr(&buf, (hp, wp, g.b), wc, (g.k, g.stride, 0), (g.ho, g.wo), yc);
            SCRATCH.set(buf);
        } else {
            corr(xc, (g.h, g.w, g.b), wc, (g.k, g.stride, g.pad), (g.ho, g.wo), yc);
        }
    }
}

/// Whether [`corr`] is faster on a zero-bordered copy of the plane (every output then sums in
/// blocks of [`NB`]) than on the plane itself, where the outputs whose taps cross the left or
/// right edge are summed one at a time with a bounds check per load (a rough 3× the cost per
/// tap): at 14×14 and 7×7 with k = 5, 4 of every 14 and all 7 outputs of a row. The copy costs
/// a load and a store per padded pixel. Same values either way (the missing taps are zeros;
/// `kernels_tests` checks the bits).
fn pad_plane_wins(g: &ConvGeom) -> bool {
    let (ox_in, ox_out) = inside_cols((g.k, g.stride, g.pad), g.w, g.wo);
    let edge_cost = (g.wo - (ox_out - ox_in)) * g.ho * g.k * g.k * 3;
    let copy_cost = (g.h + 2 * g.pad) * (g.w + 2 * g.pad) * 2;
    // Stride 2 reads 4 input pixels per output: there the copy cost more than it saved
    // (measured per layer at 224 px, batch 16: 96→96 at 28→14 and 288→288 at 14→7 0.09 →
    // 0.12–0.19 ms with the copy; 576 channels at 7×7 0.22 → 0.16).
    g.stride == 1 && g.pad > 0 && g.wo >= NB && copy_cost < edge_cost
}

/// `xc (h, w, B)` into `buf` with `g.pad` zero rows and columns around it: `(hp, wp, B)`.
#[inline(always)]
fn pad_plane(g: &ConvGeom, xc: &[f32], buf: &mut Vec<f32>) -> (usize, usize) {
    let (p, b) = (g.pad, g.b);
    let (hp, wp) = (g.h + 2 * p, g.w + 2 * p);
    // Only the border is zeroed: the inside is overwritten.
    buf.resize(hp * wp * b, 0.0);
    buf[..p * wp * b].fill(0.0);
    buf[(p + g.h) * wp * b..].fill(0.0);
    for iy in 0..g.h {
        let at = (iy + p) * wp * b;
        let row = &mut buf[at..at + wp * b];
        row[..p * b].fill(0.0);
        row[p * b..(p + g.w) * b].copy_from_slice(&xc[iy * g.w * b..(iy + 1) * g.w * b]);
        row[(p + g.w) * b..].fill(0.0);
    }
    (hp, wp)
}

multiversion! {
    /// One channel of the depthwise input gradient: `dxc (H, W, B)` from `dyc (Ho, Wo, B)`.
    fn dw_bwd_input_channel(g: &ConvGeom, dyc: &[f32], wc: &[f32], dxc: &mut [f32]) {
        let k = g.k;
        if g.stride == 1 && 2 * g.pad + 1 == k {
            // Stride 1: a correlation of dy (padded by k − 1 − pad) with the flipped kernel.
            let mut flipped = [0f32; 64];
            let flipped = if k * k <= 64 {
                for t in 0..k * k {
                    flipped[t] = wc[k * k - 1 - t];
                }
                &flipped[..k * k]
            } else {
                unreachable!("depthwise kernels up to 7x7")
            };
            corr(dyc, (g.ho, g.wo, g.b), flipped, (k, 1, k - 1 - g.pad), (g.h, g.w), dxc);
            return;
        }
        for (j0, l) in lane_blocks(g.b) {
            match l {
                16 => bwd_in_lanes::<16>(g, dyc, j0, wc, dxc),
                8 => bwd_in_lanes::<8>(g, dyc, j0, wc, dxc),
                4 => bwd_in_lanes::<4>(g, dyc, j0, wc, dxc),
                _ => bwd_in_lanes::<1>(g, dyc, j0, wc, dxc),
            }
        }
    }
}

multiversion! {
    /// One channel of the depthwise kernel gradient: `gk (k·k)` (overwritten), lane blocks
    /// summed in f64 in a fixed order.
    fn dw_bwd_kernel_channel(g: &ConvGeom, xc: &[f32], dyc: &[f32], gk: &mut [f32]) {
        for ky in 0..g.k {
            match g.k {
                1 => tap_row::<1>(g, xc, dyc, ky, gk),
                2 => tap_row::<2>(g, xc, dyc, ky, gk),
                3 => tap_row::<3>(g, xc, dyc, ky, gk),
                4 => tap_row::<4>(g, xc, dyc, ky, gk),
                5 => tap_row::<5>(g, xc, dyc, ky, gk),
                6 => tap_row::<6>(g, xc, dyc, ky, gk),
                7 => tap_row::<7>(g, xc, dyc, ky, gk),
                _ => unreachable!("depthwise kernels up to 7x7"),
            }
        }
    }
}

/// Depthwise forward on CHWN: `y (C, Ho, Wo, B)`, each channel then through `ep`.
pub fn depthwise_fwd(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32], ep: Option<&Epilogue>) {
    let (hwb, pb, kk) = (g.h * g.w * g.b, g.ho * g.wo * g.b, g.k * g.k);
    if pb == 0 {
        return;
    }
    y.par_chunks_mut(pb)
        .with_min_len(grain(pb * kk))
        .enumerate()
        .for_each(|(c, yc)| {
            dw_fwd_channel(g, &x[c * hwb..(c + 1) * hwb], &w[c * kk..(c + 1) * kk], yc);
            if let Some(e) = ep {
                e.apply(c, yc);
            }
        });
}

/// Depthwise input gradient on CHWN: `dx (C, H, W, B)` (overwritten).
pub fn depthwise_bwd_input(g: &ConvGeom, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (hwb, pb, kk) = (g.h * g.w * g.b, g.ho * g.wo * g.b, g.k * g.k);
    if hwb == 0 {
        return;
    }
    dx.par_chunks_mut(hwb)
        .with_min_len(grain(hwb * kk))
        .enumerate()
        .for_each(|(c, dxc)| {
            dw_bwd_input_channel(g, &dy[c * pb..(c + 1) * pb], &w[c * kk..(c + 1) * kk], dxc)
        });
}

/// Depthwise kernel gradient on CHWN: `dw (C, 1, k, k)` (overwritten).
pub fn depthwise_bwd_kernel(g: &ConvGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (hwb, pb, kk) = (g.h * g.w * g.b, g.ho * g.wo * g.b, g.k * g.k);
    if kk == 0 {
        return;
    }
    dw.par_chunks_mut(kk)
        .with_min_len(grain(pb * kk))
        .enumerate()
        .for_each(|(c, gk)| {
            dw_bwd_kernel_channel(g, &x[c * hwb..(c + 1) * hwb], &dy[c * pb..(c + 1) * pb], gk)
        });
}

// ---------------------------------------------------------------------------------------------
// Per-channel rows: biases, BatchNorm (+ activation), activations, adds.

multiversion! {
    fn add_scalar(row: &mut [f32], v: f32) {
        for x in row {
            *x += v;
        }
    }
}

/// `y[c, :] += bias[c]` for rows of length `n`.
pub fn add_bias(y: &mut [f32], bias: &[f32], n: usize) {
    if n == 0 {
        return;
    }
    y.par_chunks_mut(n)
        .zip(bias.par_iter())
        .with_min_len(grain(n))
        .for_each(|(row, &b)| add_scalar(row, b));
}

/// `out[c] = Σ rows[c, :]` for rows of length `n`.
pub fn row_sums(rows: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        out.fill(0.0);
        return;
    }
    out.par_iter_mut()
        .zip(rows.par_chunks(n))
        .with_min_len(grain(n))
        .for_each(|(o, r)| *o = sum(r) as f32);
}

/// Per-channel `(scale, shift, 1/σ)` of a BatchNorm with statistics `mean`, `var`.
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
        .with_min_len(grain(2 * n))
        .for_each(|((m, v), row)| {
            let mu = (sum(row) / n as f64) as f32;
            *m = mu;
            *v = (sum_sq_dev(row, mu) / n as f64) as f32;
        });
}

multiversion! {
    /// `o = act(x·s + t)` (or in place when `x` is `None`).
    fn affine_act_row(o: &mut [f32], x: Option<&[f32]>, s: f32, t: f32, act: Act) {
        macro_rules! go {
            ($f:expr) => {
                match x {
                    Some(x) => o.iter_mut().zip(x).for_each(|(o, &v)| *o = $f(v.mul_add(s, t))),
                    None => o.iter_mut().for_each(|o| *o = $f(o.mul_add(s, t))),
                }
            };
        }
        match act {
            Act::None => go!(|u: f32| u),
            Act::Relu => go!(|u: f32| u.max(0.0)),
            Act::HardSwish => go!(|u: f32| u * ((u + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0))),
            Act::HardSigmoid => go!(|u: f32| (u + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0)),
        }
    }
}

/// An evaluation BatchNorm + activation applied by the convolution that feeds it, to each
/// block of its output while the block is still in cache (one pass over memory fewer; the
/// values are those of the separate pass: the same `affine_act_row` on the same inputs).
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub act: Act,
}

impl Epilogue<'_> {
    /// `row = act(row·scale[c] + shift[c])` for values of channel `c`.
    #[inline]
    pub fn apply(&self, c: usize, row: &mut [f32]) {
        affine_act_row(row, None, self.scale[c], self.shift[c], self.act);
    }

    /// The whole output `y (C, n)` in one pass (the convolution paths that apply no blocks).
    pub fn apply_all(&self, y: &mut [f32], n: usize) {
        affine_act_inplace(y, n, self.scale, self.shift, self.act);
    }
}

/// `y = act(z·scale[c] + shift[c])` per row of length `n`.
pub fn affine_act(z: &[f32], n: usize, scale: &[f32], shift: &[f32], act: Act, y: &mut [f32]) {
    if n == 0 {
        return;
    }
    y.par_chunks_mut(n)
        .zip(z.par_chunks(n))
        .with_min_len(grain(n))
        .enumerate()
        .for_each(|(c, (o, row))| affine_act_row(o, Some(row), scale[c], shift[c], act));
}

/// In place: `y = act(y·scale[c] + shift[c])`.
pub fn affine_act_inplace(y: &mut [f32], n: usize, scale: &[f32], shift: &[f32], act: Act) {
    if n == 0 {
        return;
    }
    y.par_chunks_mut(n)
        .with_min_len(grain(n))
        .enumerate()
        .for_each(|(c, o)| affine_act_row(o, None, scale[c], shift[c], act));
}

/// `act'(u)` as a branch-free select (vectorises).
#[inline(always)]
fn dact(act: Act, u: f32) -> f32 {
    match act {
        Act::None => 1.0,
        Act::Relu => {
            if u > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Act::HardSwish => {
            let mid = u.mul_add(1.0 / 3.0, 0.5);
            let hi = if u >= 3.0 { 1.0 } else { mid };
            if u <= -3.0 {
                0.0
            } else {
                hi
            }
        }
        Act::HardSigmoid => {
            if u <= -3.0 || u >= 3.0 {
                0.0
            } else {
                1.0 / 6.0
            }
        }
    }
}

/// One channel of [`bn_act_bwd`] for a fixed activation: returns `(Σg, Σg·(z − μ))`,
/// rewrites `d` as dz (g = dy·act'(z·s + t)).
#[inline(always)]
fn bn_act_bwd_row_with<const ACT: u8>(
    d: &mut [f32],
    z: &[f32],
    p: (f32, f32, f32, f32),
    train: bool,
) -> (f64, f64) {
    let act = match ACT {
        0 => Act::None,
        1 => Act::Relu,
        2 => Act::HardSwish,
        _ => Act::HardSigmoid,
    };
    let (s, t, mu, inv) = p;
    let g = |dv: f32, x: f32| dv * dact(act, x.mul_add(s, t));
    let (mut t0, mut t1) = (0f64, 0f64);
    for (bd, bz) in d.chunks(1024).zip(z.chunks(1024)) {
        let mut a0 = [0f32; 16];
        let mut a1 = [0f32; 16];
        let mut id = bd.chunks_exact(16);
        let mut iz = bz.chunks_exact(16);
        for (cd, cz) in (&mut id).zip(&mut iz) {
            let cd: &[f32; 16] = cd.try_into().unwrap();
            let cz: &[f32; 16] = cz.try_into().unwrap();
            for i in 0..16 {
                let gv = g(cd[i], cz[i]);
                a0[i] += gv;
                a1[i] = gv.mul_add(cz[i] - mu, a1[i]);
            }
        }
        let (mut s0, mut s1) = (0f32, 0f32);
        for i in 0..16 {
            s0 += a0[i];
            s1 += a1[i];
        }
        for (&dv, &x) in id.remainder().iter().zip(iz.remainder()) {
            let gv = g(dv, x);
            s0 += gv;
            s1 = gv.mul_add(x - mu, s1);
        }
        t0 += s0 as f64;
        t1 += s1 as f64;
    }
    let m = d.len() as f64;
    if train {
        let k1 = (t0 / m) as f32;
        let k2 = (t1 / m) as f32 * inv * inv;
        for (dv, &x) in d.iter_mut().zip(z) {
            *dv = s * (g(*dv, x) - k1 - (x - mu) * k2);
        }
    } else {
        for (dv, &x) in d.iter_mut().zip(z) {
            *dv = s * g(*dv, x);
        }
    }
    (t0, t1)
}

multiversion! {
    /// One channel of [`bn_act_bwd`].
    fn bn_act_bwd_row(d: &mut [f32], z: &[f32], p: (f32, f32, f32, f32), act: Act, train: bool) -> (f64, f64) {
        match act {
            Act::None => bn_act_bwd_row_with::<0>(d, z, p, train),
            Act::Relu => bn_act_bwd_row_with::<1>(d, z, p, train),
            Act::HardSwish => bn_act_bwd_row_with::<2>(d, z, p, train),
            Act::HardSigmoid => bn_act_bwd_row_with::<3>(d, z, p, train),
        }
    }
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
    dy.par_chunks_mut(n)
        .zip(z.par_chunks(n))
        .zip(dgamma.par_iter_mut().zip(dbeta.par_iter_mut()))
        .with_min_len(grain(3 * n))
        .enumerate()
        .for_each(|(ch, ((d, row), (dg, db)))| {
            let p = (scale[ch], shift[ch], mean[ch], invstd[ch]);
            let (sg, sgz) = bn_act_bwd_row(d, row, p, act, train);
            *db = sg as f32;
            *dg = (sgz * invstd[ch] as f64) as f32;
        });
    (dgamma, dbeta)
}

#[inline(always)]
fn act_bwd_with<const ACT: u8>(d: &mut [f32], x: &[f32]) {
    let act = match ACT {
        0 => Act::None,
        1 => Act::Relu,
        2 => Act::HardSwish,
        _ => Act::HardSigmoid,
    };
    for (dv, &xv) in d.iter_mut().zip(x) {
        *dv *= dact(act, xv);
    }
}

multiversion! {
    fn act_bwd_chunk(d: &mut [f32], x: &[f32], act: Act) {
        match act {
            Act::None => act_bwd_with::<0>(d, x),
            Act::Relu => act_bwd_with::<1>(d, x),
            Act::HardSwish => act_bwd_with::<2>(d, x),
            Act::HardSigmoid => act_bwd_with::<3>(d, x),
        }
    }
}

/// In place `dy *= act'(x)`.
pub fn act_bwd(x: &[f32], dy: &mut [f32], act: Act) {
    dy.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(d, xs)| act_bwd_chunk(d, xs, act));
}

/// `y = act(x)`.
pub fn act_fwd(x: &[f32], y: &mut [f32], act: Act) {
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, xs)| affine_act_row(o, Some(xs), 1.0, 0.0, act));
}

/// `a += b`.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(x, y)| add_into(x, y));
}

multiversion! {
    fn add_chunk(o: &mut [f32], a: &[f32], b: &[f32]) {
        for ((ov, u), v) in o.iter_mut().zip(a).zip(b) {
            *ov = u + v;
        }
    }
}

/// `y = a + b`.
pub fn add(a: &[f32], b: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
        .for_each(|(o, (x, z))| add_chunk(o, x, z));
}

// ---------------------------------------------------------------------------------------------
// Nearest ×2 upsampling + add (FPN top-down path), CHWN.

/// `y = big + up2(small)`: per channel `small (h, w, B)`, `big`/`y` `(2h, 2w, B)`.
pub fn up2_add(small: &[f32], big: &[f32], (h, w, b): (usize, usize, usize), y: &mut [f32]) {
    let (sp, bpl) = (h * w * b, 4 * h * w * b);
    if sp == 0 {
        return;
    }
    y.par_chunks_mut(bpl)
        .with_min_len(grain(bpl))
        .enumerate()
        .for_each(|(c, o)| {
            let s = &small[c * sp..(c + 1) * sp];
            let bg = &big[c * bpl..(c + 1) * bpl];
            up2_add_channel(o, bg, s, (h, w, b));
        });
}

multiversion! {
    /// One channel of [`up2_add`]. One loop for every batch size: a call per pixel's lane
    /// (the former inner step) cost more than the add itself at batch 1.
    fn up2_add_channel(o: &mut [f32], bg: &[f32], s: &[f32], hwb: (usize, usize, usize)) {
        let (h, w, b) = hwb;
        for yy in 0..2 * h {
            let orow = &mut o[yy * 2 * w * b..(yy + 1) * 2 * w * b];
            let brow = &bg[yy * 2 * w * b..(yy + 1) * 2 * w * b];
            let srow = &s[(yy / 2) * w * b..(yy / 2 + 1) * w * b];
            if b == 1 {
                for (x, &v) in srow.iter().enumerate() {
                    orow[2 * x] = brow[2 * x] + v;
                    orow[2 * x + 1] = brow[2 * x + 1] + v;
                }
            } else {
                for ((op, bp), sp) in orow
                    .chunks_exact_mut(b)
                    .zip(brow.chunks_exact(b))
                    .zip(srow.chunks_exact(b).flat_map(|p| [p, p]))
                {
                    for ((ov, &u), &v) in op.iter_mut().zip(bp).zip(sp) {
                        *ov = u + v;
                    }
                }
            }
        }
    }
}

/// Gradient of [`up2_add`] with respect to `small`: 2×2 block sums of `dy`.
pub fn up2_bwd(dy: &[f32], (h, w, b): (usize, usize, usize), ds: &mut [f32]) {
    let (sp, bpl) = (h * w * b, 4 * h * w * b);
    if sp == 0 {
        return;
    }
    ds.par_chunks_mut(sp)
        .with_min_len(grain(bpl))
        .enumerate()
        .for_each(|(c, o)| {
            let d = &dy[c * bpl..(c + 1) * bpl];
            for y in 0..h {
                for x in 0..w {
                    let at = |yy: usize, xx: usize| ((yy * 2 * w) + xx) * b;
                    let (a, bb) = (at(2 * y, 2 * x), at(2 * y, 2 * x + 1));
                    let (cc, dd) = (at(2 * y + 1, 2 * x), at(2 * y + 1, 2 * x + 1));
                    let out = &mut o[(y * w + x) * b..(y * w + x + 1) * b];
                    for l in 0..b {
                        out[l] = (d[a + l] + d[bb + l]) + (d[cc + l] + d[dd + l]);
                    }
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Squeeze-excite: y = x · hsig(We·relu(Wr·mean(x) + br) + be), per (c, b), CHWN.

/// Saved forward values of one SE block; matrices are `(rows, B)`.
pub struct SeSaved {
    pub pooled: Vec<f32>,
    pub pre_r: Vec<f32>,
    pub hidden: Vec<f32>,
    pub pre_e: Vec<f32>,
    pub gate: Vec<f32>,
}

/// `out (m, B) = W (m, k) · v (k, B) + bias`.
fn small_mm(w: &[f32], bias: &[f32], v: &[f32], m: usize, k: usize, b: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * b];
    // SAFETY: row-major (m × k), (k × b), (m × b) buffers of exactly those sizes.
    unsafe {
        sgemm(
            m,
            b,
            k,
            out.as_mut_ptr(),
            b,
            false,
            w.as_ptr(),
            k,
            1,
            v.as_ptr(),
            b,
            1,
        )
    };
    for (row, &bv) in out.chunks_exact_mut(b.max(1)).zip(bias) {
        add_scalar(row, bv);
    }
    out
}

multiversion! {
    /// `o[p, l] = x[p, l] · gate[l]` over pixels of one channel.
    fn scale_lanes(o: &mut [f32], x: &[f32], gate: &[f32]) {
        let b = gate.len();
        if b == 1 {
            // One image: a plain scaled copy (the per-pixel chunks below do not vectorise).
            for (ov, &xv) in o.iter_mut().zip(x) {
                *ov = xv * gate[0];
            }
            return;
        }
        for (op, xp) in o.chunks_exact_mut(b).zip(x.chunks_exact(b)) {
            for ((ov, &xv), &gv) in op.iter_mut().zip(xp).zip(gate) {
                *ov = xv * gv;
            }
        }
    }
}

multiversion! {
    /// Per-lane `Σ_p x` over the pixels of one channel.
    fn lane_sum(x: &[f32], b: usize, out: &mut [f64]) {
        if b == 1 {
            out[0] = sum(x);
        } else {
            lane_sums(x, x, b, |v, _| v, out);
        }
    }
}

multiversion! {
    /// Per-lane `Σ_p d·x` over the pixels of one channel.
    fn lane_dot(d: &[f32], x: &[f32], b: usize, out: &mut [f64]) {
        lane_sums(d, x, b, |u, v| u * v, out);
    }
}

multiversion! {
    /// `d[p, l] = d[p, l] · gate[l] + add[l]` over pixels of one channel.
    fn scale_add_lanes(d: &mut [f32], gate: &[f32], add: &[f32]) {
        let b = gate.len();
        for dp in d.chunks_exact_mut(b) {
            for ((dv, &gv), &av) in dp.iter_mut().zip(gate).zip(add) {
                *dv = dv.mul_add(gv, av);
            }
        }
    }
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
    let plane = (hw * b).max(1);
    if b > 0 {
        pooled
            .par_chunks_mut(b)
            .zip(x.par_chunks(plane))
            .with_min_len(grain(plane))
            .for_each_init(Vec::new, |s, (p, xc)| {
                // One buffer per task, not an allocation per channel (576 at batch 1).
                s.resize(b, 0f64);
                lane_sum(xc, b, s);
                for (pv, &sv) in p.iter_mut().zip(s.iter()) {
                    *pv = (sv / hw.max(1) as f64) as f32;
                }
            });
    }
    let pre_r = small_mm(wr, br, &pooled, rd, c, b);
    let hidden: Vec<f32> = pre_r.iter().map(|&v| v.max(0.0)).collect();
    let pre_e = small_mm(we, be, &hidden, c, rd, b);
    let gate: Vec<f32> = pre_e.iter().map(|&v| Act::HardSigmoid.f(v)).collect();
    if hw > 0 && b > 0 {
        y.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .with_min_len(grain(plane))
            .enumerate()
            .for_each(|(ci, (o, xs))| scale_lanes(o, xs, &gate[ci * b..(ci + 1) * b]));
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
    let plane = (hw * b).max(1);
    // dgate[c,b] = Σ_pixels dy·x.
    let mut dpre_e = vec![0f32; c * b];
    if b > 0 {
        dpre_e
            .par_chunks_mut(b)
            .zip(dy.par_chunks(plane).zip(x.par_chunks(plane)))
            .with_min_len(grain(2 * plane))
            .enumerate()
            .for_each(|(ci, (dp, (g, xs)))| {
                let mut acc = vec![0f64; b];
                lane_dot(g, xs, b, &mut acc);
                for (l, (d, a)) in dp.iter_mut().zip(acc).enumerate() {
                    *d = a as f32 * Act::HardSigmoid.df(s.pre_e[ci * b + l]);
                }
            });
    }
    // Expand conv: dWe = dpre_e · hiddenᵀ, dbe = Σ_b dpre_e, dhidden = Weᵀ · dpre_e.
    let mut dwe = vec![0f32; c * rd];
    let mut dpre_r = vec![0f32; rd * b];
    let mut dwr = vec![0f32; rd * c];
    let mut dpooled = vec![0f32; c * b];
    // SAFETY (all four): row-major buffers of the sizes given; transposed operands are read
    // through their strides.
    unsafe {
        sgemm(
            c,
            rd,
            b,
            dwe.as_mut_ptr(),
            rd,
            false,
            dpre_e.as_ptr(),
            b,
            1,
            s.hidden.as_ptr(),
            1,
            b,
        );
        sgemm(
            rd,
            b,
            c,
            dpre_r.as_mut_ptr(),
            b,
            false,
            we.as_ptr(),
            1,
            rd,
            dpre_e.as_ptr(),
            b,
            1,
        );
    }
    let dbe: Vec<f32> = dpre_e
        .chunks_exact(b.max(1))
        .map(|r| r.iter().sum())
        .collect();
    for (d, &p) in dpre_r.iter_mut().zip(&s.pre_r) {
        if p <= 0.0 {
            *d = 0.0;
        }
    }
    // Reduce conv: dWr = dpre_r · pooledᵀ, dbr = Σ_b dpre_r, dpooled = Wrᵀ · dpre_r.
    unsafe {
        sgemm(
            rd,
            c,
            b,
            dwr.as_mut_ptr(),
            c,
            false,
            dpre_r.as_ptr(),
            b,
            1,
            s.pooled.as_ptr(),
            1,
            b,
        );
        sgemm(
            c,
            b,
            rd,
            dpooled.as_mut_ptr(),
            b,
            false,
            wr.as_ptr(),
            1,
            c,
            dpre_r.as_ptr(),
            b,
            1,
        );
    }
    let dbr: Vec<f32> = dpre_r
        .chunks_exact(b.max(1))
        .map(|r| r.iter().sum())
        .collect();
    let inv_hw = 1.0 / hw.max(1) as f32;
    for v in dpooled.iter_mut() {
        *v *= inv_hw;
    }
    if hw > 0 && b > 0 {
        dy.par_chunks_mut(plane)
            .with_min_len(grain(plane))
            .enumerate()
            .for_each(|(ci, d)| {
                scale_add_lanes(
                    d,
                    &s.gate[ci * b..(ci + 1) * b],
                    &dpooled[ci * b..(ci + 1) * b],
                )
            });
    }
    (dwr, dbr, dwe, dbe)
}
