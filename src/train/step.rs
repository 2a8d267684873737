//! One optimisation step: the stage's batch plus whatever the plug-ins add, one forward
//! pass over all of it, the loss as a sum of named terms, backward, gradient hooks,
//! clipping, update.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand_chacha::ChaCha8Rng;

use super::optim::Optimizer;
use crate::data::Augment;
use crate::plugins::{LossTerm, Plugin, Rows, RunCtx, StepView};
use crate::tasks::Split;

/// Loss values of one step by `epochs.csv` column (`loss_new`, `loss_<term>`, `loss_total`).
pub type StepLosses = BTreeMap<String, f64>;

/// Where a step's wall time went, in seconds: assembling its batches (augmentation draws,
/// decoding, resizing, the plug-ins' extra batches) and the rest (forward, losses,
/// backward, update).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub data: f64,
    pub compute: f64,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Train on the samples `idx` of the stage's task with learning rate `lr`.
pub fn train_step(
    ctx: &RunCtx,
    plugins: &mut [Box<dyn Plugin>],
    opt: &mut Optimizer,
    rng: &mut ChaCha8Rng,
    idx: &[usize],
    lr: f64,
) -> Result<(StepLosses, StepTimes)> {
    let clock = std::time::Instant::now();
    let stage = &ctx.stages[ctx.stage];
    let task = ctx.tasks.get(&stage.task)?;
    // Draw order (part of the reproducible stream): the stage batch's augmentations, then
    // each plug-in's extra batches in hook order.
    let augs: Vec<Augment> = idx
        .iter()
        .map(|&i| ctx.augment.draw(rng, task.image_aspect(Split::Train, i)))
        .collect();
    let batch = task.batch(Split::Train, idx, &augs, ctx.device)?;
    let mut extras = Vec::with_capacity(plugins.len());
    for p in plugins.iter_mut() {
        extras.push(p.extra_batches(ctx, rng)?);
    }
    let data = clock.elapsed().as_secs_f64();
    let images = if extras.iter().all(|e| e.is_empty()) {
        batch.images.clone()
    } else {
        let mut all = vec![batch.images.clone()];
        all.extend(extras.iter().flatten().map(|e| e.batch.images.clone()));
        Tensor::cat(&all, 0)?
    };
    // One forward pass over the stage's batch and every extra batch together.
    let map = ctx.model.forward_parts(&images, ctx.backbone_train, true)?;
    let new = Rows {
        task: &stage.task,
        batch: &batch,
        start: 0,
    };
    let new_loss = task.loss(&ctx.tasks.slice(&new.of(&map)?, &stage.task)?, &batch)?;
    let mut terms = vec![LossTerm {
        name: "new".into(),
        task: Some(stage.task.clone()),
        value: new_loss.total,
    }];
    let mut start = batch.len();
    for (p, mine) in plugins.iter_mut().zip(&extras) {
        let rows = mine
            .iter()
            .map(|e| {
                let r = Rows {
                    task: &e.task,
                    batch: &e.batch,
                    start,
                };
                start += e.batch.len();
                r
            })
            .collect();
        let view = StepView {
            images: &images,
            map: &map,
            new: Rows {
                task: &stage.task,
                batch: &batch,
                start: 0,
            },
            new_augs: &augs,
            mine: rows,
        };
        terms.extend(p.loss(ctx, &view)?);
    }
    for p in plugins.iter_mut() {
        p.weigh(ctx, &mut terms)?;
    }
    // Terms of one name (e.g. replay's per-task terms) are summed first, then the names
    // in order of first appearance: `new + Σ replay + …`.
    let mut groups: Vec<(&str, Tensor)> = Vec::new();
    for t in &terms {
        match groups.iter_mut().find(|(n, _)| *n == t.name) {
            Some((_, sum)) => *sum = (&*sum + &t.value)?,
            None => groups.push((&t.name, t.value.clone())),
        }
    }
    let mut total = groups[0].1.clone();
    for (_, g) in &groups[1..] {
        total = (total + g)?;
    }
    let total_v = scalar(&total)?;
    if !total_v.is_finite() {
        anyhow::bail!(
            "loss became {total_v}: lower the learning rate (lr = {}) or set grad_clip_norm",
            stage.lr
        );
    }
    let mut grads = total.backward()?;
    for p in plugins.iter_mut() {
        p.after_backward(ctx, &mut grads)?;
    }
    let scale = if stage.grad_clip_norm > 0.0 {
        let norm = opt.grad_norm(&grads)?;
        if norm > stage.grad_clip_norm {
            stage.grad_clip_norm / norm
        } else {
            1.0
        }
    } else {
        1.0
    };
    opt.step(&grads, lr, scale)?;
    let mut out = StepLosses::new();
    for t in &terms {
        *out.entry(format!("loss_{}", t.name)).or_insert(0.0) += scalar(&t.value)?;
    }
    out.insert("loss_total".into(), total_v);
    let times = StepTimes {
        data,
        compute: clock.elapsed().as_secs_f64() - data,
    };
    Ok((out, times))
}
