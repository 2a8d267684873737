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

use super::kernels::ConvGeom;
use super::winograd::Ptr;
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

/// Whether the forward of a dense conv over `b` images with `c` input channels, kernel `k`
/// and `o` output channels takes this path: whole 16-image lanes, a multiple of 16 output
/// channels, and few input taps (each input lane feeds 16 outputs; with many taps the gemm
/// path is better).
pub fn applies(b: usize, c: usize, k: usize, o: usize) -> bool {
    b.is_multiple_of(L)
        && b > 0
        && o.is_multiple_of(OB)
        && c * k * k <= 64
        && super::winograd::fast_dense_paths()
}

/// `y (o, ho, wo, b) = conv(x (c, h, w, b), wt (o, c, k, k))`, stride and padding of `g`.
pub fn forward(g: &ConvGeom, o: usize, x: &[f32], wt: &[f32], y: &mut [f32]) {
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
        row(
            g,
            oy,
            x,
            &wt_t[ob * taps * OB..(ob + 1) * taps * OB],
            &offsets,
            rows,
        );
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

    #[test]
    fn forward_matches_a_direct_convolution_in_f64() {
        // The stem's shape (small), two lanes and two channel blocks, odd sizes, stride 1.
        for (b, c, h, w, k, s, o) in [
            (16, 3, 16, 16, 3, 2, 16),
            (32, 3, 9, 7, 3, 2, 32),
            (16, 2, 5, 6, 3, 1, 16),
        ] {
            let g = ConvGeom::new(b, c, h, w, k, s);
            let x = crate::ops::fused::kernels_tests::vals(c * h * w * b, 1, 1.0);
            let wt = crate::ops::fused::kernels_tests::vals(o * c * k * k, 2, 1.0);
            let mut y = vec![f32::NAN; o * g.ho * g.wo * b];
            forward(&g, o, &x, &wt, &mut y);
            let want = conv64(&g, o, &x, &wt);
            for (i, (&a, &e)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "b{b} value {i}: {a} vs {e}"
                );
            }
        }
    }
}
