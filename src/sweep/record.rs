//! What one run of a sweep left: its status (from its folder: `summary.json`, or the last
//! attempt in `log.txt`) and its results (from `summary.json`, read as untyped JSON, tolerant
//! of missing and extra fields). The index, the statistics and the Slurm collect all read runs
//! through these types.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::plan::{Manifest, PlannedRun};

/// Lines the sweep runner and the Slurm script write into a run's `log.txt` around each
/// attempt; the status of a run that has no `summary.json` is read from the last attempt.
pub const LOG_START: &str = "=== onehead sweep: start";
pub const LOG_EXIT: &str = "=== onehead sweep: exit";

/// Where a run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Finished: `summary.json` exists (whatever its verdict).
    Ok,
    /// Ended with an error; the reason is the run's last `error:` line.
    Failed(String),
    /// Stopped (Ctrl-C, a signal, exit code 3) or killed: re-running the sweep resumes it.
    Interrupted(String),
    /// Being run now (by this process, or on Slurm as `sweep --collect` learns from it).
    Running,
    /// Queued on Slurm (`--collect` asks `squeue`): the reason names the task.
    Pending(String),
    /// Never started.
    Missing,
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed(_) => "failed",
            Status::Interrupted(_) => "interrupted",
            Status::Running => "running",
            Status::Pending(_) => "pending",
            Status::Missing => "missing",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Status::Failed(r) | Status::Interrupted(r) | Status::Pending(r) => r,
            _ => "",
        }
    }
}

/// The verdict of one task, from `summary.json`'s `tasks[]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskResult {
    pub task: String,
    pub metric: String,
    pub baseline: Option<f64>,
    pub final_value: Option<f64>,
    pub drop_rel: Option<f64>,
    /// The drop's interval from the run's own bootstrap (tolerance units).
    pub drop_interval: Option<[f64; 2]>,
    pub chance: Option<f64>,
    /// The per-image score files (baseline, final) the run's interval came from.
    pub scores: Option<[PathBuf; 2]>,
    /// `within` | `forgot` | `undecided` | `not_learned` (older summaries: `ok`, or from
    /// their `pass` flag).
    pub verdict: Option<String>,
}

/// The results of a finished run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunResult {
    pub tasks: Vec<TaskResult>,
    pub pass: Option<bool>,
    pub train_seconds: Option<f64>,
    pub seed: Option<u64>,
    pub tolerance: Option<f64>,
    /// `relative` | `absolute`.
    pub tolerance_kind: Option<String>,
    pub confidence: Option<f64>,
}

impl RunResult {
    /// Read the fields of `summary.json` the index needs; anything missing stays `None`.
    pub fn from_summary(v: &Value) -> Self {
        let tasks = v["tasks"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| TaskResult {
                        task: t["task"].as_str().unwrap_or("?").to_string(),
                        metric: t["metric"].as_str().unwrap_or("metric").to_string(),
                        baseline: t["baseline"].as_f64(),
                        final_value: t["final_value"].as_f64(),
                        drop_rel: t["drop_rel"].as_f64(),
                        drop_interval: pair(&t["drop_interval"], Value::as_f64),
                        chance: t["chance"].as_f64(),
                        scores: pair(&t["scores"], |x| x.as_str().map(PathBuf::from)),
                        verdict: t["verdict"]
                            .as_str()
                            .map(|v| if v == "ok" { "within" } else { v }.to_string())
                            .or_else(|| {
                                t["pass"]
                                    .as_bool()
                                    .map(|p| if p { "within" } else { "forgot" }.to_string())
                            }),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            tasks,
            pass: v["pass"].as_bool(),
            train_seconds: v["train_seconds"].as_f64(),
            seed: v["seed"].as_u64(),
            tolerance: v["tolerance"].as_f64(),
            tolerance_kind: v["tolerance_kind"].as_str().map(String::from),
            confidence: v["confidence"].as_f64(),
        }
    }

    /// `every task within`, or each task's verdict (`seg within · det forgot · cls
    /// undecided`), in the words the console and the report use.
    pub fn verdict_words(&self) -> String {
        if self.pass == Some(true) {
            return "every task within".into();
        }
        self.tasks
            .iter()
            .map(|t| {
                let v = t.verdict.as_deref().unwrap_or("?").replace('_', " ");
                format!("{} {v}", t.task)
            })
            .collect::<Vec<_>>()
            .join(" · ")
    }

    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("summary.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Self::from_summary(&v))
    }
}

/// A two-element JSON array read with `f`.
fn pair<T>(v: &Value, f: impl Fn(&Value) -> Option<T>) -> Option<[T; 2]> {
    match v.as_array().map(|a| a.as_slice()) {
        Some([a, b]) => Some([f(a)?, f(b)?]),
        _ => None,
    }
}

/// One row of the index: the planned run, where it stands and (when finished) its results.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run: PlannedRun,
    pub status: Status,
    pub result: Option<RunResult>,
}

/// The status of a run from its folder alone (no process of ours runs it).
pub fn status_from_dir(run_dir: &Path) -> Status {
    if run_dir.join("summary.json").is_file() {
        return Status::Ok;
    }
    let has_state = run_dir.join("state").join("state.json").is_file();
    let log = std::fs::read_to_string(run_dir.join("log.txt")).unwrap_or_default();
    let Some(start) = log.rfind(LOG_START) else {
        return if has_state {
            Status::Interrupted("resumable (state saved)".into())
        } else {
            Status::Missing
        };
    };
    let attempt = &log[start..];
    let started = attempt
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches(LOG_START);
    let Some(exit_line) = attempt.lines().rev().find(|l| l.starts_with(LOG_EXIT)) else {
        return Status::Interrupted(format!(
            "started{} and no exit recorded: still running, or its process was killed",
            started.trim_end()
        ));
    };
    // `<code>[ (note)] at <time>`: keep the code and the note.
    let rest = exit_line.trim_start_matches(LOG_EXIT).trim();
    let rest = rest.rsplit_once(" at ").map_or(rest, |(r, _)| r);
    let code: Option<i32> = rest.split_whitespace().next().and_then(|c| c.parse().ok());
    let error_line = attempt
        .lines()
        .rev()
        .find(|l| l.starts_with("error:") || l.contains("panicked at"))
        .map(|l| {
            let l = l.trim_start_matches("error:").trim();
            if l.len() > 300 {
                let mut cut = 300;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{}…", &l[..cut])
            } else {
                l.to_string()
            }
        });
    let stopped = rest.contains("stopped");
    match code {
        Some(3) => Status::Interrupted("stopped (exit code 3), resumable".into()),
        _ if stopped => Status::Interrupted(format!("exit {rest}, resumable")),
        // SIGINT, SIGUSR1, SIGTERM: what schedulers and Ctrl-C send; the state of the last
        // completed epoch is on disk.
        Some(130 | 138 | 143) => Status::Interrupted(format!("killed by a signal (exit {rest})")),
        Some(0 | 1) => Status::Failed(format!("exit {rest} but no summary.json")),
        Some(c) => Status::Failed(error_line.unwrap_or_else(|| format!("exit code {c}"))),
        None => Status::Failed(error_line.unwrap_or_else(|| format!("exit {rest}"))),
    }
}

/// Records of every planned run, read from the run folders.
pub fn read_records(manifest: &Manifest) -> Vec<RunRecord> {
    manifest
        .runs
        .iter()
        .map(|run| record_from_dir(run.clone()))
        .collect()
}

/// The record of one run, read from its folder.
pub fn record_from_dir(run: PlannedRun) -> RunRecord {
    let mut status = status_from_dir(&run.run_dir);
    let result = if status == Status::Ok {
        match RunResult::read(&run.run_dir) {
            Ok(r) => Some(r),
            Err(e) => {
                status = Status::Failed(format!("{e:#}"));
                None
            }
        }
    } else {
        None
    };
    RunRecord {
        run,
        status,
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_read_tolerantly() {
        // Today's summary: per-task `pass` instead of `verdict`, no drop for nothing.
        let v = serde_json::json!({"tasks": [{"task": "seg", "metric": "miou",
            "baseline": 0.5, "final_value": 0.4, "drop_rel": 0.2, "pass": false}],
            "pass": false});
        let r = RunResult::from_summary(&v);
        assert_eq!(r.tasks[0].verdict.as_deref(), Some("forgot"));
        assert_eq!(r.train_seconds, None);
        // The redesigned one: a null drop for a task that was not learned.
        let v = serde_json::json!({"tasks": [{"task": "depth", "metric": "rmse",
            "baseline": 1.0, "final_value": 1.1, "drop_rel": null, "verdict": "not_learned"}]});
        let r = RunResult::from_summary(&v);
        assert_eq!(r.tasks[0].drop_rel, None);
        assert_eq!(r.tasks[0].verdict.as_deref(), Some("not_learned"));
        assert_eq!(
            RunResult::from_summary(&serde_json::json!(3)),
            RunResult::default()
        );
    }

    #[test]
    fn status_is_read_from_the_run_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(status_from_dir(d), Status::Missing);
        let log = |text: &str| std::fs::write(d.join("log.txt"), text).unwrap();
        log(&format!("{LOG_START} at t1\nstarting\n"));
        assert_eq!(status_from_dir(d).label(), "interrupted");
        log(&format!(
            "{LOG_START} at t1\nerror: data root /x not found\n{LOG_EXIT} 2 at t2\n"
        ));
        assert_eq!(
            status_from_dir(d),
            Status::Failed("data root /x not found".into())
        );
        // A later attempt decides.
        log(&format!(
            "{LOG_START} at t1\nerror: old\n{LOG_EXIT} 2 at t2\n{LOG_START} at t3\n{LOG_EXIT} 3 at t4\n"
        ));
        assert_eq!(status_from_dir(d).label(), "interrupted");
        log(&format!("{LOG_START} at t1\n{LOG_EXIT} 143 at t2\n"));
        assert_eq!(status_from_dir(d).label(), "interrupted");
        log(&format!(
            "{LOG_START} at t1\n{LOG_EXIT} 137 (stopped by the sweep) at t2\n"
        ));
        assert_eq!(status_from_dir(d).label(), "interrupted");
        log(&format!("{LOG_START} at t1\n{LOG_EXIT} 137 at t2\n"));
        assert_eq!(status_from_dir(d), Status::Failed("exit code 137".into()));
        std::fs::write(d.join("summary.json"), "{}").unwrap();
        assert_eq!(status_from_dir(d), Status::Ok);
    }
}
