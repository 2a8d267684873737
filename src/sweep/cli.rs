//! The `onehead sweep` and `onehead resume SWEEP_DIR` commands: plan, run here or on
//! Slurm, collect, and print the report; exit codes as the README's Sweeps section says.

use std::process::ExitCode;

use anyhow::{Context, Result};

use super::{LocalOptions, Manifest, SlurmOptions, Status, SweepSpec};
use crate::sweep;

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Plan a sweep into `<results>/<name>/` (or check that the folder holds the same sweep).
pub fn plan_sweep(spec: &SweepSpec, results: &std::path::Path, name: &str) -> Result<Manifest> {
    let dir = sweep::plan::sweep_dir(results, name)?;
    let plan = sweep::plan(spec, &dir)?;
    sweep::prepare_sweep_dir(&plan, name, &dir, spec)
}

/// How a sweep runs on this machine: `--jobs` and `--threads` as given (`None`: chosen by
/// [`sweep::thread_budget`] once the runs still to do are known).
#[derive(Debug, Clone, Default)]
pub struct Local {
    pub jobs: Option<usize>,
    pub threads: Option<usize>,
    pub gpus: Vec<String>,
    pub quiet: bool,
    /// Exit 1 when a finished run did not keep every task within tolerance (for CI); by
    /// default a sweep whose runs all finished succeeds, whatever they found.
    pub fail_on_forgetting: bool,
}

pub fn run_sweep_locally(
    spec: &SweepSpec,
    results: &std::path::Path,
    name: &str,
    local: &Local,
) -> Result<ExitCode> {
    let manifest = plan_sweep(spec, results, name)?;
    local_sweep(&manifest, local)
}

/// Run a planned sweep here. Exit code: 0 every run finished (with `fail_on_forgetting`:
/// and every one passed, else 1), 2 some run failed, 3 interrupted (re-run to continue).
pub fn local_sweep(manifest: &Manifest, local: &Local) -> Result<ExitCode> {
    let Local {
        jobs,
        threads,
        gpus,
        quiet,
        fail_on_forgetting,
    } = local.clone();
    let exe = std::env::current_exe().context("locating the onehead binary")?;
    let n = manifest.runs.len();
    let to_do = sweep::index::read_records(manifest)
        .iter()
        .filter(|r| r.status != Status::Ok)
        .count();
    let (jobs, threads) = sweep::thread_budget(jobs, threads, &gpus, cores(), to_do)?;
    if !quiet {
        eprintln!(
            "sweep {}: {n} runs, {jobs} at a time ({}) in {}",
            manifest.name,
            if gpus.is_empty() {
                format!("{threads} thread(s) each")
            } else {
                format!("GPUs {}", gpus.join(","))
            },
            manifest.sweep_dir.display()
        );
    }
    let out = sweep::run_local(
        manifest,
        &LocalOptions {
            jobs,
            threads,
            gpus,
            quiet,
            exe,
        },
    )?;
    print_sweep_report(manifest, &out.records, &out.aggregates);
    let failed = out
        .records
        .iter()
        .filter(|r| matches!(r.status, Status::Failed(_)))
        .count();
    if out.interrupted {
        eprintln!(
            "sweep interrupted: {}. Run the same command again (or `onehead resume {}`) to continue: finished runs are skipped, interrupted ones resume from their last epoch",
            sweep::index::status_counts(&out.records),
            manifest.sweep_dir.display()
        );
        return Ok(ExitCode::from(3));
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {n} runs failed (reasons in index.csv and each run's log.txt); the others finished"
        );
        return Ok(ExitCode::from(2));
    }
    let all_pass = out
        .records
        .iter()
        .all(|r| r.result.as_ref().and_then(|x| x.pass) == Some(true));
    Ok(if all_pass || !fail_on_forgetting {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn print_sweep_report(
    manifest: &Manifest,
    records: &[sweep::RunRecord],
    aggs: &[sweep::index::Aggregate],
) {
    println!("\n{}", sweep::index::summary_text(aggs));
    for r in records {
        if !matches!(r.status, Status::Ok) {
            let reason = r.status.reason();
            println!(
                "{:<11} {}{}",
                r.status.label(),
                r.run.name,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            );
        }
    }
    println!(
        "runs: {} · index: {} · summary: {}",
        sweep::index::status_counts(records),
        manifest.sweep_dir.join("index.csv").display(),
        manifest.sweep_dir.join("summary.csv").display()
    );
}

/// `--collect`: 0 every run finished, 2 some failed, 3 some not finished (running, pending,
/// interrupted or missing; none failed).
pub fn collect_sweep(dir: &std::path::Path) -> Result<ExitCode> {
    let manifest = Manifest::load(dir)?;
    // What the run folders say, told apart by what Slurm says where the sweep ran there.
    let mut records = sweep::index::read_records(&manifest);
    let slurm = sweep::scheduler::query(dir, &sweep::scheduler::Tools::default());
    sweep::scheduler::apply(&mut records, &slurm);
    let aggs = sweep::index::write_index(dir, &records)?;
    print_sweep_report(&manifest, &records, &aggs);
    let unfinished = records.iter().any(|r| r.status != Status::Ok);
    if unfinished && !slurm.unavailable.is_empty() {
        println!(
            "could not ask Slurm ({}): a run with no exit recorded may be running or dead; its folder is all collect reads",
            slurm.unavailable.join("; ")
        );
    }
    let failed = records
        .iter()
        .any(|r| matches!(r.status, Status::Failed(_)));
    Ok(if failed {
        ExitCode::from(2)
    } else if unfinished {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// `--slurm`: write the job-array script for the unfinished runs and submit it.
pub fn slurm_sweep(manifest: &Manifest, opts: &SlurmOptions, dry_run: bool) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the onehead binary")?;
    let records = sweep::index::read_records(manifest);
    let unfinished: Vec<usize> = records
        .iter()
        .filter(|r| r.status != Status::Ok)
        .map(|r| r.run.index)
        .collect();
    let dir = &manifest.sweep_dir;
    if unfinished.is_empty() {
        println!(
            "every run of sweep {} has finished: nothing to submit. Collect with `onehead sweep --collect {}`",
            manifest.name,
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let sub = sweep::slurm::prepare_and_submit(manifest, &unfinished, &exe, opts, dry_run)?;
    println!(
        "sweep {}: {} runs ({} to run), configs and manifest in {}",
        manifest.name,
        manifest.runs.len(),
        unfinished.len(),
        dir.display()
    );
    match &sub.job_id {
        Some(id) => println!(
            "submitted job array {id} ({}): watch with `squeue -j {id}`; when done: `onehead sweep --collect {}`",
            sweep::slurm::array_spec(&unfinished, opts.array_parallelism),
            dir.display()
        ),
        None => println!("dry run: submit with\n  {}", sub.command),
    }
    match &sub.collect_job {
        Some(id) => {
            println!("collect job {id} runs `onehead sweep --collect` once the array has ended")
        }
        None if opts.collect_after && sub.job_id.is_none() => println!(
            "and collect after it with\n  {}",
            sweep::slurm::collect_command(dir, &dir.join("bin/onehead"), "<array job id>")
        ),
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}
