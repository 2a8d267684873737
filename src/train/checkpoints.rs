//! A finished (or stopped) run's checkpoints: listing and resolving them by name, loading one
//! into a model built from the run's own `config.toml`, and evaluating it (`onehead eval`,
//! with `--export` the val predictions in standard formats).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::assemble::{build_model, open_tasks};
use super::device::select_device;
use crate::config::Experiment;
use crate::model::OneHead;
use crate::registry::Registry;
use crate::report;
use crate::tasks::{TaskMetrics, TaskSet};

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
    let exp = registry.load(&config, &[])?;
    let (name, file) = resolve_checkpoint(run_dir, &exp, checkpoint)?;
    let device = select_device(&exp.device)?;
    let tasks = open_tasks(&exp, &registry.tasks)?;
    let mut rng = ChaCha8Rng::seed_from_u64(exp.seed);
    let (mut varmap, model, _) = build_model(&exp, &tasks, &device, &mut rng, false)?;
    varmap
        .load(&file)
        .with_context(|| format!("loading checkpoint {}", file.display()))?;
    let learned = learned_by(&exp, &name);
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

/// The tasks checkpoint `name` of `exp` has learned: those trained by the end of its stage
/// (every task of the experiment for a checkpoint named otherwise).
fn learned_by(exp: &Experiment, name: &str) -> Vec<String> {
    let stages = exp.plan().len();
    match checkpoint_stage(name) {
        Some(k) if (1..=stages).contains(&k) => exp.evaluated_tasks(k - 1),
        _ => exp.tasks_in_order(),
    }
}

/// The tasks a run's checkpoint (see [`resolve_checkpoint`]) has learned, without loading it.
pub fn checkpoint_learned(
    run_dir: &Path,
    checkpoint: Option<&str>,
    registry: &Registry,
) -> Result<Vec<String>> {
    let exp = registry.load(&run_dir.join("config.toml"), &[])?;
    let (name, _) = resolve_checkpoint(run_dir, &exp, checkpoint)?;
    Ok(learned_by(&exp, &name))
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

/// [`evaluate_checkpoint`] on another split of every task (`Split::Test`: the held-out
/// split whose stage-end evaluations give `summary.json`'s finals); an error for a task
/// without that split.
pub fn evaluate_checkpoint_on(
    run_dir: &Path,
    checkpoint: Option<&str>,
    registry: &Registry,
    split: crate::data::Split,
) -> Result<Vec<(String, TaskMetrics)>> {
    let run = load_run(run_dir, checkpoint, registry)?;
    let mut results = Vec::new();
    for t in run.exp.tasks_in_order() {
        anyhow::ensure!(
            run.tasks.get(&t)?.len(split) > 0,
            "task '{t}' has no {} split (only the built-in benchmark has a held-out test split)",
            split.name()
        );
        let (m, _) = super::evaluate::evaluate_scored(
            &run.model,
            &run.tasks,
            &t,
            split,
            run.exp.eval.batch_size,
            &run.device,
        )?;
        results.push((t, m));
    }
    Ok(results)
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

/// An export folder: created if absent; an earlier export (onehead's marker, or the
/// `manifest.json` of an export written before the marker) loses the folders of `tasks`, so
/// that no file of another checkpoint lingers; a folder holding anything else is left alone
/// with an error.
fn prepare_export_dir(dir: &Path, tasks: &[String]) -> Result<()> {
    if crate::files::claim_output_dir(dir, "--export", earlier_export)? {
        for t in tasks {
            let sub = dir.join(t);
            if sub.is_dir() {
                std::fs::remove_dir_all(&sub)
                    .with_context(|| format!("clearing {}", sub.display()))?;
            }
        }
    }
    Ok(())
}

/// Whether `dir` holds an export of an older onehead: its `manifest.json` has the fields
/// only onehead writes there.
fn earlier_export(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("manifest.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|m| {
        ["run_dir", "checkpoint", "git_commit", "tasks", "metrics"]
            .iter()
            .all(|k| m.get(k).is_some())
    })
}
