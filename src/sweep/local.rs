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

/// Parallelism of a local sweep with `to_do` runs left: `(jobs, threads per job)`. With
/// GPUs, one run per GPU. By default as many runs at once as there are cores (and runs), the
/// cores shared out among them: on the 2-core machine of the README, two 1-thread runs side
/// by side finish 1.5× the runs per hour of one 2-thread run (README "Sweeps at scale"; the
/// likely reason, not measured apart: a run's one-threaded parts and the hand-offs between
/// threads of its small layers leave a core idle that the other run fills). `jobs × threads
/// > cores` is refused unless `--threads` was given on purpose.
pub fn thread_budget(
    jobs: Option<usize>,
    threads: Option<usize>,
    gpus: &[String],
    cores: usize,
    to_do: usize,
) -> Result<(usize, usize)> {
    if threads == Some(0) {
        anyhow::bail!("--threads 0: each run needs at least one thread");
    }
    let jobs = match (jobs, gpus.len()) {
        (Some(0), _) => anyhow::bail!("--jobs 0: run at least one job"),
        (Some(j), 0) => j,
        (None, 0) => (cores / threads.unwrap_or(1)).min(to_do).max(1),
        (None, g) => g,
        (Some(j), g) if j == g => j,
        (Some(j), g) => anyhow::bail!(
            "--jobs {j} with --gpus listing {g} GPUs: a sweep runs one run per GPU (drop --jobs, or list {j} GPUs)"
        ),
    };
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
    progress: super::progress::RunProgress,
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
fn lock_sweep(sweep_dir: &Path) -> Result<crate::files::FolderLock> {
    crate::files::lock_folder(sweep_dir, "sweep folder")
}

/// Run every unfinished run of the sweep in `manifest`, `opts.jobs` at a time.
pub fn run_local(manifest: &Manifest, opts: &LocalOptions) -> Result<SweepOutcome> {
    let sweep_dir = &manifest.sweep_dir;
    let _lock = lock_sweep(sweep_dir)?;
    install_stop_handler();
    let records = index::read_records(manifest);
    let total = records.len();
    let skipped = records.iter().filter(|r| r.status == Status::Ok).count();
    index::write_run_list(sweep_dir, &records)?;
    let pb = progress_bar(manifest, total, skipped, opts.quiet);
    let mut pool = Pool {
        queue: (0..total)
            .filter(|&i| records[i].status != Status::Ok)
            .collect(),
        records,
        running: Vec::new(),
        free_slots: (0..opts.jobs).rev().collect(),
        failed: 0,
        forwarded: false,
        killed: false,
        pb,
        quiet: opts.quiet,
    };
    if skipped > 0 {
        pool.say(format!(
            "{skipped} of {total} runs already finished: skipped"
        ));
    }
    loop {
        let stops = STOPS.load(Ordering::SeqCst);
        pool.forward_stops(stops);
        if stops == 0 {
            pool.start_runs(opts);
        }
        if pool.reap()? {
            // index.csv only: the summary and the differences wait for the end (below).
            index::write_run_list(sweep_dir, &pool.records)?;
        }
        pool.follow();
        if pool.running.is_empty() && (pool.queue.is_empty() || STOPS.load(Ordering::SeqCst) > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pool.pb.finish_and_clear();
    let records = pool.records;
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

/// The sweep's bar on stderr (hidden with `--quiet`).
fn progress_bar(manifest: &Manifest, total: usize, skipped: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} runs · {msg} ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(format!("sweep {}", manifest.name));
    pb.set_position(skipped as u64);
    pb
}

/// The runs of a local sweep: waiting, running (each in a slot), and what became of them.
struct Pool {
    records: Vec<RunRecord>,
    queue: std::collections::VecDeque<usize>,
    running: Vec<Running>,
    free_slots: Vec<usize>,
    failed: usize,
    /// Ctrl-C was forwarded to the runs / they were killed.
    forwarded: bool,
    killed: bool,
    pb: ProgressBar,
    quiet: bool,
}

impl Pool {
    fn say(&self, msg: String) {
        if !self.quiet {
            self.pb.suspend(|| eprintln!("{msg}"));
        }
    }

    /// Where the running runs are: the bar's message on a terminal; piped, a line per
    /// finished epoch (nothing with `--quiet`).
    fn follow(&mut self) {
        let piped = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut lines = Vec::new();
        let mut parts = Vec::new();
        for r in &mut self.running {
            let name = &self.records[r.record].run.name;
            if r.progress.update() && piped {
                lines.push(format!("· {name}: {}", r.progress.describe()));
            }
            parts.push(format!("{name} {}", r.progress.describe()));
        }
        for l in lines {
            self.say(l);
        }
        let failed = if self.failed > 0 {
            format!(" · failed {}", self.failed)
        } else {
            String::new()
        };
        self.pb
            .set_message(format!("{}{failed}", parts.join(" · ")));
    }

    /// First Ctrl-C: forwarded, the runs save their state; second: they are killed.
    fn forward_stops(&mut self, stops: usize) {
        if stops >= 1 && !self.forwarded {
            self.forwarded = true;
            self.say(format!(
                "stopping: Ctrl-C forwarded to {} run(s); they save their state and exit (Ctrl-C again to kill them now)",
                self.running.len()
            ));
            for r in &self.running {
                send_signal(&r.child, libc::SIGINT);
            }
        }
        if stops >= 2 && !self.killed {
            self.killed = true;
            self.say("killing the runs now".into());
            for r in &self.running {
                send_signal(&r.child, libc::SIGKILL);
            }
        }
    }

    /// Start waiting runs while slots are free.
    fn start_runs(&mut self, opts: &LocalOptions) {
        while !self.free_slots.is_empty() && !self.queue.is_empty() {
            let i = self.queue.pop_front().expect("checked non-empty");
            let slot = self.free_slots.pop().expect("checked non-empty");
            let gpu = opts.gpus.get(slot).map(String::as_str);
            match spawn(&self.records[i], opts, gpu) {
                Ok(child) => {
                    self.records[i].status = Status::Running;
                    let run = &self.records[i].run;
                    self.running.push(Running {
                        slot,
                        record: i,
                        child,
                        started: Instant::now(),
                        progress: super::progress::RunProgress::new(&run.run_dir, &run.config),
                    });
                }
                Err(e) => {
                    self.free_slots.push(slot);
                    self.records[i].status = Status::Failed(format!("{e:#}"));
                    self.failed += 1;
                    self.pb.inc(1);
                    self.say(format!("✗ {}: {e:#}", self.records[i].run.name));
                }
            }
        }
    }

    /// Collect the runs that ended; whether any did.
    fn reap(&mut self) -> Result<bool> {
        let mut changed = false;
        let mut k = 0;
        while k < self.running.len() {
            let done = self.running[k]
                .child
                .try_wait()
                .context("waiting for a sweep run")?;
            let Some(status) = done else {
                k += 1;
                continue;
            };
            let r = self.running.swap_remove(k);
            self.free_slots.push(r.slot);
            self.ended(r, exit_code(status));
            changed = true;
        }
        Ok(changed)
    }

    /// Log a run's exit in its folder, read back what it left, and say so.
    fn ended(&mut self, r: Running, code: i32) {
        let i = r.record;
        let run = self.records[i].run.clone();
        let note = if self.forwarded && code != 0 && code != 1 && code != 3 {
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
        self.records[i] = index::record_from_dir(run);
        let rec = &self.records[i];
        let secs = r.started.elapsed().as_secs_f64();
        let line = match &rec.status {
            Status::Ok => {
                self.pb.inc(1);
                let verdict = rec
                    .result
                    .as_ref()
                    .map(index::RunResult::verdict_words)
                    .unwrap_or_else(|| "finished".into());
                format!("✓ {} finished: {verdict} ({secs:.0} s)", rec.run.name)
            }
            Status::Failed(reason) => {
                self.failed += 1;
                self.pb.inc(1);
                format!(
                    "✗ {} failed: {reason} (log: {})",
                    rec.run.name,
                    rec.run.run_dir.join("log.txt").display()
                )
            }
            other => format!("· {} {}: {}", rec.run.name, other.label(), other.reason()),
        };
        self.say(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_budget_splits_cores_and_refuses_oversubscription() {
        // By default one run per core, as far as there are runs; the cores shared out.
        assert_eq!(thread_budget(None, None, &[], 8, 1).unwrap(), (1, 8));
        assert_eq!(thread_budget(None, None, &[], 8, 3).unwrap(), (3, 2));
        assert_eq!(thread_budget(None, None, &[], 8, 20).unwrap(), (8, 1));
        assert_eq!(thread_budget(None, None, &[], 2, 54).unwrap(), (2, 1));
        assert_eq!(thread_budget(None, None, &[], 2, 0).unwrap(), (1, 2));
        assert_eq!(thread_budget(None, Some(2), &[], 8, 20).unwrap(), (4, 2));
        assert_eq!(thread_budget(None, Some(16), &[], 8, 20).unwrap(), (1, 16));
        assert_eq!(thread_budget(Some(2), None, &[], 8, 20).unwrap(), (2, 4));
        assert_eq!(thread_budget(Some(3), None, &[], 8, 20).unwrap(), (3, 2));
        assert_eq!(thread_budget(Some(2), None, &[], 2, 20).unwrap(), (2, 1));
        let msg = thread_budget(Some(3), None, &[], 2, 20)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--threads 1"), "{msg}");
        // Explicit threads: the user's call, even beyond the cores.
        assert_eq!(thread_budget(Some(3), Some(2), &[], 2, 20).unwrap(), (3, 2));
        // One run per GPU.
        let gpus = vec!["0".to_string(), "1".to_string()];
        assert_eq!(thread_budget(None, None, &gpus, 16, 20).unwrap(), (2, 8));
        assert!(thread_budget(Some(4), None, &gpus, 16, 20).is_err());
        assert!(thread_budget(Some(0), None, &[], 2, 20).is_err());
        assert!(thread_budget(None, Some(0), &[], 2, 20).is_err());
    }

    #[test]
    fn one_sweep_at_a_time_per_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock_sweep(tmp.path()).unwrap();
        let msg = match lock_sweep(tmp.path()) {
            Ok(_) => panic!("a second sweep got the folder"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains("sweep folder") && msg.contains("in use"),
            "{msg}"
        );
        drop(first);
        lock_sweep(tmp.path()).unwrap();
    }
}
