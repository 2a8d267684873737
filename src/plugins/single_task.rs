//! The `single_task` reference: each stage trains its task alone from the same initial
//! weights (the challenge's "single-task baseline"). After every stage but the last the
//! model, BatchNorm statistics included, goes back to the weights it started the run with.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;

use super::{Plugin, PluginState, RunCtx};

pub struct SingleTask {
    init: BTreeMap<String, Tensor>,
}

impl SingleTask {
    /// Remember `varmap` as it is now (the run's initial weights).
    pub fn new(varmap: &VarMap) -> Result<Self> {
        Ok(Self {
            init: crate::model::tensors_of(varmap)?,
        })
    }
}

impl Plugin for SingleTask {
    fn name(&self) -> &str {
        "single_task"
    }

    fn after_stage(&mut self, ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        if ctx.stage + 1 < ctx.stages.len() {
            crate::model::set_from(ctx.varmap, &self.init)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<PluginState> {
        Ok(PluginState {
            json: serde_json::Value::Null,
            tensors: self.init.clone(),
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        anyhow::ensure!(
            !state.tensors.is_empty(),
            "single_task state lacks the initial weights"
        );
        self.init = state.tensors;
        Ok(())
    }
}
