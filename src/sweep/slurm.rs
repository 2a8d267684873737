//! Handing a sweep to Slurm: one `sbatch` job-array script whose task `i` runs run `i` of the
//! manifest (`onehead run <config_i> --run-dir <run_dir_i>`). The run folder makes every task
//! resume-safe: a requeued or restarted task continues from the run's last completed epoch,
//! and a task whose run already finished is a no-op. Before the time limit Slurm signals the
//! batch shell (`--signal=B:USR1@<s>`); the script forwards the signal to `onehead`, which
//! stops with its state saved, and requeues the task.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::index::{LOG_EXIT, LOG_START};
use super::plan::Manifest;
use crate::report;

/// `#SBATCH` settings of the job array.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    /// Time limit per task, Slurm syntax (`4:00:00`, `1-00:00:00`).
    pub time: Option<String>,
    /// GPUs per task (`--gres=gpu:N`).
    pub gpus_per_task: Option<u32>,
    pub cpus_per_task: usize,
    /// Memory per task, Slurm syntax (`16G`).
    pub mem: Option<String>,
    /// At most this many tasks at once (`--array=…%K`).
    pub array_parallelism: Option<usize>,
    /// Seconds before the time limit at which Slurm signals the task to stop and requeue.
    pub signal_seconds: u32,
    /// Extra `#SBATCH` lines, e.g. `--account=abc`, `--qos=long`.
    pub extra: Vec<String>,
    /// Shell lines run before onehead in every task (`module load …`, environment); kept in
    /// `slurm/setup.sh`, so that regenerating the script without them keeps them.
    pub setup: Vec<String>,
    /// Also submit a job that collects the index after the array (`--dependency=afterany`).
    pub collect_after: bool,
}

impl Default for SlurmOptions {
    fn default() -> Self {
        Self {
            partition: None,
            time: None,
            gpus_per_task: None,
            cpus_per_task: 2,
            mem: None,
            array_parallelism: None,
            signal_seconds: 120,
            extra: vec![],
            setup: vec![],
            collect_after: false,
        }
    }
}

impl SlurmOptions {
    /// Values go verbatim into `#SBATCH` lines: refuse what would break the script.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("--partition", self.partition.as_deref()),
            ("--time", self.time.as_deref()),
            ("--mem", self.mem.as_deref()),
        ];
        for (flag, v) in fields {
            if let Some(v) = v {
                if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    anyhow::bail!("{flag} '{v}': expected one word without spaces");
                }
            }
        }
        for e in &self.extra {
            if !e.starts_with("--") || e.chars().any(|c| c.is_control()) {
                anyhow::bail!(
                    "--sbatch-arg '{e}': expected one sbatch option such as --account=abc"
                );
            }
        }
        if self.cpus_per_task == 0 {
            anyhow::bail!("--cpus-per-task 0: each task needs at least one CPU");
        }
        if self.array_parallelism == Some(0) {
            anyhow::bail!("--array-parallelism 0: allow at least one task at a time");
        }
        Ok(())
    }
}

/// `0-3,5,7-9` from sorted indices, plus `%K`.
pub fn array_spec(indices: &[usize], parallelism: Option<usize>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        let mut end = start;
        while i + 1 < indices.len() && indices[i + 1] == end + 1 {
            i += 1;
            end = indices[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    let mut s = parts.join(",");
    if let Some(k) = parallelism {
        let _ = write!(s, "%{k}");
    }
    s
}

/// Single-quote for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn path_str(p: &Path) -> String {
    shell_quote(&p.display().to_string())
}

/// The `#SBATCH` lines of the job array.
fn sbatch_lines(manifest: &Manifest, indices: &[usize], opts: &SlurmOptions) -> String {
    let dir = &manifest.sweep_dir;
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/bash");
    let _ = writeln!(
        s,
        "#SBATCH --job-name=onehead-{}",
        manifest.name.replace('/', "-")
    );
    let _ = writeln!(
        s,
        "#SBATCH --array={}",
        array_spec(indices, opts.array_parallelism)
    );
    let _ = writeln!(s, "#SBATCH --output={}/slurm/%A_%a.out", dir.display());
    let _ = writeln!(s, "#SBATCH --open-mode=append");
    let _ = writeln!(s, "#SBATCH --chdir={}", manifest.cwd.display());
    let _ = writeln!(s, "#SBATCH --ntasks=1");
    let _ = writeln!(s, "#SBATCH --cpus-per-task={}", opts.cpus_per_task);
    let _ = writeln!(s, "#SBATCH --requeue");
    let _ = writeln!(s, "#SBATCH --signal=B:USR1@{}", opts.signal_seconds);
    if let Some(p) = &opts.partition {
        let _ = writeln!(s, "#SBATCH --partition={p}");
    }
    if let Some(t) = &opts.time {
        let _ = writeln!(s, "#SBATCH --time={t}");
    }
    if let Some(g) = opts.gpus_per_task {
        let _ = writeln!(s, "#SBATCH --gres=gpu:{g}");
    }
    if let Some(m) = &opts.mem {
        let _ = writeln!(s, "#SBATCH --mem={m}");
    }
    for e in &opts.extra {
        let _ = writeln!(s, "#SBATCH {e}");
    }
    s
}

/// The job-array script for the runs `indices` (the unfinished ones) of the sweep.
pub fn script(manifest: &Manifest, indices: &[usize], exe: &Path, opts: &SlurmOptions) -> String {
    let dir = &manifest.sweep_dir;
    let mut s = sbatch_lines(manifest, indices, opts);
    let _ = write!(
        s,
        r#"#
# onehead sweep '{name}': {n} runs, generated {at} by onehead {version}.
# Task i runs run i of {manifest} (resume-safe: it continues an interrupted run from its
# last completed epoch; a finished run is a no-op). Regenerate and resubmit with the same
# `onehead sweep … --slurm` command; collect with `onehead sweep --collect {dir}`.
set -u
ONEHEAD={exe}
case "${{SLURM_ARRAY_TASK_ID:?run this script with sbatch}}" in
"#,
        name = manifest.name,
        n = manifest.runs.len(),
        at = report::utc_rfc3339(report::now_secs()),
        version = env!("CARGO_PKG_VERSION"),
        manifest = Manifest::path(dir).display(),
        dir = dir.display(),
        exe = path_str(exe),
    );
    for r in &manifest.runs {
        let _ = writeln!(
            s,
            "  {}) CONFIG={} RUN_DIR={} ;;",
            r.index,
            path_str(&r.config),
            path_str(&r.run_dir)
        );
    }
    let setup = if opts.setup.is_empty() {
        String::new()
    } else {
        format!(
            "# Set-up lines (--setup; kept in slurm/setup.sh):\n{}\n",
            opts.setup.join("\n")
        )
    };
    let _ = write!(
        s,
        r#"  *) echo "onehead sweep: no run $SLURM_ARRAY_TASK_ID in this sweep" >&2; exit 2 ;;
esac
{setup}mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/log.txt"
TASK="${{SLURM_ARRAY_JOB_ID:-?}}_${{SLURM_ARRAY_TASK_ID}}"
export RAYON_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-1}}"

# Slurm's signal before the time limit (USR1): stop onehead (TERM: it finishes the current
# step and saves its state) and requeue the task, which then resumes the run. TERM / INT
# (scancel, preemption, Ctrl-C of srun): stop onehead the same way, without requeueing
# (Slurm requeues preempted jobs itself).
child=""
stop=""
on_signal() {{
  stop="$1"
  sig=TERM
  if [ "$1" = INT ]; then sig=INT; fi
  echo "onehead sweep: task $TASK got SIG$1: stopping the run (its state is saved)" >&2
  if [ -n "$child" ]; then kill -"$sig" "$child" 2>/dev/null; fi
}}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

echo "{start} at $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) (slurm task $TASK, job ${{SLURM_JOB_ID:-?}}, restart ${{SLURM_RESTART_COUNT:-0}})" >>"$LOG"
"$ONEHEAD" run "$CONFIG" --run-dir "$RUN_DIR" --quiet >>"$LOG" 2>&1 &
child=$!
# `wait` returns early when a trapped signal arrives: wait again until onehead has exited.
while :; do
  wait "$child"
  rc=$?
  if ! kill -0 "$child" 2>/dev/null; then break; fi
done
note=""
if [ -n "$stop" ]; then note=" (stopped by SIG$stop)"; fi
echo "{exit} $rc$note at $(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$LOG"
echo "onehead sweep: task $TASK run $RUN_DIR exited $rc$note" >&2

# Exit codes of onehead run: 0 every task within tolerance, 1 some task forgot (both are
# finished runs), 2 an error, 3 stopped with its state saved (resumable).
if [ -f "$RUN_DIR/summary.json" ]; then exit 0; fi
if [ "$stop" = USR1 ] || {{ [ -z "$stop" ] && [ "$rc" = 3 ]; }}; then
  # This task only: for the task whose job id is the array's own, `$SLURM_JOB_ID` names
  # the whole array (every task, finished or running, would be requeued).
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}" && exit 0
  echo "onehead sweep: requeue failed: run the same onehead sweep --slurm command again to continue" >&2
  exit 3
fi
if [ -n "$stop" ]; then exit 3; fi
tail -n 5 "$LOG" >&2
if [ "$rc" = 0 ]; then exit 2; fi
exit "$rc"
"#,
        start = LOG_START,
        exit = LOG_EXIT,
        setup = setup,
    );
    s
}

/// What `--slurm` did.
#[derive(Debug, Clone)]
pub struct SlurmSubmission {
    pub script: PathBuf,
    /// The runs the array covers (the unfinished ones).
    pub indices: Vec<usize>,
    /// The `sbatch` command line.
    pub command: String,
    /// The job id when submitted.
    pub job_id: Option<String>,
    /// The collect job's id (`--collect-after`).
    pub collect_job: Option<String>,
}

/// A copy of `exe` in `<sweep>/bin/onehead` for the array to run: a rebuild while the
/// array waits in the queue must not change what its later tasks run. Replaced atomically
/// (running tasks keep the file they started); left alone when it is already `exe`'s bytes.
fn pin_binary(sweep_dir: &Path, exe: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let pinned = sweep_dir.join("bin").join("onehead");
    let bytes = std::fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    if std::fs::read(&pinned).is_ok_and(|b| b == bytes) {
        return Ok(pinned);
    }
    std::fs::create_dir_all(pinned.parent().context("bin/ has a parent")?)?;
    let tmp = pinned.with_extension("partial");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &pinned).with_context(|| format!("renaming to {}", pinned.display()))?;
    Ok(pinned)
}

/// Write `sweep.sbatch` for the unfinished runs and submit it (unless `dry_run`).
pub fn prepare_and_submit(
    manifest: &Manifest,
    unfinished: &[usize],
    exe: &Path,
    opts: &SlurmOptions,
    dry_run: bool,
) -> Result<SlurmSubmission> {
    opts.validate()?;
    let dir = &manifest.sweep_dir;
    std::fs::create_dir_all(dir.join("slurm"))
        .with_context(|| format!("creating {}", dir.join("slurm").display()))?;
    let path = dir.join("sweep.sbatch");
    let mut sub = SlurmSubmission {
        command: format!("sbatch --parsable {}", path_str(&path)),
        script: path.clone(),
        indices: unfinished.to_vec(),
        job_id: None,
        collect_job: None,
    };
    if unfinished.is_empty() {
        return Ok(sub);
    }
    let pinned = pin_binary(dir, exe)?;
    let opts = &with_setup(dir, opts)?;
    report::write_atomic(
        &path,
        script(manifest, unfinished, &pinned, opts).as_bytes(),
    )?;
    if dry_run {
        return Ok(sub);
    }
    let out = Command::new("sbatch").arg("--parsable").arg(&path).output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "sbatch not found on PATH: the script is written; submit it on a Slurm login node with `{}` (or pass --dry-run to only write it)",
            sub.command
        ),
        Err(e) => return Err(e).context("running sbatch"),
    };
    if !out.status.success() {
        anyhow::bail!(
            "`{}` failed ({}): {}",
            sub.command,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    let mut jobs = std::fs::read_to_string(dir.join("slurm/jobs.txt")).unwrap_or_default();
    let _ = writeln!(
        jobs,
        "{id} {} array={}",
        report::utc_rfc3339(report::now_secs()),
        array_spec(unfinished, opts.array_parallelism)
    );
    report::write_atomic(&dir.join("slurm/jobs.txt"), jobs.as_bytes())?;
    if opts.collect_after {
        let collect = collect_command(dir, &pinned, &id);
        let out = Command::new("sh").arg("-c").arg(&collect).output()?;
        anyhow::ensure!(
            out.status.success(),
            "`{collect}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        sub.collect_job = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    sub.job_id = Some(id);
    Ok(sub)
}

/// `opts` with the set-up lines: given ones are kept in `slurm/setup.sh` (replacing earlier
/// ones), none given reads them back from there.
fn with_setup(sweep_dir: &Path, opts: &SlurmOptions) -> Result<SlurmOptions> {
    let file = sweep_dir.join("slurm/setup.sh");
    let mut opts = opts.clone();
    if opts.setup.is_empty() {
        if let Ok(text) = std::fs::read_to_string(&file) {
            opts.setup = text.lines().map(String::from).collect();
        }
    } else {
        report::write_atomic(&file, format!("{}\n", opts.setup.join("\n")).as_bytes())?;
    }
    Ok(opts)
}

/// The `sbatch` line of the job that collects the sweep once array `job` has ended, however
/// its tasks ended (`afterany`).
pub fn collect_command(sweep_dir: &Path, exe: &Path, job: &str) -> String {
    format!(
        "sbatch --parsable --dependency=afterany:{job} --job-name=onehead-collect --output={} --wrap={}",
        path_str(&sweep_dir.join("slurm/collect-%j.out")),
        path_str(Path::new(&format!(
            "{} sweep --collect {}",
            path_str(exe),
            path_str(sweep_dir)
        )))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::plan::{PlannedRun, MANIFEST_FORMAT};

    fn manifest(n: usize) -> Manifest {
        let dir = PathBuf::from("/shared/results/study");
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            name: "study".into(),
            sweep_dir: dir.clone(),
            cwd: "/shared/project".into(),
            created_at: "t".into(),
            grid: vec![],
            overrides: vec![],
            runs: (0..n)
                .map(|i| PlannedRun {
                    index: i,
                    name: format!("x__seed-{i}"),
                    experiment: "x".into(),
                    config_name: "x".into(),
                    file: "x.toml".into(),
                    overrides: vec![],
                    varied: vec![("seed".into(), i.to_string())],
                    seed: i as u64,
                    config: dir.join(format!("configs/{i}-x__seed-{i}.toml")),
                    run_dir: dir.join(format!("runs/x__seed-{i}")),
                })
                .collect(),
        }
    }

    #[test]
    fn array_ranges_are_compressed() {
        assert_eq!(array_spec(&[0, 1, 2, 3], Some(2)), "0-3%2");
        assert_eq!(array_spec(&[0, 2, 3, 4, 7], None), "0,2-4,7");
        assert_eq!(array_spec(&[5], None), "5");
        assert_eq!(shell_quote("a'b c"), r#"'a'\''b c'"#);
    }

    #[test]
    fn the_script_runs_task_i_resumably_with_requeue_and_signal() {
        let m = manifest(4);
        let opts = SlurmOptions {
            partition: Some("gpu".into()),
            time: Some("4:00:00".into()),
            gpus_per_task: Some(1),
            cpus_per_task: 8,
            mem: Some("16G".into()),
            array_parallelism: Some(2),
            signal_seconds: 120,
            extra: vec!["--account=abc".into()],
            ..SlurmOptions::default()
        };
        opts.validate().unwrap();
        let s = script(
            &m,
            &[0, 1, 2, 3],
            Path::new("/opt/onehead/bin/onehead"),
            &opts,
        );
        for line in [
            "#!/bin/bash",
            "#SBATCH --array=0-3%2",
            "#SBATCH --requeue",
            "#SBATCH --signal=B:USR1@120",
            "#SBATCH --output=/shared/results/study/slurm/%A_%a.out",
            "#SBATCH --chdir=/shared/project",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --partition=gpu",
            "#SBATCH --time=4:00:00",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --mem=16G",
            "#SBATCH --account=abc",
            "ONEHEAD='/opt/onehead/bin/onehead'",
            "  2) CONFIG='/shared/results/study/configs/2-x__seed-2.toml' RUN_DIR='/shared/results/study/runs/x__seed-2' ;;",
            r#""$ONEHEAD" run "$CONFIG" --run-dir "$RUN_DIR" --quiet >>"$LOG" 2>&1 &"#,
            "trap 'on_signal USR1' USR1",
            r#"  if [ -n "$child" ]; then kill -"$sig" "$child" 2>/dev/null; fi"#,
            r#"  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" && exit 0"#,
            r#"export RAYON_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}""#,
        ] {
            assert!(s.lines().any(|l| l == line), "missing line {line:?} in\n{s}");
        }
        // All #SBATCH lines come before the first command (sbatch stops reading at it).
        let first_cmd = s.lines().position(|l| l.starts_with("set -u")).unwrap();
        assert!(s.lines().skip(first_cmd).all(|l| !l.starts_with("#SBATCH")));
        // The markers the index reads back from log.txt.
        assert!(s.contains(LOG_START) && s.contains(LOG_EXIT));
        // Without options: no partition/time/gres lines, the default signal and CPUs.
        let s = script(
            &m,
            &[1, 3],
            Path::new("/x/onehead"),
            &SlurmOptions::default(),
        );
        assert!(s.contains("#SBATCH --array=1,3\n"));
        assert!(s.contains("#SBATCH --cpus-per-task=2\n"));
        assert!(!s.contains("--partition") && !s.contains("--gres") && !s.contains("--time"));
    }

    #[test]
    fn the_script_is_valid_bash() {
        let s = script(
            &manifest(3),
            &[0, 1, 2],
            Path::new("/x/it's"),
            &SlurmOptions::default(),
        );
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("s.sbatch");
        std::fs::write(&p, s).unwrap();
        let out = Command::new("bash").arg("-n").arg(&p).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn bad_options_are_refused() {
        let bad = SlurmOptions {
            partition: Some("a b".into()),
            ..SlurmOptions::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--partition"));
        let bad = SlurmOptions {
            extra: vec!["account=x".into()],
            ..SlurmOptions::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--sbatch-arg"));
    }

    #[test]
    fn dry_run_writes_the_script_without_sbatch() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = manifest(2);
        m.sweep_dir = tmp.path().to_path_buf();
        let exe = tmp.path().join("built/onehead");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, b"#!/bin/sh\necho v1\n").unwrap();
        let sub = prepare_and_submit(&m, &[0, 1], &exe, &SlurmOptions::default(), true).unwrap();
        assert!(sub.script.is_file() && sub.job_id.is_none());
        assert!(sub.command.starts_with("sbatch --parsable "));
        assert!(tmp.path().join("slurm").is_dir());
        // The array runs a copy pinned in the sweep folder, not the build's binary: a
        // rebuild while the array is queued changes nothing it runs.
        let pinned = tmp.path().join("bin/onehead");
        let text = std::fs::read_to_string(&sub.script).unwrap();
        assert!(
            text.contains(&format!("ONEHEAD='{}'", pinned.display())),
            "{text}"
        );
        std::fs::write(&exe, b"#!/bin/sh\necho v2\n").unwrap();
        assert_eq!(std::fs::read(&pinned).unwrap(), b"#!/bin/sh\necho v1\n");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&pinned).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "executable");
        // Set-up lines go into every task before onehead and survive a regeneration
        // without them.
        let with = SlurmOptions {
            setup: vec!["module load cuda/12".into(), "export X=1".into()],
            ..SlurmOptions::default()
        };
        prepare_and_submit(&m, &[0, 1], &exe, &with, true).unwrap();
        prepare_and_submit(&m, &[1], &exe, &SlurmOptions::default(), true).unwrap();
        let text = std::fs::read_to_string(&sub.script).unwrap();
        let setup = text
            .find("module load cuda/12\nexport X=1\n")
            .expect("setup lines");
        assert!(setup < text.find("\"$ONEHEAD\" run").unwrap());
        // The collect job waits for the array, however its tasks end.
        let c = collect_command(tmp.path(), &pinned, "42");
        assert!(
            c.contains("--dependency=afterany:42") && c.contains("sweep --collect"),
            "{c}"
        );
    }
}
