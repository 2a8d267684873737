//! The challenge's single-task baselines. The reference of an experiment (each task alone
//! from the same initialisation, every strategy off; see [`Registry::single_task_reference`])
//! is trained once per key ([`Registry::reference_key`]: a hash of exactly what determines
//! it) into `<results>/references/<key>/` and found there again by every run and every sweep
//! run that needs it; a sweep's runs share `<sweep>/references/`. A reference that another
//! process is training is waited for; an interrupted one is resumed. Called before a run's
//! session is built, never from inside one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use super::{AlreadyFinished, RunOptions};
use crate::config::{BaselineKind, Experiment};
use crate::files::FolderInUse;
use crate::registry::Registry;
use crate::report::RunSummary;

/// The reference run's folder and its summary (whose `final_metrics` and per-image scores
/// hold each task's baseline).
pub type Baselines = (PathBuf, RunSummary);

/// Where the single-task reference of `exp` lives.
pub fn reference_dir(exp: &Experiment, registry: &Registry) -> PathBuf {
    let reference = registry.single_task_reference(exp);
    exp.results_dir
        .join("references")
        .join(Registry::reference_key(&reference))
}

/// With the single-task baseline (the default for sequential and joint runs): the reference
/// run, found finished, resumed, waited for, or trained first. `opts` carries the caller's
/// quietness and interrupt flag (a Ctrl-C while the reference trains saves it for later).
pub fn single_task_baselines(
    exp: &Experiment,
    registry: &Registry,
    opts: &RunOptions,
) -> Result<Option<Baselines>> {
    if exp.baseline_kind() != BaselineKind::SingleTask {
        return Ok(None);
    }
    let reference = registry.single_task_reference(exp);
    let dir = reference_dir(exp, registry);
    if finished(&dir)?.is_none() {
        if let Some(found) = finished_by_content(&dir, &reference, registry) {
            tracing::info!("single-task baselines from {}", found.0.display());
            return Ok(Some(found));
        }
    }
    let mut waited = false;
    loop {
        if let Some(summary) = finished(&dir)? {
            tracing::info!("single-task baselines from {}", dir.display());
            return Ok(Some((dir, summary)));
        }
        if !waited {
            tracing::info!(
                "training the single-task reference first, in {} (found there by every later run that needs it)",
                dir.display()
            );
        }
        let ref_opts = RunOptions {
            quiet: opts.quiet,
            interrupt: opts.interrupt.clone(),
            run_dir: Some(dir.clone()),
            ..RunOptions::default()
        };
        match super::run_with(&reference, registry, &ref_opts) {
            Ok(out) => return Ok(Some((out.run_dir, out.summary))),
            Err(e) if e.downcast_ref::<AlreadyFinished>().is_some() => continue,
            Err(e) if e.downcast_ref::<FolderInUse>().is_some() => {
                if !waited {
                    tracing::info!(
                        "another onehead process is training the reference {}: waiting for it",
                        dir.display()
                    );
                    waited = true;
                }
                std::thread::sleep(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "training the single-task reference in {}",
                    dir.display()
                )))
            }
        }
    }
}

/// A finished reference beside `dir` (in the same `references/` folder) that trained the
/// same thing under another key: one from a version that hashed its config differently, or
/// a copy brought over from another sweep. Its config must resolve to the same key now; the
/// first such folder (in name order) is used.
fn finished_by_content(
    dir: &Path,
    reference: &Experiment,
    registry: &Registry,
) -> Option<Baselines> {
    let want = Registry::reference_key(reference);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir.parent()?)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.as_path() != dir && p.is_dir())
        .collect();
    dirs.sort();
    dirs.into_iter().find_map(|d| {
        let path = d.join("config.toml");
        let text = std::fs::read_to_string(&path).ok()?;
        let other = registry.parse(&text, &path, &[]).ok()?;
        let key = Registry::reference_key(&registry.single_task_reference(&other));
        if key != want {
            return None;
        }
        let summary = finished(&d).ok().flatten()?;
        Some((d, summary))
    })
}

/// The summary of the finished run in `dir`, if there is one.
fn finished(dir: &Path) -> Result<Option<RunSummary>> {
    let path = dir.join("summary.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)?;
    let s = serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(s))
}
