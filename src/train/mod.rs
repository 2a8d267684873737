//! Training: the loop ([`engine`]), one step ([`step`]), evaluation, optimisers and
//! schedules, the resume state, and the session that sets a run up and sums it up.

pub mod engine;
pub mod evaluate;
pub mod interrupt;
pub mod optim;
pub mod schedule;
pub mod session;
pub mod state;
pub mod step;

use std::path::Path;

use anyhow::Result;

pub use session::{
    ensure_data, evaluate_checkpoint, evaluate_checkpoint_export, list_checkpoints, load_run,
    resolve_checkpoint, select_device, AlreadyFinished, LoadedRun, RunOptions, RunOutcome, Session,
    Stopped,
};

use crate::config::Experiment;
use crate::tasks::Registry;

/// Run one experiment from start to finish in a fresh run directory (built-in tasks).
pub fn run(exp: &Experiment, opts: &RunOptions) -> Result<RunOutcome> {
    run_with(exp, &Registry::builtin(), opts)
}

/// [`run`] with the tasks of `registry`.
pub fn run_with(exp: &Experiment, registry: &Registry, opts: &RunOptions) -> Result<RunOutcome> {
    engine::train(Session::start(exp, registry, opts.clone())?)
}

/// Continue an interrupted run in its own folder, from the state saved after its last
/// completed epoch (or step, when it was interrupted mid-epoch). A finished run (one with
/// `summary.json`) is never touched.
pub fn resume(run_dir: &Path, opts: &RunOptions) -> Result<RunOutcome> {
    resume_with(run_dir, &Registry::builtin(), opts)
}

/// [`resume`] with the tasks of `registry`.
pub fn resume_with(run_dir: &Path, registry: &Registry, opts: &RunOptions) -> Result<RunOutcome> {
    engine::train(Session::resume(run_dir, registry, opts.clone())?)
}
