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

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Writes scalars to a TensorBoard event file. Call [`TbWriter::add_scalar`] (or
/// [`TbWriter::add_epoch`]) once per epoch and [`TbWriter::flush`] after each epoch, so a
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

    /// One scalar at `step` (onehead uses the global epoch as the step).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let mut val = Vec::new();
        put_bytes(&mut val, 1, tag.as_bytes());
        put_float(&mut val, 2, value as f32);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &val);
        let mut ev = Vec::new();
        put_double(&mut ev, 1, wall_time());
        put_varint_field(&mut ev, 2, step);
        put_bytes(&mut ev, 5, &summary);
        self.write_record(&ev)
    }

    /// An epoch's `epochs.csv` columns as scalars, named by [`tag_for_column`]
    /// (`loss_new` → `loss/new`, `seg_miou` → `seg/miou`); empty or non-finite values and the
    /// `stage`/`epoch`/`global_epoch` columns are skipped.
    pub fn add_epoch(&mut self, step: u64, columns: &[(&str, Option<f64>)]) -> Result<()> {
        for (name, v) in columns {
            if matches!(*name, "stage" | "task" | "epoch" | "global_epoch") {
                continue;
            }
            if let Some(v) = v.filter(|v| v.is_finite()) {
                self.add_scalar(&tag_for_column(name), v, step)?;
            }
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
/// `seconds` → `time/epoch_seconds`, `<task>_<metric>` → `<task>/<metric>` (first `_`).
pub fn tag_for_column(column: &str) -> String {
    match column {
        "lr" => "train/lr".into(),
        "seconds" => "time/epoch_seconds".into(),
        c => match c.split_once('_') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => format!("{a}/{b}"),
            _ => c.to_string(),
        },
    }
}

/// Each of `names` with its value in `values` (`None`: an empty cell).
fn by_name<'a>(
    names: &'a [String],
    values: &std::collections::BTreeMap<String, f64>,
) -> Vec<(&'a str, Option<f64>)> {
    names
        .iter()
        .map(|n| (n.as_str(), values.get(n).copied()))
        .collect()
}

/// Write a run's `epochs.csv` as a TensorBoard event file (for runs that ran without the
/// sink). Columns this reader does not know go under `other/<column>`. Returns the file.
pub(crate) fn export_run(run: &super::run_files::RunData) -> Result<PathBuf> {
    let mut w = TbWriter::create(&run.dir)?;
    let e = &run.epochs;
    for (i, r) in e.rows.iter().enumerate() {
        let step = r.global_epoch as u64;
        let mut cols: Vec<(&str, Option<f64>)> = vec![
            ("lr", r.lr),
            ("loss_new", r.losses.get("loss_new").copied()),
            ("loss_total", r.losses.get("loss_total").copied()),
            ("seconds", r.seconds),
        ];
        cols.extend(by_name(&e.terms, &r.losses));
        cols.extend(by_name(&e.metric_columns, &r.metrics));
        w.add_epoch(step, &cols)?;
        for (k, v) in &e.other {
            if let Some(v) = v[i].filter(|v| v.is_finite()) {
                w.add_scalar(&format!("other/{k}"), v, step)?;
            }
        }
    }
    w.flush()?;
    Ok(w.path().to_path_buf())
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

    /// `(tag, value, step)` of a scalar event (a minimal protobuf reader for the test).
    pub(crate) fn decode_scalar(ev: &[u8]) -> Option<(String, f32, u64)> {
        let (mut i, mut step, mut summary) = (0, 0, None);
        while i < ev.len() {
            let key = varint(ev, &mut i);
            match (key >> 3, key & 7) {
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
        Some((tag, value, step))
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
        w.add_scalar("loss/new", 1.5, 1).unwrap();
        w.add_epoch(
            2,
            &[
                ("seg_miou", Some(0.25)),
                ("cls_top1", None),
                ("global_epoch", Some(2.0)),
            ],
        )
        .unwrap();
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
        assert_eq!(decode_scalar(&recs[1]), Some(("loss/new".into(), 1.5, 1)));
        assert_eq!(decode_scalar(&recs[2]), Some(("seg/miou".into(), 0.25, 2)));
        // A second writer in the same run gets its own file.
        let w2 = TbWriter::create(tmp.path()).unwrap();
        assert_ne!(w2.path(), path);
    }

    #[test]
    fn column_tags() {
        assert_eq!(tag_for_column("loss_replay"), "loss/replay");
        assert_eq!(tag_for_column("det_map50_95"), "det/map50_95");
        assert_eq!(tag_for_column("lr"), "train/lr");
        assert_eq!(tag_for_column("seconds"), "time/epoch_seconds");
    }
}
