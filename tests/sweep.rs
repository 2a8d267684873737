//! Sweeps through the `onehead` binary, as a user runs them: runs side by side as child
//! processes, failures marked in the index without stopping the others, re-runs that skip
//! finished runs, Ctrl-C that leaves resumable runs, `run --run-dir`, `seeds = [..]`, and
//! the Slurm script (written, not submitted: `scripts/slurm_e2e.sh` runs a real Slurm).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_onehead");

/// A tiny experiment (64 px, 16/10 images per split) with `epochs` per stage.
fn tiny(dir: &Path, top: &str, epochs: usize) -> PathBuf {
    let text = format!(
        r#"name = "tiny"
{top}
{setup}[[stages]]
task = "seg"
epochs = {epochs}
batch_size = 4
[[stages]]
task = "det"
epochs = {epochs}
batch_size = 4
[[stages]]
task = "cls"
epochs = {epochs}
batch_size = 4
[eval]
batch_size = 4
"#,
        setup = common::tiny_setup(dir),
    );
    let p = dir.join("tiny.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn onehead(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn col(h: &[String], name: &str) -> usize {
    h.iter()
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("no column {name} in {h:?}"))
}

fn attempts(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("log.txt"))
        .unwrap_or_default()
        .matches("=== onehead sweep: start")
        .count()
}

#[test]
fn jobs_run_side_by_side_failures_are_marked_and_reruns_skip_finished_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tiny(tmp.path(), "seeds = [1, 2]", 1);
    let results = tmp.path().join("results");
    let missing = tmp.path().join("missing.safetensors");
    let grid = format!("model.weights=none,{}", missing.display());
    let args = [
        "sweep",
        file.to_str().unwrap(),
        "--set",
        &grid,
        "--jobs",
        "2",
        "--threads",
        "1",
        "--name",
        "sw",
        "--results",
        results.to_str().unwrap(),
        "--quiet",
    ];
    let out = onehead(&args);
    // Two runs fail (their weights file does not exist), the two others finish.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let sweep = results.join("sw").canonicalize().unwrap();
    for f in ["manifest.json", "index.csv", "summary.csv"] {
        assert!(sweep.join(f).is_file(), "missing {f}");
    }
    let (h, rows) = common::read_csv(&sweep.join("index.csv"));
    assert_eq!(rows.len(), 4);
    let (status, reason, seed) = (col(&h, "status"), col(&h, "reason"), col(&h, "seed"));
    let statuses: Vec<&str> = rows.iter().map(|r| r[status].as_str()).collect();
    assert_eq!(statuses, ["ok", "ok", "failed", "failed"], "{}", text(&out));
    assert!(
        rows[2][reason].contains("missing.safetensors"),
        "{:?}",
        rows[2]
    );
    assert_eq!((rows[0][seed].as_str(), rows[1][seed].as_str()), ("1", "2"));
    assert!(!rows[0][col(&h, "seg_miou_final")].is_empty());
    assert!(!rows[0][col(&h, "cls_verdict")].is_empty());
    let run_dirs: Vec<PathBuf> = rows
        .iter()
        .map(|r| PathBuf::from(&r[col(&h, "run_dir")]))
        .collect();
    assert_eq!(run_dirs[0], sweep.join("runs/tiny__weights-none__seed-1"));
    for d in &run_dirs[..2] {
        assert!(d.join("summary.json").is_file());
        let log = std::fs::read_to_string(d.join("log.txt")).unwrap();
        assert!(log.contains("=== onehead sweep: exit"), "{log}");
        // The resolved config ran: the run's name, one seed.
        assert!(log.contains("overall:"), "{log}");
    }
    assert!(sweep
        .join("configs/0-tiny__weights-none__seed-1.toml")
        .is_file());
    // One row per configuration, mean ± std over the two seeds.
    let (h, rows) = common::read_csv(&sweep.join("summary.csv"));
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][col(&h, "config")], "tiny__weights-none");
    assert_eq!(rows[0][col(&h, "n_seeds")], "2");
    assert_eq!(rows[0][col(&h, "seeds")], "[1, 2]");
    assert!(!rows[0][col(&h, "seg_miou_final_std")].is_empty());
    assert_eq!(rows[1][col(&h, "n_seeds")], "0");

    // The same sweep again: finished runs are skipped, failed ones tried again.
    let again = onehead(&args);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert_eq!(attempts(&run_dirs[0]), 1);
    assert_eq!(attempts(&run_dirs[1]), 1);
    assert_eq!(attempts(&run_dirs[2]), 2);

    // Another sweep under the same name is refused.
    let mut other = args.to_vec();
    other[3] = "model.weights=none";
    let refused = onehead(&other);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused).contains("another --name"),
        "{}",
        text(&refused)
    );

    // --collect: the index from the folder alone, failed runs listed.
    let collected = onehead(&["sweep", "--collect", sweep.to_str().unwrap()]);
    assert_eq!(collected.status.code(), Some(2), "{}", text(&collected));
    let stdout = String::from_utf8_lossy(&collected.stdout);
    assert!(
        stdout.contains("failed      tiny__weights-") && stdout.contains("2 finished, 2 failed"),
        "{stdout}"
    );
}

#[test]
fn ctrl_c_leaves_resumable_runs_and_a_rerun_finishes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tiny(tmp.path(), "", 6);
    let results = tmp.path().join("results");
    let args = [
        "sweep",
        file.to_str().unwrap(),
        "--set",
        "seed=1,2",
        "--jobs",
        "2",
        "--threads",
        "1",
        "--name",
        "stop",
        "--results",
        results.to_str().unwrap(),
        "--quiet",
    ];
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let runs = results.join("stop/runs");
    let states = [
        runs.join("tiny__seed-1/state/state.json"),
        runs.join("tiny__seed-2/state/state.json"),
    ];
    let t0 = Instant::now();
    while !states.iter().all(|s| s.is_file()) {
        assert!(t0.elapsed() < Duration::from_secs(300), "no saved state");
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ctrl-C: the sweep forwards it, waits for its runs and writes the index.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));
    let (h, rows) = common::read_csv(&results.join("stop/index.csv"));
    for r in &rows {
        assert_eq!(r[col(&h, "status")], "interrupted", "{r:?}");
    }
    for name in ["tiny__seed-1", "tiny__seed-2"] {
        assert!(!runs.join(name).join("summary.json").exists());
    }

    // Re-running the same sweep resumes both runs from their last epoch. Every run finished:
    // exit 0, whatever the runs found (tiny runs learn nothing, and say so).
    let out = onehead(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("not learned"), "{}", text(&out));
    // For CI: fail when some run did not keep every task within tolerance.
    let mut strict = args.to_vec();
    strict.push("--fail-on-forgetting");
    let out = onehead(&strict);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for name in ["tiny__seed-1", "tiny__seed-2"] {
        let d = runs.join(name);
        assert!(d.join("summary.json").is_file());
        let log = std::fs::read_to_string(d.join("log.txt")).unwrap();
        assert!(log.contains("resuming"), "{log}");
        let (_, epochs) = common::read_csv(&d.join("epochs.csv"));
        assert_eq!(epochs.len(), 18, "{name}: every epoch once");
    }
}

#[test]
fn run_dir_resumes_an_unfinished_run_and_leaves_a_finished_one() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tiny(tmp.path(), "seed = 4", 1);
    let f = file.to_str().unwrap();
    let dir = tmp.path().join("runs/one");
    let d = dir.to_str().unwrap();
    let out = onehead(&[
        "run",
        f,
        "--run-dir",
        d,
        "--quiet",
        "--stop-after-epochs",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(dir.join("state/state.json").is_file());
    // Same command without the stop: continues in the same folder.
    let out = onehead(&["run", f, "--run-dir", d, "--quiet"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    assert!(text(&out).contains("resuming"), "{}", text(&out));
    let (_, rows) = common::read_csv(&dir.join("epochs.csv"));
    assert_eq!(rows.len(), 3);
    // Finished: nothing to do, exit 0.
    let out = onehead(&["run", f, "--run-dir", d, "--quiet"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("nothing to do"), "{}", text(&out));
    // Another config in that folder, or a folder holding other things: errors.
    let out = onehead(&["run", f, "--set", "seed=5", "--run-dir", d, "--quiet"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("another configuration"),
        "{}",
        text(&out)
    );
    let junk = tmp.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("notes.txt"), "mine").unwrap();
    let out = onehead(&["run", f, "--run-dir", junk.to_str().unwrap(), "--quiet"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("notes.txt"), "{}", text(&out));
}

#[test]
fn run_with_seeds_runs_every_seed_and_reports_mean_and_std() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tiny(tmp.path(), "seeds = [0, 1]", 1);
    let out = onehead(&["run", file.to_str().unwrap(), "--quiet"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    let parent = tmp.path().join("results/tiny");
    let sweep = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-seeds"))
        .expect("a <stamp>-seeds folder");
    let (h, rows) = common::read_csv(&sweep.join("summary.csv"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][col(&h, "n_seeds")], "2");
    assert_eq!(rows[0][col(&h, "seeds")], "[0, 1]");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" ± "), "{stdout}");
    let (_, index) = common::read_csv(&sweep.join("index.csv"));
    assert_eq!(index.len(), 2);
    // One seed of a multi-seed file cannot take --run-dir.
    let out = onehead(&["run", file.to_str().unwrap(), "--run-dir", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("2 seeds"), "{}", text(&out));
}

#[test]
fn slurm_writes_the_array_script_and_needs_sbatch_to_submit() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tiny(tmp.path(), "", 1);
    let results = tmp.path().join("results");
    let base = [
        "sweep",
        file.to_str().unwrap(),
        "--set",
        "seed=0,1,2",
        "--name",
        "sl",
        "--results",
        results.to_str().unwrap(),
        "--slurm",
        "--partition",
        "cpu",
        "--time",
        "1:00:00",
        "--array-parallelism",
        "2",
    ];
    let mut dry = base.to_vec();
    dry.push("--dry-run");
    let out = onehead(&dry);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let sweep = results.join("sl").canonicalize().unwrap();
    let script = std::fs::read_to_string(sweep.join("sweep.sbatch")).unwrap();
    assert!(text(&out).contains("sbatch --parsable"), "{}", text(&out));
    for line in [
        "#SBATCH --array=0-2%2",
        "#SBATCH --partition=cpu",
        "#SBATCH --time=1:00:00",
        "#SBATCH --requeue",
    ] {
        assert!(script.lines().any(|l| l == line), "{line} in\n{script}");
    }
    assert!(script.contains(&format!(
        "RUN_DIR='{}'",
        sweep.join("runs/tiny__seed-2").display()
    )));
    // Without sbatch on PATH: a clear error naming the command to run on a login node.
    let out = Command::new(BIN)
        .args(base)
        .env("PATH", tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("sbatch not found"), "{}", text(&out));
    // Nonsense options are refused before anything is written.
    let out = onehead(&[
        "sweep",
        file.to_str().unwrap(),
        "--slurm",
        "--time",
        "1 hour",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--time"), "{}", text(&out));
    // Slurm options without --slurm are a usage error.
    let out = onehead(&["sweep", file.to_str().unwrap(), "--partition", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sigterm_twice_still_ends_in_a_saved_state_never_an_abort() {
    // What Slurm does on cancel, requeue or preemption: TERM to every process of the job,
    // and the job script forwards another one. Both must end in a resumable state (exit 3),
    // not in a second-Ctrl-C abort (exit 130).
    let tmp = tempfile::tempdir().unwrap();
    let file = tiny(tmp.path(), "seed = 2", 30);
    let dir = tmp.path().join("runs/term");
    let mut child = Command::new(BIN)
        .args([
            "run",
            file.to_str().unwrap(),
            "--set",
            "eval.baseline=stage_end",
        ])
        .arg("--run-dir")
        .arg(&dir)
        .arg("--quiet")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = dir.join("state/state.json");
    let t0 = Instant::now();
    while !state.is_file() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no saved state");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..2 {
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!text(&out).contains("aborting"), "{}", text(&out));
    assert!(state.is_file() && !dir.join("summary.json").exists());
}
