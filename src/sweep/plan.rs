//! Planning a sweep: files × grid × seeds → one resolved config per run, written into the
//! sweep folder with a manifest. Planning validates every config before anything runs, and
//! the names of runs and their folders are deterministic, so re-running the same sweep (or a
//! requeued array task) finds each run's folder again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::GridAxis;
use crate::config::Experiment;
use crate::report;

/// What to sweep.
#[derive(Debug, Clone, Default)]
pub struct SweepSpec {
    /// Experiment files (each is crossed with the whole grid).
    pub files: Vec<PathBuf>,
    /// Grid axes `key=v1,v2,…`, first axis slowest.
    pub grid: Vec<GridAxis>,
    /// Overrides applied to every run before the grid's.
    pub overrides: Vec<String>,
}

/// One planned run of a sweep (a line of `manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRun {
    /// 0-based position in the sweep (the Slurm array task id).
    pub index: usize,
    /// Run name: the experiment's name plus the varied values; names `runs/<name>/`.
    pub name: String,
    /// The experiment's own name (before the varied values were appended).
    pub experiment: String,
    /// The name of the configuration this run is one seed of: the run name without its seed
    /// (`summary.csv` has one row per configuration).
    pub config_name: String,
    /// The source experiment file, as given on the command line.
    pub file: PathBuf,
    /// Overrides applied to `file`, in order (common ones, then the grid point's).
    pub overrides: Vec<String>,
    /// `(key, value)` of every grid axis for this run; a seed expanded from `seeds = [..]`
    /// is the axis `seed`.
    pub varied: Vec<(String, String)>,
    pub seed: u64,
    /// The resolved config (absolute path).
    pub config: PathBuf,
    /// The run folder (absolute path).
    pub run_dir: PathBuf,
}

impl PlannedRun {
    /// The varied values without the seed: the configuration this run is one seed of.
    pub fn configuration(&self) -> Vec<(String, String)> {
        self.varied
            .iter()
            .filter(|(k, _)| k != "seed")
            .cloned()
            .collect()
    }
}

/// `manifest.json`: the plan of a sweep. Written last when a sweep folder is prepared, so a
/// folder with a manifest has every config in place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format marker (`onehead-sweep`) and version.
    pub format: String,
    pub version: u32,
    pub name: String,
    /// Absolute path of the sweep folder.
    pub sweep_dir: PathBuf,
    /// The working directory the sweep was planned in: relative paths inside the configs
    /// (data roots, weights) are relative to it; Slurm tasks `cd` there.
    pub cwd: PathBuf,
    pub created_at: String,
    pub grid: Vec<GridAxis>,
    pub overrides: Vec<String>,
    pub runs: Vec<PlannedRun>,
}

pub const MANIFEST_FORMAT: &str = "onehead-sweep";

impl Manifest {
    pub fn path(sweep_dir: &Path) -> PathBuf {
        sweep_dir.join("manifest.json")
    }

    /// Read `<sweep_dir>/manifest.json`.
    pub fn load(sweep_dir: &Path) -> Result<Self> {
        let path = Self::path(sweep_dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a sweep folder (no readable manifest.json)",
                sweep_dir.display()
            )
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a onehead sweep manifest", path.display()))?;
        if m.format != MANIFEST_FORMAT {
            anyhow::bail!("{}: not a onehead sweep manifest", path.display());
        }
        Ok(m)
    }
}

/// A planned sweep: the runs and the text of each resolved config.
#[derive(Debug, Clone)]
pub struct Plan {
    pub runs: Vec<PlannedRun>,
    pub configs: Vec<String>,
}

/// The Cartesian product of the grid (first axis slowest).
fn grid_points(grid: &[GridAxis]) -> Vec<Vec<(String, String)>> {
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
    points
}

/// Folder-safe characters only.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The label of a key in run names: its last dotted part (`stages.*.lr` → `lr`), unless two
/// axes share that part, then the whole key (`stages.0.lr`, `stages.1.lr`).
fn key_labels(keys: &[&str]) -> HashMap<String, String> {
    let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    keys.iter()
        .map(|k| {
            let clash = keys.iter().filter(|o| last(o) == last(k)).count() > 1;
            let label = if clash {
                k.replace('*', "all")
            } else {
                last(k)
            };
            (k.to_string(), label)
        })
        .collect()
}

/// A folder-safe run name: the experiment's name plus the varied values. Very long names
/// are cut and made unique with a hash of the full name.
pub fn run_name(
    base: &str,
    varied: &[(String, String)],
    labels: &HashMap<String, String>,
) -> String {
    let mut name = base.to_string();
    for (k, v) in varied {
        let key = labels.get(k).cloned().unwrap_or_else(|| k.clone());
        name.push_str(&format!("__{key}-{v}"));
    }
    let name = sanitize(&name);
    const MAX: usize = 120;
    if name.len() <= MAX {
        return name;
    }
    // FNV-1a: stable across versions and platforms (names must stay the same on re-runs).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}__{:08x}", &name[..MAX - 10], h as u32)
}

/// Plan every file × every grid point × every seed into `sweep_dir` (absolute). Each config
/// is loaded and validated here, so a mistake anywhere in the grid stops the sweep before
/// any run starts.
pub fn plan(spec: &SweepSpec, sweep_dir: &Path) -> Result<Plan> {
    if spec.files.is_empty() {
        anyhow::bail!("no experiment files to sweep");
    }
    for axis in &spec.grid {
        if spec.grid.iter().filter(|a| a.key == axis.key).count() > 1 {
            anyhow::bail!("--set {}: the same key is given twice", axis.key);
        }
    }
    let points = grid_points(&spec.grid);
    // Resolve every point, expanding `seeds = [..]` where the grid does not set `seed`.
    // (file, overrides, varied values, resolved experiment) of every run, in plan order.
    type Resolved = (PathBuf, Vec<String>, Vec<(String, String)>, Experiment);
    let mut resolved: Vec<Resolved> = Vec::new();
    for file in &spec.files {
        for point in &points {
            let mut overrides = spec.overrides.clone();
            overrides.extend(point.iter().map(|(k, v)| format!("{k}={v}")));
            let at = || {
                if point.is_empty() {
                    format!("{}", file.display())
                } else {
                    let p: Vec<String> = point.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{} with {}", file.display(), p.join(" "))
                }
            };
            let exp = crate::registry::Registry::builtin()
                .load(file, &overrides)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("planning the sweep: {}", at()))?;
            let seed_in_grid = point.iter().any(|(k, _)| k == "seed");
            match exp.seeds.clone() {
                Some(seeds) if !seed_in_grid => {
                    for s in seeds {
                        let mut e = exp.clone();
                        e.seed = s;
                        e.seeds = None;
                        let mut ov = overrides.clone();
                        ov.push(format!("seed={s}"));
                        let mut varied = point.clone();
                        varied.push(("seed".into(), s.to_string()));
                        resolved.push((file.clone(), ov, varied, e));
                    }
                }
                _ => {
                    let mut e = exp;
                    e.seeds = None;
                    resolved.push((file.clone(), overrides, point.clone(), e));
                }
            }
        }
    }
    let mut keys: Vec<&str> = Vec::new();
    for (_, _, varied, _) in &resolved {
        for (k, _) in varied {
            if !keys.contains(&k.as_str()) {
                keys.push(k);
            }
        }
    }
    let labels = key_labels(&keys);
    let mut used: HashMap<String, usize> = HashMap::new();
    let mut runs = Vec::new();
    let mut configs = Vec::new();
    for (index, (file, overrides, varied, mut exp)) in resolved.into_iter().enumerate() {
        let experiment = exp.name.clone();
        let mut name = run_name(&experiment, &varied, &labels);
        // Two files with the same experiment name (or values that sanitise alike): the
        // later run gets its index appended, deterministically.
        let n = used.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            name = format!("{name}__{index}");
        }
        let config_name = run_name(
            &experiment,
            &varied
                .iter()
                .filter(|(k, _)| k != "seed")
                .cloned()
                .collect::<Vec<_>>(),
            &labels,
        );
        exp.name = name.clone();
        // Runs go to `--run-dir runs/<name>`; the results folder is where they share their
        // single-task references (`<sweep>/references/`).
        exp.results_dir = sweep_dir.to_path_buf();
        let config = sweep_dir
            .join("configs")
            .join(format!("{index}-{name}.toml"));
        runs.push(PlannedRun {
            index,
            run_dir: sweep_dir.join("runs").join(&name),
            name,
            experiment,
            config_name,
            file,
            overrides,
            varied,
            seed: exp.seed,
            config,
        });
        configs.push(exp.to_toml());
    }
    Ok(Plan { runs, configs })
}

/// Whether two resolved configs describe the same experiment, though their text differs (a
/// newer onehead writes keys in another order, or a new key at its default).
fn same_experiment(a: &str, b: &str, path: &Path) -> bool {
    let registry = crate::registry::Registry::builtin();
    match (registry.parse(a, path, &[]), registry.parse(b, path, &[])) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Write the plan into `sweep_dir` (configs, then `manifest.json`), or — when the folder
/// already holds a sweep — check that it is the same sweep (same runs, same resolved
/// configs) so that re-running it skips finished runs and resumes interrupted ones.
pub fn prepare_sweep_dir(
    plan: &Plan,
    name: &str,
    sweep_dir: &Path,
    spec: &SweepSpec,
) -> Result<Manifest> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: 1,
        name: name.to_string(),
        sweep_dir: sweep_dir.to_path_buf(),
        cwd,
        created_at: report::utc_rfc3339(report::now_secs()),
        grid: spec.grid.clone(),
        overrides: spec.overrides.clone(),
        runs: plan.runs.clone(),
    };
    let other_name = || {
        format!(
            "{} holds another sweep: pick another --name (or delete that folder to start over)",
            sweep_dir.display()
        )
    };
    if Manifest::path(sweep_dir).exists() {
        let old = Manifest::load(sweep_dir)?;
        if old.runs.len() != plan.runs.len() {
            anyhow::bail!(
                "{} ({} runs planned then, {} now)",
                other_name(),
                old.runs.len(),
                plan.runs.len()
            );
        }
        for (a, b) in old.runs.iter().zip(&plan.runs) {
            if a != b {
                anyhow::bail!(
                    "{} (run {} was '{}' from {}, now '{}' from {})",
                    other_name(),
                    a.index,
                    a.name,
                    a.file.display(),
                    b.name,
                    b.file.display()
                );
            }
        }
        for (run, text) in plan.runs.iter().zip(&plan.configs) {
            let stored = std::fs::read_to_string(&run.config).unwrap_or_default();
            if stored != *text && !same_experiment(&stored, text, &run.config) {
                anyhow::bail!(
                    "{} (the resolved config of run {} '{}' changed: was the experiment file edited?)",
                    other_name(),
                    run.index,
                    run.name
                );
            }
        }
        return Ok(old);
    }
    if sweep_dir.exists()
        && std::fs::read_dir(sweep_dir)
            .with_context(|| format!("reading {}", sweep_dir.display()))?
            .next()
            .is_some()
    {
        anyhow::bail!(
            "{} exists and is not a sweep folder (no manifest.json): pick another --name",
            sweep_dir.display()
        );
    }
    std::fs::create_dir_all(sweep_dir.join("configs"))
        .with_context(|| format!("creating {}", sweep_dir.join("configs").display()))?;
    for (run, text) in plan.runs.iter().zip(&plan.configs) {
        report::write_atomic(&run.config, text.as_bytes())?;
    }
    report::write_atomic(
        &Manifest::path(sweep_dir),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(manifest)
}

/// The absolute sweep folder `<results>/<name>` (created if absent, so that it can be
/// canonicalised: configs and scripts name absolute paths).
pub fn sweep_dir(results: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains("..") || name.starts_with('/') {
        anyhow::bail!("--name '{name}': expected a folder name inside the results folder");
    }
    let dir = results.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_exp(dir: &Path, name: &str, extra: &str) -> PathBuf {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!("name = \"{name}\"\n{extra}\n[[stages]]\ntask = \"seg\"\n[[stages]]\ntask = \"det\"\n"),
        )
        .unwrap();
        p
    }

    #[test]
    fn plan_is_files_times_grid_times_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write_exp(tmp.path(), "a", "seeds = [0, 1, 2]");
        let b = write_exp(tmp.path(), "b", "seed = 5");
        let spec = SweepSpec {
            files: vec![a.clone(), b.clone()],
            grid: vec!["replay.enabled=false,true".parse().unwrap()],
            overrides: vec!["stages.*.epochs=1".into()],
        };
        let sweep = tmp.path().join("sw");
        let p = plan(&spec, &sweep).unwrap();
        // a: 2 grid points × 3 seeds (seed fastest); b: 2 grid points, its one seed.
        assert_eq!(p.runs.len(), 8);
        let names: Vec<&str> = p.runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a__enabled-false__seed-0",
                "a__enabled-false__seed-1",
                "a__enabled-false__seed-2",
                "a__enabled-true__seed-0",
                "a__enabled-true__seed-1",
                "a__enabled-true__seed-2",
                "b__enabled-false",
                "b__enabled-true",
            ]
        );
        let r = &p.runs[4];
        assert_eq!(r.index, 4);
        assert_eq!(r.seed, 1);
        assert_eq!(r.file, a);
        assert_eq!(
            r.overrides,
            ["stages.*.epochs=1", "replay.enabled=true", "seed=1"]
        );
        assert_eq!(
            r.configuration(),
            vec![("replay.enabled".to_string(), "true".to_string())]
        );
        assert_eq!(r.run_dir, sweep.join("runs/a__enabled-true__seed-1"));
        assert_eq!(
            r.config,
            sweep.join("configs/4-a__enabled-true__seed-1.toml")
        );
        assert_eq!(p.runs[7].seed, 5);
        assert_eq!(r.config_name, "a__enabled-true");
        // The resolved config is the run: one seed, no `seeds`, the run's name.
        let e = Experiment::from_toml_str(&p.configs[4], Path::new("x"), &[]).unwrap();
        assert_eq!((e.seed, e.seeds.clone()), (1, None));
        assert_eq!(e.name, "a__enabled-true__seed-1");
        assert_eq!(e.strategies["replay"]["enabled"].as_bool(), Some(true));
        assert_eq!(e.stages[0].epochs, 1);
    }

    #[test]
    fn a_seed_axis_in_the_grid_wins_over_the_files_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write_exp(tmp.path(), "a", "seeds = [0, 1, 2]");
        let spec = SweepSpec {
            files: vec![a],
            grid: vec!["seed=7,8".parse().unwrap()],
            overrides: vec![],
        };
        let p = plan(&spec, tmp.path()).unwrap();
        let seeds: Vec<u64> = p.runs.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, [7, 8]);
    }

    #[test]
    fn invalid_grid_points_stop_the_plan_naming_file_and_override() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write_exp(tmp.path(), "a", "");
        let spec = SweepSpec {
            files: vec![a],
            grid: vec!["stages.*.epochs=1,0".parse().unwrap()],
            overrides: vec![],
        };
        let msg = format!("{:#}", plan(&spec, tmp.path()).unwrap_err());
        assert!(
            msg.contains("a.toml with stages.*.epochs=0") && msg.contains("epochs must be > 0"),
            "{msg}"
        );
    }

    #[test]
    fn names_are_unique_and_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write_exp(tmp.path(), "a", "");
        let spec = SweepSpec {
            files: vec![a.clone(), a],
            grid: vec![
                "stages.0.lr=0.1".parse().unwrap(),
                "stages.1.lr=0.2".parse().unwrap(),
            ],
            overrides: vec![],
        };
        let p = plan(&spec, tmp.path()).unwrap();
        assert_eq!(p.runs[0].name, "a__stages.0.lr-0.1__stages.1.lr-0.2");
        assert_eq!(p.runs[1].name, "a__stages.0.lr-0.1__stages.1.lr-0.2__1");
        let labels = key_labels(&["replay.tasks"]);
        let long = run_name(
            "x",
            &[("replay.tasks".into(), "[\"seg\",\"det\"]".repeat(20))],
            &labels,
        );
        assert!(long.len() <= 120, "{long}");
        assert!(long.starts_with("x__tasks-__seg___det__"), "{long}");
    }

    #[test]
    fn a_sweep_folder_is_reused_only_by_the_same_sweep() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write_exp(tmp.path(), "a", "");
        let spec = SweepSpec {
            files: vec![a.clone()],
            grid: vec!["seed=0,1".parse().unwrap()],
            overrides: vec![],
        };
        let dir = sweep_dir(&tmp.path().join("results"), "sw").unwrap();
        let p = plan(&spec, &dir).unwrap();
        let m = prepare_sweep_dir(&p, "sw", &dir, &spec).unwrap();
        assert_eq!(m.runs.len(), 2);
        assert!(dir.join("configs/1-a__seed-1.toml").is_file());
        assert_eq!(Manifest::load(&dir).unwrap(), m);
        // Same sweep again: accepted, the stored manifest is kept.
        let again = prepare_sweep_dir(&plan(&spec, &dir).unwrap(), "sw", &dir, &spec).unwrap();
        assert_eq!(again, m);
        // A stored config written by another onehead (keys in another order, a key since
        // added at its default left out) is the same experiment: accepted.
        let stored = dir.join("configs/1-a__seed-1.toml");
        let text = std::fs::read_to_string(&stored).unwrap();
        let older = text.replace("distill_temperature = 2.0\n", "");
        assert_ne!(older, text);
        std::fs::write(&stored, format!("# written by an older onehead\n{older}")).unwrap();
        let again = prepare_sweep_dir(&plan(&spec, &dir).unwrap(), "sw", &dir, &spec).unwrap();
        assert_eq!(again, m);
        // Another grid under the same name: refused with a hint.
        let other = SweepSpec {
            grid: vec!["seed=0,2".parse().unwrap()],
            ..spec.clone()
        };
        let msg = prepare_sweep_dir(&plan(&other, &dir).unwrap(), "sw", &dir, &other)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("another --name"), "{msg}");
        // The experiment file edited: refused too.
        write_exp(tmp.path(), "a", "[eval]\ntolerance = 0.1");
        let msg = prepare_sweep_dir(&plan(&spec, &dir).unwrap(), "sw", &dir, &spec)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("edited"), "{msg}");
        // A folder that is not a sweep.
        std::fs::create_dir_all(tmp.path().join("results/x/junk")).unwrap();
        let d = sweep_dir(&tmp.path().join("results"), "x").unwrap();
        let msg = prepare_sweep_dir(&plan(&spec, &d).unwrap(), "x", &d, &spec)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a sweep folder"), "{msg}");
        assert!(sweep_dir(tmp.path(), "../up").is_err());
    }
}
