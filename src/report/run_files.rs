//! Reading a run folder back for pictures and comparisons: `epochs.csv`, `matrix.csv`,
//! `summary.json`, `config.toml`, `meta.json` (formats: README, "What a run leaves").
//!
//! Everything here reads columns and fields by NAME and ignores the ones it does not know,
//! so the engine can add columns without breaking the pictures. A run that is still going
//! (or was killed) has no `summary.json` and possibly a truncated last line in `epochs.csv`:
//! that line is skipped with a warning and the rest is drawn. The older `epochs.csv`
//! (0-based `stage`) is read too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::csv_log::EpochRow;
use super::summary::{Matrix, RunSummary};

/// Metric columns preferred as a task's headline metric when `summary.json` does not say.
const PREFERRED_METRICS: [&str; 3] = ["seg_miou", "det_map50", "cls_top1"];

/// Columns of `epochs.csv` that are neither loss terms nor metrics.
const FIXED_COLUMNS: [&str; 10] = [
    "stage",
    "task",
    "epoch",
    "global_epoch",
    "lr",
    "seconds",
    "end_time",
    "data_seconds",
    "step_seconds",
    "eval_seconds",
];

/// One stage as seen in `epochs.csv`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stage {
    /// 1-based.
    pub index: usize,
    pub task: String,
    pub first_epoch: usize,
    pub last_epoch: usize,
}

/// The parsed `epochs.csv`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Epochs {
    pub rows: Vec<EpochRow>,
    /// Extra loss-term columns (`loss_replay`, `loss_ewc`, …), in file order.
    pub terms: Vec<String>,
    /// Metric columns (`<task>_<metric>`), in file order.
    pub metric_columns: Vec<String>,
    /// Any other column (`name → value per row`), kept for the TensorBoard export.
    pub other: BTreeMap<String, Vec<Option<f64>>>,
}

impl Epochs {
    /// Stages in order, from the rows.
    pub fn stages(&self) -> Vec<Stage> {
        let mut out: Vec<Stage> = Vec::new();
        for r in &self.rows {
            match out.last_mut() {
                Some(s) if s.index == r.stage => {
                    s.first_epoch = s.first_epoch.min(r.global_epoch);
                    s.last_epoch = s.last_epoch.max(r.global_epoch);
                }
                _ => out.push(Stage {
                    index: r.stage,
                    task: r.task.clone(),
                    first_epoch: r.global_epoch,
                    last_epoch: r.global_epoch,
                }),
            }
        }
        out
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.metric_columns.iter().position(|c| c == name)
    }

    /// `(global_epoch, value)` of a metric column, skipping empty cells and NaN.
    pub fn series(&self, column: usize) -> Vec<(f64, f64)> {
        let name = &self.metric_columns[column];
        self.rows
            .iter()
            .filter_map(|r| {
                let v = *r.metrics.get(name)?;
                v.is_finite().then_some((r.global_epoch as f64, v))
            })
            .collect()
    }

    pub fn last_epoch(&self) -> usize {
        self.rows.iter().map(|r| r.global_epoch).max().unwrap_or(0)
    }
}

/// One task's verdict row, from `summary.json` or worked out from `epochs.csv`.
#[derive(Debug, Clone)]
pub(crate) struct TaskResult {
    pub task: String,
    /// The `epochs.csv` column of the verdict metric (`seg_miou`).
    pub column: String,
    /// 1-based stage that learned the task.
    pub stage: Option<usize>,
    pub baseline: Option<f64>,
    pub final_value: Option<f64>,
    pub drop_rel: Option<f64>,
    /// The drop's interval (tolerance units), when the verdict has one.
    pub drop_interval: Option<[f64; 2]>,
    /// `within`, `forgot`, `undecided`, `not_learned`, or `unfinished` when the run has no
    /// summary.
    pub verdict: String,
    /// The value under which the task counts as forgotten.
    pub threshold: Option<f64>,
    /// The metric's chance level on the verdict's split (from the summary).
    pub chance: Option<f64>,
}

/// A run folder, read back.
#[derive(Debug, Clone)]
pub(crate) struct RunData {
    pub dir: PathBuf,
    pub name: String,
    pub config_text: Option<String>,
    pub config: Option<toml::Value>,
    pub summary: Option<RunSummary>,
    pub meta: Option<Json>,
    pub epochs: Epochs,
    pub matrix: Option<Matrix>,
    pub tolerance: f64,
    /// `relative` or `absolute`.
    pub tolerance_kind: String,
    pub tasks: Vec<TaskResult>,
    /// Non-fatal problems (a truncated last line, an unreadable optional file).
    pub warnings: Vec<String>,
}

impl RunData {
    /// Read a run folder. Only `epochs.csv` is required; every other file is optional.
    pub fn load(dir: &Path) -> Result<Self> {
        let epochs_path = dir.join("epochs.csv");
        if !epochs_path.is_file() {
            bail!(
                "{} not found: {} is not a run folder",
                epochs_path.display(),
                dir.display()
            );
        }
        let mut warnings = Vec::new();
        let summary = read_summary(&dir.join("summary.json"), &mut warnings);
        let meta = read_json(&dir.join("meta.json"), &mut warnings);
        let config_path = dir.join("config.toml");
        let config_text = std::fs::read_to_string(&config_path).ok();
        let config = config_text
            .as_deref()
            .and_then(|t| match toml::from_str::<toml::Table>(t) {
                Ok(v) => Some(toml::Value::Table(v)),
                Err(e) => {
                    warnings.push(format!("{}: not valid TOML ({e})", config_path.display()));
                    None
                }
            });
        let mut known_tasks: Vec<String> = Vec::new();
        if let Some(s) = &summary {
            known_tasks.extend(s.tasks.iter().map(|t| t.task.clone()));
        }
        if let Some(stages) = config
            .as_ref()
            .and_then(|c| c.get("stages")?.as_array().cloned())
        {
            known_tasks.extend(
                stages
                    .iter()
                    .filter_map(|s| Some(s.get("task")?.as_str()?.to_string())),
            );
        }
        let epochs = read_epochs(&epochs_path, &known_tasks, &mut warnings)?;
        let matrix = match Matrix::read_csv(&dir.join("matrix.csv")) {
            Ok(Some(m)) => Some(m),
            Ok(None) => summary.as_ref().and_then(matrix_from_summary),
            Err(e) => {
                warnings.push(format!("{e:#}"));
                summary.as_ref().and_then(matrix_from_summary)
            }
        };
        let name = summary
            .as_ref()
            .map(|s| s.name.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| {
                config
                    .as_ref()
                    .and_then(|c| Some(c.get("name")?.as_str()?.into()))
            })
            .or_else(|| {
                meta.as_ref()
                    .and_then(|m| Some(m.get("name")?.as_str()?.into()))
            })
            .unwrap_or_else(|| dir_label(dir));
        let (tolerance, tolerance_kind) = tolerance_of(summary.as_ref(), config.as_ref());
        let mut run = RunData {
            dir: dir.to_path_buf(),
            name,
            config_text,
            config,
            summary,
            meta,
            epochs,
            matrix,
            tolerance,
            tolerance_kind,
            tasks: Vec::new(),
            warnings,
        };
        run.tasks = run.task_results();
        Ok(run)
    }

    /// The run folder's own name (`20261125-062000`), for telling apart runs of one name.
    pub fn run_id(&self) -> String {
        dir_label(&self.dir)
    }

    pub fn finished(&self) -> bool {
        self.summary.is_some()
    }

    /// Median batch-1 latency from the summary (ms per image).
    pub fn latency_ms(&self) -> Option<f64> {
        self.summary.as_ref().map(|s| s.latency_ms)
    }

    /// Training time: the summary's, else the sum of the epochs' seconds.
    pub fn train_seconds(&self) -> Option<f64> {
        self.summary.as_ref().map(|s| s.train_seconds).or_else(|| {
            let s: Vec<f64> = self.epochs.rows.iter().filter_map(|r| r.seconds).collect();
            (!s.is_empty()).then(|| s.iter().sum())
        })
    }

    /// Total parameter count (`None` when the summary has none).
    pub fn params_total(&self) -> Option<u64> {
        let total = self.summary.as_ref()?.params.total;
        (total > 0).then_some(total as u64)
    }

    /// Whether every task passed (`None` for an unfinished run).
    pub fn pass(&self) -> Option<bool> {
        Some(self.summary.as_ref()?.pass)
    }

    /// `(task, epochs)` of each stage as the config plans them, if `config.toml` says.
    fn planned(&self) -> Option<Vec<(String, usize)>> {
        let stages = self.config.as_ref()?.get("stages")?.as_array()?;
        stages
            .iter()
            .map(|s| {
                let task = s.get("task")?.as_str()?.to_string();
                let epochs = s.get("epochs")?.as_integer()?;
                Some((task, usize::try_from(epochs).ok()?))
            })
            .collect()
    }

    /// Stages for drawing: as trained, extended by the config's plan (an unfinished run shows
    /// the stages it has not reached yet, and its current stage at full length). Without a
    /// config, or when the plan does not match the rows, the stages as trained.
    pub fn chart_stages(&self) -> Vec<Stage> {
        let actual = self.epochs.stages();
        let Some(plan) = self.planned() else {
            return actual;
        };
        let matches =
            actual.len() <= plan.len() && actual.iter().zip(&plan).all(|(a, p)| a.task == p.0);
        if !matches {
            return actual;
        }
        let mut out = Vec::with_capacity(plan.len());
        let mut next = 1;
        for (k, (task, epochs)) in plan.iter().enumerate() {
            let first = actual.get(k).map(|a| a.first_epoch).unwrap_or(next);
            let last =
                (first + epochs.max(&1) - 1).max(actual.get(k).map(|a| a.last_epoch).unwrap_or(0));
            out.push(Stage {
                index: k + 1,
                task: task.clone(),
                first_epoch: first,
                last_epoch: last,
            });
            next = last + 1;
        }
        out
    }

    /// The last global epoch of the run's x axis (planned, or as far as trained).
    pub fn chart_last_epoch(&self) -> usize {
        self.chart_stages()
            .iter()
            .map(|s| s.last_epoch)
            .max()
            .unwrap_or(0)
            .max(self.epochs.last_epoch())
    }

    /// The threshold line of a task with this baseline.
    pub fn threshold(&self, baseline: f64) -> f64 {
        if self.tolerance_kind == "absolute" {
            baseline - self.tolerance
        } else {
            baseline * (1.0 - self.tolerance)
        }
    }

    /// Tasks in the order they were learned, with the verdict metric of each.
    fn task_results(&self) -> Vec<TaskResult> {
        let stages = self.epochs.stages();
        let planned = self.chart_stages();
        let mut out: Vec<TaskResult> = Vec::new();
        let from_summary = self.summary.as_ref().map_or(&[][..], |s| &s.tasks[..]);
        for t in from_summary.iter().filter(|t| !t.task.is_empty()) {
            let (task, metric) = (t.task.as_str(), t.metric.as_str());
            let column = self
                .metric_column(task, Some(metric))
                .unwrap_or_else(|| format!("{task}_{metric}"));
            let stage = Some(t.stage).filter(|&s| s > 0).or_else(|| {
                let own = stages.iter().rev().find(|s| s.task == task);
                own.map(|s| s.index)
            });
            out.push(TaskResult {
                task: task.into(),
                column,
                stage,
                baseline: Some(t.baseline),
                final_value: Some(t.final_value),
                drop_rel: t.drop_rel,
                drop_interval: t.drop_interval,
                verdict: t.verdict.key().to_string(),
                threshold: Some(self.threshold(t.baseline)),
                chance: Some(t.chance).filter(|c| c.is_finite()),
            });
        }
        // Tasks without a summary row (an unfinished run): worked out from epochs.csv. The
        // baseline is the metric at the last epoch of the (last) stage that trained the task.
        let mut seen: Vec<String> = out.iter().map(|t| t.task.clone()).collect();
        for s in &stages {
            if seen.contains(&s.task) {
                continue;
            }
            seen.push(s.task.clone());
            let Some(column) = self.metric_column(&s.task, None) else {
                continue;
            };
            let idx = self.epochs.column(&column).expect("metric column exists");
            let own = stages.iter().rev().find(|x| x.task == s.task).unwrap_or(s);
            let series = self.epochs.series(idx);
            // The stage has ended if a later one has begun, or it has trained all the epochs
            // the config plans for it (without a config: assume so).
            let planned_last = planned
                .iter()
                .find(|p| p.index == own.index && p.task == own.task)
                .map(|p| p.last_epoch)
                .unwrap_or(own.last_epoch);
            let complete = stages.iter().any(|x| x.index > own.index)
                || self.epochs.last_epoch() >= planned_last;
            let baseline = series
                .iter()
                .rev()
                .find(|(e, _)| *e as usize <= own.last_epoch && *e as usize >= own.first_epoch)
                .map(|p| p.1)
                .filter(|_| complete);
            let final_value = series.last().map(|p| p.1);
            let drop_rel = match (baseline, final_value) {
                (Some(b), Some(f)) if b > 0.0 => Some((b - f) / b),
                _ => None,
            };
            out.push(TaskResult {
                task: s.task.clone(),
                column,
                stage: Some(own.index),
                baseline,
                final_value,
                drop_rel,
                drop_interval: None,
                verdict: "unfinished".into(),
                threshold: baseline.map(|b| self.threshold(b)),
                chance: None,
            });
        }
        out.sort_by_key(|t| t.stage.unwrap_or(usize::MAX));
        out
    }

    /// The `epochs.csv` column of a task's metric: `metric` if given and present (as
    /// `<task>_<metric>` or the full column name), else the preferred headline metric,
    /// else the task's first metric column.
    pub fn metric_column(&self, task: &str, metric: Option<&str>) -> Option<String> {
        let cols = &self.epochs.metric_columns;
        if let Some(m) = metric.filter(|m| !m.is_empty()) {
            for cand in [format!("{task}_{m}"), m.to_string()] {
                if cols.contains(&cand) {
                    return Some(cand);
                }
            }
        }
        let prefix = format!("{task}_");
        PREFERRED_METRICS
            .iter()
            .find(|p| p.starts_with(&prefix) && cols.iter().any(|c| c == *p))
            .map(|p| p.to_string())
            .or_else(|| cols.iter().find(|c| c.starts_with(&prefix)).cloned())
    }
}

fn dir_label(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// `summary.json` as the engine wrote it (`None`, with a warning, when it is not one).
fn read_summary(path: &Path, warnings: &mut Vec<String>) -> Option<RunSummary> {
    let json = read_json(path, warnings)?;
    match serde_json::from_value(json) {
        Ok(s) => Some(s),
        Err(e) => {
            warnings.push(format!(
                "{}: not a run summary ({e}); ignored",
                path.display()
            ));
            None
        }
    }
}

fn read_json(path: &Path, warnings: &mut Vec<String>) -> Option<Json> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            warnings.push(format!("{}: not valid JSON ({e}); ignored", path.display()));
            None
        }
    }
}

/// `(tolerance, kind)`: from the summary, else `config.toml`'s `[eval]`, else 5 % relative.
fn tolerance_of(summary: Option<&RunSummary>, config: Option<&toml::Value>) -> (f64, String) {
    let eval = config.and_then(|c| c.get("eval"));
    let tol = summary
        .map(|s| s.tolerance)
        .or_else(|| {
            let v = eval?.get("tolerance")?;
            v.as_float().or(v.as_integer().map(|i| i as f64))
        })
        .unwrap_or(0.05);
    let kind = summary
        .map(|s| match s.tolerance_kind {
            crate::config::ToleranceKind::Relative => "relative".to_string(),
            crate::config::ToleranceKind::Absolute => "absolute".to_string(),
        })
        .or_else(|| Some(eval?.get("tolerance_kind")?.as_str()?.to_string()))
        .unwrap_or_else(|| "relative".into());
    (tol, kind)
}

fn parse_cell(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    s.parse::<f64>().ok()
}

/// Read `epochs.csv`. `known_tasks` (from the summary and config) help tell metric columns
/// from unknown ones; the tasks of the `task` column count too.
pub(crate) fn read_epochs(
    path: &Path,
    known_tasks: &[String],
    warnings: &mut Vec<String>,
) -> Result<Epochs> {
    let text = complete_lines(path, warnings)?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header", path.display()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let records: Vec<(u64, csv::StringRecord)> = reader
        .records()
        .map(|r| {
            let r = r.with_context(|| format!("{}: malformed CSV", path.display()))?;
            let line = r.position().map(|p| p.line()).unwrap_or(0);
            Ok((line, r))
        })
        .collect::<Result<_>>()?;
    let cols = EpochColumnsRead::new(path, &header, known_tasks, &records)?;
    let n = records.len();
    let mut rows = Vec::with_capacity(n);
    let mut other_values: Vec<Vec<Option<f64>>> = vec![Vec::new(); cols.others.len()];
    for (k, (line, r)) in records.iter().enumerate() {
        match cols.row(r) {
            Ok(row) => {
                for (slot, (c, _)) in other_values.iter_mut().zip(&cols.others) {
                    slot.push(r.get(*c).and_then(parse_cell));
                }
                rows.push(row);
            }
            Err(e) if k + 1 == n => warnings.push(format!(
                "{}: line {line} is incomplete or malformed ({e}); skipped",
                path.display()
            )),
            Err(e) => bail!("{}: line {line}: {e}", path.display()),
        }
    }
    // The older format numbers stages from 0.
    if rows.iter().any(|r| r.stage == 0) {
        for r in &mut rows {
            r.stage += 1;
        }
    }
    // Without `global_epoch`: count epochs over the run.
    if cols.global.is_none() {
        for (i, r) in rows.iter_mut().enumerate() {
            r.global_epoch = i + 1;
        }
    }
    Ok(Epochs {
        rows,
        terms: cols.terms.into_iter().map(|(_, h)| h).collect(),
        metric_columns: cols.metrics.into_iter().map(|(_, h)| h).collect(),
        other: cols
            .others
            .into_iter()
            .map(|(_, h)| h)
            .zip(other_values)
            .collect(),
    })
}

/// The file's text up to its last complete line: a line without its terminator was cut off
/// mid-write (the engine writes whole lines), and is dropped with a warning.
fn complete_lines(path: &Path, warnings: &mut Vec<String>) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        bail!("{} is empty (no header)", path.display());
    }
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if !text.ends_with('\n') {
        let cut = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
        if cut > 0 {
            let line_no = text[..cut].lines().count() + 1;
            warnings.push(format!(
                "{}: line {line_no} is incomplete (the run was interrupted while writing it?); skipped",
                path.display()
            ));
            text.truncate(cut);
        }
    }
    Ok(text)
}

/// Where each field of an `epochs.csv` row is: the fixed columns, the loss terms, the task
/// metrics (columns `<task>_…`) and anything else.
struct EpochColumnsRead {
    width: usize,
    header: Vec<String>,
    stage: usize,
    task: usize,
    global: Option<usize>,
    epoch: Option<usize>,
    lr: Option<usize>,
    new: Option<usize>,
    total: Option<usize>,
    seconds: Option<usize>,
    end_time: Option<usize>,
    /// The [`super::csv_log::PHASE_COLUMNS`], where the file has them.
    phases: [Option<usize>; 3],
    terms: Vec<(usize, String)>,
    metrics: Vec<(usize, String)>,
    others: Vec<(usize, String)>,
}

impl EpochColumnsRead {
    fn new(
        path: &Path,
        header: &[String],
        known_tasks: &[String],
        records: &[(u64, csv::StringRecord)],
    ) -> Result<Self> {
        let col = |name: &str| header.iter().position(|h| h == name);
        let required = |name: &str| {
            col(name).with_context(|| {
                format!(
                    "{}: no column `{name}` (columns: {})",
                    path.display(),
                    header.join(", ")
                )
            })
        };
        let (stage, task) = (required("stage")?, required("task")?);
        if col("global_epoch").is_none() && col("epoch").is_none() {
            bail!(
                "{}: neither `global_epoch` nor `epoch` column",
                path.display()
            );
        }
        let mut tasks: Vec<String> = known_tasks.to_vec();
        for (_, r) in records {
            if let Some(t) = r.get(task) {
                if !t.is_empty() && !tasks.iter().any(|x| x == t) {
                    tasks.push(t.to_string());
                }
            }
        }
        let (mut terms, mut metrics, mut others) = (Vec::new(), Vec::new(), Vec::new());
        for (i, h) in header.iter().enumerate() {
            if FIXED_COLUMNS.contains(&h.as_str()) || h == "loss_new" || h == "loss_total" {
                continue;
            }
            if h.starts_with("loss_") {
                terms.push((i, h.clone()));
            } else if tasks.iter().any(|t| h.starts_with(&format!("{t}_"))) {
                metrics.push((i, h.clone()));
            } else {
                others.push((i, h.clone()));
            }
        }
        Ok(Self {
            width: header.len(),
            header: header.to_vec(),
            stage,
            task,
            global: col("global_epoch"),
            epoch: col("epoch"),
            lr: col("lr"),
            new: col("loss_new"),
            total: col("loss_total"),
            seconds: col("seconds"),
            end_time: col("end_time"),
            phases: super::csv_log::PHASE_COLUMNS.map(col),
            terms,
            metrics,
            others,
        })
    }

    /// One row, or what is wrong with it.
    fn row(&self, r: &csv::StringRecord) -> std::result::Result<EpochRow, String> {
        if r.len() != self.width {
            return Err(format!(
                "{} fields where the header has {}",
                r.len(),
                self.width
            ));
        }
        let int = |c: usize, name: &str| -> std::result::Result<usize, String> {
            let s = r.get(c).unwrap_or("");
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{name}` is '{s}', not a number"))
        };
        let num = |c: Option<usize>| -> std::result::Result<Option<f64>, String> {
            let Some(c) = c else { return Ok(None) };
            let s = r.get(c).unwrap_or("");
            if s.trim().is_empty() {
                return Ok(None);
            }
            parse_cell(s)
                .map(Some)
                .ok_or_else(|| format!("`{}` is '{s}', not a number", self.header[c]))
        };
        // Columns by name, the cells that hold a value.
        let cells =
            |cols: &[(usize, String)]| -> std::result::Result<BTreeMap<String, f64>, String> {
                let mut out = BTreeMap::new();
                for (c, name) in cols {
                    if let Some(v) = num(Some(*c))? {
                        out.insert(name.clone(), v);
                    }
                }
                Ok(out)
            };
        let fixed: Vec<(usize, String)> = [(self.new, "loss_new"), (self.total, "loss_total")]
            .into_iter()
            .filter_map(|(c, n)| Some((c?, n.to_string())))
            .collect();
        let mut losses = cells(&fixed)?;
        losses.extend(cells(&self.terms)?);
        Ok(EpochRow {
            stage: int(self.stage, "stage")?,
            task: r.get(self.task).unwrap_or("").trim().to_string(),
            epoch: match self.epoch {
                Some(c) => int(c, "epoch")?,
                None => 0,
            },
            global_epoch: match self.global {
                Some(c) => int(c, "global_epoch")?,
                None => 0,
            },
            lr: num(self.lr)?,
            losses,
            metrics: cells(&self.metrics)?,
            seconds: num(self.seconds)?,
            end_time: num(self.end_time)?,
            data_seconds: num(self.phases[0])?,
            step_seconds: num(self.phases[1])?,
            eval_seconds: num(self.phases[2])?,
        })
    }
}

/// The matrix `summary.json` holds, if it holds one.
fn matrix_from_summary(s: &RunSummary) -> Option<Matrix> {
    let m = &s.matrix;
    (!m.tasks.is_empty() && m.values.iter().any(|r| !r.is_empty())).then(|| m.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_columns_by_name_and_skips_a_truncated_line() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("epochs.csv");
        std::fs::write(
            &p,
            "task,stage,epoch,global_epoch,lr,loss_new,loss_replay,loss_total,seg_miou,grad_norm,seconds\n\
             seg,1,1,1,0.001,2.0,0,2.0,0.1,3.5,10\n\
             seg,1,2,2,0.001,1.5,0,1.5,0.2,,10\n\
             det,2,1,3,0.001,4.0,0.5,4.5,0.1",
        )
        .unwrap();
        let mut w = Vec::new();
        let e = read_epochs(&p, &[], &mut w).unwrap();
        assert_eq!(e.rows.len(), 2);
        assert_eq!(e.terms, vec!["loss_replay"]);
        assert_eq!(e.metric_columns, vec!["seg_miou"]);
        assert!(e.other.contains_key("grad_norm"));
        assert_eq!(e.rows[1].metrics.get("seg_miou"), Some(&0.2));
        assert_eq!(e.rows[1].losses.get("loss_new"), Some(&1.5));
        assert_eq!(e.rows[1].epoch, 2);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("line 4"), "{w:?}");
    }

    #[test]
    fn a_bad_row_in_the_middle_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("epochs.csv");
        std::fs::write(
            &p,
            "stage,task,global_epoch,loss_new\n1,seg,1,x\n1,seg,2,1.0\n",
        )
        .unwrap();
        let err = read_epochs(&p, &[], &mut Vec::new()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("epochs.csv") && msg.contains("line 2"),
            "{msg}"
        );
        std::fs::write(&p, "a,b\n1,2\n").unwrap();
        let msg = format!("{:#}", read_epochs(&p, &[], &mut Vec::new()).unwrap_err());
        assert!(msg.contains("no column `stage`"), "{msg}");
    }

    #[test]
    fn old_format_stages_are_shifted_to_one_based() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("epochs.csv");
        std::fs::write(
            &p,
            "stage,task,epoch,global_epoch,lr,loss_new,loss_replay,loss_total,seg_miou,seconds\n\
             0,seg,1,1,0.1,1,0,1,0.2,1\n1,det,1,2,0.1,1,0.3,1.3,0.1,1\n",
        )
        .unwrap();
        let e = read_epochs(&p, &[], &mut Vec::new()).unwrap();
        let s = e.stages();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].index, s[1].index), (1, 2));
        assert_eq!(s[1].task, "det");
    }

    #[test]
    fn unfinished_run_takes_baseline_and_tolerance_from_epochs_and_config() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("config.toml"),
            "name = \"x\"\n[[stages]]\ntask = \"seg\"\nepochs = 2\n[[stages]]\ntask = \"det\"\nepochs = 2\n\
             [eval]\ntolerance = 0.02\ntolerance_kind = \"absolute\"\n",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("epochs.csv"),
            "stage,task,epoch,global_epoch,loss_new,seg_miou,seg_pixel_acc,det_map50_95,det_map50\n\
             1,seg,1,1,2.0,0.1,0.5,,\n1,seg,2,2,1.0,0.3,0.6,,\n2,det,1,3,3.0,0.2,0.6,0.05,0.1\n",
        )
        .unwrap();
        let run = RunData::load(tmp.path()).unwrap();
        assert!(run.warnings.is_empty(), "{:?}", run.warnings);
        assert_eq!(run.name, "x");
        assert_eq!(
            (run.tolerance, run.tolerance_kind.as_str()),
            (0.02, "absolute")
        );
        let seg = &run.tasks[0];
        assert_eq!(seg.column, "seg_miou");
        assert_eq!(seg.baseline, Some(0.3));
        assert_eq!(seg.final_value, Some(0.2));
        assert!((seg.threshold.unwrap() - 0.28).abs() < 1e-12);
        assert_eq!(seg.verdict, "unfinished");
        // det_map50 is preferred over the first det column; its stage has not ended yet.
        let det = &run.tasks[1];
        assert_eq!(det.column, "det_map50");
        assert_eq!(det.baseline, None);
        // The chart shows the planned 4 epochs.
        assert_eq!(run.chart_last_epoch(), 4);
    }
}
