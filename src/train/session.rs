//! Everything around the training loop: choosing the device, generating the built-in
//! benchmark, opening the tasks' data, building the model, creating or reopening the run
//! folder, saving and restoring the resume state, and the end-of-run summary. The loop
//! itself is [`super::engine`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::state::{self, ExtraTensors, PartialEpoch, RunState};
use crate::config::{DataSource, Experiment};
use crate::data::{self, AugmentConfig};
use crate::model::weights::{self, WeightsSpec};
use crate::model::{init, OneHead, OneHeadConfig};
use crate::plugins::{self, Plugin, PluginState, RunCtx};
use crate::report::summary::ParamSummary;
use crate::report::{
    self, judge, EpochColumns, EvalRecord, Judging, Matrix, RunCsv, RunSummary, TaskRef,
};
use crate::tasks::{OpenOptions, Registry, TaskMetrics, TaskSet};

/// How a run is launched (things that are not part of the experiment itself).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Hide progress bars (tests, sweeps in the background).
    pub quiet: bool,
    /// Stop after this many epochs of the whole run (counted from its start), state saved,
    /// as if the process had been killed there: [`resume`] continues it.
    pub stop_after_epochs: Option<usize>,
    /// Stop after this many optimisation steps of this session, mid-epoch if need be, with
    /// the state saved exactly as an interrupt (Ctrl-C) saves it.
    pub stop_after_steps: Option<usize>,
    /// Set (by a signal handler or another thread) to stop after the current step with the
    /// state saved.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// `onehead run FILE --run-dir DIR` (sweeps, job arrays): use exactly this folder
    /// instead of a fresh `<results>/<name>/<stamp>`. See [`Session::start`] for what an
    /// existing folder means.
    pub run_dir: Option<PathBuf>,
}

/// `--run-dir DIR` named a folder whose run has already finished (it has `summary.json`):
/// nothing was done. Not an error for the caller: `onehead run` exits 0 with this message.
#[derive(Debug, thiserror::Error)]
#[error("{} already holds a finished run (summary.json): nothing to do", run_dir.display())]
pub struct AlreadyFinished {
    pub run_dir: PathBuf,
}

/// Files a run writes before its first epoch completes, and the log a sweep or job array
/// writes into the folder before starting the run. A folder holding nothing else is a run
/// that never completed an epoch (or never started): it starts afresh there.
/// (`state/` without `state.json`: killed while saving the first epoch's state.)
const FRESH_RUN_FILES: [&str; 8] = [
    "log.txt",
    "config.toml",
    "meta.json",
    "epochs.csv",
    "eval.csv",
    "matrix.csv",
    "checkpoints",
    "state",
];

/// `--run-dir DIR`, for sweeps and job arrays that must find a run again after a kill or a
/// requeue: absent or empty → a fresh run there (`Ok(false)`); a `config.toml` other than
/// `exp` → an error; `summary.json` → [`AlreadyFinished`]; `state/state.json` → resume it
/// (`Ok(true)`); only files of a run that never completed an epoch ([`FRESH_RUN_FILES`]) →
/// start afresh there; anything else → an error (never overwrite what we don't know).
fn check_run_dir(exp: &Experiment, dir: &Path, registry: &Registry) -> Result<bool> {
    let stored = dir.join("config.toml");
    if stored.is_file() {
        let prev = Experiment::load_with(&stored, &[], &registry.names())
            .with_context(|| format!("--run-dir {}: reading its config.toml", dir.display()))?;
        if prev != *exp {
            anyhow::bail!(
                "--run-dir {} holds a run of another configuration (its config.toml differs from the one given): use another folder",
                dir.display()
            );
        }
    }
    if dir.join("summary.json").exists() {
        return Err(AlreadyFinished {
            run_dir: dir.to_path_buf(),
        }
        .into());
    }
    if dir.join("state").join("state.json").is_file() {
        return Ok(true);
    }
    if dir.exists() {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("--run-dir {}", dir.display()))?;
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().to_string();
            if !(FRESH_RUN_FILES.contains(&name.as_str()) || name.starts_with('.')) {
                anyhow::bail!(
                    "--run-dir {} exists and holds '{name}', which is not part of an unfinished run: use another folder",
                    dir.display()
                );
            }
        }
    }
    Ok(false)
}

/// The run stopped on purpose (`stop_after_*` or an interrupt); resume it from `run_dir`.
#[derive(Debug, thiserror::Error)]
#[error("run stopped after {what}; continue it with `onehead resume {}`", run_dir.display())]
pub struct Stopped {
    pub run_dir: PathBuf,
    /// Where it stopped, in words ("epoch 3", "step 7 of epoch 2").
    pub what: String,
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run_dir: PathBuf,
    pub summary: RunSummary,
}

/// `auto` → CUDA device 0 when compiled with CUDA and one is present, else CPU.
pub fn select_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            // `cuda_is_available` only says the build has CUDA; a CUDA build on a machine
            // without a GPU (or driver) must still run, on the CPU.
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::warn!(
                        "device auto: CUDA could not start ({}); using the CPU",
                        first_line(&e)
                    ),
                }
            }
            Ok(Device::Cpu)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()
                .with_context(|| format!("device '{s}': expected cuda:<N>"))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "device '{s}' asked for, but this build has no CUDA support (rebuild with `--features cuda`) or no GPU is present; use device = \"cpu\" or \"auto\""
                );
            }
            Device::new_cuda(ordinal).map_err(|e| {
                anyhow::anyhow!(
                    "device '{s}': CUDA could not start ({}); use device = \"cpu\" or \"auto\"",
                    first_line(&e)
                )
            })
        }
        other => anyhow::bail!("device '{other}': expected auto, cpu, cuda or cuda:N"),
    }
}

/// The first line of an error (candle appends a backtrace when RUST_BACKTRACE is set).
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
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
    let tmp = root.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    data::synth::generate(
        &tmp,
        &data::synth::SynthOptions {
            seed: d.synth_seed,
            train: d.synth_train,
            val: d.synth_val,
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
pub fn open_tasks(exp: &Experiment, registry: &Registry) -> Result<TaskSet> {
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
    let model = OneHead::new(&cfg, vb)?;
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
                    chance: task.chance(&metric).unwrap_or(0.0),
                    task: name,
                    metric,
                    stage,
                })
            })
            .collect()
    }

    /// The stage tasks, in order.
    pub fn stage_tasks(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.task.clone()).collect()
    }
}

/// Where the run stands; saved (with the tensors) after every epoch.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Stage index the loop is in (or starts at).
    pub stage: usize,
    /// Next epoch (1-based) of `stage` to train.
    pub next_epoch: usize,
    /// Completed epochs over the run.
    pub global_epoch: usize,
    /// Completed optimisation steps over the run (this session and earlier ones).
    pub steps: usize,
    pub pools: Vec<Vec<usize>>,
    pub history: Vec<EvalRecord>,
    /// A mid-epoch position to continue from.
    pub partial: Option<PartialEpoch>,
    /// Training seconds of earlier sessions of the run.
    pub seconds_before: f64,
    /// Unix seconds of the run's first start.
    pub started: u64,
}

/// A run being trained: its [`Env`], plug-ins, RNG, folder and logs.
pub struct Session {
    pub env: Env,
    pub plugins: Vec<Box<dyn Plugin>>,
    pub rng: ChaCha8Rng,
    pub run_dir: PathBuf,
    pub csv: RunCsv,
    /// The TensorBoard sink, when `[log] tensorboard = true`.
    pub tensorboard: Option<crate::report::TbWriter>,
    pub opts: RunOptions,
    pub progress: Progress,
    /// With `[eval] baseline = "single_task"`: the reference run's folder and its baselines.
    pub single_task: Option<(PathBuf, BTreeMap<String, f64>)>,
    /// The saved state of a resumed run, handed to the optimiser (mid-stage) and the
    /// plug-ins when the loop starts.
    pub resumed: Option<(RunState, ExtraTensors)>,
}

/// The single-task reference of a sequential experiment: each stage's task trained alone
/// from the same initialisation with its stage's budget (epochs, batch, optimiser,
/// schedule), all layers at full rate and no strategy. Named `<name>__single_task`.
pub fn single_task_reference(exp: &Experiment) -> Experiment {
    let mut r = exp.clone();
    r.name = format!("{}__single_task", exp.name);
    r.mode = crate::config::Mode::SingleTask;
    r.seeds = None;
    r.replay.enabled = false;
    r.lwf = Default::default();
    r.ewc = Default::default();
    r.uncertainty = Default::default();
    r.eval.baseline = crate::config::BaselineKind::StageEnd;
    for s in &mut r.stages {
        s.lr_scale = Default::default();
        s.freeze = crate::config::Freeze::None;
    }
    r
}

/// With `[eval] baseline = "single_task"`: the baselines of the single-task reference run,
/// reusing a finished one with the identical config under `<results>/<name>__single_task/`,
/// or training it first.
fn single_task_baselines(
    exp: &Experiment,
    registry: &Registry,
    quiet: bool,
) -> Result<Option<(PathBuf, BTreeMap<String, f64>)>> {
    if exp.eval.baseline != crate::config::BaselineKind::SingleTask {
        return Ok(None);
    }
    let reference = single_task_reference(exp);
    let folder = reference.results_dir.join(&reference.name);
    let mut found = None;
    if let Ok(entries) = std::fs::read_dir(&folder) {
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        dirs.sort();
        for d in dirs.into_iter().rev() {
            let same = Experiment::load_with(&d.join("config.toml"), &[], &registry.names())
                .is_ok_and(|c| c == reference);
            if same && d.join("summary.json").is_file() {
                found = Some(d);
                break;
            }
        }
    }
    let (dir, summary) = match found {
        Some(d) => {
            tracing::info!("single-task baselines from {}", d.display());
            let text = std::fs::read_to_string(d.join("summary.json"))?;
            let s: RunSummary = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", d.join("summary.json").display()))?;
            (d, s)
        }
        None => {
            tracing::info!(
                "training the single-task reference {} first",
                reference.name
            );
            let out = super::run_with(
                &reference,
                registry,
                &RunOptions {
                    quiet,
                    ..RunOptions::default()
                },
            )?;
            (out.run_dir, out.summary)
        }
    };
    let baselines = summary
        .tasks
        .iter()
        .map(|t| (t.task.clone(), t.baseline))
        .collect();
    Ok(Some((dir, baselines)))
}

/// A TensorBoard writer when the experiment asks for one (a resumed run adds a second
/// event file to the same folder; TensorBoard reads them together).
fn tensorboard(exp: &Experiment, run_dir: &Path) -> Result<Option<crate::report::TbWriter>> {
    exp.log
        .tensorboard
        .then(|| crate::report::TbWriter::create(run_dir))
        .transpose()
}

fn epoch_columns(env: &Env, plugins: &[Box<dyn Plugin>]) -> EpochColumns {
    let terms: Vec<String> = plugins.iter().flat_map(|p| p.loss_terms()).collect();
    let tasks: Vec<(String, Vec<String>)> = env
        .tasks
        .iter()
        .map(|(t, _)| (t.name().to_string(), t.metric_names()))
        .collect();
    EpochColumns::new(&terms, &tasks)
}

impl Session {
    /// A fresh run of `exp`; with `opts.run_dir`, in that folder, resuming the unfinished run
    /// it holds (see `check_run_dir`).
    pub fn start(exp: &Experiment, registry: &Registry, opts: RunOptions) -> Result<Self> {
        if let Some(dir) = &opts.run_dir {
            if check_run_dir(exp, dir, registry)? {
                return Self::resume(dir, registry, opts.clone());
            }
        }
        let device = select_device(&exp.device)?;
        let tasks = open_tasks(exp, registry)?;
        let mut rng = ChaCha8Rng::seed_from_u64(exp.seed);
        let (varmap, model, head_config) = build_model(exp, &tasks, &device, &mut rng, true)?;
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
        let plugins = plugins::build(exp, &env.varmap, &env.device)?;
        let run_dir = match &opts.run_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                d.clone()
            }
            None => report::create_run_dir(&exp.results_dir, &exp.name)?,
        };
        report::write_atomic(&run_dir.join("config.toml"), exp.to_toml().as_bytes())?;
        let meta = serde_json::json!({
            "name": exp.name,
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": report::GIT_COMMIT,
            "started_at": report::utc_rfc3339(report::now_secs()),
            "device": format!("{:?}", env.device),
            "data_root": env.exp.data.resolved_root().display().to_string(),
            "command": std::env::args().collect::<Vec<_>>(),
        });
        report::write_atomic(
            &run_dir.join("meta.json"),
            serde_json::to_string_pretty(&meta)?.as_bytes(),
        )?;
        let csv = RunCsv::create(&run_dir, epoch_columns(&env, &plugins))?;
        Ok(Self {
            env,
            plugins,
            rng,
            tensorboard: tensorboard(exp, &run_dir)?,
            single_task: single_task_baselines(exp, registry, opts.quiet)?,
            run_dir,
            csv,
            opts,
            progress: Progress {
                stage: 0,
                next_epoch: 1,
                global_epoch: 0,
                steps: 0,
                pools: vec![],
                history: vec![],
                partial: None,
                seconds_before: 0.0,
                started: report::now_secs(),
            },
            resumed: None,
        })
    }

    /// Continue the unfinished run in `run_dir` from its saved state.
    pub fn resume(run_dir: &Path, registry: &Registry, opts: RunOptions) -> Result<Self> {
        if run_dir.join("summary.json").exists() {
            anyhow::bail!(
                "{} is a finished run (it has summary.json); finished runs are never overwritten",
                run_dir.display()
            );
        }
        let exp = Experiment::load_with(&run_dir.join("config.toml"), &[], &registry.names())?;
        let device = select_device(&exp.device)?;
        let tasks = open_tasks(&exp, registry)?;
        let mut rng = ChaCha8Rng::seed_from_u64(exp.seed);
        let (varmap, model, head_config) = build_model(&exp, &tasks, &device, &mut rng, false)?;
        let (st, extra) = state::load(run_dir, &varmap, &device).with_context(|| {
            format!(
                "resuming {}: the saved state does not fit the run's config.toml (was either edited?)",
                run_dir.display()
            )
        })?;
        let stages = exp.plan();
        anyhow::ensure!(
            st.stage < stages.len()
                && st.epoch <= stages[st.stage].epochs
                && st.pools.len() == st.stage + 1
                && st.pools.iter().zip(&stages).all(|(p, s)| {
                    let n = tasks
                        .get(&s.task)
                        .map(|t| t.len(crate::tasks::Split::Train));
                    n.is_ok_and(|n| p.iter().all(|&i| i < n))
                }),
            "{}: the saved state does not fit the run's config.toml (was either edited?)",
            run_dir.join("state").display()
        );
        let env = Env {
            exp: exp.clone(),
            stages: exp.plan(),
            tasks,
            device,
            varmap,
            model,
            head_config,
            augment: augment_config(&exp),
        };
        let plugins = plugins::build(&exp, &env.varmap, &env.device)?;
        anyhow::ensure!(
            st.plugins.len() == plugins.len(),
            "{}: the saved state has {} plug-in states, the config asks for {} plug-ins",
            run_dir.join("state").display(),
            st.plugins.len(),
            plugins.len()
        );
        let csv = RunCsv::reopen(run_dir, epoch_columns(&env, &plugins), st.global_epoch)?;
        tracing::info!(
            "resuming {} after stage {} epoch {} (epoch {} of the run){}",
            run_dir.display(),
            st.stage + 1,
            st.epoch,
            st.global_epoch,
            match &st.partial {
                Some(p) => format!(", at step {} of epoch {}", p.steps_done, p.epoch),
                None => String::new(),
            }
        );
        // A stage whose last epoch is done continues with the next stage.
        let (stage, next_epoch) = if st.epoch >= stages[st.stage].epochs {
            (st.stage + 1, 1)
        } else {
            (st.stage, st.epoch + 1)
        };
        let progress = Progress {
            stage,
            next_epoch,
            global_epoch: st.global_epoch,
            steps: 0,
            pools: st.pools.clone(),
            history: st.history.clone(),
            partial: st.partial.clone(),
            seconds_before: st.train_seconds,
            started: st.started,
        };
        Ok(Self {
            rng: st.rng.clone(),
            env,
            plugins,
            tensorboard: tensorboard(&exp, run_dir)?,
            single_task: single_task_baselines(&exp, registry, opts.quiet)?,
            run_dir: run_dir.to_path_buf(),
            csv,
            opts,
            progress,
            resumed: Some((st, extra)),
        })
    }

    /// Save the resume state: model, optimiser, RNG, plug-ins, progress.
    pub fn save_state(
        &self,
        optim: &crate::train::optim::Optimizer,
        train_seconds: f64,
    ) -> Result<()> {
        let p = &self.progress;
        let mut plugin_json = Vec::new();
        let mut plugin_tensors = Vec::new();
        for pl in &self.plugins {
            let PluginState { json, tensors } = pl.state()?;
            plugin_json.push(json);
            plugin_tensors.push(tensors);
        }
        let (stage, epoch) = (p.stage, p.next_epoch - 1);
        let st = RunState {
            version: env!("CARGO_PKG_VERSION").into(),
            stage,
            epoch,
            global_epoch: p.global_epoch,
            rng: self.rng.clone(),
            pools: p.pools.clone(),
            history: p.history.clone(),
            plugins: plugin_json,
            partial: p.partial.clone(),
            train_seconds,
            started: p.started,
            tensors: format!(
                "epoch-{}-{}.safetensors",
                p.global_epoch,
                p.partial.as_ref().map_or(0, |q| q.steps_done)
            ),
        };
        state::save(
            &self.run_dir,
            &st,
            &self.env.varmap,
            &ExtraTensors {
                optim: optim.state_tensors()?,
                plugins: plugin_tensors,
            },
        )
    }

    /// The task × stage matrix after `stages_done` stages, written to `matrix.csv`.
    pub fn write_matrix(&self, stages_done: usize) -> Result<Matrix> {
        let m = Matrix::from_history(
            &self.env.task_refs()?,
            &self.env.stage_tasks(),
            stages_done,
            &self.progress.history,
        );
        report::write_atomic(&self.run_dir.join("matrix.csv"), &m.to_csv()?)?;
        Ok(m)
    }

    /// Judge the run, write `summary.json`, drop the resume state.
    pub fn finish(self, train_seconds: f64) -> Result<RunOutcome> {
        let env = &self.env;
        let exp = &env.exp;
        let refs = env.task_refs()?;
        let judging = Judging {
            tolerance: exp.eval.tolerance,
            tolerance_kind: exp.eval.tolerance_kind,
            baseline: exp.eval.baseline,
            chance_margin: exp.eval.chance_margin,
        };
        let history = &self.progress.history;
        let single = self.single_task.as_ref().map(|(_, b)| b);
        let tasks = judge(&refs, history, &judging, single)?;
        let mut final_metrics = std::collections::BTreeMap::new();
        for t in &refs {
            if let Some(r) = history
                .iter()
                .filter(|r| r.task == t.task)
                .max_by_key(|r| r.global_epoch)
            {
                for (k, v) in &r.metrics {
                    final_metrics.insert(format!("{}_{k}", t.task), *v);
                }
            }
        }
        let matrix = self.write_matrix(env.stages.len())?;
        let stage_tasks = env.stage_tasks();
        let learned: Vec<usize> = matrix
            .tasks
            .iter()
            .map(|t| stage_tasks.iter().rposition(|s| s == t).unwrap_or(0))
            .collect();
        let forgetting =
            crate::metrics::forgetting::forgetting(&matrix.tasks, &matrix.values, &learned);
        let counts = crate::model::count_params(&env.varmap);
        let summary = RunSummary {
            name: exp.name.clone(),
            run_dir: self.run_dir.display().to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            git_commit: report::GIT_COMMIT.into(),
            seed: exp.seed,
            device: format!("{:?}", env.device),
            tolerance: exp.eval.tolerance,
            tolerance_kind: exp.eval.tolerance_kind,
            baseline_kind: exp.eval.baseline,
            baseline_run: self
                .single_task
                .as_ref()
                .map(|(d, _)| d.display().to_string()),
            chance_margin: exp.eval.chance_margin,
            pass: tasks.iter().all(|t| t.pass),
            tasks,
            final_metrics,
            matrix,
            forgetting,
            params: ParamSummary {
                total: counts.total,
                backbone: counts.backbone,
                neck: counts.neck,
                head: counts.head,
                used_in_forward: counts.used(),
            },
            latency_ms: crate::model::info::median_latency_ms(
                &env.model,
                exp.model.image_size,
                &env.device,
                10,
            )?,
            train_seconds,
            peak_rss_mib: crate::ops::peak_rss_mib(),
            started_at: report::utc_rfc3339(self.progress.started),
            finished_at: report::utc_rfc3339(report::now_secs()),
        };
        report::write_atomic(
            &self.run_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        // The resume state (model + optimiser moments) is only for unfinished runs: a
        // finished run keeps its per-stage checkpoints.
        let _ = std::fs::remove_dir_all(self.run_dir.join("state"));
        // Pictures are a view of the files just written: a failure to draw them is reported,
        // never a failed run (`onehead plot` redraws them).
        match report::draw_run(&self.run_dir) {
            Ok(files) => tracing::info!(
                "report: {} ({} files)",
                self.run_dir.join("report.html").display(),
                files.len()
            ),
            Err(e) => tracing::warn!("drawing the run's pictures failed: {e:#}"),
        }
        Ok(RunOutcome {
            run_dir: self.run_dir,
            summary,
        })
    }
}

/// The checkpoints in `run_dir/checkpoints`: `(stage number, name)` of every
/// `stage<k>-<task>.safetensors`, by stage.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(usize, String)>> {
    let dir = run_dir.join("checkpoints");
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".safetensors") {
            if let Some(k) = checkpoint_stage(stem) {
                out.push((k, stem.to_string()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The stage number of a checkpoint name `stage<k>-<task>`.
fn checkpoint_stage(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("stage")?;
    let (k, task) = rest.split_once('-')?;
    (!task.is_empty()).then_some(())?;
    k.parse().ok()
}

/// The checkpoint file of a run: `checkpoint` names one (`stage2-det`, with or without
/// `.safetensors`), `last` the latest stage's present, `None` the run's final stage's. A
/// missing one is an error naming those available.
pub fn resolve_checkpoint(
    run_dir: &Path,
    exp: &Experiment,
    checkpoint: Option<&str>,
) -> Result<(String, PathBuf)> {
    let available = list_checkpoints(run_dir)?;
    let ckpt_dir = run_dir.join("checkpoints");
    let listing = || {
        if available.is_empty() {
            format!(
                "{} holds no checkpoint (the run has not finished a stage yet)",
                ckpt_dir.display()
            )
        } else {
            format!(
                "available: {} (or `last`)",
                available
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    let name = match checkpoint.map(|c| c.trim_end_matches(".safetensors")) {
        Some("last") => match available.last() {
            Some((_, n)) => n.clone(),
            None => anyhow::bail!("no checkpoint to load: {}", listing()),
        },
        Some(name) => name.to_string(),
        None => {
            let plan = exp.plan();
            format!("stage{}-{}", plan.len(), plan[plan.len() - 1].task)
        }
    };
    let file = ckpt_dir.join(format!("{name}.safetensors"));
    if !file.is_file() {
        anyhow::bail!(
            "checkpoint {} not found{}; {}",
            file.display(),
            if checkpoint.is_none() {
                " (the run may not have finished its last stage)"
            } else {
                ""
            },
            listing()
        );
    }
    Ok((name, file))
}

/// A run's model restored from one of its checkpoints, with its experiment's tasks.
pub struct LoadedRun {
    pub run_dir: PathBuf,
    pub exp: Experiment,
    pub tasks: TaskSet,
    pub model: OneHead,
    pub device: Device,
    /// The checkpoint's name (`stage3-cls`).
    pub checkpoint: String,
    /// Tasks learned by the end of the checkpoint's stage, in the order learned (all of the
    /// experiment's for a checkpoint named otherwise).
    pub learned: Vec<String>,
}

/// Load `run_dir`'s checkpoint (see [`resolve_checkpoint`]) into a model built from the
/// run's own `config.toml`, opening its tasks' data (generated first if it is the built-in
/// benchmark and absent).
pub fn load_run(
    run_dir: &Path,
    checkpoint: Option<&str>,
    registry: &Registry,
) -> Result<LoadedRun> {
    let config = run_dir.join("config.toml");
    anyhow::ensure!(
        config.is_file(),
        "{} is not a run folder (it has no config.toml)",
        run_dir.display()
    );
    let exp = Experiment::load_with(&config, &[], &registry.names())?;
    let (name, file) = resolve_checkpoint(run_dir, &exp, checkpoint)?;
    let device = select_device(&exp.device)?;
    let tasks = open_tasks(&exp, registry)?;
    let mut rng = ChaCha8Rng::seed_from_u64(exp.seed);
    let (mut varmap, model, _) = build_model(&exp, &tasks, &device, &mut rng, false)?;
    varmap
        .load(&file)
        .with_context(|| format!("loading checkpoint {}", file.display()))?;
    let stages = exp.plan().len();
    let learned = match checkpoint_stage(&name) {
        Some(k) if (1..=stages).contains(&k) => exp.evaluated_tasks(k - 1),
        _ => exp.tasks_in_order(),
    };
    Ok(LoadedRun {
        run_dir: run_dir.to_path_buf(),
        exp,
        tasks,
        model,
        device,
        checkpoint: name,
        learned,
    })
}

/// Evaluate a run's checkpoint (default: the last stage's) on the val split of every task
/// of its experiment, with the run's own `config.toml`.
pub fn evaluate_checkpoint(
    run_dir: &Path,
    checkpoint: Option<&str>,
    registry: &Registry,
) -> Result<Vec<(String, TaskMetrics)>> {
    evaluate_checkpoint_export(run_dir, checkpoint, registry, None)
}

/// [`evaluate_checkpoint`], and with `export`, every task's predictions on its val split
/// written there in a standard format (`onehead eval --export DIR`: COCO results JSON,
/// palette PNG masks, CSV), with `manifest.json` naming the files, the ground truth and the
/// metrics returned. `DIR` may be absent, empty or an earlier export (whose task folders are
/// replaced); anything else is an error.
pub fn evaluate_checkpoint_export(
    run_dir: &Path,
    checkpoint: Option<&str>,
    registry: &Registry,
    export: Option<&Path>,
) -> Result<Vec<(String, TaskMetrics)>> {
    let run = load_run(run_dir, checkpoint, registry)?;
    let names = run.exp.tasks_in_order();
    if let Some(dir) = export {
        prepare_export_dir(dir, &names)?;
    }
    let mut results = Vec::new();
    let mut written = serde_json::Map::new();
    for t in names {
        let (m, w) = super::evaluate::evaluate_and_export(
            &run.model,
            &run.tasks,
            &t,
            run.exp.eval.batch_size,
            &run.device,
            export,
        )?;
        if let Some(w) = w {
            written.insert(t.clone(), w);
        }
        results.push((t, m));
    }
    if let Some(dir) = export {
        let manifest = serde_json::json!({
            "run_dir": crate::tasks::absolute_display(run_dir),
            "checkpoint": run.checkpoint,
            "data_root": crate::tasks::absolute_display(&run.exp.data.resolved_root()),
            "image_size": run.exp.model.image_size,
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": report::GIT_COMMIT,
            "tasks": written,
            "metrics": results.iter().cloned().collect::<BTreeMap<_, _>>(),
        });
        report::write_atomic(
            &dir.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
    }
    Ok(results)
}

/// An export folder: created if absent; an earlier export (it has `manifest.json`) loses
/// the folders of `tasks`, so that no file of another checkpoint lingers; a folder holding
/// anything else is left alone with an error.
fn prepare_export_dir(dir: &Path, tasks: &[String]) -> Result<()> {
    if dir.join("manifest.json").is_file() {
        for t in tasks {
            let sub = dir.join(t);
            if sub.is_dir() {
                std::fs::remove_dir_all(&sub)
                    .with_context(|| format!("clearing {}", sub.display()))?;
            }
        }
        return Ok(());
    }
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("--export {}", dir.display()))?;
        if entries.next().is_some() {
            anyhow::bail!(
                "--export {} exists and is not an earlier export (no manifest.json): use an empty or new folder",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
