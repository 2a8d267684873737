//! End-to-end runs of the engine on a tiny synthetic benchmark: the run folder's contents,
//! the per-epoch CSV, the verdict, determinism and resumption (sweeps: tests/sweep.rs).

mod common;

use std::path::{Path, PathBuf};

use onehead::config::Experiment;
use onehead::registry::Registry;
use onehead::tasks::Split;
use onehead::train::{
    evaluate_checkpoint, evaluate_checkpoint_on, resume, run, RunOptions, Stopped,
};

fn tiny_experiment(dir: &Path, replay: bool) -> Experiment {
    let text = format!(
        r#"
name = "tiny"
seed = 3
{setup}[[stages]]
task = "seg"
epochs = 2
batch_size = 4
[[stages]]
task = "det"
epochs = 1
batch_size = 4
[[stages]]
task = "cls"
epochs = 1
batch_size = 4
[replay]
enabled = {replay}
images_per_batch = 2
[eval]
batch_size = 4
"#,
        setup = common::tiny_setup(dir),
    );
    let p = dir.join("tiny.toml");
    std::fs::write(&p, text).unwrap();
    Registry::builtin().load(&p, &[]).unwrap()
}

#[test]
fn a_run_leaves_config_csv_summary_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(tmp.path(), true);
    let out = run(
        &exp,
        &RunOptions {
            quiet: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let dir = &out.run_dir;
    for f in [
        "config.toml",
        "meta.json",
        "epochs.csv",
        "eval.csv",
        "matrix.csv",
        "summary.json",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    // The resume state is dropped once the run has finished.
    assert!(!dir.join("state").exists());
    // The stored config is the exact config that ran.
    let stored = Registry::builtin()
        .load(&dir.join("config.toml"), &[])
        .unwrap();
    assert_eq!(stored, exp);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["version"], env!("CARGO_PKG_VERSION"));
    assert!(!meta["git_commit"].as_str().unwrap().is_empty());
    // The switches that change the arithmetic, exactly as this process has them.
    let env = meta["env"].as_object().unwrap();
    for (k, v) in std::env::vars() {
        if k.starts_with("ONEHEAD_") || k == "RAYON_NUM_THREADS" {
            assert_eq!(env[&k], v, "{k}");
        }
    }
    assert!(env
        .keys()
        .all(|k| k.starts_with("ONEHEAD_") || k == "RAYON_NUM_THREADS"));
    for ck in ["stage1-seg", "stage2-det", "stage3-cls"] {
        assert!(dir
            .join("checkpoints")
            .join(format!("{ck}.safetensors"))
            .is_file());
    }

    let (h, rows) = common::read_csv(&dir.join("epochs.csv"));
    assert_eq!(rows.len(), 4, "2 + 1 + 1 epochs");
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    // Stage 1 knows only segmentation; stage 3 evaluates all three tasks.
    assert!(!rows[0][col("seg_miou")].is_empty());
    assert!(rows[0][col("det_map50")].is_empty());
    assert!(rows[0][col("cls_top1")].is_empty());
    assert!(!rows[3][col("det_map50")].is_empty() && !rows[3][col("cls_top1")].is_empty());
    assert_eq!(rows[3][col("global_epoch")], "4");
    // Replay adds a loss term from stage 2 on, never in stage 1.
    assert_eq!(
        rows[0][col("loss_replay")],
        "",
        "no replay term in stage 1: an empty cell"
    );
    assert!(rows[2][col("loss_replay")].parse::<f64>().unwrap() > 0.0);
    // Each epoch's seconds split into batches, steps and evaluation: every part measured,
    // and together no more than the whole (the rest is hooks and logging).
    for r in &rows {
        let t = |name: &str| r[col(name)].parse::<f64>().unwrap();
        let parts = t("data_seconds") + t("step_seconds") + t("eval_seconds");
        assert!(t("data_seconds") > 0.0 && t("step_seconds") > 0.0 && t("eval_seconds") > 0.0);
        assert!(
            parts <= t("seconds") + 0.002,
            "{parts} > {} in {r:?}",
            t("seconds")
        );
    }

    // The verdict is measured on the held-out test split, against the single-task reference
    // (trained first, in results/references/<key>/); the val curves are epochs.csv's.
    let s = &out.summary;
    assert_eq!(s.verdict_split, "test");
    let reference = PathBuf::from(s.baseline_run.clone().expect("a single-task reference"));
    assert!(reference.starts_with(tmp.path().join("results/references")));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("summary.json")).unwrap())
            .unwrap();
    let seg = s.tasks.iter().find(|t| t.task == "seg").unwrap();
    assert_eq!(
        seg.baseline,
        r["final_metrics"]["seg_miou"].as_f64().unwrap()
    );
    // The run's own end of stage 1 on test is in the matrix, and printed beside.
    assert_eq!(seg.stage_end, s.matrix.values[0][0]);
    assert_eq!(Some(seg.final_value), s.matrix.values[0][2]);
    assert_eq!(s.pass, s.tasks.iter().all(|t| t.pass));
    assert!(s.params.total > 100_000 && s.latency_ms > 0.0);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["tasks"].as_array().unwrap().len(), 3);

    // Checkpoints reload to the same model: evaluating them reproduces the logged metrics,
    // val (epochs.csv) and test (summary.json) alike.
    let reg = Registry::builtin();
    let at_end_of_stage1: f64 = rows[1][col("seg_miou")].parse().unwrap();
    let at_stage1 = evaluate_checkpoint(dir, Some("stage1-seg"), &reg).unwrap();
    let (task, m) = &at_stage1[0];
    assert_eq!(task, "seg");
    assert!((m["miou"] - at_end_of_stage1).abs() < 1e-5);
    let last = evaluate_checkpoint(dir, None, &reg).unwrap();
    let cls_top1: f64 = rows[3][col("cls_top1")].parse().unwrap();
    assert!((last[2].1["top1"] - cls_top1).abs() < 1e-5);
    let last = evaluate_checkpoint_on(dir, None, &reg, Split::Test).unwrap();
    for (task, m) in &last {
        for (k, v) in m {
            let key = format!("{task}_{k}");
            assert!((v - s.final_metrics[&key]).abs() < 1e-9, "{key}");
        }
    }
    assert!(evaluate_checkpoint(dir, Some("stage9-x"), &reg)
        .unwrap_err()
        .to_string()
        .contains("not found"));

    // The long-format eval.csv holds every metric of epochs.csv, row for row.
    let (eh, erows) = common::read_csv(&dir.join("eval.csv"));
    assert_eq!(
        eh,
        ["stage", "epoch", "global_epoch", "task", "metric", "value"]
    );
    let find = |g: &str, task: &str, metric: &str| {
        erows
            .iter()
            .find(|r| r[2] == g && r[3] == task && r[4] == metric)
            .map(|r| r[5].clone())
    };
    assert_eq!(
        find("4", "det", "map50").unwrap(),
        rows[3][col("det_map50")]
    );
    assert_eq!(find("1", "seg", "miou").unwrap(), rows[0][col("seg_miou")]);
    assert_eq!(
        find("1", "det", "map50"),
        None,
        "det is not evaluated before it is learned"
    );
    // The matrix (on test): seg after every stage, det from stage 2, cls in stage 3.
    let (mh, mrows) = common::read_csv(&dir.join("matrix.csv"));
    assert_eq!(
        mh,
        [
            "task",
            "metric",
            "after_stage1",
            "after_stage2",
            "after_stage3"
        ]
    );
    let cell = |v: Option<f64>| format!("{}", v.unwrap());
    let m = &out.summary.matrix.values;
    assert_eq!(
        mrows[0][..3],
        ["seg".to_string(), "miou".into(), cell(m[0][0])]
    );
    assert_eq!(mrows[1][2], "");
    assert_eq!(mrows[2][4], cell(m[2][2]));
    assert_eq!(json["matrix"]["values"][1][0], serde_json::Value::Null);

    // A second run never reuses the folder.
    let again = run(
        &exp,
        &RunOptions {
            quiet: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_ne!(again.run_dir, out.run_dir);
    // Same seed, same device: the same losses and metrics (only the timing column differs).
    let (_, rows2) = common::read_csv(&again.run_dir.join("epochs.csv"));
    for (a, b) in rows.iter().zip(&rows2) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if !common::is_timing(&h[i]) {
                assert_eq!(x, y, "column {} differs between identical runs", h[i]);
            }
        }
    }
}

#[test]
fn cli_reports_a_typo_with_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.toml");
    std::fs::write(&p, "name = \"x\"\n[[stages]]\ntask = \"seg\"\nepohcs = 2\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args(["run", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 4") && err.contains("epohcs"),
        "{err}"
    );
}

/// Every tensor of two safetensors files, compared exactly.
fn same_tensors(a: &Path, b: &Path) {
    let ta = candle_core::safetensors::load(a, &candle_core::Device::Cpu).unwrap();
    let tb = candle_core::safetensors::load(b, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = tb[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(x == y, "{name} differs after resume");
    }
}

#[test]
fn an_interrupted_run_resumes_to_exactly_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    // Replay on, so the replay cursor and its RNG draws are part of what must be restored.
    let exp = tiny_experiment(tmp.path(), true);
    let quiet = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    let full = run(&exp, &quiet).unwrap();
    let (h, full_rows) = common::read_csv(&full.run_dir.join("epochs.csv"));
    // Epoch 1 is mid-stage (seg has 2 epochs), 2 ends a stage, 3 ends the detection stage;
    // step 6 is in the middle of epoch 2 (4 steps per epoch) and step 10 in the middle of
    // the detection stage, where replay's state and RNG draws are live (as after Ctrl-C).
    let stops = [
        (Some(1), None),
        (Some(2), None),
        (Some(3), None),
        (None, Some(6)),
        (None, Some(10)),
    ];
    for (k, &(stop_after_epochs, stop_after_steps)) in stops.iter().enumerate() {
        let stop = k + 1;
        let err = run(
            &exp,
            &RunOptions {
                quiet: true,
                stop_after_epochs,
                stop_after_steps,
                ..RunOptions::default()
            },
        )
        .unwrap_err();
        let stopped = err.downcast_ref::<Stopped>().expect("a Stopped error");
        let dir = stopped.run_dir.clone();
        assert!(!dir.join("summary.json").exists());
        assert!(dir.join("state/state.json").is_file());
        if stop == 1 {
            // A row written after the saved state (a crash right after logging) is dropped.
            let mut text = std::fs::read_to_string(dir.join("epochs.csv")).unwrap();
            text.push_str(&full_rows[1].join(","));
            text.push('\n');
            std::fs::write(dir.join("epochs.csv"), text).unwrap();
        }
        let resumed = resume(&dir, &quiet).unwrap();
        assert_eq!(resumed.run_dir, dir);
        let (_, rows) = common::read_csv(&dir.join("epochs.csv"));
        assert_eq!(rows.len(), full_rows.len(), "stop after {stop}");
        for (a, b) in rows.iter().zip(&full_rows) {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if !common::is_timing(&h[i]) {
                    assert_eq!(x, y, "stop after {stop}: column {} differs", h[i]);
                }
            }
        }
        same_tensors(
            &dir.join("checkpoints/stage3-cls.safetensors"),
            &full.run_dir.join("checkpoints/stage3-cls.safetensors"),
        );
        assert_eq!(resumed.summary.final_metrics, full.summary.final_metrics);
        // Equal verdicts, intervals included (only the score files' folders differ).
        let unfiled = |s: &onehead::report::RunSummary| {
            let mut t = s.tasks.clone();
            t.iter_mut().for_each(|t| t.scores = None);
            t
        };
        assert_eq!(unfiled(&resumed.summary), unfiled(&full.summary));
    }
    // A finished run is never continued (nor overwritten).
    let msg = resume(&full.run_dir, &quiet).unwrap_err().to_string();
    assert!(msg.contains("finished"), "{msg}");
}

#[test]
fn shipped_experiments_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let names_in = |dir: &Path| {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let exp = Registry::builtin()
                    .load(&path, &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                names.push(exp.name.clone());
                // The report's schedule: seg → det → cls.
                let tasks: Vec<_> = exp.stages.iter().map(|s| s.task.as_str()).collect();
                assert_eq!(tasks, ["seg", "det", "cls"], "{}", path.display());
            }
        }
        names.sort();
        names
    };
    assert_eq!(
        names_in(&root),
        [
            "der",
            "distill_budget",
            "lwf",
            "no_replay",
            "quickstart_no_replay",
            "quickstart_replay",
            "replay"
        ]
    );
    // One file per strategy on the built-in benchmark, 3 seeds each (the single-task
    // reference is made by every run that needs it, not a file of its own).
    let strategies = names_in(&root.join("strategies"));
    for s in ["control", "replay", "lwf", "ewc", "joint", "joint_matched"] {
        assert!(strategies.iter().any(|n| n == s), "no strategies/{s}.toml");
    }
    // The ablations load; the task orders load and are the six permutations of each of the
    // three strategies, named for their order.
    assert!(!names_in(&root.join("ablations")).is_empty());
    let mut orders = std::collections::BTreeMap::<String, Vec<String>>::new();
    for entry in std::fs::read_dir(root.join("orders")).unwrap() {
        let path = entry.unwrap().path();
        let exp = Registry::builtin()
            .load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tasks: Vec<_> = exp.stages.iter().map(|s| s.task.clone()).collect();
        let (strategy, order) = exp.name.split_once("__").expect("strategy__order");
        assert_eq!(order, tasks.join("_"), "{}", path.display());
        orders
            .entry(strategy.into())
            .or_default()
            .push(order.into());
    }
    assert_eq!(orders.len(), 3, "{orders:?}");
    for (strategy, mut list) in orders {
        list.sort();
        list.dedup();
        assert_eq!(list.len(), 6, "{strategy}: {list:?}");
    }
}

#[test]
fn cli_stops_with_code_3_and_resumes_to_a_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_experiment(tmp.path(), false);
    let bin = env!("CARGO_BIN_EXE_onehead");
    let toml = tmp.path().join("tiny.toml");
    let out = std::process::Command::new(bin)
        .args([
            "run",
            toml.to_str().unwrap(),
            "--quiet",
            "--stop-after-epochs",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let run_dir = err
        .lines()
        .rev()
        .find_map(|l| l.split("onehead resume ").nth(1))
        .map(|d| d.trim_end_matches('`').trim().to_string())
        .unwrap_or_else(|| panic!("no resume hint in: {err}"));
    let out = std::process::Command::new(bin)
        .args(["resume", &run_dir, "--quiet"])
        .output()
        .unwrap();
    // 0 or 1 depending on the verdict, never an error.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("overall:"));
    let (_, rows) = common::read_csv(&PathBuf::from(&run_dir).join("epochs.csv"));
    assert_eq!(rows.len(), 4);
}

#[test]
fn a_damaged_resume_state_or_config_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(tmp.path(), true);
    let err = run(
        &exp,
        &RunOptions {
            quiet: true,
            stop_after_epochs: Some(3),
            ..RunOptions::default()
        },
    )
    .unwrap_err();
    let dir = err.downcast_ref::<Stopped>().unwrap().run_dir.clone();
    let quiet = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    // A truncated state.json names the file.
    let state = dir.join("state/state.json");
    let good = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    let msg = format!("{:#}", resume(&dir, &quiet).unwrap_err());
    assert!(msg.contains("state.json"), "{msg}");
    std::fs::write(&state, &good).unwrap();
    // A config.toml edited to fewer stages than the state has run: refused, not indexed.
    let cfg = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut edited = Registry::builtin().load(&cfg, &[]).unwrap();
    edited.stages.truncate(1);
    std::fs::write(&cfg, edited.to_toml()).unwrap();
    let msg = format!("{:#}", resume(&dir, &quiet).unwrap_err());
    assert!(
        msg.contains("config.toml") && msg.contains("state"),
        "{msg}"
    );
    std::fs::write(&cfg, &text).unwrap();
    // Restored, it resumes.
    resume(&dir, &quiet).unwrap();
}

#[test]
fn an_empty_split_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(tmp.path(), false);
    // Generate the data, then empty the classification val split's class folders.
    onehead::train::ensure_data(&exp).unwrap();
    let val = exp.data.resolved_root().join("imagenette_160/val");
    for class in std::fs::read_dir(&val).unwrap() {
        let class = class.unwrap().path();
        for f in std::fs::read_dir(&class).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
    }
    let msg = format!("{:#}", run(&exp, &RunOptions::default()).unwrap_err());
    assert!(
        msg.contains("imagenette_160") && msg.contains("no images"),
        "{msg}"
    );
}
