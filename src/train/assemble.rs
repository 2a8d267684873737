//! Building a run from its experiment, the same way for a fresh start, a resume and a
//! checkpoint load: the device, the tasks' data (the built-in benchmark generated on first
//! use), the seeded model, and the plug-ins. What differs between them (a new folder or the
//! saved state) is [`super::session`]'s.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::device::select_device;
use crate::config::{DataSource, Experiment};
use crate::data::{self, AugmentConfig};
use crate::model::weights::{self, WeightsSpec};
use crate::model::{init, OneHead, OneHeadConfig};
use crate::plugins::{self, Plugin, RunCtx};
use crate::registry::Registry;
use crate::report::TaskRef;
use crate::tasks::{OpenOptions, Split, TaskSet};

/// A run as built from its experiment, before any folder or state is touched.
pub struct Assembly {
    pub env: Env,
    pub plugins: Vec<Box<dyn Plugin>>,
    /// The run's RNG after the model's init (a resume replaces it with the saved one).
    pub rng: ChaCha8Rng,
}

/// Build `exp`'s run. `pretrained`: load the backbone weights the experiment names (a fresh
/// start); a resume or a checkpoint load overwrites every weight anyway.
pub fn assemble(exp: &Experiment, registry: &Registry, pretrained: bool) -> Result<Assembly> {
    let device = select_device(&exp.device)?;
    let tasks = open_tasks(exp, &registry.tasks)?;
    let mut rng = ChaCha8Rng::seed_from_u64(exp.seed);
    let (varmap, model, head_config) = build_model(exp, &tasks, &device, &mut rng, pretrained)?;
    let env = Env {
        exp: exp.clone(),
        stages: exp.plan(),
        tasks,
        device,
        varmap,
        model,
        head_config,
        augment: augment_config(exp),
    };
    // The verdict metrics exist (`[eval] metric` names one of each task's): known only now
    // that the tasks are open, and still before anything trains.
    env.task_refs()?;
    let plugins = plugins::build(exp, &registry.strategies, &env.varmap, &env.device)?;
    Ok(Assembly { env, plugins, rng })
}

/// The data root of `exp`, generating the built-in benchmark on first use. Generation goes
/// to a temporary sibling folder that is renamed into place, so an interrupted generation
/// never leaves a half-written dataset behind.
pub fn ensure_data(exp: &Experiment) -> Result<PathBuf> {
    let root = exp.data.resolved_root();
    if exp.data.source == DataSource::Disk || root.exists() {
        return Ok(root);
    }
    let d = &exp.data;
    tracing::info!("generating the built-in benchmark into {}", root.display());
    if let Some(parent) = root.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Unique per process and per call: two runs (processes, or threads of a library user)
    // may generate the same benchmark at once; the first rename wins.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = root.with_extension(format!("partial-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    data::synth::generate(
        &tmp,
        &data::synth::SynthOptions {
            seed: d.synth_seed,
            train: d.synth_train,
            val: d.synth_val,
            test: d.synth_test,
            size: d.synth_size,
        },
    )
    .with_context(|| format!("generating the synthetic benchmark in {}", tmp.display()))?;
    match std::fs::rename(&tmp, &root) {
        Ok(()) => {}
        // Another process generated it meanwhile: same seed, same bytes; keep theirs.
        Err(_) if root.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(e).with_context(|| format!("moving data to {}", root.display())),
    }
    Ok(root)
}

/// Training-time augmentation of `exp` (every draw from the run's RNG; crops off by default).
pub fn augment_config(exp: &Experiment) -> AugmentConfig {
    AugmentConfig {
        flip: exp.data.flip,
        scale: (exp.data.crop_scale[0] as f32, exp.data.crop_scale[1] as f32),
        ..AugmentConfig::default()
    }
}

/// Open the data of every task `exp` trains.
pub fn open_tasks(exp: &Experiment, registry: &crate::tasks::Registry) -> Result<TaskSet> {
    let root = ensure_data(exp)?;
    let opts = OpenOptions {
        root,
        image_size: exp.model.image_size,
        train_crops: augment_config(exp).crops(),
        settings: exp.tasks.clone(),
    };
    registry.open(&exp.tasks_in_order(), &opts)
}

/// Build the model for `tasks` with seeded init, then load pretrained backbone weights if
/// asked.
pub fn build_model(
    exp: &Experiment,
    tasks: &TaskSet,
    device: &Device,
    rng: &mut ChaCha8Rng,
    load_pretrained: bool,
) -> Result<(VarMap, OneHead, OneHeadConfig)> {
    let cfg = OneHeadConfig {
        fpn_channels: exp.model.fpn_channels,
        head_channels: tasks.head_channels(),
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let mut model = OneHead::new(&cfg, vb)?;
    if let Some(e) = exp.model.executor {
        model.set_executor(e);
    }
    init::init_all(&varmap, rng, &tasks.head_bias_init())?;
    let spec: WeightsSpec = exp
        .model
        .weights
        .parse()
        .with_context(|| format!("model.weights = '{}'", exp.model.weights))?;
    if load_pretrained {
        if let Some(path) = weights::resolve(&spec, exp.model.pin_dir.as_deref())? {
            let report = weights::load_backbone(&varmap, &path, "backbone.")
                .with_context(|| format!("loading pretrained weights {}", path.display()))?;
            tracing::info!("pretrained backbone from {}: {report}", path.display());
        }
    }
    Ok((varmap, model, cfg))
}

/// The parts of a run that the loop and the plug-ins read and never replace.
pub struct Env {
    pub exp: Experiment,
    /// The stages the loop runs ([`Experiment::plan`]).
    pub stages: Vec<crate::config::StageConfig>,
    pub tasks: TaskSet,
    pub device: Device,
    pub varmap: VarMap,
    pub model: OneHead,
    pub head_config: OneHeadConfig,
    pub augment: AugmentConfig,
}

impl Env {
    /// What plug-ins see during stage `stage`.
    pub fn ctx<'a>(&'a self, stage: usize, pools: &'a [Vec<usize>]) -> RunCtx<'a> {
        RunCtx {
            exp: &self.exp,
            stages: &self.stages,
            tasks: &self.tasks,
            model: &self.model,
            varmap: &self.varmap,
            head_config: &self.head_config,
            device: &self.device,
            augment: &self.augment,
            stage,
            pools,
            backbone_train: self.stages[stage].freeze == crate::config::Freeze::None,
        }
    }

    /// The verdict metric and chance level of every task, in the order tasks are learned.
    pub fn task_refs(&self) -> Result<Vec<TaskRef>> {
        self.exp
            .tasks_in_order()
            .into_iter()
            .map(|name| {
                let task = self.tasks.get(&name)?;
                let metric = self
                    .exp
                    .verdict_metric(&name)
                    .unwrap_or(task.primary_metric())
                    .to_string();
                anyhow::ensure!(
                    task.metric_names().contains(&metric),
                    "[eval] metric: task '{name}' has no metric '{metric}' (it has {})",
                    task.metric_names().join(", ")
                );
                // The joint run trains every task in its one stage.
                let stage = self
                    .stages
                    .iter()
                    .rposition(|s| s.task == name)
                    .unwrap_or(0);
                Ok(TaskRef {
                    chance: task.chance(&metric, self.verdict_split()).unwrap_or(0.0),
                    task: name,
                    metric,
                    stage,
                })
            })
            .collect()
    }

    /// The split the verdict is measured on: the held-out `test` when every task has one
    /// (the built-in benchmark), else `val` (the course sets, whose 240/60 split the
    /// challenge fixes; the summary says so).
    pub fn verdict_split(&self) -> Split {
        let all_have_test = self.tasks.iter().all(|(t, _)| t.len(Split::Test) > 0);
        if all_have_test {
            Split::Test
        } else {
            Split::Val
        }
    }

    /// The stage tasks, in order.
    pub fn stage_tasks(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.task.clone()).collect()
    }
}
