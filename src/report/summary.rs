//! The end-of-run verdict and summary.
//!
//! For every task: its verdict metric (the task's primary metric unless `[eval] metric` picks
//! another), its baseline (the metric at the end of the stage that learned it, or that
//! stage's best epoch: `[eval] baseline`), its final value, its chance level, and the drop.
//! A task whose baseline is not at least `chance_margin` above chance is **not learned**:
//! no percentage is printed for it and the run cannot pass (the original report's Top-1 of
//! 0.05 "passed" its forgetting check; onehead does not let that happen). The task × stage
//! matrix holds every task's verdict metric at the end of every stage.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::EvalRecord;
use crate::config::{BaselineKind, ToleranceKind};

/// The outcome for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Learned, and within tolerance at the end.
    Ok,
    /// Learned, then dropped by more than the tolerance.
    Forgot,
    /// The baseline is not clearly above chance: there was nothing to keep.
    #[default]
    NotLearned,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Forgot => "FORGOT",
            Verdict::NotLearned => "not learned",
        }
    }

    /// The verdict as written in `summary.json` (`ok`, `forgot`, `not_learned`).
    pub fn key(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Forgot => "forgot",
            Verdict::NotLearned => "not_learned",
        }
    }
}

/// Read back with every field defaulted when absent (older or hand-made summaries).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskVerdict {
    pub task: String,
    /// The verdict metric (`miou`, `map50`, `top1`, …).
    pub metric: String,
    /// 1-based stage that learned the task (its last stage).
    pub stage: usize,
    pub baseline: f64,
    /// Value at the end of the run.
    pub final_value: f64,
    /// The metric's chance level on the val split.
    pub chance: f64,
    /// `baseline ≥ chance + chance_margin`.
    pub learned: bool,
    /// `(baseline − final) / baseline`; `None` when the task was not learned (a percentage
    /// of a baseline near zero means nothing). Negative: the task improved.
    pub drop_rel: Option<f64>,
    /// `baseline − final` in metric points.
    pub drop_abs: f64,
    pub verdict: Verdict,
    /// `verdict == ok`.
    pub pass: bool,
}

/// How the verdict is judged (from `[eval]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judging {
    pub tolerance: f64,
    pub tolerance_kind: ToleranceKind,
    pub baseline: BaselineKind,
    pub chance_margin: f64,
}

/// What the verdict needs to know of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRef {
    pub task: String,
    pub metric: String,
    pub chance: f64,
    /// 0-based stage that (last) trained the task: its baseline is measured there.
    pub stage: usize,
}

impl TaskVerdict {
    /// Judge a task from its baseline and final value.
    pub fn new(t: &TaskRef, stage: usize, baseline: f64, final_value: f64, j: &Judging) -> Self {
        let learned = baseline - t.chance >= j.chance_margin - 1e-12;
        let drop_abs = baseline - final_value;
        let drop_rel = (learned && baseline > 0.0).then(|| drop_abs / baseline);
        let within = match j.tolerance_kind {
            ToleranceKind::Relative => drop_rel.is_some_and(|d| d <= j.tolerance + 1e-12),
            ToleranceKind::Absolute => drop_abs <= j.tolerance + 1e-12,
        };
        let verdict = if !learned {
            Verdict::NotLearned
        } else if within {
            Verdict::Ok
        } else {
            Verdict::Forgot
        };
        Self {
            task: t.task.clone(),
            metric: t.metric.clone(),
            stage,
            baseline,
            final_value,
            chance: t.chance,
            learned,
            drop_rel,
            drop_abs,
            verdict,
            pass: verdict == Verdict::Ok,
        }
    }
}

/// A metric's value in an evaluation record.
fn value(r: &EvalRecord, metric: &str) -> Option<f64> {
    r.metrics.get(metric).copied()
}

/// The verdict of every task (in `tasks` order) from the run's evaluation history;
/// `single_task` holds the baselines of the single-task reference run (by task) when the
/// verdict compares against it.
pub fn judge(
    tasks: &[TaskRef],
    history: &[EvalRecord],
    j: &Judging,
    single_task: Option<&BTreeMap<String, f64>>,
) -> anyhow::Result<Vec<TaskVerdict>> {
    tasks
        .iter()
        .map(|t| {
            let stage = t.stage;
            let of_stage: Vec<&EvalRecord> = history
                .iter()
                .filter(|r| r.task == t.task && r.stage == stage)
                .collect();
            let at_end = of_stage
                .iter()
                .max_by_key(|r| r.global_epoch)
                .and_then(|r| value(r, &t.metric));
            let baseline = match j.baseline {
                BaselineKind::StageEnd => at_end,
                BaselineKind::StageBest => of_stage
                    .iter()
                    .filter_map(|r| value(r, &t.metric))
                    .reduce(f64::max),
                BaselineKind::SingleTask => single_task.and_then(|m| m.get(&t.task).copied()),
            }
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "task '{}' has no '{}' at the end of stage {} (metric names: check [eval] metric)",
                    t.task,
                    t.metric,
                    stage + 1
                )
            })?;
            let final_value = history
                .iter()
                .filter(|r| r.task == t.task)
                .max_by_key(|r| r.global_epoch)
                .and_then(|r| value(r, &t.metric))
                .unwrap_or(baseline);
            Ok(TaskVerdict::new(t, stage + 1, baseline, final_value, j))
        })
        .collect()
}

/// Every task's verdict metric at the end of every stage (`None` before the task is first
/// learned, or when that stage's last epoch was not evaluated for it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Matrix {
    pub tasks: Vec<String>,
    pub metrics: Vec<String>,
    /// The task each stage trained.
    pub stages: Vec<String>,
    /// `values[t][k]`: task t after stage k.
    pub values: Vec<Vec<Option<f64>>>,
}

impl Matrix {
    /// The matrix from the history, for the stages that have ended (`stages_done`).
    pub fn from_history(
        tasks: &[TaskRef],
        stages: &[String],
        stages_done: usize,
        history: &[EvalRecord],
    ) -> Self {
        let stages_done = stages_done.min(stages.len());
        let values = tasks
            .iter()
            .map(|t| {
                (0..stages_done)
                    .map(|k| {
                        history
                            .iter()
                            .filter(|r| r.task == t.task && r.stage == k)
                            .max_by_key(|r| r.global_epoch)
                            .and_then(|r| value(r, &t.metric))
                    })
                    .collect()
            })
            .collect();
        Self {
            tasks: tasks.iter().map(|t| t.task.clone()).collect(),
            metrics: tasks.iter().map(|t| t.metric.clone()).collect(),
            stages: stages[..stages_done].to_vec(),
            values,
        }
    }

    /// `matrix.csv`: `task,metric,after_stage1,…`, empty cells for missing values.
    pub fn to_csv(&self) -> anyhow::Result<Vec<u8>> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let mut header = vec!["task".to_string(), "metric".to_string()];
        header.extend((1..=self.stages.len()).map(|k| format!("after_stage{k}")));
        w.write_record(&header)?;
        for ((t, m), row) in self.tasks.iter().zip(&self.metrics).zip(&self.values) {
            let mut rec = vec![t.clone(), m.clone()];
            rec.extend(
                row.iter()
                    .map(|v| v.map(|v| format!("{v:.6}")).unwrap_or_default()),
            );
            w.write_record(&rec)?;
        }
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Read what [`Matrix::to_csv`] wrote (`Ok(None)` when the file is absent or holds no
    /// value). The file does not name the stages' tasks: `stages` holds empty names.
    pub fn read_csv(path: &std::path::Path) -> anyhow::Result<Option<Self>> {
        use anyhow::Context;
        if !path.is_file() {
            return Ok(None);
        }
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .from_path(path)
            .with_context(|| format!("reading {}", path.display()))?;
        let header: Vec<String> = reader
            .headers()
            .with_context(|| format!("{}: cannot read the header", path.display()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let c_task = header
            .iter()
            .position(|h| h == "task")
            .with_context(|| format!("{}: no column `task`", path.display()))?;
        let c_metric = header.iter().position(|h| h == "metric");
        let stage_cols: Vec<usize> = header
            .iter()
            .enumerate()
            .filter(|(_, h)| {
                h.strip_prefix("after_stage")
                    .is_some_and(|k| k.parse::<usize>().is_ok())
            })
            .map(|(i, _)| i)
            .collect();
        let mut m = Matrix {
            tasks: vec![],
            metrics: vec![],
            stages: vec![String::new(); stage_cols.len()],
            values: vec![],
        };
        for rec in reader.records() {
            let Ok(rec) = rec else { continue };
            let Some(task) = rec.get(c_task).filter(|t| !t.is_empty()) else {
                continue;
            };
            m.tasks.push(task.to_string());
            m.metrics
                .push(c_metric.and_then(|c| rec.get(c)).unwrap_or("").to_string());
            let cell = |c: &usize| rec.get(*c).and_then(|v| v.trim().parse::<f64>().ok());
            m.values.push(stage_cols.iter().map(cell).collect());
        }
        Ok((!m.tasks.is_empty() && !m.stages.is_empty()).then_some(m))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ParamSummary {
    pub total: usize,
    pub backbone: usize,
    pub neck: usize,
    pub head: usize,
    /// Parameters the forward pass reads (the FPN's coarser output convolutions feed
    /// nothing; the original report's 1,605,602 counts them and an unused Linear(1, 10)).
    pub used_in_forward: usize,
}

/// `summary.json`: written by the engine at the end of a run, read back by the pictures,
/// `compare` and the sweeps as this same type (fields absent from an older or hand-made file
/// take their defaults; the tolerance the 5 % of the challenge).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSummary {
    pub name: String,
    pub run_dir: String,
    pub version: String,
    pub git_commit: String,
    pub seed: u64,
    pub device: String,
    pub tolerance: f64,
    pub tolerance_kind: ToleranceKind,
    pub baseline_kind: BaselineKind,
    /// The single-task reference run the baselines come from (`baseline_kind =
    /// "single_task"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_run: Option<String>,
    pub chance_margin: f64,
    pub tasks: Vec<TaskVerdict>,
    /// Every task learned and within tolerance.
    pub pass: bool,
    /// All final validation metrics, `<task>_<key>` → value.
    pub final_metrics: BTreeMap<String, f64>,
    pub matrix: Matrix,
    /// Final, best, forgetting and backward transfer per task and averaged, from `matrix`.
    pub forgetting: crate::metrics::forgetting::Forgetting,
    pub params: ParamSummary,
    /// Median batch-1 inference latency per image, milliseconds.
    pub latency_ms: f64,
    pub train_seconds: f64,
    /// Peak resident memory of the process that finished the run, MiB (Linux; a resumed
    /// run reports its last session only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    pub started_at: String,
    pub finished_at: String,
}

impl Default for RunSummary {
    fn default() -> Self {
        Self {
            name: String::new(),
            run_dir: String::new(),
            version: String::new(),
            git_commit: String::new(),
            seed: 0,
            device: String::new(),
            tolerance: 0.05,
            tolerance_kind: ToleranceKind::default(),
            baseline_kind: BaselineKind::default(),
            baseline_run: None,
            chance_margin: 0.05,
            tasks: vec![],
            pass: false,
            final_metrics: BTreeMap::new(),
            matrix: Matrix::default(),
            forgetting: Default::default(),
            params: ParamSummary::default(),
            latency_ms: 0.0,
            train_seconds: 0.0,
            peak_rss_mib: None,
            started_at: String::new(),
            finished_at: String::new(),
        }
    }
}

impl RunSummary {
    /// A fixed-width table for the terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let tol = match self.tolerance_kind {
            ToleranceKind::Relative => format!("{:.1}%", self.tolerance * 100.0),
            ToleranceKind::Absolute => format!("{:.3} points", self.tolerance),
        };
        let _ = writeln!(
            s,
            "{:<5} {:<9} {:>8} {:>9} {:>9} {:>8}  verdict (tolerance {tol}, baseline {})",
            "task",
            "metric",
            "chance",
            "baseline",
            "final",
            "drop",
            match self.baseline_kind {
                BaselineKind::StageEnd => "stage_end",
                BaselineKind::StageBest => "stage_best",
                BaselineKind::SingleTask => "single_task",
            }
        );
        for t in &self.tasks {
            let drop = match t.drop_rel {
                Some(d) => format!("{:.2}%", d * 100.0),
                None => "—".into(),
            };
            let _ = writeln!(
                s,
                "{:<5} {:<9} {:>8.4} {:>9.4} {:>9.4} {:>8}  {}",
                t.task,
                t.metric,
                t.chance,
                t.baseline,
                t.final_value,
                drop,
                t.verdict.label()
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
    fn a_summary_reads_back_as_the_type_that_wrote_it_and_partial_files_default() {
        let mut written = RunSummary {
            name: "replay".into(),
            seed: 3,
            pass: true,
            latency_ms: 4.5,
            ..RunSummary::default()
        };
        written.tasks.push(TaskVerdict {
            task: "seg".into(),
            metric: "miou".into(),
            stage: 1,
            baseline: 0.5,
            final_value: 0.49,
            verdict: Verdict::Ok,
            pass: true,
            ..TaskVerdict::default()
        });
        let text = serde_json::to_string(&written).unwrap();
        let back: RunSummary = serde_json::from_str(&text).unwrap();
        assert_eq!(back.tasks, written.tasks);
        assert_eq!(
            (back.name.as_str(), back.seed, back.pass),
            ("replay", 3, true)
        );
        // An older or hand-made file: what it lacks takes the defaults, unknown keys are
        // ignored.
        let partial: RunSummary = serde_json::from_str(
            r#"{"name": "x", "tasks": [{"task": "det", "verdict": "forgot"}], "future": 1}"#,
        )
        .unwrap();
        assert_eq!(partial.tolerance, 0.05);
        assert_eq!(partial.tasks[0].verdict, Verdict::Forgot);
        assert_eq!(partial.tasks[0].verdict.key(), "forgot");
        assert!(partial.matrix.tasks.is_empty());
    }

    fn judging(kind: ToleranceKind) -> Judging {
        Judging {
            tolerance: 0.05,
            tolerance_kind: kind,
            baseline: BaselineKind::StageEnd,
            chance_margin: 0.05,
        }
    }

    fn task(chance: f64) -> TaskRef {
        TaskRef {
            task: "seg".into(),
            metric: "miou".into(),
            chance,
            stage: 0,
        }
    }

    #[test]
    fn drop_is_relative_and_judged_against_tolerance() {
        let j = judging(ToleranceKind::Relative);
        let v = TaskVerdict::new(&task(0.0), 1, 0.5, 0.47, &j);
        assert!((v.drop_rel.unwrap() - 0.06).abs() < 1e-12);
        assert_eq!(v.verdict, Verdict::Forgot);
        let v = TaskVerdict::new(&task(0.0), 1, 0.5, 0.48, &j);
        assert!((v.drop_rel.unwrap() - 0.04).abs() < 1e-12);
        assert!(v.pass);
        // Exactly at the tolerance passes (≤ 5 %); improvement is a negative drop.
        assert!(TaskVerdict::new(&task(0.0), 1, 0.8, 0.76, &j).pass);
        assert!(
            TaskVerdict::new(&task(0.0), 1, 0.5, 0.6, &j)
                .drop_rel
                .unwrap()
                < 0.0
        );
        // Absolute points: 0.5 -> 0.46 is 0.04 points, within 0.05.
        let a = TaskVerdict::new(&task(0.0), 1, 0.5, 0.46, &judging(ToleranceKind::Absolute));
        assert!(a.pass);
    }

    #[test]
    fn a_task_at_chance_is_not_learned_and_fails_the_run() {
        let j = judging(ToleranceKind::Relative);
        // Top-1 0.10 on 10 classes: chance; no drop, yet not a pass.
        let v = TaskVerdict::new(&task(0.1), 3, 0.1, 0.1, &j);
        assert_eq!(v.verdict, Verdict::NotLearned);
        assert!(!v.pass && !v.learned);
        assert_eq!(v.drop_rel, None);
        // mAP 0 with chance 0: not learned either.
        assert_eq!(
            TaskVerdict::new(&task(0.0), 2, 0.0, 0.0, &j).verdict,
            Verdict::NotLearned
        );
        // 0.16 against chance 0.10 with margin 0.05: learned.
        assert!(TaskVerdict::new(&task(0.1), 3, 0.16, 0.16, &j).learned);
    }

    fn rec(stage: usize, g: usize, task: &str, v: f64) -> EvalRecord {
        let mut metrics = BTreeMap::new();
        metrics.insert("m".to_string(), v);
        EvalRecord {
            stage,
            epoch: g,
            global_epoch: g,
            task: task.into(),
            metrics,
        }
    }

    #[test]
    fn baselines_finals_and_matrix_from_history() {
        // Stage 1 (a): epochs 1-3; stage 2 (b): epochs 4-5, a still evaluated.
        let h = vec![
            rec(0, 1, "a", 0.3),
            rec(0, 2, "a", 0.6),
            rec(0, 3, "a", 0.5),
            rec(1, 4, "a", 0.4),
            rec(1, 4, "b", 0.2),
            rec(1, 5, "a", 0.45),
            rec(1, 5, "b", 0.7),
        ];
        let tasks = [
            TaskRef {
                task: "a".into(),
                metric: "m".into(),
                chance: 0.0,
                stage: 0,
            },
            TaskRef {
                task: "b".into(),
                metric: "m".into(),
                chance: 0.0,
                stage: 1,
            },
        ];
        let stages = ["a".to_string(), "b".to_string()];
        let mut j = judging(ToleranceKind::Relative);
        let v = judge(&tasks, &h, &j, None).unwrap();
        assert_eq!(
            (v[0].baseline, v[0].final_value, v[0].stage),
            (0.5, 0.45, 1)
        );
        assert_eq!((v[1].baseline, v[1].final_value, v[1].stage), (0.7, 0.7, 2));
        j.baseline = BaselineKind::StageBest;
        let v = judge(&tasks, &h, &j, None).unwrap();
        assert_eq!(v[0].baseline, 0.6);
        j.baseline = BaselineKind::SingleTask;
        let single: BTreeMap<String, f64> = [("a".to_string(), 0.8), ("b".to_string(), 0.7)].into();
        let v = judge(&tasks, &h, &j, Some(&single)).unwrap();
        assert_eq!(v[0].baseline, 0.8);
        assert!((v[0].drop_rel.unwrap() - (0.8 - 0.45) / 0.8).abs() < 1e-12);
        assert!(judge(&tasks, &h, &j, None).is_err(), "no single-task run");
        let m = Matrix::from_history(&tasks, &stages, 2, &h);
        assert_eq!(
            m.values,
            vec![vec![Some(0.5), Some(0.45)], vec![None, Some(0.7)]]
        );
        let csv = String::from_utf8(m.to_csv().unwrap()).unwrap();
        assert_eq!(
            csv,
            "task,metric,after_stage1,after_stage2\na,m,0.500000,0.450000\nb,m,,0.700000\n"
        );
    }
}
