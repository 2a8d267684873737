//! The `onehead` command line: parses arguments and dispatches to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use onehead::config::Experiment;
use onehead::sweep::{self, GridAxis, Manifest, SlurmOptions, SweepSpec};
use onehead::tasks::Registry;
use onehead::train::{self as engine, interrupt, RunOptions};

#[derive(Parser)]
#[command(
    name = "onehead",
    version,
    about = "Sequential multi-task learning experiments with one small model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the `sweep` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run one experiment file.
    Run {
        /// The experiment TOML file.
        file: PathBuf,
        /// Override any field, e.g. `--set stages.*.epochs=2 --set replay.enabled=false`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Stop (state saved, exit code 3) once the run has trained this many epochs in all,
        /// e.g. to fit a job's time limit; `onehead resume` continues.
        #[arg(long, value_name = "N")]
        stop_after_epochs: Option<usize>,
        /// Use exactly this run folder (sweeps, job arrays): created if absent; an unfinished
        /// run there is resumed, a finished one left alone (exit 0).
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
    },
    /// Continue an interrupted run (or an interrupted sweep: a folder with manifest.json).
    Resume {
        /// The run folder (`results/<name>/<run-id>`) or a sweep folder.
        run_dir: PathBuf,
        #[arg(long)]
        quiet: bool,
        /// As for `run`: stop again once the run has trained this many epochs in all.
        #[arg(long, value_name = "N")]
        stop_after_epochs: Option<usize>,
        /// For a sweep folder: runs at once (as for `sweep`).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// For a sweep folder: threads per run (as for `sweep`).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
    },
    /// Run experiment files × a grid of overrides × seeds: side by side on this machine
    /// (`--jobs`, `--gpus`) or as a Slurm job array (`--slurm`); `--collect` builds the index.
    Sweep {
        /// Experiment TOML files.
        #[arg(required_unless_present = "collect")]
        files: Vec<PathBuf>,
        /// A grid axis `KEY=V1,V2,…` (repeat for a Cartesian product).
        #[arg(long = "set", value_name = "KEY=V1,V2")]
        grid: Vec<GridAxis>,
        /// Sweep name: the sweep folder is `<results>/<name>/`. Re-running a sweep of the same
        /// name skips its finished runs and resumes interrupted ones.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Runs at once on this machine, each a child process (default 1; with --gpus, one
        /// per GPU).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Threads per run (default: cores / jobs). Given explicitly, jobs × threads may
        /// exceed the cores.
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// One run per GPU, e.g. `--gpus 0,1` (sets CUDA_VISIBLE_DEVICES of each run).
        #[arg(long, value_delimiter = ',', value_name = "IDS")]
        gpus: Vec<String>,
        /// Write a Slurm job-array script (one task per run) and submit it with sbatch.
        #[arg(long, conflicts_with_all = ["jobs", "gpus"])]
        slurm: bool,
        /// Slurm partition.
        #[arg(long, requires = "slurm")]
        partition: Option<String>,
        /// Slurm time limit per task (`4:00:00`); tasks stop before it and requeue.
        #[arg(long, requires = "slurm")]
        time: Option<String>,
        /// GPUs per task (`--gres=gpu:N`).
        #[arg(long, requires = "slurm", value_name = "N")]
        gpus_per_task: Option<u32>,
        /// CPUs per task (each run's threads).
        #[arg(long, requires = "slurm", value_name = "N", default_value_t = 2)]
        cpus_per_task: usize,
        /// Memory per task (`16G`).
        #[arg(long, requires = "slurm")]
        mem: Option<String>,
        /// At most K array tasks at once (`--array=…%K`).
        #[arg(long, requires = "slurm", value_name = "K")]
        array_parallelism: Option<usize>,
        /// Seconds before the time limit at which a task stops and requeues itself.
        #[arg(long, requires = "slurm", value_name = "S", default_value_t = 120)]
        signal_seconds: u32,
        /// Any other sbatch option, e.g. `--sbatch-arg=--account=abc` (repeatable).
        #[arg(
            long,
            requires = "slurm",
            value_name = "OPTION",
            allow_hyphen_values = true
        )]
        sbatch_arg: Vec<String>,
        /// With --slurm: write the script and print the sbatch command, don't submit.
        #[arg(long, requires = "slurm")]
        dry_run: bool,
        /// Build index.csv / summary.csv of a sweep folder from whatever finished, and list
        /// the runs that did not.
        #[arg(long, value_name = "SWEEP_DIR", conflicts_with_all = ["files", "slurm", "jobs", "gpus", "name"])]
        collect: Option<PathBuf>,
    },
    /// Evaluate a run's checkpoint on the val splits (per-class figures included).
    Eval {
        /// A run folder (`results/<name>/<run-id>`).
        run_dir: PathBuf,
        /// Checkpoint name, e.g. `stage1-seg`, or `last` (default: the final stage's).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Also write the predictions in standard formats here: detections as a COCO results
        /// JSON, masks as palette PNGs named like the ground truth, classes as CSV, and
        /// `manifest.json` (files, ground truth, metrics).
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
    },
    /// Run a trained model on images: per image a JSON of raw results (original-image
    /// pixels), an overlay PNG, and the segmentation mask as a palette PNG.
    Predict {
        /// A run folder (`results/<name>/<run-id>`).
        run_dir: PathBuf,
        /// Image files and/or folders (walked recursively).
        #[arg(required = true, value_name = "IMAGE_OR_DIR")]
        inputs: Vec<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Checkpoint name, e.g. `stage1-seg`, or `last` (default: the final stage's).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Images per forward pass (default: the run's `[eval] batch_size`).
        #[arg(long, value_name = "N")]
        batch_size: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Draw a run's pictures from its files (`plots/*.png|svg`, `report.html`); works on an
    /// unfinished or interrupted run too.
    Plot {
        /// Run folders (`results/<name>/<run-id>`).
        #[arg(required = true)]
        run_dirs: Vec<PathBuf>,
        /// Also write the run's epochs as a TensorBoard event file (`<run>/tensorboard/`).
        #[arg(long)]
        tensorboard: bool,
    },
    /// Compare runs and sweeps: the summary of every run, and with `--out` overlay charts per
    /// task metric (seeds of one config as mean ± sd) and a `report.html`.
    Compare {
        /// Run folders and/or sweep folders (with `index.csv` or run folders below).
        #[arg(required = true, value_name = "RUN_DIR|SWEEP_DIR")]
        inputs: Vec<PathBuf>,
        /// Write overlay charts, `summary.csv` and `report.html` here.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Summary format: table, markdown or csv.
        #[arg(long, default_value = "table")]
        format: onehead::report::CompareFormat,
    },
    /// Write the built-in synthetic benchmark (same formats as the course sets).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 240)]
        train: usize,
        #[arg(long, default_value_t = 60)]
        val: usize,
        /// Side of the generated images in pixels.
        #[arg(long, default_value_t = 160)]
        size: usize,
    },
    /// Download and sample the real course sets (Imagenette, VOC 2012, COCO 2017).
    Prepare {
        /// The data root to write (only the small sampled sets go here).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Fetch every archive as `<MIRROR>/<archive file name>` instead of the official URLs.
        #[arg(long)]
        mirror: Option<String>,
        /// Where the downloaded archives are kept (default: $ONEHEAD_CACHE, else the
        /// platform's cache folder + `onehead/downloads`, e.g. ~/.cache/onehead/downloads).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Training images sampled per dataset.
        #[arg(long, default_value_t = 240)]
        train: usize,
        /// Validation images sampled per dataset.
        #[arg(long, default_value_t = 60)]
        val: usize,
    },
    /// Parameter counts, output shapes and inference latency of the model.
    Info {
        /// Take image size, FPN width and device from this experiment.
        file: Option<PathBuf>,
        #[arg(long)]
        image_size: Option<usize>,
        #[arg(long)]
        device: Option<String>,
    },
    /// Training and inference throughput, batch-1 latency, peak memory, sgemm peak
    /// (compare with shared/torch_ref/bench.py: scripts/bench_vs_torch.sh).
    Bench {
        /// Square input sizes of the training measurements.
        #[arg(long, value_delimiter = ',', default_value = "160,224")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Replayed images added to the engine-style training step (0: skip it).
        #[arg(long, default_value_t = 4)]
        replay: usize,
        /// Timed steps per measurement (after 2 warm-ups).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Input size of the inference (batch 16) and latency (batch 1) measurements.
        #[arg(long, default_value_t = 224)]
        inference_size: usize,
        /// Batch-1 forwards whose median is the latency (at least 30).
        #[arg(long, default_value_t = 50)]
        latency_runs: usize,
        /// Time every kernel kind inside the fused network op (per training step).
        #[arg(long)]
        profile: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

fn main() -> ExitCode {
    // Before any tensor work: thread pools and allocator tuned for CPU training (see ops).
    onehead::ops::tune_cpu_runtime();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: sweeps send each run's output to its log.txt.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match dispatch(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Print a finished run's verdict. Exit codes: 0 every task within tolerance, 1 some task
/// forgot more (a result, not a crash), 2 an error, 3 stopped on purpose (resumable).
fn finish(result: Result<engine::RunOutcome>) -> Result<ExitCode> {
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

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            file,
            set,
            quiet,
            stop_after_epochs,
            run_dir,
        } => {
            let mut exp = Experiment::load(&file, &set)?;
            match exp.seeds.take() {
                // `seeds = [a, b, …]`: one run per seed, as a sweep of this one file.
                Some(seeds) if seeds.len() > 1 => {
                    if run_dir.is_some() || stop_after_epochs.is_some() {
                        anyhow::bail!(
                            "{}: --run-dir and --stop-after-epochs apply to one run, and this file lists {} seeds (seeds = {seeds:?}): pick one with --set seed=N --set 'seeds=[N]'",
                            file.display(),
                            seeds.len()
                        );
                    }
                    let name = format!(
                        "{}/{}-seeds",
                        exp.name,
                        onehead::report::utc_stamp(onehead::report::now_secs())
                    );
                    let spec = SweepSpec {
                        files: vec![file],
                        grid: vec![],
                        overrides: set,
                    };
                    let (jobs, threads) =
                        sweep::thread_budget(None, None, &[], sweep::cli::cores())?;
                    let code = sweep::cli::run_sweep_locally(
                        &spec,
                        &exp.results_dir,
                        &name,
                        jobs,
                        threads,
                        vec![],
                        quiet,
                    )?;
                    // As for one run: 1 when some seed forgot, 0 when all passed.
                    Ok(code)
                }
                Some(seeds) => {
                    exp.seed = seeds[0];
                    finish(engine::run(
                        &exp,
                        &RunOptions {
                            quiet,
                            stop_after_epochs,
                            run_dir,
                            interrupt: Some(interrupt::install()?),
                            ..RunOptions::default()
                        },
                    ))
                }
                None => finish(engine::run(
                    &exp,
                    &RunOptions {
                        quiet,
                        stop_after_epochs,
                        run_dir,
                        interrupt: Some(interrupt::install()?),
                        ..RunOptions::default()
                    },
                )),
            }
        }
        Command::Resume {
            run_dir,
            quiet,
            stop_after_epochs,
            jobs,
            threads,
        } => {
            if Manifest::path(&run_dir).is_file() {
                let manifest = Manifest::load(&run_dir)?;
                let (jobs, threads) =
                    sweep::thread_budget(jobs, threads, &[], sweep::cli::cores())?;
                return sweep::cli::local_sweep(&manifest, jobs, threads, vec![], quiet);
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
                interrupt: Some(interrupt::install()?),
                ..RunOptions::default()
            };
            finish(engine::resume(&run_dir, &opts))
        }
        Command::Sweep {
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
            dry_run,
            collect,
        } => {
            if let Some(dir) = collect {
                return sweep::cli::collect_sweep(&dir);
            }
            let name = name.unwrap_or_else(|| {
                format!(
                    "sweep-{}",
                    onehead::report::utc_stamp(onehead::report::now_secs())
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
                };
                opts.validate()?;
                let manifest = sweep::cli::plan_sweep(&spec, &results, &name)?;
                return sweep::cli::slurm_sweep(&manifest, &opts, dry_run);
            }
            let (jobs, threads) = sweep::thread_budget(jobs, threads, &gpus, sweep::cli::cores())?;
            sweep::cli::run_sweep_locally(&spec, &results, &name, jobs, threads, gpus, quiet)
        }
        Command::Eval {
            run_dir,
            checkpoint,
            export,
        } => {
            let registry = Registry::builtin();
            for (task, metrics) in engine::evaluate_checkpoint_export(
                &run_dir,
                checkpoint.as_deref(),
                &registry,
                export.as_deref(),
            )? {
                println!("{task}:");
                for (k, v) in metrics {
                    println!("  {k:<28} {v:.4}");
                }
            }
            if let Some(dir) = export {
                println!(
                    "exported to {} (files, ground truth and metrics in manifest.json)",
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict {
            run_dir,
            inputs,
            out,
            checkpoint,
            batch_size,
            quiet,
        } => {
            let t = std::time::Instant::now();
            let report = onehead::predict::predict(
                &onehead::predict::PredictOptions {
                    run_dir,
                    checkpoint,
                    inputs,
                    out: out.clone(),
                    quiet,
                    batch_size,
                },
                &Registry::builtin(),
            )?;
            println!(
                "{} image(s) predicted with {} ({}) in {:.1} s: {}",
                report.written.len(),
                report.checkpoint,
                report.tasks.join(", "),
                t.elapsed().as_secs_f64(),
                out.display()
            );
            if report.failures.is_empty() {
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("{} input(s) failed:", report.failures.len());
            for (path, why) in &report.failures {
                eprintln!("  {}: {why}", path.display());
            }
            Ok(ExitCode::from(2))
        }
        Command::Plot {
            run_dirs,
            tensorboard,
        } => {
            for dir in &run_dirs {
                for f in onehead::report::draw_run(dir)? {
                    println!("{}", f.display());
                }
                if tensorboard {
                    let f = onehead::report::export_tensorboard(dir)?;
                    println!("{}", f.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare {
            inputs,
            out,
            format,
        } => {
            let result = onehead::report::compare(&onehead::report::CompareOptions {
                inputs,
                out,
                format,
            })?;
            for w in &result.warnings {
                tracing::warn!("{w}");
            }
            print!("{}", result.text);
            for f in &result.files {
                eprintln!("wrote {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth {
            out,
            seed,
            train,
            val,
            size,
        } => {
            let t = std::time::Instant::now();
            onehead::data::synth::generate(
                &out,
                &onehead::data::synth::SynthOptions {
                    seed,
                    train,
                    val,
                    size,
                },
            )
            .with_context(|| format!("writing the synthetic benchmark to {}", out.display()))?;
            println!(
                "wrote the synthetic benchmark to {} in {:.1} s",
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Prepare {
            out,
            seed,
            mirror,
            cache,
            train,
            val,
        } => {
            let mut opts = onehead::data::prepare::PrepareOptions::new(&out);
            opts.seed = seed;
            opts.mirror = mirror;
            opts.downloads = cache;
            opts.train = train;
            opts.val = val;
            let s = onehead::data::prepare::prepare(&opts)?;
            println!(
                "course sets ready under {}: classification {}/{}, segmentation {}/{}, detection {}/{} images ({}/{} boxes)",
                s.root.display(),
                s.cls_images[0],
                s.cls_images[1],
                s.seg_images[0],
                s.seg_images[1],
                s.det_images[0],
                s.det_images[1],
                s.det_annotations[0],
                s.det_annotations[1]
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Info {
            file,
            image_size,
            device,
        } => {
            let exp = match &file {
                Some(f) => Some(Experiment::load(f, &[])?),
                None => None,
            };
            let size = image_size
                .or(exp.as_ref().map(|e| e.model.image_size))
                .unwrap_or(224);
            let fpn = exp.as_ref().map(|e| e.model.fpn_channels).unwrap_or(128);
            let device = engine::select_device(
                device
                    .as_deref()
                    .or(exp.as_ref().map(|e| e.device.as_str()))
                    .unwrap_or("auto"),
            )?;
            let cfg = onehead::model::OneHeadConfig {
                fpn_channels: fpn,
                ..Default::default()
            };
            println!("{}", onehead::model::info_report(&cfg, size, &device)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            sizes,
            batch,
            replay,
            steps,
            inference_size,
            latency_runs,
            profile,
            json,
            device,
        } => {
            let device = engine::select_device(&device)?;
            let opts = onehead::bench::BenchOptions {
                sizes,
                batch,
                replay,
                steps,
                inference_size,
                latency_runs,
                profile,
            };
            let report = onehead::bench::run_bench(&opts, &device)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
