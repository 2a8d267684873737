//! Bad input and faults, as an adversarial user would try them: each ends in a clear error
//! before any training (naming the key and the file), or in a whole run folder — never a
//! panic, an abort, or lost or foreign data. (Run folders under two processes:
//! `run_lock.rs`; exports into foreign folders: `predict_export.rs`; config bounds: the
//! unit tests of `config.rs` and the strategies.)

#![cfg(unix)]

mod common;

use std::path::Path;
use std::process::Command;

use onehead::registry::Registry;
use onehead::train::{resume, run, RunOptions, Stopped};

fn write(dir: &Path, file: &str, body: &str) -> std::path::PathBuf {
    let text = format!(
        "name = \"bad\"\nseed = 2\n{setup}\n[[stages]]\ntask = \"seg\"\nepochs = 2\nbatch_size = 4\n{body}",
        setup = common::tiny_setup(dir),
    );
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

/// The 1-based line of `path` that starts with `prefix`.
fn line_of(path: &Path, prefix: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().position(|l| l.starts_with(prefix)).unwrap() + 1
}

fn onehead(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A run of `exp` stopped (state saved) after its first epoch; its folder.
fn stopped_after_one_epoch(exp: &onehead::config::Experiment) -> std::path::PathBuf {
    let opts = RunOptions {
        stop_after_epochs: Some(1),
        ..quiet()
    };
    let err = run(exp, &opts).unwrap_err();
    err.downcast_ref::<Stopped>().unwrap().run_dir.clone()
}

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        ..RunOptions::default()
    }
}

#[test]
fn config_mistakes_are_errors_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    // A name that would leave results_dir.
    let p = write(tmp.path(), "up.toml", "");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("name = \"bad\"", "name = \"..\"");
    std::fs::write(&p, text).unwrap();
    let (code, err) = onehead(&["run", p.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("up.toml") && err.contains("names a folder"),
        "{err}"
    );
    // Non-finite and absurd values, through --set too.
    let p = write(tmp.path(), "ok.toml", "");
    for (set, key) in [
        ("stages.0.weight_decay=inf", "weight_decay"),
        ("model.image_size=1073741824", "model.image_size"),
        ("model.fpn_channels=100000000", "model.fpn_channels"),
        ("replay.enabled=true", ""),
    ] {
        let mut args = vec!["run", p.to_str().unwrap(), "--quiet", "--set", set];
        if key.is_empty() {
            // Replay of nothing earlier is fine; with a billion images per batch it is not.
            args.extend(["--set", "replay.images_per_batch=1000000000"]);
        }
        let (code, err) = onehead(&args);
        assert_eq!(code, Some(2), "{set}: {err}");
        let key = if key.is_empty() {
            "replay.images_per_batch"
        } else {
            key
        };
        assert!(err.contains(key) && err.contains("ok.toml"), "{set}: {err}");
    }
    // A typo in a task's own table names the key, the file and the line.
    let p = write(
        tmp.path(),
        "det.toml",
        "[[stages]]\ntask = \"det\"\nepochs = 1\n[tasks.det]\nnms_iuo = 0.5\n",
    );
    let line = line_of(&p, "nms_iuo");
    let (code, err) = onehead(&["run", p.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("nms_iuo")
            && err.contains("det.toml")
            && err.contains(&format!("line {line}")),
        "{err}"
    );
    assert!(
        !tmp.path().join("results").exists(),
        "nothing may be written for a config that fails its checks"
    );
    // A verdict metric the task does not have: refused at load, naming the file and line.
    let p = write(
        tmp.path(),
        "metric.toml",
        "[eval]\nmetric = { seg = \"top1\" }\n",
    );
    let line = line_of(&p, "metric = ");
    let msg = Registry::builtin().load(&p, &[]).unwrap_err().to_string();
    assert!(
        msg.contains("metric.toml")
            && msg.contains("eval.metric")
            && msg.contains("top1")
            && msg.contains(&format!("line {line}")),
        "{msg}"
    );
}

#[test]
fn subcommand_flags_are_checked() {
    for (args, what) in [
        (vec!["bench", "--batch", "0"], "--batch"),
        (vec!["bench", "--sizes", "100"], "multiple of 32"),
        (vec!["bench", "--steps", "0"], "--steps"),
        (vec!["synth", "--out", "x", "--size", "0"], "--size"),
        (vec!["info", "--image-size", "1073741824"], "--image-size"),
        (vec!["info", "--image-size", "100"], "multiple of 32"),
        (vec!["prepare", "--out", "x", "--train", "0"], "--train"),
    ] {
        let (code, err) = onehead(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(what), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_run_stopped_at_its_very_end_finishes_and_leftovers_are_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "two.toml",
        "[[stages]]\ntask = \"cls\"\nepochs = 1\nbatch_size = 4\n",
    );
    let exp = Registry::builtin().load(&p, &[]).unwrap();
    // Asked to stop after the run's last epoch: nothing is left to resume, so it finishes.
    let out = run(
        &exp,
        &RunOptions {
            stop_after_epochs: Some(3),
            ..quiet()
        },
    )
    .unwrap();
    assert!(out.run_dir.join("summary.json").is_file());
    // Checkpoints have the mode of every other file (safetensors' temp files are 0600).
    use std::os::unix::fs::PermissionsExt as _;
    let ckpt = out.run_dir.join("checkpoints/stage1-seg.safetensors");
    let mode = std::fs::metadata(&ckpt).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    // Killed while a checkpoint was being written: the partial file does not survive the
    // resume into the finished folder.
    let dir = stopped_after_one_epoch(&exp);
    let partial = [
        dir.join("checkpoints/.tmpAbC123"),
        dir.join("checkpoints/stage1-seg.safetensors.tmp"),
        dir.join(".matrix.csv.tmp"),
    ];
    // A file of the user's in the folder is not onehead's to remove.
    std::fs::write(dir.join("notes.tmp"), b"mine").unwrap();
    for f in &partial {
        std::fs::write(f, b"half a checkpoint").unwrap();
    }
    resume(&dir, &quiet()).unwrap();
    for f in &partial {
        assert!(!f.exists(), "{} survived", f.display());
    }
    assert_eq!(std::fs::read(dir.join("notes.tmp")).unwrap(), b"mine");
}

#[test]
fn a_setting_edited_in_a_stopped_run_is_not_resumed_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "edit.toml", "");
    let exp = Registry::builtin().load(&p, &[]).unwrap();
    let dir = stopped_after_one_epoch(&exp);
    let cfg = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let edited = text.replacen("lr = 0.001", "lr = 0.01", 1);
    assert_ne!(edited, text);
    std::fs::write(&cfg, &edited).unwrap();
    let msg = format!("{:#}", resume(&dir, &quiet()).unwrap_err());
    assert!(
        msg.contains("stages.0.lr") && msg.contains("--force") && msg.contains("config.toml"),
        "{msg}"
    );
    assert!(!dir.join("summary.json").exists());
    // With --force it continues (and says so); restored, it would have too.
    resume(
        &dir,
        &RunOptions {
            force: true,
            ..quiet()
        },
    )
    .unwrap();
}
