//! A sweep's tables from what its runs left ([`super::record`]): `index.csv` (one row per run)
//! and `summary.csv` (one row per configuration, mean ± std over seeds, pooled verdicts).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;

pub use super::record::{
    read_records, record_from_dir, status_from_dir, RunRecord, RunResult, Status, TaskResult,
    LOG_EXIT, LOG_START,
};
use crate::report;

/// `(task, metric)` pairs over all results, in order of first appearance.
fn task_columns(records: &[RunRecord]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for r in records {
        for t in r.result.iter().flat_map(|x| &x.tasks) {
            let key = (t.task.clone(), t.metric.clone());
            if !out.contains(&key) {
                out.push(key);
            }
        }
    }
    out
}

/// Varied keys other than `seed`, in order of first appearance.
fn config_keys(records: &[RunRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in records {
        for (k, _) in r.run.configuration() {
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

fn value_of(varied: &[(String, String)], key: &str) -> String {
    varied
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

fn num(x: Option<f64>) -> String {
    x.map(|v| format!("{v}")).unwrap_or_default()
}

/// `index.csv`: one row per planned run.
pub fn index_table(records: &[RunRecord]) -> (Vec<String>, Vec<Vec<String>>) {
    let keys = config_keys(records);
    let tasks = task_columns(records);
    let mut header: Vec<String> = ["index", "name", "status", "reason", "file"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    header.extend(keys.iter().cloned());
    header.push("seed".into());
    for (t, m) in &tasks {
        header.extend([
            format!("{t}_{m}_baseline"),
            format!("{t}_{m}_final"),
            format!("{t}_{m}_drop"),
            format!("{t}_{m}_drop_lo"),
            format!("{t}_{m}_drop_hi"),
            format!("{t}_verdict"),
        ]);
    }
    header.extend(["pass".into(), "train_seconds".into(), "run_dir".into()]);
    let rows = records
        .iter()
        .map(|r| {
            let mut row = vec![
                r.run.index.to_string(),
                r.run.name.clone(),
                r.status.label().to_string(),
                r.status.reason().to_string(),
                r.run.file.display().to_string(),
            ];
            row.extend(keys.iter().map(|k| value_of(&r.run.varied, k)));
            row.push(r.run.seed.to_string());
            for (t, m) in &tasks {
                let tr = r
                    .result
                    .as_ref()
                    .and_then(|x| x.tasks.iter().find(|x| &x.task == t && &x.metric == m));
                row.extend([
                    num(tr.and_then(|x| x.baseline)),
                    num(tr.and_then(|x| x.final_value)),
                    num(tr.and_then(|x| x.drop_rel)),
                    num(tr.and_then(|x| x.drop_interval).map(|i| i[0])),
                    num(tr.and_then(|x| x.drop_interval).map(|i| i[1])),
                    tr.and_then(|x| x.verdict.clone()).unwrap_or_default(),
                ]);
            }
            let res = r.result.as_ref();
            row.extend([
                res.and_then(|x| x.pass)
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                res.and_then(|x| x.train_seconds)
                    .map(|s| format!("{s:.1}"))
                    .unwrap_or_default(),
                r.run.run_dir.display().to_string(),
            ]);
            row
        })
        .collect();
    (header, rows)
}

/// Mean and sample standard deviation (n − 1); the std is `None` below two values.
pub fn mean_std(xs: &[f64]) -> (Option<f64>, Option<f64>) {
    if xs.is_empty() {
        return (None, None);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (Some(mean), None);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (Some(mean), Some(var.sqrt()))
}

/// One task's figures over the seeds of a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskAggregate {
    pub task: String,
    pub metric: String,
    /// Mean of the seeds' baselines (each seed's own single-task reference by default).
    pub baseline_mean: Option<f64>,
    pub final_mean: Option<f64>,
    pub final_std: Option<f64>,
    pub drop_mean: Option<f64>,
    pub drop_std: Option<f64>,
    /// Seeds whose verdict for this task is `within`.
    pub n_pass: usize,
    /// The drop pooled over the seeds (hierarchical bootstrap) and its verdict.
    pub pooled: Option<super::stats::Pooled>,
}

/// One configuration (all varied values but the seed) over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// Run name without the seed part (the experiment's name plus the other varied values).
    pub label: String,
    pub file: PathBuf,
    pub configuration: Vec<(String, String)>,
    /// Planned runs of this configuration.
    pub n_runs: usize,
    /// Finished runs (status ok) the figures are over.
    pub n_seeds: usize,
    pub seeds: Vec<u64>,
    pub tasks: Vec<TaskAggregate>,
    /// Finished runs passing every task, and the Clopper–Pearson 95 % interval of that
    /// per-seed pass rate.
    pub n_pass: usize,
    pub pass_interval: [f64; 2],
    pub train_seconds_mean: Option<f64>,
}

/// Group runs by configuration (file + varied values but `seed`, in plan order) and
/// aggregate the finished ones.
pub fn aggregate(records: &[RunRecord], cache: &mut super::stats::ScoreCache) -> Vec<Aggregate> {
    let tasks = task_columns(records);
    struct Group<'a> {
        file: PathBuf,
        configuration: Vec<(String, String)>,
        members: Vec<&'a RunRecord>,
    }
    let mut groups: Vec<Group> = Vec::new();
    for r in records {
        let conf = r.run.configuration();
        match groups
            .iter_mut()
            .find(|g| g.file == r.run.file && g.configuration == conf)
        {
            Some(g) => g.members.push(r),
            None => groups.push(Group {
                file: r.run.file.clone(),
                configuration: conf,
                members: vec![r],
            }),
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let Group {
                file,
                configuration,
                members,
            } = g;
            let done: Vec<(&RunRecord, &RunResult)> = members
                .iter()
                .filter_map(|r| r.result.as_ref().map(|x| (*r, x)))
                .collect();
            let task_aggs = tasks
                .iter()
                .map(|(t, m)| {
                    let of = |r: &RunResult| {
                        r.tasks
                            .iter()
                            .find(|x| &x.task == t && &x.metric == m)
                            .cloned()
                    };
                    let pairs: Vec<(&RunResult, TaskResult)> = done
                        .iter()
                        .filter_map(|(_, r)| Some((*r, of(r)?)))
                        .collect();
                    let members: Vec<(&RunResult, &TaskResult)> =
                        pairs.iter().map(|(r, t)| (*r, t)).collect();
                    let pooled = super::stats::pooled_drop(&members, cache).unwrap_or_else(|e| {
                        tracing::warn!("pooling {t} over seeds: {e:#}");
                        None
                    });
                    let trs: Vec<TaskResult> = pairs.into_iter().map(|(_, t)| t).collect();
                    let finals: Vec<f64> = trs.iter().filter_map(|x| x.final_value).collect();
                    let drops: Vec<f64> = trs.iter().filter_map(|x| x.drop_rel).collect();
                    let (final_mean, final_std) = mean_std(&finals);
                    let baselines: Vec<f64> = trs.iter().filter_map(|x| x.baseline).collect();
                    let (baseline_mean, _) = mean_std(&baselines);
                    let (drop_mean, drop_std) = mean_std(&drops);
                    TaskAggregate {
                        task: t.clone(),
                        metric: m.clone(),
                        baseline_mean,
                        final_mean,
                        final_std,
                        drop_mean,
                        drop_std,
                        n_pass: trs
                            .iter()
                            .filter(|x| x.verdict.as_deref() == Some("within"))
                            .count(),
                        pooled,
                    }
                })
                .collect();
            let secs: Vec<f64> = done.iter().filter_map(|(_, r)| r.train_seconds).collect();
            let n_pass = done.iter().filter(|(_, r)| r.pass == Some(true)).count();
            let label = members[0].run.config_name.clone();
            Aggregate {
                label,
                file,
                n_runs: members.len(),
                n_seeds: done.len(),
                seeds: done.iter().map(|(r, _)| r.run.seed).collect(),
                tasks: task_aggs,
                n_pass,
                pass_interval: {
                    let (lo, hi) =
                        crate::metrics::bootstrap::clopper_pearson(n_pass, done.len(), 0.95);
                    [lo, hi]
                },
                train_seconds_mean: mean_std(&secs).0,
                configuration,
            }
        })
        .collect()
}

/// `summary.csv`: one row per configuration.
pub fn summary_table(aggs: &[Aggregate]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut keys: Vec<String> = Vec::new();
    for a in aggs {
        for (k, _) in &a.configuration {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let tasks: Vec<(String, String)> = aggs
        .first()
        .map(|a| {
            a.tasks
                .iter()
                .map(|t| (t.task.clone(), t.metric.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut header: Vec<String> = vec!["config".into(), "file".into()];
    header.extend(keys.iter().cloned());
    header.extend(["n_runs".into(), "n_seeds".into(), "seeds".into()]);
    for (t, m) in &tasks {
        header.extend([
            format!("{t}_{m}_baseline_mean"),
            format!("{t}_{m}_final_mean"),
            format!("{t}_{m}_final_std"),
            format!("{t}_drop_mean"),
            format!("{t}_drop_std"),
            format!("{t}_drop_pooled"),
            format!("{t}_drop_pooled_lo"),
            format!("{t}_drop_pooled_hi"),
            format!("{t}_verdict_pooled"),
            format!("{t}_n_pass"),
        ]);
    }
    header.extend([
        "n_pass".into(),
        "pass_rate_lo".into(),
        "pass_rate_hi".into(),
        "train_seconds_mean".into(),
    ]);
    let rows = aggs
        .iter()
        .map(|a| {
            let mut row = vec![a.label.clone(), a.file.display().to_string()];
            row.extend(keys.iter().map(|k| value_of(&a.configuration, k)));
            row.extend([
                a.n_runs.to_string(),
                a.n_seeds.to_string(),
                // Always a list (one type in the column, however many seeds).
                format!(
                    "[{}]",
                    a.seeds
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ]);
            for t in &a.tasks {
                row.extend([
                    num(t.baseline_mean),
                    num(t.final_mean),
                    num(t.final_std),
                    num(t.drop_mean),
                    num(t.drop_std),
                    num(t.pooled.as_ref().map(|p| p.drop)),
                    num(t.pooled.as_ref().map(|p| p.interval[0])),
                    num(t.pooled.as_ref().map(|p| p.interval[1])),
                    t.pooled
                        .as_ref()
                        .map(|p| p.verdict.key().to_string())
                        .unwrap_or_default(),
                    t.n_pass.to_string(),
                ]);
            }
            row.extend([
                a.n_pass.to_string(),
                num(Some(a.pass_interval[0])),
                num(Some(a.pass_interval[1])),
                a.train_seconds_mean
                    .map(|s| format!("{s:.1}"))
                    .unwrap_or_default(),
            ]);
            row
        })
        .collect();
    (header, rows)
}

/// The aggregate as a terminal table: per task the final (mean ± sd over seeds), the change
/// pooled over the seeds with its interval (negative: a drop), the pooled verdict and the
/// seeds within; per configuration the seeds passing every task with the Clopper–Pearson
/// interval of that rate.
pub fn summary_text(aggs: &[Aggregate]) -> String {
    let pm = |m: Option<f64>, s: Option<f64>| match (m, s) {
        (Some(m), Some(s)) => format!("{m:.3} ± {s:.3}"),
        (Some(m), None) => format!("{m:.3}"),
        _ => "-".into(),
    };
    let mut header = vec!["config".to_string(), "seeds".into()];
    if let Some(a) = aggs.first() {
        for t in &a.tasks {
            header.push(format!("{} {} baseline → final", t.task, t.metric));
            header.push(format!("{} change [interval]", t.task));
            header.push(format!("{} verdict", t.task));
        }
    }
    header.push("all within (seeds)".into());
    let mut rows = vec![header];
    for a in aggs {
        let mut row = vec![
            a.label.clone(),
            if a.n_seeds == a.n_runs {
                a.n_seeds.to_string()
            } else {
                format!("{}/{}", a.n_seeds, a.n_runs)
            },
        ];
        for t in &a.tasks {
            row.push(match t.baseline_mean {
                Some(b) => format!("{b:.3} → {}", pm(t.final_mean, t.final_std)),
                None => pm(t.final_mean, t.final_std),
            });
            row.push(match &t.pooled {
                Some(p) => format!(
                    "{} {}",
                    crate::report::fmt_drop(Some(p.drop)),
                    crate::report::fmt_interval(Some(p.interval))
                ),
                None => crate::report::fmt_drop(t.drop_mean),
            });
            row.push(match &t.pooled {
                Some(p) => format!("{} ({}/{})", p.verdict.label(), t.n_pass, a.n_seeds),
                None if a.n_seeds == 0 => "—".into(),
                None => format!("{}/{} within", t.n_pass, a.n_seeds),
            });
        }
        if a.n_seeds == 0 {
            row.push("— (nothing finished)".into());
            rows.push(row);
            continue;
        }
        row.push(format!(
            "{}/{} [{:.0}–{:.0} %]",
            a.n_pass,
            a.n_seeds,
            a.pass_interval[0] * 100.0,
            a.pass_interval[1] * 100.0
        ));
        rows.push(row);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let pad = widths[i] - s.chars().count();
                if i == 0 {
                    format!("{s}{}", " ".repeat(pad))
                } else {
                    format!("{}{s}", " ".repeat(pad))
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn write_csv(path: &Path, header: &[String], rows: &[Vec<String>]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in rows {
        w.write_record(r)?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    report::write_atomic(path, &bytes)
}

/// Write `index.csv` and `summary.csv` into the sweep folder (atomically).
pub fn write_index(sweep_dir: &Path, records: &[RunRecord]) -> Result<Vec<Aggregate>> {
    write_run_list(sweep_dir, records)?;
    let mut cache = super::stats::ScoreCache::default();
    let aggs = aggregate(records, &mut cache);
    let (h, rows) = summary_table(&aggs);
    write_csv(&sweep_dir.join("summary.csv"), &h, &rows)?;
    let groups: Vec<super::stats::Group> = aggs
        .iter()
        .map(|a| super::stats::Group {
            label: a.label.clone(),
            runs: records
                .iter()
                .filter(|r| {
                    r.result.is_some()
                        && r.run.file == a.file
                        && r.run.configuration() == a.configuration
                })
                .collect(),
        })
        .collect();
    let diffs = super::stats::differences(&groups, &mut cache)?;
    let (h, rows) = super::stats::differences_table(&diffs);
    write_csv(&sweep_dir.join("differences.csv"), &h, &rows)?;
    Ok(aggs)
}

/// `index.csv` alone: one row per run, cheap enough to rewrite whenever a run ends. The
/// summary's intervals and the pairwise differences resample every run's per-image scores
/// (minutes of one core for a 54-run sweep with detection): [`write_index`] writes them once
/// the sweep stops, not after every run.
pub fn write_run_list(sweep_dir: &Path, records: &[RunRecord]) -> Result<()> {
    let (h, rows) = index_table(records);
    write_csv(&sweep_dir.join("index.csv"), &h, &rows)
}

/// Counts of records by status, for messages.
pub fn status_counts(records: &[RunRecord]) -> String {
    let mut parts = Vec::new();
    for label in [
        "ok",
        "failed",
        "interrupted",
        "running",
        "pending",
        "missing",
    ] {
        let n = records.iter().filter(|r| r.status.label() == label).count();
        if n > 0 {
            parts.push(format!(
                "{n} {}",
                if label == "ok" { "finished" } else { label }
            ));
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::plan::PlannedRun;

    fn planned(index: usize, lr: &str, seed: u64) -> PlannedRun {
        PlannedRun {
            index,
            name: format!("x__lr-{lr}__seed-{seed}"),
            experiment: "x".into(),
            config_name: format!("x__lr-{lr}"),
            file: "x.toml".into(),
            overrides: vec![],
            varied: vec![
                ("stages.*.lr".into(), lr.into()),
                ("seed".into(), seed.to_string()),
            ],
            seed,
            config: format!("/s/configs/{index}.toml").into(),
            run_dir: format!("/s/runs/{index}").into(),
        }
    }

    fn done(run: PlannedRun, seg: (f64, f64), cls: (f64, f64), secs: f64) -> RunRecord {
        let task = |task: &str, metric: &str, (base, fin): (f64, f64)| {
            let drop = (base - fin) / base;
            serde_json::json!({"task": task, "metric": metric, "baseline": base,
                "final_value": fin, "drop_rel": drop,
                "verdict": if drop <= 0.05 { "ok" } else { "forgot" }})
        };
        let pass = (seg.0 - seg.1) / seg.0 <= 0.05 && (cls.0 - cls.1) / cls.0 <= 0.05;
        let v = serde_json::json!({"seed": run.seed, "pass": pass, "train_seconds": secs,
            "unknown_field": [1, 2],
            "tasks": [task("seg", "miou", seg), task("cls", "top1", cls)]});
        RunRecord {
            run,
            status: Status::Ok,
            result: Some(RunResult::from_summary(&v)),
        }
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m.unwrap() - 2.5).abs() < 1e-12);
        // Sample variance: (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
        assert!((s.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[0.7]), (Some(0.7), None));
        assert_eq!(mean_std(&[]), (None, None));
    }

    #[test]
    fn aggregation_over_seeds_on_hand_made_numbers() {
        let records = vec![
            // lr 0.1: three seeds. seg finals 0.40, 0.50, 0.60 from baseline 0.5 / 0.5 / 0.6
            done(planned(0, "0.1", 0), (0.5, 0.40), (0.8, 0.80), 10.0),
            done(planned(1, "0.1", 1), (0.5, 0.50), (0.8, 0.70), 20.0),
            done(planned(2, "0.1", 2), (0.6, 0.60), (0.8, 0.79), 30.0),
            // lr 0.2: one seed finished, one failed, one missing.
            done(planned(3, "0.2", 0), (0.5, 0.45), (0.5, 0.5), 12.0),
            RunRecord {
                run: planned(4, "0.2", 1),
                status: Status::Failed("boom".into()),
                result: None,
            },
            RunRecord {
                run: planned(5, "0.2", 2),
                status: Status::Missing,
                result: None,
            },
        ];
        let aggs = aggregate(&records, &mut crate::sweep::stats::ScoreCache::default());
        assert_eq!(aggs.len(), 2);
        let a = &aggs[0];
        assert_eq!(a.label, "x__lr-0.1");
        assert_eq!(
            (a.n_runs, a.n_seeds, a.seeds.clone()),
            (3, 3, vec![0, 1, 2])
        );
        let seg = &a.tasks[0];
        assert_eq!((seg.task.as_str(), seg.metric.as_str()), ("seg", "miou"));
        assert!((seg.final_mean.unwrap() - 0.5).abs() < 1e-12);
        assert!((seg.final_std.unwrap() - 0.1).abs() < 1e-12);
        // Drops 0.2, 0.0, 0.0: mean 1/15, sample std sqrt(((2/15)^2 + 2 (1/15)^2) / 2).
        assert!((seg.drop_mean.unwrap() - 0.2 / 3.0).abs() < 1e-12);
        let want = ((0.2f64 - 0.2 / 3.0).powi(2) + 2.0 * (0.2f64 / 3.0).powi(2)) / 2.0;
        assert!((seg.drop_std.unwrap() - want.sqrt()).abs() < 1e-12);
        assert_eq!(seg.n_pass, 2);
        let cls = &a.tasks[1];
        // cls drops 0, 0.125, 0.0125: only seeds 0 and 2 within 5 %.
        assert_eq!(cls.n_pass, 2);
        // Seed 0 forgot seg, seed 1 forgot cls: only seed 2 passes everything.
        assert_eq!(a.n_pass, 1);
        assert!((a.train_seconds_mean.unwrap() - 20.0).abs() < 1e-12);

        let b = &aggs[1];
        assert_eq!((b.n_runs, b.n_seeds), (3, 1));
        assert!((b.tasks[0].final_mean.unwrap() - 0.45).abs() < 1e-12);
        assert_eq!(b.tasks[0].final_std, None, "one seed: no std");

        let (h, rows) = summary_table(&aggs);
        let col = |n: &str| {
            h.iter()
                .position(|c| c == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(rows[0][col("stages.*.lr")], "0.1");
        assert_eq!(rows[0][col("n_seeds")], "3");
        // Numbers in their shortest exact form: parsed back, they are the values.
        let num = |r: usize, c: &str| rows[r][col(c)].parse::<f64>().unwrap();
        assert_eq!(
            num(0, "seg_miou_final_mean"),
            a.tasks[0].final_mean.unwrap()
        );
        assert_eq!(num(0, "seg_miou_final_std"), a.tasks[0].final_std.unwrap());
        assert!((num(0, "seg_miou_final_std") - 0.1).abs() < 1e-12);
        assert_eq!(rows[0][col("seeds")], "[0, 1, 2]");
        assert_eq!(rows[1][col("seeds")], "[0]");
        assert_eq!(rows[0][col("seg_n_pass")], "2");
        assert_eq!(rows[0][col("train_seconds_mean")], "20.0");
        assert_eq!(rows[1][col("seg_miou_final_std")], "");
        assert_eq!(rows[1][col("n_runs")], "3");
        assert!(!h.contains(&"seed".to_string()));

        let (h, rows) = index_table(&records);
        let col = |n: &str| {
            h.iter()
                .position(|c| c == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[4][col("status")], "failed");
        assert_eq!(rows[4][col("reason")], "boom");
        assert_eq!(rows[5][col("status")], "missing");
        assert_eq!(rows[2][col("seed")], "2");
        assert_eq!(rows[0][col("seg_miou_final")], "0.4");
        assert_eq!(rows[0][col("seg_verdict")], "forgot");
        assert_eq!(rows[0][col("pass")], "false");

        let text = summary_text(&aggs);
        assert!(text.contains("0.500 ± 0.100"), "{text}");
        assert!(text.contains("1/3"), "{text}");
    }
}
