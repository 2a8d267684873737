//! What a running sweep shows of its runs: where each one is (epochs of the run done, its
//! stage and task) and when it should end, read from the run's own `epochs.csv` and config
//! (the sweep never looks inside the engine). On a terminal it is the bar's message; piped,
//! a line per finished epoch.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a running run's `epochs.csv` is read.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// One running run, as the sweep follows it.
#[derive(Debug, Clone)]
pub struct RunProgress {
    run_dir: PathBuf,
    /// Epochs the run trains in all (from its config), when known.
    planned: Option<usize>,
    /// Epochs done at the last look, with its stage and task.
    done: usize,
    place: Option<(String, String)>,
    /// The first epoch count this attempt saw, and when (resumed runs start midway).
    first: Option<(Instant, usize)>,
    /// When `epochs.csv` was last read: the sweep's loop ticks every 100 ms, epochs take
    /// seconds, so the file is read at most once a second.
    looked: Option<Instant>,
}

impl RunProgress {
    pub fn new(run_dir: &Path, config: &Path) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            planned: planned_epochs(config),
            done: 0,
            place: None,
            first: None,
            looked: None,
        }
    }

    /// Read the run's `epochs.csv` again; whether an epoch ended since the last look.
    pub fn update(&mut self) -> bool {
        if self.looked.is_some_and(|t| t.elapsed() < LOOK_EVERY) {
            return false;
        }
        self.looked = Some(Instant::now());
        let Some((done, place)) = read_epochs(&self.run_dir.join("epochs.csv")) else {
            return false;
        };
        let now = Instant::now();
        if self.first.is_none() {
            self.first = Some((now, done));
        }
        let changed = done > self.done;
        self.done = done;
        self.place = place;
        changed
    }

    /// Time left, from this attempt's pace; `None` before it has finished an epoch.
    pub fn eta(&self) -> Option<Duration> {
        let (t0, d0) = self.first?;
        let planned = self.planned?;
        let (elapsed, epochs) = (t0.elapsed().as_secs_f64(), self.done.checked_sub(d0)?);
        (epochs > 0).then(|| {
            let left = planned.saturating_sub(self.done) as f64;
            Duration::from_secs_f64(elapsed / epochs as f64 * left)
        })
    }

    /// `epoch 13/60 (stage 2 det) · ETA 4m`, or what the run does before its first epoch.
    pub fn describe(&self) -> String {
        if self.first.is_none() {
            return "starting (or training its single-task reference first)".into();
        }
        let planned = self.planned.map(|p| format!("/{p}")).unwrap_or_default();
        let place = self
            .place
            .as_ref()
            .map(|(s, t)| format!(" (stage {s} {t})"))
            .unwrap_or_default();
        let eta = match self.eta() {
            Some(d) => format!(" · ETA {}", minutes(d)),
            None => String::new(),
        };
        format!("epoch {}{planned}{place}{eta}", self.done)
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Epochs a run's config trains: the stages' epochs (a joint run's one stage trains their
/// mean, as `Experiment::plan` does).
pub fn planned_epochs(config: &Path) -> Option<usize> {
    let v: toml::Table = toml::from_str(&std::fs::read_to_string(config).ok()?).ok()?;
    let epochs: Vec<usize> = v
        .get("stages")?
        .as_array()?
        .iter()
        .map(|s| s.get("epochs").and_then(|e| e.as_integer()).unwrap_or(1) as usize)
        .collect();
    let total: usize = epochs.iter().sum();
    match v.get("mode").and_then(|m| m.as_str()) {
        Some("joint") => {
            Some(((total as f64 / epochs.len().max(1) as f64).round() as usize).max(1))
        }
        _ => Some(total),
    }
}

/// Rows of `epochs.csv` and the last row's stage and task (`None`: no file yet). A last
/// line being written as it is read is a short record: it is not counted.
fn read_epochs(path: &Path) -> Option<(usize, Option<(String, String)>)> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .ok()?;
    let header = reader.headers().ok()?.clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (stage, task) = (col("stage"), col("task"));
    let rows: Vec<csv::StringRecord> = reader
        .records()
        .map_while(|r| r.ok())
        .filter(|r| r.len() == header.len())
        .collect();
    let place = rows
        .last()
        .and_then(|r| Some((r.get(stage?)?.to_string(), r.get(task?)?.to_string())));
    Some((rows.len(), place))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_epochs_and_place_come_from_the_run_s_own_files() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("c.toml");
        let stages =
            "[[stages]]\ntask = \"seg\"\nepochs = 20\n[[stages]]\ntask = \"det\"\nepochs = 10\n";
        std::fs::write(&cfg, format!("name = \"x\"\n{stages}")).unwrap();
        assert_eq!(planned_epochs(&cfg), Some(30));
        std::fs::write(&cfg, format!("name = \"x\"\nmode = \"joint\"\n{stages}")).unwrap();
        assert_eq!(planned_epochs(&cfg), Some(15));
        let mut p = RunProgress::new(tmp.path(), &cfg);
        assert!(!p.update(), "no epochs.csv yet");
        assert!(p.describe().starts_with("starting"));
        let csv = tmp.path().join("epochs.csv");
        std::fs::write(&csv, "stage,task,epoch\n1,seg,1\n1,seg,2\n").unwrap();
        p.looked = None;
        assert!(p.update());
        std::fs::write(&csv, "stage,task,epoch\n1,seg,1\n1,seg,2\n2,det,1\n2,d").unwrap();
        assert!(!p.update(), "read at most once a second");
        p.looked = None;
        assert!(p.update());
        p.looked = None;
        assert!(!p.update(), "nothing new");
        let d = p.describe();
        assert!(d.starts_with("epoch 3/15 (stage 2 det) · ETA "), "{d}");
    }
}
