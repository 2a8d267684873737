//! Dark Experience Replay, as published (Buzzega et al., NeurIPS 2020; Mammoth
//! `models/der.py`, `derpp.py`): a **reservoir buffer of fixed size** over every image the
//! run trains on, each kept with the head's outputs for its own task **as they were when the
//! image was trained** (the step's forward pass, before that step's update); every step
//! replays `images_per_batch` buffered images and pulls the model's raw outputs toward the
//! stored ones with an **MSE** (`alpha`). DER++ adds a second buffer sample trained on its
//! labels (`beta`).
//!
//! Dense outputs change with the crop: a stored segmentation or detection map belongs to the
//! augmented image it was computed on. So each buffered image keeps the augmentation drawn
//! when it was trained and is replayed with it for the MSE term (Mammoth re-augments, which
//! is harmless for its classification logits but would misalign a dense map); the DER++
//! label batch is augmented afresh, as any training image (its labels move with it).
//!
//! Replay starts as soon as the buffer holds anything, in the first stage too (the buffer
//! samples the current task's stream as well), as in the reference implementation.

use anyhow::{Context, Result};
use candle_core::Tensor;
use rand::seq::index::sample;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::registry::{BuildCtx, Strategy};
use super::{BufferMemory, ExtraBatch, LossTerm, Plugin, PluginState, RunCtx, StepView};
use crate::config::{Experiment, MAX_BATCH};
use crate::data::Augment;
use crate::tasks::Split;

/// Largest `capacity` accepted (images, each with its stored outputs).
const MAX_CAPACITY: usize = 1_000_000;

/// `[der]`: DER (`alpha`) and DER++ (`alpha` and `beta`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DerConfig {
    /// Weight of the MSE between the outputs now and the stored ones (0 = off).
    pub alpha: f64,
    /// DER++: weight of the task loss on a second buffer sample (0 = plain DER).
    pub beta: f64,
    /// Buffer size in images, over all tasks (reservoir sampling of the training stream).
    pub capacity: usize,
    /// Buffer images per step for each term (Mammoth's `minibatch_size`).
    pub images_per_batch: usize,
}

impl Default for DerConfig {
    fn default() -> Self {
        Self {
            alpha: 0.0,
            beta: 0.0,
            capacity: 0,
            images_per_batch: 8,
        }
    }
}

/// One buffered image: its task, its index in the task's training split, the augmentation
/// it was trained with, and the head's outputs for its task then (`(1, C_task, h, w)`).
#[derive(Debug, Clone)]
struct Item {
    task: String,
    index: usize,
    aug: Augment,
    outputs: Tensor,
}

/// What the reservoir does with one image of the coming step.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    /// The buffer is not full yet: append.
    Append,
    /// Replace entry j.
    Replace(usize),
    /// Not kept.
    Drop,
}

/// What a step's extra batches are for, in the order they were returned.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Use {
    /// MSE toward the stored outputs of these buffer entries.
    Logits,
    /// DER++: the task loss on the labels.
    Labels,
}

pub struct Der {
    cfg: DerConfig,
    buffer: Vec<Item>,
    /// Training images offered to the reservoir so far.
    seen: u64,
    /// This step's extra batches: their use and, for `Logits`, the buffer entries.
    pending: Vec<(Use, Vec<usize>)>,
    /// The reservoir's decision for each image of this step's batch (drawn with the run's
    /// RNG before the forward pass, applied once its outputs exist).
    decisions: Vec<Slot>,
}

impl Strategy for Der {
    const NAME: &'static str = "der";
    type Settings = DerConfig;

    fn is_on(s: &DerConfig) -> bool {
        s.alpha > 0.0 || s.beta > 0.0
    }

    fn validate(s: &DerConfig, _exp: &Experiment) -> Result<(), String> {
        let finite = |w: f64| w >= 0.0 && w.is_finite();
        if !finite(s.alpha) || !finite(s.beta) {
            return Err("der.alpha and der.beta must be >= 0".into());
        }
        if !Self::is_on(s) {
            return Ok(());
        }
        if s.capacity == 0 || s.capacity > MAX_CAPACITY {
            return Err(format!(
                "der.capacity = {} must be from 1 to {MAX_CAPACITY} images (DER's buffer has a fixed size)",
                s.capacity
            ));
        }
        if s.images_per_batch == 0 || s.images_per_batch > MAX_BATCH {
            return Err(format!(
                "der.images_per_batch = {} must be from 1 to {MAX_BATCH}",
                s.images_per_batch
            ));
        }
        Ok(())
    }

    fn build(cfg: DerConfig, _ctx: &BuildCtx) -> Result<Self> {
        Ok(Self {
            cfg,
            buffer: vec![],
            seen: 0,
            pending: vec![],
            decisions: vec![],
        })
    }
}

impl Der {
    /// Up to `images_per_batch` distinct buffer entries, uniformly.
    fn draw(&self, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let n = self.cfg.images_per_batch.min(self.buffer.len());
        sample(rng, self.buffer.len(), n).into_vec()
    }

    /// The reservoir's decisions for the `b` images of the coming step (Vitter's R: the
    /// n-th image of the stream is kept with probability capacity / n, in a random slot).
    fn decide(&self, b: usize, rng: &mut ChaCha8Rng) -> Vec<Slot> {
        let cap = self.cfg.capacity as u64;
        (1..=b as u64)
            .map(|k| {
                let n = self.seen + k;
                if n <= cap {
                    return Slot::Append;
                }
                match rng.random_range(0..n) {
                    j if j < cap => Slot::Replace(j as usize),
                    _ => Slot::Drop,
                }
            })
            .collect()
    }

    /// Entries `idx` grouped by task (tasks in name order, entries in `idx` order).
    fn by_task(&self, idx: &[usize]) -> Vec<(String, Vec<usize>)> {
        let items: Vec<(&str, usize)> = idx
            .iter()
            .map(|&i| (self.buffer[i].task.as_str(), i))
            .collect();
        super::group_by_task(&items)
    }

    /// Entries `idx` as one extra batch per task, each image with the augmentation it was
    /// trained with (`fresh`: none of that — drawn anew, for DER++'s labels); the entries
    /// of each batch, in row order.
    fn batches(
        &self,
        ctx: &RunCtx,
        idx: &[usize],
        fresh: Option<&mut ChaCha8Rng>,
    ) -> Result<Vec<(ExtraBatch, Vec<usize>)>> {
        let mut out = Vec::new();
        let mut fresh = fresh;
        for (task, mine) in self.by_task(idx) {
            let t = ctx.tasks.get(&task)?;
            let indices: Vec<usize> = mine.iter().map(|&i| self.buffer[i].index).collect();
            let augs: Vec<Augment> = match fresh.as_deref_mut() {
                Some(rng) => indices
                    .iter()
                    .map(|&i| ctx.augment.draw(rng, t.image_aspect(Split::Train, i)))
                    .collect(),
                None => mine.iter().map(|&i| self.buffer[i].aug).collect(),
            };
            let batch = t.batch(Split::Train, &indices, &augs, ctx.device)?;
            out.push((ExtraBatch { task, batch }, mine));
        }
        Ok(out)
    }

    /// Offer the step's own images (with the outputs of this very forward pass) to the
    /// reservoir, as the decisions drawn before it say.
    fn insert(&mut self, ctx: &RunCtx, step: &StepView) -> Result<()> {
        let task = step.new.task;
        let outputs = ctx.tasks.slice(&step.new.of(step.map)?, task)?.detach();
        let decisions = std::mem::take(&mut self.decisions);
        anyhow::ensure!(
            decisions.len() == step.new.batch.len() && step.new_augs.len() == decisions.len(),
            "DER: {} reservoir decisions for a batch of {}",
            decisions.len(),
            step.new.batch.len()
        );
        for (k, d) in decisions.into_iter().enumerate() {
            self.seen += 1;
            let item = || -> Result<Item> {
                Ok(Item {
                    task: task.to_string(),
                    index: step.new.batch.indices[k],
                    aug: step.new_augs[k],
                    outputs: outputs.narrow(0, k, 1)?.copy()?,
                })
            };
            match d {
                Slot::Append => self.buffer.push(item()?),
                Slot::Replace(j) => self.buffer[j] = item()?,
                Slot::Drop => {}
            }
        }
        Ok(())
    }

    /// The buffer's entries: task, training index, stored outputs.
    pub fn entries(&self) -> impl Iterator<Item = (&str, usize, &Tensor)> {
        self.buffer
            .iter()
            .map(|i| (i.task.as_str(), i.index, &i.outputs))
    }
}

impl Plugin for Der {
    fn name(&self) -> &str {
        "der"
    }

    fn loss_terms(&self) -> Vec<String> {
        let mut t = vec!["der".to_string()];
        if self.cfg.beta > 0.0 {
            t.push("derpp".into());
        }
        t
    }

    fn extra_batches(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<Vec<ExtraBatch>> {
        self.pending.clear();
        let mut out = Vec::new();
        if !self.buffer.is_empty() {
            if self.cfg.alpha > 0.0 {
                let idx = self.draw(rng);
                for (b, mine) in self.batches(ctx, &idx, None)? {
                    self.pending.push((Use::Logits, mine));
                    out.push(b);
                }
            }
            if self.cfg.beta > 0.0 {
                let idx = self.draw(rng);
                for (b, _) in self.batches(ctx, &idx, Some(rng))? {
                    self.pending.push((Use::Labels, vec![]));
                    out.push(b);
                }
            }
        }
        let stage = &ctx.stages[ctx.stage];
        let b = stage.batch_size.min(ctx.pools[ctx.stage].len());
        self.decisions = self.decide(b, rng);
        Ok(out)
    }

    fn loss(&mut self, ctx: &RunCtx, step: &StepView) -> Result<Vec<LossTerm>> {
        let mut terms = Vec::new();
        for (rows, (use_, entries)) in step.mine.iter().zip(&self.pending) {
            let out = ctx.tasks.slice(&rows.of(step.map)?, rows.task)?;
            let term = match use_ {
                Use::Logits => {
                    let stored: Vec<Tensor> = entries
                        .iter()
                        .map(|&i| self.buffer[i].outputs.clone())
                        .collect();
                    let target = Tensor::cat(&stored, 0)?;
                    let mse = (out - target)?.sqr()?.mean_all()?;
                    ("der", (mse * self.cfg.alpha)?)
                }
                Use::Labels => {
                    let l = ctx.tasks.get(rows.task)?.loss(&out, rows.batch)?;
                    ("derpp", (l.total * self.cfg.beta)?)
                }
            };
            terms.push(LossTerm {
                name: term.0.into(),
                task: Some(rows.task.to_string()),
                value: term.1,
            });
        }
        // After the replayed entries were read: an entry replaced now is replaced for the
        // next step (Mammoth adds to the buffer after the step).
        self.insert(ctx, step)?;
        Ok(terms)
    }

    fn memory(&self, ctx: &RunCtx) -> Option<BufferMemory> {
        let floats = self.buffer.iter().map(|i| i.outputs.elem_count()).sum();
        Some(BufferMemory::new(
            self.buffer.len(),
            ctx.exp.model.image_size,
            floats,
        ))
    }

    fn state(&self) -> Result<PluginState> {
        let items: Vec<serde_json::Value> = self
            .buffer
            .iter()
            .map(|i| serde_json::json!([i.task, i.index, i.aug.flip, i.aug.crop]))
            .collect();
        let tensors = self
            .buffer
            .iter()
            .enumerate()
            .map(|(k, i)| (format!("outputs.{k}"), i.outputs.clone()))
            .collect();
        Ok(PluginState {
            json: serde_json::json!({ "seen": self.seen, "buffer": items }),
            tensors,
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        let j = &state.json;
        let bad = || anyhow::anyhow!("der state is not readable: {j}");
        self.seen = j["seen"].as_u64().ok_or_else(bad)?;
        let items = j["buffer"].as_array().ok_or_else(bad)?;
        self.buffer = items
            .iter()
            .enumerate()
            .map(|(k, v)| -> Result<Item> {
                let crop: Option<[f32; 4]> = serde_json::from_value(v[3].clone())?;
                Ok(Item {
                    task: v[0].as_str().ok_or_else(bad)?.to_string(),
                    index: v[1].as_u64().ok_or_else(bad)? as usize,
                    aug: Augment {
                        flip: v[2].as_bool().ok_or_else(bad)?,
                        crop,
                    },
                    outputs: state
                        .tensors
                        .get(&format!("outputs.{k}"))
                        .cloned()
                        .with_context(|| format!("der state: no outputs.{k}"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn exp() -> Experiment {
        let text = "name = \"t\"\n[[stages]]\ntask = \"seg\"\n";
        Experiment::from_toml_str(text, std::path::Path::new("x.toml"), &[]).unwrap()
    }

    fn der(capacity: usize) -> Der {
        Der::build(
            DerConfig {
                alpha: 1.0,
                capacity,
                ..DerConfig::default()
            },
            &BuildCtx {
                exp: &exp(),
                varmap: &candle_nn::VarMap::new(),
                device: &candle_core::Device::Cpu,
            },
        )
        .unwrap()
    }

    #[test]
    fn the_reservoir_fills_then_keeps_each_image_with_probability_capacity_over_seen() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let d = der(4);
        // Empty buffer: the first 4 images are appended, then slots are drawn.
        assert_eq!(d.decide(4, &mut rng), vec![Slot::Append; 4]);
        // With 400 images seen, the next one is kept with probability 4/401.
        let mut d = der(4);
        d.seen = 400;
        let kept = (0..2000)
            .flat_map(|_| d.decide(1, &mut rng))
            .filter(|s| matches!(s, Slot::Replace(_)))
            .count();
        let expected = 2000.0 * 4.0 / 401.0;
        assert!(
            (kept as f64 - expected).abs() < 4.0 * expected.sqrt(),
            "{kept}"
        );
        // Replaced slots are within the buffer.
        assert!((0..200)
            .flat_map(|_| d.decide(3, &mut rng))
            .all(|s| !matches!(s, Slot::Replace(j) if j >= 4)));
    }

    #[test]
    fn settings_without_a_buffer_are_refused() {
        let check = |s: DerConfig| Der::validate(&s, &exp());
        assert!(check(DerConfig::default()).is_ok(), "off");
        let on = DerConfig {
            alpha: 0.5,
            capacity: 30,
            ..DerConfig::default()
        };
        assert!(check(on.clone()).is_ok());
        let msg = check(DerConfig {
            capacity: 0,
            ..on.clone()
        })
        .unwrap_err();
        assert!(msg.contains("der.capacity"), "{msg}");
        let msg = check(DerConfig { beta: -1.0, ..on }).unwrap_err();
        assert!(msg.contains("der.beta"), "{msg}");
    }
}
