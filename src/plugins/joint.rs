//! The `joint` reference (every task's data at once: the upper bound a sequential run can
//! hope for). The loop runs one stage over the first task with batches of
//! `batch_size / number of tasks` ([`crate::config::Experiment::plan`]); this plug-in adds
//! as many images of every other task to each step, drawn epoch-wise (every image once per
//! pass, reshuffled after each pass), and adds their losses with weight 1 (term `joint`).

use anyhow::Result;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{ExtraBatch, LossTerm, Plugin, PluginState, RunCtx, StepView};
use crate::data::Augment;
use crate::tasks::Split;

pub struct Joint {
    /// Per other task: its shuffled indices and the position in them.
    order: Vec<(String, Vec<usize>, usize)>,
}

impl Joint {
    pub fn new() -> Self {
        Self { order: vec![] }
    }
}

impl Default for Joint {
    fn default() -> Self {
        Self::new()
    }
}

impl Plugin for Joint {
    fn name(&self) -> &str {
        "joint"
    }

    fn loss_terms(&self) -> Vec<String> {
        vec!["joint".into()]
    }

    fn before_stage(&mut self, ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        let first = ctx.stage_task();
        self.order = ctx
            .exp
            .tasks_in_order()
            .into_iter()
            .filter(|t| t != first)
            .map(|t| (t, vec![], 0))
            .collect();
        Ok(())
    }

    fn extra_batches(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<Vec<ExtraBatch>> {
        let per = ctx.stages[ctx.stage].batch_size;
        let mut out = Vec::new();
        for (name, order, pos) in self.order.iter_mut() {
            let task = ctx.tasks.get(name)?;
            let mut idx = Vec::with_capacity(per);
            while idx.len() < per {
                if *pos >= order.len() {
                    *order = (0..task.len(Split::Train)).collect();
                    order.shuffle(rng);
                    *pos = 0;
                }
                idx.push(order[*pos]);
                *pos += 1;
            }
            let augs: Vec<Augment> = idx
                .iter()
                .map(|&i| ctx.augment.draw(rng, task.image_aspect(Split::Train, i)))
                .collect();
            out.push(ExtraBatch {
                task: name.clone(),
                batch: task.batch(Split::Train, &idx, &augs, ctx.device)?,
            });
        }
        Ok(out)
    }

    fn loss(&mut self, ctx: &RunCtx, step: &StepView) -> Result<Vec<LossTerm>> {
        step.mine
            .iter()
            .map(|rows| {
                let task = ctx.tasks.get(rows.task)?;
                let out = ctx.tasks.slice(&rows.of(step.map)?, rows.task)?;
                Ok(LossTerm {
                    name: "joint".into(),
                    task: Some(rows.task.to_string()),
                    value: task.loss(&out, rows.batch)?.total,
                })
            })
            .collect()
    }

    fn state(&self) -> Result<PluginState> {
        Ok(PluginState {
            json: serde_json::json!(self.order),
            ..Default::default()
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        self.order = serde_json::from_value(state.json.clone())
            .map_err(|e| anyhow::anyhow!("joint state is not readable ({e}): {}", state.json))?;
        Ok(())
    }
}
