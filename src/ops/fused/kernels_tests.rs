//! Unit tests of the fused executor's kernels (`kernels`) against naive f64 references on
//! small hand-sized cases: the `(C, H, W, B)` BatchNorm + activation forward and backward,
//! squeeze-excite, the 2× upsample-add and its adjoint, depthwise convolutions (stride 1 and
//! 2, both the small-batch row kernel and the lane kernels), im2col/col2im and the layout
//! conversions. `tests/model_fused.rs` checks these only through whole plans (NCHW in and
//! out, a few batch sizes); here each kernel is isolated, with batch sizes chosen to hit
//! every code path (1, the `sum` path of SE pooling; < 8, the row kernel; 8 + 1 and 16 + 4
//! lane blocks).

use super::kernels::{self, Act, ConvGeom};

/// Deterministic values in `[-scale, scale)`.
pub(super) fn vals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `|a − b| ≤ tol · max(1, |b|)` elementwise.
pub(super) fn assert_close(a: &[f32], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let d = (x as f64 - y).abs();
        assert!(
            d <= tol * y.abs().max(1.0),
            "{what}[{i}]: {x} vs {y} (diff {d:e})"
        );
    }
}

const ACTS: [Act; 4] = [Act::None, Act::Relu, Act::HardSwish, Act::HardSigmoid];

fn act64(act: Act, u: f64) -> f64 {
    match act {
        Act::None => u,
        Act::Relu => u.max(0.0),
        Act::HardSwish => u * (u + 3.0).clamp(0.0, 6.0) / 6.0,
        Act::HardSigmoid => (u + 3.0).clamp(0.0, 6.0) / 6.0,
    }
}

fn dact64(act: Act, u: f64) -> f64 {
    match act {
        Act::None => 1.0,
        Act::Relu => (u > 0.0) as u8 as f64,
        Act::HardSwish if u <= -3.0 => 0.0,
        Act::HardSwish if u >= 3.0 => 1.0,
        Act::HardSwish => (2.0 * u + 3.0) / 6.0,
        Act::HardSigmoid if u <= -3.0 || u >= 3.0 => 0.0,
        Act::HardSigmoid => 1.0 / 6.0,
    }
}

// ---------------------------------------------------------------------------------------------
// BatchNorm + activation.

#[test]
fn batch_norm_statistics_and_backward_by_hand() {
    // One channel, z = 1, 2, 3, 4: mean 2.5, biased variance 1.25; γ = 1, β = 0, eps = 0.
    let z = [1f32, 2.0, 3.0, 4.0];
    let (mut mean, mut var) = ([0f32], [0f32]);
    kernels::channel_stats(&z, 4, &mut mean, &mut var);
    assert_eq!((mean[0], var[0]), (2.5, 1.25));
    let (scale, shift, invstd) = kernels::bn_scale_shift(&[1.0], &[0.0], &mean, &var, 0.0);
    let inv = 1.0 / 1.25f64.sqrt();
    assert!((invstd[0] as f64 - inv).abs() < 1e-7);
    let mut y = [0f32; 4];
    kernels::affine_act(&z, 4, &scale, &shift, Act::None, &mut y);
    let xhat: Vec<f64> = z.iter().map(|&v| (v as f64 - 2.5) * inv).collect();
    assert_close(&y, &xhat, 1e-6, "normalised");
    // dy = (1, 0, 0, 0): dβ = 1, dγ = x̂₀, dz = inv·(dy − mean(dy) − x̂·mean(dy·x̂)).
    let mut d = [1f32, 0.0, 0.0, 0.0];
    let (dg, db) = kernels::bn_act_bwd(
        &z,
        &mut d,
        4,
        &scale,
        &shift,
        &mean,
        &invstd,
        Act::None,
        true,
    );
    assert!((db[0] - 1.0).abs() < 1e-7);
    assert!(
        (dg[0] as f64 - xhat[0]).abs() < 1e-6,
        "{} vs {}",
        dg[0],
        xhat[0]
    );
    let dy = [1.0, 0.0, 0.0, 0.0];
    let want: Vec<f64> = (0..4)
        .map(|i| inv * (dy[i] - 0.25 - xhat[i] * xhat[0] / 4.0))
        .collect();
    assert_close(&d, &want, 1e-6, "dz");
    // With running statistics (eval), dz is just dy·scale.
    let mut d = [1f32, 0.0, 0.0, 0.0];
    kernels::bn_act_bwd(
        &z,
        &mut d,
        4,
        &scale,
        &shift,
        &mean,
        &invstd,
        Act::None,
        false,
    );
    assert_close(&d, &[inv, 0.0, 0.0, 0.0], 1e-6, "dz (eval)");
}

/// `act(BN(z))` per channel of `z (C, n)` and its backward, in f64.
#[allow(clippy::type_complexity)]
fn bn_reference(
    z: &[f32],
    n: usize,
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    act: Act,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let c = gamma.len();
    let (mut y, mut dz, mut dg, mut db) = (
        vec![0.0; c * n],
        vec![0.0; c * n],
        vec![0.0; c],
        vec![0.0; c],
    );
    for ch in 0..c {
        let row = &z[ch * n..(ch + 1) * n];
        let mu = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (var + eps).sqrt();
        let (g_, b_) = (gamma[ch] as f64, beta[ch] as f64);
        let xh: Vec<f64> = row.iter().map(|&v| (v as f64 - mu) * inv).collect();
        // g = dy·act'(u) with u = γ·x̂ + β.
        let g: Vec<f64> = (0..n)
            .map(|p| dy[ch * n + p] as f64 * dact64(act, g_ * xh[p] + b_))
            .collect();
        db[ch] = g.iter().sum();
        dg[ch] = g.iter().zip(&xh).map(|(a, b)| a * b).sum();
        for p in 0..n {
            y[ch * n + p] = act64(act, g_ * xh[p] + b_);
            dz[ch * n + p] = g_ * inv * (g[p] - db[ch] / n as f64 - xh[p] * dg[ch] / n as f64);
        }
    }
    (y, dz, dg, db)
}

#[test]
fn batch_norm_act_forward_and_backward_match_a_naive_reference() {
    // Rows of 1000 values: several 16-lane chunks plus a remainder; 3 channels.
    let (c, n) = (3, 1000);
    // Scaled so hard-swish and hard-sigmoid see values on both sides of ±3.
    let z = vals(c * n, 1, 4.0);
    let gamma: Vec<f32> = vals(c, 2, 0.5).iter().map(|v| v + 1.0).collect();
    let beta = vals(c, 3, 0.5);
    let dy = vals(c * n, 4, 1.0);
    for act in ACTS {
        let (mut mean, mut var) = (vec![0f32; c], vec![0f32; c]);
        kernels::channel_stats(&z, n, &mut mean, &mut var);
        let (scale, shift, invstd) = kernels::bn_scale_shift(&gamma, &beta, &mean, &var, 1e-5);
        let mut y = vec![0f32; c * n];
        kernels::affine_act(&z, n, &scale, &shift, act, &mut y);
        let (y_ref, dz_ref, dg_ref, db_ref) = bn_reference(&z, n, &gamma, &beta, &dy, act, 1e-5);
        assert_close(&y, &y_ref, 1e-5, &format!("{act:?}: y"));
        // In place gives the same bits.
        let mut y2 = z.clone();
        kernels::affine_act_inplace(&mut y2, n, &scale, &shift, act);
        assert_eq!(y, y2, "{act:?}: in place");
        let mut d = dy.clone();
        let (dg, db) =
            kernels::bn_act_bwd(&z, &mut d, n, &scale, &shift, &mean, &invstd, act, true);
        assert_close(&dg, &dg_ref, 1e-4, &format!("{act:?}: dγ"));
        assert_close(&db, &db_ref, 1e-4, &format!("{act:?}: dβ"));
        assert_close(&d, &dz_ref, 1e-4, &format!("{act:?}: dz"));
        // With batch statistics the input gradient of every channel sums to 0.
        for ch in 0..c {
            let s: f64 = d[ch * n..(ch + 1) * n].iter().map(|&v| v as f64).sum();
            assert!(s.abs() < 1e-3, "{act:?}: Σ dz of channel {ch} = {s}");
        }
    }
}

#[test]
fn activations_forward_and_backward_match_the_definitions() {
    let x = vals(40_000, 5, 5.0);
    let dy = vals(x.len(), 6, 1.0);
    for act in ACTS {
        let mut y = vec![0f32; x.len()];
        kernels::act_fwd(&x, &mut y, act);
        let mut d = dy.clone();
        kernels::act_bwd(&x, &mut d, act);
        for i in 0..x.len() {
            let u = x[i] as f64;
            assert!(
                (y[i] as f64 - act64(act, u)).abs() < 1e-6,
                "{act:?}({u}) = {}",
                y[i]
            );
            let want = dy[i] as f64 * dact64(act, u);
            assert!(
                (d[i] as f64 - want).abs() < 1e-6,
                "{act:?}'({u}): {} vs {want}",
                d[i]
            );
        }
    }
    // PyTorch's conventions at the kinks.
    let kinks = [-3f32, 0.0, 3.0];
    for (act, want) in [
        (Act::Relu, [0f32, 0.0, 1.0]),
        (Act::HardSwish, [0.0, 0.5, 1.0]),
        (Act::HardSigmoid, [0.0, 1.0 / 6.0, 0.0]),
    ] {
        let mut d = [1f32; 3];
        kernels::act_bwd(&kinks, &mut d, act);
        assert_eq!(d, want, "{act:?} at -3, 0, 3");
    }
}

// ---------------------------------------------------------------------------------------------
// Squeeze-excite.

struct SeRef {
    y: Vec<f64>,
    dx: Vec<f64>,
    dwr: Vec<f64>,
    dbr: Vec<f64>,
    dwe: Vec<f64>,
    dbe: Vec<f64>,
}

/// Squeeze-excite on `x (C, HW, B)` and its backward, naive loops in f64.
#[allow(clippy::too_many_arguments)]
fn se_reference(
    x: &[f32],
    dy: &[f32],
    (c, hw, b, rd): (usize, usize, usize, usize),
    wr: &[f32],
    br: &[f32],
    we: &[f32],
    be: &[f32],
) -> SeRef {
    let at = |ch: usize, p: usize, l: usize| (ch * hw + p) * b + l;
    let f = |v: &[f32]| v.iter().map(|&u| u as f64).collect::<Vec<f64>>();
    let (wr, br, we, be) = (f(wr), f(br), f(we), f(be));
    let mut r = SeRef {
        y: vec![0.0; x.len()],
        dx: vec![0.0; x.len()],
        dwr: vec![0.0; rd * c],
        dbr: vec![0.0; rd],
        dwe: vec![0.0; c * rd],
        dbe: vec![0.0; c],
    };
    for l in 0..b {
        let pooled: Vec<f64> = (0..c)
            .map(|ch| (0..hw).map(|p| x[at(ch, p, l)] as f64).sum::<f64>() / hw as f64)
            .collect();
        let pre_r: Vec<f64> = (0..rd)
            .map(|j| br[j] + (0..c).map(|ch| wr[j * c + ch] * pooled[ch]).sum::<f64>())
            .collect();
        let hidden: Vec<f64> = pre_r.iter().map(|v| v.max(0.0)).collect();
        let pre_e: Vec<f64> = (0..c)
            .map(|ch| be[ch] + (0..rd).map(|j| we[ch * rd + j] * hidden[j]).sum::<f64>())
            .collect();
        let gate: Vec<f64> = pre_e.iter().map(|&v| act64(Act::HardSigmoid, v)).collect();
        // Backward.
        let dpre_e: Vec<f64> = (0..c)
            .map(|ch| {
                let dgate: f64 = (0..hw)
                    .map(|p| dy[at(ch, p, l)] as f64 * x[at(ch, p, l)] as f64)
                    .sum();
                dgate * dact64(Act::HardSigmoid, pre_e[ch])
            })
            .collect();
        let mut dpre_r = vec![0.0; rd];
        for ch in 0..c {
            r.dbe[ch] += dpre_e[ch];
            for j in 0..rd {
                r.dwe[ch * rd + j] += dpre_e[ch] * hidden[j];
                dpre_r[j] += we[ch * rd + j] * dpre_e[ch];
            }
        }
        let mut dpooled = vec![0.0; c];
        for j in 0..rd {
            if pre_r[j] <= 0.0 {
                dpre_r[j] = 0.0;
            }
            r.dbr[j] += dpre_r[j];
            for ch in 0..c {
                r.dwr[j * c + ch] += dpre_r[j] * pooled[ch];
                dpooled[ch] += wr[j * c + ch] * dpre_r[j];
            }
        }
        for ch in 0..c {
            for p in 0..hw {
                let i = at(ch, p, l);
                r.y[i] = x[i] as f64 * gate[ch];
                r.dx[i] = dy[i] as f64 * gate[ch] + dpooled[ch] / hw as f64;
            }
        }
    }
    r
}

#[test]
fn squeeze_excite_forward_and_backward_match_a_naive_reference() {
    // b = 1 takes the single-lane pooling path, 3 and 17 the per-lane sums, 16 the 16-lane
    // sums in one register (over two 64-pixel blocks here).
    for &(c, hw, b, rd) in &[(5, 7, 1, 3), (6, 9, 3, 4), (4, 70, 17, 2), (3, 100, 16, 2)] {
        let x = vals(c * hw * b, 10, 2.0);
        let dy = vals(x.len(), 11, 1.0);
        let wr = vals(rd * c, 12, 1.0);
        let br = vals(rd, 13, 0.5);
        // Scaled so the gate's pre-activations fall on both sides of ±3.
        let we = vals(c * rd, 14, 4.0);
        let be = vals(c, 15, 1.0);
        let mut y = vec![0f32; x.len()];
        let saved = kernels::se_fwd(&x, c, b, hw, rd, &wr, &br, &we, &be, &mut y);
        // The pooled means exactly (lanes): f32 sums over blocks of 64 pixels in order, then
        // f64. (One image sums its plane with `sum`, another order.)
        for ci in (0..c).filter(|_| b > 1) {
            for l in 0..b {
                let mut total = 0f64;
                for blk in (0..hw).step_by(64) {
                    let mut s = 0f32;
                    for p in blk..(blk + 64).min(hw) {
                        s += x[(ci * hw + p) * b + l];
                    }
                    total += s as f64;
                }
                let want = (total / hw as f64) as f32;
                assert_eq!(
                    saved.pooled[ci * b + l].to_bits(),
                    want.to_bits(),
                    "pooled c{ci} l{l}"
                );
            }
        }
        let r = se_reference(&x, &dy, (c, hw, b, rd), &wr, &br, &we, &be);
        let what = format!("SE c{c} hw{hw} b{b} rd{rd}");
        assert_close(&y, &r.y, 1e-5, &format!("{what}: y"));
        let mut d = dy.clone();
        let (dwr, dbr, dwe, dbe) = kernels::se_bwd(&x, &mut d, c, b, hw, rd, &wr, &we, &saved);
        assert_close(&d, &r.dx, 1e-4, &format!("{what}: dx"));
        assert_close(&dwr, &r.dwr, 1e-4, &format!("{what}: dWr"));
        assert_close(&dbr, &r.dbr, 1e-4, &format!("{what}: dbr"));
        assert_close(&dwe, &r.dwe, 1e-4, &format!("{what}: dWe"));
        assert_close(&dbe, &r.dbe, 1e-4, &format!("{what}: dbe"));
    }
}

// ---------------------------------------------------------------------------------------------
// 2× nearest upsample + add.

#[test]
fn upsample_add_by_hand() {
    // One channel, small (1 × 2) with B = 2: lanes (a, b) per pixel.
    let small = [1f32, 10.0, 2.0, 20.0];
    let big: Vec<f32> = (0..16).map(|v| v as f32 * 100.0).collect();
    let mut y = vec![0f32; 16];
    kernels::up2_add(&small, &big, (1, 2, 2), &mut y);
    // (2 × 4) output: columns 0, 1 read small pixel 0, columns 2, 3 pixel 1, both rows.
    let up = [1f32, 10.0, 1.0, 10.0, 2.0, 20.0, 2.0, 20.0];
    let want: Vec<f32> = (0..16).map(|i| big[i] + up[i % 8]).collect();
    assert_eq!(y, want);
    // The adjoint: 2×2 block sums per lane.
    let dy: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let mut ds = [0f32; 4];
    kernels::up2_bwd(&dy, (1, 2, 2), &mut ds);
    // Block of small pixel 0, lane 0: output pixels (0,0), (0,1), (1,0), (1,1) → 0 + 2 + 8 + 10.
    assert_eq!(ds, [20.0, 24.0, 36.0, 40.0]);
}

#[test]
fn upsample_backward_is_the_adjoint_of_the_forward() {
    for &(c, h, w, b) in &[(3, 4, 5, 1), (2, 3, 3, 9), (1, 7, 2, 20)] {
        let small = vals(c * h * w * b, 20, 1.0);
        let zeros = vec![0f32; 4 * small.len()];
        let dy = vals(zeros.len(), 21, 1.0);
        let mut up = vec![0f32; zeros.len()];
        kernels::up2_add(&small, &zeros, (h, w, b), &mut up);
        let mut ds = vec![0f32; small.len()];
        kernels::up2_bwd(&dy, (h, w, b), &mut ds);
        // ⟨up2(s), dy⟩ = ⟨s, up2ᵀ(dy)⟩.
        let lhs: f64 = up.iter().zip(&dy).map(|(&a, &b)| a as f64 * b as f64).sum();
        let rhs: f64 = small
            .iter()
            .zip(&ds)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{c}x{h}x{w} B{b}: {lhs} vs {rhs}"
        );
        // And the forward really adds `big`.
        let big = vals(zeros.len(), 22, 1.0);
        let mut y = vec![0f32; big.len()];
        kernels::up2_add(&small, &big, (h, w, b), &mut y);
        for i in 0..y.len() {
            assert_eq!(y[i], big[i] + up[i], "{c}x{h}x{w} B{b}: element {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Depthwise convolutions (CHWN).

/// Output `(C, Ho, Wo, B)`, input gradient and kernel gradient of a depthwise correlation
/// with padding `k/2`, naive loops in f64.
fn depthwise_reference(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b, k) = (g.b, g.k);
    let mut y = vec![0.0; g.c * g.ho * g.wo * b];
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    for c in 0..g.c {
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                for ky in 0..k {
                    for kx in 0..k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            continue;
                        }
                        let wi = (c * k + ky) * k + kx;
                        for l in 0..b {
                            let xi = ((c * g.h + iy as usize) * g.w + ix as usize) * b + l;
                            let yi = ((c * g.ho + oy) * g.wo + ox) * b + l;
                            y[yi] += w[wi] as f64 * x[xi] as f64;
                            dx[xi] += w[wi] as f64 * dy[yi] as f64;
                            dw[wi] += dy[yi] as f64 * x[xi] as f64;
                        }
                    }
                }
            }
        }
    }
    (y, dx, dw)
}

#[test]
fn depthwise_forward_and_backward_match_a_naive_reference_at_strides_1_and_2() {
    // Batches < 8 take the row kernel, ≥ 8 the lane kernels (16 + 4, 8 + 1 blocks).
    for &(b, c, h, w, k, s) in &[
        (1, 2, 7, 6, 3, 1),
        (3, 3, 8, 9, 3, 2),
        (2, 2, 9, 7, 5, 1),
        (1, 2, 9, 10, 5, 2),
        (9, 2, 6, 5, 3, 1),
        (20, 2, 7, 7, 5, 2),
        (16, 1, 5, 6, 3, 2),
        (8, 2, 4, 4, 5, 1),
        (8, 2, 9, 12, 3, 1),
    ] {
        let g = ConvGeom::new(b, c, h, w, k, s);
        let x = vals(c * h * w * b, 30, 1.0);
        let wt = vals(c * k * k, 31, 1.0);
        let dy = vals(c * g.ho * g.wo * b, 32, 1.0);
        let (y_ref, dx_ref, dw_ref) = depthwise_reference(&g, &x, &wt, &dy);
        let what = format!("depthwise B{b} C{c} {h}x{w} k{k} s{s}");
        // Stale contents in the outputs (as from the pool): every element must be written.
        let mut y = vec![f32::NAN; y_ref.len()];
        kernels::depthwise_fwd(&g, &x, &wt, &mut y, None);
        assert_close(&y, &y_ref, 1e-5, &format!("{what}: y"));
        let mut dx = vec![f32::NAN; x.len()];
        kernels::depthwise_bwd_input(&g, &dy, &wt, &mut dx);
        assert_close(&dx, &dx_ref, 1e-5, &format!("{what}: dx"));
        let mut dw = vec![f32::NAN; wt.len()];
        kernels::depthwise_bwd_kernel(&g, &x, &dy, &mut dw);
        assert_close(&dw, &dw_ref, 1e-4, &format!("{what}: dw"));
    }
}

/// The lane kernels' outputs are one f32 FMA chain over the valid taps in `(ky, kx)` order,
/// bit for bit: on the plane itself and on its zero-bordered copy (stride 1 with k = 5), the
/// blocks that overlap at a row's end (widths not a multiple of 4) included, and at 8 images
/// (two outputs to a vector at stride 1).
#[test]
fn depthwise_lanes_sum_the_valid_taps_in_order_exactly() {
    for &(b, h, w, k, s) in &[
        (16, 7, 7, 5, 1),
        (16, 14, 13, 5, 1),
        (24, 6, 5, 5, 1),
        (16, 9, 10, 3, 1),
        (16, 11, 9, 5, 2),
        (16, 12, 12, 3, 2),
        // 8 images at stride 1: two outputs to a vector (blocks of 4 pairs, single pairs,
        // single outputs at the borders and odd row ends), on the plane and padded.
        (8, 7, 7, 5, 1),
        (8, 14, 13, 5, 1),
        (8, 9, 10, 3, 1),
        (8, 28, 28, 3, 1),
        (8, 11, 9, 5, 2),
    ] {
        let c = 2;
        let g = ConvGeom::new(b, c, h, w, k, s);
        let x = vals(c * h * w * b, 40, 1.0);
        let wt = vals(c * k * k, 41, 1.0);
        let mut y = vec![f32::NAN; c * g.ho * g.wo * b];
        kernels::depthwise_fwd(&g, &x, &wt, &mut y, None);
        for ci in 0..c {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    for l in 0..b {
                        let mut acc = 0f32;
                        for ky in 0..k {
                            for kx in 0..k {
                                let (Some(iy), Some(ix)) = (
                                    (oy * s + ky).checked_sub(g.pad).filter(|&i| i < h),
                                    (ox * s + kx).checked_sub(g.pad).filter(|&i| i < w),
                                ) else {
                                    continue;
                                };
                                let xv = x[((ci * h + iy) * w + ix) * b + l];
                                acc = wt[(ci * k + ky) * k + kx].mul_add(xv, acc);
                            }
                        }
                        let got = y[((ci * g.ho + oy) * g.wo + ox) * b + l];
                        assert_eq!(
                            got.to_bits(),
                            acc.to_bits(),
                            "B{b} {h}x{w} k{k} s{s}: c{ci} ({oy},{ox}) lane {l}: {got} vs {acc}"
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dense-conv columns and layouts.

#[test]
fn col2im_is_the_adjoint_of_im2col() {
    for &(b, c, h, w, k, s) in &[(2, 3, 7, 6, 3, 2), (1, 2, 5, 5, 3, 1), (5, 2, 6, 4, 1, 2)] {
        let g = ConvGeom::new(b, c, h, w, k, s);
        let x = vals(c * h * w * b, 40, 1.0);
        let rows = c * k * k;
        let ncols = g.ho * g.wo * b;
        let mut cols = vec![f32::NAN; rows * ncols];
        kernels::im2col(&g, &x, 0, g.ho, &mut cols);
        // Each column entry is the tap's input value, or 0 in the padding.
        for ci in 0..c {
            for ky in 0..k {
                for kx in 0..k {
                    for oy in 0..g.ho {
                        for ox in 0..g.wo {
                            for l in 0..b {
                                let iy = (oy * s + ky) as isize - g.pad as isize;
                                let ix = (ox * s + kx) as isize - g.pad as isize;
                                let inside =
                                    iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize;
                                let want = if inside {
                                    x[((ci * h + iy as usize) * w + ix as usize) * b + l]
                                } else {
                                    0.0
                                };
                                let row = (ci * k + ky) * k + kx;
                                let got = cols[row * ncols + (oy * g.wo + ox) * b + l];
                                assert_eq!(got, want, "im2col row {row} at ({oy},{ox},{l})");
                            }
                        }
                    }
                }
            }
        }
        // ⟨im2col(x), d⟩ = ⟨x, col2im(d)⟩, with col2im run in two chunks of output rows.
        let d = vals(cols.len(), 41, 1.0);
        let mut dx = vec![0f32; x.len()];
        let split = g.ho / 2;
        let mut chunk = Vec::new();
        for (oy0, oy1) in [(0, split), (split, g.ho)] {
            let n = (oy1 - oy0) * g.wo * b;
            chunk.clear();
            for r in 0..rows {
                chunk.extend_from_slice(
                    &d[r * ncols + oy0 * g.wo * b..r * ncols + oy0 * g.wo * b + n],
                );
            }
            kernels::col2im(&g, &chunk, oy0, oy1, &mut dx);
        }
        let lhs: f64 = cols
            .iter()
            .zip(&d)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}

#[test]
fn layout_conversions_are_inverse_transposes() {
    // 16 images take the 16 × 16 block transpose back (70 pixels: 4 blocks and 6 more).
    for (b, c, hw) in [(3, 5, 70), (16, 3, 70)] {
        layout_case(b, c, hw);
    }
}

fn layout_case(b: usize, c: usize, hw: usize) {
    let nchw = vals(b * c * hw, 50, 1.0);
    let mut chwn = vec![f32::NAN; nchw.len()];
    kernels::nchw_to_chwn(&nchw, b, c, hw, &mut chwn);
    for bi in 0..b {
        for ci in 0..c {
            for p in 0..hw {
                assert_eq!(chwn[(ci * hw + p) * b + bi], nchw[(bi * c + ci) * hw + p]);
            }
        }
    }
    let mut back = vec![f32::NAN; nchw.len()];
    kernels::chwn_to_nchw(&chwn, c, hw, b, &mut back);
    assert_eq!(back, nchw);
}

/// Timing of the depthwise kernels at MobileNetV3-Small's shapes, batch 16 at 224 px (not a
/// check; `cargo test --release --lib depthwise_parts -- --ignored --nocapture`).
#[test]
#[ignore]
fn depthwise_parts() {
    use super::kernels::{depthwise_bwd_input, depthwise_bwd_kernel, depthwise_fwd, ConvGeom};
    let clock = super::prof::clock;
    for &(c, hw, k, s) in &[
        (16usize, 112usize, 3usize, 2usize),
        (72, 56, 3, 2),
        (88, 28, 3, 1),
        (96, 28, 5, 2),
        (240, 14, 5, 1),
        (288, 14, 5, 2),
        (576, 7, 5, 1),
    ] {
        let g = ConvGeom::new(16, c, hw, hw, k, s);
        let x = vals(c * hw * hw * 16, 1, 1.0);
        let w = vals(c * k * k, 2, 1.0);
        let dy = vals(c * g.ho * g.wo * 16, 3, 1.0);
        let mut y = vec![0f32; dy.len()];
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; w.len()];
        let flops = (2 * c * g.ho * g.wo * 16 * k * k) as f64;
        let mut best = [f64::MAX; 3];
        for _ in 0..5 {
            let t0 = clock();
            depthwise_fwd(&g, &x, &w, &mut y, None);
            let t1 = clock();
            depthwise_bwd_input(&g, &dy, &w, &mut dx);
            let t2 = clock();
            depthwise_bwd_kernel(&g, &x, &dy, &mut dw);
            let t3 = clock();
            best[0] = best[0].min(t1 - t0);
            best[1] = best[1].min(t2 - t1);
            best[2] = best[2].min(t3 - t2);
        }
        eprintln!(
            "c {c} {hw}x{hw} k{k} s{s}: fwd {:.2} ms ({:.0} GFLOP/s), dx {:.2} ms ({:.0}), dw {:.2} ms ({:.0})",
            best[0] * 1e3, flops / best[0] / 1e9, best[1] * 1e3, flops / best[1] / 1e9, best[2] * 1e3, flops / best[2] / 1e9
        );
    }
}

/// The register transpose of `to_lanes16` puts every value where the plain loop does, for
/// whole blocks, a partial last block and lanes inside a wider stride.
#[test]
fn to_lanes16_is_the_plain_transpose() {
    for (n, gap, stride) in [
        (16, 40, 16),
        (37, 50, 16),
        (224, 300, 32),
        (5, 9, 16),
        (0, 3, 16),
    ] {
        let src: Vec<f32> = (0..7 + 15 * gap + n).map(|i| i as f32).collect();
        let mut dst = vec![-1f32; n.max(1) * stride + 16];
        kernels::to_lanes16(&src, (7, gap), n, &mut dst, stride);
        for p in 0..n {
            for l in 0..16 {
                assert_eq!(
                    dst[p * stride + l],
                    src[7 + l * gap + p],
                    "n {n} pixel {p} lane {l}"
                );
            }
            for l in 16..stride {
                assert_eq!(dst[p * stride + l], -1.0, "lane {l} past the 16 untouched");
            }
        }
    }
}
