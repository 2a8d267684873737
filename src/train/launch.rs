//! How a run is launched and how it ends: the options that are not part of the experiment,
//! the `--run-dir` checks that let sweeps and job arrays find a run again, and the outcomes
//! (finished, stopped on purpose, already finished).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::Experiment;
use crate::registry::Registry;
use crate::report::RunSummary;

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
    /// instead of a fresh `<results>/<name>/<stamp>`. See [`super::Session::start`] for what an
    /// existing folder means.
    pub run_dir: Option<PathBuf>,
    /// Resume even though `config.toml` was edited since the state was saved.
    pub force: bool,
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
pub fn check_run_dir(exp: &Experiment, dir: &Path, registry: &Registry) -> Result<bool> {
    let stored = dir.join("config.toml");
    if stored.is_file() {
        let prev = registry
            .load(&stored, &[])
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
