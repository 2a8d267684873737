//! A-GEM, averaged gradient episodic memory (Chaudhry et al., ICLR 2019; Avalanche's
//! `AGEMPlugin`): a gradient-projection method, of another family than distillation and
//! rehearsal losses. An episodic memory keeps `capacity` training images of every finished
//! task; at every step of a later stage the gradient `g` of the step's loss is compared with
//! the gradient `g_ref` of the loss on a sample of the memory, and when they conflict
//! (`g · g_ref < 0`) `g` is projected onto the half-space where the memory's loss does not
//! rise: `g ← g − (g · g_ref / g_ref · g_ref) g_ref`. It needs nothing of a task but its loss,
//! which is what one dense multi-task head needs.
//!
//! The memory's gradient costs one more forward and backward pass per step, on
//! `images_per_batch` images, with the model in the step's own mode (so, as in the reference
//! implementations, that pass also moves BatchNorm's running statistics).

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::registry::{BuildCtx, Strategy};
use super::{BufferMemory, ExtraBatch, Plugin, PluginState, RunCtx};
use crate::config::{Experiment, MAX_BATCH};
use crate::data::Augment;
use crate::model::info::is_running_stat;
use crate::tasks::Split;

/// Largest `capacity` accepted (images per task).
const MAX_CAPACITY: usize = 1_000_000;

/// `[agem]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgemConfig {
    pub enabled: bool,
    /// Episodic memory: images kept of every finished task.
    pub capacity: usize,
    /// Memory images per step behind the reference gradient.
    pub images_per_batch: usize,
    /// Keep as many images of each of the task's classes as `capacity` allows (as
    /// `replay.policy = "class_balanced"`), instead of a uniform sample.
    pub class_balanced: bool,
}

impl Default for AgemConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            capacity: 30,
            images_per_batch: 8,
            class_balanced: false,
        }
    }
}

pub struct Agem {
    cfg: AgemConfig,
    /// `(task, training index)` of every remembered image.
    memory: Vec<(String, usize)>,
    /// This step's memory batches (drawn with the run's RNG before the forward pass).
    pending: Vec<ExtraBatch>,
    /// Steps with a memory gradient, and those whose gradient was projected.
    steps: u64,
    projected: u64,
}

impl Strategy for Agem {
    const NAME: &'static str = "agem";
    type Settings = AgemConfig;

    fn is_on(s: &AgemConfig) -> bool {
        s.enabled
    }

    fn validate(s: &AgemConfig, _exp: &Experiment) -> Result<(), String> {
        if !s.enabled {
            return Ok(());
        }
        if s.capacity == 0 || s.capacity > MAX_CAPACITY {
            return Err(format!(
                "agem.capacity = {} must be from 1 to {MAX_CAPACITY} images per task",
                s.capacity
            ));
        }
        if s.images_per_batch == 0 || s.images_per_batch > MAX_BATCH {
            return Err(format!(
                "agem.images_per_batch = {} must be from 1 to {MAX_BATCH}",
                s.images_per_batch
            ));
        }
        Ok(())
    }

    fn build(cfg: AgemConfig, _ctx: &BuildCtx) -> Result<Self> {
        Ok(Self {
            cfg,
            memory: vec![],
            pending: vec![],
            steps: 0,
            projected: 0,
        })
    }
}

impl Agem {
    /// The loss on this step's memory batches (mean over their images, each task's loss
    /// weighted by its share of them), in the step's mode.
    fn memory_loss(&self, ctx: &RunCtx) -> Result<Tensor> {
        let images: Vec<&Tensor> = self.pending.iter().map(|b| &b.batch.images).collect();
        let map = ctx
            .model
            .forward_parts(&Tensor::cat(&images, 0)?, ctx.backbone_train, true)?;
        let total: usize = self.pending.iter().map(|b| b.batch.len()).sum();
        let mut start = 0;
        let mut loss: Option<Tensor> = None;
        for b in &self.pending {
            let rows = map.narrow(0, start, b.batch.len())?;
            start += b.batch.len();
            let out = ctx.tasks.slice(&rows, &b.task)?;
            let l = ctx.tasks.get(&b.task)?.loss(&out, &b.batch)?.total;
            let l = (l * (b.batch.len() as f64 / total as f64))?;
            loss = Some(match loss {
                Some(acc) => (acc + l)?,
                None => l,
            });
        }
        loss.ok_or_else(|| anyhow::anyhow!("A-GEM: an empty memory batch"))
    }
}

/// `Σ a·b` over the variables both stores hold, in f64.
fn dot(vars: &[Tensor], a: &GradStore, b: &GradStore) -> Result<f64> {
    let mut sum = 0.0;
    for v in vars {
        if let (Some(x), Some(y)) = (a.get(v), b.get(v)) {
            sum += (x * y)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sum)
}

/// A-GEM's projection of `grads` given the memory's gradient `reference` (over `vars`):
/// when they conflict, `g ← g − (g · g_ref / g_ref · g_ref) g_ref`. Whether it projected.
pub fn project(vars: &[Tensor], grads: &mut GradStore, reference: &GradStore) -> Result<bool> {
    let g_ref = dot(vars, grads, reference)?;
    let rr = dot(vars, reference, reference)?;
    if g_ref >= 0.0 || rr <= 0.0 {
        return Ok(false);
    }
    let k = g_ref / rr;
    for v in vars {
        if let (Some(g), Some(r)) = (grads.get(v), reference.get(v)) {
            let projected = (g - (r * k)?)?;
            grads.insert(v, projected);
        }
    }
    Ok(true)
}

impl Plugin for Agem {
    fn name(&self) -> &str {
        "agem"
    }

    fn extra_batches(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<Vec<ExtraBatch>> {
        self.pending.clear();
        if self.memory.is_empty() {
            return Ok(vec![]);
        }
        let picks: Vec<(String, usize)> = (0..self.cfg.images_per_batch)
            .map(|_| self.memory[rng.random_range(0..self.memory.len())].clone())
            .collect();
        let items: Vec<(&str, usize)> = picks.iter().map(|(t, i)| (t.as_str(), *i)).collect();
        for (task, indices) in super::group_by_task(&items) {
            let t = ctx.tasks.get(&task)?;
            let augs: Vec<Augment> = indices
                .iter()
                .map(|&i| ctx.augment.draw(rng, t.image_aspect(Split::Train, i)))
                .collect();
            let batch = t.batch(Split::Train, &indices, &augs, ctx.device)?;
            self.pending.push(ExtraBatch { task, batch });
        }
        // Not part of the step's own forward pass: the memory's gradient must stay apart.
        Ok(vec![])
    }

    fn after_backward(&mut self, ctx: &RunCtx, grads: &mut GradStore) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let reference = self.memory_loss(ctx)?.backward()?;
        self.pending.clear();
        let vars: Vec<Tensor> = {
            let data = ctx.varmap.data().lock().expect("varmap lock");
            data.iter()
                .filter(|(name, _)| !is_running_stat(name))
                .map(|(_, v)| v.as_tensor().clone())
                .collect()
        };
        self.steps += 1;
        if project(&vars, grads, &reference)? {
            self.projected += 1;
        }
        Ok(())
    }

    fn after_stage(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<()> {
        if self.steps > 0 {
            tracing::info!(
                "A-GEM: {} of {} steps of stage {} projected",
                self.projected,
                self.steps,
                ctx.stage + 1
            );
        }
        let task = ctx.stage_task().to_string();
        let mut pool = ctx.pools[ctx.stage].clone();
        pool.shuffle(rng);
        if self.cfg.class_balanced {
            let t = ctx.tasks.get(&task)?;
            let classes: Vec<Option<usize>> = pool
                .iter()
                .map(|&i| t.image_class(Split::Train, i))
                .collect();
            pool = super::replay::class_round_robin(&pool, &classes);
        }
        pool.truncate(self.cfg.capacity);
        self.memory.retain(|(t, _)| *t != task);
        self.memory
            .extend(pool.into_iter().map(|i| (task.clone(), i)));
        self.steps = 0;
        self.projected = 0;
        Ok(())
    }

    fn memory(&self, ctx: &RunCtx) -> Option<BufferMemory> {
        let current = ctx.stage_task();
        let images = self.memory.iter().filter(|(t, _)| t != current).count();
        Some(BufferMemory::new(images, ctx.exp.model.image_size, 0))
    }

    fn state(&self) -> Result<PluginState> {
        Ok(PluginState {
            json: serde_json::json!({
                "memory": self.memory,
                "steps": self.steps,
                "projected": self.projected,
            }),
            tensors: Default::default(),
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        let j = &state.json;
        self.memory = serde_json::from_value(j["memory"].clone())
            .map_err(|e| anyhow::anyhow!("agem state is not readable: {e}"))?;
        self.steps = j["steps"].as_u64().unwrap_or(0);
        self.projected = j["projected"].as_u64().unwrap_or(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_conflicting_gradient_is_projected_onto_the_memory_s_half_space() {
        // g = (1, −2), g_ref = (0, 1): g·g_ref = −2 < 0, so g ← g − (−2 / 1)·g_ref = (1, 0),
        // orthogonal to g_ref; a gradient that agrees with g_ref is left alone.
        let dev = Device::Cpu;
        let w = Var::new(&[0f32, 0.0], &dev).unwrap();
        let store = |v: [f32; 2]| {
            let loss = (w.as_tensor() * Tensor::new(&v, &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            loss.backward().unwrap()
        };
        let vars = vec![w.as_tensor().clone()];
        let (mut g, r) = (store([1.0, -2.0]), store([0.0, 1.0]));
        assert!(project(&vars, &mut g, &r).unwrap());
        let p = g.get(&vars[0]).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(p, [1.0, 0.0]);
        assert_eq!(
            dot(&vars, &g, &r).unwrap(),
            0.0,
            "no longer raises the memory's loss"
        );
        // Agreeing gradients: untouched.
        let mut g = store([1.0, 3.0]);
        assert!(!project(&vars, &mut g, &r).unwrap());
        assert_eq!(
            g.get(&vars[0]).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 3.0]
        );
    }
}
