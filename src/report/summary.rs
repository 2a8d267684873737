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

use super::fmt::fmt_drop;
use super::EvalRecord;
use crate::config::{BaselineKind, ToleranceKind};
use crate::metrics::bootstrap::DropInterval;

/// The outcome for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Learned, and the interval's worst end of the drop is within tolerance (without an
    /// interval: the drop itself).
    #[serde(alias = "ok")]
    Within,
    /// Learned, and even the interval's best end of the drop is beyond the tolerance.
    Forgot,
    /// Learned, and the interval straddles the tolerance: the images cannot tell.
    Undecided,
    /// The baseline is not significantly above chance: there was nothing to keep.
    #[default]
    NotLearned,
}

impl Verdict {
    /// The verdict in words, the same in every output (console, CSV, HTML).
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Within => "within",
            Verdict::Forgot => "forgot",
            Verdict::Undecided => "undecided",
            Verdict::NotLearned => "not learned",
        }
    }

    /// The three-way verdict of a learned task from its drop interval (tolerance units):
    /// within when the worst end is within `tolerance`, forgot when even the best end is
    /// beyond it, undecided when it straddles.
    pub fn from_interval(learned: bool, [lo, hi]: [f64; 2], tolerance: f64) -> Self {
        if !learned {
            Verdict::NotLearned
        } else if hi <= tolerance + 1e-12 {
            Verdict::Within
        } else if lo > tolerance + 1e-12 {
            Verdict::Forgot
        } else {
            Verdict::Undecided
        }
    }

    /// The verdict as written in `summary.json` (`within`, `forgot`, `undecided`,
    /// `not_learned`).
    pub fn key(self) -> &'static str {
        match self {
            Verdict::Within => "within",
            Verdict::Forgot => "forgot",
            Verdict::Undecided => "undecided",
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
    /// The metric's chance level on the verdict's split.
    pub chance: f64,
    /// The baseline is above chance: by the one-sided bootstrap test when there is one
    /// (`p_chance ≤ 1 − confidence`), else by `chance_margin` points.
    pub learned: bool,
    /// `(baseline − final) / baseline`; `None` when the task was not learned (a percentage
    /// of a baseline near zero means nothing). Negative: the task improved.
    pub drop_rel: Option<f64>,
    /// `baseline − final` in metric points.
    pub drop_abs: f64,
    /// The interval of the drop in the tolerance's units (relative, or points), from the
    /// paired bootstrap over the evaluated images; `None` without per-image scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_interval: Option<[f64; 2]>,
    /// Share of bootstrap resamples whose baseline is not above chance (one-sided test).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_chance: Option<f64>,
    /// The run's own value at the end of the task's stage: `(stage_end − final) / stage_end`
    /// is how much it forgot since it learned (a different question than the verdict's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage_end: Option<f64>,
    /// The per-image scores the interval was resampled from: the baseline's (the
    /// reference's, or this run's at its stage end) and the final's; a sweep pools them
    /// over seeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<[String; 2]>,
    pub verdict: Verdict,
    /// `verdict == within`.
    pub pass: bool,
}

/// How the verdict is judged (from `[eval]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judging {
    pub tolerance: f64,
    pub tolerance_kind: ToleranceKind,
    pub baseline: BaselineKind,
    pub chance_margin: f64,
    pub confidence: f64,
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
    /// Judge a task from its baseline and final value alone (no interval): learned when
    /// the baseline is `chance_margin` above chance, within when the drop is.
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
            Verdict::Within
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
            drop_interval: None,
            p_chance: None,
            stage_end: None,
            scores: None,
            verdict,
            pass: verdict == Verdict::Within,
        }
    }

    /// The verdict from the paired bootstrap `b` instead of the point values: learned when
    /// the baseline is above chance in all but `1 − confidence` of the resamples; within
    /// when the interval's worst end of the drop is within tolerance, forgot when its best
    /// end is beyond it, undecided when it straddles.
    pub fn with_interval(mut self, b: &DropInterval, j: &Judging) -> Self {
        let (lo, hi) = match j.tolerance_kind {
            ToleranceKind::Relative => b.rel,
            ToleranceKind::Absolute => b.abs,
        };
        self.learned = b.p_not_above_chance <= 1.0 - j.confidence + 1e-12 && self.baseline > 0.0;
        self.p_chance = Some(b.p_not_above_chance);
        self.drop_rel =
            (self.learned && self.baseline > 0.0).then(|| self.drop_abs / self.baseline);
        self.drop_interval = Some([lo, hi]);
        self.verdict = Verdict::from_interval(self.learned, [lo, hi], j.tolerance);
        self.pass = self.verdict == Verdict::Within;
        self
    }

    /// `(stage_end − final) / stage_end`: forgetting since the task was learned.
    pub fn drop_since_learned(&self) -> Option<f64> {
        self.stage_end
            .filter(|s| *s > 0.0)
            .map(|s| (s - self.final_value) / s)
    }
}

/// A metric's value in an evaluation record.
fn value(r: &EvalRecord, metric: &str) -> Option<f64> {
    r.metrics.get(metric).copied()
}

/// The verdict of every task (in `tasks` order), from its point values: `val` is the run's
/// evaluation history on val (for `stage_best`), `verdict` its evaluations on the verdict's
/// split at every stage end (test when the data has one, else val), `reference` the
/// single-task reference's summary when the baseline is single-task. Intervals are added by
/// the caller ([`TaskVerdict::with_interval`]), which holds the per-image scores.
pub fn judge(
    tasks: &[TaskRef],
    val: &[EvalRecord],
    verdict: &[EvalRecord],
    j: &Judging,
    reference: Option<&RunSummary>,
) -> anyhow::Result<Vec<TaskVerdict>> {
    tasks
        .iter()
        .map(|t| {
            let stage = t.stage;
            let last_of = |h: &[EvalRecord], stage: Option<usize>| {
                h.iter()
                    .filter(|r| r.task == t.task && stage.is_none_or(|s| r.stage == s))
                    .max_by_key(|r| r.global_epoch)
                    .and_then(|r| value(r, &t.metric))
            };
            let stage_end = last_of(verdict, Some(stage));
            let baseline = match j.baseline {
                BaselineKind::StageEnd => stage_end,
                BaselineKind::StageBest => val
                    .iter()
                    .filter(|r| r.task == t.task && r.stage == stage)
                    .filter_map(|r| value(r, &t.metric))
                    .reduce(f64::max),
                BaselineKind::SingleTask => reference.and_then(|r| {
                    r.final_metrics
                        .get(&format!("{}_{}", t.task, t.metric))
                        .copied()
                }),
            }
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "task '{}' has no '{}' baseline (stage {}; metric names: check [eval] metric)",
                    t.task,
                    t.metric,
                    stage + 1
                )
            })?;
            // stage_best is chosen on val, so it is judged on val throughout.
            let final_value = match j.baseline {
                BaselineKind::StageBest => last_of(val, None),
                _ => last_of(verdict, None),
            }
            .unwrap_or(baseline);
            let mut v = TaskVerdict::new(t, stage + 1, baseline, final_value, j);
            v.stage_end = stage_end;
            Ok(v)
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
                    .map(|v| v.map(|v| format!("{v}")).unwrap_or_default()),
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
    /// The split the verdict and the matrix are measured on: `test` (held out, never used
    /// for training or choices) when the data has one, else `val`.
    pub verdict_split: String,
    /// Coverage of the drop intervals and of the "learned" test, and the bootstrap
    /// resamples behind them (0: point verdicts).
    pub confidence: f64,
    pub resamples: usize,
    pub tasks: Vec<TaskVerdict>,
    /// Every task learned and within tolerance (the interval's worst end, when there is one).
    pub pass: bool,
    /// Every task's final metrics on the verdict's split, `<task>_<key>` → value (in a
    /// single-task run: each task at the end of its own stage).
    pub final_metrics: BTreeMap<String, f64>,
    pub matrix: Matrix,
    /// Final, best, forgetting and backward transfer per task and averaged, from `matrix`.
    pub forgetting: crate::metrics::forgetting::Forgetting,
    pub params: ParamSummary,
    /// Each rehearsal strategy's buffer at the end of the run (images and stored outputs).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub buffers: BTreeMap<String, crate::plugins::BufferMemory>,
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
            verdict_split: "val".into(),
            confidence: 0.95,
            resamples: 0,
            tasks: vec![],
            pass: false,
            final_metrics: BTreeMap::new(),
            matrix: Matrix::default(),
            forgetting: Default::default(),
            params: ParamSummary::default(),
            buffers: BTreeMap::new(),
            latency_ms: 0.0,
            train_seconds: 0.0,
            peak_rss_mib: None,
            started_at: String::new(),
            finished_at: String::new(),
        }
    }
}

impl RunSummary {
    /// A fixed-width table for the terminal: each task's change from its baseline with its
    /// interval (negative: a drop), the change since its own stage ended, and the verdict.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rel = self.tolerance_kind == ToleranceKind::Relative;
        let tol = if rel {
            format!("{:.1}%", self.tolerance * 100.0)
        } else {
            format!("{:.3} points", self.tolerance)
        };
        let _ = writeln!(
            s,
            "{:<5} {:<8} {:>7} {:>8} {:>8} {:>8} {:>17} {:>9}  verdict",
            "task", "metric", "chance", "baseline", "final", "change", "interval", "since own"
        );
        for t in &self.tasks {
            let change = if rel {
                fmt_drop(t.drop_rel)
            } else {
                format!("{:+.3}", -t.drop_abs)
            };
            let interval = match t.drop_interval {
                Some([lo, hi]) if rel => {
                    format!("[{}, {}]", fmt_drop(Some(hi)), fmt_drop(Some(lo)))
                }
                Some([lo, hi]) => format!("[{:+.3}, {:+.3}]", -hi, -lo),
                None => "—".into(),
            };
            let _ = writeln!(
                s,
                "{:<5} {:<8} {:>7.4} {:>8.4} {:>8.4} {:>8} {:>17} {:>9}  {}",
                t.task,
                t.metric,
                t.chance,
                t.baseline,
                t.final_value,
                change,
                interval,
                fmt_drop(t.drop_since_learned()),
                t.verdict.label()
            );
        }
        let intervals = if self.resamples > 0 {
            format!(
                "{:.0}% paired bootstrap intervals over the {} images ({} resamples)",
                self.confidence * 100.0,
                self.verdict_split,
                self.resamples
            )
        } else {
            "no intervals".into()
        };
        let _ = writeln!(
            s,
            "baseline {} · measured on {} · tolerance {tol} · {intervals}",
            self.baseline_kind.label(),
            self.verdict_split,
        );
        let _ = writeln!(
            s,
            "overall: {}   params {} · {:.2} ms/image · trained {:.0} s",
            if self.pass {
                "PASS (every task within)"
            } else {
                "FAIL"
            },
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
            verdict: Verdict::Within,
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
            confidence: 0.95,
        }
    }

    fn interval(rel: (f64, f64), p_chance: f64) -> DropInterval {
        DropInterval {
            baseline: 0.5,
            final_value: 0.5 * (1.0 - (rel.0 + rel.1) / 2.0),
            drop_rel: (rel.0 + rel.1) / 2.0,
            rel,
            drop_abs: 0.5 * (rel.0 + rel.1) / 2.0,
            abs: (0.5 * rel.0, 0.5 * rel.1),
            baseline_lo: 0.4,
            p_not_above_chance: p_chance,
        }
    }

    #[test]
    fn the_interval_decides_within_forgot_undecided_and_not_learned() {
        let j = judging(ToleranceKind::Relative);
        let point = TaskVerdict::new(&task(0.0), 1, 0.5, 0.49, &j);
        assert_eq!(point.verdict, Verdict::Within);
        // Worst end within 5 %: within.
        let v = point
            .clone()
            .with_interval(&interval((-0.03, 0.049), 0.0), &j);
        assert_eq!((v.verdict, v.pass), (Verdict::Within, true));
        assert_eq!(v.drop_interval, Some([-0.03, 0.049]));
        // Straddles 5 %: undecided, and the run cannot pass on it.
        let v = point
            .clone()
            .with_interval(&interval((0.01, 0.09), 0.0), &j);
        assert_eq!((v.verdict, v.pass), (Verdict::Undecided, false));
        // Even the best end beyond 5 %: forgot.
        let v = point.clone().with_interval(&interval((0.06, 0.2), 0.0), &j);
        assert_eq!(v.verdict, Verdict::Forgot);
        // A baseline above chance in only 90 % of the resamples is not learned at 95 %.
        let v = point.clone().with_interval(&interval((0.0, 0.0), 0.1), &j);
        assert_eq!(
            (v.verdict, v.learned, v.drop_rel),
            (Verdict::NotLearned, false, None)
        );
        // Absolute tolerance reads the interval in points.
        let a = judging(ToleranceKind::Absolute);
        let v = point.with_interval(&interval((0.0, 0.08), 0.0), &a);
        assert_eq!(v.drop_interval, Some([0.0, 0.04]));
        assert_eq!(v.verdict, Verdict::Within);
        // Old summaries said `ok`.
        let old: TaskVerdict = serde_json::from_str(r#"{"verdict": "ok"}"#).unwrap();
        assert_eq!(old.verdict, Verdict::Within);
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
        assert_eq!(v.verdict, Verdict::Within);
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
        let v = judge(&tasks, &h, &h, &j, None).unwrap();
        assert_eq!(
            (v[0].baseline, v[0].final_value, v[0].stage),
            (0.5, 0.45, 1)
        );
        assert_eq!(v[0].stage_end, Some(0.5));
        assert_eq!((v[1].baseline, v[1].final_value, v[1].stage), (0.7, 0.7, 2));
        j.baseline = BaselineKind::StageBest;
        let v = judge(&tasks, &h, &h, &j, None).unwrap();
        assert_eq!(v[0].baseline, 0.6);
        j.baseline = BaselineKind::SingleTask;
        let single = RunSummary {
            final_metrics: [("a_m".to_string(), 0.8), ("b_m".to_string(), 0.7)].into(),
            ..RunSummary::default()
        };
        let v = judge(&tasks, &h, &h, &j, Some(&single)).unwrap();
        assert_eq!(v[0].baseline, 0.8);
        assert!((v[0].drop_rel.unwrap() - (0.8 - 0.45) / 0.8).abs() < 1e-12);
        // The last task is judged too: its final against the single-task value.
        assert_eq!((v[1].baseline, v[1].final_value), (0.7, 0.7));
        assert!(
            judge(&tasks, &h, &h, &j, None).is_err(),
            "no single-task run"
        );
        // The verdict's split (here a made-up test history) gives the finals and baselines;
        // val only stage_best's choice.
        let test: Vec<EvalRecord> = h
            .iter()
            .cloned()
            .map(|mut r| {
                r.metrics.insert("m".into(), r.metrics["m"] - 0.1);
                r
            })
            .collect();
        j.baseline = BaselineKind::StageEnd;
        let v = judge(&tasks, &h, &test, &j, None).unwrap();
        assert!((v[0].baseline - 0.4).abs() < 1e-12 && (v[0].final_value - 0.35).abs() < 1e-12);
        let m = Matrix::from_history(&tasks, &stages, 2, &h);
        assert_eq!(
            m.values,
            vec![vec![Some(0.5), Some(0.45)], vec![None, Some(0.7)]]
        );
        let csv = String::from_utf8(m.to_csv().unwrap()).unwrap();
        assert_eq!(
            csv,
            "task,metric,after_stage1,after_stage2\na,m,0.5,0.45\nb,m,,0.7\n"
        );
    }
}
