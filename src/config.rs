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
///
/// Unknown keys are refused by [`Experiment::from_toml_str`] itself (not by serde: the
/// strategies' tables sit at the top level beside the schema's and are kept raw in
/// [`Experiment::strategies`], so that the plug-in registry can resolve them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Each anti-forgetting strategy's table (`[replay]`, `[lwf]`…), by name, as the
    /// strategy registry resolved it (every default filled in; see
    /// [`crate::plugins::registry`]). Written at the top level of `config.toml`.
    #[serde(flatten, skip_deserializing)]
    pub strategies: BTreeMap<String, toml::Value>,
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
    /// `fused` (the whole network as one op on the CPU: the fast path) or `per-layer`
    /// (candle's ops one by one: the reference the fused path is tested against). Absent:
    /// fused, unless the environment sets `ONEHEAD_FUSED=0`. Distillation teachers and
    /// snapshots follow the environment's choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor: Option<crate::ops::fused::Executor>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            weights: "hf:timm/mobilenetv3_small_100.lamb_in1k".into(),
            image_size: 160,
            fpn_channels: 128,
            pin_dir: None,
            executor: None,
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
    /// For `synthetic`, defaults to `data/synthetic-s<seed>-<size>px-<train>x<val>x<test>`
    /// (`…-<train>x<val>` when `synth_test = 0`).
    pub root: Option<PathBuf>,
    /// Seed of the synthetic benchmark (independent of the run seed, so that runs with
    /// different seeds see the same data).
    pub synth_seed: u64,
    /// Synthetic images per task and split.
    pub synth_train: usize,
    pub synth_val: usize,
    /// Images per task of the held-out test split, never used for training, replay, Fisher
    /// information, teachers or model selection; 0 = no test split.
    pub synth_test: usize,
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
            synth_test: 300,
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
            // The test count is in the name (the folder's contents depend on it); without
            // a test split the name is the one written before test splits existed.
            (None, DataSource::Synthetic) => {
                let test = match self.synth_test {
                    0 => String::new(),
                    n => format!("x{n}"),
                };
                PathBuf::from(format!(
                    "data/synthetic-s{}-{}px-{}x{}{test}",
                    self.synth_seed, self.synth_size, self.synth_train, self.synth_val
                ))
            }
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

/// `[log]` of an experiment: `tensorboard = true` turns the sink on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Write `<run>/tensorboard/events.out.tfevents.*` with each epoch's scalars.
    pub tensorboard: bool,
}

/// Which value of a task's metric the verdict compares the final value with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineKind {
    /// The metric at the end of the stage that learned the task (its last such stage): "how
    /// much did it forget since it learned", a different question than the challenge's.
    StageEnd,
    /// The best epoch of that stage (what the original report did).
    StageBest,
    /// The task trained alone from the same initialisation with its stage's budget (the
    /// challenge's definition, the default); the single-task run is made once and found
    /// again by every run that needs it (`train::reference`). A run of `mode = "single_task"`
    /// is its own reference and is judged against its stage ends.
    #[default]
    SingleTask,
}

impl BaselineKind {
    /// As written in the experiment file.
    pub fn label(self) -> &'static str {
        match self {
            BaselineKind::StageEnd => "stage_end",
            BaselineKind::StageBest => "stage_best",
            BaselineKind::SingleTask => "single_task",
        }
    }
}

/// How the tolerance is read: the challenge's "≥ base − 5 %" is read both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToleranceKind {
    /// `(baseline − final) / baseline ≤ tolerance`.
    #[default]
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
    /// Without per-image scores to test it (a task that gives none): a baseline must exceed
    /// the task's chance level by this many metric points, else the task is "not learned".
    /// With them, "learned" is a one-sided bootstrap test at `confidence` instead.
    pub chance_margin: f64,
    pub batch_size: usize,
    /// Bootstrap resamples of the evaluated images behind every interval (0: no intervals,
    /// point verdicts only).
    pub resamples: usize,
    /// Coverage of the intervals (two-sided) and of the one-sided "learned" test.
    pub confidence: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 1,
            tolerance: 0.05,
            tolerance_kind: ToleranceKind::Relative,
            baseline: BaselineKind::SingleTask,
            metric: BTreeMap::new(),
            chance_margin: 0.05,
            batch_size: 32,
            resamples: 2000,
            confidence: 0.95,
        }
    }
}

/// Largest `model.image_size`, `model.fpn_channels` and batch size (stage, eval, replay)
/// accepted: far beyond what this model is for, and small enough that no allocation they
/// size can abort the process.
pub const MAX_IMAGE_SIZE: usize = 1024;
pub const MAX_CHANNELS: usize = 1024;
pub const MAX_BATCH: usize = 1024;
/// Largest built-in benchmark split (images per task and split).
pub const MAX_SYNTH_IMAGES: usize = 100_000;

/// The schema's own top-level keys; any other top-level table belongs to a strategy.
pub const SCHEMA_KEYS: [&str; 12] = [
    "name",
    "seed",
    "seeds",
    "device",
    "results_dir",
    "model",
    "data",
    "stages",
    "mode",
    "eval",
    "log",
    "tasks",
];

impl Experiment {
    /// Parse and apply `key=value` overrides, without validation (loading with every check,
    /// the strategies' included: [`crate::registry::Registry::load`]). Errors carry toml's
    /// line, column and key. Top-level tables outside the schema are kept raw in
    /// [`Experiment::strategies`]; other unknown top-level keys are errors.
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
        let mut exp: Experiment = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        if !overrides.is_empty() {
            for arg in overrides {
                apply_override(&mut table, arg)?;
            }
            let overridden = toml::to_string(&table).map_err(|e| parse_err(e.to_string()))?;
            exp = toml::from_str(&overridden).map_err(|e| {
                parse_err(format!(
                    "after applying --set {}: {}",
                    overrides.join(" --set "),
                    e.message()
                ))
            })?;
        }
        for (key, value) in table {
            if SCHEMA_KEYS.contains(&key.as_str()) {
                continue;
            }
            if !value.is_table() {
                let line = line_of(text, None, &key)
                    .map(|l| format!("line {l}: "))
                    .unwrap_or_default();
                return Err(parse_err(format!(
                    "{line}unknown key `{key}`: expected one of {} or a strategy's table",
                    SCHEMA_KEYS.join(", ")
                )));
            }
            exp.strategies.insert(key, value);
        }
        Ok(exp)
    }

    /// The resolved config as TOML (what a run directory stores as `config.toml`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("an Experiment always serialises")
    }

    /// The resolved config as a TOML value (the keys `config.toml` holds).
    pub fn to_value(&self) -> toml::Value {
        toml::Value::try_from(self).expect("an Experiment always serialises")
    }

    /// Semantic checks, all before any training (the strategies' own: the registry's).
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.check()
            .and_then(|()| self.check_stages())
            .and_then(|()| self.check_eval())
            .and_then(|()| self.check_data())
            .map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })
    }

    /// Name, seeds, model.
    fn check(&self) -> Result<(), String> {
        // It names a folder under results_dir: one plain path component, never `..`.
        let n = &self.name;
        if n.is_empty()
            || n.len() > 100
            || n.starts_with('.')
            || n.chars()
                .any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return Err(format!(
                "name '{n}' must be 1 to 100 letters, digits, '-', '_' and '.', not starting with '.' (it names a folder under results_dir)",
            ));
        }
        if self.stages.is_empty() {
            return Err("no [[stages]]: add at least one stage with a task".into());
        }
        if let Some(seeds) = &self.seeds {
            if seeds.is_empty() {
                return Err(
                    "seeds = []: list at least one seed, or drop the key and use seed".into(),
                );
            }
            let mut sorted = seeds.clone();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!(
                    "seeds lists {} twice: each seed must be unique",
                    w[0]
                ));
            }
        }
        let m = &self.model;
        if m.image_size < 64 || m.image_size > MAX_IMAGE_SIZE || !m.image_size.is_multiple_of(32) {
            return Err(format!(
                "model.image_size = {} must be a multiple of 32 from 64 to {MAX_IMAGE_SIZE} (activations grow with its square: {MAX_IMAGE_SIZE} px is already 40x the memory of the course's 160 px)",
                m.image_size
            ));
        }
        if m.fpn_channels == 0 || m.fpn_channels > MAX_CHANNELS {
            return Err(format!(
                "model.fpn_channels = {} must be from 1 to {MAX_CHANNELS} (the report uses 128)",
                m.fpn_channels
            ));
        }
        Ok(())
    }

    fn check_stages(&self) -> Result<(), String> {
        for (i, s) in self.stages.iter().enumerate() {
            let at = format!("stages[{i}] ({})", s.task);
            if s.epochs == 0 {
                return Err(format!("{at}: epochs must be > 0"));
            }
            if s.batch_size == 0 || s.batch_size > MAX_BATCH {
                return Err(format!(
                    "{at}: batch_size = {} must be from 1 to {MAX_BATCH}",
                    s.batch_size
                ));
            }
            if !(s.lr > 0.0 && s.lr.is_finite()) {
                return Err(format!("{at}: lr must be a positive number, got {}", s.lr));
            }
            if !(s.weight_decay >= 0.0 && s.weight_decay.is_finite()) {
                return Err(format!(
                    "{at}: weight_decay must be a finite number >= 0, got {}",
                    s.weight_decay
                ));
            }
            if !(0.0..1.0).contains(&s.momentum) {
                return Err(format!("{at}: momentum must be in [0, 1)"));
            }
            if !(s.warmup_epochs >= 0.0 && s.warmup_epochs <= s.epochs as f64) {
                return Err(format!(
                    "{at}: warmup_epochs = {} must be within 0..=epochs ({})",
                    s.warmup_epochs, s.epochs
                ));
            }
            if !(0.0..=1.0).contains(&s.min_lr_ratio) {
                return Err(format!("{at}: min_lr_ratio must be in [0, 1]"));
            }
            if !(s.grad_clip_norm >= 0.0 && s.grad_clip_norm.is_finite()) {
                return Err(format!(
                    "{at}: grad_clip_norm must be a finite number >= 0 (0 = off), got {}",
                    s.grad_clip_norm
                ));
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            let l = s.lr_scale;
            if [l.backbone, l.neck, l.head]
                .iter()
                .any(|v| !(*v >= 0.0 && v.is_finite()))
            {
                return Err(format!("stages[{i}].lr_scale: multipliers must be >= 0"));
            }
        }
        Ok(())
    }

    fn check_eval(&self) -> Result<(), String> {
        let e = &self.eval;
        if e.resamples > 100_000 || !(e.confidence > 0.5 && e.confidence < 1.0) {
            return Err(format!(
                "eval.resamples = {} must be at most 100000 and eval.confidence = {} in (0.5, 1)",
                e.resamples, e.confidence
            ));
        }
        if e.every == 0 || e.batch_size == 0 || e.batch_size > MAX_BATCH {
            return Err(format!(
                "eval.every must be > 0 and eval.batch_size from 1 to {MAX_BATCH}"
            ));
        }
        if !(0.0..1.0).contains(&e.tolerance) {
            return Err(format!(
                "eval.tolerance = {} must be in [0, 1)",
                e.tolerance
            ));
        }
        if !(e.chance_margin >= 0.0 && e.chance_margin < 1.0) {
            return Err(format!(
                "eval.chance_margin = {} must be in [0, 1)",
                e.chance_margin
            ));
        }
        self.named_tasks("eval.metric", e.metric.keys())?;
        self.named_tasks("a [tasks.<name>] table", self.tasks.keys())
    }

    /// Every task a per-task map or table (`what`) names must be learned by some stage.
    pub fn named_tasks<'a>(
        &self,
        what: &str,
        mut tasks: impl Iterator<Item = &'a String>,
    ) -> Result<(), String> {
        match tasks.find(|t| !self.stages.iter().any(|s| &s.task == *t)) {
            Some(t) => Err(format!("{what} names task '{t}', but no stage learns it")),
            None => Ok(()),
        }
    }

    fn check_data(&self) -> Result<(), String> {
        let d = &self.data;
        // At least one image per class of the 10-class classification set.
        let split_ok = |n: usize| (10..=MAX_SYNTH_IMAGES).contains(&n);
        if d.source == DataSource::Synthetic && !(split_ok(d.synth_train) && split_ok(d.synth_val))
        {
            return Err(format!(
                "data.synth_train and data.synth_val must be from 10 (one image per class) to {MAX_SYNTH_IMAGES}"
            ));
        }
        if d.source == DataSource::Synthetic && d.synth_test != 0 && !split_ok(d.synth_test) {
            return Err(format!(
                "data.synth_test = {} must be 0 (no test split) or from 10 (one image per class) to {MAX_SYNTH_IMAGES}",
                d.synth_test
            ));
        }
        if d.source == DataSource::Synthetic && !(32..=MAX_IMAGE_SIZE).contains(&d.synth_size) {
            return Err(format!(
                "data.synth_size = {} must be from 32 to {MAX_IMAGE_SIZE}",
                d.synth_size
            ));
        }
        let [lo, hi] = self.data.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(format!(
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

    /// The baseline the verdict uses: `[eval] baseline`, except that a single-task run is
    /// its own reference (judged against its stage ends).
    pub fn baseline_kind(&self) -> BaselineKind {
        match self.mode {
            Mode::SingleTask => BaselineKind::StageEnd,
            _ => self.eval.baseline,
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

/// The 1-based line of `text` where `key` is set: inside table `[table]` (or a dotted
/// `table.key`), or at the top level (`None`), where `key` may also be a table's header.
/// For error messages about values that toml's sub-table errors give no position for.
pub fn line_of(text: &str, table: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[');
            let name = name.split(']').next().unwrap_or("").trim().to_string();
            let want = table.map_or(key.to_string(), |t| format!("{t}.{key}"));
            if name == want || name.starts_with(&format!("{want}.")) {
                return Some(n + 1);
            }
            current = Some(name);
            continue;
        }
        let Some((lhs, _)) = line.split_once('=') else {
            continue;
        };
        let lhs = lhs.trim();
        let full = match &current {
            Some(t) => format!("{t}.{lhs}"),
            None => lhs.to_string(),
        };
        let want = match table {
            Some(t) => format!("{t}.{key}"),
            None => key.to_string(),
        };
        if full == want || full.starts_with(&format!("{want}.")) {
            return Some(n + 1);
        }
    }
    None
}

/// `message` about table `table` (e.g. `tasks.det`), with the line of the key it names in
/// backticks, else of the table: toml's messages for a table deserialised on its own carry
/// no position, so the key is looked up in the file as written.
pub fn with_line(message: String, text: &str, table: &str) -> String {
    let key = message
        .split('`')
        .nth(1)
        .filter(|k| !k.is_empty() && !k.contains(' '));
    let line = key
        .and_then(|k| line_of(text, Some(table), k))
        .or_else(|| line_of(text, None, table));
    match line {
        Some(l) => format!("{message} (line {l})"),
        None => message,
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

        let crop = format!("{MINIMAL}\n[data]\ncrop_scale = [0.5, 0.2]\n");
        assert!(parse(&crop).unwrap_err().to_string().contains("crop_scale"));

        let size = format!("{MINIMAL}\n[model]\nimage_size = 100\n");
        assert!(parse(&size)
            .unwrap_err()
            .to_string()
            .contains("multiple of 32"));
    }

    #[test]
    fn names_sizes_and_numbers_out_of_bounds_are_refused_before_training() {
        let with =
            |old: &str, new: &str| parse(&MINIMAL.replace(old, new)).unwrap_err().to_string();
        for bad in ["..", ".", ".hidden", "a/b", ""] {
            let msg = with("name = \"t\"", &format!("name = \"{bad}\""));
            assert!(msg.contains("names a folder"), "{bad}: {msg}");
        }
        let msg = parse(&format!("{MINIMAL}[model]\nimage_size = 1073741824\n"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("model.image_size") && msg.contains("1024"),
            "{msg}"
        );
        let msg = parse(&format!("{MINIMAL}[model]\nfpn_channels = 100000000\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("model.fpn_channels"), "{msg}");
        let msg = with("epochs = 3", "epochs = 3\nbatch_size = 100000");
        assert!(msg.contains("batch_size"), "{msg}");
        let msg = with("epochs = 3", "epochs = 3\nweight_decay = inf");
        assert!(msg.contains("weight_decay") && msg.contains("inf"), "{msg}");
        let msg = with("epochs = 3", "epochs = 3\ngrad_clip_norm = nan");
        assert!(msg.contains("grad_clip_norm"), "{msg}");
        let msg = with("epochs = 3", "epochs = 3\nlr = inf");
        assert!(msg.contains("lr"), "{msg}");
        let msg = parse(&format!("{MINIMAL}[data]\nsynth_train = 10000000\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("synth_train"), "{msg}");
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
        // A strategy's table is kept as written (its registry resolves it).
        let replay = &e.strategies["replay"];
        assert_eq!(replay["enabled"].as_bool(), Some(true));
        assert_eq!(replay["tasks"].as_array().map(Vec::len), Some(1));
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
    fn unknown_top_level_keys_name_their_line() {
        let msg = parse(&format!("colour = 3{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("colour") && msg.contains("line 1"), "{msg}");
        // A table outside the schema is kept for the strategy registry.
        let e = parse(&format!("{MINIMAL}[foo]\nx = 1\n")).unwrap();
        assert_eq!(e.strategies["foo"]["x"].as_integer(), Some(1));
    }

    #[test]
    fn line_of_finds_keys_in_tables_and_headers() {
        let text = "name = \"t\"\n[replay]\nenabled = true\n[[stages]]\ntask = \"seg\"\n[lwf.task_alpha]\nseg = 1\n";
        assert_eq!(line_of(text, None, "name"), Some(1));
        assert_eq!(line_of(text, None, "replay"), Some(2));
        assert_eq!(line_of(text, Some("replay"), "enabled"), Some(3));
        assert_eq!(line_of(text, Some("lwf"), "task_alpha"), Some(6));
        assert_eq!(line_of(text, Some("replay"), "weight"), None);
    }

    #[test]
    fn schema_keys_are_every_serialised_key() {
        let mut e = parse(MINIMAL).unwrap();
        e.seeds = Some(vec![1]);
        e.tasks
            .insert("det".into(), toml::Value::Table(Default::default()));
        let t = e.to_value();
        let keys: Vec<&String> = t.as_table().unwrap().keys().collect();
        for k in &keys {
            assert!(SCHEMA_KEYS.contains(&k.as_str()), "{k}");
        }
        assert_eq!(keys.len(), SCHEMA_KEYS.len());
    }
}
