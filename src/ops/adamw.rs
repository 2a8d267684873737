//! AdamW's update as one CPU pass (the optimiser in `train/optim.rs` calls it for contiguous
//! f32 CPU tensors and falls back to candle's tensor ops elsewhere).

use candle_core::{DType, Result, Tensor};

use super::simd::multiversion;

/// One AdamW update's constants (f64, as the tensor ops take them).
pub struct AdamConsts {
    pub beta: (f64, f64),
    pub bias_correction: (f64, f64),
    pub eps: f64,
    pub lr: f64,
    pub wd: f64,
}

/// The AdamW update of `train::optim::Optimizer::step` in one pass over contiguous f32 CPU tensors:
/// `(θ', m', v')`, or `None` elsewhere (the tensor ops then run). The chain of ~12 tensor ops
/// per parameter (each a pass over memory and an allocation, ~200 parameters) took ~8 ms of
/// a 117 ms training step; this repeats their arithmetic operation for operation — each
/// scalar cast to f32 as candle's `affine` casts it, `x·a + b` rounded twice, `+ 0.0`
/// included — so the values are the same bits (tested against the tensor ops).
pub fn adamw_cpu(
    theta: &Tensor,
    g: &Tensor,
    (m, v): (Option<&Tensor>, Option<&Tensor>),
    c: &AdamConsts,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    use candle_core::Storage;
    let on_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !on_cpu(theta) || !on_cpu(g) || !m.is_none_or(on_cpu) || !v.is_none_or(on_cpu) {
        return Ok(None);
    }
    let n = theta.elem_count();
    let (mut th2, mut m2, mut v2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    {
        let guards = [Some(theta), Some(g), m, v].map(|t| t.map(|t| t.storage_and_layout()));
        let slice = |k: usize| -> Result<Option<&[f32]>> {
            match &guards[k] {
                Some((st, l)) => match &**st {
                    Storage::Cpu(cs) => Ok(Some(super::storage::f32_slice(cs, l, "adamw")?)),
                    _ => Ok(None),
                },
                None => Ok(None),
            }
        };
        let (Some(th), Some(gs)) = (slice(0)?, slice(1)?) else {
            return Ok(None);
        };
        adamw_kernel(
            th,
            gs,
            (slice(2)?, slice(3)?),
            c,
            (&mut th2, &mut m2, &mut v2),
        );
    }
    let (shape, dev) = (theta.shape(), theta.device());
    Ok(Some((
        Tensor::from_vec(th2, shape, dev)?,
        Tensor::from_vec(m2, shape, dev)?,
        Tensor::from_vec(v2, shape, dev)?,
    )))
}

multiversion! {
    /// Element by element, the tensor ops of `train::optim::Optimizer::step` (`affine(a, b)` is `x·a + b`
    /// with `a`, `b` cast to f32; `t / s` is `affine(1/s, 0)`, `t + s` is `affine(1, s)`).
    fn adamw_kernel(th: &[f32], g: &[f32], mv: (Option<&[f32]>, Option<&[f32]>), c: &AdamConsts, out: (&mut [f32], &mut [f32], &mut [f32])) {
        let (m, v) = mv;
        let (th2, m2, v2) = out;
        let (b1, b2) = (c.beta.0 as f32, c.beta.1 as f32);
        let (ob1, ob2) = ((1.0 - c.beta.0) as f32, (1.0 - c.beta.1) as f32);
        let (ibc1, ibc2) = ((1.0 / c.bias_correction.0) as f32, (1.0 / c.bias_correction.1) as f32);
        let (eps, lr, keep) = (c.eps as f32, c.lr as f32, (1.0 - c.lr * c.wd) as f32);
        for j in 0..th.len() {
            let gj = g[j];
            let gm = gj * ob1 + 0.0;
            let mj = match m {
                Some(m) => (m[j] * b1 + 0.0) + gm,
                None => gm,
            };
            let gv = (gj * gj) * ob2 + 0.0;
            let vj = match v {
                Some(v) => (v[j] * b2 + 0.0) + gv,
                None => gv,
            };
            let update = (mj * ibc1 + 0.0) / ((vj * ibc2 + 0.0).sqrt() * 1.0 + eps);
            let decayed = if c.wd > 0.0 { th[j] * keep + 0.0 } else { th[j] };
            th2[j] = decayed - (update * lr + 0.0);
            m2[j] = mj;
            v2[j] = vj;
        }
    }
}
