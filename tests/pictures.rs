//! Pictures from run folders (issue 11): `draw_run`, `onehead plot`, `onehead compare`, the
//! TensorBoard sink. The run folders are fixtures written here following the run-folder
//! contract (README, "What a run leaves"); nothing is trained.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use onehead::report::{compare, draw_run, CompareFormat, CompareOptions};

/// What a fixture run looks like.
#[derive(Clone)]
struct Fixture {
    name: String,
    seed: u64,
    epochs_per_stage: usize,
    replay: bool,
    /// Stop after this many global epochs (no summary.json, matrix.csv up to the last
    /// finished stage), with a half-written line after them.
    killed_after: Option<usize>,
}

impl Fixture {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            seed: 0,
            epochs_per_stage: 6,
            replay: true,
            killed_after: None,
        }
    }
}

const TASKS: [&str; 3] = ["seg", "det", "cls"];

/// Metric value of `task` after global epoch `g` (stage `s` 1-based is training then).
fn metric(f: &Fixture, task: usize, g: usize) -> Option<f64> {
    let e = f.epochs_per_stage;
    let learned_at = task * e + 1;
    if g < learned_at {
        return None;
    }
    let top = [0.26, 0.32, 0.78][task];
    let jitter = 0.004 * ((f.seed as f64 + 1.0) * (g as f64)).sin();
    let stage_end = (task + 1) * e;
    if g <= stage_end {
        let k = (g - learned_at + 1) as f64;
        return Some(top * (1.0 - (-0.6 * k).exp()) + jitter);
    }
    // Forgetting afterwards: fast without replay, slow with it.
    let base = top * (1.0 - (-0.6 * e as f64).exp());
    let since = (g - stage_end) as f64;
    let rate = if f.replay { 0.004 } else { 0.2 };
    Some(base * (0.15 + 0.85 * (-rate * since).exp()) + jitter)
}

/// Write a run folder following the contract; returns it.
fn write_run(parent: &Path, f: &Fixture) -> PathBuf {
    let dir = parent
        .join(&f.name)
        .join(format!("20261125-0620{:02}", f.seed));
    std::fs::create_dir_all(&dir).unwrap();
    let e = f.epochs_per_stage;
    let total = 3 * e;
    let last = f.killed_after.unwrap_or(total);

    let mut cfg = format!(
        "name = \"{}\"\nseed = {}\nresults_dir = \"results\"\n\n",
        f.name, f.seed
    );
    cfg.push_str("[model]\nweights = \"none\"\nimage_size = 160\n\n");
    for t in TASKS {
        let _ = write!(
            cfg,
            "[[stages]]\ntask = \"{t}\"\nepochs = {e}\nlr = 2e-3\n\n"
        );
    }
    let _ = write!(
        cfg,
        "[replay]\nenabled = {}\nimages_per_batch = 4\nweight = 0.8\n\n[eval]\nevery = 1\ntolerance = 0.05\n",
        f.replay
    );
    std::fs::write(dir.join("config.toml"), cfg).unwrap();
    std::fs::write(
        dir.join("meta.json"),
        format!(
            r#"{{"name": "{}", "version": "0.1.0", "git_commit": "abc123", "started_at": "2026-11-25T06:20:00Z", "device": "Cpu", "data_root": "data/x", "command": ["onehead", "run"]}}"#,
            f.name
        ),
    )
    .unwrap();

    // epochs.csv and eval.csv. `grad_norm` is a column this reader does not know.
    let metric_cols = [
        ("seg_miou", 0, 1.0),
        ("seg_pixel_acc", 0, 3.0),
        ("det_map50", 1, 1.0),
        ("det_map50_95", 1, 0.5),
        ("cls_top1", 2, 1.0),
        ("cls_top5", 2, 1.2),
    ];
    let mut csv = String::from(
        "stage,task,epoch,global_epoch,lr,loss_new,loss_replay,loss_ewc,loss_total,seg_miou,seg_pixel_acc,det_map50,det_map50_95,cls_top1,cls_top5,grad_norm,seconds\n",
    );
    let mut eval = String::from("stage,epoch,global_epoch,task,metric,value\n");
    for g in 1..=last {
        let s = (g - 1) / e; // 0-based stage
        let ep = (g - 1) % e + 1;
        let k = ep as f64;
        let new = [2.0, 4.0, 2.3][s] * (-0.3 * k).exp() + [0.4, 1.0, 0.3][s];
        let replay = if f.replay && s > 0 {
            0.8 * (0.5 + 0.3 * (-0.2 * k).exp())
        } else {
            0.0
        };
        let ewc = if s > 0 { 0.02 * k + 0.05 } else { 0.0 };
        let _ = write!(
            csv,
            "{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6}",
            s + 1,
            TASKS[s],
            ep,
            g,
            2e-3 * (1.0 - k / (e as f64 + 1.0)),
            new,
            replay,
            ewc,
            new + replay + ewc
        );
        for (col, task, scale) in metric_cols {
            match metric(f, task, g) {
                Some(v) => {
                    let v = (v * scale).min(0.99);
                    let _ = write!(csv, ",{v:.6}");
                    let m = col.split_once('_').unwrap().1;
                    let _ = writeln!(eval, "{},{},{g},{},{m},{v:.6}", s + 1, ep, TASKS[task]);
                }
                None => csv.push(','),
            }
        }
        let _ = writeln!(csv, ",{:.3},{:.2}", 1.0 + 0.1 * k, 17.5 + k);
    }
    if f.killed_after.is_some() {
        // Killed while writing the next line.
        csv.push_str("2,det,4,");
    }
    std::fs::write(dir.join("epochs.csv"), csv).unwrap();
    std::fs::write(dir.join("eval.csv"), eval).unwrap();

    // matrix.csv: written at each stage end.
    let stages_done = last / e;
    if stages_done > 0 {
        let mut m = String::from("task,metric");
        for k in 1..=stages_done {
            let _ = write!(m, ",after_stage{k}");
        }
        m.push('\n');
        for (ti, t) in TASKS.iter().enumerate().take(stages_done) {
            let _ = write!(m, "{t},{}", ["miou", "map50", "top1"][ti]);
            for k in 1..=stages_done {
                match metric(f, ti, k * e) {
                    Some(v) => {
                        let _ = write!(m, ",{v:.6}");
                    }
                    None => m.push(','),
                }
            }
            m.push('\n');
        }
        std::fs::write(dir.join("matrix.csv"), m).unwrap();
    }

    if f.killed_after.is_none() {
        let mut tasks = Vec::new();
        let mut pass = true;
        for (ti, t) in TASKS.iter().enumerate() {
            let b = metric(f, ti, (ti + 1) * e).unwrap();
            let fin = metric(f, ti, total).unwrap();
            let drop = (b - fin) / b;
            let verdict = if drop <= 0.05 { "ok" } else { "forgot" };
            pass &= verdict == "ok";
            let metric_name = ["miou", "map50", "top1"][ti];
            tasks.push(serde_json::json!({
                "task": t, "metric": metric_name, "stage": ti + 1,
                "baseline": b, "final_value": fin, "chance": 0.05, "learned": true,
                "drop_rel": drop, "drop_abs": b - fin, "verdict": verdict,
            }));
        }
        let values: Vec<Vec<Option<f64>>> = (0..3)
            .map(|ti| (1..=3).map(|k| metric(f, ti, k * e)).collect())
            .collect();
        let summary = serde_json::json!({
            "name": f.name, "run_dir": dir.display().to_string(), "version": "0.1.0",
            "git_commit": "abc123", "seed": f.seed, "device": "Cpu",
            "tolerance": 0.05, "tolerance_kind": "relative", "baseline_kind": "stage_end",
            "pass": pass, "tasks": tasks,
            "final_metrics": {"seg_miou": metric(f, 0, total)},
            "matrix": {"tasks": TASKS, "metrics": ["miou", "map50", "top1"], "stages": TASKS, "values": values},
            "forgetting": {"mean": {"forgetting": 0.1, "bwt": -0.1}},
            "params": {"total": 1605582, "backbone": 927008, "neck": 525056, "head": 153518},
            "latency_ms": 5.2, "train_seconds": 355.0, "some_future_field": [1, 2, 3],
            "started_at": "2026-11-25T06:20:00Z", "finished_at": "2026-11-25T06:26:00Z"
        });
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary).unwrap(),
        )
        .unwrap();
    }
    dir
}

/// Dark pixels in the top `rows` rows of an RGB PNG (the chart's title: text was drawn).
fn dark_pixels_on_top(path: &Path, rows: usize) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let row = info.width as usize * info.color_type.samples();
    buf[..row * rows]
        .chunks(info.color_type.samples())
        .filter(|p| p.iter().take(3).all(|c| *c < 100))
        .count()
}

/// `(width, height)` of a PNG file, and the share of its pixels that are not white.
fn png_info(path: &Path) -> ((u32, u32), f64) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = &buf[..info.buffer_size()];
    let channels = info.color_type.samples();
    let n = px.len() / channels;
    let ink = px
        .chunks(channels)
        .filter(|p| p.iter().take(3).any(|c| *c < 250))
        .count();
    ((info.width, info.height), ink as f64 / n as f64)
}

fn has(files: &[PathBuf], suffix: &str) -> bool {
    files.iter().any(|f| f.to_string_lossy().ends_with(suffix))
}

#[test]
fn a_finished_run_gets_plots_of_the_expected_size_and_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_run(tmp.path(), &Fixture::new("quick_replay"));
    let files = draw_run(&run).unwrap();
    for f in [
        "plots/loss.png",
        "plots/loss.svg",
        "plots/metrics.png",
        "plots/metrics.svg",
        "plots/matrix.png",
        "plots/matrix.svg",
        "report.html",
    ] {
        assert!(has(&files, f), "{f} missing from {files:?}");
        assert!(
            std::fs::metadata(run.join(f)).unwrap().len() > 1000,
            "{f} is tiny"
        );
    }
    // Pixel sizes: loss 1000×620, metrics 1000×(60 + 230 per task), matrix by its cells.
    for (f, size) in [
        ("loss.png", (1000, 620)),
        ("metrics.png", (1000, 750)),
        ("matrix.png", (650, 312)),
    ] {
        let (dim, ink) = png_info(&run.join("plots").join(f));
        assert_eq!(dim, size, "{f}");
        assert!(ink > 0.02, "{f} is nearly blank ({ink})");
    }
    // Text is drawn with the embedded font (CI has no system fonts): the title band of each
    // PNG holds dark glyph pixels.
    for f in ["loss.png", "metrics.png", "matrix.png"] {
        let n = dark_pixels_on_top(&run.join("plots").join(f), 30);
        assert!(n > 100, "{f}: no title text drawn ({n} dark pixels)");
    }
    // The title (run name) is drawn as text: in the SVG as a <text> element.
    let svg = std::fs::read_to_string(run.join("plots/loss.svg")).unwrap();
    assert!(svg.contains("quick_replay — training loss"), "no title");
    assert!(svg.contains("replay term") && svg.contains("ewc term"));
    let svg = std::fs::read_to_string(run.join("plots/metrics.svg")).unwrap();
    for t in [
        "seg mIoU",
        "det mAP@0.5",
        "cls Top-1",
        "baseline",
        "(1 − 5 %) · baseline",
        "chance",
    ] {
        assert!(svg.contains(t), "metrics.svg lacks {t}");
    }
    // Redrawing replaces the files (no error because they exist).
    draw_run(&run).unwrap();
}

#[test]
fn report_html_is_self_contained_and_every_image_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_run(tmp.path(), &Fixture::new("quick_replay"));
    draw_run(&run).unwrap();
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.starts_with("<!doctype html>"));
    for bad in ["<script", "<link", "src=\"http", "href=\"http", "url("] {
        assert!(!html.contains(bad), "report.html contains {bad}");
    }
    let mut images = 0;
    for part in html.split("<img ").skip(1) {
        let src = part
            .split("src=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let b64 = src
            .strip_prefix("data:image/png;base64,")
            .expect("images are embedded PNG data URIs");
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        images += 1;
    }
    assert_eq!(images, 3);
    // A complete fixture reads without warnings (config.toml parsed, summary read).
    assert!(
        !html.contains("class=\"warn\""),
        "unexpected warnings in the report"
    );
    for want in [
        "quick_replay",
        "Verdict",
        "forgot",
        "badge within",
        "1\u{202F}605\u{202F}582",
        "5.20 ms/image",
        "<pre>name = &quot;quick_replay&quot;",
    ] {
        assert!(html.contains(want), "report.html lacks {want}");
    }
}

#[test]
fn an_interrupted_run_with_a_truncated_line_still_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fixture::new("killed");
    f.killed_after = Some(9); // stage 1 done, half of stage 2, then a cut-off line
    let run = write_run(tmp.path(), &f);
    assert!(!run.join("summary.json").exists());
    let files = draw_run(&run).unwrap();
    assert!(has(&files, "plots/loss.png") && has(&files, "plots/metrics.png"));
    let (dim, ink) = png_info(&run.join("plots/metrics.png"));
    assert_eq!(dim, (1000, 60 + 230 * 2), "seg and det panels");
    assert!(ink > 0.02);
    // matrix.csv holds stage 1 only: still a heat map.
    assert_eq!(png_info(&run.join("plots/matrix.png")).0, (640, 120 + 64));
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("UNFINISHED"));
    assert!(
        html.contains("line 11 is incomplete"),
        "the warning names the line"
    );

    // The CLI does the same, and says so on stderr.
    let out = Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args(["plot"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("report.html"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("incomplete"));
}

#[test]
fn bad_inputs_are_errors_that_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = format!("{:#}", draw_run(tmp.path()).unwrap_err());
    assert!(
        err.contains("epochs.csv") && err.contains("not a run folder"),
        "{err}"
    );
    std::fs::write(tmp.path().join("epochs.csv"), "").unwrap();
    let err = format!("{:#}", draw_run(tmp.path()).unwrap_err());
    assert!(err.contains("epochs.csv") && err.contains("empty"), "{err}");
    std::fs::write(
        tmp.path().join("epochs.csv"),
        "stage,task,global_epoch,loss_new\n1,seg,1,1.0\n1,seg,oops,1.0\n1,seg,3,1.0\n",
    )
    .unwrap();
    let err = format!("{:#}", draw_run(tmp.path()).unwrap_err());
    assert!(err.contains("epochs.csv: line 3"), "{err}");
    // A broken summary.json is a warning, not an error.
    let run = write_run(tmp.path(), &Fixture::new("broken_summary"));
    std::fs::write(run.join("summary.json"), "{ not json").unwrap();
    draw_run(&run).unwrap();
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("summary.json: not valid JSON"));
}

#[test]
fn the_older_epochs_csv_is_drawn_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("old");
    std::fs::create_dir_all(&dir).unwrap();
    let mut csv = String::from(
        "stage,task,epoch,global_epoch,lr,loss_new,loss_replay,loss_total,seg_miou,seg_pixel_acc,det_map50,det_map50_95,cls_top1,cls_top5,seconds\n",
    );
    for g in 1..=6usize {
        let s = (g - 1) / 2;
        let seg = format!("{:.3}", 0.3 - 0.02 * g as f64);
        let det = if s >= 1 {
            format!("{:.3}", 0.1 * g as f64 / 6.0)
        } else {
            String::new()
        };
        let cls = if s >= 2 {
            "0.7".to_string()
        } else {
            String::new()
        };
        let _ = writeln!(
            csv,
            "{s},{},{},{g},0.001,{:.2},0,{:.2},{seg},0.5,{det},0.1,{cls},0.9,10",
            TASKS[s],
            (g - 1) % 2 + 1,
            3.0 / g as f64,
            3.0 / g as f64
        );
    }
    std::fs::write(dir.join("epochs.csv"), csv).unwrap();
    let files = draw_run(&dir).unwrap();
    assert!(has(&files, "plots/metrics.png"));
    // No strategy term ever added anything: the loss chart has a single panel.
    let svg = std::fs::read_to_string(dir.join("plots/loss.svg")).unwrap();
    assert!(!svg.contains("strategy terms"));
    assert!(svg.contains("stage 3 · cls"));
}

#[test]
fn compare_groups_seeds_and_writes_overlays_and_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = tmp.path().join("sweep");
    let mut index = String::from("run,config,seed,status\n");
    for seed in 0..3 {
        let mut f = Fixture::new(&format!("replay__seed-{seed}"));
        f.seed = seed;
        let d = write_run(&sweep, &f);
        // index.csv paths are relative to where the sweep ran.
        let rel = Path::new("results/sweep").join(d.strip_prefix(&sweep).unwrap());
        let _ = writeln!(index, "{},replay.toml,{seed},ok", rel.display());
    }
    index.push_str(",replay.toml,9,failed: out of memory\n");
    std::fs::write(sweep.join("index.csv"), index).unwrap();
    let mut f = Fixture::new("no_replay");
    f.replay = false;
    let single = write_run(tmp.path(), &f);

    let out_dir = tmp.path().join("cmp");
    let out = compare(&CompareOptions {
        inputs: vec![sweep.clone(), single.clone()],
        out: Some(out_dir.clone()),
        format: CompareFormat::Table,
    })
    .unwrap();
    for want in [
        "replay__seed-0",
        "replay__seed-2",
        "no_replay",
        "forgot",
        "PASS",
        "FAIL",
        "mean ± sd",
    ] {
        assert!(
            out.text.contains(want),
            "summary lacks {want}:\n{}",
            out.text
        );
    }
    for f in [
        "seg_miou.png",
        "det_map50.svg",
        "cls_top1.png",
        "summary.csv",
        "report.html",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let (dim, ink) = png_info(&out_dir.join("seg_miou.png"));
    assert_eq!(dim, (1000, 520));
    assert!(ink > 0.02);
    let svg = std::fs::read_to_string(out_dir.join("seg_miou.svg")).unwrap();
    assert!(
        svg.contains("replay (mean ± sd of 3 seeds)"),
        "seed group label"
    );
    // CSV: one row per (run, task), 4 runs × 3 tasks.
    let csv = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 12, "{csv}");
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert_eq!(html.matches("<img ").count(), 3);

    // Markdown and CSV through the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args(["compare", "--format", "markdown"])
        .arg(&sweep)
        .arg(&single)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.starts_with("| run | task |"), "{md}");
    assert_eq!(md.lines().count(), 2 + 12);
    let out = Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args(["compare", "--format", "csv"])
        .arg(&single)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("run,group,run_dir,task"));
    // Not a run, not a sweep: a clear error, exit code 2.
    let out = Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args(["compare"])
        .arg(tmp.path().join("cmp"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither a run folder"));
}

#[test]
fn tensorboard_export_writes_an_event_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_run(tmp.path(), &Fixture::new("tb"));
    let path = onehead::report::export_tensorboard(&run).unwrap();
    assert!(path.starts_with(run.join("tensorboard")));
    let bytes = std::fs::read(&path).unwrap();
    // 18 epochs × (lr, loss_new, loss_total, seconds, 2 terms, grad_norm) + the metrics
    // that have values, + the file-version record: at least a few hundred records' bytes.
    assert!(bytes.len() > 18 * 7 * 30, "{} bytes", bytes.len());
    let as_text = String::from_utf8_lossy(&bytes);
    for tag in [
        "brain.Event:2",
        "loss/new",
        "loss/replay",
        "seg/miou",
        "train/lr",
    ] {
        assert!(as_text.contains(tag), "no {tag}");
    }
}

/// Not a test: writes fixture runs for looking at by hand (`scripts/check_report.sh`).
/// `ONEHEAD_FIXTURE_OUT=/tmp/fx cargo test --test pictures -- --ignored write_fixture_runs`
#[test]
#[ignore]
fn write_fixture_runs() {
    let out = PathBuf::from(std::env::var("ONEHEAD_FIXTURE_OUT").unwrap_or("fixture-runs".into()));
    for seed in 0..3 {
        let mut f = Fixture::new(&format!("fixture_replay__seed-{seed}"));
        f.seed = seed;
        f.epochs_per_stage = 20;
        write_run(&out.join("sweep"), &f);
    }
    let mut f = Fixture::new("fixture_no_replay");
    f.replay = false;
    f.epochs_per_stage = 20;
    write_run(&out, &f);
    let mut f = Fixture::new("fixture_killed");
    f.killed_after = Some(9);
    write_run(&out, &f);
    println!("fixture runs under {}", out.display());
}
