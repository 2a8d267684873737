//! A TensorBoard sink: scalar summaries in a TensorBoard event file
//! (`<run>/tensorboard/events.out.tfevents.<time>.<host>`), so that `tensorboard --logdir
//! results` shows the same per-epoch scalars as `epochs.csv`.
//!
//! The format is small and stable: a sequence of TFRecords (length, masked CRC-32C of the
//! length, payload, masked CRC-32C of the payload), each payload an `Event` protocol buffer;
//! the first declares `brain.Event:2`, the others carry a `Summary` of `simple_value`s. The
//! few fields needed are encoded here by hand. The crates that write event files were not
//! acceptable: `tensorboard-rs` pins `protobuf` 2 (unmaintained, RUSTSEC-2024-0437) and
//! `image` 0.23; `tboard` and `tfrecord` run `prost-build` at build time, which needs `protoc`
//! (not on a machine with only the Rust toolchain; `tfrecord` also downloads at build time).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::csv_log::EpochRow;

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Writes scalars to a TensorBoard event file. Call [`TbWriter::add_row`] once per epoch and [`TbWriter::flush`] after each epoch, so a
/// killed run keeps what it logged.
pub struct TbWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl TbWriter {
    /// A new event file under `<run_dir>/tensorboard/` (a resumed run adds a second file to
    /// the same folder; TensorBoard reads them together).
    pub fn create(run_dir: &Path) -> Result<Self> {
        let dir = run_dir.join("tensorboard");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = hostname();
        let mut n = 0;
        let path = loop {
            let suffix = if n == 0 {
                String::new()
            } else {
                format!(".{n}")
            };
            let p = dir.join(format!(
                "events.out.tfevents.{}.{host}{suffix}",
                now.as_secs()
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self {
            out: BufWriter::new(file),
            path,
        };
        let mut ev = Vec::new();
        put_double(&mut ev, 1, now.as_secs_f64());
        put_bytes(&mut ev, 3, b"brain.Event:2");
        w.write_record(&ev)?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar at `step` (onehead uses the global epoch as the step), stamped `wall`
    /// (Unix seconds).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64, wall: f64) -> Result<()> {
        let mut val = Vec::new();
        put_bytes(&mut val, 1, tag.as_bytes());
        put_float(&mut val, 2, value as f32);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &val);
        let mut ev = Vec::new();
        put_double(&mut ev, 1, wall);
        put_varint_field(&mut ev, 2, step);
        put_bytes(&mut ev, 5, &summary);
        self.write_record(&ev)
    }

    /// One epoch's scalars ([`epoch_scalars`]) at its global epoch, stamped with the time it
    /// ended (now, for a row without one). The one path for live and exported events.
    pub fn add_row(&mut self, row: &EpochRow) -> Result<()> {
        let wall = row.end_time.unwrap_or_else(wall_time);
        for (tag, v) in epoch_scalars(row) {
            self.add_scalar(&tag, v, row.global_epoch as u64, wall)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out
            .write_all(&rec)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for TbWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// The TensorBoard tag of an `epochs.csv` column: `loss_<x>` → `loss/<x>`, `lr` → `train/lr`,
/// `seconds` → `time/epoch_seconds`, `data_seconds` (and the other parts of the epoch's time)
/// → `time/data_seconds`, `<task>_<metric>` → `<task>/<metric>` (first `_`).
pub fn tag_for_column(column: &str) -> String {
    match column {
        "lr" => "train/lr".into(),
        "seconds" => "time/epoch_seconds".into(),
        c if super::csv_log::PHASE_COLUMNS.contains(&c) => format!("time/{c}"),
        c => match c.split_once('_') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => format!("{a}/{b}"),
            _ => c.to_string(),
        },
    }
}

/// An epoch's scalars by tag ([`tag_for_column`]): learning rate, every loss term, every
/// metric evaluated (per-class ones too: `seg_iou.cat` → `seg/iou.cat`), the epoch's seconds
/// and their split.
/// Empty and non-finite values are left out.
pub fn epoch_scalars(row: &EpochRow) -> Vec<(String, f64)> {
    let mut cols: Vec<(&str, Option<f64>)> = vec![("lr", row.lr)];
    cols.extend(row.losses.iter().map(|(k, v)| (k.as_str(), Some(*v))));
    cols.extend(row.metrics.iter().map(|(k, v)| (k.as_str(), Some(*v))));
    cols.push(("seconds", row.seconds));
    let phases = [row.data_seconds, row.step_seconds, row.eval_seconds];
    cols.extend(super::csv_log::PHASE_COLUMNS.into_iter().zip(phases));
    cols.into_iter()
        .filter_map(|(name, v)| Some((tag_for_column(name), v.filter(|v| v.is_finite())?)))
        .collect()
}

/// Write a run's epochs as a TensorBoard event file after the fact (for runs that ran
/// without the live sink): `epochs.csv`'s rows with every metric of `eval.csv` (as the live
/// sink gets them), so the tags, steps, values and wall times are the live sink's. Rows of
/// files without `end_time` (older runs) are dated back from the file's last write by the
/// epochs' seconds. Columns this reader does not know go under `other/<column>`.
pub(crate) fn export_run(run: &super::run_files::RunData) -> Result<PathBuf> {
    let e = &run.epochs;
    let evals = read_eval_metrics(&run.dir.join("eval.csv"));
    let ends = estimated_end_times(&run.dir.join("epochs.csv"), &e.rows);
    let mut w = TbWriter::create(&run.dir)?;
    for (i, r) in e.rows.iter().enumerate() {
        let mut row = r.clone();
        row.end_time = r.end_time.or(ends[i]);
        if let Some(m) = evals.get(&r.global_epoch) {
            row.metrics.extend(m.iter().map(|(k, v)| (k.clone(), *v)));
        }
        w.add_row(&row)?;
        for (k, v) in &e.other {
            if let Some(v) = v[i].filter(|v| v.is_finite()) {
                let wall = row.end_time.unwrap_or_else(wall_time);
                w.add_scalar(&format!("other/{k}"), v, r.global_epoch as u64, wall)?;
            }
        }
    }
    w.flush()?;
    Ok(w.path().to_path_buf())
}

/// `eval.csv`'s metrics by global epoch, as `<task>_<metric>` (empty when it is missing).
fn read_eval_metrics(path: &Path) -> std::collections::BTreeMap<usize, Vec<(String, f64)>> {
    let mut out: std::collections::BTreeMap<usize, Vec<(String, f64)>> = Default::default();
    let Ok(mut r) = csv::Reader::from_path(path) else {
        return out;
    };
    for rec in r.records().map_while(|x| x.ok()) {
        let (Some(g), Some(task), Some(metric), Some(v)) = (
            rec.get(2).and_then(|g| g.parse().ok()),
            rec.get(3),
            rec.get(4),
            rec.get(5).and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        out.entry(g)
            .or_default()
            .push((format!("{task}_{metric}"), v));
    }
    out
}

/// For rows without `end_time`: the last epoch ended at the file's last write, each earlier
/// one the later epochs' seconds before it (exact for a run that was never interrupted).
fn estimated_end_times(path: &Path, rows: &[EpochRow]) -> Vec<Option<f64>> {
    let last = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    let mut out = vec![None; rows.len()];
    let mut t = last;
    for (i, r) in rows.iter().enumerate().rev() {
        out[i] = t;
        t = t.map(|t| t - r.seconds.unwrap_or(0.0));
    }
    out
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_else(|| "onehead".into());
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if clean.is_empty() {
        "onehead".into()
    } else {
        clean
    }
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = CASTAGNOLI.checksum(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3); // wire type 0: varint
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_varint(out, (u64::from(field) << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_varint(out, (u64::from(field) << 3) | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Read back the records of an event file, checking both CRCs of each.
    pub(crate) fn read_records(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc_len = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
            assert_eq!(crc_len, masked_crc(len_bytes));
            let data = &bytes[i + 12..i + 12 + len];
            let crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let x = b[*i];
            *i += 1;
            v |= u64::from(x & 0x7f) << shift;
            if x < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    /// `(tag, value, step, wall time)` of a scalar event (a minimal protobuf reader for the
    /// tests).
    pub(crate) fn decode_scalar(ev: &[u8]) -> Option<(String, f32, u64, f64)> {
        let (mut i, mut step, mut summary, mut wall) = (0, 0, None, 0.0);
        while i < ev.len() {
            let key = varint(ev, &mut i);
            match (key >> 3, key & 7) {
                (1, 1) => {
                    wall = f64::from_le_bytes(ev[i..i + 8].try_into().unwrap());
                    i += 8;
                }
                (_, 1) => i += 8,
                (_, 5) => i += 4,
                (2, 0) => step = varint(ev, &mut i),
                (f, 2) => {
                    let n = varint(ev, &mut i) as usize;
                    if f == 5 {
                        summary = Some(ev[i..i + n].to_vec());
                    }
                    i += n;
                }
                (_, 0) => {
                    varint(ev, &mut i);
                }
                _ => return None,
            }
        }
        let s = summary?;
        let mut i = 0;
        let _key = varint(&s, &mut i);
        let n = varint(&s, &mut i) as usize;
        let v = &s[i..i + n];
        let mut j = 0;
        let (mut tag, mut value) = (String::new(), 0f32);
        while j < v.len() {
            let key = varint(v, &mut j);
            match key {
                0x0a => {
                    let n = varint(v, &mut j) as usize;
                    tag = String::from_utf8(v[j..j + n].to_vec()).unwrap();
                    j += n;
                }
                0x15 => {
                    value = f32::from_le_bytes(v[j..j + 4].try_into().unwrap());
                    j += 4;
                }
                _ => return None,
            }
        }
        Some((tag, value, step, wall))
    }

    #[test]
    fn crc32c_matches_the_reference() {
        // CRC-32C check value ("123456789" → 0xE3069283).
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn writes_scalar_events_that_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(tmp.path()).unwrap();
        w.add_scalar("loss/new", 1.5, 1, 100.0).unwrap();
        let row = EpochRow {
            global_epoch: 2,
            metrics: [("seg_miou".to_string(), 0.25)].into(),
            end_time: Some(200.5),
            ..Default::default()
        };
        w.add_row(&row).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents."));
        let recs = read_records(&path);
        assert_eq!(recs.len(), 3);
        assert!(recs[0].windows(13).any(|w| w == b"brain.Event:2"));
        assert_eq!(
            decode_scalar(&recs[1]),
            Some(("loss/new".into(), 1.5, 1, 100.0))
        );
        assert_eq!(
            decode_scalar(&recs[2]),
            Some(("seg/miou".into(), 0.25, 2, 200.5))
        );
        // A second writer in the same run gets its own file.
        let w2 = TbWriter::create(tmp.path()).unwrap();
        assert_ne!(w2.path(), path);
    }

    /// The live sink (beside `epochs.csv`/`eval.csv`) and the export from those files write
    /// the same events: tags (per-class metrics too), steps, values and wall times; a loss
    /// term an epoch did not add is in neither.
    #[test]
    fn live_and_exported_events_are_the_same() {
        use super::super::csv_log::{EpochColumns, EvalRecord, RunCsv};
        use super::super::sink::EpochSink as _;
        let tmp = tempfile::tempdir().unwrap();
        let cols = EpochColumns::new(
            &["replay".to_string()],
            &[("seg".into(), vec!["miou".into()])],
        );
        let mut csv = RunCsv::create(tmp.path(), cols).unwrap();
        let live_dir = tmp.path().join("live");
        let mut live = TbWriter::create(&live_dir).unwrap();
        for g in 1..=4usize {
            let metrics: std::collections::BTreeMap<String, f64> = [
                ("miou".to_string(), 0.1 * g as f64),
                ("iou.cat".to_string(), 0.3),
            ]
            .into();
            let eval = EvalRecord {
                stage: (g - 1) / 2,
                epoch: 1 + (g - 1) % 2,
                global_epoch: g,
                task: "seg".into(),
                metrics: metrics.clone().into_iter().collect(),
            };
            let mut row = EpochRow {
                stage: 1 + (g - 1) / 2,
                task: "seg".into(),
                epoch: eval.epoch,
                global_epoch: g,
                lr: Some(1e-3 / g as f64),
                seconds: Some(1.25),
                end_time: Some(1_700_000_000.125 + g as f64),
                ..Default::default()
            };
            row.losses.insert("loss_new".into(), 2.0 / g as f64);
            row.losses.insert("loss_total".into(), 2.5 / g as f64);
            if g > 2 {
                row.losses.insert("loss_replay".into(), 0.5);
            }
            row.metrics = metrics
                .iter()
                .map(|(k, v)| (format!("seg_{k}"), *v))
                .collect();
            csv.epoch(&row, std::slice::from_ref(&eval)).unwrap();
            live.epoch(&row, &[eval]).unwrap();
        }
        drop(csv);
        let run = super::super::run_files::RunData::load(tmp.path()).unwrap();
        let exported = export_run(&run).unwrap();
        let events = |p: &Path| {
            let mut v: Vec<(String, u64, f32, f64)> = read_records(p)
                .iter()
                .filter_map(|r| decode_scalar(r))
                .map(|(t, x, s, w)| (t, s, x, w))
                .collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v
        };
        let (a, b) = (events(live.path()), events(&exported));
        assert_eq!(a.len(), 4 * 6 + 2, "{a:?}");
        assert_eq!(a, b);
        assert!(a.iter().any(|e| e.0 == "seg/iou.cat"));
        assert_eq!(a.iter().filter(|e| e.0 == "loss/replay").count(), 2);
        assert!(a.iter().all(|e| e.3 > 1_700_000_000.0), "real wall times");
    }

    #[test]
    fn column_tags() {
        assert_eq!(tag_for_column("loss_replay"), "loss/replay");
        assert_eq!(tag_for_column("det_map50_95"), "det/map50_95");
        assert_eq!(tag_for_column("lr"), "train/lr");
        assert_eq!(tag_for_column("seconds"), "time/epoch_seconds");
        assert_eq!(tag_for_column("data_seconds"), "time/data_seconds");
    }
}
