//! The strategy plug-ins on tiny runs: every one of them together trains and resumes
//! bit-identically; distillation is zero at the teacher and pulls back toward it; the
//! reference modes (joint, single-task) and the single-task baseline.

mod common;

use std::path::{Path, PathBuf};

use onehead::config::Experiment;
use onehead::plugins::{Plugin, Rows, StepView};
use onehead::registry::Registry;
use onehead::tasks::Split;
use onehead::train::{resume, run, RunOptions, Session, Stopped};
use rand::SeedableRng;

/// A tiny experiment: `top` goes before the first table (e.g. `mode`), `eval` into
/// `[eval]`, `body` after it (stages and strategy tables).
fn experiment(dir: &Path, top: &str, eval: &str, body: &str) -> Experiment {
    let text = format!(
        r#"
{top}
name = "strat"
seed = 11
{setup}crop_scale = [0.5, 1.0]
[eval]
batch_size = 8
{eval}
{body}
"#,
        setup = common::tiny_setup(dir),
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, text).unwrap();
    Registry::builtin().load(&p, &[]).unwrap()
}

const THREE_STAGES: &str = r#"
[[stages]]
task = "seg"
epochs = 2
batch_size = 4
[[stages]]
task = "det"
epochs = 1
batch_size = 4
lr_scale = { backbone = 0.1, neck = 0.3 }
[[stages]]
task = "cls"
epochs = 1
batch_size = 4
lr_scale = { backbone = 0.1, neck = 0.3 }
"#;

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        ..RunOptions::default()
    }
}

#[test]
fn every_strategy_together_trains_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{THREE_STAGES}
[replay]
enabled = true
images_per_batch = 2
policy = "reservoir"
capacity = 8
normalize = "reference"
distill_alpha = 0.5
task_weights = {{ det = 1.5 }}
[lwf]
alpha = 1.0
teacher = "per_task"
[ewc]
lambda = 10.0
samples = 4
[der]
alpha = 0.3
beta = 0.5
capacity = 6
images_per_batch = 2
[agem]
enabled = true
capacity = 4
images_per_batch = 2
class_balanced = true
[uncertainty]
enabled = true
"#
    );
    let exp = experiment(tmp.path(), "", "", &body);
    let full = run(&exp, &quiet()).unwrap();
    let (h, rows) = common::read_csv(&full.run_dir.join("epochs.csv"));
    let col = |n: &str| {
        h.iter()
            .position(|c| c == n)
            .unwrap_or_else(|| panic!("no {n}"))
    };
    let v = |r: usize, n: &str| rows[r][col(n)].parse::<f64>().unwrap();
    for term in ["loss_replay", "loss_distill", "loss_lwf", "loss_ewc"] {
        assert_eq!(rows[0][col(term)], "", "{term} in stage 1: an empty cell");
        assert!(v(2, term) > 0.0, "{term} in stage 2");
        assert!(v(3, term) > 0.0, "{term} in stage 3");
    }
    // DER replays its reservoir from the first stage on (the current task's stream too).
    for term in ["loss_der", "loss_derpp"] {
        assert!((0..4).all(|r| v(r, term) > 0.0), "{term}");
    }
    // Mid-epoch in stage 1, a stage boundary (teachers, Fisher, buffer just made), mid-det.
    for (epochs, steps) in [(None, Some(6)), (Some(2), None), (None, Some(10))] {
        let err = run(
            &exp,
            &RunOptions {
                quiet: true,
                stop_after_epochs: epochs,
                stop_after_steps: steps,
                ..RunOptions::default()
            },
        )
        .unwrap_err();
        let dir = err.downcast_ref::<Stopped>().unwrap().run_dir.clone();
        let resumed = resume(&dir, &quiet()).unwrap();
        let (_, again) = common::read_csv(&dir.join("epochs.csv"));
        assert_eq!(again.len(), rows.len());
        for (r, (a, b)) in again.iter().zip(&rows).enumerate() {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if !common::is_timing(&h[i]) {
                    assert_eq!(
                        x, y,
                        "stop {epochs:?}/{steps:?}: row {r} {} differs\n{a:?}\n{b:?}",
                        h[i]
                    );
                }
            }
        }
        assert_eq!(resumed.summary.final_metrics, full.summary.final_metrics);
    }
}

/// LwF's term is 0 when the model equals its teacher (both in inference mode), positive
/// once the model moves, and a gradient step on it moves the model back.
#[test]
fn distillation_is_zero_at_the_teacher_and_pulls_back_toward_it() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(
        tmp.path(),
        "",
        "",
        &format!("{THREE_STAGES}\n[lwf]\nalpha = 1.0\n"),
    );
    let registry = Registry::builtin();
    let s = Session::start(&exp, &registry, quiet(), None).unwrap();
    let env = &s.env;
    let pools = vec![(0..16).collect::<Vec<usize>>(), (0..16).collect()];
    let mut lwf = onehead::plugins::lwf::Lwf::new(
        &onehead::plugins::registry::settings::<onehead::plugins::lwf::Lwf>(&exp).unwrap(),
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    lwf.after_stage(&env.ctx(0, &pools), &mut rng).unwrap();
    let det = env.tasks.get("det").unwrap();
    let batch = det
        .batch(Split::Train, &[0, 1, 2, 3], &[], &env.device)
        .unwrap();
    let term = |lwf: &mut onehead::plugins::lwf::Lwf| {
        let map = env.model.forward_t(&batch.images, false).unwrap();
        let view = StepView {
            images: &batch.images,
            map: &map,
            new: Rows {
                task: "det",
                batch: &batch,
                start: 0,
            },
            new_augs: &[],
            mine: vec![],
        };
        let terms = lwf.loss(&env.ctx(1, &pools), &view).unwrap();
        assert_eq!(terms.len(), 1, "one earlier task (seg) to distil");
        assert_eq!(terms[0].task.as_deref(), Some("seg"));
        terms[0].value.clone()
    };
    let at_teacher = term(&mut lwf).to_scalar::<f32>().unwrap();
    assert!(at_teacher.abs() < 1e-6, "{at_teacher}");
    // Move the head's last layer away from the teacher (noise: a constant shift of every
    // class logit would leave the softmax, and so the term, unchanged).
    let data = env.varmap.data().lock().unwrap();
    let w = data["head.out.weight"].clone();
    drop(data);
    // Seeded noise: candle's randn on CPU draws from the thread RNG.
    let noise: Vec<f32> = (0..w.elem_count())
        .map(|_| rand::Rng::random_range(&mut rng, -0.8f32..0.8))
        .collect();
    let noise = candle_core::Tensor::from_vec(noise, w.shape(), &env.device).unwrap();
    let moved = (w.as_tensor() + noise).unwrap();
    w.set(&moved).unwrap();
    let t = term(&mut lwf);
    let away = t.to_scalar::<f32>().unwrap();
    assert!(away > 1e-5, "{away}");
    // One gradient step on the term alone brings the model closer to the teacher. The step
    // is sized so that, to first order, it removes a quarter of the term (a fixed learning
    // rate is too small or too large depending on the term's scale).
    let g = t.backward().unwrap();
    let gw = g.get(w.as_tensor()).unwrap();
    let g2 = gw
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(g2 > 0.0, "the term has a gradient in the head");
    let lr = 0.25 * away / g2;
    w.set(&(w.as_tensor() - (gw * lr as f64).unwrap()).unwrap())
        .unwrap();
    let after = term(&mut lwf).to_scalar::<f32>().unwrap();
    assert!(after < 0.9 * away, "{after} !< 0.9 * {away}");
}

#[test]
fn joint_trains_every_task_in_one_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), "mode = \"joint\"", "", THREE_STAGES);
    let out = run(&exp, &quiet()).unwrap();
    let (h, rows) = common::read_csv(&out.run_dir.join("epochs.csv"));
    // One stage of round((2 + 1 + 1) / 3) = 1 epoch; every task evaluated.
    assert_eq!(rows.len(), 1);
    let col = |n: &str| h.iter().position(|c| c == n).unwrap();
    for m in ["seg_miou", "det_map50", "cls_top1"] {
        assert!(!rows[0][col(m)].is_empty(), "{m}");
    }
    assert!(rows[0][col("loss_joint")].parse::<f64>().unwrap() > 0.0);
    assert_eq!(out.summary.matrix.stages, ["seg"]);
}

#[test]
fn single_task_runs_restart_every_stage_from_the_initial_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), "mode = \"single_task\"", "", THREE_STAGES);
    // Stop right after stage 1: the saved model must be the initial one again.
    let err = run(
        &exp,
        &RunOptions {
            quiet: true,
            stop_after_epochs: Some(2),
            ..RunOptions::default()
        },
    )
    .unwrap_err();
    let dir = err.downcast_ref::<Stopped>().unwrap().run_dir.clone();
    let registry = Registry::builtin();
    let fresh = Session::start(&exp, &registry, quiet(), None).unwrap();
    let state_file = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let saved = candle_core::safetensors::load(&state_file, &candle_core::Device::Cpu).unwrap();
    for (name, var) in fresh.env.varmap.data().lock().unwrap().iter() {
        let a: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = saved[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{name} is not the initial weight after stage 1");
    }
    let out = resume(&dir, &quiet()).unwrap();
    // Only the diagonal of the matrix: each task is evaluated in its own stage only.
    let m = &out.summary.matrix.values;
    assert!(m[0][0].is_some() && m[0][1].is_none() && m[1][2].is_none() && m[2][2].is_some());
}

#[test]
fn the_single_task_baseline_is_trained_once_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(
        tmp.path(),
        "",
        "baseline = \"single_task\"",
        &format!("{THREE_STAGES}\n[replay]\nenabled = true\nimages_per_batch = 2\n"),
    );
    let a = run(&exp, &quiet()).unwrap();
    // Another strategy on the same benchmark and seed: the same reference.
    let lwf = experiment(
        tmp.path(),
        "",
        "",
        &format!("{THREE_STAGES}\n[lwf]\nalpha = 1.0\n"),
    );
    let b = run(&lwf, &quiet()).unwrap();
    let reference = a.summary.baseline_run.clone().unwrap();
    assert_eq!(b.summary.baseline_run.as_deref(), Some(reference.as_str()));
    let refs = std::fs::read_dir(tmp.path().join("results/references"))
        .unwrap()
        .count();
    assert_eq!(refs, 1, "the reference is reused, not retrained");
    // The baselines are the reference's values on the held-out split, not this run's.
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&reference).join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(r["verdict_split"], "test");
    for (t, rt) in a.summary.tasks.iter().zip(r["tasks"].as_array().unwrap()) {
        assert_eq!(
            t.baseline,
            rt["final_value"].as_f64().unwrap(),
            "{}",
            t.task
        );
    }
    assert_eq!(a.summary.tasks.len(), 3);
    // Every task, the last one included, has a paired-bootstrap interval from the per-image
    // scores of the reference and of this run, both kept on disk.
    assert_eq!(a.summary.verdict_split, "test");
    for t in &a.summary.tasks {
        let [lo, hi] = t
            .drop_interval
            .unwrap_or_else(|| panic!("{} has no interval", t.task));
        assert!(lo <= hi, "{t:?}");
        let [base, fin] = t.scores.clone().unwrap();
        assert!(base.starts_with(&reference), "{base}");
        assert!(Path::new(&base).is_file() && Path::new(&fin).is_file());
    }
}

#[test]
fn two_runs_started_together_share_one_reference_the_second_waits_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let control = experiment(tmp.path(), "", "", THREE_STAGES);
    let replay = experiment(
        tmp.path(),
        "",
        "",
        &format!("{THREE_STAGES}\n[replay]\nenabled = true\nimages_per_batch = 2\n"),
    );
    let handles: Vec<_> = [control, replay]
        .into_iter()
        .map(|exp| std::thread::spawn(move || run(&exp, &quiet()).unwrap()))
        .collect();
    let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refs: Vec<_> = std::fs::read_dir(tmp.path().join("results/references"))
        .unwrap()
        .collect();
    assert_eq!(refs.len(), 1, "one reference, trained once");
    assert_eq!(outs[0].summary.baseline_run, outs[1].summary.baseline_run);
    for (a, b) in outs[0].summary.tasks.iter().zip(&outs[1].summary.tasks) {
        assert_eq!(a.baseline, b.baseline, "{}", a.task);
    }
}

#[test]
fn a_reference_under_another_key_is_found_by_what_it_trained() {
    // A reference trained under an older key scheme (or copied from another sweep) sits in
    // references/ under a name that is not today's key: a later run finds it by its config
    // instead of training the same thing again.
    let tmp = tempfile::tempdir().unwrap();
    let control = experiment(tmp.path(), "", "", THREE_STAGES);
    let first = run(&control, &quiet()).unwrap();
    let refs = tmp.path().join("results/references");
    let trained = PathBuf::from(first.summary.baseline_run.clone().unwrap());
    let moved = refs.join("00000000older-key");
    std::fs::rename(&trained, &moved).unwrap();
    let replay = experiment(
        tmp.path(),
        "",
        "",
        &format!("{THREE_STAGES}\n[replay]\nenabled = true\nimages_per_batch = 2\n"),
    );
    let second = run(&replay, &quiet()).unwrap();
    assert_eq!(
        std::fs::read_dir(&refs).unwrap().count(),
        1,
        "not trained again"
    );
    assert_eq!(
        second.summary.baseline_run.as_deref(),
        Some(moved.to_str().unwrap())
    );
    for (a, b) in first.summary.tasks.iter().zip(&second.summary.tasks) {
        assert_eq!(a.baseline, b.baseline, "{}", a.task);
    }
    // Another seed is another reference: trained, not matched to the moved one.
    let mut other = control.clone();
    other.seed += 1;
    run(&other, &quiet()).unwrap();
    assert_eq!(std::fs::read_dir(&refs).unwrap().count(), 2);
}

#[test]
fn der_stores_each_image_with_its_outputs_when_trained_and_replays_it_aligned() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(
        tmp.path(),
        "",
        "",
        &format!("{THREE_STAGES}\n[der]\nalpha = 1.0\ncapacity = 8\nimages_per_batch = 4\n"),
    );
    let registry = Registry::builtin();
    let s = Session::start(&exp, &registry, quiet(), None).unwrap();
    let env = &s.env;
    let pools = vec![(0..16).collect::<Vec<usize>>()];
    let ctx = env.ctx(0, &pools);
    let settings =
        onehead::plugins::registry::settings::<onehead::plugins::der::Der>(&exp).unwrap();
    let mut der = <onehead::plugins::der::Der as onehead::plugins::Strategy>::build(
        settings,
        &onehead::plugins::BuildCtx {
            exp: &exp,
            varmap: &env.varmap,
            device: &env.device,
        },
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    // Empty buffer: nothing replayed yet.
    assert!(der.extra_batches(&ctx, &mut rng).unwrap().is_empty());
    // A step of 4 seg images, two of them flipped: all four go in with this step's outputs.
    let seg = env.tasks.get("seg").unwrap();
    let augs: Vec<onehead::data::Augment> = (0..4)
        .map(|k| onehead::data::Augment::flip_only(k % 2 == 0))
        .collect();
    let batch = seg
        .batch(Split::Train, &[3, 5, 7, 9], &augs, &env.device)
        .unwrap();
    let map = env.model.forward_t(&batch.images, false).unwrap();
    let view = StepView {
        images: &batch.images,
        map: &map,
        new: Rows {
            task: "seg",
            batch: &batch,
            start: 0,
        },
        new_augs: &augs,
        mine: vec![],
    };
    assert!(der.loss(&ctx, &view).unwrap().is_empty());
    let stored: Vec<_> = der
        .entries()
        .map(|(t, i, o)| (t.to_string(), i, o.clone()))
        .collect();
    assert_eq!(stored.len(), 4);
    let own = env.tasks.slice(&map, "seg").unwrap();
    for (k, (task, index, outputs)) in stored.iter().enumerate() {
        assert_eq!((task.as_str(), *index), ("seg", [3, 5, 7, 9][k]));
        let diff = (outputs - own.narrow(0, k, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "entry {k} holds the step's own outputs");
    }
    // The next step replays them with the augmentation they were trained with: the same
    // model gives the same outputs, so the MSE is zero (a fresh flip would not).
    let extra = der.extra_batches(&ctx, &mut rng).unwrap();
    assert_eq!(extra.len(), 1);
    let replayed = &extra[0].batch;
    let next = seg
        .batch(Split::Train, &[11, 12, 13, 14], &[], &env.device)
        .unwrap();
    let images = candle_core::Tensor::cat(&[&next.images, &replayed.images], 0).unwrap();
    let map = env.model.forward_t(&images, false).unwrap();
    let view = StepView {
        images: &images,
        map: &map,
        new: Rows {
            task: "seg",
            batch: &next,
            start: 0,
        },
        new_augs: &[onehead::data::Augment::default(); 4],
        mine: vec![Rows {
            task: "seg",
            batch: replayed,
            start: 4,
        }],
    };
    let terms = der.loss(&ctx, &view).unwrap();
    assert_eq!(terms.len(), 1);
    let mse = terms[0].value.to_scalar::<f32>().unwrap();
    assert!(mse < 1e-10, "{mse}");
    // Capacity 8: the second step's four images were appended too.
    assert_eq!(der.entries().count(), 8);
}

#[test]
fn a_per_task_budget_keeps_that_many_images_of_every_task_and_reports_its_memory() {
    // A reservoir and a class-balanced buffer of the same budget keep as many images.
    for policy in ["reservoir", "class_balanced"] {
        let tmp = tempfile::tempdir().unwrap();
        let exp = experiment(
            tmp.path(),
            "",
            "baseline = \"stage_end\"",
            &format!(
                "{THREE_STAGES}\n[replay]\nenabled = true\nimages_per_batch = 2\npolicy = \"{policy}\"\ncapacity = 3\ncapacity_unit = \"per_task\"\n"
            ),
        );
        let out = run(&exp, &quiet()).unwrap();
        // The last stage replays seg and det: 3 images of each, 64-px float pixels.
        let b = &out.summary.buffers["replay"];
        assert_eq!(b.images, 6, "{policy}");
        assert!((b.images_mib - 6.0 * 3.0 * 64.0 * 64.0 * 4.0 / 1048576.0).abs() < 1e-12);
        assert_eq!(b.outputs_mib, 0.0);
    }
}
