//! Where a finished epoch goes: the loop hands each epoch to every [`EpochSink`] of the run
//! once (`epochs.csv` + `eval.csv`, TensorBoard when asked, the console line), and knows none
//! of them. A new sink (another logger, a dashboard) is one more implementation.

use anyhow::Result;

use super::csv_log::{EpochRow, EvalRecord, RunCsv};
use super::tensorboard::TbWriter;

pub trait EpochSink {
    /// One epoch: its row (losses, learning rate, metrics by column) and the evaluations
    /// behind its metrics. Called after the epoch, before the state is saved.
    fn epoch(&mut self, row: &EpochRow, evals: &[EvalRecord]) -> Result<()>;
}

impl EpochSink for RunCsv {
    fn epoch(&mut self, row: &EpochRow, evals: &[EvalRecord]) -> Result<()> {
        self.append(row, evals)
    }
}

impl EpochSink for TbWriter {
    fn epoch(&mut self, row: &EpochRow, _evals: &[EvalRecord]) -> Result<()> {
        self.add_row(row)?;
        self.flush()
    }
}

/// The console's line per epoch: stage, epoch, losses, each evaluated task's primary metric.
pub struct ConsoleLine {
    /// Each stage's task and epochs.
    pub stages: Vec<(String, usize)>,
    /// Each task's primary metric.
    pub primary: Vec<(String, String)>,
}

impl EpochSink for ConsoleLine {
    fn epoch(&mut self, row: &EpochRow, evals: &[EvalRecord]) -> Result<()> {
        let shown: Vec<String> = evals
            .iter()
            .filter_map(|e| {
                let (_, m) = self.primary.iter().find(|(t, _)| *t == e.task)?;
                Some(format!("{} {m} {:.4}", e.task, e.metrics.get(m)?))
            })
            .collect();
        let terms: Vec<String> = row
            .losses
            .iter()
            .filter(|(k, _)| *k != "loss_total")
            .map(|(k, v)| format!("{} {v:.4}", k.trim_start_matches("loss_")))
            .collect();
        let (task, epochs) = &self.stages[row.stage - 1];
        tracing::info!(
            "stage {}/{} {task} epoch {}/{epochs}: loss {:.4} ({}) · {} · {:.1} s",
            row.stage,
            self.stages.len(),
            row.epoch,
            row.losses.get("loss_total").copied().unwrap_or(0.0),
            terms.join(", "),
            shown.join(" · "),
            row.seconds.unwrap_or(0.0)
        );
        Ok(())
    }
}
