//! `onehead run` and `onehead resume`: one experiment (or its seeds, as a sweep), and the
//! exit code that tells a script how it ended.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::registry::Registry;
use crate::sweep::{self, Manifest, SweepSpec};
use crate::train::{self as engine, interrupt, RunOptions};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The experiment TOML file.
    pub file: PathBuf,
    /// Override any field, e.g. `--set stages.*.epochs=2 --set replay.enabled=false`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Stop (state saved, exit code 3) once the run has trained this many epochs in all,
    /// e.g. to fit a job's time limit; `onehead resume` continues.
    #[arg(long, value_name = "N")]
    pub stop_after_epochs: Option<usize>,
    /// Use exactly this run folder (sweeps, job arrays): created if absent; an unfinished
    /// run there is resumed, a finished one left alone (exit 0).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The run folder (`results/<name>/<run-id>`) or a sweep folder.
    pub run_dir: PathBuf,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Continue even though the run's config.toml was edited since its state was saved
    /// (the keys that differ are named; without --force such a resume is refused).
    #[arg(long)]
    pub force: bool,
    /// As for `run`: stop again once the run has trained this many epochs in all.
    #[arg(long, value_name = "N")]
    pub stop_after_epochs: Option<usize>,
    /// For a sweep folder: runs at once (as for `sweep`).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// For a sweep folder: threads per run (as for `sweep`).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Run one experiment file.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let mut exp = Registry::builtin().load(&args.file, &args.set)?;
    match exp.seeds.take() {
        Some(seeds) if seeds.len() > 1 => run_seeds(args, &exp.name, &exp.results_dir, &seeds),
        seeds => {
            if let Some(s) = seeds {
                exp.seed = s[0];
            }
            let opts = RunOptions {
                quiet: args.quiet,
                stop_after_epochs: args.stop_after_epochs,
                run_dir: args.run_dir,
                interrupt: Some(interrupt::install()?),
                ..RunOptions::default()
            };
            finish(engine::run(&exp, &opts))
        }
    }
}

/// `seeds = [a, b, …]`: one run per seed, as a sweep of this one file into
/// `<results>/<name>/<stamp>-seeds`. Exit code as for one run: 1 when some seed forgot.
fn run_seeds(
    args: RunArgs,
    name: &str,
    results: &std::path::Path,
    seeds: &[u64],
) -> Result<ExitCode> {
    if args.run_dir.is_some() || args.stop_after_epochs.is_some() {
        anyhow::bail!(
            "{}: --run-dir and --stop-after-epochs apply to one run, and this file lists {} seeds (seeds = {seeds:?}): pick one with --set seed=N --set 'seeds=[N]'",
            args.file.display(),
            seeds.len()
        );
    }
    let name = format!(
        "{name}/{}-seeds",
        crate::report::utc_stamp(crate::report::now_secs())
    );
    let spec = SweepSpec {
        files: vec![args.file],
        grid: vec![],
        overrides: args.set,
    };
    let local = sweep::cli::Local {
        quiet: args.quiet,
        ..Default::default()
    };
    sweep::cli::run_sweep_locally(&spec, results, &name, &local)
}

/// Continue an interrupted run (or an interrupted sweep: a folder with manifest.json).
pub fn resume(args: ResumeArgs) -> Result<ExitCode> {
    let ResumeArgs {
        run_dir,
        quiet,
        force,
        stop_after_epochs,
        jobs,
        threads,
    } = args;
    if Manifest::path(&run_dir).is_file() {
        let manifest = Manifest::load(&run_dir)?;
        sweep::thread_budget(jobs, threads, &[], sweep::cli::cores(), 1)?;
        let local = sweep::cli::Local {
            jobs,
            threads,
            quiet,
            ..Default::default()
        };
        return sweep::cli::local_sweep(&manifest, &local);
    }
    if jobs.is_some() || threads.is_some() {
        anyhow::bail!(
            "--jobs / --threads are for sweep folders, and {} has no manifest.json",
            run_dir.display()
        );
    }
    let opts = RunOptions {
        quiet,
        stop_after_epochs,
        force,
        interrupt: Some(interrupt::install()?),
        ..RunOptions::default()
    };
    finish(engine::resume(&run_dir, &opts))
}

/// Print a finished run's verdict. Exit codes: 0 every task within tolerance, 1 some task
/// forgot more (a result, not a crash), 2 an error, 3 stopped on purpose (resumable).
pub fn finish(result: Result<engine::RunOutcome>) -> Result<ExitCode> {
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            if let Some(stopped) = e.downcast_ref::<engine::Stopped>() {
                eprintln!("{stopped}");
                return Ok(ExitCode::from(3));
            }
            if let Some(done) = e.downcast_ref::<engine::AlreadyFinished>() {
                eprintln!("{done}");
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e);
        }
    };
    println!("\n{}", outcome.summary.table());
    println!("results: {}", outcome.run_dir.display());
    Ok(if outcome.summary.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
