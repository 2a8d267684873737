//! The end-of-run verdict: each task's baseline (its metric at the end of its own stage),
//! its final value, the relative drop and pass/fail against the tolerance.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::TaskKind;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskVerdict {
    pub task: TaskKind,
    /// Headline metric name (`miou`, `map50`, `top1`).
    pub metric: String,
    /// Value at the end of the stage that learned the task (the last such stage).
    pub baseline: f64,
    /// Value at the end of the run.
    pub final_value: f64,
    /// `(baseline − final) / baseline`; negative means the task improved.
    pub drop_rel: f64,
    pub pass: bool,
}

impl TaskVerdict {
    pub fn new(task: TaskKind, baseline: f64, final_value: f64, tolerance: f64) -> Self {
        let drop_rel = if baseline > 0.0 {
            (baseline - final_value) / baseline
        } else {
            0.0
        };
        Self {
            task,
            metric: task.metric_name().to_string(),
            baseline,
            final_value,
            drop_rel,
            pass: drop_rel <= tolerance + 1e-12,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParamSummary {
    pub total: usize,
    pub backbone: usize,
    pub neck: usize,
    pub head: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub name: String,
    pub run_dir: String,
    pub version: String,
    pub git_commit: String,
    pub seed: u64,
    pub device: String,
    pub tolerance: f64,
    pub tasks: Vec<TaskVerdict>,
    /// Every task within tolerance.
    pub pass: bool,
    /// All final validation metrics, `<task>_<key>` → value.
    pub final_metrics: BTreeMap<String, f64>,
    pub params: ParamSummary,
    /// Median batch-1 inference latency per image, milliseconds.
    pub latency_ms: f64,
    pub train_seconds: f64,
    pub started_at: String,
    pub finished_at: String,
}

impl RunSummary {
    /// A fixed-width table for the terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<5} {:<7} {:>9} {:>9} {:>8}  verdict (tolerance {:.1}%)",
            "task",
            "metric",
            "baseline",
            "final",
            "drop",
            self.tolerance * 100.0
        );
        for t in &self.tasks {
            let _ = writeln!(
                s,
                "{:<5} {:<7} {:>9.4} {:>9.4} {:>7.2}%  {}",
                t.task.name(),
                t.metric,
                t.baseline,
                t.final_value,
                t.drop_rel * 100.0,
                if t.pass { "ok" } else { "FORGOT" }
            );
        }
        let _ = writeln!(
            s,
            "overall: {}   params {} · {:.2} ms/image · trained {:.0} s",
            if self.pass { "PASS" } else { "FAIL" },
            self.params.total,
            self.latency_ms,
            self.train_seconds
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_is_relative_and_judged_against_tolerance() {
        let v = TaskVerdict::new(TaskKind::Seg, 0.5, 0.47, 0.05);
        assert!((v.drop_rel - 0.06).abs() < 1e-12);
        assert!(!v.pass);
        let v = TaskVerdict::new(TaskKind::Det, 0.5, 0.48, 0.05);
        assert!((v.drop_rel - 0.04).abs() < 1e-12);
        assert!(v.pass);
        // Exactly at the tolerance passes (≤ 5 %).
        assert!(TaskVerdict::new(TaskKind::Cls, 0.8, 0.76, 0.05).pass);
        // Improvement is a negative drop.
        assert!(TaskVerdict::new(TaskKind::Cls, 0.5, 0.6, 0.05).drop_rel < 0.0);
    }
}
