//! Learning without Forgetting (Li & Hoiem 2016) for a multi-task head: a frozen copy of the
//! model gives soft targets for the earlier tasks' outputs on every image of the step (the
//! stage's and the replayed ones), and each earlier task's own distillation loss (per-pixel
//! KL for segmentation, objectness/class/box for detection, class KL for classification;
//! see each task's `distill`) pulls the model's outputs toward them:
//! `lwf = Σ_t α_t · distill_t(model, teacher)`.
//!
//! The teacher is the model at the end of the previous stage (`teacher = "latest"`, one
//! extra forward pass per step), or for each earlier task the model at the end of the stage
//! that learned it, i.e. the model its baseline was measured on (`"per_task"`). Teachers
//! run in inference mode (BatchNorm running statistics, never updated).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use rand_chacha::ChaCha8Rng;

use super::{LossTerm, Plugin, PluginState, RunCtx, StepView};
use serde::{Deserialize, Serialize};

use super::registry::{BuildCtx, Strategy};
use crate::config::Experiment;
use crate::model::Frozen;
use crate::tasks::DistillParams;

/// Which frozen model distillation pulls toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherKind {
    /// The model at the end of the previous stage, for every earlier task (one extra
    /// forward pass per step).
    Latest,
    /// For each earlier task the model at the end of the stage that learned it, i.e. its
    /// baseline (one extra forward pass per earlier task).
    PerTask,
}

/// Learning without Forgetting: a frozen teacher's outputs for the earlier tasks, on every
/// image of the step (new and replayed), are soft targets for the model's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LwfConfig {
    /// Weight of the distillation term (0 = off).
    pub alpha: f64,
    /// Per-task weights overriding `alpha`, e.g. `{ seg = 10.0, det = 5.0 }`.
    pub task_alpha: BTreeMap<String, f64>,
    /// Softmax temperature of the soft targets (Hinton et al.; LwF uses 2).
    pub temperature: f64,
    pub teacher: TeacherKind,
}

impl Default for LwfConfig {
    fn default() -> Self {
        Self {
            alpha: 0.0,
            task_alpha: BTreeMap::new(),
            temperature: 2.0,
            teacher: TeacherKind::Latest,
        }
    }
}

impl LwfConfig {
    pub fn alpha_of(&self, task: &str) -> f64 {
        self.task_alpha.get(task).copied().unwrap_or(self.alpha)
    }

    pub fn enabled(&self) -> bool {
        self.alpha > 0.0 || self.task_alpha.values().any(|&a| a > 0.0)
    }
}

struct Teacher {
    /// The earlier tasks this teacher distils.
    tasks: Vec<String>,
    model: Frozen,
}

pub struct Lwf {
    cfg: LwfConfig,
    teachers: Vec<Teacher>,
}

impl Lwf {
    pub fn new(cfg: &LwfConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            teachers: vec![],
        }
    }
}

impl Strategy for Lwf {
    const NAME: &'static str = "lwf";
    type Settings = LwfConfig;

    fn is_on(s: &LwfConfig) -> bool {
        s.enabled()
    }

    fn validate(w: &LwfConfig, exp: &Experiment) -> Result<(), String> {
        exp.named_tasks("lwf.task_alpha", w.task_alpha.keys())?;
        let ok = |a: f64| a >= 0.0 && a.is_finite();
        if !(ok(w.alpha) && w.task_alpha.values().all(|a| ok(*a))) {
            return Err("lwf.alpha and lwf.task_alpha must be finite numbers >= 0".into());
        }
        if !(w.temperature > 0.0 && w.temperature.is_finite()) {
            return Err("lwf.temperature must be > 0".into());
        }
        Ok(())
    }

    fn build(cfg: LwfConfig, _ctx: &BuildCtx) -> Result<Self> {
        Ok(Self::new(&cfg))
    }
}

impl Plugin for Lwf {
    fn name(&self) -> &str {
        "lwf"
    }

    fn loss_terms(&self) -> Vec<String> {
        vec!["lwf".into()]
    }

    fn loss(&mut self, ctx: &RunCtx, step: &StepView) -> Result<Vec<LossTerm>> {
        let current = ctx.stage_task();
        let p = DistillParams {
            temperature: self.cfg.temperature,
        };
        let mut terms = Vec::new();
        for teacher in &self.teachers {
            let tasks: Vec<&String> = teacher
                .tasks
                .iter()
                .filter(|t| t.as_str() != current && self.cfg.alpha_of(t) > 0.0)
                .collect();
            if tasks.is_empty() {
                continue;
            }
            let target = teacher.model.model.forward_t(step.images, false)?.detach();
            for t in tasks {
                let task = ctx.tasks.get(t)?;
                let d = task.distill(
                    &ctx.tasks.slice(step.map, t)?,
                    &ctx.tasks.slice(&target, t)?,
                    &p,
                )?;
                terms.push(LossTerm {
                    name: "lwf".into(),
                    task: Some(t.clone()),
                    value: (d * self.cfg.alpha_of(t))?,
                });
            }
        }
        Ok(terms)
    }

    fn after_stage(&mut self, ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        let task = ctx.stage_task().to_string();
        let frozen = Frozen::snapshot(ctx.varmap, ctx.head_config, ctx.device)?;
        match self.cfg.teacher {
            TeacherKind::Latest => {
                let mut tasks: Vec<String> = Vec::new();
                for s in &ctx.stages[..=ctx.stage] {
                    if !tasks.contains(&s.task) {
                        tasks.push(s.task.clone());
                    }
                }
                self.teachers = vec![Teacher {
                    tasks,
                    model: frozen,
                }];
            }
            TeacherKind::PerTask => {
                // A task learned again gets its newer baseline model.
                for t in &mut self.teachers {
                    t.tasks.retain(|x| *x != task);
                }
                self.teachers.retain(|t| !t.tasks.is_empty());
                self.teachers.push(Teacher {
                    tasks: vec![task],
                    model: frozen,
                });
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<PluginState> {
        let mut tensors = BTreeMap::new();
        for (i, t) in self.teachers.iter().enumerate() {
            for (k, v) in t.model.tensors()? {
                tensors.insert(format!("t{i}.{k}"), v);
            }
        }
        let tasks: Vec<&Vec<String>> = self.teachers.iter().map(|t| &t.tasks).collect();
        Ok(PluginState {
            json: serde_json::json!({ "teachers": tasks }),
            tensors,
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        let tasks: Vec<Vec<String>> = serde_json::from_value(state.json["teachers"].clone())
            .with_context(|| format!("lwf state is not readable: {}", state.json))?;
        let mut per: Vec<BTreeMap<String, candle_core::Tensor>> =
            vec![BTreeMap::new(); tasks.len()];
        for (name, t) in state.tensors {
            let (i, k) = name
                .strip_prefix('t')
                .and_then(|r| r.split_once('.'))
                .with_context(|| format!("lwf state: unexpected tensor {name}"))?;
            let i: usize = i
                .parse()
                .with_context(|| format!("lwf state tensor {name}"))?;
            per.get_mut(i)
                .with_context(|| format!("lwf state: tensor {name} of no teacher"))?
                .insert(k.to_string(), t);
        }
        self.teachers.clear();
        for (tasks, tensors) in tasks.into_iter().zip(per) {
            // The teacher's shape is the model's: the head config comes from the tensors.
            let cfg = crate::model::OneHeadConfig {
                fpn_channels: tensors
                    .get("head.conv.bias")
                    .context("lwf state lacks head.conv.bias")?
                    .dims1()?,
                head_channels: tensors
                    .get("head.out.bias")
                    .context("lwf state lacks head.out.bias")?
                    .dims1()?,
            };
            let device = tensors
                .values()
                .next()
                .map(|t| t.device().clone())
                .context("lwf state: empty teacher")?;
            self.teachers.push(Teacher {
                tasks,
                model: Frozen::from_tensors(&tensors, &cfg, &device)?,
            });
        }
        Ok(())
    }
}
