//! Winograd convolution for the dense 3×3 stride-1 convolutions (the FPN's output conv and
//! the head's first conv, padding 1): forward, input gradient and weight gradient.
//!
//! Why: those two convolutions run at stride 8 with 128 channels in and out and carry about
//! 70 % of a forward's floating-point work (and of the backward's gemms). Winograd's minimal
//! filtering (Lavin & Gray 2016) transforms each input window (`V = Bᵀ d B`) and each kernel
//! (`U = G g Gᵀ`), multiplies them position by position — one gemm over the channels per
//! transformed position `ξ`, `M_ξ = U_ξ · V_ξ` — and maps the products back to an output
//! tile (`Y = Aᵀ M A`); the transforms replace im2col's 9× copy of the input.
//! - **Forward: F(4×4, 3×3)** (points 0, ±1, ±2, ∞): a 6×6 window gives a 4×4 tile with 36
//!   products per channel pair instead of 144, 4× fewer multiplications, and 2.25 transformed
//!   floats per input float (F(2×2, 3×3), tried first, writes 4 and was slower: the
//!   transforms are bound by memory traffic).
//! - **Inference runs block by block** ([`forward_blocked`], 64 columns: 4 tiles of 16
//!   images): a block's input transform, 36 products and output transform on one thread, its
//!   `V` and `M` (1.2 MB each) in that core's cache instead of 14 MB each through memory and
//!   across cores; the products are the same gemm calls on fewer columns (the same bits).
//!   Training keeps the whole `V` for the weight gradient and runs in tile-row chunks.
//! - The input gradient is the same convolution of `dy` with the kernel flipped and its
//!   channels swapped (stride 1, padding 1), so it reuses the forward.
//! - **Weight gradient: F(3×3, 4×4)**: for each 4×4 tile of `dy`, the 3×3 correlation of
//!   the tile's 6×6 input window with the tile. By the transposition principle (the
//!   trilinear form `Σ_ξ (A y')_ξ (G g)_ξ (Bᵀ d)_ξ` of F(4, 3) read with `y'` as the filter),
//!   it is `Gᵀ[(A f) ⊙ (Bᵀ d)]`: the window takes the forward's own transform `Bᵀ d B` (the
//!   same V), the tile `A f Aᵀ`, one gemm per `ξ` (36) sums `Ŷ_ξ · V_ξᵀ` over every tile and
//!   image, and `dW = Gᵀ (·) G` maps each 6×6 sum to the kernel gradient. Against F(3×3,
//!   2×2) (16 positions on 2×2 tiles, tried first) it does 0.56× the gemm work and writes
//!   2.25 instead of 4 transformed floats per input float.
//!
//! The values differ from the im2col path by float rounding only (checked against f64
//! direct convolutions in the tests and against candle's ops in `tests/model_fused.rs`);
//! fixed chunking and summation order keep it deterministic. `ONEHEAD_WINOGRAD=0` turns it
//! off (the im2col path, for comparisons).
//!
//! Layout: values `(C, H, W, B)`; output tiles `ti, tj` of 4×4; a chunk of tile rows holds
//! `T = rows · tiles_per_row · B` columns, column `(tile · B + b)`; transformed inputs
//! `V (C, ξ, T)`, products `M (O, ξ, T)` (the weight gradient's transformed `dy`: `Ŷ (O, ξ,
//! T)`), kernels `U (ξ, O, C)`, with 36 positions `ξ`.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::kernels::{prefetch, prefetch_span, serial_gemms, sgemm, sgemm_strided, Ptr};
use super::pool;
use super::prof::{time, Kind};
use crate::ops::simd::multiversion;

/// Whether a dense 3×3 stride-1 convolution's backward over `b` images takes this path: not
/// with `ONEHEAD_WINOGRAD=0`, nor below 8 images, where most of each 16-image lane would be
/// empty and im2col is faster.
pub fn applies(b: usize) -> bool {
    b >= 8 && fast_dense_paths()
}

/// Whether the forward takes this path: as [`applies`], and at batch 1 too, where the
/// transforms' lanes run over 16 neighbouring tiles instead of 16 images (the batch-1
/// latency; the backward of a 1-image step stays on im2col).
pub fn applies_forward(b: usize) -> bool {
    (b >= 8 || b == 1) && fast_dense_paths()
}

/// Whether dense convolutions may leave the im2col path (this file's Winograd, the direct
/// stem in `direct.rs`). `ONEHEAD_WINOGRAD=0` keeps every dense convolution on im2col + gemm:
/// the arithmetic the README's strategy tables were computed with, for reproducing them bit
/// for bit.
pub fn fast_dense_paths() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ONEHEAD_WINOGRAD").map_or(true, |v| v != "0"))
}

/// A 3×3, stride-1, padding-1 convolution of `x (c, h, w, b)` to `o` channels.
#[derive(Debug, Clone, Copy)]
pub struct Geom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
}

impl Geom {
    /// 4×4 tiles.
    fn th4(&self) -> usize {
        self.h.div_ceil(4)
    }

    fn tw4(&self) -> usize {
        self.w.div_ceil(4)
    }

    /// Tile rows per chunk: at most ~4096 columns, and the larger of the chunk's transformed
    /// inputs and products at most 16 MiB (both stay in the last-level cache).
    fn chunk_rows4(&self) -> usize {
        let per_row = (self.tw4() * self.b).max(1);
        let by_cols = 4096usize.div_ceil(per_row);
        let by_bytes = ((16usize << 20) / (4 * 36 * self.c.max(self.o).max(1) * per_row)).max(1);
        by_cols.min(by_bytes).clamp(1, self.th4().max(1))
    }

    /// No pixel to convolve (the parallel loops split buffers in non-empty chunks).
    fn is_empty(&self) -> bool {
        self.b == 0 || self.h == 0 || self.w == 0
    }

    /// The same convolution with input and output channels swapped (the input gradient's).
    fn swapped(&self) -> Geom {
        Geom {
            c: self.o,
            o: self.c,
            ..*self
        }
    }
}

/// Minimum channels per rayon task (~16 K values of work each).
fn grain(per_item: usize) -> usize {
    (16384 / per_item.max(1)).max(1)
}

/// Weight gradient (written to `dw (o, c, 3, 3)`) and, if `want_dx`, the input gradient.
/// `v`: the forward's transformed input when it kept it ([`forward_keeping`]).
pub fn backward(
    g: &Geom,
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    want_dx: bool,
    v: Option<&[f32]>,
) -> Option<Vec<f32>> {
    if g.is_empty() {
        // No pixel: no tile, a zero kernel gradient, an empty input gradient.
        dw.fill(0.0);
        return want_dx.then(Vec::new);
    }
    weight_grad(g, x, dy, dw, v);
    want_dx.then(|| {
        // dx[c, h, w] = Σ_o Σ_(ky,kx) wt[o, c, 2 − ky, 2 − kx] · dy[o, h + ky − 1, w + kx − 1].
        let mut flipped = vec![0f32; wt.len()];
        for o in 0..g.o {
            for c in 0..g.c {
                for k in 0..9 {
                    flipped[(c * g.o + o) * 9 + k] = wt[(o * g.c + c) * 9 + 8 - k];
                }
            }
        }
        let mut dx = pool::take(g.c * g.h * g.w * g.b);
        forward(&g.swapped(), dy, &flipped, &mut dx);
        dx
    })
}

fn weight_grad(g: &Geom, x: &[f32], dy: &[f32], dw: &mut [f32], kept: Option<&[f32]>) {
    let (tw, nr) = (g.tw4(), g.chunk_rows4());
    let per_row = tw * g.b;
    // The forward's transformed input, when the map is one chunk (the same tiles, the same
    // function: the same values).
    let kept = kept.filter(|v| nr >= g.th4() && v.len() == g.c * 36 * g.th4() * per_row);
    let mut v = match kept {
        Some(_) => Vec::new(),
        None => pool::take(g.c * 36 * nr * per_row),
    };
    let mut ut = pool::take(g.o * 36 * nr * per_row);
    // Σ over tiles of Ŷ_ξ · V_ξᵀ: (36, o, c).
    let mut sums = pool::take(36 * g.o * g.c);
    let mut t0 = 0;
    while t0 < g.th4() {
        let t1 = (t0 + nr).min(g.th4());
        let n = (t1 - t0) * per_row;
        let ut = &mut ut[..g.o * 36 * n];
        let v: &[f32] = match kept {
            Some(k) => k,
            None => {
                let v = &mut v[..g.c * 36 * n];
                time(Kind::Winograd, 0, || {
                    tiles(g, x, (t0, t1), v, input_tiles4_channel)
                });
                v
            }
        };
        time(Kind::Winograd, 0, || {
            tiles(g, dy, (t0, t1), ut, grad_tiles4_channel)
        });
        let flops = (2 * 36 * g.o * g.c * n) as u64;
        let (sp, yp, vp) = (
            Ptr(sums.as_mut_ptr()),
            Ptr(ut.as_mut_ptr()),
            Ptr(v.as_ptr() as *mut f32),
        );
        // SAFETY: for each ξ, sums_ξ (o × c) [+]= Ŷ_ξ (o × n, row stride 36n) · V_ξᵀ
        // (n × c: V_ξ read column-major, column stride 36n); disjoint buffers of these sizes,
        // and each task writes only its own ξ's slab of sums.
        time(Kind::Gemm, flops, || {
            (0..36).into_par_iter().for_each(|xi| {
                let (sp, yp, vp) = (&sp, &yp, &vp);
                serial_gemms(|| unsafe {
                    sgemm_strided(
                        g.o,
                        g.c,
                        n,
                        sp.0.add(xi * g.o * g.c),
                        g.c,
                        1,
                        t0 > 0,
                        yp.0.add(xi * n),
                        36 * n,
                        1,
                        vp.0.add(xi * n),
                        1,
                        36 * n,
                    )
                })
            })
        });
        t0 = t1;
    }
    if kept.is_none() {
        pool::give(v);
    }
    pool::give(ut);
    time(Kind::Winograd, 0, || kernel_grad(g, &sums, dw));
    pool::give(sums);
}

/// `Gᵀ s` for a 6-vector: the forward's `G` transposed (the weight gradient's output
/// transform).
fn gt6(s: [f32; 6]) -> [f32; 3] {
    let (s12, d12, s34, d34) = (s[1] + s[2], s[1] - s[2], s[3] + s[4], s[3] - s[4]);
    [
        s[0] / 4.0 - s12 / 6.0 + s34 / 24.0,
        -d12 / 6.0 + d34 / 12.0,
        -s12 / 6.0 + s34 / 6.0 + s[5],
    ]
}

/// `dw (o, c, 3, 3) = Gᵀ S G` of each 6×6 sum.
fn kernel_grad(g: &Geom, sums: &[f32], dw: &mut [f32]) {
    let (o_n, c_n) = (g.o, g.c);
    for o in 0..o_n {
        for c in 0..c_n {
            let s = |p: usize, q: usize| sums[((p * 6 + q) * o_n + o) * c_n + c];
            let rows: [[f32; 3]; 6] =
                std::array::from_fn(|p| gt6(std::array::from_fn(|q| s(p, q))));
            for kx in 0..3 {
                let col = gt6(std::array::from_fn(|p| rows[p][kx]));
                for (ky, &val) in col.iter().enumerate() {
                    dw[(o * c_n + c) * 9 + ky * 3 + kx] = val;
                }
            }
        }
    }
}

/// Images per vector: the transforms work on `[f32; L]` lanes (images `l0 .. l0 + L` of one
/// tile), which the compiler turns into one AVX-512 (or two AVX2) registers per value.
const L: usize = 16;
type Lane = [f32; L];

/// `src[at .. at + nl]` into `dst` (the rest zero). A full lane is an array assignment (vector
/// moves); a partial one a call: with the two copies in one function the compiler merged
/// them into one `memcpy` call of `nl` values and a `memset` (5 % of a batch-16 conv).
#[inline(always)]
fn load(src: &[f32], at: usize, nl: usize, dst: &mut Lane) {
    if nl == L {
        *dst = src[at..at + L].try_into().expect("a full lane");
    } else {
        load_part(src, at, nl, dst)
    }
}

#[cold]
#[inline(never)]
fn load_part(src: &[f32], at: usize, nl: usize, dst: &mut Lane) {
    dst[..nl].copy_from_slice(&src[at..at + nl]);
    dst[nl..].fill(0.0);
}

/// `val[..nl]` into `dst[at ..]` (as [`load`]).
#[inline(always)]
fn store(dst: &mut [f32], at: usize, nl: usize, val: &Lane) {
    if nl == L {
        let d: &mut Lane = (&mut dst[at..at + L]).try_into().expect("a full lane");
        *d = *val;
    } else {
        store_part(dst, at, nl, val)
    }
}

#[cold]
#[inline(never)]
fn store_part(dst: &mut [f32], at: usize, nl: usize, val: &Lane) {
    dst[at..at + nl].copy_from_slice(&val[..nl]);
}

/// `val` (a lane, a half lane or less) into `dst[at ..]`, the whole and half lanes as array
/// assignments (see [`load`]).
#[inline(always)]
fn put_values(dst: &mut [f32], at: usize, val: &[f32]) {
    match val.len() {
        L => {
            let d: &mut Lane = (&mut dst[at..at + L]).try_into().expect("a lane");
            *d = val.try_into().expect("a lane");
        }
        H => {
            let d: &mut [f32; H] = (&mut dst[at..at + H]).try_into().expect("a half lane");
            *d = val.try_into().expect("a half lane");
        }
        n => put_part(dst, at, val, n),
    }
}

#[cold]
#[inline(never)]
fn put_part(dst: &mut [f32], at: usize, val: &[f32], n: usize) {
    dst[at..at + n].copy_from_slice(val);
}

/// Lanes `l0 .. l0 + nl` of a `k×k` window of the map `xc (h, w, b)` into `d` (row-major),
/// window `(r, s)` being map pixel `(y0 + r − 1, x0 + s − 1)`, zero outside the map.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gather(
    xc: &[f32],
    (h, w, b): (usize, usize, usize),
    k: usize,
    y0: usize,
    x0: usize,
    l0: usize,
    nl: usize,
    d: &mut [Lane],
) {
    for r in 0..k {
        for s in 0..k {
            let (y, x) = (y0 + r, x0 + s);
            if (1..=h).contains(&y) && (1..=w).contains(&x) {
                load(xc, ((y - 1) * w + x - 1) * b + l0, nl, &mut d[r * k + s]);
            } else {
                d[r * k + s] = [0.0; L];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The forward, F(4×4, 3×3): 6×6 windows (rows `4ti − 1 ..`), 36 positions, 4×4 output tiles,
// Lavin & Gray's matrices.

/// `y (o, h, w, b) = conv3×3(x, wt)` for `wt (o, c, 3, 3)` (no bias), by F(4×4, 3×3).
pub fn forward(g: &Geom, x: &[f32], wt: &[f32], y: &mut [f32]) {
    if let Some(v) = forward_impl(g, x, wt, y, false) {
        pool::give(v);
    }
}

/// [`forward`], and the transformed input `V` for [`backward`] when the map is one chunk of
/// 8 images or more (what the weight gradient would compute again: one of its two
/// transforms; 14 MB for a 128-channel 28 × 28 map of 16 images).
pub fn forward_keeping(g: &Geom, x: &[f32], wt: &[f32], y: &mut [f32]) -> Option<Vec<f32>> {
    forward_impl(g, x, wt, y, g.b >= 8 && g.chunk_rows4() >= g.th4())
}

fn forward_impl(g: &Geom, x: &[f32], wt: &[f32], y: &mut [f32], keep: bool) -> Option<Vec<f32>> {
    if g.is_empty() {
        return None;
    }
    let u = cached_kernel_tiles4(g, wt);
    if !keep && g.b >= 8 {
        forward_blocked(g, x, &u, y);
        return None;
    }
    let (tw, nr) = (g.tw4(), g.chunk_rows4());
    let per_row = tw * g.b;
    let mut v = pool::take(g.c * 36 * nr * per_row);
    let mut m = pool::take(g.o * 36 * nr * per_row);
    let mut t0 = 0;
    while t0 < g.th4() {
        let t1 = (t0 + nr).min(g.th4());
        let n = (t1 - t0) * per_row;
        let (v, m) = (&mut v[..g.c * 36 * n], &mut m[..g.o * 36 * n]);
        let plane = g.h * g.w * g.b;
        // One image: the lanes run over tiles (see `input_tiles4_b1_channel`).
        let (input_t, output_t): (ChannelTiles, ChannelTiles) = if g.b == 1 {
            (input_tiles4_b1_channel, output_tiles4_b1_channel)
        } else {
            (input_tiles4_channel, output_tiles4_channel)
        };
        time(Kind::Winograd, 0, || tiles(g, x, (t0, t1), v, input_t));
        let flops = (2 * 36 * g.o * g.c * n) as u64;
        let (mp, up, vp) = (
            Ptr(m.as_mut_ptr()),
            Ptr(u.as_ptr() as *mut f32),
            Ptr(v.as_mut_ptr()),
        );
        // The 36 products are independent: one per thread task, each single-threaded.
        // SAFETY: for each ξ, M_ξ (o × n, row stride 36n) = U_ξ (o × c) · V_ξ (c × n, row
        // stride 36n); the three buffers hold these sizes and are disjoint, and each task
        // writes only its own ξ's columns of M.
        time(Kind::Gemm, flops, || {
            (0..36).into_par_iter().for_each(|xi| {
                let (mp, up, vp) = (&mp, &up, &vp);
                serial_gemms(|| unsafe {
                    sgemm(
                        g.o,
                        n,
                        g.c,
                        mp.0.add(xi * n),
                        36 * n,
                        false,
                        up.0.add(xi * g.o * g.c),
                        g.c,
                        1,
                        vp.0.add(xi * n),
                        36 * n,
                        1,
                    )
                })
            })
        });
        time(Kind::Winograd, 0, || {
            y.par_chunks_mut(plane)
                .with_min_len(grain(36 * n))
                .enumerate()
                .for_each(|(o, yo)| {
                    output_t(&m[o * 36 * n..(o + 1) * 36 * n], g.h, g.w, g.b, t0, t1, yo)
                })
        });
        t0 = t1;
    }
    pool::give(m);
    if keep {
        Some(v)
    } else {
        pool::give(v);
        None
    }
}

/// Ask for the pixels of tiles `a..z`'s windows in one channel's map at `xc` (rows and columns
/// `4t − back ..`, `span` of each): the next channel's, while this one is transformed (the
/// windows of a block are short runs in 128 maps, which the hardware prefetchers miss).
fn prefetch_tiles(
    g: &Geom,
    xc: *const f32,
    (a, z): (usize, usize),
    back: usize,
    span: usize,
    write: bool,
) {
    let tw = g.tw4();
    let (ti0, ti1) = (a / tw, (z - 1) / tw);
    for ti in ti0..=ti1 {
        let tj0 = if ti == ti0 { a % tw } else { 0 };
        let tj1 = if ti == ti1 { (z - 1) % tw } else { tw - 1 };
        let x0 = (4 * tj0).saturating_sub(back);
        let x1 = (4 * tj1 + span - back).min(g.w);
        for y in (4 * ti).saturating_sub(back)..(4 * ti + span - back).min(g.h) {
            prefetch_span(
                xc.wrapping_add((y * g.w + x0) * g.b),
                (x1 - x0) * g.b,
                write,
            );
        }
    }
}

/// Columns (tiles × images) per block of [`forward_blocked`].
const BLOCK_COLS: usize = 64;

thread_local! {
    /// Per-thread scratch of [`forward_blocked`]: a block's `V` and `M`.
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`forward`] block by block of ~[`BLOCK_COLS`] columns: each block's input transform, 36
/// products and output transform on one thread, its `V` and `M` in that core's cache. At
/// batch 16, 224 px: 4.2–4.6 → 3.0 ms per conv alone (`examples/profile_winograd.rs`), the
/// whole forward −6 % (products on 64 columns run at ~238 GFLOP/s a thread against ~180 on
/// the whole map's 784; 32 columns: 227, 16: 123).
fn forward_blocked(g: &Geom, x: &[f32], u: &[f32], y: &mut [f32]) {
    let tiles = g.th4() * g.tw4();
    let threads = rayon::current_num_threads().max(1);
    let per_block = (BLOCK_COLS / g.b).max(1);
    // Whole pairs of tiles for 8 images (two to a lane: `window_tiles_paired`).
    let step = if g.b == H { 2 } else { 1 };
    let units = tiles.div_ceil(step);
    // A multiple of the threads (13 blocks of 4 tiles on 2 threads left one waiting for the
    // last: 16.5 against 15.9 ms per batch-16 forward), sizes within one unit of each other.
    let blocks = (tiles.div_ceil(per_block).div_ceil(threads) * threads).min(units);
    let plane = g.h * g.w * g.b;
    let (yp, up) = (Ptr(y.as_mut_ptr()), Ptr(u.as_ptr() as *mut f32));
    (0..blocks).into_par_iter().for_each(|k| {
        let (yp, up) = (&yp, &up);
        let (a, z) = (
            k * units / blocks * step,
            ((k + 1) * units / blocks * step).min(tiles),
        );
        let n = (z - a) * g.b;
        let mut buf = BLOCK.take();
        if buf.len() < (g.c + g.o) * 36 * n {
            buf.resize((g.c + g.o) * 36 * n, 0.0);
        }
        let (v, m) = buf.split_at_mut(g.c * 36 * n);
        for (c, vc) in v.chunks_exact_mut(36 * n).enumerate() {
            if c + 1 < g.c {
                prefetch_tiles(g, x[(c + 1) * plane..].as_ptr(), (a, z), 1, 6, false);
            }
            input_tiles4_range(&x[c * plane..(c + 1) * plane], g.h, g.w, g.b, a, z, vc);
        }
        let (mp, vp) = (m.as_mut_ptr(), v.as_ptr());
        for xi in 0..36 {
            // SAFETY: M_ξ (o × n, row stride 36n) = U_ξ (o × c) · V_ξ (c × n, row stride 36n),
            // inside m (o · 36n), u (36 · o · c) and v (c · 36n).
            serial_gemms(|| unsafe {
                sgemm(
                    g.o,
                    n,
                    g.c,
                    mp.add(xi * n),
                    36 * n,
                    false,
                    up.0.add(xi * g.o * g.c),
                    g.c,
                    1,
                    vp.add(xi * n),
                    36 * n,
                    1,
                )
            })
        }
        for (o, mo) in m[..g.o * 36 * n].chunks_exact(36 * n).enumerate() {
            if o + 1 < g.o {
                prefetch_tiles(g, yp.0.wrapping_add((o + 1) * plane), (a, z), 0, 4, true);
            }
            // SAFETY: tiles a..z of plane o of y (o · plane values): blocks hold disjoint
            // tiles, so no other task writes these pixels.
            unsafe { output_tiles4_range(mo, g.h, g.w, g.b, a, z, yp.0.add(o * plane)) }
        }
        BLOCK.set(buf);
    });
}

multiversion! {
    /// `V (c, 36, n)` of one channel of `x` (as [`input_tiles4_channel`]): tiles `a..z`.
    fn input_tiles4_range(xc: &[f32], h: usize, w: usize, b: usize, a: usize, z: usize, vc: &mut [f32]) {
        window_tiles::<6>(xc, (h, w, b), (a, z), 0, bt6, vc)
    }
}

multiversion! {
    /// [`output_tiles4_channel`] of tiles `a..z` into the map at `yo`.
    ///
    /// # Safety
    /// `yo` points to an `(h, w, b)` map that no one else reads or writes at those tiles'
    /// pixels during the call.
    unsafe fn output_tiles4_range(mo: &[f32], h: usize, w: usize, b: usize, a: usize, z: usize, yo: *mut f32) {
        output_tiles(mo, (h, w, b), (a, z), |at, val| {
            debug_assert!(at + val.len() <= h * w * b);
            // SAFETY: `at + val.len()` is inside the map (a pixel of tile a..z); the caller's
            // contract.
            unsafe {
                match val.len() {
                    L => yo.add(at).cast::<Lane>().write_unaligned(val.try_into().expect("a lane")),
                    H => yo.add(at).cast::<[f32; H]>().write_unaligned(val.try_into().expect("a half lane")),
                    n => std::ptr::copy_nonoverlapping(val.as_ptr(), yo.add(at), n),
                }
            }
        })
    }
}

/// A kernel transform and the kernels it came from (`o`, `c`, `wt`).
type CachedU = ((usize, usize, Vec<f32>), Arc<Vec<f32>>);

/// The last few kernel transforms: an inference transforms the same kernels for every batch
/// (~0.1–0.2 ms per convolution and call, 2–3 % of a batch-1 forward). Kernels are compared
/// bit for bit, so a hit is exactly what [`kernel_tiles4`] would return; in training
/// the kernels change every step and each call misses (a compare that stops at the first
/// difference and a copy of the kernels).
static U_CACHE: Mutex<Vec<CachedU>> = Mutex::new(Vec::new());
const U_CACHE_LEN: usize = 4;

fn cached_kernel_tiles4(g: &Geom, wt: &[f32]) -> Arc<Vec<f32>> {
    let key = |k: &(usize, usize, Vec<f32>)| k.0 == g.o && k.1 == g.c && same_bits(&k.2, wt);
    let mut cache = U_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = cache.iter().position(|(k, _)| key(k)) {
        let hit = cache.remove(i);
        let u = hit.1.clone();
        cache.push(hit);
        return u;
    }
    drop(cache);
    let u = Arc::new(kernel_tiles4(g, wt));
    let mut cache = U_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= U_CACHE_LEN {
        let (_, old) = cache.remove(0);
        if let Ok(buf) = Arc::try_unwrap(old) {
            pool::give(buf);
        }
    }
    cache.push(((g.o, g.c, wt.to_vec()), u.clone()));
    u
}

/// Whether `a` and `b` hold the same bits: the cache's key. One `memcmp` over the bytes
/// (the element-wise float compare of 147 K kernel values took 45 µs per call, 7 % of a
/// batch-1 Winograd conv), and exact where `==` is not (−0 = +0, NaN ≠ NaN).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    // SAFETY: any f32 slice is also a valid byte slice of 4× its length (no padding,
    // alignment 1), borrowed for the same lifetime.
    let bytes =
        |v: &[f32]| unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), 4 * v.len()) };
    bytes(a) == bytes(b)
}

/// `G g` down a 3-vector: G = [[¼,0,0],[−⅙,−⅙,−⅙],[−⅙,⅙,−⅙],[1/24,1/12,⅙],[1/24,−1/12,⅙],[0,0,1]].
#[inline(always)]
fn g6(a: f32, b: f32, c: f32) -> [f32; 6] {
    [
        a / 4.0,
        -(a + b + c) / 6.0,
        -(a - b + c) / 6.0,
        a / 24.0 + b / 12.0 + c / 6.0,
        a / 24.0 - b / 12.0 + c / 6.0,
        c,
    ]
}

/// `U (36, o, c)`: each kernel as `G g Gᵀ`. Output channels in parallel, each with its input
/// channels as vectors (`g6`'s divisions, one kernel at a time, took ~1 ms per call at
/// 128 × 128: as much as a batch-1 convolution's gemms); every value is computed as before.
fn kernel_tiles4(g: &Geom, wt: &[f32]) -> Vec<f32> {
    let (o_n, c_n) = (g.o, g.c);
    let mut u = pool::take(36 * o_n * c_n);
    // wt9[j] (o, c): tap j of every kernel, so that an output channel's taps are runs over c.
    let mut wt9 = pool::take(9 * o_n * c_n);
    for (oc, k) in wt.chunks_exact(9).enumerate() {
        for (j, &v) in k.iter().enumerate() {
            wt9[j * o_n * c_n + oc] = v;
        }
    }
    let up = Ptr(u.as_mut_ptr());
    (0..o_n)
        .into_par_iter()
        .with_min_len(grain(36 * c_n))
        .for_each(|o| {
            let up = &up;
            let taps: [&[f32]; 9] =
                std::array::from_fn(|j| &wt9[(j * o_n + o) * c_n..(j * o_n + o + 1) * c_n]);
            // SAFETY: output channel o writes only the 36 runs u[(pq · o_n + o) · c_n ..][..c_n]:
            // disjoint across tasks, inside u (36 · o_n · c_n).
            let rows: [&mut [f32]; 36] = std::array::from_fn(|pq| unsafe {
                std::slice::from_raw_parts_mut(up.0.add((pq * o_n + o) * c_n), c_n)
            });
            kernel_tiles4_channel(taps, rows);
        });
    pool::give(wt9);
    u
}

multiversion! {
    /// One output channel of [`kernel_tiles4`]: `rows[p·6 + q][c]` from `taps[j][c]`.
    fn kernel_tiles4_channel(taps: [&[f32]; 9], rows: [&mut [f32]; 36]) {
        let c_n = taps[0].len();
        for c0 in (0..c_n).step_by(L) {
            let nl = (c_n - c0).min(L);
            let mut k = [[0f32; L]; 9];
            for (kj, t) in k.iter_mut().zip(&taps) {
                load(t, c0, nl, kj);
            }
            let cols: [[Lane; 6]; 3] = [0, 1, 2].map(|j| g6_lanes(&k[j], &k[3 + j], &k[6 + j]));
            for p in 0..6 {
                let row = g6_lanes(&cols[0][p], &cols[1][p], &cols[2][p]);
                for (q, val) in row.iter().enumerate() {
                    store(rows[p * 6 + q], c0, nl, val);
                }
            }
        }
    }
}

/// [`g6`] lane by lane.
#[inline(always)]
fn g6_lanes(a: &Lane, b: &Lane, c: &Lane) -> [Lane; 6] {
    let mut r = [[0f32; L]; 6];
    for i in 0..L {
        let v = g6(a[i], b[i], c[i]);
        for (q, rq) in r.iter_mut().enumerate() {
            rq[i] = v[q];
        }
    }
    r
}

/// `Bᵀ d` for the 6-point Bᵀ (rows [4,0,−5,0,1,0], [0,−4,−4,1,1,0], [0,4,−4,−1,1,0],
/// [0,−2,−1,2,1,0], [0,2,−1,−2,1,0], [0,4,0,−5,0,1]).
#[inline(always)]
fn bt6(d: [&Lane; 6]) -> [Lane; 6] {
    let mut r = [[0f32; L]; 6];
    for i in 0..L {
        let (d0, d1, d2, d3, d4, d5) = (d[0][i], d[1][i], d[2][i], d[3][i], d[4][i], d[5][i]);
        r[0][i] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][i] = -4.0 * (d1 + d2) + d3 + d4;
        r[2][i] = 4.0 * (d1 - d2) - d3 + d4;
        r[3][i] = 2.0 * (d3 - d1) - d2 + d4;
        r[4][i] = 2.0 * (d1 - d3) - d2 + d4;
        r[5][i] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

/// `Aᵀ m` for Aᵀ = [[1,1,1,1,1,0],[0,1,−1,2,−2,0],[0,1,1,4,4,0],[0,1,−1,8,−8,1]].
#[inline(always)]
fn at6(m: [&Lane; 6]) -> [Lane; 4] {
    let mut r = [[0f32; L]; 4];
    for i in 0..L {
        let (m0, m1, m2, m3, m4, m5) = (m[0][i], m[1][i], m[2][i], m[3][i], m[4][i], m[5][i]);
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        r[0][i] = m0 + s12 + s34;
        r[1][i] = d12 + 2.0 * d34;
        r[2][i] = s12 + 4.0 * s34;
        r[3][i] = d12 + 8.0 * d34 + m5;
    }
    r
}

/// The per-channel transform of [`tiles`]: `(map, h, w, b, t0, t1, out)`.
type ChannelTiles = fn(&[f32], usize, usize, usize, usize, usize, &mut [f32]);

/// `out (channels, 36, n)`: every channel of `src (channels, h, w, b)` in tile rows
/// `t0..t1`, transformed by `per_channel`, channels in parallel.
fn tiles(
    g: &Geom,
    src: &[f32],
    (t0, t1): (usize, usize),
    out: &mut [f32],
    per_channel: ChannelTiles,
) {
    let n = (t1 - t0) * g.tw4() * g.b;
    let plane = g.h * g.w * g.b;
    out.par_chunks_mut(36 * n)
        .with_min_len(grain(36 * n))
        .enumerate()
        .for_each(|(c, oc)| {
            per_channel(&src[c * plane..(c + 1) * plane], g.h, g.w, g.b, t0, t1, oc)
        });
}

/// `T d Tᵀ` of a `K×K` window `d` (row-major) for the 1-D transform `t` (K values to 6): the
/// transform down the columns, then along the rows; `[p][q]` is position `p·6 + q`.
#[inline(always)]
fn window_transform<const K: usize>(
    d: &[Lane],
    t: &impl Fn([&Lane; K]) -> [Lane; 6],
    out: &mut [[Lane; 6]; 6],
) {
    let mut cols = [[[0f32; L]; 6]; K];
    for (s, c) in cols.iter_mut().enumerate() {
        *c = t(std::array::from_fn(|r| &d[r * K + s]));
    }
    // p indexes the second axis of every column: a transpose, not an iteration. Written in
    // place: a returned 2.3 KB array was copied by a `memcpy` call per window.
    for (p, op) in out.iter_mut().enumerate() {
        *op = t(std::array::from_fn(|s| &cols[s][p]));
    }
}

/// `Aᵀ M A` of a tile's 36 products `e` (row-major 6×6): `[j][i]` is output row `i`, column
/// `j` of the 4×4 tile.
#[inline(always)]
fn tile_outputs(e: &[Lane; 36]) -> [[Lane; 4]; 4] {
    let mut t = [[[0f32; L]; 4]; 6];
    for (p, tp) in t.iter_mut().enumerate() {
        let r = &e[p * 6..p * 6 + 6];
        *tp = at6([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
    // A loop, not `std::array::from_fn`: that was left out of line, compiled without the
    // caller's AVX-512 (4 % of a batch-16 Winograd conv).
    let mut out = [[[0f32; L]; 4]; 4];
    for (j, oj) in out.iter_mut().enumerate() {
        *oj = at6([&t[0][j], &t[1][j], &t[2][j], &t[3][j], &t[4][j], &t[5][j]]);
    }
    out
}

/// One channel's `K×K` windows at stride 4 (window `(r, s)` of tile `(ti, tj)` being map pixel
/// `(4ti + shift + r − 1, 4tj + shift + s − 1)`, zero outside the map), each as `T d Tᵀ` for
/// the 1-D transform `t` (K values to 6), into `out (36, n)`: tiles `a..z` in row-major order
/// (tile `ti · tw + tj`), column `(tile − a) · b + image`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn window_tiles<const K: usize>(
    src: &[f32],
    (h, w, b): (usize, usize, usize),
    (a, z): (usize, usize),
    shift: usize,
    t: impl Fn([&Lane; K]) -> [Lane; 6],
    out: &mut [f32],
) {
    if b == H {
        return window_tiles_paired::<K>(src, (h, w), (a, z), shift, t, out);
    }
    let tw = w.div_ceil(4);
    let n = (z - a) * b;
    let mut d = [[0f32; L]; 36];
    let mut tr = [[[0f32; L]; 6]; 6];
    for tile in a..z {
        let (ti, tj) = (tile / tw, tile % tw);
        let col = (tile - a) * b;
        // The next tile's 36 outputs, one per row of `out`: 36 write streams are more
        // than the hardware prefetchers follow, and each store missed its line (a first
        // transform of a 28 × 28 × 16 map took 1.2 ms, 0.9 with this, 0.45 on data in
        // cache).
        if col + b < n {
            for pq in 0..36 {
                prefetch(out, pq * n + col + b, b, true);
            }
        }
        for l0 in (0..b).step_by(L) {
            let nl = (b - l0).min(L);
            gather(
                src,
                (h, w, b),
                K,
                4 * ti + shift,
                4 * tj + shift,
                l0,
                nl,
                &mut d,
            );
            window_transform::<K>(&d, &t, &mut tr);
            for (pq, val) in tr.iter().flatten().enumerate() {
                store(out, pq * n + col + l0, nl, val);
            }
        }
    }
}

/// Images per half lane: a map of 8 images fills each lane with two tiles' 8 images.
const H: usize = L / 2;

/// [`window_tiles`] for 8 images: tiles `a, a + 1`, `a + 2, a + 3` … side by side in one lane
/// (columns `(tile − a) · 8 + image`, as for any batch), not one tile in a half-empty lane
/// (a forward of 8 images on one thread took 1.5× the time of half of 16's, most of it here).
/// Each value is computed as in a lane of its own.
#[inline(always)]
fn window_tiles_paired<const K: usize>(
    src: &[f32],
    (h, w): (usize, usize),
    (a, z): (usize, usize),
    shift: usize,
    t: impl Fn([&Lane; K]) -> [Lane; 6],
    out: &mut [f32],
) {
    let tw = w.div_ceil(4);
    let n = (z - a) * H;
    let mut d = [[0f32; L]; 36];
    let mut tr = [[[0f32; L]; 6]; 6];
    for tile in (a..z).step_by(2) {
        let pair = (z - tile).min(2);
        for half in 0..2 {
            let at = half * H;
            if half == pair {
                d.iter_mut().for_each(|v| v[at..].fill(0.0));
                continue;
            }
            let (ti, tj) = ((tile + half) / tw, (tile + half) % tw);
            let (y0, x0) = (4 * ti + shift, 4 * tj + shift);
            for r in 0..K {
                for c in 0..K {
                    let (y, x) = (y0 + r, x0 + c);
                    let dst: &mut [f32; H] = (&mut d[r * K + c][at..at + H])
                        .try_into()
                        .expect("a half lane");
                    if (1..=h).contains(&y) && (1..=w).contains(&x) {
                        let p = ((y - 1) * w + x - 1) * H;
                        *dst = src[p..p + H].try_into().expect("a half lane");
                    } else {
                        *dst = [0.0; H];
                    }
                }
            }
        }
        window_transform::<K>(&d, &t, &mut tr);
        let col = (tile - a) * H;
        for (pq, val) in tr.iter().flatten().enumerate() {
            store(out, pq * n + col, pair * H, val);
        }
    }
}

multiversion! {
    /// `V (c, 36, n)` of one channel of `x`: each 6×6 window (rows `4ti − 1 ..`) as `Bᵀ d B`.
    fn input_tiles4_channel(xc: &[f32], h: usize, w: usize, b: usize, t0: usize, t1: usize, vc: &mut [f32]) {
        let tw = w.div_ceil(4);
        window_tiles::<6>(xc, (h, w, b), (t0 * tw, t1 * tw), 0, bt6, vc)
    }
}

thread_local! {
    /// Per-thread scratch of the batch-1 input transform: one channel's zero-bordered rows.
    static PLANE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tiles per group of the batch-1 transforms: the 6-wide windows of 7 neighbouring tiles span
/// 30 columns, inside the 32 that two vectors hold.
const GT: usize = 7;

/// Lanes `l < GT` of `[lo, hi]` at positions `4l + s`: window column `s` of the group's 7 tiles
/// (a constant shuffle of two vectors).
#[inline(always)]
fn every_4th(lo: &Lane, hi: &Lane, s: usize) -> Lane {
    std::array::from_fn(|l| {
        let at = 4 * l + s;
        if l >= GT {
            0.0
        } else if at < L {
            lo[at]
        } else {
            hi[at - L]
        }
    })
}

/// `dst = src[..dst.len()]` for a group's run of at most [`GT`] values: a fixed-size copy for a
/// whole group (a `memcpy` call per run of 7 values cost more than the transform's arithmetic).
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    if dst.len() == GT {
        let d: &mut [f32; GT] = dst.try_into().expect("a group");
        *d = src[..GT].try_into().expect("a group");
    } else {
        let n = dst.len();
        dst.copy_from_slice(&src[..n]);
    }
}

multiversion! {
    /// [`input_tiles4_channel`] for one image (`b` = 1), tile row by tile row in groups of 7
    /// tiles: the transform down the window's columns runs on whole rows of the chunk's
    /// zero-bordered plane (two vectors of 16 neighbouring columns: contiguous loads), the
    /// transform along its rows on each column of the 7 windows picked out of those (a
    /// shuffle), and each of the 36 results is a run of 7 consecutive columns of `V`. The
    /// same arithmetic in the same order as the batch ([`window_transform`]); the lanes
    /// gathered pixel by pixel before (36 scalar loads per tile) were most of its time.
    fn input_tiles4_b1_channel(xc: &[f32], h: usize, w: usize, _b: usize, t0: usize, t1: usize, vc: &mut [f32]) {
        let tw = w.div_ceil(4);
        let n = (t1 - t0) * tw;
        if n == 0 {
            return;
        }
        // Plane pixel (pr, pc) is map pixel (4·t0 − 1 + pr, pc − 1); every group reads 32
        // columns from its first window's.
        let last = (tw - 1) / GT * GT;
        let (rows, cols) = (4 * (t1 - t0) + 2, (4 * tw + 2).max(4 * last + 2 * L));
        let mut plane = PLANE.take();
        plane.clear();
        plane.resize(rows * cols, 0.0);
        for pr in 0..rows {
            let y = (4 * t0 + pr) as isize - 1;
            if (0..h as isize).contains(&y) {
                let y = y as usize;
                plane[pr * cols + 1..][..w].copy_from_slice(&xc[y * w..(y + 1) * w]);
            }
        }
        for tr in 0..t1 - t0 {
            for tj0 in (0..tw).step_by(GT) {
                let ng = (tw - tj0).min(GT);
                // The window rows' two vectors, transformed down the columns.
                let half = |k: usize| -> [Lane; 6] {
                    let rows: [&Lane; 6] = std::array::from_fn(|r| {
                        let at = (4 * tr + r) * cols + 4 * tj0 + k * L;
                        plane[at..at + L].try_into().expect("a full lane")
                    });
                    bt6(rows)
                };
                let (lo, hi) = (half(0), half(1));
                for p in 0..6 {
                    let d: [Lane; 6] = std::array::from_fn(|s| every_4th(&lo[p], &hi[p], s));
                    let v = bt6([&d[0], &d[1], &d[2], &d[3], &d[4], &d[5]]);
                    for (q, vq) in v.iter().enumerate() {
                        let at = (p * 6 + q) * n + tr * tw + tj0;
                        copy_run(&mut vc[at..at + ng], vq);
                    }
                }
            }
        }
        PLANE.set(plane);
    }
}

multiversion! {
    /// [`output_tiles4_channel`] for one image, tile row by tile row in groups of 7 tiles (as
    /// [`input_tiles4_b1_channel`]): each of the 36 products a run of 7 consecutive tiles, the
    /// 4×4 outputs of the 7 tiles interleaved into 28 consecutive columns of a row (a
    /// shuffle) instead of scattered value by value.
    fn output_tiles4_b1_channel(mo: &[f32], h: usize, w: usize, _b: usize, t0: usize, t1: usize, yo: &mut [f32]) {
        let tw = w.div_ceil(4);
        let n = (t1 - t0) * tw;
        if n == 0 {
            return;
        }
        // The chunk's whole tiles (plane pixel (pr, pc) is map pixel (4·t0 + pr, pc)), rows
        // long enough for the last group's 28-column write; the map's part is copied out at
        // the end.
        let cols = 4 * ((tw - 1) / GT * GT + GT);
        let mut plane = PLANE.take();
        // Every value copied out is written below: no zeroing.
        if plane.len() < 4 * (t1 - t0) * cols {
            plane.resize(4 * (t1 - t0) * cols, 0.0);
        }
        let mut e = [[0f32; L]; 36];
        for tr in 0..t1 - t0 {
            for tj0 in (0..tw).step_by(GT) {
                let ng = (tw - tj0).min(GT);
                // Lanes past `ng` keep stale values: their outputs are never stored.
                for (k, ek) in e.iter_mut().enumerate() {
                    let at = k * n + tr * tw + tj0;
                    copy_run(&mut ek[..ng], &mo[at..at + ng]);
                }
                // out[j][i]: output row i, column j of the group's tiles.
                let out = tile_outputs(&e);
                let by_row: [[&Lane; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| &out[j][i]));
                for (i, js) in by_row.iter().enumerate() {
                    // Columns 4l + j of the group's row i; past 4·ng: the next group's
                    // columns (written after) or the row's padding.
                    let at = (4 * tr + i) * cols + 4 * tj0;
                    let row: &mut [f32; 4 * GT] =
                        (&mut plane[at..at + 4 * GT]).try_into().expect("a group's columns");
                    for l in 0..GT {
                        for (j, v) in js.iter().enumerate() {
                            row[4 * l + j] = v[l];
                        }
                    }
                }
            }
        }
        for (y, row) in (4 * t0..h.min(4 * t1)).zip(plane.chunks_exact(cols)) {
            yo[y * w..(y + 1) * w].copy_from_slice(&row[..w]);
        }
        PLANE.set(plane);
    }
}

/// `A f` for a 4-vector, A = Aᵀ's transpose: rows [1,0,0,0], [1,1,1,1], [1,−1,1,−1],
/// [1,2,4,8], [1,−2,4,−8], [0,0,0,1] (the weight gradient's transform of `dy`'s tiles).
#[inline(always)]
fn a6(f: [&Lane; 4]) -> [Lane; 6] {
    let mut r = [[0f32; L]; 6];
    for i in 0..L {
        let (f0, f1, f2, f3) = (f[0][i], f[1][i], f[2][i], f[3][i]);
        let (e, o) = (f0 + f2, f1 + f3);
        let (e4, o2) = (f0 + 4.0 * f2, 2.0 * f1 + 8.0 * f3);
        r[0][i] = f0;
        r[1][i] = e + o;
        r[2][i] = e - o;
        r[3][i] = e4 + o2;
        r[4][i] = e4 - o2;
        r[5][i] = f3;
    }
    r
}

multiversion! {
    /// `Ŷ (o, 36, n)` of one channel of `dy`: each 4×4 tile (its pixels `(4ti + i, 4tj + j)`:
    /// a window one pixel further on) as `A f Aᵀ`.
    fn grad_tiles4_channel(dyo: &[f32], h: usize, w: usize, b: usize, t0: usize, t1: usize, uo: &mut [f32]) {
        let tw = w.div_ceil(4);
        window_tiles::<4>(dyo, (h, w, b), (t0 * tw, t1 * tw), 1, a6, uo)
    }
}

/// `Aᵀ M A` of tiles `a..z` (as [`window_tiles`]) of one output channel's products
/// `mo (36, n)`: `put(at, nl, val)` stores lanes `..nl` of `val` at `at` of the channel's map
/// `(h, w, b)`, only the map's rows and columns of each tile.
#[inline(always)]
fn output_tiles(
    mo: &[f32],
    (h, w, b): (usize, usize, usize),
    (a, z): (usize, usize),
    mut put: impl FnMut(usize, &[f32]),
) {
    let tw = w.div_ceil(4);
    let n = (z - a) * b;
    let mut e = [[0f32; L]; 36];
    if b == H {
        // Two tiles per lane (see `window_tiles_paired`).
        for tile in (a..z).step_by(2) {
            let pair = (z - tile).min(2);
            let col = (tile - a) * H;
            for (k, ek) in e.iter_mut().enumerate() {
                load(mo, k * n + col, pair * H, ek);
            }
            let out = tile_outputs(&e);
            for half in 0..pair {
                let (ti, tj) = ((tile + half) / tw, (tile + half) % tw);
                let (rows, cols) = ((h - 4 * ti).min(4), (w - 4 * tj).min(4));
                for (j, oj) in out.iter().enumerate().take(cols) {
                    for (i, val) in oj.iter().enumerate().take(rows) {
                        put(
                            ((4 * ti + i) * w + 4 * tj + j) * H,
                            &val[half * H..(half + 1) * H],
                        );
                    }
                }
            }
        }
        return;
    }
    for tile in a..z {
        let (ti, tj) = (tile / tw, tile % tw);
        let (rows, cols) = ((h - 4 * ti).min(4), (w - 4 * tj).min(4));
        let col = (tile - a) * b;
        // The next tile's 36 products, one per row of `mo` (see `window_tiles`: 1.2 → 0.9 ms
        // for a first pass over a 28 × 28 × 16 map).
        if col + b < n {
            for k in 0..36 {
                prefetch(mo, k * n + col + b, b, false);
            }
        }
        for l0 in (0..b).step_by(L) {
            let nl = (b - l0).min(L);
            for (k, ek) in e.iter_mut().enumerate() {
                load(mo, k * n + col + l0, nl, ek);
            }
            for (j, out) in tile_outputs(&e).iter().enumerate().take(cols) {
                for (i, val) in out.iter().enumerate().take(rows) {
                    put(((4 * ti + i) * w + 4 * tj + j) * b + l0, &val[..nl]);
                }
            }
        }
    }
}

multiversion! {
    /// `y` of one output channel from `M (o, 36, n)`: tile rows `t0..t1`.
    fn output_tiles4_channel(mo: &[f32], h: usize, w: usize, b: usize, t0: usize, t1: usize, yo: &mut [f32]) {
        let tw = w.div_ceil(4);
        output_tiles(mo, (h, w, b), (t0 * tw, t1 * tw), |at, val| put_values(yo, at, val))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        crate::ops::fused::kernels_tests::vals(n, seed, 1.0)
    }

    /// Direct 3×3 convolution in f64: y (o, h, w, b).
    fn conv64(g: &Geom, x: &[f32], wt: &[f32]) -> Vec<f64> {
        let mut y = vec![0f64; g.o * g.h * g.w * g.b];
        for o in 0..g.o {
            for yy in 0..g.h {
                for xx in 0..g.w {
                    for l in 0..g.b {
                        let mut s = 0f64;
                        for c in 0..g.c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (yy + ky, xx + kx);
                                    if iy < 1 || ix < 1 || iy > g.h || ix > g.w {
                                        continue;
                                    }
                                    let xv = x[((c * g.h + iy - 1) * g.w + ix - 1) * g.b + l];
                                    s += wt[(o * g.c + c) * 9 + ky * 3 + kx] as f64 * xv as f64;
                                }
                            }
                        }
                        y[((o * g.h + yy) * g.w + xx) * g.b + l] = s;
                    }
                }
            }
        }
        y
    }

    fn close(a: &[f32], b: &[f64], what: &str) {
        crate::ops::fused::kernels_tests::assert_close(a, b, 1e-4, what)
    }

    /// Even and odd maps (partial tiles), one and several images, several tile-row chunks, 8
    /// images (two tiles to a lane) on odd and even tile counts.
    const CASES: [Geom; 6] = [
        Geom {
            b: 8,
            c: 3,
            h: 9,
            w: 7,
            o: 2,
        },
        Geom {
            b: 8,
            c: 2,
            h: 8,
            w: 8,
            o: 3,
        },
        Geom {
            b: 1,
            c: 2,
            h: 4,
            w: 4,
            o: 3,
        },
        Geom {
            b: 3,
            c: 5,
            h: 7,
            w: 5,
            o: 4,
        },
        Geom {
            b: 16,
            c: 3,
            h: 6,
            w: 9,
            o: 2,
        },
        Geom {
            b: 2,
            c: 4,
            h: 1,
            w: 3,
            o: 2,
        },
    ];

    #[test]
    fn kernel_transform_cache_hits_only_identical_kernels() {
        let g = Geom {
            b: 1,
            c: 7,
            h: 4,
            w: 4,
            o: 5,
        };
        let mut wt = vals(g.o * g.c * 9, 11);
        let a = cached_kernel_tiles4(&g, &wt);
        assert_eq!(*a, kernel_tiles4(&g, &wt));
        // (Tests run side by side and share the cache: a few tries, in case others evicted it.)
        let hit = (0..5).any(|_| {
            let a = cached_kernel_tiles4(&g, &wt);
            Arc::ptr_eq(&a, &cached_kernel_tiles4(&g, &wt))
        });
        assert!(hit, "same kernels: a hit");
        // One value changed, or the same values read as another shape: a miss.
        wt[g.o * g.c * 9 - 1] += 1.0;
        let b = cached_kernel_tiles4(&g, &wt);
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(*b, kernel_tiles4(&g, &wt));
        let swapped = g.swapped();
        assert!(!Arc::ptr_eq(&b, &cached_kernel_tiles4(&swapped, &wt)));
    }

    #[test]
    fn forward_matches_a_direct_convolution() {
        let more = [
            Geom {
                b: 16,
                c: 6,
                h: 9,
                w: 12,
                o: 5,
            },
            Geom {
                b: 17,
                c: 4,
                h: 8,
                w: 3,
                o: 3,
            },
            // One image (tile rows in groups of 7 tiles): 5 rows of 7 tiles, partial edge
            // tiles, and the head's map at 224 px in a chunk of its own.
            Geom {
                b: 1,
                c: 3,
                h: 18,
                w: 27,
                o: 4,
            },
            Geom {
                b: 1,
                c: 5,
                h: 28,
                w: 28,
                o: 6,
            },
            // One image in two chunks (63 + 2 tile rows: the batch-1 planes of a chunk that
            // starts below the first row), 66 tiles per row (9 groups of 7 and one of 3),
            // partial edge tiles.
            Geom {
                b: 1,
                c: 2,
                h: 258,
                w: 262,
                o: 2,
            },
        ];
        for g in CASES.iter().chain(&more) {
            let x = vals(g.c * g.h * g.w * g.b, 1);
            let wt = vals(g.o * g.c * 9, 2);
            let mut y = vec![f32::NAN; g.o * g.h * g.w * g.b];
            forward(g, &x, &wt, &mut y);
            close(&y, &conv64(g, &x, &wt), &format!("y {g:?}"));
        }
    }

    /// `(dw, dx)` of a direct convolution in f64: dw[o,c,ky,kx] = Σ dy[o,y,x,l] ·
    /// x[c, y+ky−1, x+kx−1, l], dx its adjoint in x.
    fn adjoint64(g: &Geom, x: &[f32], wt: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let mut dw64 = vec![0f64; wt.len()];
        let mut dx64 = vec![0f64; x.len()];
        for o in 0..g.o {
            for c in 0..g.c {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let k = (o * g.c + c) * 9 + ky * 3 + kx;
                        for yy in 0..g.h {
                            for xx in 0..g.w {
                                let (iy, ix) = (yy + ky, xx + kx);
                                if iy < 1 || ix < 1 || iy > g.h || ix > g.w {
                                    continue;
                                }
                                for l in 0..g.b {
                                    let d = dy[((o * g.h + yy) * g.w + xx) * g.b + l] as f64;
                                    let xi = ((c * g.h + iy - 1) * g.w + ix - 1) * g.b + l;
                                    dw64[k] += d * x[xi] as f64;
                                    dx64[xi] += d * wt[k] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (dw64, dx64)
    }

    #[test]
    fn gradients_match_the_adjoint_of_a_direct_convolution() {
        for g in CASES {
            let x = vals(g.c * g.h * g.w * g.b, 3);
            let wt = vals(g.o * g.c * 9, 4);
            let dy = vals(g.o * g.h * g.w * g.b, 5);
            let mut dw = vec![f32::NAN; wt.len()];
            let dx = backward(&g, &x, &wt, &dy, &mut dw, true, None).unwrap();
            let (dw64, dx64) = adjoint64(&g, &x, &wt, &dy);
            close(&dw, &dw64, &format!("dw {g:?}"));
            close(&dx, &dx64, &format!("dx {g:?}"));
            assert!(backward(&g, &x, &wt, &dy, &mut dw, false, None).is_none());
            // With the forward's transformed input kept (one chunk of 8+ images): the same
            // forward output and the same weight gradient, bit for bit.
            let (mut y, mut y_kept) = (vec![f32::NAN; dy.len()], vec![f32::NAN; dy.len()]);
            forward(&g, &x, &wt, &mut y);
            let v = forward_keeping(&g, &x, &wt, &mut y_kept);
            assert!(y
                .iter()
                .zip(&y_kept)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(v.is_some(), g.b >= 8 && g.chunk_rows4() >= g.th4(), "{g:?}");
            let mut dw_kept = vec![f32::NAN; wt.len()];
            backward(&g, &x, &wt, &dy, &mut dw_kept, false, v.as_deref());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dw_kept), bits(&dw), "kept V {g:?}");
        }
    }

    /// The blocked forward (inference) against the chunked one (training's, keeping `V`) at
    /// the model's channel counts: each block's products are the gemm crate's on fewer columns,
    /// which sums each output over the same 128 channels in one pass: the same bits, for
    /// blocks of 1 to 4 tiles (1, 2, 3 and 5 threads), a batch whose tiles are 48 columns and
    /// 8 images (pairs of tiles to a lane, odd tile counts).
    #[test]
    fn blocked_forward_keeps_the_chunked_forwards_bits() {
        for (b, h, w) in [
            (16, 12, 12),
            (16, 9, 17),
            (24, 8, 8),
            (8, 12, 12),
            (8, 9, 17),
        ] {
            let g = Geom {
                b,
                c: 128,
                h,
                w,
                o: 128,
            };
            let x = vals(g.c * g.h * g.w * g.b, 9);
            let wt = vals(g.o * g.c * 9, 10);
            let mut y_kept = vec![f32::NAN; g.o * g.h * g.w * g.b];
            let v = forward_keeping(&g, &x, &wt, &mut y_kept);
            assert!(v.is_some(), "the chunked path: {g:?}");
            for threads in [1, 2, 3, 5] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![f32::NAN; y_kept.len()];
                pool.install(|| forward(&g, &x, &wt, &mut y));
                let same = y
                    .iter()
                    .zip(&y_kept)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{g:?} on {threads} threads");
            }
        }
    }

    #[test]
    fn empty_maps_give_empty_outputs() {
        for (b, h, w) in [(1, 5, 0), (1, 0, 5), (16, 4, 0), (0, 8, 8)] {
            let g = Geom {
                b,
                c: 2,
                h,
                w,
                o: 3,
            };
            let wt = vals(3 * 2 * 9, 1);
            forward(&g, &[], &wt, &mut []);
            let mut dw = vec![f32::NAN; wt.len()];
            let dx = backward(&g, &[], &wt, &[], &mut dw, true, None);
            assert_eq!(dx, Some(vec![]));
            assert!(dw.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn chunks_cover_every_tile_row_once() {
        // A map wide enough that a chunk holds fewer tile rows than the map has.
        let g = Geom {
            b: 16,
            c: 2,
            h: 40,
            w: 600,
            o: 2,
        };
        assert!(g.chunk_rows4() < g.th4());
        let x = vals(g.c * g.h * g.w * g.b, 6);
        let wt = vals(g.o * g.c * 9, 7);
        let dy = vals(g.o * g.h * g.w * g.b, 8);
        let mut y = vec![f32::NAN; g.o * g.h * g.w * g.b];
        forward(&g, &x, &wt, &mut y);
        close(&y, &conv64(&g, &x, &wt), "y");
        let mut dw = vec![f32::NAN; wt.len()];
        let dx = backward(&g, &x, &wt, &dy, &mut dw, true, None).unwrap();
        let (dw64, dx64) = adjoint64(&g, &x, &wt, &dy);
        close(&dw, &dw64, "dw");
        close(&dx, &dx64, "dx");
    }

    /// Timing of each part at the head's shape (not a check; `cargo test --release --lib
    /// winograd_parts -- --ignored --nocapture`, with `ONEHEAD_PROFILE_CPU=1` on a busy machine).
    #[test]
    #[ignore]
    fn winograd_parts() {
        let g = Geom {
            b: 16,
            c: 128,
            h: 28,
            w: 28,
            o: 128,
        };
        let x = vals(g.c * g.h * g.w * g.b, 1);
        let wt = vals(g.o * g.c * 9, 2);
        let mut y = vec![0f32; g.o * g.h * g.w * g.b];
        let clock = crate::ops::fused::prof::clock;
        for round in 0..3 {
            let t = clock();
            forward(&g, &x, &wt, &mut y);
            let t1 = clock();
            let mut dw = vec![0f32; wt.len()];
            weight_grad(&g, &x, &y, &mut dw, None);
            let t2 = clock();
            eprintln!(
                "round {round}: forward {:.2} ms, weight grad {:.2} ms",
                (t1 - t) * 1e3,
                (t2 - t1) * 1e3
            );
        }
    }
}
