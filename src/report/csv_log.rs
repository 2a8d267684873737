//! `epochs.csv`: one row per epoch, written and flushed as soon as the epoch ends, so a
//! crashed or running experiment can be plotted at any time.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};

use crate::TaskKind;

/// Metric columns, in CSV order: `(task, metric key)`; the column is `<task>_<key>`.
pub const METRIC_COLUMNS: [(TaskKind, &str); 6] = [
    (TaskKind::Seg, "miou"),
    (TaskKind::Seg, "pixel_acc"),
    (TaskKind::Det, "map50"),
    (TaskKind::Det, "map50_95"),
    (TaskKind::Cls, "top1"),
    (TaskKind::Cls, "top5"),
];

/// One epoch of training.
#[derive(Debug, Clone, Default)]
pub struct EpochRow {
    /// 0-based stage index.
    pub stage: usize,
    pub task: String,
    /// 1-based epoch within the stage.
    pub epoch: usize,
    /// 1-based epoch over the whole run.
    pub global_epoch: usize,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Mean over the epoch's steps of the stage task's loss.
    pub loss_new: f64,
    /// Mean of the weighted replay term (`weight · L_replay`), 0 without replay.
    pub loss_replay: f64,
    /// Mean total loss (new + replay + any strategy terms).
    pub loss_total: f64,
    /// Validation metrics by `(task, key)`; tasks not yet learned (or not evaluated this
    /// epoch) are absent and written as empty cells.
    pub metrics: BTreeMap<(TaskKind, String), f64>,
    /// Wall-clock seconds of the epoch (training + evaluation).
    pub seconds: f64,
}

pub struct EpochsCsv {
    writer: csv::Writer<File>,
}

impl EpochsCsv {
    pub fn header() -> Vec<String> {
        let mut h: Vec<String> = [
            "stage",
            "task",
            "epoch",
            "global_epoch",
            "lr",
            "loss_new",
            "loss_replay",
            "loss_total",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        h.extend(
            METRIC_COLUMNS
                .iter()
                .map(|(t, k)| format!("{}_{k}", t.name())),
        );
        h.push("seconds".into());
        h
    }

    pub fn create(path: &Path) -> Result<Self> {
        let mut writer =
            csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
        writer.write_record(Self::header())?;
        writer.flush()?;
        Ok(Self { writer })
    }

    /// Reopen the log of a resumed run: keep the rows up to `global_epoch` (a row written
    /// after the last saved state belongs to an epoch that will be trained again), then append.
    pub fn reopen(path: &Path, global_epoch: usize) -> Result<Self> {
        let header = Self::header();
        let mut reader =
            csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
        let old: Vec<String> = reader.headers()?.iter().map(String::from).collect();
        if old != header {
            anyhow::bail!(
                "{} has other columns than this version of onehead writes",
                path.display()
            );
        }
        let col = header
            .iter()
            .position(|h| h == "global_epoch")
            .expect("global_epoch is a column");
        let mut kept = csv::Writer::from_writer(Vec::new());
        kept.write_record(&header)?;
        for rec in reader.records() {
            let rec = rec.with_context(|| format!("reading {}", path.display()))?;
            let g: usize = rec[col]
                .parse()
                .with_context(|| format!("{}: bad global_epoch '{}'", path.display(), &rec[col]))?;
            if g <= global_epoch {
                kept.write_record(&rec)?;
            }
        }
        let bytes = kept.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::report::write_atomic(path, &bytes)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let writer = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(file);
        Ok(Self { writer })
    }

    pub fn append(&mut self, row: &EpochRow) -> Result<()> {
        let mut rec = vec![
            row.stage.to_string(),
            row.task.clone(),
            row.epoch.to_string(),
            row.global_epoch.to_string(),
            format!("{:.6e}", row.lr),
            format!("{:.6}", row.loss_new),
            format!("{:.6}", row.loss_replay),
            format!("{:.6}", row.loss_total),
        ];
        for (task, key) in METRIC_COLUMNS {
            rec.push(
                row.metrics
                    .get(&(task, key.to_string()))
                    .map(|v| format!("{v:.6}"))
                    .unwrap_or_default(),
            );
        }
        rec.push(format!("{:.3}", row.seconds));
        self.writer.write_record(&rec)?;
        // Flush every epoch: the file is the live record of the run.
        self.writer.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_flushed_and_unlearned_tasks_are_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("epochs.csv");
        let mut log = EpochsCsv::create(&p).unwrap();
        let mut row = EpochRow {
            stage: 0,
            task: "seg".into(),
            epoch: 1,
            global_epoch: 1,
            lr: 1e-3,
            loss_new: 1.5,
            loss_total: 1.5,
            seconds: 2.0,
            ..Default::default()
        };
        row.metrics.insert((TaskKind::Seg, "miou".into()), 0.25);
        log.append(&row).unwrap();
        // Read back while the writer is still open: the row must already be on disk.
        let mut r = csv::Reader::from_path(&p).unwrap();
        let headers = r.headers().unwrap().clone();
        let rec = r.records().next().unwrap().unwrap();
        let col = |name: &str| {
            rec.get(headers.iter().position(|h| h == name).unwrap())
                .unwrap()
        };
        assert_eq!(col("seg_miou"), "0.250000");
        assert_eq!(col("det_map50"), "");
        assert_eq!(col("task"), "seg");
    }
}
