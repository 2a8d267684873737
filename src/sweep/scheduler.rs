//! What Slurm says about a sweep's job array, for `sweep --collect`: a run folder alone
//! cannot tell a task that is running from one whose node died, nor a queued task from one
//! that never will run. `squeue` knows the live tasks, `sacct` how the ended ones ended;
//! either may be missing (no accounting storage, or not on a Slurm host), and then the
//! folders are all there is.
//!
//! The array's task id is the run's index (`sweep.sbatch` has one `case` line per index), and
//! `slurm/jobs.txt` lists every submitted array, oldest first: a later submission covers the
//! runs that were unfinished when it was made, so its word wins.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use super::record::{RunRecord, Status};

/// Where Slurm has a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Queued (including requeued and held tasks).
    Pending,
    /// Allocated and running (or completing, suspended).
    Running,
    /// Ended with Slurm's state word: `COMPLETED`, `FAILED`, `TIMEOUT`, `CANCELLED`, …
    Ended(String),
}

/// A task's state and the Slurm id that names it (`<array job>_<task>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub state: TaskState,
    pub id: String,
}

fn classify(state: &str) -> TaskState {
    // sacct writes "CANCELLED by 1000"; squeue long names; both upper case.
    let word = state.split_whitespace().next().unwrap_or("").to_uppercase();
    match word.as_str() {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" | "RESIZING" => {
            TaskState::Pending
        }
        "RUNNING" | "COMPLETING" | "CONFIGURING" | "STAGE_OUT" | "SUSPENDED" | "SIGNALING"
        | "STOPPED" => TaskState::Running,
        _ => TaskState::Ended(word),
    }
}

/// Task ids of `jobid` when it belongs to array `job`: `123_4` → [4]; a pending range
/// `123_[5-7,9%2]` → [5, 6, 7, 9]; anything else (the array's own line, steps) → none.
fn task_ids(jobid: &str, job: &str) -> Vec<usize> {
    let Some(rest) = jobid.strip_prefix(job).and_then(|r| r.strip_prefix('_')) else {
        return Vec::new();
    };
    if let Ok(i) = rest.parse() {
        return vec![i];
    }
    let Some(inner) = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return Vec::new();
    };
    let inner = inner.split('%').next().unwrap_or("");
    let mut out = Vec::new();
    for part in inner.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b.min(a + 1_000_000));
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

/// Parse `JOBID|STATE` lines (`squeue -h -r -o %i|%T`, `sacct -n -P -X -o JobID,State`) of
/// array `job` into task states; later lines win.
pub fn parse_states(text: &str, job: &str, into: &mut HashMap<usize, TaskInfo>) {
    for line in text.lines() {
        let Some((jobid, state)) = line.trim().split_once('|') else {
            continue;
        };
        for i in task_ids(jobid.trim(), job) {
            into.insert(
                i,
                TaskInfo {
                    state: classify(state),
                    id: format!("{job}_{i}"),
                },
            );
        }
    }
}

/// The array job ids submitted for the sweep, oldest first (`slurm/jobs.txt`).
pub fn submitted_jobs(sweep_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(sweep_dir.join("slurm/jobs.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(String::from)
        .collect()
}

/// The commands to ask (`squeue`, `sacct` on PATH unless told otherwise: tests pass fakes).
#[derive(Debug, Clone)]
pub struct Tools {
    pub squeue: String,
    pub sacct: String,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            squeue: "squeue".into(),
            sacct: "sacct".into(),
        }
    }
}

/// What Slurm says, and what could not be asked.
#[derive(Debug, Default)]
pub struct Report {
    pub tasks: HashMap<usize, TaskInfo>,
    /// Tools that were missing or failed, with why, for the collect message.
    pub unavailable: Vec<String>,
}

fn ask(cmd: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "{cmd} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("{cmd} not found")),
        Err(e) => Err(format!("{cmd}: {e}")),
    }
}

/// Ask `sacct` (ended and live tasks) then `squeue` (live tasks: its word wins, accounting
/// lags) about every array of the sweep. Nothing submitted → an empty report.
pub fn query(sweep_dir: &Path, tools: &Tools) -> Report {
    let jobs = submitted_jobs(sweep_dir);
    let mut report = Report::default();
    if jobs.is_empty() {
        return report;
    }
    let list = jobs.join(",");
    let sacct = ask(
        &tools.sacct,
        &["-n", "-P", "-X", "-o", "JobID,State", "-j", &list],
    );
    // squeue refuses ids it no longer knows ("Invalid job id specified") when every array
    // has left the queue: that is an answer (nothing live), not a missing tool.
    let squeue = ask(&tools.squeue, &["-h", "-r", "-o", "%i|%T", "-j", &list]);
    for job in &jobs {
        if let Ok(text) = &sacct {
            parse_states(text, job, &mut report.tasks);
        }
        if let Ok(text) = &squeue {
            parse_states(text, job, &mut report.tasks);
        }
    }
    for r in [&sacct, &squeue] {
        if let Err(e) = r {
            if !e.contains("Invalid job id") {
                report.unavailable.push(e.clone());
            }
        }
    }
    report
}

/// A run's status from its folder and Slurm's word on its task. A finished run (summary
/// written) or one whose folder records how its process ended keeps the folder's status;
/// Slurm decides for live tasks and for tasks whose process was killed without a trace.
pub fn combine(folder: Status, task: Option<&TaskInfo>) -> Status {
    let Some(task) = task else { return folder };
    let killed = matches!(&folder, Status::Interrupted(r) if r.contains("no exit recorded"));
    let silent = killed || folder == Status::Missing;
    match (&task.state, &folder) {
        (_, Status::Ok) => folder,
        (TaskState::Running, _) => Status::Running,
        (TaskState::Pending, _) => Status::Pending(format!("queued as {}", task.id)),
        (TaskState::Ended(w), _) if !silent || w == "COMPLETED" => folder,
        (TaskState::Ended(w), _) => {
            let resumable = if killed {
                "; its last saved epoch resumes when the sweep is submitted again"
            } else {
                ""
            };
            let why = format!("Slurm: {} {w}{resumable}", task.id);
            match w.as_str() {
                "TIMEOUT" | "CANCELLED" | "PREEMPTED" | "DEADLINE" => Status::Interrupted(why),
                _ => Status::Failed(format!("{why} (its output: slurm/{}.out)", task.id)),
            }
        }
    }
}

/// Apply `report` to the records (by run index).
pub fn apply(records: &mut [RunRecord], report: &Report) {
    for r in records {
        let status = std::mem::replace(&mut r.status, Status::Missing);
        r.status = combine(status, report.tasks.get(&r.run.index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_cover_single_tasks_and_pending_ranges() {
        assert_eq!(task_ids("123_4", "123"), vec![4]);
        assert_eq!(task_ids("123_[5-7,9%2]", "123"), vec![5, 6, 7, 9]);
        assert_eq!(task_ids("123_[0]", "123"), vec![0]);
        assert!(task_ids("123", "123").is_empty());
        assert!(task_ids("1234_4", "123").is_empty());
        assert!(task_ids("123_4.batch", "123").is_empty());
    }

    #[test]
    fn later_lines_and_arrays_win() {
        let mut m = HashMap::new();
        let sacct = "123_0|COMPLETED\n123_1|CANCELLED by 1000\n123_[2-3]|PENDING\n123|RUNNING\n";
        parse_states(sacct, "123", &mut m);
        parse_states("123_1|RUNNING\n", "123", &mut m);
        assert_eq!(m[&0].state, TaskState::Ended("COMPLETED".into()));
        assert_eq!(m[&1].state, TaskState::Running);
        assert_eq!(m[&3].state, TaskState::Pending);
        assert_eq!(m[&3].id, "123_3");
        assert_eq!(m.len(), 4);
        // A resubmission (job 130) covers task 3 again.
        parse_states("130_3|OUT_OF_MEMORY\n", "130", &mut m);
        assert_eq!(m[&3].state, TaskState::Ended("OUT_OF_MEMORY".into()));
        assert_eq!(m[&3].id, "130_3");
    }

    fn info(state: TaskState) -> TaskInfo {
        TaskInfo {
            state,
            id: "7_2".into(),
        }
    }

    #[test]
    fn slurm_decides_only_where_the_folder_cannot() {
        let killed = || Status::Interrupted("started at x and no exit recorded: …".into());
        let ended = |w: &str| info(TaskState::Ended(w.into()));
        assert_eq!(combine(Status::Ok, Some(&ended("FAILED"))), Status::Ok);
        assert_eq!(
            combine(killed(), Some(&info(TaskState::Running))),
            Status::Running
        );
        assert_eq!(
            combine(Status::Missing, Some(&info(TaskState::Pending))),
            Status::Pending("queued as 7_2".into())
        );
        let oom = combine(killed(), Some(&ended("OUT_OF_MEMORY")));
        assert!(
            matches!(&oom, Status::Failed(r) if r.contains("7_2 OUT_OF_MEMORY") && r.contains("resumes")),
            "{oom:?}"
        );
        assert!(matches!(
            combine(killed(), Some(&ended("TIMEOUT"))),
            Status::Interrupted(r) if r.contains("TIMEOUT")
        ));
        assert_eq!(
            combine(Status::Missing, Some(&ended("NODE_FAIL"))).label(),
            "failed"
        );
        // The folder recorded the exit: it knows more than Slurm's word.
        let stopped = Status::Interrupted("stopped (exit code 3), resumable".into());
        assert_eq!(combine(stopped.clone(), Some(&ended("FAILED"))), stopped);
        // No word from Slurm: the folder's status stands.
        assert_eq!(combine(killed(), None), killed());
    }

    #[test]
    fn fake_tools_are_asked_about_every_submitted_array() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("slurm")).unwrap();
        std::fs::write(
            dir.path().join("slurm/jobs.txt"),
            "41 2026-01-01T00:00:00Z array=0-3\n42 2026-01-02T00:00:00Z array=2-3\n",
        )
        .unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p.display().to_string()
        };
        let tools = Tools {
            sacct: script(
                "sacct",
                "printf '41_0|COMPLETED\\n41_1|FAILED\\n41_2|CANCELLED by 0\\n41_3|TIMEOUT\\n42_2|RUNNING\\n42_[3]|PENDING\\n'",
            ),
            squeue: script("squeue", "printf '42_2|RUNNING\\n42_3|PENDING\\n'"),
        };
        let report = query(dir.path(), &tools);
        assert!(report.unavailable.is_empty(), "{:?}", report.unavailable);
        assert_eq!(report.tasks[&1].state, TaskState::Ended("FAILED".into()));
        assert_eq!(report.tasks[&2].state, TaskState::Running);
        assert_eq!(report.tasks[&3].id, "42_3");
        assert_eq!(report.tasks[&3].state, TaskState::Pending);
        let missing = Tools {
            sacct: dir.path().join("nope").display().to_string(),
            squeue: dir.path().join("nope2").display().to_string(),
        };
        let report = query(dir.path(), &missing);
        assert!(report.tasks.is_empty());
        assert_eq!(report.unavailable.len(), 2, "{:?}", report.unavailable);
    }
}
