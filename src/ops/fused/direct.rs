//! Direct dense convolution for few input channels (the stem: 3 → 16 channels, 3×3 stride 2
//! at full resolution), forward only.
//!
//! Why: through im2col the stem is a gemm of 16 × 27 by 27 × (112·112·B): a product with tiny
//! `m` and `k` that the gemm crate neither runs near peak nor shares well between threads
//! (1 thread 5.3 ms, 2 threads 9.6 ms wall at batch 16, 224 px: the largest single node of
//! an inference). Here each output pixel's 16-image lane is computed for 16 output channels
//! at once: the `C·k·k` input lanes are loaded once and each feeds 16 fused multiply-adds
//! into 16 vector accumulators that stay in registers; output rows run in parallel.
//!
//! Values differ from the im2col path by float rounding (the sum runs tap by tap in the
//! order `(c, ky, kx)`); `ONEHEAD_WINOGRAD=0` selects the im2col path for every dense
//! convolution (the arithmetic of the README's tables).

use rayon::prelude::*;

use super::kernels::{pad_phases, ConvGeom, Epilogue, Ptr};
use crate::ops::simd::multiversion;

/// Output channels computed together: four groups of four accumulators (one vector register
/// each). Written as four groups because LLVM vectorises a 16-long loop over the channels
/// across the channels (gathers and scatters of the accumulators) instead of keeping them in
/// registers.
const OB: usize = 16;
const G: usize = 4;
/// Images per lane.
const L: usize = 16;
type Lane = [f32; L];
/// 8 images: two neighbouring output pixels' images to a lane ([`row_pairs`]).
const H: usize = L / 2;

/// Whether the forward of a dense conv over `b` images with `c` input channels, kernel `k`
/// and `o` output channels takes this path: whole 16-image lanes (or 8 images, two pixels to a
/// lane: [`row_pairs`]), a multiple of 16 output
/// channels, and few input taps (each input lane feeds 16 outputs; with many taps the gemm
/// path is better).
pub fn applies(b: usize, c: usize, k: usize, o: usize) -> bool {
    (b.is_multiple_of(L) || b == H)
        && b > 0
        && o.is_multiple_of(OB)
        && c * k * k <= 64
        && super::winograd::fast_dense_paths()
}

/// Whether a dense conv over `b` images takes [`forward_small`]: fewer images than fill a
/// vector (batch-1 latency, small evaluation batches), strides 1 and 2, a multiple of 4
/// output channels, few input taps.
pub fn applies_small(b: usize, c: usize, (k, stride): (usize, usize), o: usize) -> bool {
    (1..8).contains(&b)
        && stride <= 2
        && o.is_multiple_of(SG)
        && c * k * k <= 64
        && super::winograd::fast_dense_paths()
}

/// Output channels of one [`forward_small`] block, and pixels per vector.
const SG: usize = 4; // a0..a3 in `small_row`
/// Output pixels per vector in [`small_row`]: one AVX-512 register (8 took twice the FMA
/// instructions at the stem's 112-pixel rows).
const PX: usize = 16;

/// [`forward`] for fewer images than a lane: every input plane is copied once into a
/// zero-padded plane split into `stride` column phases (so that each tap reads a contiguous
/// run of its row), then 16 neighbouring output pixels of a row are one vector and 4 output
/// channels are computed side by side (independent sums; one output's chain would wait on
/// each FMA's latency). Each output sums its taps in the order `(c, ky, kx)`, as [`forward`].
/// At batch 1 the stem took 1.1 ms through im2col + gemm (a 16 × 27 product).
pub fn forward_small(g: &ConvGeom, o: usize, x: &[f32], wt: &[f32], y: &mut [f32]) {
    assert!(
        x.len() == g.c * g.h * g.w * g.b
            && wt.len() == o * g.c * g.k * g.k
            && y.len() == o * g.ho * g.wo * g.b
            && applies_small(g.b, g.c, (g.k, g.stride), o),
        "direct conv (small batch): buffer sizes"
    );
    let s = g.stride;
    let (hp, pw) = (g.h + 2 * g.pad, (g.w + 2 * g.pad).div_ceil(s) + PX);
    let plane = s * hp * pw;
    // From the pool: a fresh zeroed block this size faults its pages in on every call.
    let mut planes = super::pool::take(g.b * g.c * plane);
    planes.par_chunks_mut(plane).enumerate().for_each(|(i, p)| {
        p.fill(0.0);
        let xc = &x[(i % g.c) * g.h * g.w * g.b..];
        match s {
            1 => pad_phases::<1>(g, xc, i / g.c, (hp, pw), p),
            _ => pad_phases::<2>(g, xc, i / g.c, (hp, pw), p),
        }
    });
    let out = Ptr(y.as_mut_ptr());
    (0..g.ho).into_par_iter().for_each(|oy| {
        let out = &out;
        for (bi, xs) in planes.chunks_exact(g.c * plane).enumerate() {
            for oc in (0..o).step_by(SG) {
                // SAFETY: task oy alone touches output row oy of every channel: rows
                // (oc + j, oy) of y, each `wo · b` values inside y (sizes checked above).
                let row = |j: usize| unsafe {
                    let at = ((oc + j) * g.ho + oy) * g.wo * g.b;
                    std::slice::from_raw_parts_mut(out.0.add(at), g.wo * g.b)
                };
                let rows: [&mut [f32]; SG] = std::array::from_fn(row);
                small_row(g, (hp, pw), xs, &wt[oc * g.c * g.k * g.k..], (oy, bi), rows);
            }
        }
    });
    super::pool::give(planes);
}

multiversion! {
    /// One output row `oy` of image `bi` for 4 output channels (`wt` from the first).
    fn small_row(g: &ConvGeom, hp_pw: (usize, usize), xs: &[f32], wt: &[f32], at: (usize, usize), rows: [&mut [f32]; SG]) {
        let ((hp, pw), (oy, bi), s, kk) = (hp_pw, at, g.stride, g.k * g.k);
        let taps = g.c * kk;
        // Each tap's offset in `xs` for this row (computed once: a division per tap and
        // vector cost more than the vector's FMAs), and its 4 weights side by side.
        let mut offs = [0usize; 64];
        let mut w4 = [[0f32; SG]; 64];
        for c in 0..g.c {
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let t = c * kk + ky * g.k + kx;
                    offs[t] = ((c * s + kx % s) * hp + oy * s + ky) * pw + kx / s;
                    w4[t] = std::array::from_fn(|j| wt[j * taps + t]);
                }
            }
        }
        let mut rows = rows;
        let mut ox0 = 0;
        // Two vectors of pixels at a time where the row has them: 8 independent sums per tap
        // (4 were one FMA per cycle, half the core's rate: each waits on its previous FMA).
        while ox0 + 2 * PX <= g.wo {
            let (mut a0, mut a1, mut a2, mut a3) = ([0f32; PX], [0f32; PX], [0f32; PX], [0f32; PX]);
            let (mut b0, mut b1, mut b2, mut b3) = ([0f32; PX], [0f32; PX], [0f32; PX], [0f32; PX]);
            for (&off, wv) in offs[..taps].iter().zip(&w4) {
                let o = off + ox0;
                let xv: &[f32; 2 * PX] = xs[o..o + 2 * PX].try_into().expect("two full vectors");
                let (xa, xb) = xv.split_at(PX);
                let (xa, xb): (&[f32; PX], &[f32; PX]) = (xa.try_into().expect("PX"), xb.try_into().expect("PX"));
                fma_px(&mut a0, wv[0], xa);
                fma_px(&mut b0, wv[0], xb);
                fma_px(&mut a1, wv[1], xa);
                fma_px(&mut b1, wv[1], xb);
                fma_px(&mut a2, wv[2], xa);
                fma_px(&mut b2, wv[2], xb);
                fma_px(&mut a3, wv[3], xa);
                fma_px(&mut b3, wv[3], xb);
            }
            for (r, (a, b)) in rows.iter_mut().zip([(a0, b0), (a1, b1), (a2, b2), (a3, b3)]) {
                store_px(r, g.b, bi, ox0, PX, &a);
                store_px(r, g.b, bi, ox0 + PX, PX, &b);
            }
            ox0 += 2 * PX;
        }
        while ox0 < g.wo {
            // Four named accumulators (an array of them was vectorised across the channels,
            // with shuffles, in some builds).
            let (mut a0, mut a1, mut a2, mut a3) = ([0f32; PX], [0f32; PX], [0f32; PX], [0f32; PX]);
            for (&off, wv) in offs[..taps].iter().zip(&w4) {
                let o = off + ox0;
                let xv: &[f32; PX] = xs[o..o + PX].try_into().expect("a full vector");
                fma_px(&mut a0, wv[0], xv);
                fma_px(&mut a1, wv[1], xv);
                fma_px(&mut a2, wv[2], xv);
                fma_px(&mut a3, wv[3], xv);
            }
            let n = (g.wo - ox0).min(PX);
            for (r, a) in rows.iter_mut().zip([a0, a1, a2, a3]) {
                store_px(r, g.b, bi, ox0, n, &a);
            }
            ox0 += PX;
        }
    }
}

/// `n ≤ PX` sums from output pixel `ox0` into the row `r (wo, b)` at image `bi`.
#[inline(always)]
fn store_px(r: &mut [f32], b: usize, bi: usize, ox0: usize, n: usize, a: &[f32; PX]) {
    if b == 1 && n == PX {
        r[ox0..ox0 + PX].copy_from_slice(a);
    } else {
        for (l, &v) in a[..n].iter().enumerate() {
            r[(ox0 + l) * b + bi] = v;
        }
    }
}

/// `y (o, ho, wo, b) = conv(x (c, h, w, b), wt (o, c, k, k))`, stride and padding of `g`.
pub fn forward(
    g: &ConvGeom,
    o: usize,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    ep: Option<&Epilogue>,
) {
    let taps = g.c * g.k * g.k;
    assert!(
        x.len() == g.c * g.h * g.w * g.b
            && wt.len() == o * taps
            && y.len() == o * g.ho * g.wo * g.b
            && applies(g.b, g.c, g.k, o),
        "direct conv: buffer sizes"
    );
    // wt_t[ob][tap][j] = wt[ob·16 + j][tap]: the 16 weights of one tap side by side.
    let mut wt_t = vec![0f32; o * taps];
    for oc in 0..o {
        for t in 0..taps {
            wt_t[((oc / OB) * taps + t) * OB + oc % OB] = wt[oc * taps + t];
        }
    }
    // Offset of each tap (c, ky, kx) from the window's corner in x.
    let offsets: Vec<usize> = (0..taps)
        .map(|t| {
            let (c, ky, kx) = (t / (g.k * g.k), t / g.k % g.k, t % g.k);
            ((c * g.h + ky) * g.w + kx) * g.b
        })
        .collect();
    let out = Ptr(y.as_mut_ptr());
    (0..o / OB * g.ho).into_par_iter().for_each(|task| {
        let (ob, oy) = (task / g.ho, task % g.ho);
        let out = &out;
        // SAFETY: task (ob, oy) writes only rows oy of channels ob·16 .. ob·16 + 16, each
        // `wo · b` values at ((oc · ho + oy) · wo) · b, inside y (size checked above).
        let rows: [&mut [f32]; OB] = std::array::from_fn(|j| unsafe {
            let at = (((ob * OB + j) * g.ho + oy) * g.wo) * g.b;
            std::slice::from_raw_parts_mut(out.0.add(at), g.wo * g.b)
        });
        let mut rows = rows;
        let row_fn = if g.b == H { row_pairs } else { row };
        row_fn(
            g,
            oy,
            x,
            &wt_t[ob * taps * OB..(ob + 1) * taps * OB],
            &offsets,
            rows.each_mut().map(|r| &mut **r),
        );
        if let Some(e) = ep {
            for (j, r) in rows.iter_mut().enumerate() {
                e.apply(ob * OB + j, r);
            }
        }
    });
}

multiversion! {
    /// Output row `oy` of 16 channels: `rows[j] (wo, b)`. Every output sums its taps in the
    /// order `(c, ky, kx)`, inside the map or at its border alike.
    fn row(g: &ConvGeom, oy: usize, x: &[f32], wt: &[f32], offsets: &[usize], rows: [&mut [f32]; OB]) {
        let (ky0, ky1) = g.taps(oy, g.h);
        let inner_row = ky0 == 0 && ky1 == g.k;
        let mut rows = rows;
        for ox in 0..g.wo {
            let (kx0, kx1) = g.taps(ox, g.w);
            for l0 in (0..g.b).step_by(L) {
                let mut acc = [[[0f32; L]; G]; OB / G];
                if inner_row && kx0 == 0 && kx1 == g.k {
                    // Every tap inside the map: the window's corner and the tap offsets.
                    let corner = ((oy * g.stride - g.pad) * g.w + ox * g.stride - g.pad) * g.b + l0;
                    let xw = &x[corner..];
                    for (t, &off) in offsets.iter().enumerate() {
                        let xl: &Lane = xw[off..off + L].try_into().expect("a full lane");
                        fma16(&mut acc, &wt[t * OB..t * OB + OB], xl);
                    }
                } else {
                    for c in 0..g.c {
                        for ky in ky0..ky1 {
                            let iy = oy * g.stride + ky - g.pad;
                            for kx in kx0..kx1 {
                                let ix = ox * g.stride + kx - g.pad;
                                let at = ((c * g.h + iy) * g.w + ix) * g.b + l0;
                                let xl: &Lane = x[at..at + L].try_into().expect("a full lane");
                                let t = (c * g.k + ky) * g.k + kx;
                                fma16(&mut acc, &wt[t * OB..t * OB + OB], xl);
                            }
                        }
                    }
                }
                for (j, r) in rows.iter_mut().enumerate() {
                    r[ox * g.b + l0..ox * g.b + l0 + L].copy_from_slice(&acc[j / G][j % G]);
                }
            }
        }
    }
}

multiversion! {
    /// [`row`] for 8 images: output pixels `ox, ox + 1` side by side in one lane where every
    /// tap of both lies inside the map (the next pixel's window is `stride` pixels on), one
    /// pixel in half a lane at the borders; every output sums its taps in the order `(c, ky,
    /// kx)` as in [`row`].
    fn row_pairs(g: &ConvGeom, oy: usize, x: &[f32], wt: &[f32], offsets: &[usize], rows: [&mut [f32]; OB]) {
        let (ky0, ky1) = g.taps(oy, g.h);
        let inner_row = ky0 == 0 && ky1 == g.k;
        let inside = |ox: usize| g.taps(ox, g.w) == (0, g.k);
        let next = g.stride * H;
        let mut rows = rows;
        let mut ox = 0;
        while ox < g.wo {
            let mut acc = [[[0f32; L]; G]; OB / G];
            if inner_row && ox + 1 < g.wo && inside(ox) && inside(ox + 1) {
                let corner = ((oy * g.stride - g.pad) * g.w + ox * g.stride - g.pad) * H;
                let xw = &x[corner..];
                for (t, &off) in offsets.iter().enumerate() {
                    let mut xl = [0f32; L];
                    xl[..H].copy_from_slice(&xw[off..off + H]);
                    xl[H..].copy_from_slice(&xw[off + next..off + next + H]);
                    fma16(&mut acc, &wt[t * OB..t * OB + OB], &xl);
                }
                for (j, r) in rows.iter_mut().enumerate() {
                    r[ox * H..ox * H + L].copy_from_slice(&acc[j / G][j % G]);
                }
                ox += 2;
                continue;
            }
            let (kx0, kx1) = g.taps(ox, g.w);
            for c in 0..g.c {
                for ky in ky0..ky1 {
                    let iy = oy * g.stride + ky - g.pad;
                    for kx in kx0..kx1 {
                        let ix = ox * g.stride + kx - g.pad;
                        let at = ((c * g.h + iy) * g.w + ix) * H;
                        let mut xl = [0f32; L];
                        xl[..H].copy_from_slice(&x[at..at + H]);
                        let t = (c * g.k + ky) * g.k + kx;
                        fma16(&mut acc, &wt[t * OB..t * OB + OB], &xl);
                    }
                }
            }
            for (j, r) in rows.iter_mut().enumerate() {
                r[ox * H..ox * H + H].copy_from_slice(&acc[j / G][j % G][..H]);
            }
            ox += 1;
        }
    }
}

/// `a += w · x`, [`PX`] pixels.
#[inline(always)]
fn fma_px(a: &mut [f32; PX], w: f32, x: &[f32; PX]) {
    for l in 0..PX {
        a[l] = w.mul_add(x[l], a[l]);
    }
}

/// `acc[j] += w[j] · x` for the 16 output channels, as four groups of four.
#[inline(always)]
fn fma16(acc: &mut [[Lane; G]; OB / G], w: &[f32], x: &Lane) {
    let w: &[f32; OB] = w.try_into().expect("16 weights");
    for (q, group) in acc.iter_mut().enumerate() {
        fma4(group, &w[q * G..q * G + G], x);
    }
}

#[inline(always)]
fn fma4(acc: &mut [Lane; G], w: &[f32], x: &Lane) {
    for (a, &wj) in acc.iter_mut().zip(w) {
        for i in 0..L {
            a[i] = wj.mul_add(x[i], a[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution in f64.
    fn conv64(g: &ConvGeom, o: usize, x: &[f32], wt: &[f32]) -> Vec<f64> {
        let mut y = vec![0f64; o * g.ho * g.wo * g.b];
        for oc in 0..o {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    for bi in 0..g.b {
                        let mut s = 0f64;
                        for c in 0..g.c {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((c * g.h + iy as usize) * g.w + ix as usize) * g.b + bi];
                                    s += xv as f64
                                        * wt[((oc * g.c + c) * g.k + ky) * g.k + kx] as f64;
                                }
                            }
                        }
                        y[((oc * g.ho + oy) * g.wo + ox) * g.b + bi] = s;
                    }
                }
            }
        }
        y
    }

    type Case = (usize, usize, usize, usize, usize, usize, usize);

    /// `conv` on each `(b, c, h, w, k, stride, o)` case against [`conv64`].
    fn check(
        cases: &[Case],
        seed: u64,
        conv: impl Fn(&ConvGeom, usize, &[f32], &[f32], &mut [f32]),
    ) {
        for &(b, c, h, w, k, s, o) in cases {
            let g = ConvGeom::new(b, c, h, w, k, s);
            let x = crate::ops::fused::kernels_tests::vals(c * h * w * b, seed, 1.0);
            let wt = crate::ops::fused::kernels_tests::vals(o * c * k * k, seed + 1, 1.0);
            let mut y = vec![f32::NAN; o * g.ho * g.wo * b];
            conv(&g, o, &x, &wt, &mut y);
            let want = conv64(&g, o, &x, &wt);
            for (i, (&a, &e)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "b{b} value {i}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn forward_matches_a_direct_convolution_in_f64() {
        // The stem's shape (small), two lanes and two channel blocks, odd sizes, stride 1; 8
        // images (pixel pairs to a lane, single pixels at the borders and an odd row's end).
        let cases = [
            (16, 3, 16, 16, 3, 2, 16),
            (32, 3, 9, 7, 3, 2, 32),
            (16, 2, 5, 6, 3, 1, 16),
            (8, 3, 16, 16, 3, 2, 16),
            (8, 3, 9, 7, 3, 2, 32),
            (8, 2, 5, 6, 3, 1, 16),
        ];
        check(&cases, 1, |g, o, x, wt, y| forward(g, o, x, wt, y, None));
    }

    #[test]
    fn small_batch_forward_matches_a_direct_convolution_in_f64() {
        // Batch 1 at the stem's shape (small), odd sizes and 3 images, stride 1, 8 channels.
        let cases = [
            (1, 3, 16, 16, 3, 2, 16),
            (3, 3, 9, 7, 3, 2, 8),
            (2, 2, 5, 13, 3, 1, 4),
            (1, 1, 6, 9, 5, 1, 4),
        ];
        check(&cases, 3, forward_small);
    }
}
