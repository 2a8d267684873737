//! The `onehead` command line: parses arguments and dispatches to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use onehead::config::Experiment;
use onehead::train::engine::{self, RunOptions};
use onehead::train::sweep::{self, GridAxis, SweepOptions};

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
    },
    /// Continue an interrupted run from the state saved after its last completed epoch.
    Resume {
        /// The run folder (`results/<name>/<run-id>`).
        run_dir: PathBuf,
        #[arg(long)]
        quiet: bool,
        /// As for `run`: stop again once the run has trained this many epochs in all.
        #[arg(long, value_name = "N")]
        stop_after_epochs: Option<usize>,
    },
    /// Run several experiment files and/or a grid of overrides, one after another.
    Sweep {
        /// Experiment TOML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A grid axis `KEY=V1,V2,…` (repeat for a Cartesian product).
        #[arg(long = "set", value_name = "KEY=V1,V2")]
        grid: Vec<GridAxis>,
        /// Sweep name: results go to `<results>/<name>/`, with `index.csv`.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "results")]
        results: PathBuf,
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate a run's checkpoint on the val splits (per-class figures included).
    Eval {
        /// A run folder (`results/<name>/<run-id>`).
        run_dir: PathBuf,
        /// Checkpoint name, e.g. `stage1-seg` (default: the last stage's).
        #[arg(long)]
        checkpoint: Option<String>,
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
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Fetch every archive as `<MIRROR>/<archive file name>` instead of the official URLs.
        #[arg(long)]
        mirror: Option<String>,
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
        } => {
            let exp = Experiment::load(&file, &set)?;
            let opts = RunOptions {
                quiet,
                stop_after_epochs,
            };
            finish(engine::run(&exp, &opts))
        }
        Command::Resume {
            run_dir,
            quiet,
            stop_after_epochs,
        } => {
            let opts = RunOptions {
                quiet,
                stop_after_epochs,
            };
            finish(engine::resume(&run_dir, &opts))
        }
        Command::Sweep {
            files,
            grid,
            name,
            results,
            quiet,
        } => {
            let runs = sweep::plan(&files, &grid);
            let name = name.unwrap_or_else(|| {
                format!(
                    "sweep-{}",
                    onehead::report::utc_stamp(onehead::report::now_secs())
                )
            });
            let index = sweep::run_sweep(
                &runs,
                &grid,
                &SweepOptions {
                    name,
                    results_dir: results,
                    overrides: vec![],
                    quiet,
                },
            )?;
            println!("sweep index: {}", index.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            run_dir,
            checkpoint,
        } => {
            for (task, metrics) in engine::evaluate_checkpoint(&run_dir, checkpoint.as_deref())? {
                println!("{task}:");
                for (k, v) in metrics {
                    println!("  {k:<28} {v:.4}");
                }
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
        Command::Prepare { out, seed, mirror } => {
            let mut opts = onehead::data::prepare::PrepareOptions::new(&out);
            opts.seed = seed;
            opts.mirror = mirror;
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
                seg_classes: 21,
                det_classes: 10,
                cls_classes: 10,
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
