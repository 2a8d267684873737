//! Statistics over a sweep's seeds, from the per-image scores every finished run names in
//! its `summary.json`: each configuration's drop pooled over its seeds (the hierarchical
//! paired bootstrap: seeds, then images within each seed), its per-seed pass rate with a
//! Clopper–Pearson interval, and the paired difference of finals between two
//! configurations, seed by seed (`differences.csv`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::Result;

use super::record::{RunRecord, RunResult, TaskResult};
use crate::metrics::bootstrap::{paired_difference, paired_drop, BootstrapSpec, Chance};
use crate::metrics::per_image::PerImage;
use crate::report::Verdict;

/// Resamples behind the sweep's intervals (each run's own use its `[eval] resamples`).
const RESAMPLES: usize = 2000;

/// Per-image score files read once, however many configurations share them (every
/// strategy of one seed shares the reference's); likewise each run's data identity.
#[derive(Default)]
pub struct ScoreCache {
    files: HashMap<PathBuf, Option<Rc<PerImage>>>,
    data: HashMap<PathBuf, Option<(String, String)>>,
}

impl ScoreCache {
    fn get(&mut self, path: &Path) -> Option<Rc<PerImage>> {
        self.files
            .entry(path.to_path_buf())
            .or_insert_with(|| match crate::report::read_scores(path) {
                Ok(s) => s.map(Rc::new),
                Err(e) => {
                    tracing::warn!("{e:#}");
                    None
                }
            })
            .clone()
    }

    /// The images a run's verdict was measured on: its data folder (`meta.json`) and split
    /// (`summary.json`), read once per run.
    fn data_of(&mut self, r: &RunRecord) -> Option<(String, String)> {
        let dir = &r.run.run_dir;
        self.data
            .entry(dir.clone())
            .or_insert_with(|| {
                let read = |f: &str| -> Option<serde_json::Value> {
                    serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
                };
                let root = read("meta.json")?.get("data_root")?.as_str()?.to_string();
                let split = read("summary.json")?
                    .get("verdict_split")
                    .and_then(|s| s.as_str())
                    .unwrap_or("val")
                    .to_string();
                Some((root, split))
            })
            .clone()
    }
}

/// One task's drop pooled over a configuration's seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    /// Seeds pooled (those with scores on both sides).
    pub seeds: usize,
    /// Drop of the mean final from the mean baseline, in the tolerance's units.
    pub drop: f64,
    pub interval: [f64; 2],
    pub verdict: Verdict,
}

/// The hierarchical bootstrap of one task over the runs `members` (one per seed); `None`
/// unless every member has per-image scores.
pub fn pooled_drop(
    members: &[(&RunResult, &TaskResult)],
    cache: &mut ScoreCache,
) -> Result<Option<Pooled>> {
    let Some((run0, task0)) = members.first() else {
        return Ok(None);
    };
    let mut pairs = Vec::new();
    for (_, t) in members {
        let Some([b, f]) = &t.scores else {
            return Ok(None);
        };
        let (Some(b), Some(f)) = (cache.get(b), cache.get(f)) else {
            return Ok(None);
        };
        pairs.push((b, f));
    }
    let refs: Vec<(&PerImage, &PerImage)> = pairs.iter().map(|(b, f)| (&**b, &**f)).collect();
    let confidence = run0.confidence.unwrap_or(0.95);
    let spec = BootstrapSpec {
        resamples: RESAMPLES,
        confidence,
        seed: 0x5EED,
    };
    // The chance predictor's scores are the task's, not the run's: here the pooled drop is
    // taken as learned when every seed's own run found it learned.
    let d = paired_drop(
        &refs,
        &task0.metric,
        Chance::Level(f64::NEG_INFINITY),
        &spec,
    )?;
    let absolute = run0.tolerance_kind.as_deref() == Some("absolute");
    let (drop, (lo, hi)) = if absolute {
        (d.drop_abs, d.abs)
    } else {
        (d.drop_rel, d.rel)
    };
    let learned = members
        .iter()
        .all(|(_, t)| t.verdict.as_deref().is_some_and(|v| v != "not_learned"));
    let tolerance = run0.tolerance.unwrap_or(0.05);
    Ok(Some(Pooled {
        seeds: refs.len(),
        drop,
        interval: [lo, hi],
        verdict: Verdict::from_interval(learned, [lo, hi], tolerance),
    }))
}

/// The paired difference of one task's finals between two configurations over the seeds
/// they share (same seed and same reference, hence the same test images).
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub a: String,
    pub b: String,
    pub task: String,
    pub metric: String,
    pub seeds: usize,
    /// Mean over the shared seeds of `final(a) − final(b)`, in metric points.
    pub mean: f64,
    pub interval: [f64; 2],
}

/// One configuration's finished runs, as [`differences`] needs them.
pub struct Group<'a> {
    pub label: String,
    pub runs: Vec<&'a RunRecord>,
}

/// Every pair of configurations × task with at least one shared seed.
pub fn differences(groups: &[Group], cache: &mut ScoreCache) -> Result<Vec<Difference>> {
    let mut out = Vec::new();
    for (i, ga) in groups.iter().enumerate() {
        for gb in &groups[i + 1..] {
            out.extend(pair_differences(ga, gb, cache)?);
        }
    }
    Ok(out)
}

fn pair_differences(ga: &Group, gb: &Group, cache: &mut ScoreCache) -> Result<Vec<Difference>> {
    let mut out = Vec::new();
    let tasks = ga.runs.iter().filter_map(|r| r.result.as_ref()).next();
    let Some(tasks) = tasks else { return Ok(out) };
    for t in &tasks.tasks {
        let mut a_scores = Vec::new();
        let mut b_scores = Vec::new();
        for ra in &ga.runs {
            let Some(fa) = final_scores(ra, &t.task, cache) else {
                continue;
            };
            let partner = gb.runs.iter().find(|rb| {
                rb.run.seed == ra.run.seed
                    && (same_baseline(ra, rb, &t.task) || same_images(ra, rb, cache))
            });
            let fb = partner.and_then(|rb| final_scores(rb, &t.task, cache));
            if let Some(fb) = fb.filter(|fb| fb.len() == fa.len()) {
                a_scores.push(fa);
                b_scores.push(fb);
            }
        }
        if a_scores.is_empty() {
            continue;
        }
        let a: Vec<&PerImage> = a_scores.iter().map(|x| &**x).collect();
        let b: Vec<&PerImage> = b_scores.iter().map(|x| &**x).collect();
        let spec = BootstrapSpec {
            resamples: RESAMPLES / 2,
            confidence: 0.95,
            seed: 0xD1FF,
        };
        let (mean, (lo, hi)) = paired_difference(&a, &b, &t.metric, &spec)?;
        out.push(Difference {
            a: ga.label.clone(),
            b: gb.label.clone(),
            task: t.task.clone(),
            metric: t.metric.clone(),
            seeds: a.len(),
            mean,
            interval: [lo, hi],
        });
    }
    Ok(out)
}

fn task_of<'a>(r: &'a RunRecord, task: &str) -> Option<&'a TaskResult> {
    r.result.as_ref()?.tasks.iter().find(|t| t.task == task)
}

/// Whether two runs' task was judged against the same baseline scores (then they share the
/// seed and the data).
fn same_baseline(ra: &RunRecord, rb: &RunRecord, task: &str) -> bool {
    baseline_of(ra, task).is_some() && baseline_of(ra, task) == baseline_of(rb, task)
}

/// Whether two runs' verdicts were measured on the same images in the same order: the same
/// data folder (`meta.json`) and split (`summary.json`). Runs judged against different
/// baselines (a compute-matched joint reference judged against itself) pair this way.
fn same_images(ra: &RunRecord, rb: &RunRecord, cache: &mut ScoreCache) -> bool {
    cache
        .data_of(ra)
        .is_some_and(|a| cache.data_of(rb).as_ref() == Some(&a))
}

/// The baseline scores a run's task was judged against: two runs that share it share the
/// seed and the data.
fn baseline_of<'a>(r: &'a RunRecord, task: &str) -> Option<&'a PathBuf> {
    task_of(r, task)?.scores.as_ref().map(|[b, _]| b)
}

fn final_scores(r: &RunRecord, task: &str, cache: &mut ScoreCache) -> Option<Rc<PerImage>> {
    let [_, f] = task_of(r, task)?.scores.as_ref()?;
    cache.get(f)
}

/// The `differences.csv` table.
pub fn differences_table(diffs: &[Difference]) -> (Vec<String>, Vec<Vec<String>>) {
    let header = [
        "a",
        "b",
        "task",
        "metric",
        "seeds",
        "final_a_minus_b",
        "lo",
        "hi",
    ]
    .map(String::from)
    .to_vec();
    let rows = diffs
        .iter()
        .map(|d| {
            vec![
                d.a.clone(),
                d.b.clone(),
                d.task.clone(),
                d.metric.clone(),
                d.seeds.to_string(),
                d.mean.to_string(),
                d.interval[0].to_string(),
                d.interval[1].to_string(),
            ]
        })
        .collect();
    (header.to_vec(), rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::plan::PlannedRun;
    use crate::sweep::record::Status;

    /// A finished run of `config` at `seed` in `dir`, whose cls Top-1 was judged on `data`'s
    /// test split against the scores in `baseline`; its final hits are `hits` (1 = top-1).
    fn run(
        dir: &Path,
        config: &str,
        seed: u64,
        data: &str,
        baseline: &Path,
        hits: &[u8],
    ) -> RunRecord {
        let run_dir = dir.join(format!("{config}-{seed}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let scores = serde_json::json!({"kind": "hits", "num_classes": 10,
            "labels": vec![0; hits.len()],
            "ranks": hits.iter().map(|h| if *h == 1 { 0 } else { 3 }).collect::<Vec<_>>()});
        let fin = run_dir.join("final.json");
        std::fs::write(&fin, scores.to_string()).unwrap();
        std::fs::write(
            run_dir.join("meta.json"),
            format!("{{\"data_root\": \"{data}\"}}"),
        )
        .unwrap();
        std::fs::write(
            run_dir.join("summary.json"),
            "{\"verdict_split\": \"test\"}",
        )
        .unwrap();
        let summary = serde_json::json!({"seed": seed, "tasks": [{"task": "cls", "metric": "top1",
            "baseline": 0.5, "final_value": 0.5, "drop_rel": 0.0, "verdict": "within",
            "scores": [baseline, fin]}]});
        RunRecord {
            run: PlannedRun {
                index: 0,
                name: format!("{config}__seed-{seed}"),
                experiment: config.into(),
                config_name: config.into(),
                file: format!("{config}.toml").into(),
                overrides: vec![],
                varied: vec![("seed".into(), seed.to_string())],
                seed,
                config: run_dir.join("config.toml"),
                run_dir,
            },
            status: Status::Ok,
            result: Some(RunResult::from_summary(&summary)),
        }
    }

    #[test]
    fn runs_pair_by_seed_and_images_even_with_other_baselines() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (ref0, ref1) = (d.join("ref0.json"), d.join("ref1.json"));
        // a: 8/10 and 6/10 right; b (judged against itself: other baseline files) 5/10 and
        // 5/10; c: other data, never paired.
        let one = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
        let two = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0];
        let half = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
        let a = [
            run(d, "a", 0, "data/s0", &ref0, &one),
            run(d, "a", 1, "data/s0", &ref1, &two),
        ];
        let b = [
            run(d, "b", 0, "data/s0", &d.join("b0.json"), &half),
            run(d, "b", 1, "data/s0", &d.join("b1.json"), &half),
        ];
        let c = [run(d, "c", 0, "data/s1", &d.join("c0.json"), &half)];
        fn group<'a>(label: &str, rs: &'a [RunRecord]) -> Group<'a> {
            Group {
                label: label.into(),
                runs: rs.iter().collect(),
            }
        }
        let groups = [group("a", &a), group("b", &b), group("c", &c)];
        let diffs = differences(&groups, &mut ScoreCache::default()).unwrap();
        assert_eq!(diffs.len(), 1, "only a–b pair: {diffs:?}");
        let ab = &diffs[0];
        assert_eq!((ab.a.as_str(), ab.b.as_str(), ab.seeds), ("a", "b", 2));
        // Mean final of a (0.7) minus mean final of b (0.5).
        assert!((ab.mean - 0.2).abs() < 1e-9, "{}", ab.mean);
        assert!(ab.interval[0] <= ab.mean && ab.mean <= ab.interval[1]);
    }
}
