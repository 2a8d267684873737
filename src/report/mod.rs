//! Run outputs: run directories that are never overwritten, files written atomically,
//! the per-epoch CSVs (flushed every epoch), the task × stage matrix, the summary with its
//! verdict, and the pictures: charts from the run files (`plot`), `report.html` (`html`),
//! `compare`, a TensorBoard sink.

mod compare;
pub mod csv_log;
mod fmt;
pub(crate) mod glyphs;
mod html;
pub(crate) mod plot;
mod run_files;
pub(crate) use run_files::read_epochs;
pub mod sink;
pub mod summary;
mod tensorboard;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

pub use compare::{compare, CompareFormat, CompareOptions, CompareOutput};
pub use csv_log::{EpochColumns, EpochRow, EvalRecord, RunCsv};
pub use fmt::{fmt_drop, fmt_interval};
pub use sink::{ConsoleLine, EpochSink};
pub use summary::{judge, Judging, Matrix, RunSummary, TaskRef, TaskVerdict, Verdict};
pub use tensorboard::{tag_for_column, TbWriter};

/// Draw a run's pictures from its files alone: `plots/*.png|svg` and `report.html`.
/// Works on an unfinished or killed run too (it draws what is there). Returns the files
/// written. The engine calls this at the end of every run; `onehead plot` calls it too.
pub fn draw_run(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let run = run_files::RunData::load(run_dir)?;
    for w in &run.warnings {
        tracing::warn!("{w}");
    }
    let (mut files, pngs) = plot::draw_run_plots(&run)?;
    files.push(html::write_run_report(&run, &pngs)?);
    Ok(files)
}

/// Write a run's `epochs.csv` as a TensorBoard event file under `<run>/tensorboard/`
/// (for runs that trained without the sink). Returns the event file.
pub fn export_tensorboard(run_dir: &Path) -> Result<PathBuf> {
    let run = run_files::RunData::load(run_dir)?;
    for w in &run.warnings {
        tracing::warn!("{w}");
    }
    tensorboard::export_run(&run)
}

/// The git commit the binary was built from (`-dirty` if the tree had changes).
pub const GIT_COMMIT: &str = env!("ONEHEAD_GIT_COMMIT");
pub use crate::files::write_atomic;

/// UTC time as `YYYYMMDD-HHMMSS` (sortable), from seconds since the Unix epoch.
pub fn utc_stamp(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// UTC time as RFC 3339 (`2026-11-24T05:22:58Z`).
pub fn utc_rfc3339(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days-to-civil (Howard Hinnant's algorithm): no date crate needed for a timestamp.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

/// The per-image scores of `task` at the end of 1-based `stage` on the verdict's split
/// (`<run>/scores/stage<k>-<task>.json`, a [`crate::metrics::per_image::PerImage`]): what the
/// bootstrap resamples, for this run and for every run that takes it as its reference.
pub fn scores_file(run_dir: &Path, stage: usize, task: &str) -> PathBuf {
    run_dir
        .join("scores")
        .join(format!("stage{stage}-{task}.json"))
}

/// The per-image scores in `path`; `None` when the file is absent (a task that keeps none,
/// a run of an older version).
pub fn read_scores(path: &Path) -> Result<Option<crate::metrics::per_image::PerImage>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let scores =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(scores))
}

/// A fresh run directory `<results>/<name>/<YYYYMMDD-HHMMSS>[-N]`. Creation is exclusive
/// (`create_dir`, not `create_dir_all`), so an existing run is never reused or overwritten.
pub fn create_run_dir(results_dir: &Path, name: &str) -> Result<PathBuf> {
    let parent = results_dir.join(name);
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating results folder {}", parent.display()))?;
    let stamp = utc_stamp(now_secs());
    for n in 0..1000 {
        let id = if n == 0 {
            stamp.clone()
        } else {
            format!("{stamp}-{n}")
        };
        let dir = parent.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("creating run folder {}", dir.display()))
            }
        }
    }
    anyhow::bail!(
        "could not find a free run folder name under {}",
        parent.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_is_right() {
        // 2026-11-24T05:22:58Z, checked with `date -u -d @1795497778`.
        assert_eq!(utc_rfc3339(1_795_497_778), "2026-11-24T05:22:58Z");
        assert_eq!(utc_stamp(0), "19700101-000000");
        // A leap day.
        assert_eq!(utc_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn run_dirs_are_never_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let a = create_run_dir(tmp.path(), "exp").unwrap();
        let b = create_run_dir(tmp.path(), "exp").unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        // Sortable: the second sorts after the first.
        assert!(b.file_name().unwrap() > a.file_name().unwrap());
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
