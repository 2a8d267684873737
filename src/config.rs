//! The TOML experiment schema: one file describes one run (model, data, an ordered list of
//! stages, the anti-forgetting strategy, evaluation). Every field has a default, unknown keys
//! are errors that name the file, line and key, and semantic mistakes are caught by
//! [`Experiment::validate`] before any training starts.
//!
//! ```toml
//! name = "replay"
//! seed = 0
//! [model]
//! weights = "hf:timm/mobilenetv3_small_100.lamb_in1k"
//! image_size = 160
//! [data]
//! source = "synthetic"
//! [[stages]]
//! task = "seg"
//! epochs = 20
//! [replay]
//! enabled = true
//! images_per_batch = 4
//! weight = 0.8
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors in an experiment file: callers may match on these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read experiment file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax, unknown key or wrong type; `message` carries toml's line/column and key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bad override '{arg}': {message}")]
    Override { arg: String, message: String },
    /// A value that parses but makes no sense (zero epochs, replaying an unlearned task…).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Run name: results go to `<results_dir>/<name>/<run-id>/`.
    pub name: String,
    /// The one seed: data sampling, init, shuffling, augmentation and replay draws.
    #[serde(default)]
    pub seed: u64,
    /// Several seeds, e.g. `seeds = [0, 1, 2]`: `onehead run` and `onehead sweep` expand the
    /// file into one run per seed (each with `seed = <s>` and no `seeds`) and report mean ± std.
    /// The engine itself ignores this field: it runs `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<u64>>,
    /// `auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Where run directories are created.
    #[serde(default = "default_results_dir")]
    pub results_dir: PathBuf,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    /// Stages in training order; each trains one task.
    pub stages: Vec<StageConfig>,
    /// `sequential` (the challenge), or a reference: `joint` (every task's data mixed in
    /// one stage: the upper bound) or `single_task` (each task trained alone from the same
    /// initialisation with its stage's budget: the challenge's single-task baseline).
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub replay: ReplayConfig,
    #[serde(default)]
    pub lwf: LwfConfig,
    #[serde(default)]
    pub ewc: EwcConfig,
    #[serde(default)]
    pub uncertainty: UncertaintyConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    /// Optional log sinks: `[log] tensorboard = true`.
    #[serde(default)]
    pub log: LogConfig,
    /// Task-specific settings, `[tasks.<name>]` (e.g. `[tasks.det] score_threshold`); each
    /// task reads and checks its own table.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, toml::Value>,
}

fn default_device() -> String {
    "auto".into()
}
fn default_results_dir() -> PathBuf {
    PathBuf::from("results")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `hf:<repo>[@rev][/file]`, a local `.safetensors` path, or `none` (random init).
    pub weights: String,
    /// Square input side in pixels; a multiple of 32.
    pub image_size: usize,
    /// FPN width (the report: 128).
    pub fpn_channels: usize,
    /// Copy hub weights into this folder (pinning), e.g. `weights`. Empty: don't copy.
    pub pin_dir: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            weights: "hf:timm/mobilenetv3_small_100.lamb_in1k".into(),
            image_size: 160,
            fpn_channels: 128,
            pin_dir: None,
        }
    }
}

/// Where the three datasets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// The built-in procedural benchmark, generated on first use into `root`.
    Synthetic,
    /// Folders on disk in the course-set layout (`onehead prepare`).
    Disk,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub source: DataSource,
    /// Data root holding `mini_voc_seg/`, `mini_coco_det/`, `imagenette_160/`.
    /// For `synthetic`, defaults to `data/synthetic-s<seed>-<size>px-<train>x<val>`.
    pub root: Option<PathBuf>,
    /// Seed of the synthetic benchmark (independent of the run seed, so that runs with
    /// different seeds see the same data).
    pub synth_seed: u64,
    /// Synthetic images per task and split.
    pub synth_train: usize,
    pub synth_val: usize,
    /// Side of the generated synthetic images.
    pub synth_size: usize,
    /// Random horizontal flips of training images (and masks/boxes).
    pub flip: bool,
    /// Random resized crops of training images (scale jitter, torchvision
    /// `RandomResizedCrop`): `[min, max]` area fraction of the crop, which is resized back to
    /// the model input (masks and boxes alike; aspect ratio in 3/4..4/3). `[1.0, 1.0]` (the
    /// default) turns crops off; `[0.35, 1.0]` is the recommended setting. `0 < min <= max <= 1`.
    pub crop_scale: [f64; 2],
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: DataSource::Synthetic,
            root: None,
            synth_seed: 0,
            synth_train: 240,
            synth_val: 60,
            synth_size: 160,
            flip: true,
            crop_scale: [1.0, 1.0],
        }
    }
}

impl DataConfig {
    /// The data root this config reads.
    pub fn resolved_root(&self) -> PathBuf {
        match (&self.root, self.source) {
            (Some(r), _) => r.clone(),
            (None, DataSource::Synthetic) => PathBuf::from(format!(
                "data/synthetic-s{}-{}px-{}x{}",
                self.synth_seed, self.synth_size, self.synth_train, self.synth_val
            )),
            (None, DataSource::Disk) => PathBuf::from("data/course"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Cosine,
}

/// Which parameters a stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Freeze {
    /// Train everything.
    None,
    /// Keep the backbone's weights and BatchNorm statistics fixed.
    Backbone,
    /// Train the backbone's weights but keep its BatchNorm statistics fixed.
    BackboneBn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The task this stage trains (`seg`, `det`, `cls`, or a registered task's name).
    pub task: String,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerKind,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// SGD momentum (ignored by AdamW).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    /// Linear warm-up from 0 over this many epochs (may be fractional).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Cosine decays to `lr · min_lr_ratio`.
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default = "default_freeze")]
    pub freeze: Freeze,
    /// Clip the global gradient norm to this value (0 = off).
    #[serde(default)]
    pub grad_clip_norm: f64,
    /// Use at most this many training images of the stage's task (0 = all).
    #[serde(default)]
    pub train_limit: usize,
    /// Learning-rate multipliers per part of the model, e.g. `{ backbone = 0.05, neck =
    /// 0.2 }` in later stages to keep the shared layers close to what earlier tasks need.
    #[serde(default)]
    pub lr_scale: LrScale,
}

/// Learning-rate multiplier of each part of the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrScale {
    pub backbone: f64,
    pub neck: f64,
    pub head: f64,
}

impl Default for LrScale {
    fn default() -> Self {
        Self {
            backbone: 1.0,
            neck: 1.0,
            head: 1.0,
        }
    }
}

impl LrScale {
    /// The multiplier of a variable by its name (`backbone.`, `fpn.`, `head.`; others 1).
    pub fn for_param(&self, name: &str) -> f64 {
        if name.starts_with("backbone.") {
            self.backbone
        } else if name.starts_with("fpn.") {
            self.neck
        } else if name.starts_with("head.") {
            self.head
        } else {
            1.0
        }
    }
}

/// What an experiment file runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The stages one after another (the challenge).
    #[default]
    Sequential,
    /// One stage over the union of the tasks, batches mixing them (the upper bound), with
    /// the total epochs of the stages and the first stage's optimiser settings.
    Joint,
    /// Each stage's task alone, each from the same initialisation (the single-task
    /// baselines).
    SingleTask,
}

fn default_epochs() -> usize {
    20
}
fn default_batch_size() -> usize {
    16
}
fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_lr() -> f64 {
    1e-3
}
fn default_weight_decay() -> f64 {
    1e-4
}
fn default_momentum() -> f64 {
    0.9
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn default_freeze() -> Freeze {
    Freeze::None
}

/// Which earlier tasks a replay strategy draws from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplayTasks {
    /// `"all"`: every task learned in an earlier stage.
    Keyword(String),
    /// An explicit list, e.g. `["seg"]` (the report's setup).
    List(Vec<String>),
}

impl Default for ReplayTasks {
    fn default() -> Self {
        ReplayTasks::Keyword("all".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaySampling {
    /// Replayed samples cycle through the replayed tasks in order.
    RoundRobin,
    /// Each replayed sample picks its task uniformly at random.
    Random,
}

/// Which earlier samples a replay buffer keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPolicy {
    /// Every image earlier stages trained on.
    Full,
    /// Reservoir sampling over the stream of trained images (uniform, not per task):
    /// `capacity` images.
    Reservoir,
    /// `capacity` images split equally among the earlier tasks, shrunk at random as tasks
    /// arrive.
    TaskBalanced,
}

/// How each replayed task's loss is scaled before the weights apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayNormalize {
    /// `weight · Σ_t (n_t / images_per_batch) · L_t` (the report's form).
    None,
    /// Each task's loss divided by its loss at the end of its own stage (measured then on
    /// its buffer in inference mode), so that 1.0 means "as good as at baseline" and a task
    /// with a large loss scale cannot swamp the new task.
    Reference,
}

/// Experience replay: every batch of a later stage carries samples of earlier tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    pub enabled: bool,
    /// Replayed samples added to every batch (the report: 4).
    pub images_per_batch: usize,
    /// `loss = L_new + weight · L_replay` (the report: 0.8).
    pub weight: f64,
    /// Per-task weights overriding `weight`, e.g. `{ det = 2.0 }`.
    pub task_weights: BTreeMap<String, f64>,
    pub tasks: ReplayTasks,
    pub sampling: ReplaySampling,
    pub policy: ReplayPolicy,
    /// Buffer size in images for `reservoir` and `task_balanced` (ignored by `full`).
    pub capacity: usize,
    pub normalize: ReplayNormalize,
    /// DER: with each buffered image keep the head's outputs of the end of its task's stage
    /// and add `der_alpha · distill(now, then)` on un-augmented replays of it (0 = off).
    pub der_alpha: f64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            images_per_batch: 4,
            weight: 0.8,
            task_weights: BTreeMap::new(),
            tasks: ReplayTasks::default(),
            sampling: ReplaySampling::RoundRobin,
            policy: ReplayPolicy::Full,
            capacity: 0,
            normalize: ReplayNormalize::None,
            der_alpha: 0.0,
        }
    }
}

impl ReplayConfig {
    /// The replay weight of `task`.
    pub fn weight_of(&self, task: &str) -> f64 {
        self.task_weights.get(task).copied().unwrap_or(self.weight)
    }
}

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

/// Elastic weight consolidation (Kirkpatrick et al. 2017): a quadratic penalty
/// `λ/2 · Σ F_i (θ_i − θ*_i)²` around the weights at the end of each stage, weighted by the
/// diagonal Fisher information of the finished stage's task on its training images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EwcConfig {
    /// Penalty strength (0 = off). The Fisher is normalised to mean 1 per task, so λ does
    /// not depend on the loss scale.
    pub lambda: f64,
    /// Online EWC (Schwarz et al. 2018): `F ← γ·F + F_new`, anchored at the latest weights;
    /// 1 keeps every task's Fisher in full.
    pub gamma: f64,
    /// Training images used to estimate the Fisher (0 = the whole stage pool).
    pub samples: usize,
}

impl Default for EwcConfig {
    fn default() -> Self {
        Self {
            lambda: 0.0,
            gamma: 1.0,
            samples: 0,
        }
    }
}

/// Uncertainty weighting of task losses (Kendall, Gal & Cipolla 2018): every task's loss
/// `L_t` becomes `½·e^{−s_t}·L_t + ½·s_t` with a learned log-variance `s_t`. Beware: for an
/// earlier task the loss rises as it is forgotten, so this lowers its weight exactly then.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UncertaintyConfig {
    pub enabled: bool,
}

/// `[log]` of an experiment: `tensorboard = true` turns the sink on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Write `<run>/tensorboard/events.out.tfevents.*` with each epoch's scalars.
    pub tensorboard: bool,
}

/// Which value of a task's metric the verdict compares the final value with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineKind {
    /// The metric at the end of the stage that learned the task (its last such stage).
    StageEnd,
    /// The best epoch of that stage (what the original report did).
    StageBest,
    /// The task trained alone from the same initialisation with its stage's budget (the
    /// challenge's definition); the single-task run is made (or reused) automatically.
    SingleTask,
}

/// How the tolerance is read: the challenge's "≥ base − 5 %" is read both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToleranceKind {
    /// `(baseline − final) / baseline ≤ tolerance`.
    Relative,
    /// `baseline − final ≤ tolerance` in metric points.
    Absolute,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every N epochs (the last epoch of every stage is always evaluated).
    pub every: usize,
    /// Largest allowed drop of a task's verdict metric against its baseline.
    pub tolerance: f64,
    pub tolerance_kind: ToleranceKind,
    pub baseline: BaselineKind,
    /// The verdict's metric per task, e.g. `{ det = "map50_95" }`; a task not listed is
    /// judged on its primary metric (seg `miou`, det `map50`, cls `top1`).
    pub metric: BTreeMap<String, String>,
    /// A baseline must exceed the task's chance level by this many metric points, else the
    /// task is reported as "not learned" and the run cannot pass.
    pub chance_margin: f64,
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 1,
            tolerance: 0.05,
            tolerance_kind: ToleranceKind::Relative,
            baseline: BaselineKind::StageEnd,
            metric: BTreeMap::new(),
            chance_margin: 0.05,
            batch_size: 32,
        }
    }
}

impl Experiment {
    /// Read, apply `key=value` overrides, and validate (tasks against the built-in ones).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::load_with(path, overrides, &crate::tasks::Registry::builtin().names())
    }

    /// [`Experiment::load`] for an engine that knows the tasks `known`.
    pub fn load_with(
        path: &Path,
        overrides: &[String],
        known: &[&str],
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let exp = Self::from_toml_str(&text, path, overrides)?;
        exp.validate(path)?;
        exp.validate_task_names(path, known)?;
        Ok(exp)
    }

    /// Parse without validation. Errors carry toml's line, column and key.
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        // First parse the text as written, so that errors point at a line of the file.
        let exp: Experiment = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        if overrides.is_empty() {
            return Ok(exp);
        }
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        let overridden = toml::to_string(&table).map_err(|e| parse_err(e.to_string()))?;
        toml::from_str(&overridden).map_err(|e| {
            parse_err(format!(
                "after applying --set {}: {}",
                overrides.join(" --set "),
                e.message()
            ))
        })
    }

    /// The resolved config as TOML (what a run directory stores as `config.toml`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("an Experiment always serialises")
    }

    /// Semantic checks, all before any training.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.name.trim().is_empty()
            || self
                .name
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return bad(format!(
                "name '{}' must be non-empty and use only letters, digits, '-', '_' and '.' (it names a folder)",
                self.name
            ));
        }
        if self.stages.is_empty() {
            return bad("no [[stages]]: add at least one stage with a task".into());
        }
        if let Some(seeds) = &self.seeds {
            if seeds.is_empty() {
                return bad(
                    "seeds = []: list at least one seed, or drop the key and use seed".into(),
                );
            }
            let mut sorted = seeds.clone();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return bad(format!(
                    "seeds lists {} twice: each seed must be unique",
                    w[0]
                ));
            }
        }
        let m = &self.model;
        if m.image_size < 64 || !m.image_size.is_multiple_of(32) {
            return bad(format!(
                "model.image_size = {} must be a multiple of 32 and at least 64",
                m.image_size
            ));
        }
        if m.fpn_channels == 0 {
            return bad("model.fpn_channels must be > 0".into());
        }
        for (i, s) in self.stages.iter().enumerate() {
            let at = format!("stages[{i}] ({})", s.task);
            if s.epochs == 0 {
                return bad(format!("{at}: epochs must be > 0"));
            }
            if s.batch_size == 0 {
                return bad(format!("{at}: batch_size must be > 0"));
            }
            if !(s.lr > 0.0 && s.lr.is_finite()) {
                return bad(format!("{at}: lr must be a positive number, got {}", s.lr));
            }
            if s.weight_decay.is_nan() || s.weight_decay < 0.0 {
                return bad(format!("{at}: weight_decay must be >= 0"));
            }
            if !(0.0..1.0).contains(&s.momentum) {
                return bad(format!("{at}: momentum must be in [0, 1)"));
            }
            if !(s.warmup_epochs >= 0.0 && s.warmup_epochs <= s.epochs as f64) {
                return bad(format!(
                    "{at}: warmup_epochs = {} must be within 0..=epochs ({})",
                    s.warmup_epochs, s.epochs
                ));
            }
            if !(0.0..=1.0).contains(&s.min_lr_ratio) {
                return bad(format!("{at}: min_lr_ratio must be in [0, 1]"));
            }
            if s.grad_clip_norm.is_nan() || s.grad_clip_norm < 0.0 {
                return bad(format!("{at}: grad_clip_norm must be >= 0"));
            }
        }
        let r = &self.replay;
        if r.enabled {
            if r.images_per_batch == 0 {
                return bad("replay.images_per_batch must be > 0 when replay is enabled".into());
            }
            if !(r.weight >= 0.0 && r.weight.is_finite())
                || r.task_weights
                    .values()
                    .any(|w| !(*w >= 0.0 && w.is_finite()))
            {
                return bad("replay.weight and replay.task_weights must be >= 0".into());
            }
            if r.policy != ReplayPolicy::Full && r.capacity == 0 {
                return bad(format!(
                    "replay.policy = {:?} needs replay.capacity > 0 (images kept)",
                    r.policy
                ));
            }
            if !(r.der_alpha >= 0.0 && r.der_alpha.is_finite()) {
                return bad("replay.der_alpha must be >= 0".into());
            }
            match &r.tasks {
                ReplayTasks::Keyword(k) if k == "all" => {}
                ReplayTasks::Keyword(k) => {
                    return bad(format!(
                        "replay.tasks = \"{k}\": expected \"all\" or a list such as [\"seg\"]"
                    ))
                }
                ReplayTasks::List(list) => {
                    if list.is_empty() {
                        return bad("replay.tasks is empty: list tasks or use \"all\"".into());
                    }
                    let last = self.stages.len() - 1;
                    for t in list {
                        match self.stages.iter().position(|s| s.task == *t) {
                            None => {
                                return bad(format!(
                                    "replay.tasks names '{t}', but no stage learns it"
                                ))
                            }
                            Some(first) if first == last => {
                                return bad(format!(
                                    "replay.tasks names '{t}', but it is first learned in the last stage: nothing later could replay it"
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            let l = s.lr_scale;
            if [l.backbone, l.neck, l.head]
                .iter()
                .any(|v| !(*v >= 0.0 && v.is_finite()))
            {
                return bad(format!("stages[{i}].lr_scale: multipliers must be >= 0"));
            }
        }
        let named = |what: &str, map: &BTreeMap<String, f64>| -> Result<(), ConfigError> {
            for t in map.keys() {
                if !self.stages.iter().any(|s| &s.task == t) {
                    return bad(format!("{what} names task '{t}', but no stage learns it"));
                }
            }
            Ok(())
        };
        named("replay.task_weights", &self.replay.task_weights)?;
        named("lwf.task_alpha", &self.lwf.task_alpha)?;
        let w = &self.lwf;
        if !(w.alpha >= 0.0 && w.task_alpha.values().all(|a| *a >= 0.0)) {
            return bad("lwf.alpha and lwf.task_alpha must be >= 0".into());
        }
        if !(w.temperature > 0.0 && w.temperature.is_finite()) {
            return bad("lwf.temperature must be > 0".into());
        }
        let c = &self.ewc;
        if !(c.lambda >= 0.0 && c.lambda.is_finite() && (0.0..=1.0).contains(&c.gamma)) {
            return bad("ewc.lambda must be >= 0 and ewc.gamma in [0, 1]".into());
        }
        if self.mode != Mode::Sequential && (self.replay.enabled || w.enabled() || c.lambda > 0.0) {
            return bad(format!(
                "mode = {:?} is a reference run: it takes no anti-forgetting strategy (turn replay, lwf and ewc off)",
                self.mode
            ));
        }
        if self.eval.baseline == BaselineKind::SingleTask && self.mode != Mode::Sequential {
            return bad("eval.baseline = \"single_task\" is for sequential runs".into());
        }
        let e = &self.eval;
        if e.every == 0 || e.batch_size == 0 {
            return bad("eval.every and eval.batch_size must be > 0".into());
        }
        if !(0.0..1.0).contains(&e.tolerance) {
            return bad(format!(
                "eval.tolerance = {} must be in [0, 1)",
                e.tolerance
            ));
        }
        if !(e.chance_margin >= 0.0 && e.chance_margin < 1.0) {
            return bad(format!(
                "eval.chance_margin = {} must be in [0, 1)",
                e.chance_margin
            ));
        }
        for t in e.metric.keys() {
            if !self.stages.iter().any(|s| &s.task == t) {
                return bad(format!(
                    "eval.metric names task '{t}', but no stage learns it"
                ));
            }
        }
        for t in self.tasks.keys() {
            if !self.stages.iter().any(|s| &s.task == t) {
                return bad(format!("[tasks.{t}] is set, but no stage learns '{t}'"));
            }
        }
        if self.data.source == DataSource::Synthetic
            && (self.data.synth_train == 0 || self.data.synth_val == 0)
        {
            return bad("data.synth_train and data.synth_val must be > 0".into());
        }
        let [lo, hi] = self.data.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return bad(format!(
                "data.crop_scale = [{lo}, {hi}] must satisfy 0 < min <= max <= 1"
            ));
        }
        Ok(())
    }

    /// Check every stage's task against the names a task registry knows.
    pub fn validate_task_names(&self, path: &Path, known: &[&str]) -> Result<(), ConfigError> {
        for (i, s) in self.stages.iter().enumerate() {
            if !known.contains(&s.task.as_str()) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "stages[{i}]: unknown task '{}' (known: {})",
                        s.task,
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// The verdict metric of `task` when the experiment picks one (`[eval] metric`).
    pub fn verdict_metric(&self, task: &str) -> Option<&str> {
        self.eval.metric.get(task).map(String::as_str)
    }

    /// Tasks that stage `stage` replays (those learned in earlier stages and selected).
    pub fn replayed_tasks(&self, stage: usize) -> Vec<String> {
        if !self.replay.enabled {
            return vec![];
        }
        let current = &self.stages[stage].task;
        let mut out: Vec<String> = Vec::new();
        for s in &self.stages[..stage] {
            let selected = match &self.replay.tasks {
                ReplayTasks::Keyword(_) => true,
                ReplayTasks::List(l) => l.contains(&s.task),
            };
            if selected && &s.task != current && !out.contains(&s.task) {
                out.push(s.task.clone());
            }
        }
        out
    }

    /// The stages the training loop runs: the file's stages, or for `mode = "joint"` one
    /// stage over every task (the first stage's settings; batches split equally among the
    /// tasks and epochs the stages' mean, so that it trains as many images as the
    /// sequential run; see the joint plug-in).
    pub fn plan(&self) -> Vec<StageConfig> {
        match self.mode {
            Mode::Sequential | Mode::SingleTask => self.stages.clone(),
            Mode::Joint => {
                let n = self.tasks_in_order().len();
                let mut s = self.stages[0].clone();
                let total: usize = self.stages.iter().map(|s| s.epochs).sum();
                s.epochs = (total as f64 / self.stages.len() as f64).round().max(1.0) as usize;
                s.batch_size = (s.batch_size / n).max(1);
                vec![s]
            }
        }
    }

    /// The tasks evaluated after an epoch of (planned) stage `stage`: every task learned so
    /// far; in a single-task run the stage's own; in a joint run all of them.
    pub fn evaluated_tasks(&self, stage: usize) -> Vec<String> {
        match self.mode {
            Mode::Sequential => {
                let mut out: Vec<String> = Vec::new();
                for s in &self.stages[..=stage] {
                    if !out.contains(&s.task) {
                        out.push(s.task.clone());
                    }
                }
                out
            }
            Mode::SingleTask => vec![self.stages[stage].task.clone()],
            Mode::Joint => self.tasks_in_order(),
        }
    }

    /// Tasks in the order they are first learned.
    pub fn tasks_in_order(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.stages {
            if !out.contains(&s.task) {
                out.push(s.task.clone());
            }
        }
        out
    }
}

/// Apply one `a.b.c=value` override to a parsed table. `stages.1.lr=…` indexes the stage
/// list; `stages.*.epochs=…` sets a key in every stage. The value is read as TOML
/// (`3`, `true`, `["seg"]`, `"x"`); anything that is not valid TOML is taken as a string.
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Override {
        arg: arg.to_string(),
        message,
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key=value".into()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(err("empty key".into()));
    }
    let value = parse_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let mut root = toml::Value::Table(std::mem::take(table));
    let result = set_path(&mut root, &parts, &value);
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    result.map_err(err)
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Set `parts` (a dotted key split at '.') inside `node` to `value`.
fn set_path(node: &mut toml::Value, parts: &[&str], value: &toml::Value) -> Result<(), String> {
    let (head, rest) = (parts[0], &parts[1..]);
    match node {
        toml::Value::Table(t) => {
            if rest.is_empty() {
                t.insert(head.to_string(), value.clone());
                Ok(())
            } else {
                let child = t
                    .entry(head.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                set_path(child, rest, value)
            }
        }
        toml::Value::Array(items) => {
            let targets: Vec<usize> = if head == "*" {
                (0..items.len()).collect()
            } else {
                let i: usize = head
                    .parse()
                    .map_err(|_| format!("'{head}' is not an index into a list"))?;
                if i >= items.len() {
                    return Err(format!(
                        "index {i} is out of range: the list has {} entries",
                        items.len()
                    ));
                }
                vec![i]
            };
            for i in targets {
                if rest.is_empty() {
                    items[i] = value.clone();
                } else {
                    set_path(&mut items[i], rest, value)?;
                }
            }
            Ok(())
        }
        _ => Err(format!(
            "'{head}' is inside a value that is not a table or list"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
[[stages]]
task = "seg"
[[stages]]
task = "det"
epochs = 3
"#;

    fn parse(text: &str) -> Result<Experiment, ConfigError> {
        let p = Path::new("exp.toml");
        let e = Experiment::from_toml_str(text, p, &[])?;
        e.validate(p)?;
        e.validate_task_names(p, &["seg", "det", "cls"])?;
        Ok(e)
    }

    #[test]
    fn defaults_fill_every_field() {
        let e = parse(MINIMAL).unwrap();
        assert_eq!(e.stages[0].epochs, 20);
        assert_eq!(e.stages[1].epochs, 3);
        assert_eq!(e.replay.images_per_batch, 4);
        assert!((e.replay.weight - 0.8).abs() < 1e-12);
        assert!((e.eval.tolerance - 0.05).abs() < 1e-12);
        assert_eq!(e.model.image_size, 160);
        // The resolved config round-trips through TOML unchanged.
        let again = parse(&e.to_toml()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn typo_names_file_line_and_key() {
        let text = "name = \"t\"\n[[stages]]\ntask = \"seg\"\nepoch = 3\n";
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.starts_with("exp.toml"), "{msg}");
        assert!(msg.contains("epoch"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let text = "name = \"t\"\n[[stages]]\ntask = \"seg\"\nepochs = \"many\"\n";
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.contains("line 4") && msg.contains("epochs"), "{msg}");
    }

    #[test]
    fn unknown_task_is_an_error() {
        let text = "name = \"t\"\n[[stages]]\ntask = \"depth\"\n";
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.contains("depth"), "{msg}");
    }

    #[test]
    fn semantic_errors_are_caught() {
        let zero = MINIMAL.replace("epochs = 3", "epochs = 0");
        assert!(parse(&zero)
            .unwrap_err()
            .to_string()
            .contains("epochs must be > 0"));

        let unlearned = format!("{MINIMAL}\n[replay]\nenabled = true\ntasks = [\"cls\"]\n");
        let msg = parse(&unlearned).unwrap_err().to_string();
        assert!(msg.contains("no stage learns it"), "{msg}");

        let last = format!("{MINIMAL}\n[replay]\nenabled = true\ntasks = [\"det\"]\n");
        let msg = parse(&last).unwrap_err().to_string();
        assert!(msg.contains("last stage"), "{msg}");

        let crop = format!("{MINIMAL}\n[data]\ncrop_scale = [0.5, 0.2]\n");
        assert!(parse(&crop).unwrap_err().to_string().contains("crop_scale"));

        let size = format!("{MINIMAL}\n[model]\nimage_size = 100\n");
        assert!(parse(&size)
            .unwrap_err()
            .to_string()
            .contains("multiple of 32"));
    }

    #[test]
    fn seeds_are_optional_non_empty_and_unique() {
        let e = parse(MINIMAL).unwrap();
        assert_eq!(e.seeds, None);
        // Absent seeds stay absent in the resolved config (a resolved run has one seed).
        assert!(!e.to_toml().contains("seeds"));
        let three = MINIMAL.replace("name = \"t\"", "name = \"t\"\nseeds = [0, 1, 2]");
        let e = parse(&three).unwrap();
        assert_eq!(e.seeds, Some(vec![0, 1, 2]));
        assert_eq!(parse(&e.to_toml()).unwrap(), e);
        let empty = MINIMAL.replace("name = \"t\"", "name = \"t\"\nseeds = []");
        assert!(parse(&empty)
            .unwrap_err()
            .to_string()
            .contains("seeds = []"));
        let twice = MINIMAL.replace("name = \"t\"", "name = \"t\"\nseeds = [1, 2, 1]");
        let msg = parse(&twice).unwrap_err().to_string();
        assert!(msg.contains("1 twice"), "{msg}");
    }

    #[test]
    fn overrides_set_nested_and_list_fields() {
        let p = Path::new("exp.toml");
        let e = Experiment::from_toml_str(
            MINIMAL,
            p,
            &[
                "stages.*.epochs=2".into(),
                "stages.1.lr=0.01".into(),
                "replay.enabled=true".into(),
                "replay.tasks=[\"seg\"]".into(),
                "model.weights=none".into(),
                "seed=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(e.stages[0].epochs, 2);
        assert_eq!(e.stages[1].epochs, 2);
        assert!((e.stages[1].lr - 0.01).abs() < 1e-12);
        assert!(e.replay.enabled);
        assert_eq!(e.replay.tasks, ReplayTasks::List(vec!["seg".to_string()]));
        assert_eq!(e.model.weights, "none");
        assert_eq!(e.seed, 7);

        let msg = Experiment::from_toml_str(MINIMAL, p, &["stages.5.lr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("out of range"), "{msg}");
        let msg = Experiment::from_toml_str(MINIMAL, p, &["model.colour=1".into()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("colour"), "{msg}");
    }

    #[test]
    fn replayed_tasks_follow_stage_order_and_selection() {
        let text = "name = \"t\"\n[[stages]]\ntask = \"seg\"\n[[stages]]\ntask = \"det\"\n[[stages]]\ntask = \"cls\"\n[replay]\nenabled = true\n";
        let e = parse(text).unwrap();
        assert!(e.replayed_tasks(0).is_empty());
        assert_eq!(e.replayed_tasks(1), vec!["seg"]);
        assert_eq!(e.replayed_tasks(2), vec!["seg", "det"]);
        let only_seg = text.replace("enabled = true", "enabled = true\ntasks = [\"seg\"]");
        let e = parse(&only_seg).unwrap();
        assert_eq!(e.replayed_tasks(2), vec!["seg"]);
    }
}
