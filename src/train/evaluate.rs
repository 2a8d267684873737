//! Evaluation: the model in inference mode over a task's whole val split, in batches, each
//! task scoring its own slice of the head map with its own evaluator.

use anyhow::{Context, Result};
use candle_core::Device;

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
    let task = tasks.get(name)?;
    let n = task.len(Split::Val);
    let mut ev = task.evaluator();
    for start in (0..n).step_by(batch_size.max(1)) {
        let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let batch = task.batch(Split::Val, &idx, &[], device)?;
        let map = model.forward_t(&batch.images, false)?;
        ev.add(&tasks.slice(&map, name)?, &batch)
            .with_context(|| format!("evaluating {name}"))?;
    }
    ev.finish()
}
