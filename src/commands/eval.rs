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
    /// The split to evaluate: `val`, or `test` (the held-out split the verdict and
    /// `summary.json`'s finals are measured on, when the data has one; no `--export`).
    #[arg(long, default_value = "val", value_parser = ["val", "test"])]
    pub split: String,
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

/// Evaluate a run's checkpoint on the val (or test) splits, per-class figures included.
pub fn eval(args: EvalArgs) -> Result<ExitCode> {
    let EvalArgs {
        run_dir,
        checkpoint,
        export,
        split,
    } = args;
    let registry = Registry::builtin();
    let results = if split == "test" {
        anyhow::ensure!(
            export.is_none(),
            "--export writes val predictions (beside the val ground truth): drop --split test"
        );
        engine::evaluate_checkpoint_on(
            &run_dir,
            checkpoint.as_deref(),
            &registry,
            crate::data::Split::Test,
        )?
    } else {
        engine::evaluate_checkpoint_export(
            &run_dir,
            checkpoint.as_deref(),
            &registry,
            export.as_deref(),
        )?
    };
    let learned =
        engine::checkpoints::checkpoint_learned(&run_dir, checkpoint.as_deref(), &registry)?;
    // Every task's headline metrics first, then the per-class ones: a long per-class list
    // of one task must not bury the next task's headline.
    for (task, metrics) in &results {
        print!(
            "{}",
            headline_text(task, metrics, &registry, learned.contains(task))
        );
    }
    for (task, metrics) in &results {
        print!("{}", per_class_text(task, metrics, &registry));
    }
    if let Some(dir) = export {
        println!(
            "exported to {} (files, ground truth and metrics in manifest.json)",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One task's headline metrics for the terminal (those the task declares, in its order); a
/// head the checkpoint never trained is marked, so that its chance-level numbers are not read
/// as a result.
fn headline_text(
    task: &str,
    metrics: &crate::tasks::TaskMetrics,
    registry: &Registry,
    trained: bool,
) -> String {
    let mut out = format!("{task}:");
    if !trained {
        out.push_str("  (head not trained by this checkpoint: its numbers are untrained outputs)");
    }
    out.push('\n');
    for k in registry.tasks.metrics(task).unwrap_or(&[]) {
        if let Some(v) = metrics.get(k.as_str()) {
            out.push_str(&format!("  {k:<28} {v:.4}\n"));
        }
    }
    out
}

/// One task's other metrics (per class), after every task's headline; empty when it has none.
fn per_class_text(task: &str, metrics: &crate::tasks::TaskMetrics, registry: &Registry) -> String {
    let headline = registry.tasks.metrics(task).unwrap_or(&[]);
    let rest: Vec<_> = metrics
        .iter()
        .filter(|(k, _)| !headline.contains(k))
        .collect();
    if rest.is_empty() {
        return String::new();
    }
    let mut out = format!("{task} per class:\n");
    for (k, v) in rest {
        out.push_str(&format!("  {k:<28} {v:.4}\n"));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headline_metrics_come_first_and_untrained_heads_are_marked() {
        let r = Registry::builtin();
        let mut m = crate::tasks::TaskMetrics::new();
        for (k, v) in [
            ("ap50.cat", 0.1),
            ("map50", 0.5),
            ("map75", 0.2),
            ("map50_95", 0.3),
        ] {
            m.insert(k.into(), v);
        }
        let text = headline_text("det", &m, &r, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "det:");
        assert!(lines[1].trim_start().starts_with("map50 "), "{text}");
        assert!(lines[2].trim_start().starts_with("map50_95"), "{text}");
        assert!(lines[3].trim_start().starts_with("map75"), "{text}");
        let rest = per_class_text("det", &m, &r);
        let lines: Vec<&str> = rest.lines().collect();
        assert_eq!(lines[0], "det per class:");
        assert!(lines[1].trim_start().starts_with("ap50.cat"), "{rest}");
        assert_eq!(lines.len(), 2, "{rest}");
        assert!(headline_text("det", &m, &r, false)
            .lines()
            .next()
            .unwrap()
            .contains("not trained"));
    }
}
