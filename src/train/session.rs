//! A run being trained: its [`Env`], plug-ins, RNG, folder, logs and progress. A fresh start
//! and a resume build the run through the same [`assemble`] and differ only in where the
//! folder and the progress come from (a new folder, or the saved state). The loop itself is
//! [`super::engine`]; the end of a run (verdict and summary) is [`super::finish`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand_chacha::ChaCha8Rng;

use super::assemble::{assemble, Assembly, Env};
use super::launch::{check_run_dir, RunOptions};
use super::reference::Baselines;
use super::state::{self, ExtraTensors, PartialEpoch, RunState};
use crate::config::Experiment;
use crate::files::{lock_folder, FolderLock};
use crate::plugins::{Plugin, PluginState};
use crate::registry::Registry;
use crate::report::{self, ConsoleLine, EpochColumns, EpochSink, EvalRecord, Matrix, RunCsv};

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
    /// Every task learned so far evaluated at each stage end on the verdict's split (test
    /// when the data has one): the matrix, the finals and the verdict come from these.
    pub verdict: Vec<EvalRecord>,
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
    /// Where each finished epoch goes: the console line, the CSVs, TensorBoard when
    /// `[log] tensorboard = true`.
    pub sinks: Vec<Box<dyn EpochSink>>,
    pub opts: RunOptions,
    pub progress: Progress,
    /// With `[eval] baseline = "single_task"`: the reference run's folder and its baselines.
    pub single_task: Option<Baselines>,
    /// The saved state of a resumed run, handed to the optimiser (mid-stage) and the
    /// plug-ins when the loop starts.
    pub resumed: Option<(RunState, ExtraTensors)>,
    /// The run folder's one-writer lock, held while the session lives.
    _lock: FolderLock,
}

/// The run's epoch sinks: the console line, `csv`, and a TensorBoard writer when the
/// experiment asks for one (a resumed run adds a second event file to the same folder;
/// TensorBoard reads them together).
fn sinks(env: &Env, csv: RunCsv, run_dir: &Path) -> Result<Vec<Box<dyn EpochSink>>> {
    let console = ConsoleLine {
        stages: env
            .stages
            .iter()
            .map(|s| (s.task.clone(), s.epochs))
            .collect(),
        primary: env
            .tasks
            .iter()
            .map(|(t, _)| (t.name().to_string(), t.primary_metric().to_string()))
            .collect(),
    };
    let mut out: Vec<Box<dyn EpochSink>> = vec![Box::new(console), Box::new(csv)];
    if env.exp.log.tensorboard {
        out.push(Box::new(crate::report::TbWriter::create(run_dir)?));
    }
    Ok(out)
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
    /// it holds (see [`check_run_dir`]). `single_task`: the baselines the verdict uses when
    /// the experiment asks for single-task ones ([`super::reference`]).
    pub fn start(
        exp: &Experiment,
        registry: &Registry,
        opts: RunOptions,
        single_task: Option<Baselines>,
    ) -> Result<Self> {
        if let Some(dir) = &opts.run_dir {
            if check_run_dir(exp, dir, registry)? {
                return Self::resume(dir, registry, opts.clone(), single_task);
            }
        }
        let Assembly { env, plugins, rng } = assemble(exp, registry, true)?;
        let run_dir = match &opts.run_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                d.clone()
            }
            None => report::create_run_dir(&exp.results_dir, &exp.name)?,
        };
        let lock = lock_folder(&run_dir, "run folder")?;
        write_run_files(&run_dir, &env)?;
        let csv = RunCsv::create(&run_dir, epoch_columns(&env, &plugins))?;
        let sinks = sinks(&env, csv, &run_dir)?;
        Ok(Self {
            env,
            plugins,
            rng,
            sinks,
            single_task,
            run_dir,
            opts,
            progress: Progress {
                stage: 0,
                next_epoch: 1,
                global_epoch: 0,
                steps: 0,
                pools: vec![],
                history: vec![],
                verdict: vec![],
                partial: None,
                seconds_before: 0.0,
                started: report::now_secs(),
            },
            resumed: None,
            _lock: lock,
        })
    }

    /// Continue the unfinished run in `run_dir` from its saved state.
    pub fn resume(
        run_dir: &Path,
        registry: &Registry,
        opts: RunOptions,
        single_task: Option<Baselines>,
    ) -> Result<Self> {
        if run_dir.join("summary.json").exists() {
            anyhow::bail!(
                "{} is a finished run (it has summary.json); finished runs are never overwritten",
                run_dir.display()
            );
        }
        // Before anything of the folder is read or replaced: a live run keeps it.
        let lock = lock_folder(run_dir, "run folder")?;
        remove_partial_files(run_dir)?;
        let exp = registry.load(&run_dir.join("config.toml"), &[])?;
        let Assembly { env, plugins, .. } = assemble(&exp, registry, false)?;
        let (st, extra) = state::load(run_dir, &env.varmap, &env.device).with_context(|| {
            format!(
                "resuming {}: the saved state does not fit the run's config.toml (was either edited?)",
                run_dir.display()
            )
        })?;
        check_state_fits(&st, &env, plugins.len(), run_dir)?;
        check_config_unchanged(&st, &exp, registry, run_dir, opts.force)?;
        let csv = RunCsv::reopen(run_dir, epoch_columns(&env, &plugins), st.global_epoch)?;
        let sinks = sinks(&env, csv, run_dir)?;
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
        Ok(Self {
            rng: st.rng.clone(),
            progress: Progress::from_state(&st, &env),
            env,
            plugins,
            sinks,
            single_task,
            run_dir: run_dir.to_path_buf(),
            opts,
            resumed: Some((st, extra)),
            _lock: lock,
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
            verdict: p.verdict.clone(),
            plugins: plugin_json,
            partial: p.partial.clone(),
            train_seconds,
            started: p.started,
            config: Some(self.env.exp.to_toml()),
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
            &self.progress.verdict,
        );
        report::write_atomic(&self.run_dir.join("matrix.csv"), &m.to_csv()?)?;
        Ok(m)
    }
}

impl Progress {
    /// Where a resumed run continues: a stage whose last epoch is done continues with the
    /// next stage.
    fn from_state(st: &RunState, env: &Env) -> Self {
        let (stage, next_epoch) = if st.epoch >= env.stages[st.stage].epochs {
            (st.stage + 1, 1)
        } else {
            (st.stage, st.epoch + 1)
        };
        Progress {
            stage,
            next_epoch,
            global_epoch: st.global_epoch,
            steps: 0,
            pools: st.pools.clone(),
            history: st.history.clone(),
            verdict: st.verdict.clone(),
            partial: st.partial.clone(),
            seconds_before: st.train_seconds,
            started: st.started,
        }
    }
}

/// `config.toml` (the exact experiment) and `meta.json` (version, commit, device, command)
/// of a fresh run.
fn write_run_files(run_dir: &Path, env: &Env) -> Result<()> {
    let exp = &env.exp;
    report::write_atomic(&run_dir.join("config.toml"), exp.to_toml().as_bytes())?;
    let meta = serde_json::json!({
        "name": exp.name,
        "version": env!("CARGO_PKG_VERSION"),
        "git_commit": report::GIT_COMMIT,
        "started_at": report::utc_rfc3339(report::now_secs()),
        "device": format!("{:?}", env.device),
        "data_root": exp.data.resolved_root().display().to_string(),
        "command": std::env::args().collect::<Vec<_>>(),
        // The ONEHEAD_* switches that change the arithmetic (executor, Winograd, threads):
        // a run made with one of them set is reproduced only with it set again.
        "env": std::env::vars()
            .filter(|(k, _)| k.starts_with("ONEHEAD_") || k == "RAYON_NUM_THREADS")
            .collect::<std::collections::BTreeMap<_, _>>(),
    });
    report::write_atomic(
        &run_dir.join("meta.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )
}

/// A saved state must fit the run's config: its stage and epoch within the plan, its pools
/// within the data, one plug-in state per plug-in.
fn check_state_fits(st: &RunState, env: &Env, plugins: usize, run_dir: &Path) -> Result<()> {
    let stages = &env.stages;
    anyhow::ensure!(
        st.stage < stages.len()
            && st.epoch <= stages[st.stage].epochs
            && st.pools.len() == st.stage + 1
            && st.pools.iter().zip(stages).all(|(p, s)| {
                let n = env
                    .tasks
                    .get(&s.task)
                    .map(|t| t.len(crate::tasks::Split::Train));
                n.is_ok_and(|n| p.iter().all(|&i| i < n))
            }),
        "{}: the saved state does not fit the run's config.toml (was either edited?)",
        run_dir.join("state").display()
    );
    anyhow::ensure!(
        st.plugins.len() == plugins,
        "{}: the saved state has {} plug-in states, the config asks for {} plug-ins",
        run_dir.join("state").display(),
        st.plugins.len(),
        plugins
    );
    Ok(())
}

/// Files a kill left half-written: the run folder's own atomic-write temporaries
/// (`.<name>.tmp`) and partial checkpoints (`*.safetensors.tmp`, safetensors' `.tmp*`).
/// Ours to remove; nothing else is touched.
pub(crate) fn remove_partial_files(run_dir: &Path) -> Result<()> {
    for dir in [run_dir.to_path_buf(), run_dir.join("checkpoints")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let partial = name.starts_with('.') && name.ends_with(".tmp")
                || name.ends_with(".safetensors.tmp")
                || (dir != run_dir && name.starts_with(".tmp"));
            if partial && path.is_file() {
                tracing::info!("removing the partial file {}", path.display());
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// A resume continues with the settings the run trained with: a `config.toml` edited since
/// the state was saved (a changed `lr`, say) is refused, naming the keys, unless `force`.
fn check_config_unchanged(
    st: &RunState,
    exp: &Experiment,
    registry: &Registry,
    run_dir: &Path,
    force: bool,
) -> Result<()> {
    let Some(saved) = &st.config else {
        return Ok(());
    };
    let state_file = run_dir.join("state").join("state.json");
    let then = registry.parse(saved, &state_file, &[])?;
    let mut changed = Vec::new();
    changed_keys(&then.to_value(), &exp.to_value(), "", &mut changed);
    if changed.is_empty() {
        return Ok(());
    }
    let what = format!(
        "{} was edited since the state was saved ({} differs from {}): the run would continue with other settings than it trained with",
        run_dir.join("config.toml").display(),
        changed.join(", "),
        state_file.display()
    );
    anyhow::ensure!(
        force,
        "{what}; restore them, or resume with --force to continue anyway"
    );
    tracing::warn!("{what} (--force: continuing)");
    Ok(())
}

/// The dotted keys whose values differ between two TOML values.
fn changed_keys(a: &toml::Value, b: &toml::Value, at: &str, out: &mut Vec<String>) {
    let key = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => changed_keys(u, v, &key(k), out),
                    _ => out.push(key(k)),
                }
            }
        }
        (toml::Value::Array(x), toml::Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                changed_keys(u, v, &key(&i.to_string()), out);
            }
        }
        _ if a != b => out.push(at.to_string()),
        _ => {}
    }
}
