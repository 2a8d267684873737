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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TaskKind;

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
    #[serde(default)]
    pub replay: ReplayConfig,
    #[serde(default)]
    pub eval: EvalConfig,
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
    pub task: TaskKind,
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
    List(Vec<TaskKind>),
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

/// Experience replay: every batch of a later stage carries samples of earlier tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    pub enabled: bool,
    /// Replayed samples added to every batch (the report: 4).
    pub images_per_batch: usize,
    /// `loss = L_new + weight · L_replay` (the report: 0.8).
    pub weight: f64,
    pub tasks: ReplayTasks,
    pub sampling: ReplaySampling,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            images_per_batch: 4,
            weight: 0.8,
            tasks: ReplayTasks::default(),
            sampling: ReplaySampling::RoundRobin,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every N epochs (the last epoch of every stage is always evaluated).
    pub every: usize,
    /// Largest allowed relative drop of a task's metric against its baseline.
    pub tolerance: f64,
    pub batch_size: usize,
    /// Detections with a lower score are dropped before NMS.
    pub score_threshold: f64,
    pub nms_iou: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 1,
            tolerance: 0.05,
            batch_size: 32,
            score_threshold: 0.05,
            nms_iou: 0.5,
        }
    }
}

impl Experiment {
    /// Read, apply `key=value` overrides, and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let exp = Self::from_toml_str(&text, path, overrides)?;
        exp.validate(path)?;
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
            if !(r.weight >= 0.0 && r.weight.is_finite()) {
                return bad("replay.weight must be >= 0".into());
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
        if !(0.0..=1.0).contains(&e.nms_iou) || !(0.0..=1.0).contains(&e.score_threshold) {
            return bad("eval.nms_iou and eval.score_threshold must be in [0, 1]".into());
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

    /// Tasks that stage `stage` replays (those learned in earlier stages and selected).
    pub fn replayed_tasks(&self, stage: usize) -> Vec<TaskKind> {
        if !self.replay.enabled {
            return vec![];
        }
        let current = self.stages[stage].task;
        let mut out: Vec<TaskKind> = Vec::new();
        for s in &self.stages[..stage] {
            let selected = match &self.replay.tasks {
                ReplayTasks::Keyword(_) => true,
                ReplayTasks::List(l) => l.contains(&s.task),
            };
            if selected && s.task != current && !out.contains(&s.task) {
                out.push(s.task);
            }
        }
        out
    }

    /// Tasks in the order they are first learned.
    pub fn tasks_in_order(&self) -> Vec<TaskKind> {
        let mut out = Vec::new();
        for s in &self.stages {
            if !out.contains(&s.task) {
                out.push(s.task);
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
        assert_eq!(e.replay.tasks, ReplayTasks::List(vec![TaskKind::Seg]));
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
        assert_eq!(e.replayed_tasks(1), vec![TaskKind::Seg]);
        assert_eq!(e.replayed_tasks(2), vec![TaskKind::Seg, TaskKind::Det]);
        let only_seg = text.replace("enabled = true", "enabled = true\ntasks = [\"seg\"]");
        let e = parse(&only_seg).unwrap();
        assert_eq!(e.replayed_tasks(2), vec![TaskKind::Seg]);
    }
}
