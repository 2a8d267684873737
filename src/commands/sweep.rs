//! `onehead sweep`: files × grid × seeds, locally or as a Slurm job array; `--collect`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::sweep::{self, GridAxis, SlurmOptions, SweepSpec};

#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Experiment TOML files.
    #[arg(required_unless_present = "collect")]
    pub files: Vec<PathBuf>,
    /// A grid axis `KEY=V1,V2,…` (repeat for a Cartesian product).
    #[arg(long = "set", value_name = "KEY=V1,V2")]
    pub grid: Vec<GridAxis>,
    /// Sweep name: the sweep folder is `<results>/<name>/`. Re-running a sweep of the same
    /// name skips its finished runs and resumes interrupted ones.
    #[arg(long)]
    pub name: Option<String>,
    /// Folder the sweep folder goes under.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Runs at once on this machine, each a child process (default: cores / --threads, and
    /// no more than the runs still to do; with --gpus, one per GPU). Each run holds its own
    /// model, data and buffers in memory: lower it where memory is short.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Threads per run (default: cores / jobs). Given explicitly, jobs × threads may
    /// exceed the cores.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// One run per GPU, e.g. `--gpus 0,1` (sets CUDA_VISIBLE_DEVICES of each run).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub gpus: Vec<String>,
    /// Write a Slurm job-array script (one task per run) and submit it with sbatch.
    #[arg(long, conflicts_with_all = ["jobs", "gpus"])]
    pub slurm: bool,
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    pub partition: Option<String>,
    /// Slurm time limit per task (`4:00:00`); tasks stop before it and requeue.
    #[arg(long, requires = "slurm")]
    pub time: Option<String>,
    /// GPUs per task (`--gres=gpu:N`).
    #[arg(long, requires = "slurm", value_name = "N")]
    pub gpus_per_task: Option<u32>,
    /// CPUs per task (each run's threads).
    #[arg(long, requires = "slurm", value_name = "N", default_value_t = 2)]
    pub cpus_per_task: usize,
    /// Memory per task (`16G`).
    #[arg(long, requires = "slurm")]
    pub mem: Option<String>,
    /// At most K array tasks at once (`--array=…%K`).
    #[arg(long, requires = "slurm", value_name = "K")]
    pub array_parallelism: Option<usize>,
    /// Seconds before the time limit at which a task stops and requeues itself.
    #[arg(long, requires = "slurm", value_name = "S", default_value_t = 120)]
    pub signal_seconds: u32,
    /// Any other sbatch option, e.g. `--sbatch-arg=--account=abc` (repeatable).
    #[arg(
        long,
        requires = "slurm",
        value_name = "OPTION",
        allow_hyphen_values = true
    )]
    pub sbatch_arg: Vec<String>,
    /// A shell line every array task runs before onehead, e.g. `--setup 'module load
    /// cuda/12'` (repeatable); kept in the sweep folder, so a later `--slurm` without it
    /// keeps it.
    #[arg(
        long,
        requires = "slurm",
        value_name = "LINE",
        allow_hyphen_values = true
    )]
    pub setup: Vec<String>,
    /// Also submit a job that runs `sweep --collect` once the array has ended
    /// (`--dependency=afterany`).
    #[arg(long, requires = "slurm")]
    pub collect_after: bool,
    /// With --slurm: write the script and print the sbatch command, don't submit.
    #[arg(long, requires = "slurm")]
    pub dry_run: bool,
    /// Exit 1 when some finished run did not keep every task within tolerance (for CI); by
    /// default a sweep whose runs all finished exits 0, whatever they found.
    #[arg(long)]
    pub fail_on_forgetting: bool,
    /// Build index.csv / summary.csv of a sweep folder from whatever finished, and list
    /// the runs that did not.
    #[arg(long, value_name = "SWEEP_DIR", conflicts_with_all = ["files", "slurm", "jobs", "gpus", "name"])]
    pub collect: Option<PathBuf>,
}

/// Run experiment files × a grid of overrides × seeds: side by side on this machine
/// (`--jobs`, `--gpus`) or as a Slurm job array (`--slurm`); `--collect` builds the index.
pub fn sweep(args: SweepArgs) -> Result<ExitCode> {
    let SweepArgs {
        files,
        grid,
        name,
        results,
        quiet,
        jobs,
        threads,
        gpus,
        slurm,
        partition,
        time,
        gpus_per_task,
        cpus_per_task,
        mem,
        array_parallelism,
        signal_seconds,
        sbatch_arg,
        setup,
        collect_after,
        dry_run,
        fail_on_forgetting,
        collect,
    } = args;
    if let Some(dir) = collect {
        return sweep::cli::collect_sweep(&dir);
    }
    let name = name.unwrap_or_else(|| {
        format!(
            "sweep-{}",
            crate::report::utc_stamp(crate::report::now_secs())
        )
    });
    let spec = SweepSpec {
        files,
        grid,
        overrides: vec![],
    };
    if slurm {
        let opts = SlurmOptions {
            partition,
            time,
            gpus_per_task,
            cpus_per_task,
            mem,
            array_parallelism,
            signal_seconds,
            extra: sbatch_arg,
            setup,
            collect_after,
        };
        opts.validate()?;
        let manifest = sweep::cli::plan_sweep(&spec, &results, &name)?;
        return sweep::cli::slurm_sweep(&manifest, &opts, dry_run);
    }
    // A bad --jobs / --threads is refused before planning writes the sweep folder.
    sweep::thread_budget(jobs, threads, &gpus, sweep::cli::cores(), 1)?;
    let local = sweep::cli::Local {
        jobs,
        threads,
        gpus,
        quiet,
        fail_on_forgetting,
    };
    sweep::cli::run_sweep_locally(&spec, &results, &name, &local)
}
