//! The training loop: stages in order, strategies as hooks, evaluation of every task seen so
//! far after each epoch, `epochs.csv` flushed per epoch, a checkpoint per stage and the
//! verdict on forgetting at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::{DataSource, Experiment, Freeze, StageConfig};
use crate::data::{self, Augment, AugmentConfig, Split, TaskDataset};
use crate::model::weights::{self, WeightsSpec};
use crate::model::{init, OneHead, OneHeadConfig};
use crate::report::summary::ParamSummary;
use crate::report::{self, EpochRow, EpochsCsv, RunSummary, TaskVerdict};
use crate::train::optim::{trainable_params, Optimizer};
use crate::train::schedule::LrSchedule;
use crate::train::state::{self, RunState};
use crate::train::strategy::{strategies_for, StepContext, Strategy};
use crate::train::tasks::{evaluate, slice_rows, task_loss, EvalSettings, TaskMetrics};
use crate::TaskKind;

/// How a run is launched (things that are not part of the experiment itself).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Hide progress bars (tests, sweeps in the background).
    pub quiet: bool,
    /// Stop after this many epochs of the whole run (counted from its start), state saved,
    /// as if the process had been killed there: [`resume`] continues it.
    pub stop_after_epochs: Option<usize>,
    /// `onehead run FILE --run-dir DIR` (sweeps, job arrays): use exactly this folder instead
    /// of a fresh `<results>/<name>/<run-id>`. See [`run_in_dir`] for what an existing
    /// folder means.
    pub run_dir: Option<PathBuf>,
}

/// `--run-dir DIR` named a folder whose run has already finished (it has `summary.json`):
/// nothing was done. Not an error for the caller: `onehead run` exits 0 with this message.
#[derive(Debug, thiserror::Error)]
#[error("{} already holds a finished run (summary.json): nothing to do", run_dir.display())]
pub struct AlreadyFinished {
    pub run_dir: PathBuf,
}

/// The run stopped on purpose (see [`RunOptions::stop_after_epochs`]); resume it from
/// `run_dir`.
#[derive(Debug, thiserror::Error)]
#[error("run stopped after epoch {global_epoch}; continue it with `onehead resume {}`", run_dir.display())]
pub struct Stopped {
    pub run_dir: PathBuf,
    pub global_epoch: usize,
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
            if candle_core::utils::cuda_is_available() {
                Ok(Device::new_cuda(0)?)
            } else {
                Ok(Device::Cpu)
            }
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
            Ok(Device::new_cuda(ordinal)?)
        }
        other => anyhow::bail!("device '{other}': expected auto, cpu, cuda or cuda:N"),
    }
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

/// Train and val sets of every task the experiment uses.
pub struct Datasets {
    pub train: Vec<(TaskKind, TaskDataset)>,
    pub val: Vec<(TaskKind, TaskDataset)>,
}

impl Datasets {
    pub fn open(exp: &Experiment, root: &Path) -> Result<Self> {
        let mut train = Vec::new();
        let mut val = Vec::new();
        for task in exp.tasks_in_order() {
            let size = exp.model.image_size;
            let tr = TaskDataset::open(task, root, Split::Train, size)?;
            let va = TaskDataset::open(task, root, Split::Val, size)?;
            if tr.class_names != va.class_names {
                anyhow::bail!(
                    "{task}: the train and val splits under {} have different classes ({} vs {})",
                    root.display(),
                    tr.num_classes(),
                    va.num_classes()
                );
            }
            if tr.is_empty() || va.is_empty() {
                anyhow::bail!("{task}: empty split under {}", root.display());
            }
            train.push((task, tr));
            val.push((task, va));
        }
        Ok(Self { train, val })
    }

    fn get(sets: &[(TaskKind, TaskDataset)], task: TaskKind) -> &TaskDataset {
        &sets
            .iter()
            .find(|(t, _)| *t == task)
            .expect("every staged task is loaded")
            .1
    }

    /// Head configuration with class counts from the data (21/10/10 for unused tasks).
    pub fn head_config(&self, fpn_channels: usize) -> OneHeadConfig {
        let count = |task: TaskKind, default: usize| {
            self.train
                .iter()
                .find(|(t, _)| *t == task)
                .map(|(_, d)| d.num_classes())
                .unwrap_or(default)
        };
        OneHeadConfig {
            fpn_channels,
            seg_classes: count(TaskKind::Seg, 21),
            det_classes: count(TaskKind::Det, 10),
            cls_classes: count(TaskKind::Cls, 10),
        }
    }
}

/// Build the model with seeded init, then load pretrained backbone weights if asked.
pub fn build_model(
    exp: &Experiment,
    cfg: &OneHeadConfig,
    device: &Device,
    rng: &mut ChaCha8Rng,
    load_pretrained: bool,
) -> Result<(VarMap, OneHead)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = OneHead::new(cfg, vb)?;
    // Objectness is channel 4 of the detection block, which follows the seg channels.
    init::init_all(&varmap, rng, Some(cfg.seg_classes + 4))?;
    let spec: WeightsSpec = exp
        .model
        .weights
        .parse()
        .with_context(|| format!("model.weights = '{}'", exp.model.weights))?;
    if !load_pretrained {
        return Ok((varmap, model));
    }
    if let Some(path) = weights::resolve(&spec, exp.model.pin_dir.as_deref())? {
        let report = weights::load_backbone(&varmap, &path, "backbone.")
            .with_context(|| format!("loading pretrained weights {}", path.display()))?;
        tracing::info!("pretrained backbone from {}: {report}", path.display());
    }
    Ok((varmap, model))
}

/// Evaluate a run's checkpoint (default: the last stage's) on the val split of every task
/// of its experiment, with the run's own `config.toml`.
pub fn evaluate_checkpoint(
    run_dir: &Path,
    checkpoint: Option<&str>,
) -> Result<Vec<(TaskKind, TaskMetrics)>> {
    let exp = Experiment::load(&run_dir.join("config.toml"), &[])?;
    let ckpt_dir = run_dir.join("checkpoints");
    let file = match checkpoint {
        Some(name) => ckpt_dir.join(format!(
            "{}.safetensors",
            name.trim_end_matches(".safetensors")
        )),
        None => {
            let last = exp.stages.len();
            ckpt_dir.join(format!(
                "stage{last}-{}.safetensors",
                exp.stages[last - 1].task
            ))
        }
    };
    if !file.is_file() {
        anyhow::bail!(
            "checkpoint {} not found (the run may not have finished that stage)",
            file.display()
        );
    }
    let device = select_device(&exp.device)?;
    let root = ensure_data(&exp)?;
    let data = Datasets::open(&exp, &root)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = OneHead::new(&data.head_config(exp.model.fpn_channels), vb)?;
    let mut varmap = varmap;
    varmap
        .load(&file)
        .with_context(|| format!("loading checkpoint {}", file.display()))?;
    let settings = EvalSettings::from_experiment(&exp);
    data.val
        .iter()
        .map(|(task, ds)| Ok((*task, evaluate(&model, ds, &settings, &device)?)))
        .collect()
}

fn progress(quiet: bool, len: usize, prefix: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

/// What a training step needs that stays fixed over a stage.
struct StepSetup<'a> {
    stage_index: usize,
    stage: &'a StageConfig,
    model: &'a OneHead,
    device: &'a Device,
    data: &'a Datasets,
    augment: &'a AugmentConfig,
    backbone_train: bool,
}

/// Mean losses of one step, for the log.
struct StepLosses {
    new: f64,
    replay: f64,
    total: f64,
}

/// One optimisation step on the samples `idx` of the stage's task, plus whatever the
/// strategies add: draw augmentations, forward the stage's batch and the extra batches in
/// one pass, sum `L_new + Σ weight·L_extra + strategy terms`, backward, clip, update.
fn train_step(
    setup: &StepSetup,
    idx: &[usize],
    lr: f64,
    rng: &mut ChaCha8Rng,
    strategies: &mut [Box<dyn Strategy>],
    opt: &mut Optimizer,
) -> Result<StepLosses> {
    let StepSetup {
        stage_index,
        stage,
        model,
        device,
        data,
        augment,
        backbone_train,
    } = *setup;
    let ds = Datasets::get(&data.train, stage.task);
    let augs: Vec<Augment> = idx.iter().map(|_| augment.draw(rng)).collect();
    let batch = ds.batch_augmented(idx, &augs, device)?;
    let ctx = StepContext {
        stage: stage_index,
        task: stage.task,
        device,
        train_sets: &data.train,
        augment,
    };
    let mut extras = Vec::new();
    for s in strategies.iter_mut() {
        extras.extend(s.extra_batches(&ctx, rng)?);
    }
    let images = if extras.is_empty() {
        batch.images.clone()
    } else {
        let mut all = vec![batch.images.clone()];
        all.extend(extras.iter().map(|w| w.batch.images.clone()));
        Tensor::cat(&all, 0)?
    };
    // One forward pass over the stage's batch and the replayed samples together.
    let out = model.forward_parts(&images, backbone_train, true)?;
    let new = task_loss(&slice_rows(&out, 0, idx.len())?, &batch, device)?;
    let mut total = new.total.clone();
    let mut replay_term: Option<Tensor> = None;
    let mut offset = idx.len();
    for w in &extras {
        let n = w.batch.targets.len();
        let l = task_loss(&slice_rows(&out, offset, n)?, &w.batch, device)?;
        let term = (l.total * w.weight)?;
        replay_term = Some(match replay_term {
            Some(r) => (r + &term)?,
            None => term,
        });
        offset += n;
    }
    if let Some(r) = &replay_term {
        total = (total + r)?;
    }
    for s in strategies.iter_mut() {
        if let Some(extra) = s.extra_loss(&ctx, model, &images, &out)? {
            total = (total + extra)?;
        }
    }
    let total_v = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !total_v.is_finite() {
        anyhow::bail!(
            "loss became {total_v}: lower the learning rate (lr = {}) or set grad_clip_norm",
            stage.lr
        );
    }
    let grads = total.backward()?;
    let scale = if stage.grad_clip_norm > 0.0 {
        let norm = opt.grad_norm(&grads)?;
        if norm > stage.grad_clip_norm {
            stage.grad_clip_norm / norm
        } else {
            1.0
        }
    } else {
        1.0
    };
    opt.step(&grads, lr, scale)?;
    Ok(StepLosses {
        new: new.total.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        replay: match &replay_term {
            Some(r) => r.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            None => 0.0,
        },
        total: total_v,
    })
}

/// Run one experiment from start to finish in a fresh run directory (or in
/// `opts.run_dir`, see [`run_in_dir`]).
pub fn run(exp: &Experiment, opts: &RunOptions) -> Result<RunOutcome> {
    if let Some(dir) = &opts.run_dir {
        return run_in_dir(exp, dir, opts);
    }
    train(exp, None, opts)
}

/// Files a run writes before its first epoch completes, and the log a sweep or job array
/// writes into the folder before starting the run. A folder holding nothing else is a run
/// that never completed an epoch (or never started): it starts afresh there.
/// (`state/` without `state.json`: killed while saving the first epoch's state.)
const FRESH_RUN_FILES: [&str; 6] = [
    "log.txt",
    "config.toml",
    "meta.json",
    "epochs.csv",
    "checkpoints",
    "state",
];

/// `--run-dir DIR`, for sweeps and job arrays that must find a run again after a kill or a
/// requeue: absent or empty → a fresh run there; a `config.toml` other than `exp` → an error;
/// `summary.json` → [`AlreadyFinished`] (no-op); `state/state.json` → resume it; only files of
/// a run that never completed an epoch ([`FRESH_RUN_FILES`]) → start afresh there; anything
/// else → an error (never overwrite what we don't know).
pub fn run_in_dir(exp: &Experiment, dir: &Path, opts: &RunOptions) -> Result<RunOutcome> {
    let stored = dir.join("config.toml");
    if stored.is_file() {
        let prev = Experiment::load(&stored, &[])
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
        return resume(dir, opts);
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
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    train(exp, None, opts)
}

/// Continue an interrupted run in its own folder, from the state saved after its last
/// completed epoch. A finished run (one with `summary.json`) is never touched.
pub fn resume(run_dir: &Path, opts: &RunOptions) -> Result<RunOutcome> {
    if run_dir.join("summary.json").exists() {
        anyhow::bail!(
            "{} is a finished run (it has summary.json); finished runs are never overwritten",
            run_dir.display()
        );
    }
    let exp = Experiment::load(&run_dir.join("config.toml"), &[])?;
    train(&exp, Some(run_dir), opts)
}

/// The training loop; `resume_dir` continues that run from its saved state.
fn train(exp: &Experiment, resume_dir: Option<&Path>, opts: &RunOptions) -> Result<RunOutcome> {
    let device = select_device(&exp.device)?;
    let root = ensure_data(exp)?;
    let data = Datasets::open(exp, &root)?;
    let mut rng = ChaCha8Rng::seed_from_u64(exp.seed);
    let head_cfg = data.head_config(exp.model.fpn_channels);
    let (varmap, model) = build_model(exp, &head_cfg, &device, &mut rng, resume_dir.is_none())?;
    let mut strategies = strategies_for(exp);

    let (run_dir, saved, mut csv) = match resume_dir {
        None => {
            let run_dir = match &opts.run_dir {
                // `--run-dir`: checked and created by `run_in_dir`.
                Some(dir) => dir.clone(),
                None => report::create_run_dir(&exp.results_dir, &exp.name)?,
            };
            report::write_atomic(&run_dir.join("config.toml"), exp.to_toml().as_bytes())?;
            let meta = serde_json::json!({
                "name": exp.name,
                "version": env!("CARGO_PKG_VERSION"),
                "git_commit": report::GIT_COMMIT,
                "started_at": report::utc_rfc3339(report::now_secs()),
                "device": format!("{device:?}"),
                "data_root": root.display().to_string(),
                "command": std::env::args().collect::<Vec<_>>(),
            });
            report::write_atomic(
                &run_dir.join("meta.json"),
                serde_json::to_string_pretty(&meta)?.as_bytes(),
            )?;
            let csv = EpochsCsv::create(&run_dir.join("epochs.csv"))?;
            (run_dir, None, csv)
        }
        Some(dir) => {
            let (state, optim) = state::load(dir, &varmap, &device)?;
            rng = state.rng.clone();
            // Rows of epochs after the saved state (written just before a crash) are dropped.
            let csv = EpochsCsv::reopen(&dir.join("epochs.csv"), state.global_epoch)?;
            tracing::info!(
                "resuming {} after stage {} epoch {} (epoch {} of the run)",
                dir.display(),
                state.stage + 1,
                state.epoch,
                state.global_epoch
            );
            (dir.to_path_buf(), Some((state, optim)), csv)
        }
    };
    let ckpt_dir = run_dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir)?;
    tracing::info!(
        "run folder {} (if interrupted: onehead resume {})",
        run_dir.display(),
        run_dir.display()
    );

    let eval_settings = EvalSettings::from_experiment(exp);
    // Training-time augmentation; every draw comes from the run's RNG (crops off by default,
    // in which case the stream is the flips-only one of earlier versions).
    let augment = AugmentConfig {
        flip: exp.data.flip,
        scale: (exp.data.crop_scale[0] as f32, exp.data.crop_scale[1] as f32),
        ..AugmentConfig::default()
    };
    let mut baselines: BTreeMap<TaskKind, f64> = BTreeMap::new();
    let mut latest: BTreeMap<TaskKind, TaskMetrics> = BTreeMap::new();
    let mut global_epoch = 0usize;
    let mut started = report::now_secs();
    let mut seconds_before = 0.0;
    // Where the loop starts: (stage, first epoch), and the saved mid-stage state if any.
    let mut start = (0usize, 1usize);
    let mut mid_stage = None;
    if let Some((st, optim)) = saved {
        baselines = st.baselines.clone();
        latest = st.latest.clone();
        global_epoch = st.global_epoch;
        started = st.started;
        seconds_before = st.train_seconds;
        if st.epoch >= exp.stages[st.stage].epochs {
            start = (st.stage + 1, 1);
        } else {
            start = (st.stage, st.epoch + 1);
            mid_stage = Some((st, optim));
        }
    }
    let train_start = Instant::now();

    for (si, stage) in exp.stages.iter().enumerate().skip(start.0) {
        for s in strategies.iter_mut() {
            s.before_stage(si, exp)?;
        }
        let ds = Datasets::get(&data.train, stage.task);
        let resumed = mid_stage.take();
        // A fixed, seeded subset when the stage trains on fewer images than the split has.
        let mut pool: Vec<usize> = (0..ds.len()).collect();
        if let Some((st, _)) = &resumed {
            pool = st.pool.clone();
            for (s, v) in strategies.iter_mut().zip(&st.strategies) {
                s.load_state(v)?;
            }
        } else if stage.train_limit > 0 && stage.train_limit < pool.len() {
            pool.shuffle(&mut rng);
            pool.truncate(stage.train_limit);
        }
        let bs = stage.batch_size.min(pool.len());
        // Drop the last incomplete batch: a batch of 1 would wreck BatchNorm statistics.
        let steps = (pool.len() / bs).max(1);
        let schedule = LrSchedule::for_stage(stage, steps);
        let frozen: Vec<&str> = match stage.freeze {
            Freeze::Backbone => vec!["backbone."],
            _ => vec![],
        };
        let backbone_train = stage.freeze == Freeze::None;
        let setup = StepSetup {
            stage_index: si,
            stage,
            model: &model,
            device: &device,
            data: &data,
            augment: &augment,
            backbone_train,
        };
        let mut opt = Optimizer::new(
            stage.optimizer,
            trainable_params(&varmap, &frozen),
            stage.weight_decay,
            stage.momentum,
        );
        if let Some((_, optim)) = &resumed {
            opt.load_state_tensors(optim)?;
        }
        let first_epoch = if resumed.is_some() { start.1 } else { 1 };
        let seen: Vec<TaskKind> = {
            let mut v: Vec<TaskKind> = Vec::new();
            for s in &exp.stages[..=si] {
                if !v.contains(&s.task) {
                    v.push(s.task);
                }
            }
            v
        };

        for epoch in first_epoch..=stage.epochs {
            global_epoch += 1;
            let t0 = Instant::now();
            let mut order = pool.clone();
            order.shuffle(&mut rng);
            let pb = progress(
                opts.quiet,
                steps,
                format!(
                    "stage {}/{} {} epoch {}/{}",
                    si + 1,
                    exp.stages.len(),
                    stage.task,
                    epoch,
                    stage.epochs
                ),
            );
            let (mut sum_new, mut sum_replay, mut sum_total) = (0f64, 0f64, 0f64);
            let mut lr = 0.0;
            for step in 0..steps {
                let idx = &order[step * bs..(step + 1) * bs];
                lr = schedule.lr((epoch - 1) * steps + step);
                let losses = train_step(&setup, idx, lr, &mut rng, &mut strategies, &mut opt)
                    .with_context(|| {
                        format!(
                            "stage {} ({}), epoch {epoch}, step {step}",
                            si + 1,
                            stage.task
                        )
                    })?;
                sum_new += losses.new;
                sum_replay += losses.replay;
                sum_total += losses.total;
                pb.inc(1);
                pb.set_message(format!(
                    "loss {:.4} (new {:.4}, replay {:.4})",
                    sum_total / (step + 1) as f64,
                    sum_new / (step + 1) as f64,
                    sum_replay / (step + 1) as f64
                ));
            }
            pb.finish_and_clear();

            let mut row = EpochRow {
                stage: si,
                task: stage.task.name().into(),
                epoch,
                global_epoch,
                lr,
                loss_new: sum_new / steps as f64,
                loss_replay: sum_replay / steps as f64,
                loss_total: sum_total / steps as f64,
                ..Default::default()
            };
            if epoch % exp.eval.every == 0 || epoch == stage.epochs {
                for &task in &seen {
                    let m = evaluate(
                        &model,
                        Datasets::get(&data.val, task),
                        &eval_settings,
                        &device,
                    )?;
                    for (k, v) in &m {
                        row.metrics.insert((task, k.clone()), *v);
                    }
                    latest.insert(task, m);
                }
            }
            row.seconds = t0.elapsed().as_secs_f64();
            csv.append(&row)?;
            let metrics_text: Vec<String> = seen
                .iter()
                .filter_map(|t| {
                    row.metrics
                        .get(&(*t, t.metric_name().to_string()))
                        .map(|v| format!("{} {} {:.4}", t, t.metric_name(), v))
                })
                .collect();
            tracing::info!(
                "stage {}/{} {} epoch {}/{}: loss {:.4} (new {:.4}, replay {:.4}) · {} · {:.1} s",
                si + 1,
                exp.stages.len(),
                stage.task,
                epoch,
                stage.epochs,
                row.loss_total,
                row.loss_new,
                row.loss_replay,
                metrics_text.join(" · "),
                row.seconds
            );
            if epoch == stage.epochs {
                let base = latest
                    .get(&stage.task)
                    .and_then(|m| m.get(stage.task.metric_name()))
                    .copied()
                    .context("the last epoch of a stage is always evaluated")?;
                baselines.insert(stage.task, base);
                let ckpt = ckpt_dir.join(format!("stage{}-{}.safetensors", si + 1, stage.task));
                let tmp = ckpt.with_extension("safetensors.tmp");
                varmap.save(&tmp)?;
                std::fs::rename(&tmp, &ckpt)?;
                for s in strategies.iter_mut() {
                    s.after_stage(si)?;
                }
            }
            let run_state = RunState {
                stage: si,
                epoch,
                global_epoch,
                rng: rng.clone(),
                pool: pool.clone(),
                baselines: baselines.clone(),
                latest: latest.clone(),
                strategies: strategies.iter().map(|s| s.state()).collect(),
                train_seconds: seconds_before + train_start.elapsed().as_secs_f64(),
                started,
                tensors: format!("epoch-{global_epoch}.safetensors"),
            };
            state::save(&run_dir, &run_state, &varmap, &opt.state_tensors()?)?;
            if opts.stop_after_epochs == Some(global_epoch) {
                return Err(Stopped {
                    run_dir,
                    global_epoch,
                }
                .into());
            }
        }
    }
    let train_seconds = seconds_before + train_start.elapsed().as_secs_f64();

    let mut tasks = Vec::new();
    let mut final_metrics = BTreeMap::new();
    for task in exp.tasks_in_order() {
        let fin = &latest[&task];
        for (k, v) in fin {
            final_metrics.insert(format!("{task}_{k}"), *v);
        }
        tasks.push(TaskVerdict::new(
            task,
            baselines[&task],
            fin[task.metric_name()],
            exp.eval.tolerance,
        ));
    }
    let counts = crate::model::count_params(&varmap);
    let summary = RunSummary {
        name: exp.name.clone(),
        run_dir: run_dir.display().to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        git_commit: report::GIT_COMMIT.into(),
        seed: exp.seed,
        device: format!("{device:?}"),
        tolerance: exp.eval.tolerance,
        pass: tasks.iter().all(|t| t.pass),
        tasks,
        final_metrics,
        params: ParamSummary {
            total: counts.total,
            backbone: counts.backbone,
            neck: counts.neck,
            head: counts.head,
        },
        latency_ms: crate::model::info::median_latency_ms(
            &model,
            exp.model.image_size,
            &device,
            10,
        )?,
        train_seconds,
        started_at: report::utc_rfc3339(started),
        finished_at: report::utc_rfc3339(report::now_secs()),
    };
    report::write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    // The resume state (model + optimiser moments) is only for unfinished runs: a finished
    // run keeps its per-stage checkpoints.
    let _ = std::fs::remove_dir_all(run_dir.join("state"));
    Ok(RunOutcome { run_dir, summary })
}
