//! Experience replay (the report's strategy, generalised): every step of a later stage also
//! trains `images_per_batch` samples of earlier tasks, drawn from the images those tasks'
//! stages actually trained on, with `loss = L_new + weight · L_replay`. With several
//! replayed tasks, samples are shared out round-robin (or at random) and `L_replay` is the
//! sample-weighted mean of their losses.

use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{ExtraBatch, LossTerm, Plugin, PluginState, RunCtx, StepView};
use crate::config::{Experiment, ReplaySampling};
use crate::data::Augment;
use crate::tasks::Split;

pub struct Replay {
    images_per_batch: usize,
    weight: f64,
    sampling: ReplaySampling,
    /// Tasks replayed in the current stage, with the training indices each may draw from.
    tasks: Vec<(String, Vec<usize>)>,
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

/// The union of the training indices of every earlier stage that trained `task`.
fn trained_indices(ctx: &RunCtx, task: &str) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for (k, pool) in ctx.pools.iter().enumerate().take(ctx.stage) {
        if ctx.stages[k].task == task {
            for &i in pool {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
    }
    out
}

impl Plugin for Replay {
    fn name(&self) -> &str {
        "replay"
    }

    fn loss_terms(&self) -> Vec<String> {
        vec!["replay".into()]
    }

    fn before_stage(&mut self, ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        self.tasks = ctx
            .exp
            .replayed_tasks(ctx.stage)
            .into_iter()
            .map(|t| {
                let pool = trained_indices(ctx, &t);
                (t, pool)
            })
            .filter(|(_, pool)| !pool.is_empty())
            .collect();
        self.cursor = 0;
        Ok(())
    }

    fn extra_batches(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<Vec<ExtraBatch>> {
        if self.tasks.is_empty() {
            return Ok(vec![]);
        }
        let counts = self.shares(rng);
        let mut out = Vec::new();
        for ((task, pool), n) in self.tasks.iter().zip(counts) {
            if n == 0 {
                continue;
            }
            let indices: Vec<usize> = (0..n)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect();
            let t = ctx.tasks.get(task)?;
            let augs: Vec<Augment> = indices
                .iter()
                .map(|&i| ctx.augment.draw(rng, t.image_aspect(Split::Train, i)))
                .collect();
            let batch = t.batch(Split::Train, &indices, &augs, ctx.device)?;
            out.push(ExtraBatch {
                task: task.clone(),
                batch,
            });
        }
        Ok(out)
    }

    fn loss(&mut self, ctx: &RunCtx, step: &StepView) -> Result<Vec<LossTerm>> {
        let mut sum = None;
        for rows in &step.mine {
            let task = ctx.tasks.get(rows.task)?;
            let out = ctx.tasks.slice(&rows.of(step.map)?, rows.task)?;
            let l = task.loss(&out, rows.batch)?;
            let w = self.weight * rows.batch.len() as f64 / self.images_per_batch as f64;
            let term = (l.total * w)?;
            sum = Some(match sum {
                Some(s) => (s + &term)?,
                None => term,
            });
        }
        Ok(sum
            .map(|value| LossTerm {
                name: "replay".into(),
                task: None,
                value,
            })
            .into_iter()
            .collect())
    }

    fn state(&self) -> Result<PluginState> {
        Ok(PluginState {
            json: serde_json::json!({ "cursor": self.cursor }),
            ..Default::default()
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        self.cursor = state.json["cursor"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("replay state lacks 'cursor': {}", state.json))?
            as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn replay(sampling: ReplaySampling, images: usize) -> Replay {
        Replay {
            images_per_batch: images,
            weight: 0.8,
            sampling,
            tasks: vec![("seg".into(), vec![0, 1]), ("det".into(), vec![0])],
            cursor: 0,
        }
    }

    #[test]
    fn round_robin_shares_are_balanced_across_steps() {
        let mut r = replay(ReplaySampling::RoundRobin, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(r.shares(&mut rng), vec![2, 1]);
        assert_eq!(r.shares(&mut rng), vec![1, 2]);
    }

    #[test]
    fn random_shares_sum_to_the_budget() {
        let mut r = replay(ReplaySampling::Random, 4);
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
