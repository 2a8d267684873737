//! The `onehead` command line: parses arguments and dispatches to the library.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use onehead::commands;

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

// Parsed once per process: the size of the largest variant (sweep's options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run one experiment file.
    Run(commands::run::RunArgs),
    /// Continue an interrupted run (or an interrupted sweep: a folder with manifest.json).
    Resume(commands::run::ResumeArgs),
    /// Run experiment files × a grid of overrides × seeds: side by side on this machine
    /// (`--jobs`, `--gpus`) or as a Slurm job array (`--slurm`); `--collect` builds the index.
    Sweep(commands::sweep::SweepArgs),
    /// Evaluate a run's checkpoint on the val splits (per-class figures included).
    Eval(commands::eval::EvalArgs),
    /// Run a trained model on images: per image a JSON of raw results (original-image
    /// pixels), an overlay PNG, and the segmentation mask as a palette PNG.
    Predict(commands::eval::PredictArgs),
    /// Draw a run's pictures from its files (`plots/*.png|svg`, `report.html`); works on an
    /// unfinished or interrupted run too.
    Plot(commands::pictures::PlotArgs),
    /// Compare runs and sweeps: the summary of every run, and with `--out` overlay charts per
    /// task metric (seeds of one config as mean ± sd) and a `report.html`.
    Compare(commands::pictures::CompareArgs),
    /// Write the built-in synthetic benchmark (same formats as the course sets).
    Synth(commands::data::SynthArgs),
    /// Download and sample the real course sets (Imagenette, VOC 2012, COCO 2017).
    Prepare(commands::data::PrepareArgs),
    /// Parameter counts, output shapes and inference latency of the model.
    Info(commands::inspect::InfoArgs),
    /// Training and inference throughput, batch-1 latency, peak memory, sgemm peak
    /// (side by side with PyTorch: scripts/bench_vs_torch.sh).
    Bench(commands::inspect::BenchArgs),
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

fn dispatch(cli: Cli) -> Result<ExitCode> {
    use commands::*;
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Resume(a) => run::resume(a),
        Command::Sweep(a) => sweep::sweep(a),
        Command::Eval(a) => eval::eval(a),
        Command::Predict(a) => eval::predict(a),
        Command::Plot(a) => pictures::plot(a),
        Command::Compare(a) => pictures::compare(a),
        Command::Synth(a) => data::synth(a),
        Command::Prepare(a) => data::prepare(a),
        Command::Info(a) => inspect::info(a),
        Command::Bench(a) => inspect::bench(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_and_argument_says_what_it_is_for() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if !matches!(id, "help" | "version") && arg.get_help().is_none() {
                    missing.push(format!("{} --{id}", sub.get_name()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "options without a description: {missing:?}"
        );
    }
}
