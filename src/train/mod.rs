//! Training: the loop ([`engine`]), one step ([`step`]), evaluation, optimisers and
//! schedules, the resume state; around the loop, one file per job: how a run is launched
//! ([`launch`]), the device ([`device`]), building a run from its experiment ([`assemble`]),
//! the single-task reference ([`reference`]), the session that holds a run while it trains
//! ([`session`]), its end ([`finish`]) and its checkpoints afterwards ([`checkpoints`]).

pub mod assemble;
pub mod checkpoints;
pub mod device;
pub mod engine;
pub mod evaluate;
pub mod finish;
pub mod interrupt;
pub mod launch;
pub mod optim;
pub mod reference;
pub mod schedule;
pub mod session;
pub mod state;
pub mod step;

use std::path::Path;

use anyhow::Result;

pub use assemble::{augment_config, ensure_data, open_tasks, Env};
pub use checkpoints::{
    evaluate_checkpoint, evaluate_checkpoint_export, evaluate_checkpoint_on, list_checkpoints,
    load_run, resolve_checkpoint, LoadedRun,
};
pub use device::select_device;
pub use launch::{AlreadyFinished, RunOptions, RunOutcome, Stopped};
pub use session::Session;

use crate::config::Experiment;
use crate::registry::Registry;

/// Run one experiment from start to finish in a fresh run directory (built-in tasks and
/// strategies).
pub fn run(exp: &Experiment, opts: &RunOptions) -> Result<RunOutcome> {
    run_with(exp, &Registry::builtin(), opts)
}

/// [`run`] with the tasks and strategies of `registry`. Single-task baselines, when the
/// experiment is judged against them, are found or trained first, as a run of their own.
pub fn run_with(exp: &Experiment, registry: &Registry, opts: &RunOptions) -> Result<RunOutcome> {
    let baselines = reference::single_task_baselines(exp, registry, opts)?;
    engine::train(Session::start(exp, registry, opts.clone(), baselines)?)
}

/// Continue an interrupted run in its own folder, from the state saved after its last
/// completed epoch (or step, when it was interrupted mid-epoch). A finished run (one with
/// `summary.json`) is never touched.
pub fn resume(run_dir: &Path, opts: &RunOptions) -> Result<RunOutcome> {
    resume_with(run_dir, &Registry::builtin(), opts)
}

/// [`resume`] with the tasks and strategies of `registry`.
pub fn resume_with(run_dir: &Path, registry: &Registry, opts: &RunOptions) -> Result<RunOutcome> {
    let exp = registry.load(&run_dir.join("config.toml"), &[])?;
    let baselines = reference::single_task_baselines(&exp, registry, opts)?;
    engine::train(Session::resume(run_dir, registry, opts.clone(), baselines)?)
}
