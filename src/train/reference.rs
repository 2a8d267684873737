//! The challenge's single-task baselines: the reference run of a sequential experiment
//! (each task alone from the same initialisation, every strategy off; see
//! [`Registry::single_task_reference`]) is found among finished runs with the identical
//! config, or trained first. Called before a run's session is built, never from inside one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::RunOptions;
use crate::config::Experiment;
use crate::registry::Registry;
use crate::report::RunSummary;

/// The reference run's folder and each task's baseline value.
pub type Baselines = (PathBuf, BTreeMap<String, f64>);

/// With `[eval] baseline = "single_task"`: the baselines of the single-task reference run,
/// reusing a finished one with the identical config under `<results>/<name>__single_task/`,
/// or training it first.
pub fn single_task_baselines(
    exp: &Experiment,
    registry: &Registry,
    quiet: bool,
) -> Result<Option<Baselines>> {
    if exp.eval.baseline != crate::config::BaselineKind::SingleTask {
        return Ok(None);
    }
    let reference = registry.single_task_reference(exp);
    let folder = reference.results_dir.join(&reference.name);
    let mut found = None;
    if let Ok(entries) = std::fs::read_dir(&folder) {
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        dirs.sort();
        for d in dirs.into_iter().rev() {
            let same = registry
                .load(&d.join("config.toml"), &[])
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
