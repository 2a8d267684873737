//! Running a sweep on one machine: up to `jobs` runs at once, each a child process
//! `onehead run <config> --run-dir <dir> --quiet` with its own thread budget (or its own GPU),
//! its output in `<run dir>/log.txt`, one progress bar over the runs, and Ctrl-C forwarded to
//! the children (a second Ctrl-C kills them). Finished runs are skipped; interrupted ones
//! resume (the child does that itself, from `--run-dir`).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::index::{self, RunRecord, Status, LOG_EXIT, LOG_START};
use super::plan::Manifest;
use crate::report;

/// How to run a sweep locally.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Runs at once.
    pub jobs: usize,
    /// `RAYON_NUM_THREADS` of each child.
    pub threads: usize,
    /// One GPU per child (`CUDA_VISIBLE_DEVICES`); empty: CPU only.
    pub gpus: Vec<String>,
    /// No progress bar, no per-run lines.
    pub quiet: bool,
    /// The `onehead` binary the children run.
    pub exe: PathBuf,
}

/// Parallelism of a local sweep: `(jobs, threads per job)`. With GPUs, one run per GPU.
/// Threads default to `max(1, cores / jobs)`; `jobs × threads > cores` is refused unless
/// `--threads` was given on purpose.
pub fn thread_budget(
    jobs: Option<usize>,
    threads: Option<usize>,
    gpus: &[String],
    cores: usize,
) -> Result<(usize, usize)> {
    let jobs = match (jobs, gpus.len()) {
        (Some(0), _) => anyhow::bail!("--jobs 0: run at least one job"),
        (Some(j), 0) => j,
        (None, 0) => 1,
        (None, g) => g,
        (Some(j), g) if j == g => j,
        (Some(j), g) => anyhow::bail!(
            "--jobs {j} with --gpus listing {g} GPUs: a sweep runs one run per GPU (drop --jobs, or list {j} GPUs)"
        ),
    };
    if threads == Some(0) {
        anyhow::bail!("--threads 0: each run needs at least one thread");
    }
    let per = threads.unwrap_or((cores / jobs).max(1));
    if threads.is_none() && jobs * per > cores {
        anyhow::bail!(
            "--jobs {jobs} × 1 thread exceeds the {cores} cores of this machine: lower --jobs, or pass --threads 1 to oversubscribe on purpose"
        );
    }
    Ok((jobs, per))
}

/// How a sweep ended.
#[derive(Debug)]
pub struct SweepOutcome {
    pub records: Vec<RunRecord>,
    pub aggregates: Vec<index::Aggregate>,
    /// Stopped by Ctrl-C / SIGTERM before every run was done.
    pub interrupted: bool,
    /// Runs found finished at the start.
    pub skipped: usize,
}

/// Ctrl-C / SIGTERM count, set by the handler installed by [`install_stop_handler`].
static STOPS: AtomicUsize = AtomicUsize::new(0);

/// Count Ctrl-C and SIGTERM instead of dying: the runner forwards them to its children.
fn install_stop_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Err(e) = ctrlc::set_handler(|| {
            STOPS.fetch_add(1, Ordering::SeqCst);
        }) {
            tracing::warn!("cannot catch Ctrl-C ({e}): it will kill the sweep at once");
        }
    });
}

struct Running {
    slot: usize,
    /// Index into the records.
    record: usize,
    child: Child,
    started: Instant,
}

fn send_signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) with the pid of a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Append a marker line to a run's log (best effort: the log is for people and `--collect`).
fn log_line(run_dir: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("log.txt"))
    {
        let _ = writeln!(f, "{line}");
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Start run `i` as a child process writing into its `log.txt`.
fn spawn(rec: &RunRecord, opts: &LocalOptions, gpu: Option<&str>) -> Result<Child> {
    let run = &rec.run;
    std::fs::create_dir_all(&run.run_dir)
        .with_context(|| format!("creating {}", run.run_dir.display()))?;
    log_line(
        &run.run_dir,
        &format!(
            "{LOG_START} at {} on {} (sweep pid {}, {} thread(s){})",
            report::utc_rfc3339(report::now_secs()),
            hostname(),
            std::process::id(),
            opts.threads,
            gpu.map(|g| format!(", GPU {g}")).unwrap_or_default()
        ),
    );
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.run_dir.join("log.txt"))
        .with_context(|| format!("opening {}", run.run_dir.join("log.txt").display()))?;
    let mut cmd = Command::new(&opts.exe);
    cmd.arg("run")
        .arg(&run.config)
        .arg("--run-dir")
        .arg(&run.run_dir)
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RAYON_NUM_THREADS", opts.threads.to_string())
        // `tune_cpu_runtime` keeps candle's own pool at 1 thread (faster under load); keep
        // whatever this process has, capped by the child's budget.
        .env(
            "CANDLE_NUM_THREADS",
            std::env::var("CANDLE_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(opts.threads)
                .min(opts.threads)
                .max(1)
                .to_string(),
        )
        // Its own process group: a terminal's Ctrl-C reaches only the sweep, which forwards
        // it (so that the sweep can wait for its children and write the index).
        .process_group(0);
    if let Some(g) = gpu {
        cmd.env("CUDA_VISIBLE_DEVICES", g);
    }
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to send SIGTERM to the child
    // if this process dies without stopping it (no orphaned training runs).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", opts.exe.display()))
}

/// Shell-style exit code: the code, or 128 + the signal that killed the process.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// An exclusive lock on `<sweep>/.lock` for as long as the file stays open: two sweeps
/// running the same runs at once would write into the same run folders.
fn lock_sweep(sweep_dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = sweep_dir.join(".lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "another onehead sweep is running in {} (it holds {}): wait for it, or stop it first",
            sweep_dir.display(),
            path.display()
        );
    }
    Ok(f)
}

/// Run every unfinished run of the sweep in `manifest`, `opts.jobs` at a time.
pub fn run_local(manifest: &Manifest, opts: &LocalOptions) -> Result<SweepOutcome> {
    let sweep_dir = &manifest.sweep_dir;
    let _lock = lock_sweep(sweep_dir)?;
    install_stop_handler();
    let mut records = index::read_records(manifest);
    let total = records.len();
    let skipped = records.iter().filter(|r| r.status == Status::Ok).count();
    let mut queue: std::collections::VecDeque<usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status != Status::Ok)
        .map(|(i, _)| i)
        .collect();
    index::write_index(sweep_dir, &records)?;

    let pb = if opts.quiet {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} runs · {msg} ({elapsed})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb.set_prefix(format!("sweep {}", manifest.name));
        pb.set_position(skipped as u64);
        pb
    };
    let say = |msg: String| {
        if !opts.quiet {
            pb.suspend(|| eprintln!("{msg}"));
        }
    };
    if skipped > 0 {
        say(format!(
            "{skipped} of {total} runs already finished: skipped"
        ));
    }
    let mut running: Vec<Running> = Vec::new();
    let mut free_slots: Vec<usize> = (0..opts.jobs).rev().collect();
    let mut failed = 0usize;
    let (mut forwarded, mut killed) = (false, false);
    loop {
        let stops = STOPS.load(Ordering::SeqCst);
        if stops >= 1 && !forwarded {
            forwarded = true;
            say(format!(
                "stopping: Ctrl-C forwarded to {} run(s); they save their state and exit (Ctrl-C again to kill them now)",
                running.len()
            ));
            for r in &running {
                send_signal(&r.child, libc::SIGINT);
            }
        }
        if stops >= 2 && !killed {
            killed = true;
            say("killing the runs now".into());
            for r in &running {
                send_signal(&r.child, libc::SIGKILL);
            }
        }
        while stops == 0 && !free_slots.is_empty() && !queue.is_empty() {
            let i = queue.pop_front().expect("checked non-empty");
            let slot = free_slots.pop().expect("checked non-empty");
            let gpu = opts.gpus.get(slot).map(String::as_str);
            match spawn(&records[i], opts, gpu) {
                Ok(child) => {
                    records[i].status = Status::Running;
                    running.push(Running {
                        slot,
                        record: i,
                        child,
                        started: Instant::now(),
                    });
                }
                Err(e) => {
                    free_slots.push(slot);
                    records[i].status = Status::Failed(format!("{e:#}"));
                    failed += 1;
                    pb.inc(1);
                    say(format!("✗ {}: {e:#}", records[i].run.name));
                }
            }
        }
        // Reap finished children.
        let mut changed = false;
        let mut k = 0;
        while k < running.len() {
            let done = running[k]
                .child
                .try_wait()
                .context("waiting for a sweep run")?;
            let Some(status) = done else {
                k += 1;
                continue;
            };
            let r = running.swap_remove(k);
            let i = r.record;
            free_slots.push(r.slot);
            let run = records[i].run.clone();
            let code = exit_code(status);
            let note = if forwarded && code != 0 && code != 1 && code != 3 {
                " (stopped by the sweep)"
            } else {
                ""
            };
            log_line(
                &run.run_dir,
                &format!(
                    "{LOG_EXIT} {code}{note} at {}",
                    report::utc_rfc3339(report::now_secs())
                ),
            );
            records[i] = index::record_from_dir(run);
            let rec = &records[i];
            let secs = r.started.elapsed().as_secs_f64();
            match &rec.status {
                Status::Ok => {
                    pb.inc(1);
                    let verdict = match rec.result.as_ref().and_then(|x| x.pass) {
                        Some(true) => "pass",
                        Some(false) => "FAIL (forgot)",
                        None => "finished",
                    };
                    say(format!("✓ {} {verdict} ({secs:.0} s)", rec.run.name));
                }
                Status::Failed(reason) => {
                    failed += 1;
                    pb.inc(1);
                    say(format!(
                        "✗ {} failed: {reason} (log: {})",
                        rec.run.name,
                        rec.run.run_dir.join("log.txt").display()
                    ));
                }
                other => say(format!(
                    "· {} {}: {}",
                    rec.run.name,
                    other.label(),
                    other.reason()
                )),
            }
            changed = true;
        }
        pb.set_message(format!("running {} · failed {failed}", running.len()));
        if changed {
            index::write_index(sweep_dir, &records)?;
        }
        if running.is_empty() && (queue.is_empty() || STOPS.load(Ordering::SeqCst) > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pb.finish_and_clear();
    // Runs neither finished nor failed: stopped by Ctrl-C (or a signal from elsewhere).
    let interrupted = records
        .iter()
        .any(|r| !matches!(r.status, Status::Ok | Status::Failed(_)));
    let aggregates = index::write_index(sweep_dir, &records)?;
    Ok(SweepOutcome {
        records,
        aggregates,
        interrupted,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_budget_splits_cores_and_refuses_oversubscription() {
        assert_eq!(thread_budget(None, None, &[], 8).unwrap(), (1, 8));
        assert_eq!(thread_budget(Some(2), None, &[], 8).unwrap(), (2, 4));
        assert_eq!(thread_budget(Some(3), None, &[], 8).unwrap(), (3, 2));
        assert_eq!(thread_budget(Some(2), None, &[], 2).unwrap(), (2, 1));
        let msg = thread_budget(Some(3), None, &[], 2)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--threads 1"), "{msg}");
        // Explicit threads: the user's call, even beyond the cores.
        assert_eq!(thread_budget(Some(3), Some(2), &[], 2).unwrap(), (3, 2));
        // One run per GPU.
        let gpus = vec!["0".to_string(), "1".to_string()];
        assert_eq!(thread_budget(None, None, &gpus, 16).unwrap(), (2, 8));
        assert!(thread_budget(Some(4), None, &gpus, 16).is_err());
        assert!(thread_budget(Some(0), None, &[], 2).is_err());
        assert!(thread_budget(None, Some(0), &[], 2).is_err());
    }

    #[test]
    fn one_sweep_at_a_time_per_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock_sweep(tmp.path()).unwrap();
        let msg = lock_sweep(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("another onehead sweep is running"), "{msg}");
        drop(first);
        lock_sweep(tmp.path()).unwrap();
    }
}
