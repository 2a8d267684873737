//! Tasks as values. Everything that makes segmentation, detection or classification what it
//! is — its dataset layout and loader, its target type, its class count (read from the
//! data), its slice of the head's output channels, its loss, its evaluator, its metrics and
//! their chance levels, how it distils from a teacher — lives in one file per task behind
//! the [`Task`] trait. The engine, the report, the CSV writer and the CLI name no task.
//!
//! A [`Registry`] maps task names (as written in `[[stages]] task = "…"`) to constructors;
//! [`Registry::builtin`] knows `seg`, `det` and `cls`, and a library user registers more
//! (see the fourth-task test in `tests/engine_tasks.rs`). The tasks an experiment uses form a
//! [`TaskSet`], which lays their channel slices out one after another in the head's last
//! convolution, in registry order (`seg | det | cls` for the built-in three).

pub mod cls;
pub mod det;
pub mod det_loss;
pub mod images;
pub mod seg;

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

pub use crate::data::augment::Augment;
pub use crate::data::Split;
pub use crate::metrics::per_image::PerImage;

/// Validation metrics of one task, `key → value` (`miou`, `map50`, …, and per class
/// `iou.<class>` / `ap50.<class>`).
pub type TaskMetrics = BTreeMap<String, f64>;

/// The per-sample targets of a batch, in batch order. Each task stores its own target type
/// (`Vec<SegMask>`, `Vec<Vec<DetBox>>`, `Vec<usize>`…) and reads it back with
/// [`Batch::targets`]; the engine never looks inside.
pub type Targets = Box<dyn Any + Send + Sync>;

/// A batch of one task's samples.
pub struct Batch {
    /// `(B, 3, S, S)` f32, ImageNet-normalised.
    pub images: Tensor,
    /// Sample indices within the split the batch was drawn from.
    pub indices: Vec<usize>,
    pub targets: Targets,
}

impl Batch {
    /// A batch of `images` for the samples `indices`, with the task's own `targets`.
    pub fn new<T: Any + Send + Sync>(images: Tensor, indices: &[usize], targets: T) -> Self {
        Self {
            images,
            indices: indices.to_vec(),
            targets: Box::new(targets),
        }
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The targets as the task stored them (a task asking for another task's type is a bug
    /// in the caller, reported as an error, not a panic).
    pub fn targets<T: 'static>(&self) -> Result<&T> {
        self.targets.downcast_ref::<T>().with_context(|| {
            format!(
                "batch targets are not {} (a batch of one task was given to another)",
                std::any::type_name::<T>()
            )
        })
    }
}

/// A task's loss on one batch: the scalar to optimise plus named parts for logging.
pub struct TaskLoss {
    pub total: Tensor,
    pub parts: Vec<(&'static str, f64)>,
}

/// Settings of distillation from a frozen teacher (LwF-style), per call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillParams {
    /// Softmax temperature of the soft targets.
    pub temperature: f64,
}

/// Accumulates a task's predictions over a split; [`Evaluator::finish`] computes the metrics.
pub trait Evaluator {
    /// `out` is the task's slice of the head map for `batch` (same rows, same order).
    fn add(&mut self, out: &Tensor, batch: &Batch) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<TaskMetrics>;
    /// The metrics and, when the task keeps them, the per-image scores they were computed
    /// from (in the order the images were added), from which
    /// [`crate::metrics::bootstrap`] recomputes the metrics on resamples. The default keeps
    /// none: a task without per-image scores still evaluates, it only gets no intervals.
    fn finish_scored(self: Box<Self>) -> Result<(TaskMetrics, Option<PerImage>)> {
        Ok((self.finish()?, None))
    }
}

/// What [`Task::predict`] knows about the image besides the task's slice of the head map.
#[derive(Debug, Clone, Copy)]
pub struct PredictInput<'a> {
    /// `(width, height)` of the original image: results are given in its pixels.
    pub orig_size: (u32, u32),
    /// Side of the square model input the image was stretched to.
    pub image_size: usize,
    /// Stem of the files written for this image (`<stem>.json`, …): a task that writes a
    /// file of its own names it `<stem>.<task>.<ext>`.
    pub stem: &'a str,
}

/// One task's prediction on one image (`onehead predict`).
#[derive(Debug, Clone, Default)]
pub struct Prediction {
    /// The task's raw results for the image's JSON (in original-image pixels).
    pub json: serde_json::Value,
    /// What the task draws on the overlay.
    pub marks: Vec<Mark>,
    /// Files to write beside the JSON, `(file name, bytes)` (the JSON names them).
    pub files: Vec<(String, Vec<u8>)>,
}

/// Something drawn on a prediction overlay, in original-image pixels.
#[derive(Debug, Clone, PartialEq)]
pub enum Mark {
    /// A label map of the image's size, blended over it in the VOC palette; class 0
    /// (background) and 255 (ignore) are left clear.
    Mask {
        width: u32,
        height: u32,
        classes: Vec<u8>,
    },
    /// A box `[x0, y0, x1, y1]` with a label drawn on it, coloured by `colour` (an index
    /// into the overlay's palette, e.g. the class).
    Box {
        bbox: [f32; 4],
        label: String,
        colour: usize,
    },
    /// A caption line under the image: `title: item item …`, each item after a colour
    /// swatch when it has one.
    Legend {
        title: String,
        items: Vec<(String, Option<[u8; 3]>)>,
    },
}

/// Writes a task's predictions on the val split in a standard format that outside tools read
/// (`onehead eval --export`), fed the same batches and head slices as its [`Evaluator`].
pub trait Exporter {
    /// `out` is the task's slice of the head map for `batch` (same rows, same order).
    fn add(&mut self, out: &Tensor, batch: &Batch) -> Result<()>;
    /// Finish writing; returns a description of what was written for `manifest.json`
    /// (file names relative to the export folder, where the ground truth lives).
    fn finish(self: Box<Self>) -> Result<serde_json::Value>;
}

/// What the engine needs from a task. Implementations hold their train and val splits.
pub trait Task: Send + Sync {
    /// Name used in configs, CSV columns (`<name>_<metric>`) and file names.
    fn name(&self) -> &str;
    /// Class names in index order (read from the data).
    fn class_names(&self) -> &[String];
    /// Output channels this task owns in the head's last convolution.
    fn head_channels(&self) -> usize;
    /// Initial biases of some of its channels, `(channel within the slice, value)`
    /// (detection's objectness prior); the rest start at 0.
    fn head_bias_init(&self) -> Vec<(usize, f32)> {
        vec![]
    }
    /// Metric keys written to the CSVs, in column order.
    fn metric_names(&self) -> Vec<String>;
    /// The metric judged for forgetting unless the experiment picks another.
    fn primary_metric(&self) -> &str;
    /// The value of `metric` that a data-blind guess reaches on `split` (`None` for a metric
    /// the task does not define, or a split it has no chance level for); a baseline not
    /// clearly above it is "not learned". The built-in tasks: segmentation, the mIoU of
    /// "background everywhere" on the split (val and test); detection, the mAP of a
    /// prior-box predictor (each class's mean training box, in coordinates relative to the
    /// image, predicted once in every image of the split with one constant score: so a class
    /// that always sits at the same place has chance AP 1); classification, `1/C` (`5/C`
    /// for Top-5) on any split.
    fn chance(&self, metric: &str, split: Split) -> Option<f64>;
    /// The chance predictor's per-image scores on `split` (segmentation: all background;
    /// detection: the prior boxes), so that "above chance" is tested on the same resampled
    /// images as the baseline. `None`: the chance level is a constant (classification's
    /// `1/C` is the expected Top-1 of a guess on any image set) or unknown.
    fn chance_scores(&self, _split: Split) -> Option<PerImage> {
        None
    }
    /// Number of samples of a split; 0 for a split the task's data does not have. Only the
    /// synthetic benchmark has a [`Split::Test`]: callers ask `len(Split::Test) > 0` before
    /// evaluating it (train and val are never empty, [`TaskSet::new`] checks).
    fn len(&self, split: Split) -> usize;
    /// Width / height of sample `i`'s original image (random crops are drawn in its pixels).
    fn image_aspect(&self, _split: Split, _i: usize) -> f32 {
        1.0
    }
    /// The one class that stands for sample `i` (for class-balanced rehearsal buffers);
    /// `None` when it has none (no object, all background) or the task has no classes.
    fn image_class(&self, _split: Split, _i: usize) -> Option<usize> {
        None
    }
    /// A batch of samples `indices` of `split`; sample k transformed by `augs[k]` (image and
    /// target alike), `augs` may be empty (no augmentation).
    fn batch(
        &self,
        split: Split,
        indices: &[usize],
        augs: &[Augment],
        device: &Device,
    ) -> Result<Batch>;
    /// The loss of `batch` given `out`, the task's slice `(B, head_channels, h, w)` of the
    /// head map for exactly the batch's rows.
    fn loss(&self, out: &Tensor, batch: &Batch) -> Result<TaskLoss>;
    /// A fresh accumulator for `split`, fed batches of that split. For a split the task does
    /// not have (`len(split) == 0`), no batch can be made, and `add` fails if called.
    fn evaluator(&self, split: Split) -> Box<dyn Evaluator + '_>;
    /// A distillation loss pulling `student` toward `teacher` (both the task's slices for
    /// the same images), 0 when they are equal.
    fn distill(&self, student: &Tensor, teacher: &Tensor, p: &DistillParams) -> Result<Tensor>;
    /// The task's prediction on one image from its slice `(1, head_channels, h, w)` of the
    /// head map (`onehead predict`); `None`: the task has nothing to show.
    fn predict(&self, _out: &Tensor, _input: &PredictInput) -> Result<Option<Prediction>> {
        Ok(None)
    }
    /// An exporter of the val split's predictions writing under `dir` (the export folder;
    /// the task puts its files in `dir/<name>/`); `None`: the task exports nothing.
    fn exporter(&self, _dir: &Path) -> Result<Option<Box<dyn Exporter + '_>>> {
        Ok(None)
    }
}

/// Where and how tasks load their data.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Data root holding the task folders (`mini_voc_seg/`, …).
    pub root: PathBuf,
    /// Square side of the model input in pixels.
    pub image_size: usize,
    /// Training splits keep a crop-source copy of large images (random crops are on).
    pub train_crops: bool,
    /// The experiment's `[tasks.<name>]` tables: task-specific settings.
    pub settings: BTreeMap<String, toml::Value>,
}

impl OpenOptions {
    pub fn new(root: impl Into<PathBuf>, image_size: usize) -> Self {
        Self {
            root: root.into(),
            image_size,
            train_crops: false,
            settings: BTreeMap::new(),
        }
    }

    /// The settings of task `name` (`[tasks.<name>]`), defaults for absent keys; an unknown
    /// key or a wrong type is an error naming the table and the key.
    pub fn settings<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> Result<T> {
        match self.settings.get(name) {
            None => Ok(T::default()),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| anyhow::anyhow!("[tasks.{name}]: {}", e.message())),
        }
    }
}

/// Builds a task from its data.
pub type Opener = Box<dyn Fn(&OpenOptions) -> Result<Box<dyn Task>> + Send + Sync>;

/// Checks a task's `[tasks.<name>]` table without opening any data (at config load).
pub type SettingsCheck = Box<dyn Fn(&toml::Value) -> Result<()> + Send + Sync>;

/// Task names → constructors, in the order their slices are laid out in the head.
pub struct Registry {
    entries: Vec<(String, Opener)>,
    /// Settings checks of the tasks that have settings.
    checks: Vec<(String, SettingsCheck)>,
    /// The metric names of the tasks that declare them (for `[eval] metric` at load).
    metrics: Vec<(String, Vec<String>)>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            entries: vec![],
            checks: vec![],
            metrics: vec![],
        }
    }

    /// `seg`, `det` and `cls`, in that order.
    pub fn builtin() -> Self {
        let mut r = Self::new();
        r.register("seg", |o| Ok(Box::new(seg::SegTask::open(o)?)));
        r.register_metrics("seg", &seg::METRICS);
        r.register("det", |o| Ok(Box::new(det::DetTask::open(o)?)));
        r.register_settings("det", det::DetSettings::check);
        r.register_metrics("det", &det::METRICS);
        r.register("cls", |o| Ok(Box::new(cls::ClsTask::open(o)?)));
        r.register_metrics("cls", &cls::METRICS);
        r
    }

    /// Add (or replace) a task; new names come after the existing ones in the head.
    pub fn register(
        &mut self,
        name: &str,
        open: impl Fn(&OpenOptions) -> Result<Box<dyn Task>> + Send + Sync + 'static,
    ) {
        let open: Opener = Box::new(open);
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = open,
            None => self.entries.push((name.to_string(), open)),
        }
    }

    /// Check `[tasks.<name>]` tables with `check` when an experiment is loaded, so that a
    /// mistake there is an error naming the file before any data is opened.
    pub fn register_settings(
        &mut self,
        name: &str,
        check: impl Fn(&toml::Value) -> Result<()> + Send + Sync + 'static,
    ) {
        self.checks.retain(|(n, _)| n != name);
        self.checks.push((name.to_string(), Box::new(check)));
    }

    /// Declare the metric names of task `name` (what its `metric_names` returns), so that an
    /// `[eval] metric` it does not have is refused when the experiment is loaded.
    pub fn register_metrics(&mut self, name: &str, metrics: &[&str]) {
        self.metrics.retain(|(n, _)| n != name);
        let metrics = metrics.iter().map(|m| m.to_string()).collect();
        self.metrics.push((name.to_string(), metrics));
    }

    /// The declared metric names of task `name`, if it declared them.
    pub fn metrics(&self, name: &str) -> Option<&[String]> {
        let found = self.metrics.iter().find(|(n, _)| n == name);
        found.map(|(_, m)| m.as_slice())
    }

    /// Run the settings check of task `name` on its table (no check: accepted here, and
    /// checked when the task opens).
    pub fn check_settings(&self, name: &str, table: &toml::Value) -> Result<()> {
        match self.checks.iter().find(|(n, _)| n == name) {
            Some((_, check)) => check(table),
            None => Ok(()),
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|(n, _)| n == name)
    }

    /// Open the tasks named in `names` (any order, duplicates allowed), laid out in
    /// registry order.
    pub fn open(&self, names: &[String], opts: &OpenOptions) -> Result<TaskSet> {
        for n in names {
            if !self.contains(n) {
                anyhow::bail!("unknown task '{n}' (known: {})", self.names().join(", "));
            }
        }
        let mut tasks = Vec::new();
        for (name, open) in &self.entries {
            if names.iter().any(|n| n == name) {
                let task =
                    open(opts).with_context(|| format!("loading the data of task '{name}'"))?;
                anyhow::ensure!(
                    task.name() == name,
                    "task registered as '{name}' calls itself '{}'",
                    task.name()
                );
                tasks.push(task);
            }
        }
        TaskSet::new(tasks)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

/// The tasks of one experiment and their channel slices in the head.
pub struct TaskSet {
    tasks: Vec<Box<dyn Task>>,
    offsets: Vec<usize>,
    channels: usize,
}

impl TaskSet {
    pub fn new(tasks: Vec<Box<dyn Task>>) -> Result<Self> {
        anyhow::ensure!(!tasks.is_empty(), "an experiment needs at least one task");
        let mut offsets = Vec::with_capacity(tasks.len());
        let mut channels = 0;
        for t in &tasks {
            for split in [Split::Train, Split::Val] {
                anyhow::ensure!(
                    t.len(split) > 0,
                    "task '{}': the {} split is empty",
                    t.name(),
                    split.name()
                );
            }
            offsets.push(channels);
            channels += t.head_channels();
        }
        Ok(Self {
            tasks,
            offsets,
            channels,
        })
    }

    /// Total output channels of the head.
    pub fn head_channels(&self) -> usize {
        self.channels
    }

    /// `(absolute channel, bias)` of every task's non-zero initial biases.
    pub fn head_bias_init(&self) -> Vec<(usize, f32)> {
        self.iter()
            .flat_map(|(t, off)| {
                t.head_bias_init()
                    .into_iter()
                    .map(move |(c, v)| (off + c, v))
            })
            .collect()
    }

    /// Tasks with their channel offsets, in head order.
    pub fn iter(&self) -> impl Iterator<Item = (&dyn Task, usize)> {
        self.tasks
            .iter()
            .map(|t| t.as_ref())
            .zip(self.offsets.iter().copied())
    }

    /// The task called `name`.
    pub fn get(&self, name: &str) -> Result<&dyn Task> {
        self.tasks
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.as_ref())
            .with_context(|| format!("no task '{name}' in this experiment"))
    }

    /// Task `name`'s slice `(B, its channels, h, w)` of the head map `(B, C, h, w)`.
    pub fn slice(&self, map: &Tensor, name: &str) -> Result<Tensor> {
        let (i, t) = self
            .tasks
            .iter()
            .enumerate()
            .find(|(_, t)| t.name() == name)
            .with_context(|| format!("no task '{name}' in this experiment"))?;
        Ok(map.narrow(1, self.offsets[i], t.head_channels())?)
    }
}

/// The data folder of a task under `root`, or an error that says how to create it.
pub(crate) fn require_dir(path: PathBuf, root: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        Ok(path)
    } else {
        Err(crate::data::DataError::MissingDataset {
            path,
            root: root.to_path_buf(),
        }
        .into())
    }
}

/// The error for a request of a split the task's data does not have (a test split of the
/// real course sets).
pub(crate) fn no_split(task: &str, split: Split) -> anyhow::Error {
    anyhow::anyhow!(
        "{task}: the data has no {} split (only the synthetic benchmark has a test split; set data.synth_test > 0)",
        split.name()
    )
}

/// `path` made absolute (symbolic links resolved where it exists), for files that name
/// other files (`manifest.json`).
pub fn absolute_display(path: &Path) -> String {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// One sample index per element of `augs`, or no augmentation when `augs` is empty.
pub(crate) fn aug_at(augs: &[Augment], k: usize) -> Augment {
    augs.get(k).copied().unwrap_or_default()
}

/// Check the lengths of a batch request against a split of `len` samples.
pub(crate) fn check_request(
    task: &str,
    indices: &[usize],
    augs: &[Augment],
    len: usize,
) -> Result<()> {
    anyhow::ensure!(
        augs.is_empty() || augs.len() == indices.len(),
        "batch: {} augmentations for {} indices",
        augs.len(),
        indices.len()
    );
    if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
        anyhow::bail!("batch: sample index {bad} out of range ({task} has {len} samples)");
    }
    Ok(())
}
