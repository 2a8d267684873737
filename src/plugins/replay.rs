//! Experience replay (the report's strategy, generalised): every step of a later stage also
//! trains `images_per_batch` samples of earlier tasks, drawn from a buffer of the images
//! those tasks' stages actually trained on.
//!
//! - Buffer (`policy`): `full` keeps every trained image (no memory budget: the unbounded
//!   reference); with a budget, `capacity` images in total or, with `capacity_unit =
//!   "per_task"`, `capacity` images of every task (a uniform sample of the images its stage
//!   trained on, whichever policy); in total, `reservoir` keeps `capacity`
//!   images by reservoir sampling over the stream of trained images (Vitter; Mammoth's
//!   buffer); `task_balanced` keeps `capacity` images split equally among the earlier tasks
//!   (Avalanche's `ExperienceBalancedBuffer`); `class_balanced` splits each task's share
//!   equally among its classes too (Avalanche's `ClassBalancedBuffer`, within a task). Every
//!   item keeps its task (and so its targets).
//! - Loss: `Σ_t w_t · (n_t / images_per_batch) · L_t / ref_t` as one `replay` term, with `w_t`
//!   the task's weight (`weight` or `task_weights`), `n_t` its share of the step's replayed
//!   samples (round-robin or random), and `ref_t` = 1, or with `normalize = "reference"`
//!   the task's loss on its buffer at the end of its own stage (so 1.0 means "as good as at
//!   baseline", and a task with a large loss scale cannot swamp the new one).
//! - Rehearsal with end-of-stage distillation (`distill_alpha > 0`; until 0.1 `der_alpha`,
//!   which it still reads): each buffered image keeps the head's outputs for its task at the
//!   end of its stage; replayed images are then drawn without augmentation (the stored
//!   outputs belong to the plain image) and a `distill` term pulls the model's outputs toward
//!   the stored ones with the task's distillation loss (KL at `distill_temperature`). It was
//!   called DER here once; it is not: DER as published (outputs recorded when the image is
//!   trained, a fixed-size reservoir, MSE on raw outputs) is [`super::der`].

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{BufferMemory, ExtraBatch, LossTerm, Plugin, PluginState, RunCtx, StepView};
use serde::{Deserialize, Serialize};

use super::registry::{BuildCtx, Strategy};
use crate::config::{Experiment, StageConfig, MAX_BATCH};

/// Largest `capacity` accepted (images, with their stored outputs).
const MAX_CAPACITY: usize = 10_000_000;
use crate::data::Augment;
use crate::tasks::{DistillParams, Split};

/// Which earlier tasks a replay strategy draws from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplayTasks {
    /// `"all"`: every task learned in an earlier stage.
    Keyword(String),
    /// An explicit list, e.g. `["seg"]` (the report's setup).
    List(Vec<String>),
}

impl Default for ReplayTasks {
    fn default() -> Self {
        ReplayTasks::Keyword("all".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaySampling {
    /// Replayed samples cycle through the replayed tasks in order.
    RoundRobin,
    /// Each replayed sample picks its task uniformly at random.
    Random,
}

/// Which earlier samples a replay buffer keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPolicy {
    /// Every image earlier stages trained on.
    Full,
    /// Reservoir sampling over the stream of trained images (uniform, not per task):
    /// `capacity` images.
    Reservoir,
    /// `capacity` images split equally among the earlier tasks, shrunk at random as tasks
    /// arrive.
    TaskBalanced,
    /// As `task_balanced` between tasks, and within a task's share as many images of each
    /// class as it allows (round-robin over the classes in a shuffled order; a task shrinks
    /// from its most numerous classes first). An image's class is its label (cls), the class
    /// of its largest box (det) or its most frequent foreground class (seg).
    ClassBalanced,
}

/// What `replay.capacity` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityUnit {
    /// Images in the whole buffer.
    Total,
    /// Images of every task.
    PerTask,
}

/// How each replayed task's loss is scaled before the weights apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayNormalize {
    /// `weight · Σ_t (n_t / images_per_batch) · L_t` (the report's form).
    None,
    /// Each task's loss divided by its loss at the end of its own stage (measured then on
    /// its buffer in inference mode), so that 1.0 means "as good as at baseline" and a task
    /// with a large loss scale cannot swamp the new task.
    Reference,
}

/// Experience replay: every batch of a later stage carries samples of earlier tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    pub enabled: bool,
    /// Replayed samples added to every batch (the report: 4).
    pub images_per_batch: usize,
    /// `loss = L_new + weight · L_replay` (the report: 0.8).
    pub weight: f64,
    /// Per-task weights overriding `weight`, e.g. `{ det = 2.0 }`.
    pub task_weights: BTreeMap<String, f64>,
    pub tasks: ReplayTasks,
    pub sampling: ReplaySampling,
    pub policy: ReplayPolicy,
    /// Buffer size in images for `reservoir` and `task_balanced` (ignored by `full`).
    pub capacity: usize,
    /// `total` (the buffer's size) or `per_task` (images kept of every task).
    pub capacity_unit: CapacityUnit,
    pub normalize: ReplayNormalize,
    /// With each buffered image keep the head's outputs of the end of its task's stage and
    /// add `distill_alpha · distill(now, then)` on un-augmented replays of it (0 = off).
    #[serde(alias = "der_alpha")]
    pub distill_alpha: f64,
    /// Softmax temperature of the distillation term's soft targets.
    #[serde(alias = "der_temperature")]
    pub distill_temperature: f64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            images_per_batch: 4,
            weight: 0.8,
            task_weights: BTreeMap::new(),
            tasks: ReplayTasks::default(),
            sampling: ReplaySampling::RoundRobin,
            policy: ReplayPolicy::Full,
            capacity: 0,
            capacity_unit: CapacityUnit::Total,
            normalize: ReplayNormalize::None,
            distill_alpha: 0.0,
            distill_temperature: 2.0,
        }
    }
}

impl ReplayConfig {
    /// The replay weight of `task`.
    pub fn weight_of(&self, task: &str) -> f64 {
        self.task_weights.get(task).copied().unwrap_or(self.weight)
    }
}

/// Images evaluated per batch when measuring reference losses and storing outputs.
const BATCH: usize = 16;

pub struct Replay {
    cfg: ReplayConfig,
    /// Buffered `(task, sample index)` for `reservoir` and `task_balanced` (for `full` the
    /// stages' pools are the buffer).
    buffer: Vec<(String, usize)>,
    /// Trained images offered to the reservoir so far.
    seen: u64,
    /// Each task's loss at the end of its stage (`normalize = "reference"`).
    reference: BTreeMap<String, f64>,
    /// The end-of-stage head outputs of buffered images, by `(task, index)`.
    stored: BTreeMap<(String, usize), Tensor>,
    /// Tasks replayed in the current stage (their buffered images are looked up at each
    /// step, so that a buffer restored after `before_stage` on resume is seen).
    tasks: Vec<String>,
    /// Round-robin position, carried across steps so every task gets its share.
    cursor: usize,
}

impl Strategy for Replay {
    const NAME: &'static str = "replay";
    type Settings = ReplayConfig;

    fn is_on(s: &ReplayConfig) -> bool {
        s.enabled
    }

    fn validate(r: &ReplayConfig, exp: &Experiment) -> Result<(), String> {
        exp.named_tasks("replay.task_weights", r.task_weights.keys())?;
        if !r.enabled {
            return Ok(());
        }
        if r.images_per_batch == 0 || r.images_per_batch > MAX_BATCH {
            return Err(format!(
                "replay.images_per_batch = {} must be from 1 to {MAX_BATCH} when replay is enabled",
                r.images_per_batch
            ));
        }
        if r.capacity > MAX_CAPACITY {
            return Err(format!(
                "replay.capacity = {} is beyond {MAX_CAPACITY} images",
                r.capacity
            ));
        }
        let finite = |w: f64| w >= 0.0 && w.is_finite();
        if !finite(r.weight) || !r.task_weights.values().all(|w| finite(*w)) {
            return Err("replay.weight and replay.task_weights must be >= 0".into());
        }
        if r.policy != ReplayPolicy::Full && r.capacity == 0 {
            return Err(format!(
                "replay.policy = {:?} needs replay.capacity > 0 (images kept)",
                r.policy
            ));
        }
        if !finite(r.distill_alpha) {
            return Err("replay.distill_alpha must be >= 0".into());
        }
        if !(r.distill_temperature > 0.0 && r.distill_temperature.is_finite()) {
            return Err("replay.distill_temperature must be > 0".into());
        }
        validate_tasks(&r.tasks, exp)
    }

    fn build(cfg: ReplayConfig, _ctx: &BuildCtx) -> Result<Self> {
        Ok(Self::new(cfg))
    }
}

/// `replay.tasks`: "all", or tasks that a stage before the last one learns.
fn validate_tasks(tasks: &ReplayTasks, exp: &Experiment) -> Result<(), String> {
    let list = match tasks {
        ReplayTasks::Keyword(k) if k == "all" => return Ok(()),
        ReplayTasks::Keyword(k) => {
            return Err(format!(
                "replay.tasks = \"{k}\": expected \"all\" or a list such as [\"seg\"]"
            ))
        }
        ReplayTasks::List(list) => list,
    };
    if list.is_empty() {
        return Err("replay.tasks is empty: list tasks or use \"all\"".into());
    }
    let last = exp.stages.len().saturating_sub(1);
    for t in list {
        match exp.stages.iter().position(|s| s.task == *t) {
            None => return Err(format!("replay.tasks names '{t}', but no stage learns it")),
            Some(first) if first == last => {
                return Err(format!(
                    "replay.tasks names '{t}', but it is first learned in the last stage: nothing later could replay it"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Tasks that stage `stage` replays: those learned in earlier stages and selected.
pub fn replayed_tasks(cfg: &ReplayConfig, stages: &[StageConfig], stage: usize) -> Vec<String> {
    if !cfg.enabled {
        return vec![];
    }
    let current = &stages[stage].task;
    let mut out: Vec<String> = Vec::new();
    for s in &stages[..stage] {
        let selected = match &cfg.tasks {
            ReplayTasks::Keyword(_) => true,
            ReplayTasks::List(l) => l.contains(&s.task),
        };
        if selected && &s.task != current && !out.contains(&s.task) {
            out.push(s.task.clone());
        }
    }
    out
}

impl Replay {
    pub fn new(cfg: ReplayConfig) -> Self {
        Self {
            cfg,
            buffer: vec![],
            seen: 0,
            reference: BTreeMap::new(),
            stored: BTreeMap::new(),
            tasks: vec![],
            cursor: 0,
        }
    }

    /// How many of this step's replayed samples go to each of `n` replayed tasks.
    fn shares(&mut self, n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let mut counts = vec![0usize; n];
        for _ in 0..self.cfg.images_per_batch {
            let k = match self.cfg.sampling {
                ReplaySampling::RoundRobin => {
                    let k = self.cursor % n;
                    self.cursor += 1;
                    k
                }
                ReplaySampling::Random => rng.random_range(0..n),
            };
            counts[k] += 1;
        }
        counts
    }

    /// The buffered indices of `task` (in buffer order).
    fn buffered(&self, ctx: &RunCtx, task: &str) -> Vec<usize> {
        match self.cfg.policy {
            ReplayPolicy::Full => trained_indices(ctx, task),
            _ => self
                .buffer
                .iter()
                .filter(|(t, _)| t == task)
                .map(|&(_, i)| i)
                .collect(),
        }
    }

    /// Offer the images stage `ctx.stage` trained on to the buffer (in a shuffled order: the
    /// order they stream in).
    fn fill(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<()> {
        let task = ctx.stage_task().to_string();
        let mut pool = ctx.pools[ctx.stage].clone();
        pool.shuffle(rng);
        let cap = self.cfg.capacity;
        match self.cfg.policy {
            // The stages' pools are the buffer.
            ReplayPolicy::Full => return Ok(()),
            // Every task its own `cap` images: a uniform sample of its stream.
            ReplayPolicy::Reservoir | ReplayPolicy::TaskBalanced
                if self.cfg.capacity_unit == CapacityUnit::PerTask =>
            {
                self.buffer.retain(|(t, _)| *t != task);
                self.buffer
                    .extend(pool.iter().take(cap).map(|&i| (task.clone(), i)));
            }
            ReplayPolicy::Reservoir => {
                reservoir_add(&mut self.buffer, &mut self.seen, &task, &pool, cap, rng)
            }
            ReplayPolicy::TaskBalanced => balanced_add(&mut self.buffer, &task, &pool, cap, rng),
            ReplayPolicy::ClassBalanced => {
                let t = ctx.tasks.get(&task)?;
                let classes: Vec<Option<usize>> = pool
                    .iter()
                    .map(|&i| t.image_class(Split::Train, i))
                    .collect();
                let order = class_round_robin(&pool, &classes);
                let quota = match self.cfg.capacity_unit {
                    CapacityUnit::PerTask => cap,
                    CapacityUnit::Total => usize::MAX,
                };
                self.buffer.retain(|(t, _)| *t != task);
                self.buffer
                    .extend(order.into_iter().take(quota).map(|i| (task.clone(), i)));
                if self.cfg.capacity_unit == CapacityUnit::Total {
                    shrink_to_quota(&mut self.buffer, cap);
                }
            }
        }
        let live = &self.buffer;
        self.stored.retain(|k, _| live.contains(k));
        Ok(())
    }

    /// Reference loss and stored outputs of `task`'s buffered images, with the model as it is
    /// at the end of the task's stage, in inference mode.
    fn measure(&mut self, ctx: &RunCtx, task_name: &str) -> Result<()> {
        let needs_ref = self.cfg.normalize == ReplayNormalize::Reference;
        let needs_out = self.cfg.distill_alpha > 0.0;
        if !needs_ref && !needs_out {
            return Ok(());
        }
        let task = ctx.tasks.get(task_name)?;
        let idx = self.buffered(ctx, task_name);
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in idx.chunks(BATCH) {
            let batch = task.batch(Split::Train, chunk, &[], ctx.device)?;
            let out = ctx
                .tasks
                .slice(&ctx.model.forward_t(&batch.images, false)?, task_name)?
                .detach();
            if needs_ref {
                let l = task.loss(&out, &batch)?.total.to_scalar::<f32>()? as f64;
                sum += l * chunk.len() as f64;
                n += chunk.len();
            }
            if needs_out {
                for (k, &i) in chunk.iter().enumerate() {
                    self.stored
                        .insert((task_name.to_string(), i), out.narrow(0, k, 1)?.copy()?);
                }
            }
        }
        if needs_ref && n > 0 {
            // A tiny floor keeps a task solved perfectly at baseline from dividing by ~0.
            self.reference
                .insert(task_name.to_string(), (sum / n as f64).max(1e-3));
        }
        Ok(())
    }
}

/// Reservoir sampling (Vitter's algorithm R): offer `items` of `task` to a buffer of at most
/// `cap` entries that has seen `seen` items so far; every item of the stream ends up in the
/// buffer with the same probability `cap / seen`.
pub fn reservoir_add(
    buffer: &mut Vec<(String, usize)>,
    seen: &mut u64,
    task: &str,
    items: &[usize],
    cap: usize,
    rng: &mut ChaCha8Rng,
) {
    for &i in items {
        *seen += 1;
        if buffer.len() < cap {
            buffer.push((task.to_string(), i));
        } else {
            let j = rng.random_range(0..*seen) as usize;
            if j < cap {
                buffer[j] = (task.to_string(), i);
            }
        }
    }
}

/// Task-balanced buffer: add `items` of `task` (replacing its earlier entries), then shrink
/// every task to `cap / number of tasks` entries, dropping at random.
pub fn balanced_add(
    buffer: &mut Vec<(String, usize)>,
    task: &str,
    items: &[usize],
    cap: usize,
    rng: &mut ChaCha8Rng,
) {
    buffer.retain(|(t, _)| t != task);
    buffer.extend(items.iter().map(|&i| (task.to_string(), i)));
    shrink_per_task(buffer, cap, |mine, quota| {
        mine.shuffle(rng);
        mine.truncate(quota);
    });
}

/// Bring every task of `buffer` down to `cap / number of tasks` entries: `cut` shrinks the
/// entries of a task that has more (tasks and their entries keep their order otherwise).
fn shrink_per_task(
    buffer: &mut Vec<(String, usize)>,
    cap: usize,
    mut cut: impl FnMut(&mut Vec<(String, usize)>, usize),
) {
    let mut tasks: Vec<String> = Vec::new();
    for (t, _) in buffer.iter() {
        if !tasks.contains(t) {
            tasks.push(t.clone());
        }
    }
    let quota = cap / tasks.len().max(1);
    let mut kept = Vec::new();
    for t in tasks {
        let mut mine: Vec<(String, usize)> =
            buffer.iter().filter(|(u, _)| *u == t).cloned().collect();
        if mine.len() > quota {
            cut(&mut mine, quota);
        }
        kept.extend(mine);
    }
    *buffer = kept;
}

/// `items` (in their shuffled order) re-ordered round-robin over their classes: the first
/// of each class (in order of first appearance), then the second of each, … Images without a
/// class form one class of their own. Any prefix of the result is as class-balanced as its
/// length allows.
pub fn class_round_robin(items: &[usize], classes: &[Option<usize>]) -> Vec<usize> {
    let mut by_class: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
    for (&i, &c) in items.iter().zip(classes) {
        match by_class.iter_mut().find(|(k, _)| *k == c) {
            Some((_, v)) => v.push(i),
            None => by_class.push((c, vec![i])),
        }
    }
    let longest = by_class.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    (0..longest)
        .flat_map(|r| by_class.iter().filter_map(move |(_, v)| v.get(r).copied()))
        .collect()
}

/// Shrink every task of `buffer` to `cap / number of tasks` entries by cutting its tail:
/// entries are kept in round-robin class order, so the cut takes from the most numerous
/// classes first.
fn shrink_to_quota(buffer: &mut Vec<(String, usize)>, cap: usize) {
    shrink_per_task(buffer, cap, |mine, quota| mine.truncate(quota));
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
        let mut t = vec!["replay".to_string()];
        if self.cfg.distill_alpha > 0.0 {
            t.push("distill".into());
        }
        t
    }

    fn before_stage(&mut self, ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        self.tasks = replayed_tasks(&self.cfg, ctx.stages, ctx.stage);
        self.cursor = 0;
        Ok(())
    }

    fn extra_batches(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<Vec<ExtraBatch>> {
        let pools: Vec<(String, Vec<usize>)> = self
            .tasks
            .iter()
            .map(|t| (t.clone(), self.buffered(ctx, t)))
            .filter(|(_, pool)| !pool.is_empty())
            .collect();
        if pools.is_empty() {
            return Ok(vec![]);
        }
        let counts = self.shares(pools.len(), rng);
        let mut out = Vec::new();
        for ((task, pool), n) in pools.iter().zip(counts) {
            if n == 0 {
                continue;
            }
            let indices: Vec<usize> = (0..n)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect();
            let t = ctx.tasks.get(task)?;
            // The stored outputs belong to the plain image: no augmentation then.
            let augs: Vec<Augment> = if self.cfg.distill_alpha > 0.0 {
                vec![]
            } else {
                indices
                    .iter()
                    .map(|&i| ctx.augment.draw(rng, t.image_aspect(Split::Train, i)))
                    .collect()
            };
            let batch = t.batch(Split::Train, &indices, &augs, ctx.device)?;
            out.push(ExtraBatch {
                task: task.clone(),
                batch,
            });
        }
        Ok(out)
    }

    fn loss(&mut self, ctx: &RunCtx, step: &StepView) -> Result<Vec<LossTerm>> {
        let mut terms = Vec::new();
        for rows in &step.mine {
            let task = ctx.tasks.get(rows.task)?;
            let out = ctx.tasks.slice(&rows.of(step.map)?, rows.task)?;
            let l = task.loss(&out, rows.batch)?;
            let reference = match self.cfg.normalize {
                ReplayNormalize::None => 1.0,
                ReplayNormalize::Reference => self.reference.get(rows.task).copied().unwrap_or(1.0),
            };
            let w = self.cfg.weight_of(rows.task) * rows.batch.len() as f64
                / self.cfg.images_per_batch as f64
                / reference;
            terms.push(LossTerm {
                name: "replay".into(),
                task: Some(rows.task.to_string()),
                value: (l.total * w)?,
            });
            if self.cfg.distill_alpha > 0.0 {
                let stored: Vec<Tensor> = rows
                    .batch
                    .indices
                    .iter()
                    .map(|&i| {
                        self.stored
                            .get(&(rows.task.to_string(), i))
                            .cloned()
                            .with_context(|| {
                                format!("replay: no stored outputs for {} #{i}", rows.task)
                            })
                    })
                    .collect::<Result<_>>()?;
                let target = Tensor::cat(&stored, 0)?;
                let p = DistillParams {
                    temperature: self.cfg.distill_temperature,
                };
                let d = task.distill(&out, &target, &p)?;
                terms.push(LossTerm {
                    name: "distill".into(),
                    task: Some(rows.task.to_string()),
                    value: (d * self.cfg.distill_alpha)?,
                });
            }
        }
        Ok(terms)
    }

    fn after_stage(&mut self, ctx: &RunCtx, rng: &mut ChaCha8Rng) -> Result<()> {
        if self.cfg.policy != ReplayPolicy::Full {
            self.fill(ctx, rng)?;
        }
        // Measured now, with the task's own end-of-stage model; as seen from the next stage,
        // so that this stage's images count among the earlier ones.
        let task = ctx.stage_task().to_string();
        let from_next = RunCtx {
            stage: ctx.stage + 1,
            ..*ctx
        };
        self.measure(&from_next, &task)
    }

    fn memory(&self, ctx: &RunCtx) -> Option<BufferMemory> {
        // What stage `ctx.stage` replays from: the buffered images of the tasks it replays.
        let tasks = replayed_tasks(&self.cfg, ctx.stages, ctx.stage);
        let images: usize = tasks.iter().map(|t| self.buffered(ctx, t).len()).sum();
        let floats = self
            .stored
            .iter()
            .filter(|((t, _), _)| tasks.contains(t))
            .map(|(_, v)| v.elem_count())
            .sum();
        Some(BufferMemory::new(images, ctx.exp.model.image_size, floats))
    }

    fn state(&self) -> Result<PluginState> {
        let buffer: Vec<serde_json::Value> = self
            .buffer
            .iter()
            .map(|(t, i)| serde_json::json!([t, i]))
            .collect();
        let mut tensors = BTreeMap::new();
        for (k, ((t, i), v)) in self.stored.iter().enumerate() {
            tensors.insert(format!("der.{k}.{t}.{i}"), v.clone());
        }
        Ok(PluginState {
            json: serde_json::json!({
                "cursor": self.cursor,
                "buffer": buffer,
                "seen": self.seen,
                "reference": self.reference,
            }),
            tensors,
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        let j = &state.json;
        let bad = || anyhow::anyhow!("replay state is not readable: {j}");
        self.cursor = j["cursor"].as_u64().ok_or_else(bad)? as usize;
        self.seen = j["seen"].as_u64().unwrap_or(0);
        self.buffer = j["buffer"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| Some((v[0].as_str()?.to_string(), v[1].as_u64()? as usize)))
                    .collect::<Option<Vec<_>>>()
            })
            .unwrap_or(Some(vec![]))
            .ok_or_else(bad)?;
        self.reference = serde_json::from_value(j["reference"].clone()).unwrap_or_default();
        self.stored.clear();
        for (name, t) in state.tensors {
            let mut parts = name.splitn(4, '.');
            let (Some("der"), Some(_), Some(task), Some(i)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                anyhow::bail!("replay state: unexpected tensor {name}");
            };
            let i: usize = i
                .parse()
                .with_context(|| format!("replay state tensor {name}"))?;
            self.stored.insert((task.to_string(), i), t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn replay(sampling: ReplaySampling, images: usize) -> Replay {
        let mut exp_replay = ReplayConfig {
            images_per_batch: images,
            sampling,
            ..ReplayConfig::default()
        };
        exp_replay.enabled = true;
        Replay {
            cfg: exp_replay,
            buffer: vec![],
            seen: 0,
            reference: BTreeMap::new(),
            stored: BTreeMap::new(),
            tasks: vec!["seg".into(), "det".into()],
            cursor: 0,
        }
    }

    #[test]
    fn reservoir_keeps_capacity_and_samples_the_stream_uniformly() {
        // 100 items of task a then 300 of task b into 50 slots, many times: each item stays
        // with probability 50/400, so a keeps about 1/4 of the slots.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut a_total, trials) = (0usize, 200);
        for _ in 0..trials {
            let (mut buf, mut seen) = (Vec::new(), 0u64);
            reservoir_add(
                &mut buf,
                &mut seen,
                "a",
                &(0..100).collect::<Vec<_>>(),
                50,
                &mut rng,
            );
            assert_eq!(buf.len(), 50);
            reservoir_add(
                &mut buf,
                &mut seen,
                "b",
                &(0..300).collect::<Vec<_>>(),
                50,
                &mut rng,
            );
            assert_eq!((buf.len(), seen), (50, 400));
            a_total += buf.iter().filter(|(t, _)| t == "a").count();
        }
        let share = a_total as f64 / (50 * trials) as f64;
        assert!((share - 0.25).abs() < 0.03, "{share}");
    }

    #[test]
    fn task_balanced_splits_the_capacity_equally() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut buf = Vec::new();
        balanced_add(&mut buf, "a", &(0..100).collect::<Vec<_>>(), 60, &mut rng);
        assert_eq!(buf.len(), 60);
        balanced_add(&mut buf, "b", &(0..100).collect::<Vec<_>>(), 60, &mut rng);
        let count =
            |buf: &Vec<(String, usize)>, t: &str| buf.iter().filter(|(u, _)| u == t).count();
        assert_eq!((count(&buf, "a"), count(&buf, "b")), (30, 30));
        // No duplicates, and a's survivors come from a's earlier entries.
        let mut a: Vec<usize> = buf.iter().filter(|(t, _)| t == "a").map(|x| x.1).collect();
        a.sort();
        a.dedup();
        assert_eq!(a.len(), 30);
        // Fewer items than the quota: all kept.
        balanced_add(&mut buf, "c", &[1, 2], 60, &mut rng);
        assert_eq!(
            (count(&buf, "a"), count(&buf, "b"), count(&buf, "c")),
            (20, 20, 2)
        );
    }

    #[test]
    fn class_balanced_order_and_shrinking_keep_classes_even() {
        // 10 images: class 0 has six, class 1 three, one image has no class.
        let items: Vec<usize> = (0..10).collect();
        let c = |k: usize| Some(k);
        let classes = [c(0), c(0), c(1), c(0), None, c(0), c(1), c(0), c(1), c(0)];
        let order = class_round_robin(&items, &classes);
        assert_eq!(order, vec![0, 2, 4, 1, 6, 3, 8, 5, 7, 9]);
        // Any prefix is balanced: the first 6 are two rounds over (0, 1, none) and the third
        // round's first, class 0 again.
        let prefix_classes: Vec<_> = order[..6].iter().map(|&i| classes[i]).collect();
        assert_eq!(prefix_classes.iter().filter(|k| **k == c(1)).count(), 2);
        assert_eq!(prefix_classes.iter().filter(|k| **k == c(0)).count(), 3);
        // Total capacity 6 over two tasks: each task's round-robin prefix of 3.
        let mut buf: Vec<(String, usize)> = order.iter().map(|&i| ("a".into(), i)).collect();
        buf.extend([1, 2, 3, 4].map(|i| ("b".to_string(), i)));
        shrink_to_quota(&mut buf, 6);
        let of =
            |t: &str| -> Vec<usize> { buf.iter().filter(|(u, _)| u == t).map(|x| x.1).collect() };
        assert_eq!(of("a"), vec![0, 2, 4], "one image of each class first");
        assert_eq!(of("b"), vec![1, 2, 3]);
    }

    #[test]
    fn round_robin_shares_are_balanced_across_steps() {
        let mut r = replay(ReplaySampling::RoundRobin, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(r.shares(2, &mut rng), vec![2, 1]);
        assert_eq!(r.shares(2, &mut rng), vec![1, 2]);
    }

    #[test]
    fn random_shares_sum_to_the_budget() {
        let mut r = replay(ReplaySampling::Random, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut total = [0usize; 2];
        for _ in 0..100 {
            let s = r.shares(2, &mut rng);
            assert_eq!(s.iter().sum::<usize>(), 4);
            total[0] += s[0];
            total[1] += s[1];
        }
        // Both tasks get a fair share over many steps.
        assert!(total[0] > 150 && total[1] > 150, "{total:?}");
    }

    fn experiment(extra: &str) -> (Experiment, ReplayConfig) {
        let text = format!(
            "name = \"t\"\n[[stages]]\ntask = \"seg\"\n[[stages]]\ntask = \"det\"\n[[stages]]\ntask = \"cls\"\n[replay]\nenabled = true\n{extra}"
        );
        let exp = Experiment::from_toml_str(&text, std::path::Path::new("x.toml"), &[]).unwrap();
        let cfg: ReplayConfig = exp.strategies["replay"].clone().try_into().unwrap();
        (exp, cfg)
    }

    #[test]
    fn replayed_tasks_follow_stage_order_and_selection() {
        let (exp, cfg) = experiment("");
        assert!(replayed_tasks(&cfg, &exp.stages, 0).is_empty());
        assert_eq!(replayed_tasks(&cfg, &exp.stages, 1), vec!["seg"]);
        assert_eq!(replayed_tasks(&cfg, &exp.stages, 2), vec!["seg", "det"]);
        let (exp, cfg) = experiment("tasks = [\"seg\"]\n");
        assert_eq!(replayed_tasks(&cfg, &exp.stages, 2), vec!["seg"]);
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let check = |extra: &str| {
            let (exp, cfg) = experiment(extra);
            Replay::validate(&cfg, &exp)
        };
        assert!(check("").is_ok());
        let msg = check("tasks = [\"depth\"]\n").unwrap_err();
        assert!(msg.contains("no stage learns it"), "{msg}");
        let msg = check("tasks = [\"cls\"]\n").unwrap_err();
        assert!(msg.contains("last stage"), "{msg}");
        let msg = check("policy = \"reservoir\"\n").unwrap_err();
        assert!(msg.contains("capacity"), "{msg}");
        let msg = check("task_weights = { depth = 1.0 }\n").unwrap_err();
        assert!(msg.contains("replay.task_weights"), "{msg}");
        let msg = check("distill_temperature = 0.0\n").unwrap_err();
        assert!(msg.contains("distill_temperature"), "{msg}");
        // The keys of the variant's old name still read (files written before 0.1.1).
        let (_, cfg) = experiment("der_alpha = 0.7\nder_temperature = 3.0\n");
        assert_eq!((cfg.distill_alpha, cfg.distill_temperature), (0.7, 3.0));
        let msg = check("images_per_batch = 1000000000\n").unwrap_err();
        assert!(msg.contains("images_per_batch"), "{msg}");
        let msg = check("weight = inf\n").unwrap_err();
        assert!(msg.contains("replay.weight"), "{msg}");
    }
}
