//! The engine knows no task: a fourth task registered from outside trains through the same
//! loop; verdicts refuse tasks that were never learned; Ctrl-C stops a run resumably.

mod common;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use onehead::data::{Augment, Split};
use onehead::registry::Registry;
use onehead::tasks::det::DetSplit;
use onehead::tasks::{Batch, DistillParams, Evaluator, OpenOptions, Task, TaskLoss, TaskMetrics};
use onehead::train::{run_with, RunOptions};

/// Counting objects, a regression read from the detection data: one head channel, its
/// global average is the predicted number of (non-crowd) boxes in the image.
struct CountTask {
    train: DetSplit,
    val: DetSplit,
    /// Share of val images whose count is the most frequent one (what always guessing it
    /// scores).
    chance: f64,
}

fn count(split: &DetSplit, i: usize) -> f32 {
    split.boxes(i).iter().filter(|b| !b.crowd).count() as f32
}

impl CountTask {
    fn open(o: &OpenOptions) -> Result<Self> {
        let train = DetSplit::open(&o.root, Split::Train, o.image_size, false)?;
        let val = DetSplit::open(&o.root, Split::Val, o.image_size, false)?;
        let mut freq = std::collections::BTreeMap::new();
        for i in 0..val.len() {
            *freq.entry(count(&val, i) as usize).or_insert(0usize) += 1;
        }
        let chance = *freq.values().max().unwrap() as f64 / val.len() as f64;
        Ok(Self { train, val, chance })
    }

    /// This task reads no held-out test split: it has none.
    fn split(&self, s: Split) -> Option<&DetSplit> {
        match s {
            Split::Train => Some(&self.train),
            Split::Val => Some(&self.val),
            Split::Test => None,
        }
    }
}

fn predicted(out: &Tensor) -> Result<Tensor> {
    Ok(out.mean_keepdim(3)?.mean_keepdim(2)?.flatten_all()?)
}

impl Task for CountTask {
    fn name(&self) -> &str {
        "count"
    }
    fn class_names(&self) -> &[String] {
        &[]
    }
    fn head_channels(&self) -> usize {
        1
    }
    fn metric_names(&self) -> Vec<String> {
        vec!["acc".into(), "mae".into()]
    }
    fn primary_metric(&self) -> &str {
        "acc"
    }
    fn chance(&self, metric: &str, split: Split) -> Option<f64> {
        (metric == "acc" && split == Split::Val).then_some(self.chance)
    }
    fn len(&self, split: Split) -> usize {
        self.split(split).map_or(0, |s| s.len())
    }
    fn batch(&self, split: Split, idx: &[usize], augs: &[Augment], dev: &Device) -> Result<Batch> {
        let data = self.split(split).context("no such split")?;
        let (images, boxes) = data.batch(idx, augs, dev)?;
        let counts: Vec<f32> = boxes
            .iter()
            .map(|b| b.iter().filter(|b| !b.crowd).count() as f32)
            .collect();
        Ok(Batch::new(images, idx, counts))
    }
    fn loss(&self, out: &Tensor, batch: &Batch) -> Result<TaskLoss> {
        let counts: &Vec<f32> = batch.targets()?;
        let t = Tensor::new(counts.as_slice(), out.device())?;
        Ok(TaskLoss {
            total: (predicted(out)? - t)?.sqr()?.mean_all()?,
            parts: vec![],
        })
    }
    fn evaluator(&self, _split: Split) -> Box<dyn Evaluator + '_> {
        Box::new(CountEval::default())
    }
    fn distill(&self, s: &Tensor, t: &Tensor, _: &DistillParams) -> Result<Tensor> {
        Ok((predicted(s)? - predicted(&t.detach())?)?
            .sqr()?
            .mean_all()?)
    }
}

#[derive(Default)]
struct CountEval {
    n: usize,
    hits: usize,
    abs: f64,
}

impl Evaluator for CountEval {
    fn add(&mut self, out: &Tensor, batch: &Batch) -> Result<()> {
        let counts: &Vec<f32> = batch.targets()?;
        let p = predicted(out)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (p, t) in p.iter().zip(counts) {
            self.n += 1;
            self.hits += usize::from(p.round() == *t);
            self.abs += (p - t).abs() as f64;
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<TaskMetrics> {
        let mut m = TaskMetrics::new();
        m.insert("acc".into(), self.hits as f64 / self.n.max(1) as f64);
        m.insert("mae".into(), self.abs / self.n.max(1) as f64);
        Ok(m)
    }
}

fn write_experiment(dir: &Path, stages: &str, extra: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
name = "tasks"
seed = 5
{setup}{stages}
[eval]
batch_size = 8
{extra}
"#,
        setup = common::tiny_setup(dir),
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_fourth_task_trains_through_the_same_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let stages = "[[stages]]\ntask = \"seg\"\nepochs = 1\nbatch_size = 4\n[[stages]]\ntask = \"count\"\nepochs = 2\nbatch_size = 4\n[replay]\nenabled = true\nimages_per_batch = 2\n";
    let path = write_experiment(tmp.path(), stages, "");
    // The built-in registry does not know the task: a clear error naming the file.
    let err = Registry::builtin()
        .load(&path, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exp.toml") && err.contains("unknown task 'count'"),
        "{err}"
    );

    let mut registry = Registry::builtin();
    registry
        .tasks
        .register("count", |o| Ok(Box::new(CountTask::open(o)?)));
    let exp = registry.load(&path, &[]).unwrap();
    let out = run_with(
        &exp,
        &registry,
        &RunOptions {
            quiet: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let (h, rows) = common::read_csv(&out.run_dir.join("epochs.csv"));
    assert_eq!(rows.len(), 3);
    let col = |n: &str| {
        h.iter()
            .position(|c| c == n)
            .unwrap_or_else(|| panic!("no {n}"))
    };
    // Its metrics are columns, evaluated from its own stage on.
    assert!(rows[0][col("count_acc")].is_empty());
    assert!(!rows[2][col("count_mae")].is_empty());
    // Its loss is finite and decreasing losses are its own business; the replay of seg runs.
    let loss: f64 = rows[2][col("loss_new")].parse().unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    assert!(rows[2][col("loss_replay")].parse::<f64>().unwrap() > 0.0);
    // The head has 21 + 1 channels: the checkpoint's last layer says so.
    let ck = candle_core::safetensors::load(
        out.run_dir.join("checkpoints/stage2-count.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ck["head.out.weight"].dims()[0], 22);
    let v = out
        .summary
        .tasks
        .iter()
        .find(|t| t.task == "count")
        .unwrap();
    assert_eq!(v.metric, "acc");
    assert!(v.chance > 0.0 && v.chance <= 1.0);
}

#[test]
fn tasks_at_chance_are_not_learned_and_the_run_does_not_pass() {
    let tmp = tempfile::tempdir().unwrap();
    // One step of classification at a tiny learning rate: Top-1 stays near chance (0.1).
    let stages = "[[stages]]\ntask = \"cls\"\nepochs = 1\nbatch_size = 16\nlr = 1e-9\n";
    let path = write_experiment(tmp.path(), stages, "chance_margin = 0.3");
    let exp = Registry::builtin().load(&path, &[]).unwrap();
    let out = onehead::train::run(
        &exp,
        &RunOptions {
            quiet: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let t = &out.summary.tasks[0];
    assert!((t.chance - 0.1).abs() < 1e-12);
    assert!(t.baseline < 0.4, "{t:?}");
    assert_eq!(t.verdict, onehead::report::Verdict::NotLearned);
    assert_eq!(t.drop_rel, None);
    assert!(!out.summary.pass);
    assert!(out.summary.table().contains("not learned"));
}

#[test]
fn classification_with_more_than_255_classes_evaluates() {
    // The confusion matrix holds at most 255 classes; a classifier must not go near it.
    let tmp = tempfile::tempdir().unwrap();
    for split in ["train", "val"] {
        for c in 0..300 {
            let d = tmp.path().join(format!("imagenette_160/{split}/c{c:03}"));
            std::fs::create_dir_all(&d).unwrap();
            image::RgbImage::new(8, 8).save(d.join("a.png")).unwrap();
        }
    }
    let task = onehead::tasks::cls::ClsTask::open(&OpenOptions::new(tmp.path(), 32)).unwrap();
    assert_eq!(task.head_channels(), 300);
    let dev = Device::Cpu;
    let b = task.batch(Split::Val, &[0, 299], &[], &dev).unwrap();
    let out = Tensor::zeros((2, 300, 4, 4), DType::F32, &dev).unwrap();
    let mut ev = task.evaluator(Split::Val);
    ev.add(&out, &b).unwrap();
    let m = ev.finish().unwrap();
    assert_eq!(
        m["top1"], 0.5,
        "ties go to class 0: image 0 right, image 299 wrong"
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_after_a_step_and_the_run_resumes_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let stages = "[[stages]]\ntask = \"seg\"\nepochs = 3\nbatch_size = 4\n[[stages]]\ntask = \"det\"\nepochs = 3\nbatch_size = 4\n[replay]\nenabled = true\nimages_per_batch = 2\n";
    let path = write_experiment(tmp.path(), stages, "");
    let bin = env!("CARGO_BIN_EXE_onehead");
    let reference = std::process::Command::new(bin)
        .args(["run", path.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(matches!(reference.status.code(), Some(0 | 1)));
    let results = tmp.path().join("results/tasks");
    let first: Vec<_> = std::fs::read_dir(&results)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let ref_dir = first[0].clone();

    let child = std::process::Command::new(bin)
        .args(["run", path.to_str().unwrap(), "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first epoch row of the new run, then interrupt it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let dirs: Vec<_> = std::fs::read_dir(&results)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| *p != ref_dir)
            .collect();
        let rows = dirs
            .first()
            .map(|d| {
                std::fs::read_to_string(d.join("epochs.csv"))
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .unwrap_or(0);
        if rows >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never logged an epoch"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let run_dir = err
        .lines()
        .rev()
        .find_map(|l| l.split("onehead resume ").nth(1))
        .map(|d| d.trim_end_matches('`').trim().to_string())
        .unwrap_or_else(|| panic!("no resume hint in: {err}"));
    assert!(Path::new(&run_dir).join("state/state.json").is_file());
    let out = std::process::Command::new(bin)
        .args(["resume", &run_dir, "--quiet"])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (h, a) = common::read_csv(&ref_dir.join("epochs.csv"));
    let (_, b) = common::read_csv(&Path::new(&run_dir).join("epochs.csv"));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for (i, (u, v)) in x.iter().zip(y).enumerate() {
            if !common::is_timing(&h[i]) {
                assert_eq!(u, v, "column {} differs after Ctrl-C and resume", h[i]);
            }
        }
    }
}
