//! A run folder has one writer: while a run trains, a second `onehead` process on its folder
//! (`resume`, or `run --run-dir`, as a Slurm requeue or an impatient user would do) is
//! refused with the holder's pid and touches nothing; the first run's logs stay whole, and
//! once it stopped the folder resumes to the end with every epoch in `epochs.csv`.

#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn data_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("epochs.csv"))
        .unwrap_or_default()
        .lines()
        .count()
        .saturating_sub(1)
}

#[test]
fn a_second_writer_on_a_live_run_folder_is_refused_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let epochs = 60;
    let text = format!(
        "name = \"lock\"\nseed = 1\n{setup}\n[[stages]]\ntask = \"seg\"\nepochs = {epochs}\nbatch_size = 4\n",
        setup = common::tiny_setup(tmp.path()),
    );
    let exp = tmp.path().join("lock.toml");
    std::fs::write(&exp, text).unwrap();
    let run_dir: PathBuf = tmp.path().join("run");
    let bin = env!("CARGO_BIN_EXE_onehead");
    let run_args = [
        "run",
        exp.to_str().unwrap(),
        "--quiet",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ];
    let first = Command::new(bin)
        .args(run_args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generous: a debug build on a loaded 2-core machine (a sweep beside the test suite) once
    // needed more than 120 s for its first two epochs.
    let deadline = Instant::now() + Duration::from_secs(300);
    while data_rows(&run_dir) < 2 {
        assert!(Instant::now() < deadline, "the run never logged an epoch");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Two kinds of second writer, both while the first is still training.
    for args in [
        vec!["resume", run_dir.to_str().unwrap(), "--quiet"],
        run_args.to_vec(),
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("in use") && err.contains(&format!("process {}", first.id())),
            "{args:?}: {err}"
        );
        assert!(err.contains(run_dir.to_str().unwrap()), "{err}");
    }

    // The first run is unharmed: Ctrl-C saves its state, and every epoch it trained is in
    // epochs.csv (a second writer used to replace the file under it).
    unsafe {
        libc::kill(first.id() as i32, libc::SIGINT);
    }
    let out = first.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("state/state.json")).unwrap())
            .unwrap();
    let done = state["global_epoch"].as_u64().unwrap() as usize;
    assert!(done >= 2);
    assert_eq!(data_rows(&run_dir), done);

    // Now the folder is free: it resumes to the end, every epoch logged once.
    let out = Command::new(bin)
        .args(["resume", run_dir.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (h, rows) = common::read_csv(&run_dir.join("epochs.csv"));
    assert_eq!(rows.len(), epochs);
    let g = h.iter().position(|c| c == "global_epoch").unwrap();
    let epochs_logged: Vec<usize> = rows.iter().map(|r| r[g].parse().unwrap()).collect();
    assert_eq!(epochs_logged, (1..=epochs).collect::<Vec<_>>());
}
