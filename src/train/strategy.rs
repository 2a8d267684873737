//! Anti-forgetting strategies as plug-ins. The training loop calls these hooks and never
//! changes for a new strategy: a strategy adds batches to a step (replay), adds loss terms
//! (EWC, distillation), or reacts to stage boundaries (snapshot a teacher, estimate Fisher
//! information). Every hook has a no-op default.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::{Experiment, ReplaySampling};
use crate::data::{Augment, AugmentConfig, Batch, TaskDataset};
use crate::model::{HeadOutputs, OneHead};
use crate::TaskKind;

/// What a strategy sees at a step.
pub struct StepContext<'a> {
    pub stage: usize,
    pub task: TaskKind,
    pub device: &'a Device,
    /// Training sets of every task in the experiment, by task.
    pub train_sets: &'a [(TaskKind, TaskDataset)],
    /// How training samples are augmented (draw per sample from the run's RNG).
    pub augment: &'a AugmentConfig,
}

impl StepContext<'_> {
    pub fn train_set(&self, task: TaskKind) -> Option<&TaskDataset> {
        self.train_sets
            .iter()
            .find(|(t, _)| *t == task)
            .map(|(_, d)| d)
    }
}

/// A batch a strategy adds to a step, with the weight of its loss in the total.
pub struct WeightedBatch {
    pub batch: Batch,
    pub weight: f64,
}

pub trait Strategy {
    fn name(&self) -> &'static str;

    /// Called before the first step of stage `stage`.
    fn before_stage(&mut self, _stage: usize, _exp: &Experiment) -> Result<()> {
        Ok(())
    }

    /// Batches trained together with the stage's own batch in one forward pass.
    fn extra_batches(
        &mut self,
        _ctx: &StepContext,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<WeightedBatch>> {
        Ok(vec![])
    }

    /// An extra loss term computed from the step's forward pass (`outputs` covers the
    /// stage's batch followed by the extra batches, `images` is the concatenated input).
    fn extra_loss(
        &mut self,
        _ctx: &StepContext,
        _model: &OneHead,
        _images: &Tensor,
        _outputs: &HeadOutputs,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Called after the last epoch of stage `stage`.
    fn after_stage(&mut self, _stage: usize) -> Result<()> {
        Ok(())
    }

    /// State saved after every epoch for resuming (after `before_stage` of the same stage
    /// has run again, [`Strategy::load_state`] gets it back).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// Experience replay (the report's strategy, generalised): every step of a later stage also
/// trains `images_per_batch` samples drawn from the replayed tasks' training sets, with
/// `loss = L_new + weight · L_replay`. With several replayed tasks, samples are shared out
/// round-robin (or at random) and `L_replay` is the sample-weighted mean of their losses.
pub struct Replay {
    images_per_batch: usize,
    weight: f64,
    sampling: ReplaySampling,
    /// Tasks replayed in the current stage.
    tasks: Vec<TaskKind>,
    /// Round-robin position, carried across steps so every task gets its share.
    cursor: usize,
}

impl Replay {
    pub fn from_experiment(exp: &Experiment) -> Self {
        Self {
            images_per_batch: exp.replay.images_per_batch,
            weight: exp.replay.weight,
            sampling: exp.replay.sampling,
            tasks: vec![],
            cursor: 0,
        }
    }

    /// How many of this step's replayed samples go to each replayed task.
    fn shares(&mut self, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let mut counts = vec![0usize; self.tasks.len()];
        for _ in 0..self.images_per_batch {
            let k = match self.sampling {
                ReplaySampling::RoundRobin => {
                    let k = self.cursor % self.tasks.len();
                    self.cursor += 1;
                    k
                }
                ReplaySampling::Random => rng.random_range(0..self.tasks.len()),
            };
            counts[k] += 1;
        }
        counts
    }
}

impl Strategy for Replay {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn before_stage(&mut self, stage: usize, exp: &Experiment) -> Result<()> {
        self.tasks = exp.replayed_tasks(stage);
        self.cursor = 0;
        Ok(())
    }

    fn extra_batches(
        &mut self,
        ctx: &StepContext,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<WeightedBatch>> {
        if self.tasks.is_empty() {
            return Ok(vec![]);
        }
        let counts = self.shares(rng);
        let mut out = Vec::new();
        for (task, n) in self.tasks.clone().into_iter().zip(counts) {
            if n == 0 {
                continue;
            }
            let ds = ctx
                .train_set(task)
                .ok_or_else(|| anyhow::anyhow!("replay: no training set loaded for {task}"))?;
            let indices: Vec<usize> = (0..n).map(|_| rng.random_range(0..ds.len())).collect();
            let augs: Vec<Augment> = (0..n).map(|_| ctx.augment.draw(rng)).collect();
            let batch = ds.batch_augmented(&indices, &augs, ctx.device)?;
            out.push(WeightedBatch {
                batch,
                weight: self.weight * n as f64 / self.images_per_batch as f64,
            });
        }
        Ok(out)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "cursor": self.cursor })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.cursor = state["cursor"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("replay state lacks 'cursor': {state}"))?
            as usize;
        Ok(())
    }
}

/// The strategies an experiment asks for, in hook order.
pub fn strategies_for(exp: &Experiment) -> Vec<Box<dyn Strategy>> {
    let mut out: Vec<Box<dyn Strategy>> = Vec::new();
    if exp.replay.enabled {
        out.push(Box::new(Replay::from_experiment(exp)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn round_robin_shares_are_balanced_across_steps() {
        let mut r = Replay {
            images_per_batch: 3,
            weight: 0.8,
            sampling: ReplaySampling::RoundRobin,
            tasks: vec![TaskKind::Seg, TaskKind::Det],
            cursor: 0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(r.shares(&mut rng), vec![2, 1]);
        assert_eq!(r.shares(&mut rng), vec![1, 2]);
    }

    #[test]
    fn random_shares_sum_to_the_budget() {
        let mut r = Replay {
            images_per_batch: 4,
            weight: 0.8,
            sampling: ReplaySampling::Random,
            tasks: vec![TaskKind::Seg, TaskKind::Det],
            cursor: 0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut total = [0usize; 2];
        for _ in 0..100 {
            let s = r.shares(&mut rng);
            assert_eq!(s.iter().sum::<usize>(), 4);
            total[0] += s[0];
            total[1] += s[1];
        }
        // Both tasks get a fair share over many steps.
        assert!(total[0] > 150 && total[1] > 150, "{total:?}");
    }
}
