//! Evaluation: the model in inference mode over a task's whole val split, in batches, each
//! task scoring its own slice of the head map with its own evaluator (and, for
//! `onehead eval --export`, writing the same predictions with its exporter).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::metrics::per_image::PerImage;
use crate::model::OneHead;
use crate::tasks::{Split, TaskMetrics, TaskSet};

/// Evaluate `model` on the val split of task `name`.
pub fn evaluate(
    model: &OneHead,
    tasks: &TaskSet,
    name: &str,
    batch_size: usize,
    device: &Device,
) -> Result<TaskMetrics> {
    Ok(evaluate_and_export(model, tasks, name, batch_size, device, None)?.0)
}

/// Evaluate `model` on `split` of task `name`, with the per-image scores the bootstrap
/// resamples (`None` for a task that keeps none).
pub fn evaluate_scored(
    model: &OneHead,
    tasks: &TaskSet,
    name: &str,
    split: Split,
    batch_size: usize,
    device: &Device,
) -> Result<(TaskMetrics, Option<PerImage>)> {
    let task = tasks.get(name)?;
    let mut ev = task.evaluator(split);
    let n = task.len(split);
    let model = model.inference()?;
    for start in (0..n).step_by(batch_size.max(1)) {
        let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let batch = task.batch(split, &idx, &[], device)?;
        let map = model.forward(&batch.images)?;
        ev.add(&tasks.slice(&map, name)?, &batch)
            .with_context(|| format!("evaluating {name} on {}", split.name()))?;
    }
    ev.finish_scored()
}

/// [`evaluate`], and with `export`, the task's exporter fed the very same head slices: its
/// files go under `export`, its description (for `manifest.json`) is returned beside the
/// metrics (`None` when the task exports nothing).
pub fn evaluate_and_export(
    model: &OneHead,
    tasks: &TaskSet,
    name: &str,
    batch_size: usize,
    device: &Device,
    export: Option<&Path>,
) -> Result<(TaskMetrics, Option<serde_json::Value>)> {
    let task = tasks.get(name)?;
    let n = task.len(Split::Val);
    let mut ev = task.evaluator(Split::Val);
    let model = model.inference()?;
    let mut ex = match export {
        Some(dir) => task
            .exporter(dir)
            .with_context(|| format!("exporting {name}"))?,
        None => None,
    };
    for start in (0..n).step_by(batch_size.max(1)) {
        let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let batch = task.batch(Split::Val, &idx, &[], device)?;
        let map = model.forward(&batch.images)?;
        let out = tasks.slice(&map, name)?;
        ev.add(&out, &batch)
            .with_context(|| format!("evaluating {name}"))?;
        if let Some(ex) = ex.as_mut() {
            ex.add(&out, &batch)
                .with_context(|| format!("exporting {name}"))?;
        }
    }
    let written = ex
        .map(|ex| ex.finish())
        .transpose()
        .with_context(|| format!("exporting {name}"))?;
    Ok((ev.finish()?, written))
}
