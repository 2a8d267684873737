//! The run's CSV files, each flushed as soon as an epoch ends, so a crashed or running
//! experiment can be plotted at any time:
//!
//! - `epochs.csv`: one row per epoch — `stage` (1-based), `task`, `epoch`, `global_epoch`,
//!   `lr`, `loss_new`, one `loss_<term>` per plug-in term, `loss_total`, one
//!   `<task>_<metric>` per metric of every task, `seconds`. Columns come from the tasks and
//!   plug-ins of the run; this file names none.
//! - `eval.csv`: long format, one row per evaluated metric — `stage`, `epoch`,
//!   `global_epoch`, `task`, `metric`, `value` — for pandas/seaborn without reshaping.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::tasks::TaskMetrics;

/// One evaluation of one task after one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// 0-based stage index (written 1-based).
    pub stage: usize,
    /// 1-based epoch within the stage.
    pub epoch: usize,
    pub global_epoch: usize,
    pub task: String,
    pub metrics: TaskMetrics,
}

/// One epoch of training: one row of `epochs.csv`. The engine writes it and the pictures
/// read it back (`run_files`) as this same type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpochRow {
    /// 1-based stage, as written.
    pub stage: usize,
    pub task: String,
    /// 1-based epoch within the stage (0 when read from a file without the column).
    pub epoch: usize,
    /// 1-based epoch over the whole run.
    pub global_epoch: usize,
    /// Learning rate at the epoch's last step (`None`: an empty cell).
    pub lr: Option<f64>,
    /// Mean over the epoch's steps of each loss column (`loss_new`, `loss_<term>`,
    /// `loss_total`), by column name; absent = empty cell.
    pub losses: BTreeMap<String, f64>,
    /// Validation metrics by column name `<task>_<metric>`; absent = empty cell.
    pub metrics: BTreeMap<String, f64>,
    /// Wall-clock seconds of the epoch (training + evaluation).
    pub seconds: Option<f64>,
    /// When the epoch ended, Unix seconds (UTC), to the millisecond: the wall time of its
    /// TensorBoard scalars, live and exported alike (`None`: a file without the column).
    pub end_time: Option<f64>,
    /// Of `seconds`: assembling the training batches (augmentation, decoding, the plug-ins'
    /// extra batches), the steps' forward/backward/update, and the evaluation. The rest
    /// (progress, plug-in epoch hooks) is in `seconds` only. `None`: a file without them.
    pub data_seconds: Option<f64>,
    pub step_seconds: Option<f64>,
    pub eval_seconds: Option<f64>,
}

/// The columns of [`EpochRow`]'s time split, in file order (after `end_time`).
pub const PHASE_COLUMNS: [&str; 3] = ["data_seconds", "step_seconds", "eval_seconds"];

/// The column layout of `epochs.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochColumns {
    /// Loss columns in order: `loss_new`, `loss_<term>`…, `loss_total`.
    pub losses: Vec<String>,
    /// Metric columns `<task>_<metric>` in order.
    pub metrics: Vec<String>,
    /// Whether the file has the `end_time` column (files of onehead 0.1 before it have not:
    /// a run resumed from one keeps its layout).
    pub end_time: bool,
    /// Whether it has the [`PHASE_COLUMNS`] (files of onehead before them have not).
    pub phases: bool,
}

impl EpochColumns {
    /// Columns for plug-in loss terms `terms` and `(task, metric names)` in order.
    pub fn new(terms: &[String], tasks: &[(String, Vec<String>)]) -> Self {
        let mut losses = vec!["loss_new".to_string()];
        losses.extend(terms.iter().map(|t| format!("loss_{t}")));
        losses.push("loss_total".into());
        let metrics = tasks
            .iter()
            .flat_map(|(t, ms)| ms.iter().map(move |m| format!("{t}_{m}")))
            .collect();
        Self {
            losses,
            metrics,
            end_time: true,
            phases: true,
        }
    }

    /// The layouts a resumed run may find, newest first: each older one lacks the columns
    /// added after it.
    fn layouts(&self) -> [Self; 3] {
        let no_phases = Self {
            phases: false,
            ..self.clone()
        };
        let oldest = Self {
            end_time: false,
            ..no_phases.clone()
        };
        [self.clone(), no_phases, oldest]
    }

    pub fn header(&self) -> Vec<String> {
        let mut h: Vec<String> = ["stage", "task", "epoch", "global_epoch", "lr"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        h.extend(self.losses.iter().cloned());
        h.extend(self.metrics.iter().cloned());
        h.push("seconds".into());
        if self.end_time {
            h.push("end_time".into());
        }
        if self.phases {
            h.extend(PHASE_COLUMNS.iter().map(|c| c.to_string()));
        }
        h
    }
}

/// An append-only CSV with a fixed header, flushed after every record.
struct Appender {
    path: std::path::PathBuf,
    writer: csv::Writer<File>,
}

impl Appender {
    fn create(path: &Path, header: &[String]) -> Result<Self> {
        let writer =
            csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
        let mut a = Self {
            path: path.to_path_buf(),
            writer,
        };
        a.append(header)?;
        Ok(a)
    }

    /// Reopen the file of a resumed run and append to it in place: rows after `global_epoch`
    /// (epochs that will be trained again) are cut off the end, as is a last line without
    /// its newline (torn by a kill mid-write; its epoch is not in the saved state). The file
    /// is never replaced: the run folder's lock guarantees no other writer holds it.
    /// `headers`: the layouts this run may continue (the first is the current one); returns
    /// which one the file has.
    fn reopen(path: &Path, headers: &[Vec<String>], global_epoch: usize) -> Result<(Self, usize)> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut keep = text.len();
        if !text.ends_with('\n') {
            keep = text.rfind('\n').map_or(0, |i| i + 1);
            tracing::warn!(
                "{}: its last line was cut off mid-write (the run was killed): dropped",
                path.display()
            );
        }
        let mut reader = csv::Reader::from_reader(&text.as_bytes()[..keep]);
        let old: Vec<String> = reader.headers()?.iter().map(String::from).collect();
        let Some(layout) = headers.iter().position(|h| *h == old) else {
            anyhow::bail!(
                "{} has other columns than this run writes (was it edited, or written by another onehead version?)",
                path.display()
            );
        };
        let col = old
            .iter()
            .position(|h| h == "global_epoch")
            .context("global_epoch is a column")?;
        for rec in reader.records() {
            let rec = rec.with_context(|| format!("reading {}", path.display()))?;
            let g: usize = rec
                .get(col)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{}: bad global_epoch in {rec:?}", path.display()))?;
            if g > global_epoch {
                keep = rec.position().map_or(keep, |p| p.byte() as usize);
                break;
            }
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(keep as u64)
            .with_context(|| format!("cutting {} back to epoch {global_epoch}", path.display()))?;
        let writer = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(file);
        Ok((
            Self {
                path: path.to_path_buf(),
                writer,
            },
            layout,
        ))
    }

    fn append(&mut self, rec: &[String]) -> Result<()> {
        // Flush every epoch: the file is the live record of the run.
        let written = self.writer.write_record(rec).map_err(plain_io);
        written
            .and_then(|()| self.writer.flush().map_err(anyhow::Error::from))
            .with_context(|| format!("appending to {}", self.path.display()))
    }
}

/// A csv error as the I/O error it wraps, when it is one: csv's own error repeats the OS
/// message as its source ("No space left on device … : No space left on device …").
fn plain_io(e: csv::Error) -> anyhow::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => io.into(),
        other => anyhow::anyhow!("{other:?}"),
    }
}

/// `epochs.csv` and `eval.csv` of one run.
pub struct RunCsv {
    columns: EpochColumns,
    epochs: Appender,
    eval: Appender,
}

const EVAL_HEADER: [&str; 6] = ["stage", "epoch", "global_epoch", "task", "metric", "value"];

impl RunCsv {
    pub fn create(run_dir: &Path, columns: EpochColumns) -> Result<Self> {
        let eval_header: Vec<String> = EVAL_HEADER.iter().map(|s| s.to_string()).collect();
        Ok(Self {
            epochs: Appender::create(&run_dir.join("epochs.csv"), &columns.header())?,
            eval: Appender::create(&run_dir.join("eval.csv"), &eval_header)?,
            columns,
        })
    }

    /// Reopen the files of a resumed run, dropping rows after `global_epoch`.
    pub fn reopen(run_dir: &Path, mut columns: EpochColumns, global_epoch: usize) -> Result<Self> {
        let eval_header: Vec<String> = EVAL_HEADER.iter().map(|s| s.to_string()).collect();
        let layouts = columns.layouts();
        let headers: Vec<Vec<String>> = layouts.iter().map(EpochColumns::header).collect();
        let (epochs, layout) =
            Appender::reopen(&run_dir.join("epochs.csv"), &headers, global_epoch)?;
        columns = layouts[layout].clone();
        let (eval, _) = Appender::reopen(&run_dir.join("eval.csv"), &[eval_header], global_epoch)?;
        Ok(Self {
            epochs,
            eval,
            columns,
        })
    }

    pub fn columns(&self) -> &EpochColumns {
        &self.columns
    }

    /// Append one epoch to `epochs.csv` and its evaluations to `eval.csv`.
    pub fn append(&mut self, row: &EpochRow, evals: &[EvalRecord]) -> Result<()> {
        let mut rec = vec![
            row.stage.to_string(),
            row.task.clone(),
            row.epoch.to_string(),
            row.global_epoch.to_string(),
            row.lr.map(|v| format!("{v}")).unwrap_or_default(),
        ];
        // A term the epoch did not add (replay in the first stage) is an empty cell, not 0:
        // the pictures and TensorBoard must not draw a loss that does not exist.
        for c in &self.columns.losses {
            rec.push(
                row.losses
                    .get(c)
                    .map(|v| format!("{v}"))
                    .unwrap_or_default(),
            );
        }
        for c in &self.columns.metrics {
            rec.push(
                row.metrics
                    .get(c)
                    .map(|v| format!("{v}"))
                    .unwrap_or_default(),
            );
        }
        rec.push(row.seconds.map(|v| format!("{v:.3}")).unwrap_or_default());
        let secs = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        if self.columns.end_time {
            rec.push(secs(row.end_time));
        }
        if self.columns.phases {
            // Microseconds: a short phase (a few small batches, a tiny val split) takes under a
            // millisecond, which three decimals wrote as 0.
            let fine = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
            rec.extend([row.data_seconds, row.step_seconds, row.eval_seconds].map(fine));
        }
        // eval.csv first: a crash between the two leaves an eval row without its epoch row,
        // which a resume drops again (same global_epoch rule).
        for e in evals {
            for (metric, value) in &e.metrics {
                self.eval.append(&[
                    (e.stage + 1).to_string(),
                    e.epoch.to_string(),
                    e.global_epoch.to_string(),
                    e.task.clone(),
                    metric.clone(),
                    format!("{value}"),
                ])?;
            }
        }
        self.epochs.append(&rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> (Vec<String>, Vec<Vec<String>>) {
        let mut r = csv::Reader::from_path(p).unwrap();
        let h = r.headers().unwrap().iter().map(String::from).collect();
        let rows = r
            .records()
            .map(|x| x.unwrap().iter().map(String::from).collect())
            .collect();
        (h, rows)
    }

    /// A run written before `end_time`, or before the time split, existed resumes in its own
    /// layout: no column is added mid-file, and a file of any other layout is still refused.
    #[test]
    fn a_run_from_an_older_layout_keeps_it() {
        let cols = EpochColumns::new(&[], &[("seg".into(), vec!["miou".into()])]);
        let [_, no_phases, oldest] = cols.layouts();
        for (older, end_time) in [(no_phases, true), (oldest, false)] {
            let tmp = tempfile::tempdir().unwrap();
            let old_header = older.header().join(",");
            let first = if end_time { ",1700000000.0" } else { "" };
            std::fs::write(
                tmp.path().join("epochs.csv"),
                format!("{old_header}\n1,seg,1,1,0.001,1.5,1.5,0.2,3.0{first}\n"),
            )
            .unwrap();
            std::fs::write(
                tmp.path().join("eval.csv"),
                format!("{}\n", EVAL_HEADER.join(",")),
            )
            .unwrap();
            let mut log = RunCsv::reopen(tmp.path(), cols.clone(), 1).unwrap();
            assert_eq!(log.columns().end_time, end_time);
            assert!(!log.columns().phases);
            let row = EpochRow {
                stage: 1,
                task: "seg".into(),
                epoch: 2,
                global_epoch: 2,
                seconds: Some(2.0),
                end_time: Some(1_700_000_000.0),
                data_seconds: Some(0.5),
                ..Default::default()
            };
            log.append(&row, &[]).unwrap();
            drop(log);
            let (h, rows) = read(&tmp.path().join("epochs.csv"));
            assert_eq!(h.join(","), old_header);
            assert_eq!(rows.len(), 2);
            assert!(rows.iter().all(|r| r.len() == h.len()), "{rows:?}");
            // Another layout (a column that is not one of onehead's) is refused, as before.
            std::fs::write(
                tmp.path().join("epochs.csv"),
                format!("{old_header},extra\n"),
            )
            .unwrap();
            assert!(RunCsv::reopen(tmp.path(), cols.clone(), 0).is_err());
        }
    }

    #[test]
    fn rows_are_flushed_unlearned_tasks_are_empty_and_resume_truncates() {
        let tmp = tempfile::tempdir().unwrap();
        let cols = EpochColumns::new(
            &["replay".to_string()],
            &[
                ("seg".into(), vec!["miou".into()]),
                ("det".into(), vec!["map50".into()]),
            ],
        );
        let mut log = RunCsv::create(tmp.path(), cols.clone()).unwrap();
        for g in 1..=3 {
            let mut row = EpochRow {
                stage: 1,
                task: "seg".into(),
                epoch: g,
                global_epoch: g,
                lr: Some(1e-3),
                seconds: Some(2.0),
                ..Default::default()
            };
            row.losses.insert("loss_new".into(), 1.5);
            row.metrics.insert("seg_miou".into(), 0.25);
            let mut m = TaskMetrics::new();
            m.insert("miou".into(), 0.25);
            m.insert("iou.cat".into(), 0.5);
            let rec = EvalRecord {
                stage: 0,
                epoch: g,
                global_epoch: g,
                task: "seg".into(),
                metrics: m,
            };
            log.append(&row, &[rec]).unwrap();
        }
        // Read back while the writer is still open: the rows must already be on disk.
        let (h, rows) = read(&tmp.path().join("epochs.csv"));
        assert_eq!(
            h,
            [
                "stage",
                "task",
                "epoch",
                "global_epoch",
                "lr",
                "loss_new",
                "loss_replay",
                "loss_total",
                "seg_miou",
                "det_map50",
                "seconds",
                "end_time",
                "data_seconds",
                "step_seconds",
                "eval_seconds"
            ]
        );
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0][0], "1", "stages are written 1-based");
        assert_eq!(rows[0][8], "0.25");
        assert_eq!(rows[0][9], "", "a task not evaluated is an empty cell");
        assert_eq!(
            rows[0][6], "",
            "a term the epoch did not add is an empty cell"
        );
        let (eh, erows) = read(&tmp.path().join("eval.csv"));
        assert_eq!(eh, EVAL_HEADER);
        assert_eq!(erows.len(), 6);
        assert_eq!(erows[0][3..], ["seg", "iou.cat", "0.5"]);
        drop(log);
        // A resume after global epoch 2 drops epoch 3 from both files, in place (the same
        // file, not a replacement: nothing written to it since may be lost).
        use std::os::unix::fs::MetadataExt as _;
        let inode = |f: &str| std::fs::metadata(tmp.path().join(f)).unwrap().ino();
        let before = inode("epochs.csv");
        RunCsv::reopen(tmp.path(), cols.clone(), 2).unwrap();
        assert_eq!(inode("epochs.csv"), before);
        assert_eq!(read(&tmp.path().join("epochs.csv")).1.len(), 2);
        assert_eq!(read(&tmp.path().join("eval.csv")).1.len(), 4);
        // A kill in the middle of writing epoch 3's row: the torn line is dropped on resume.
        let path = tmp.path().join("epochs.csv");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("1,seg,3,3,1.0e-3,1.5");
        std::fs::write(&path, text).unwrap();
        RunCsv::reopen(tmp.path(), cols, 2).unwrap();
        let (_, rows) = read(&path);
        assert_eq!(rows.len(), 2);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with('\n'));
    }

    #[test]
    fn a_full_disk_is_named_once() {
        struct Full;
        impl std::io::Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(28))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(std::io::Error::from_raw_os_error(28))
            }
        }
        let mut w = csv::WriterBuilder::new()
            .buffer_capacity(1)
            .from_writer(Full);
        let e = w.write_record(["a", "b"]).unwrap_err();
        let msg = format!("{:#}", plain_io(e).context("appending to x/epochs.csv"));
        let os = std::io::Error::from_raw_os_error(28).to_string();
        assert_eq!(msg.matches(&os).count(), 1, "{msg}");
        assert!(msg.starts_with("appending to x/epochs.csv"), "{msg}");
    }
}
