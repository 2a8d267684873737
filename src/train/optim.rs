//! Optimisers with inspectable, serialisable state (candle_nn's AdamW keeps its moments
//! private, which rules out exact resume) and parameter groups: weight decay applies only to
//! conv/linear weights (rank ≥ 2), never to biases or BatchNorm affine parameters, and
//! BatchNorm running statistics are not parameters at all.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use candle_nn::VarMap;

use crate::config::OptimizerKind;
use crate::model::info::is_running_stat;

/// One trainable variable with its name.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Weight decay applies (rank ≥ 2 tensors).
    pub decay: bool,
    /// This parameter's learning rate is `lr · lr_scale` (a parameter group's rate, as in
    /// PyTorch; decoupled weight decay scales with it).
    pub lr_scale: f64,
}

/// The trainable variables of `varmap`, sorted by name (a fixed order keeps updates and
/// saved state deterministic), minus buffers and minus names starting with any of `frozen`.
pub fn trainable_params(varmap: &VarMap, frozen: &[&str]) -> Vec<Param> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut out: Vec<Param> = data
        .iter()
        .filter(|(name, _)| !is_running_stat(name) && !frozen.iter().any(|p| name.starts_with(p)))
        .map(|(name, var)| Param {
            name: name.clone(),
            decay: var.rank() >= 2,
            var: var.clone(),
            lr_scale: 1.0,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// AdamW (decoupled weight decay, Loshchilov & Hutter) or SGD with momentum
/// (PyTorch's formulation: `buf = μ·buf + g + wd·θ; θ -= lr·buf`).
pub struct Optimizer {
    kind: OptimizerKind,
    params: Vec<Param>,
    weight_decay: f64,
    momentum: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// AdamW: first moments; SGD: momentum buffers. Lazily created on first step.
    m: Vec<Option<Tensor>>,
    /// AdamW second moments.
    v: Vec<Option<Tensor>>,
    step: u64,
    /// AdamW on contiguous f32 CPU tensors in one pass ([`crate::ops::adamw_cpu`]); off only
    /// in the test that holds it to the tensor ops.
    fused_cpu: bool,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: Vec<Param>, weight_decay: f64, momentum: f64) -> Self {
        let n = params.len();
        Self {
            kind,
            params,
            weight_decay,
            momentum,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            m: vec![None; n],
            v: vec![None; n],
            step: 0,
            fused_cpu: true,
        }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Global L2 norm of the gradients of this optimiser's parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update with learning rate `lr`; gradients are scaled by `grad_scale` first
    /// (used for global-norm clipping). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g.clone()
            };
            let theta = p.var.as_tensor();
            let wd = if p.decay { self.weight_decay } else { 0.0 };
            let lr = lr * p.lr_scale;
            if lr == 0.0 {
                // A frozen group: no update, and no moments to keep (as if not optimised).
                continue;
            }
            match self.kind {
                OptimizerKind::Adamw => {
                    let consts = crate::ops::AdamConsts {
                        beta: (self.beta1, self.beta2),
                        bias_correction: (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t)),
                        eps: self.eps,
                        lr,
                        wd,
                    };
                    let moments = (self.m[i].as_ref(), self.v[i].as_ref());
                    let fused = match self.fused_cpu {
                        true => crate::ops::adamw_cpu(theta, &g, moments, &consts)?,
                        false => None,
                    };
                    if let Some((theta_new, m, v)) = fused {
                        p.var.set(&theta_new)?;
                        self.m[i] = Some(m);
                        self.v[i] = Some(v);
                        continue;
                    }
                    let m = match &self.m[i] {
                        Some(m) => ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?,
                        None => (&g * (1.0 - self.beta1))?,
                    };
                    let v = match &self.v[i] {
                        Some(v) => ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                        None => (g.sqr()? * (1.0 - self.beta2))?,
                    };
                    let bc1 = 1.0 - self.beta1.powi(t);
                    let bc2 = 1.0 - self.beta2.powi(t);
                    let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
                    let decayed = if wd > 0.0 {
                        (theta * (1.0 - lr * wd))?
                    } else {
                        theta.clone()
                    };
                    p.var.set(&(decayed - (update * lr)?)?)?;
                    self.m[i] = Some(m);
                    self.v[i] = Some(v);
                }
                OptimizerKind::Sgd => {
                    let g = if wd > 0.0 { (g + (theta * wd)?)? } else { g };
                    let buf = match &self.m[i] {
                        Some(b) if self.momentum > 0.0 => ((b * self.momentum)? + g)?,
                        _ => g,
                    };
                    p.var.set(&(theta - (&buf * lr)?)?)?;
                    self.m[i] = Some(buf);
                }
            }
        }
        Ok(())
    }

    /// The optimiser state as named tensors (for checkpoints / exact resume).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (i, p) in self.params.iter().enumerate() {
            if let Some(m) = &self.m[i] {
                out.insert(format!("m.{}", p.name), m.clone());
            }
            if let Some(v) = &self.v[i] {
                out.insert(format!("v.{}", p.name), v.clone());
            }
        }
        out.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restore what [`Self::state_tensors`] saved (tensors are moved to each parameter's device).
    pub fn load_state_tensors(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            let dev = p.var.device();
            self.m[i] = state
                .get(&format!("m.{}", p.name))
                .map(|t| t.to_device(dev))
                .transpose()?;
            self.v[i] = state
                .get(&format!("v.{}", p.name))
                .map(|t| t.to_device(dev))
                .transpose()?;
        }
        if let Some(s) = state.get("step") {
            self.step = s.to_vec1::<f64>()?[0] as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn param(name: &str, values: &[f32], shape: &[usize]) -> Param {
        let var =
            Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap();
        Param {
            name: name.into(),
            decay: var.rank() >= 2,
            var,
            lr_scale: 1.0,
        }
    }

    /// Hand-computed: AdamW's first step moves every coordinate by lr·sign(g) (bias-corrected
    /// m/√v = g/|g|), then decay multiplies by (1 − lr·wd) for rank-2 weights only.
    #[test]
    fn adamw_first_step_matches_hand_computation() {
        let w = param("w", &[1.0, -2.0, 3.0, 0.5], &[2, 2]);
        let b = param("b", &[1.0, 1.0], &[2]);
        let (wt, bt) = (w.var.as_tensor().clone(), b.var.as_tensor().clone());
        let loss = ((wt.sum_all().unwrap() * 2.0).unwrap() - bt.sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = Optimizer::new(OptimizerKind::Adamw, vec![w, b], 0.1, 0.0);
        opt.step(&grads, 0.01, 1.0).unwrap();
        let w_new = opt.params()[0]
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b_new = opt.params()[1].var.as_tensor().to_vec1::<f32>().unwrap();
        let expect_w = [1.0f32, -2.0, 3.0, 0.5].map(|x| x * (1.0 - 0.01 * 0.1) - 0.01);
        for (a, e) in w_new.iter().zip(expect_w) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
        // g = -1 for b: moves up by lr, no decay on a bias.
        for a in b_new {
            assert!((a - 1.01).abs() < 1e-6, "{a}");
        }
    }

    /// The one-pass CPU update gives the tensor ops' bits: θ, m and v over five steps, with and
    /// without weight decay, a gradient scale, zero and negative gradients.
    #[test]
    fn adamw_cpu_pass_matches_the_tensor_ops_bit_for_bit() {
        let vals = |n: usize, seed: u64| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed);
                    let x = ((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                    if i % 7 == 0 {
                        0.0
                    } else {
                        x * 3.0
                    }
                })
                .collect()
        };
        let make = || {
            vec![
                param("w", &vals(96, 1), &[8, 12]),
                param("b", &vals(13, 2), &[13]),
            ]
        };
        let mut opts = [true, false].map(|fused| {
            let mut o = Optimizer::new(OptimizerKind::Adamw, make(), 0.05, 0.0);
            o.fused_cpu = fused;
            o
        });
        for step in 0..5u64 {
            for o in opts.iter_mut() {
                let loss = o
                    .params()
                    .iter()
                    .enumerate()
                    .map(|(k, p)| {
                        let r = Tensor::from_vec(
                            vals(p.var.elem_count(), 10 + step + k as u64),
                            p.var.shape(),
                            &Device::Cpu,
                        )
                        .unwrap();
                        (p.var.as_tensor() * r).unwrap().sum_all().unwrap()
                    })
                    .reduce(|a, b| (a + b).unwrap())
                    .unwrap();
                let grads = loss.backward().unwrap();
                let scale = if step == 3 { 0.37 } else { 1.0 };
                o.step(&grads, 0.01, scale).unwrap();
            }
        }
        let bits = |o: &Optimizer| -> Vec<u32> {
            let mut out: Vec<u32> = Vec::new();
            for t in o.state_tensors().unwrap().values().chain(
                o.params()
                    .iter()
                    .map(|p| p.var.as_tensor())
                    .collect::<Vec<_>>(),
            ) {
                if t.dtype() == DType::F32 {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    out.extend(v.iter().map(|x| x.to_bits()));
                }
            }
            out
        };
        // The fused optimiser did take the one-pass path.
        let t = opts[0].params()[0].var.as_tensor().clone();
        let c = crate::ops::AdamConsts {
            beta: (0.9, 0.999),
            bias_correction: (0.1, 0.001),
            eps: 1e-8,
            lr: 0.01,
            wd: 0.0,
        };
        assert!(crate::ops::adamw_cpu(&t, &t, (None, None), &c)
            .unwrap()
            .is_some());
        let (a, b) = (bits(&opts[0]), bits(&opts[1]));
        assert_eq!(a.len(), 2 * (96 + 13) + 96 + 13);
        assert_eq!(a, b, "fused AdamW differs from the tensor ops");
    }

    #[test]
    fn lr_scale_scales_the_step_of_its_parameter_only() {
        let mut a = param("a", &[1.0], &[1]);
        let b = param("b", &[1.0], &[1]);
        a.lr_scale = 0.1;
        let (ta, tb) = (a.var.as_tensor().clone(), b.var.as_tensor().clone());
        let grads = (ta.sum_all().unwrap() + tb.sum_all().unwrap())
            .unwrap()
            .backward()
            .unwrap();
        let mut opt = Optimizer::new(OptimizerKind::Adamw, vec![a, b], 0.0, 0.0);
        opt.step(&grads, 0.01, 1.0).unwrap();
        // AdamW's first step moves by lr·sign(g): 0.001 for a, 0.01 for b.
        let va = opt.params()[0].var.as_tensor().to_vec1::<f32>().unwrap()[0];
        let vb = opt.params()[1].var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!(
            (va - 0.999).abs() < 1e-6 && (vb - 0.99).abs() < 1e-6,
            "{va} {vb}"
        );
    }

    #[test]
    fn sgd_momentum_accumulates() {
        let w = param("w", &[1.0], &[1]);
        let t = w.var.as_tensor().clone();
        let mut opt = Optimizer::new(OptimizerKind::Sgd, vec![w], 0.0, 0.9);
        for _ in 0..2 {
            let grads = (t.sum_all().unwrap() * 3.0).unwrap().backward().unwrap();
            opt.step(&grads, 0.1, 1.0).unwrap();
        }
        // step1: buf=3, w=1-0.3=0.7; step2: buf=0.9·3+3=5.7, w=0.7-0.57=0.13
        let v = opt.params()[0].var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((v - 0.13).abs() < 1e-6, "{v}");
    }

    #[test]
    fn state_round_trips() {
        let w = param("w", &[1.0, 2.0], &[2]);
        let t = w.var.as_tensor().clone();
        let mut opt = Optimizer::new(OptimizerKind::Adamw, vec![w], 0.0, 0.0);
        let grads = t.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(&grads, 0.1, 1.0).unwrap();
        let state = opt.state_tensors().unwrap();
        let w2 = param("w", &[1.0, 2.0], &[2]);
        let mut opt2 = Optimizer::new(OptimizerKind::Adamw, vec![w2], 0.0, 0.0);
        opt2.load_state_tensors(&state).unwrap();
        assert_eq!(opt2.steps_taken(), 1);
        let m1 = state["m.w"].to_vec1::<f32>().unwrap();
        let m2 = opt2.state_tensors().unwrap()["m.w"]
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(m1, m2);
    }
}
