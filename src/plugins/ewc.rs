//! Elastic weight consolidation (Kirkpatrick et al. 2017), online form (Schwarz et al.
//! 2018): after each stage, the diagonal Fisher information of the stage's task is
//! estimated on the images the stage trained on, and later stages pay
//! `ewc = λ/2 · Σ_i F_i (θ_i − θ*_i)²` around the weights θ* at the end of the latest stage.
//!
//! - Fisher: the empirical Fisher from per-image gradients (batches of one, so that it is
//!   `mean g²`, not the much smaller `(mean g)²` of batched gradients), of the task's own loss
//!   on its own slice, with BatchNorm in inference mode (estimating must not move the
//!   running statistics). EWC cannot protect the running statistics themselves.
//! - Scale: each estimate is divided by its mean over all parameters, so λ does not depend on
//!   the loss's scale or the batch size; accumulated as `F ← γ·F + F_new`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::{LossTerm, Plugin, PluginState, RunCtx, StepView};
use serde::{Deserialize, Serialize};

use super::registry::{BuildCtx, Strategy};
use crate::config::Experiment;
use crate::model::info::is_running_stat;
use crate::tasks::Split;

/// Elastic weight consolidation (Kirkpatrick et al. 2017): a quadratic penalty
/// `λ/2 · Σ F_i (θ_i − θ*_i)²` around the weights at the end of each stage, weighted by the
/// diagonal Fisher information of the finished stage's task on its training images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EwcConfig {
    /// Penalty strength (0 = off). The Fisher is normalised to mean 1 per task, so λ does
    /// not depend on the loss scale.
    pub lambda: f64,
    /// Online EWC (Schwarz et al. 2018): `F ← γ·F + F_new`, anchored at the latest weights;
    /// 1 keeps every task's Fisher in full.
    pub gamma: f64,
    /// Training images used to estimate the Fisher (0 = the whole stage pool).
    pub samples: usize,
}

impl Default for EwcConfig {
    fn default() -> Self {
        Self {
            lambda: 0.0,
            gamma: 1.0,
            samples: 0,
        }
    }
}

pub struct Ewc {
    cfg: EwcConfig,
    /// Accumulated, normalised Fisher per variable.
    fisher: BTreeMap<String, Tensor>,
    /// The anchor: each variable at the end of the latest stage.
    anchor: BTreeMap<String, Tensor>,
}

fn trainable(ctx: &RunCtx) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = ctx
        .varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .filter(|(n, _)| !is_running_stat(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

impl Strategy for Ewc {
    const NAME: &'static str = "ewc";
    type Settings = EwcConfig;

    fn is_on(s: &EwcConfig) -> bool {
        s.lambda > 0.0
    }

    fn validate(c: &EwcConfig, _exp: &Experiment) -> Result<(), String> {
        if !(c.lambda >= 0.0 && c.lambda.is_finite() && (0.0..=1.0).contains(&c.gamma)) {
            return Err("ewc.lambda must be >= 0 and ewc.gamma in [0, 1]".into());
        }
        Ok(())
    }

    fn build(cfg: EwcConfig, _ctx: &BuildCtx) -> Result<Self> {
        Ok(Self::new(&cfg))
    }
}

impl Ewc {
    pub fn new(cfg: &EwcConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            fisher: BTreeMap::new(),
            anchor: BTreeMap::new(),
        }
    }

    /// The penalty `λ/2 · Σ F (θ − θ*)²` for the current weights (`None` before any stage
    /// ended).
    pub fn penalty(&self, vars: &[(String, Var)]) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for (name, var) in vars {
            let (Some(f), Some(star)) = (self.fisher.get(name), self.anchor.get(name)) else {
                continue;
            };
            let d = (var.as_tensor() - star)?;
            let term = (d.sqr()? * f)?.sum_all()?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum.map(|s| s * (0.5 * self.cfg.lambda)).transpose()?)
    }

    /// The normalised diagonal Fisher of the stage's task on its training images.
    fn estimate(&self, ctx: &RunCtx, vars: &[(String, Var)]) -> Result<BTreeMap<String, Tensor>> {
        let name = ctx.stage_task();
        let task = ctx.tasks.get(name)?;
        let pool = &ctx.pools[ctx.stage];
        let n = if self.cfg.samples > 0 {
            self.cfg.samples.min(pool.len())
        } else {
            pool.len()
        };
        let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
        for &i in &pool[..n] {
            let batch = task.batch(Split::Train, &[i], &[], ctx.device)?;
            let map = ctx.model.forward_t(&batch.images, false)?;
            let loss = task.loss(&ctx.tasks.slice(&map, name)?, &batch)?.total;
            let grads = loss.backward()?;
            for (vn, var) in vars {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g2 = g.sqr()?;
                    let e = match acc.remove(vn) {
                        Some(a) => (a + g2)?,
                        None => g2,
                    };
                    acc.insert(vn.clone(), e);
                }
            }
        }
        let (mut total, mut count) = (0f64, 0usize);
        for t in acc.values() {
            total += t.sum_all()?.to_scalar::<f32>()? as f64;
            count += t.elem_count();
        }
        let mean = total / count.max(1) as f64;
        anyhow::ensure!(
            mean.is_finite() && mean > 0.0,
            "ewc: the Fisher information of task '{name}' is {mean} (no gradient reached the model?)"
        );
        acc.into_iter().map(|(k, v)| Ok((k, (v / mean)?))).collect()
    }
}

impl Plugin for Ewc {
    fn name(&self) -> &str {
        "ewc"
    }

    fn loss_terms(&self) -> Vec<String> {
        vec!["ewc".into()]
    }

    fn loss(&mut self, ctx: &RunCtx, _step: &StepView) -> Result<Vec<LossTerm>> {
        Ok(self
            .penalty(&trainable(ctx))?
            .map(|value| LossTerm {
                name: "ewc".into(),
                task: None,
                value,
            })
            .into_iter()
            .collect())
    }

    fn after_stage(&mut self, ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        if ctx.stage + 1 >= ctx.stages.len() {
            return Ok(()); // nothing trains after the last stage
        }
        let vars = trainable(ctx);
        let new = self.estimate(ctx, &vars)?;
        for (k, f) in new {
            let f = match self.fisher.remove(&k) {
                Some(old) => ((old * self.cfg.gamma)? + f)?,
                None => f,
            };
            self.fisher.insert(k, f);
        }
        // Detached: a copy of a variable is still a function of it for backprop, and the
        // penalty's gradient would cancel (measured: EWC then has no effect at all).
        self.anchor = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn state(&self) -> Result<PluginState> {
        let mut tensors = BTreeMap::new();
        for (k, v) in &self.fisher {
            tensors.insert(format!("fisher.{k}"), v.clone());
        }
        for (k, v) in &self.anchor {
            tensors.insert(format!("anchor.{k}"), v.clone());
        }
        Ok(PluginState {
            json: serde_json::Value::Null,
            tensors,
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        self.fisher.clear();
        self.anchor.clear();
        for (name, t) in state.tensors {
            if let Some(k) = name.strip_prefix("fisher.") {
                self.fisher.insert(k.to_string(), t);
            } else {
                let k = name
                    .strip_prefix("anchor.")
                    .with_context(|| format!("ewc state: unexpected tensor {name}"))?;
                self.anchor.insert(k.to_string(), t);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The penalty is 0 at the anchor, grows along high-Fisher directions and ignores moves
    /// along zero-Fisher ones.
    #[test]
    fn penalty_pulls_along_high_fisher_directions_only() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev).unwrap()).unwrap();
        let mut e = Ewc::new(&EwcConfig {
            lambda: 2.0,
            ..EwcConfig::default()
        });
        e.fisher
            .insert("w".into(), Tensor::new(&[4.0f32, 0.0], &dev).unwrap());
        e.anchor
            .insert("w".into(), Tensor::new(&[1.0f32, 2.0], &dev).unwrap());
        let vars = vec![("w".to_string(), var.clone())];
        let at = |v: [f32; 2]| {
            var.set(&Tensor::new(&v, &dev).unwrap()).unwrap();
            e.penalty(&vars)
                .unwrap()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(at([1.0, 2.0]), 0.0);
        // Moving the zero-Fisher coordinate costs nothing…
        assert_eq!(at([1.0, 7.0]), 0.0);
        // …the high-Fisher one costs λ/2 · F · d² = 1 · 4 · 0.25.
        assert!((at([1.5, 2.0]) - 1.0).abs() < 1e-6);
        // And its gradient points back to the anchor.
        var.set(&Tensor::new(&[1.5f32, 2.0], &dev).unwrap())
            .unwrap();
        let g = e.penalty(&vars).unwrap().unwrap().backward().unwrap();
        let g = g.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(g[0] > 0.0 && g[1] == 0.0, "{g:?}");
        // No Fisher yet: no term.
        assert!(Ewc::new(&EwcConfig::default())
            .penalty(&vars)
            .unwrap()
            .is_none());
    }
}
