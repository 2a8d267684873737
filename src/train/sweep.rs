//! Sweeps: a list of experiment files × a grid of overrides, run one after another, each
//! into its own run directory, with `index.csv` (one row per run) rewritten after every run
//! so an interrupted sweep still leaves a usable index.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::Experiment;
use crate::report;
use crate::train::{self as engine, RunOptions};

/// Index columns per task: the built-in tasks and their default verdict metrics.
const INDEX_TASKS: [(&str, &str); 3] = [("seg", "miou"), ("det", "map50"), ("cls", "top1")];

/// One grid axis: `key=v1,v2,…`.
#[derive(Debug, Clone, PartialEq)]
pub struct GridAxis {
    pub key: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for GridAxis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, vals) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected key=v1,v2,…"))?;
        let values = split_top_level(vals);
        if key.trim().is_empty() || values.iter().any(|v| v.is_empty()) {
            return Err(format!("'{s}': empty key or value"));
        }
        Ok(Self {
            key: key.trim().to_string(),
            values,
        })
    }
}

/// Split at commas that are not inside brackets or quotes (`tasks=["seg","det"],"all"`).
fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut cur) = (0i32, None::<char>, String::new());
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out
}

/// One planned run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRun {
    pub file: PathBuf,
    /// `(key, value)` of every grid axis for this run.
    pub varied: Vec<(String, String)>,
}

/// Every file × every point of the grid (the Cartesian product, first axis slowest).
pub fn plan(files: &[PathBuf], grid: &[GridAxis]) -> Vec<PlannedRun> {
    let mut points: Vec<Vec<(String, String)>> = vec![vec![]];
    for axis in grid {
        points = points
            .into_iter()
            .flat_map(|p| {
                axis.values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.push((axis.key.clone(), v.clone()));
                    q
                })
            })
            .collect();
    }
    files
        .iter()
        .flat_map(|f| {
            points.iter().map(move |p| PlannedRun {
                file: f.clone(),
                varied: p.clone(),
            })
        })
        .collect()
}

/// A folder-safe run name: the experiment's name plus the varied values.
fn run_name(base: &str, varied: &[(String, String)]) -> String {
    let mut name = base.to_string();
    for (k, v) in varied {
        let key = k.rsplit('.').next().unwrap_or(k);
        name.push_str(&format!("__{key}-{v}"));
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub struct SweepOptions {
    pub name: String,
    pub results_dir: PathBuf,
    /// Overrides applied to every run before the grid's.
    pub overrides: Vec<String>,
    pub quiet: bool,
}

/// Run every planned run; returns the path of `index.csv`. Failed runs are recorded in the
/// index (column `status`) and the sweep goes on; the error at the end lists them.
pub fn run_sweep(runs: &[PlannedRun], grid: &[GridAxis], opts: &SweepOptions) -> Result<PathBuf> {
    let sweep_dir = opts.results_dir.join(&opts.name);
    std::fs::create_dir_all(&sweep_dir)
        .with_context(|| format!("creating {}", sweep_dir.display()))?;
    let index_path = sweep_dir.join("index.csv");
    let mut header = vec!["run".to_string(), "config".into()];
    header.extend(grid.iter().map(|a| a.key.clone()));
    for (t, m) in INDEX_TASKS {
        for col in ["baseline", "final", "drop"] {
            header.push(format!("{t}_{m}_{col}"));
        }
    }
    header.extend(["pass".into(), "train_seconds".into(), "status".into()]);
    // Re-running a sweep name adds rows to its index instead of replacing earlier ones.
    let mut rows: Vec<Vec<String>> = read_existing_rows(&index_path, &header)?;
    let mut failures = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let mut overrides = opts.overrides.clone();
        overrides.extend(r.varied.iter().map(|(k, v)| format!("{k}={v}")));
        let mut row = vec![String::new(), r.file.display().to_string()];
        row.extend(r.varied.iter().map(|(_, v)| v.clone()));
        let result = Experiment::load(&r.file, &overrides)
            .map_err(anyhow::Error::from)
            .and_then(|mut exp| {
                exp.name = run_name(&exp.name, &r.varied);
                exp.results_dir = sweep_dir.clone();
                tracing::info!("sweep run {}/{}: {}", i + 1, runs.len(), exp.name);
                engine::run(
                    &exp,
                    &RunOptions {
                        quiet: opts.quiet,
                        ..RunOptions::default()
                    },
                )
            });
        match result {
            Ok(outcome) => {
                if !opts.quiet {
                    println!(
                        "\n{} ({})\n{}",
                        outcome.summary.name,
                        outcome.run_dir.display(),
                        outcome.summary.table()
                    );
                }
                row[0] = outcome.run_dir.display().to_string();
                for (t, _) in INDEX_TASKS {
                    match outcome.summary.tasks.iter().find(|v| v.task == t) {
                        Some(v) => row.extend([
                            format!("{:.6}", v.baseline),
                            format!("{:.6}", v.final_value),
                            v.drop_rel.map(|d| format!("{d:.6}")).unwrap_or_default(),
                        ]),
                        None => row.extend([String::new(), String::new(), String::new()]),
                    }
                }
                row.extend([
                    outcome.summary.pass.to_string(),
                    format!("{:.1}", outcome.summary.train_seconds),
                    "ok".into(),
                ]);
            }
            Err(e) => {
                tracing::error!("sweep run {} failed: {e:#}", r.file.display());
                row.extend(std::iter::repeat_n(String::new(), 3 * INDEX_TASKS.len()));
                row.extend([String::new(), String::new(), format!("failed: {e:#}")]);
                failures.push(format!("{} {:?}: {e:#}", r.file.display(), r.varied));
            }
        }
        rows.push(row);
        write_index(&index_path, &header, &rows)?;
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {} sweep runs failed (see {}):\n{}",
            failures.len(),
            runs.len(),
            index_path.display(),
            failures.join("\n")
        );
    }
    Ok(index_path)
}

fn read_existing_rows(path: &Path, header: &[String]) -> Result<Vec<Vec<String>>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let old: Vec<String> = r.headers()?.iter().map(String::from).collect();
    if old != header {
        anyhow::bail!(
            "{} exists with other columns (an earlier sweep of the same name varied other keys): choose another --name",
            path.display()
        );
    }
    r.records()
        .map(|rec| Ok(rec?.iter().map(String::from).collect()))
        .collect()
}

fn write_index(path: &Path, header: &[String], rows: &[Vec<String>]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in rows {
        w.write_record(r)?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    report::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_axes_split_at_top_level_commas() {
        let a: GridAxis = "replay.tasks=[\"seg\",\"det\"],\"all\"".parse().unwrap();
        assert_eq!(a.values, vec!["[\"seg\",\"det\"]", "\"all\""]);
        let b: GridAxis = "stages.0.lr=0.001, 0.01".parse().unwrap();
        assert_eq!(b.key, "stages.0.lr");
        assert_eq!(b.values, vec!["0.001", "0.01"]);
        assert!("nokey".parse::<GridAxis>().is_err());
        assert!("k=1,,2".parse::<GridAxis>().is_err());
    }

    #[test]
    fn plan_is_the_cartesian_product() {
        let grid = vec![
            "seed=0,1".parse::<GridAxis>().unwrap(),
            "replay.enabled=true,false".parse().unwrap(),
        ];
        let files = vec![PathBuf::from("a.toml"), PathBuf::from("b.toml")];
        let p = plan(&files, &grid);
        assert_eq!(p.len(), 8);
        assert_eq!(
            p[1].varied,
            vec![
                ("seed".to_string(), "0".to_string()),
                ("replay.enabled".to_string(), "false".to_string())
            ]
        );
        assert_eq!(p[4].file, PathBuf::from("b.toml"));
        assert_eq!(run_name("x", &p[1].varied), "x__seed-0__enabled-false");
    }
}
