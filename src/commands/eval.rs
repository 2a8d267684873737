//! `onehead eval` and `onehead predict`: a trained run's checkpoint on its val splits or on
//! any images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::registry::Registry;
use crate::train as engine;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A run folder (`results/<name>/<run-id>`).
    pub run_dir: PathBuf,
    /// Checkpoint name, e.g. `stage1-seg`, or `last` (default: the final stage's).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Also write the predictions in standard formats here: detections as a COCO results
    /// JSON, masks as palette PNGs named like the ground truth, classes as CSV, and
    /// `manifest.json` (files, ground truth, metrics).
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// A run folder (`results/<name>/<run-id>`).
    pub run_dir: PathBuf,
    /// Image files and/or folders (walked recursively).
    #[arg(required = true, value_name = "IMAGE_OR_DIR")]
    pub inputs: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Checkpoint name, e.g. `stage1-seg`, or `last` (default: the final stage's).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Images per forward pass, 1 to 1024 (default: the run's `[eval] batch_size`).
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub batch_size: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Evaluate a run's checkpoint on the val splits (per-class figures included).
pub fn eval(args: EvalArgs) -> Result<ExitCode> {
    let EvalArgs {
        run_dir,
        checkpoint,
        export,
    } = args;
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

/// Run a trained model on images: per image a JSON of raw results (original-image
/// pixels), an overlay PNG, and the segmentation mask as a palette PNG.
pub fn predict(args: PredictArgs) -> Result<ExitCode> {
    let PredictArgs {
        run_dir,
        inputs,
        out,
        checkpoint,
        batch_size,
        quiet,
    } = args;
    let t = std::time::Instant::now();
    let report = crate::predict::predict(
        &crate::predict::PredictOptions {
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
