//! Uncertainty weighting of task losses (Kendall, Gal & Cipolla 2018): each task t gets a
//! learned log-variance `s_t` (0 at start, optimised with the model), and every loss of task
//! t — the stage's own, replayed and joint ones; distillation and EWC terms are left alone —
//! becomes `½·e^{−s_t}·L_t + ½·s_t`. The
//! optimum is `e^{s_t} = L_t`: the effective weight is ∝ 1/L_t.
//!
//! A warning from `docs/STRATEGIES.md`, measurable with this plug-in: for an earlier task
//! the loss *rises* as it is forgotten, so this lowers its weight exactly then.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};

use serde::{Deserialize, Serialize};

use super::registry::{BuildCtx, Strategy};
use super::{LossTerm, Plugin, PluginState, RunCtx};

/// Uncertainty weighting of task losses (Kendall, Gal & Cipolla 2018): every task's loss
/// `L_t` becomes `½·e^{−s_t}·L_t + ½·s_t` with a learned log-variance `s_t`. Beware: for an
/// earlier task the loss rises as it is forgotten, so this lowers its weight exactly then.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UncertaintyConfig {
    pub enabled: bool,
}

pub struct Uncertainty {
    /// `s_t` per task, in the order tasks are first learned.
    log_vars: Vec<(String, Var)>,
}

impl Strategy for Uncertainty {
    const NAME: &'static str = "uncertainty";
    type Settings = UncertaintyConfig;
    /// A loss weighting, not an anti-forgetting strategy: it may weigh a joint run's terms.
    const IN_REFERENCE_RUNS: bool = true;

    fn is_on(s: &UncertaintyConfig) -> bool {
        s.enabled
    }

    fn build(_cfg: UncertaintyConfig, ctx: &BuildCtx) -> Result<Self> {
        Self::new(&ctx.exp.tasks_in_order(), ctx.device)
    }
}

impl Uncertainty {
    pub fn new(tasks: &[String], device: &candle_core::Device) -> Result<Self> {
        let log_vars = tasks
            .iter()
            .map(|t| Ok((t.clone(), Var::zeros((), DType::F32, device)?)))
            .collect::<Result<_>>()?;
        Ok(Self { log_vars })
    }

    fn var(&self, task: &str) -> Option<&Var> {
        self.log_vars
            .iter()
            .find(|(t, _)| t == task)
            .map(|(_, v)| v)
    }
}

/// `½·e^{−s}·L + ½·s`.
pub fn weigh(loss: &Tensor, s: &Tensor) -> Result<Tensor> {
    let w = (s.neg()?.exp()? * 0.5)?;
    Ok(((loss * &w)? + (s * 0.5)?)?)
}

impl Plugin for Uncertainty {
    fn name(&self) -> &str {
        "uncertainty"
    }

    fn weigh(&mut self, _ctx: &RunCtx, terms: &mut Vec<LossTerm>) -> Result<()> {
        // Task losses only (the stage's own, replayed and joint ones), not regularisers.
        for term in terms
            .iter_mut()
            .filter(|t| matches!(t.name.as_str(), "new" | "replay" | "joint"))
        {
            if let Some(s) = term.task.as_deref().and_then(|t| self.var(t)) {
                term.value = weigh(&term.value, s.as_tensor())?;
            }
        }
        Ok(())
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        self.log_vars
            .iter()
            .map(|(t, v)| (format!("uncertainty.{t}"), v.clone()))
            .collect()
    }

    fn state(&self) -> Result<PluginState> {
        let tensors: BTreeMap<String, Tensor> = self
            .log_vars
            .iter()
            .map(|(t, v)| (t.clone(), v.as_tensor().clone()))
            .collect();
        let values: BTreeMap<&str, f32> = self
            .log_vars
            .iter()
            .map(|(t, v)| Ok((t.as_str(), v.as_tensor().to_scalar::<f32>()?)))
            .collect::<Result<_>>()?;
        Ok(PluginState {
            json: serde_json::json!({ "log_variance": values }),
            tensors,
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        for (t, v) in &self.log_vars {
            let saved = state
                .tensors
                .get(t)
                .with_context(|| format!("uncertainty state lacks task '{t}'"))?;
            v.set(saved)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weighting_is_half_the_loss_at_zero_and_its_optimum_is_the_loss() {
        let dev = Device::Cpu;
        let l = Tensor::new(3.0f32, &dev).unwrap();
        let at = |s: f32| {
            weigh(&l, &Tensor::new(s, &dev).unwrap())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((at(0.0) - 1.5).abs() < 1e-6);
        // d/ds = −½e^{−s}L + ½ = 0 at s = ln L: the minimum over s.
        let opt = 3f32.ln();
        assert!(at(opt) < at(opt - 0.1) && at(opt) < at(opt + 0.1));
        // A larger loss gets a smaller weight at the optimum: e^{−s} = 1/L.
        let s = Var::from_tensor(&Tensor::new(opt, &dev).unwrap()).unwrap();
        let g = weigh(&l, s.as_tensor()).unwrap().backward().unwrap();
        assert!(
            g.get(s.as_tensor())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-6
        );
    }
}
