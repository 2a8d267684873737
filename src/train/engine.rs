//! The training loop, top to bottom: stages in order, epochs, steps. Everything else hangs
//! on plug-in hooks ([`crate::plugins`]) or is a service of the [`Session`] (evaluation,
//! logs, checkpoints, resume state, summary).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;

use super::evaluate::{evaluate, evaluate_scored};
use super::launch::{RunOutcome, Stopped};
use super::optim::{trainable_params, Optimizer, Param};
use super::schedule::LrSchedule;
use super::session::Session;
use super::state::PartialEpoch;
use super::step::{train_step, StepLosses, StepTimes};
use crate::config::Freeze;
use crate::report::{EpochRow, EvalRecord};
use crate::tasks::Split;

/// Train `s` from wherever it stands to the end, then judge it.
pub fn train(mut s: Session) -> Result<RunOutcome> {
    let clock = Instant::now();
    let seconds = |s: &Session| s.progress.seconds_before + clock.elapsed().as_secs_f64();
    tracing::info!(
        "run folder {} (if interrupted: onehead resume {})",
        s.run_dir.display(),
        s.run_dir.display()
    );
    std::fs::create_dir_all(s.run_dir.join("checkpoints"))?;
    for si in s.progress.stage..s.env.stages.len() {
        s.progress.stage = si;
        let mut opt = begin_stage(&mut s, si)?;
        let stage = s.env.stages[si].clone();
        let steps =
            (s.progress.pools[si].len() / stage.batch_size.min(s.progress.pools[si].len())).max(1);
        let schedule = LrSchedule::for_stage(&stage, steps);
        for epoch in s.progress.next_epoch..=stage.epochs {
            let t0 = Instant::now();
            let Some(done) = train_epoch(&mut s, &mut opt, &schedule, si, epoch)? else {
                s.save_state(&opt, seconds(&s))?;
                let p = s
                    .progress
                    .partial
                    .as_ref()
                    .context("an interrupted epoch is saved")?;
                return Err(stopped(
                    &s,
                    format!("step {} of epoch {}", p.steps_done, p.epoch),
                ));
            };
            s.progress.global_epoch += 1;
            s.progress.next_epoch = epoch + 1;
            let t_eval = Instant::now();
            let evals = evaluate_epoch(&s, si, epoch)?;
            let times = EpochTimes {
                total: done.before + t0.elapsed().as_secs_f64(),
                steps: done.times,
                eval: t_eval.elapsed().as_secs_f64(),
            };
            log_epoch(&mut s, si, epoch, done.lr, done.losses, &evals, times)?;
            s.progress.history.extend(evals);
            let ctx = s.env.ctx(si, &s.progress.pools);
            for p in s.plugins.iter_mut() {
                p.after_epoch(&ctx, epoch)?;
            }
            if epoch == stage.epochs {
                end_stage(&mut s, si)?;
            }
            s.save_state(&opt, seconds(&s))?;
            // After the run's last epoch there is nothing left to resume: finish instead.
            let last = si + 1 == s.env.stages.len() && epoch == stage.epochs;
            let stop = s.opts.stop_after_epochs == Some(s.progress.global_epoch);
            if !last && (stop || interrupted(&s)) {
                return Err(stopped(&s, format!("epoch {}", s.progress.global_epoch)));
            }
        }
        s.progress.next_epoch = 1;
    }
    let secs = seconds(&s);
    s.finish(secs)
}

/// Stage start: the stage's training pool, its optimiser, and the plug-ins' `before_stage`;
/// on resume, the saved optimiser and plug-in state.
fn begin_stage(s: &mut Session, si: usize) -> Result<Optimizer> {
    let stage = s.env.stages[si].clone();
    if s.progress.pools.len() <= si {
        // A fixed, seeded subset when the stage trains on fewer images than the split has.
        let n = s.env.tasks.get(&stage.task)?.len(Split::Train);
        let mut pool: Vec<usize> = (0..n).collect();
        if stage.train_limit > 0 && stage.train_limit < n {
            pool.shuffle(&mut s.rng);
            pool.truncate(stage.train_limit);
        }
        anyhow::ensure!(!pool.is_empty(), "stage {}: empty training pool", si + 1);
        s.progress.pools.push(pool);
    }
    let frozen: Vec<&str> = match stage.freeze {
        Freeze::Backbone => vec!["backbone."],
        _ => vec![],
    };
    // On resume the plug-ins get their saved state back: mid-stage after `before_stage` has
    // rebuilt what it derives from the config (as when the state was saved); at a stage
    // boundary before the new stage's `before_stage`, as an uninterrupted run would see it.
    let resumed = s.resumed.take();
    let mid_stage = resumed.as_ref().is_some_and(|(st, _)| st.stage == si);
    let mut optim_state = None;
    if mid_stage {
        before_stage(s, si)?;
    }
    if let Some((st, mut extra)) = resumed {
        for (p, (json, tensors)) in s
            .plugins
            .iter_mut()
            .zip(st.plugins.into_iter().zip(extra.plugins.drain(..)))
        {
            p.load_state(crate::plugins::PluginState { json, tensors })?;
        }
        optim_state = mid_stage.then_some(extra.optim);
    }
    if !mid_stage {
        before_stage(s, si)?;
    }
    let mut params = trainable_params(&s.env.varmap, &frozen);
    for p in params.iter_mut() {
        p.lr_scale = stage.lr_scale.for_param(&p.name);
    }
    for p in &s.plugins {
        params.extend(p.parameters().into_iter().map(|(name, var)| Param {
            name,
            var,
            decay: false,
            lr_scale: 1.0,
        }));
    }
    let mut opt = Optimizer::new(stage.optimizer, params, stage.weight_decay, stage.momentum);
    if let Some(o) = optim_state {
        opt.load_state_tensors(&o)?;
    }
    Ok(opt)
}

fn before_stage(s: &mut Session, si: usize) -> Result<()> {
    let ctx = s.env.ctx(si, &s.progress.pools);
    for p in s.plugins.iter_mut() {
        p.before_stage(&ctx, &mut s.rng)?;
    }
    Ok(())
}

/// A trained epoch: its mean losses, last learning rate, the seconds an earlier session
/// already spent in it, and (over both sessions) where the steps' time went.
struct EpochDone {
    losses: StepLosses,
    lr: f64,
    before: f64,
    times: StepTimes,
}

/// An epoch's wall time for `epochs.csv`: the whole, the steps' data and compute parts, and
/// the evaluation.
struct EpochTimes {
    total: f64,
    steps: StepTimes,
    eval: f64,
}

/// Train one epoch (or the rest of an interrupted one). `None` when interrupted mid-epoch
/// (the position is in `s.progress.partial`).
fn train_epoch(
    s: &mut Session,
    opt: &mut Optimizer,
    schedule: &LrSchedule,
    si: usize,
    epoch: usize,
) -> Result<Option<EpochDone>> {
    let stage = s.env.stages[si].clone();
    let pool = &s.progress.pools[si];
    let bs = stage.batch_size.min(pool.len());
    // Drop the last incomplete batch: a batch of 1 would wreck BatchNorm statistics.
    let steps = (pool.len() / bs).max(1);
    let (order, first, mut sums, before, mut times) = match s.progress.partial.take() {
        Some(p) if p.epoch == epoch => {
            let times = StepTimes {
                data: p.data_seconds,
                compute: p.step_seconds,
            };
            (p.order, p.steps_done, p.sums, p.seconds, times)
        }
        _ => {
            let mut order = pool.clone();
            order.shuffle(&mut s.rng);
            (order, 0, BTreeMap::new(), 0.0, StepTimes::default())
        }
    };
    let t0 = Instant::now();
    let pb = progress_bar(s, steps, si, epoch);
    pb.set_position(first as u64);
    let mut lr = 0.0;
    for step in first..steps {
        let idx = &order[step * bs..(step + 1) * bs];
        lr = schedule.lr((epoch - 1) * steps + step);
        let ctx = s.env.ctx(si, &s.progress.pools);
        let (losses, t) =
            train_step(&ctx, &mut s.plugins, opt, &mut s.rng, idx, lr).with_context(|| {
                format!(
                    "stage {} ({}), epoch {epoch}, step {step}",
                    si + 1,
                    stage.task
                )
            })?;
        for (k, v) in losses {
            *sums.entry(k).or_insert(0.0) += v;
        }
        times.data += t.data;
        times.compute += t.compute;
        s.progress.steps += 1;
        pb.inc(1);
        pb.set_message(format!(
            "loss {:.4}",
            sums.get("loss_total").copied().unwrap_or(0.0) / (step + 1) as f64
        ));
        let stop = s.opts.stop_after_steps == Some(s.progress.steps) || interrupted(s);
        if stop && step + 1 < steps {
            pb.finish_and_clear();
            s.progress.partial = Some(PartialEpoch {
                epoch,
                order: order.clone(),
                steps_done: step + 1,
                sums,
                seconds: before + t0.elapsed().as_secs_f64(),
                data_seconds: times.data,
                step_seconds: times.compute,
            });
            return Ok(None);
        }
    }
    pb.finish_and_clear();
    let means = sums
        .into_iter()
        .map(|(k, v)| (k, v / steps as f64))
        .collect();
    Ok(Some(EpochDone {
        losses: means,
        lr,
        before,
        times,
    }))
}

/// Evaluate every task learned so far, when this epoch is due (every `eval.every` epochs
/// and always at a stage's end).
fn evaluate_epoch(s: &Session, si: usize, epoch: usize) -> Result<Vec<EvalRecord>> {
    let exp = &s.env.exp;
    if !epoch.is_multiple_of(exp.eval.every) && epoch != s.env.stages[si].epochs {
        return Ok(vec![]);
    }
    exp.evaluated_tasks(si)
        .into_iter()
        .map(|task| {
            let metrics = evaluate(
                &s.env.model,
                &s.env.tasks,
                &task,
                exp.eval.batch_size,
                &s.env.device,
            )?;
            Ok(EvalRecord {
                stage: si,
                epoch,
                global_epoch: s.progress.global_epoch,
                task,
                metrics,
            })
        })
        .collect()
}

/// The epoch's row, handed with its evaluations to every sink of the run.
fn log_epoch(
    s: &mut Session,
    si: usize,
    epoch: usize,
    lr: f64,
    losses: StepLosses,
    evals: &[EvalRecord],
    times: EpochTimes,
) -> Result<()> {
    let mut row = EpochRow {
        stage: si + 1,
        task: s.env.stages[si].task.clone(),
        epoch,
        global_epoch: s.progress.global_epoch,
        lr: Some(lr),
        losses,
        seconds: Some(times.total),
        end_time: Some(unix_now_ms()),
        data_seconds: Some(times.steps.data),
        step_seconds: Some(times.steps.compute),
        eval_seconds: Some(times.eval),
        ..Default::default()
    };
    for e in evals {
        for (k, v) in &e.metrics {
            row.metrics.insert(format!("{}_{k}", e.task), *v);
        }
    }
    for sink in &mut s.sinks {
        sink.epoch(&row, evals)?;
    }
    Ok(())
}

/// Now as Unix seconds, to the millisecond (what `epochs.csv` keeps, so that live and
/// exported TensorBoard scalars carry the same wall time).
fn unix_now_ms() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_millis() as f64 / 1000.0
}

/// Stage end: the verdict split's evaluation, checkpoint, matrix, and the plug-ins'
/// `after_stage`.
fn end_stage(s: &mut Session, si: usize) -> Result<()> {
    evaluate_stage_end(s, si)?;
    let ckpt = s.run_dir.join("checkpoints").join(format!(
        "stage{}-{}.safetensors",
        si + 1,
        s.env.stages[si].task
    ));
    let tmp = ckpt.with_extension("safetensors.tmp");
    s.env.varmap.save(&tmp)?;
    // safetensors writes through a private temp file (mode 0600): give the checkpoint the
    // mode of every other file of the run.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, &ckpt)
        .with_context(|| format!("renaming {} to {}", tmp.display(), ckpt.display()))?;
    s.write_matrix(si + 1)?;
    let ctx = s.env.ctx(si, &s.progress.pools);
    for p in s.plugins.iter_mut() {
        p.after_stage(&ctx, &mut s.rng)?;
    }
    Ok(())
}

/// Every task learned so far on the verdict's split (test when the data has one), with its
/// per-image scores written to `scores/stage<k>-<task>.json` for the bootstrap. Only here:
/// the held-out images are never seen during a stage, so nothing can be chosen on them.
fn evaluate_stage_end(s: &mut Session, si: usize) -> Result<()> {
    let exp = &s.env.exp;
    let split = s.env.verdict_split();
    let clock = Instant::now();
    for task in exp.evaluated_tasks(si) {
        let (metrics, scores) = evaluate_scored(
            &s.env.model,
            &s.env.tasks,
            &task,
            split,
            exp.eval.batch_size,
            &s.env.device,
        )?;
        if let Some(scores) = scores {
            let path = crate::report::scores_file(&s.run_dir, si + 1, &task);
            std::fs::create_dir_all(path.parent().context("scores/ has a parent")?)?;
            crate::report::write_atomic(&path, &serde_json::to_vec(&scores)?)?;
        }
        s.progress.verdict.push(EvalRecord {
            stage: si,
            epoch: s.env.stages[si].epochs,
            global_epoch: s.progress.global_epoch,
            task,
            metrics,
        });
    }
    tracing::debug!(
        "stage {} end: {} evaluated in {:.2} s",
        si + 1,
        split.name(),
        clock.elapsed().as_secs_f64()
    );
    Ok(())
}

fn interrupted(s: &Session) -> bool {
    s.opts
        .interrupt
        .as_ref()
        .is_some_and(|f| f.load(Ordering::SeqCst))
}

fn stopped(s: &Session, what: String) -> anyhow::Error {
    Stopped {
        run_dir: s.run_dir.clone(),
        what,
    }
    .into()
}

fn progress_bar(s: &Session, steps: usize, si: usize, epoch: usize) -> ProgressBar {
    if s.opts.quiet {
        return ProgressBar::hidden();
    }
    let stages = &s.env.stages;
    let pb = ProgressBar::new(steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(format!(
        "stage {}/{} {} epoch {}/{}",
        si + 1,
        stages.len(),
        stages[si].task,
        epoch,
        stages[si].epochs
    ));
    pb
}
