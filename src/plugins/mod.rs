//! Anti-forgetting strategies as plug-ins around one training loop (Avalanche-style).
//!
//! The loop in [`crate::train`] calls the hooks of every [`Plugin`] in order and never
//! changes for a new strategy: a plug-in may add batches to a step (replay), add named loss
//! terms (replay, EWC, distillation), re-weigh the terms (uncertainty weighting), touch the
//! gradients after backward, add its own trainable parameters, and react to stage and epoch
//! boundaries (snapshot a teacher, estimate Fisher information, fill a buffer). Every hook
//! has a no-op default. Plug-in state — JSON and tensors — is saved after every epoch and
//! restored on resume, so a resumed run continues bit-identically.
//!
//! A strategy is one file here plus one line in [`registry::Registry::builtin`]: it owns its
//! TOML table, settings, checks and state ([`registry::Strategy`]). The reference modes
//! (`joint`, `single_task`) are plug-ins too, chosen by `mode` rather than by a table.

pub use registry::{BuildCtx, Registry, Strategy};

impl Registry {
    /// The built-in strategies, in hook order: replay and DER (their batches first), A-GEM
    /// (its memory gradient after backward), LwF, EWC, and uncertainty weighting last (it
    /// re-weighs every term). One line per strategy.
    pub fn builtin() -> Self {
        let mut r = Self::new();
        r.register::<replay::Replay>();
        r.register::<der::Der>();
        r.register::<agem::Agem>();
        r.register::<lwf::Lwf>();
        r.register::<ewc::Ewc>();
        r.register::<uncertainty::Uncertainty>();
        r
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

pub mod agem;
pub mod der;
pub mod ewc;
pub mod joint;
pub mod lwf;
pub mod registry;
pub mod replay;
pub mod single_task;
pub mod uncertainty;

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;

use crate::config::{Experiment, StageConfig};
use crate::data::AugmentConfig;
use crate::model::{OneHead, OneHeadConfig};
use crate::tasks::{Batch, TaskSet};

/// What every hook may read: the experiment, its tasks and data, the model and where the
/// run stands.
pub struct RunCtx<'a> {
    pub exp: &'a Experiment,
    /// The stages the loop runs (the experiment's, or the joint run's single stage).
    pub stages: &'a [StageConfig],
    pub tasks: &'a TaskSet,
    pub model: &'a OneHead,
    /// The model's variables (BatchNorm running statistics included), for snapshots.
    pub varmap: &'a VarMap,
    pub head_config: &'a OneHeadConfig,
    pub device: &'a Device,
    /// How training samples are augmented (draw per sample from the run's RNG).
    pub augment: &'a AugmentConfig,
    /// 0-based index of the current stage.
    pub stage: usize,
    /// The training indices each stage used so far (`pools[k]` for stage k ≤ `stage`): the
    /// images a stage actually trained on, which replay may draw from.
    pub pools: &'a [Vec<usize>],
    /// Whether the backbone's BatchNorm runs in training mode in this stage.
    pub backbone_train: bool,
}

impl RunCtx<'_> {
    /// The task the current stage trains.
    pub fn stage_task(&self) -> &str {
        &self.stages[self.stage].task
    }
}

/// A batch a plug-in adds to a step; it goes through the same forward pass as the stage's
/// own batch.
pub struct ExtraBatch {
    /// The task the samples belong to.
    pub task: String,
    pub batch: Batch,
}

/// Where one batch sits in the step's forward pass.
pub struct Rows<'a> {
    pub task: &'a str,
    pub batch: &'a Batch,
    /// First row in the step's concatenated images / head map.
    pub start: usize,
}

impl Rows<'_> {
    /// This batch's rows of `t` (any tensor with the step's rows on dim 0).
    pub fn of(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.narrow(0, self.start, self.batch.len())?)
    }
}

/// One training step's forward pass, as plug-ins see it.
pub struct StepView<'a> {
    /// `(B_total, 3, S, S)`: the stage's batch followed by every plug-in's extra batches.
    pub images: &'a Tensor,
    /// `(B_total, C, h, w)`: the head map of `images`.
    pub map: &'a Tensor,
    /// The stage's own batch (rows from 0).
    pub new: Rows<'a>,
    /// The augmentation of each image of the stage's batch, in row order.
    pub new_augs: &'a [crate::data::Augment],
    /// This plug-in's extra batches, in the order it returned them.
    pub mine: Vec<Rows<'a>>,
}

/// A named part of a step's loss. The step's total is the sum of all terms; `loss_<name>`
/// in `epochs.csv` is its mean over the epoch (`new` is the stage task's own loss).
pub struct LossTerm {
    pub name: String,
    /// The task whose loss this is, when it is one task's loss (for re-weighting).
    pub task: Option<String>,
    pub value: Tensor,
}

/// Items grouped by their task: tasks in name order, each task's items in the order given
/// (the rehearsal plug-ins build one extra batch per task of what they sampled).
pub(crate) fn group_by_task<T: Copy>(items: &[(&str, T)]) -> Vec<(String, Vec<T>)> {
    let mut out: Vec<(String, Vec<T>)> = Vec::new();
    for &(task, item) in items {
        match out.iter_mut().find(|(t, _)| t == task) {
            Some((_, v)) => v.push(item),
            None => out.push((task.to_string(), vec![item])),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// What a rehearsal strategy holds at the end of a run (`summary.json`'s `buffers`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BufferMemory {
    /// Images kept.
    pub images: usize,
    /// Those images as float pixels at the model's input size, MiB (what a buffer of
    /// images costs; onehead keeps their indices and reloads them).
    pub images_mib: f64,
    /// Stored head outputs (DER, end-of-stage distillation), MiB.
    pub outputs_mib: f64,
}

impl BufferMemory {
    /// `images` images of `size × size` pixels and `output_floats` stored output values.
    pub fn new(images: usize, size: usize, output_floats: usize) -> Self {
        let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
        Self {
            images,
            images_mib: mib(images * 3 * size * size * 4),
            outputs_mib: mib(output_floats * 4),
        }
    }
}

/// A plug-in's saved state: anything JSON can hold, plus named tensors (saved as
/// safetensors beside the model).
#[derive(Debug, Default)]
pub struct PluginState {
    pub json: serde_json::Value,
    pub tensors: BTreeMap<String, Tensor>,
}

pub trait Plugin {
    /// Short name, used in logs and as the prefix of its saved tensors.
    fn name(&self) -> &str;

    /// The loss terms it may add (CSV columns `loss_<term>`), fixed for the whole run.
    fn loss_terms(&self) -> Vec<String> {
        vec![]
    }

    /// Before the first step of stage `ctx.stage`. When a run resumes mid-stage it runs
    /// again before [`Plugin::load_state`]; at a stage boundary it runs after it (so derive
    /// here what the config determines, and keep in the state what training accumulated).
    fn before_stage(&mut self, _ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        Ok(())
    }

    /// Batches trained together with the stage's own batch in one forward pass.
    fn extra_batches(&mut self, _ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<Vec<ExtraBatch>> {
        Ok(vec![])
    }

    /// Loss terms computed from the step's forward pass.
    fn loss(&mut self, _ctx: &RunCtx, _step: &StepView) -> Result<Vec<LossTerm>> {
        Ok(vec![])
    }

    /// Re-weigh the step's terms (all plug-ins' terms and `new`) before they are summed.
    fn weigh(&mut self, _ctx: &RunCtx, _terms: &mut Vec<LossTerm>) -> Result<()> {
        Ok(())
    }

    /// After backward, before the optimiser step (gradient projection, masking).
    fn after_backward(&mut self, _ctx: &RunCtx, _grads: &mut GradStore) -> Result<()> {
        Ok(())
    }

    /// Trainable parameters of the plug-in itself, by name (optimised with the model's, at
    /// the stage's learning rate, no weight decay).
    fn parameters(&self) -> Vec<(String, candle_core::Var)> {
        vec![]
    }

    /// After every epoch (1-based `epoch` within the stage).
    fn after_epoch(&mut self, _ctx: &RunCtx, _epoch: usize) -> Result<()> {
        Ok(())
    }

    /// After the last epoch of stage `ctx.stage` (the model is the stage's final model).
    fn after_stage(&mut self, _ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        Ok(())
    }

    /// A rehearsal strategy's buffer at this point (for the summary); `None`: no buffer.
    fn memory(&self, _ctx: &RunCtx) -> Option<BufferMemory> {
        None
    }

    /// State to save after every epoch.
    fn state(&self) -> Result<PluginState> {
        Ok(PluginState::default())
    }

    /// Restore what [`Plugin::state`] saved.
    fn load_state(&mut self, _state: PluginState) -> Result<()> {
        Ok(())
    }
}

/// The plug-ins of a run, in hook order: the reference mode's, then the strategies' in
/// registry order (replay's batches first, weighting last). `varmap` holds the run's
/// initial weights.
pub fn build(
    exp: &Experiment,
    strategies: &Registry,
    varmap: &VarMap,
    device: &Device,
) -> Result<Vec<Box<dyn Plugin>>> {
    let mut out: Vec<Box<dyn Plugin>> = Vec::new();
    match exp.mode {
        crate::config::Mode::Sequential => {}
        crate::config::Mode::Joint => out.push(Box::new(joint::Joint::new())),
        crate::config::Mode::SingleTask => {
            out.push(Box::new(single_task::SingleTask::new(varmap)?))
        }
    }
    out.extend(strategies.build(&BuildCtx {
        exp,
        varmap,
        device,
    })?);
    Ok(out)
}
