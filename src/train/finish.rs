//! The end of a run: judge every task against its baseline, write `summary.json` (verdicts,
//! the task × stage matrix, forgetting, parameters, latency, time), drop the resume state
//! and draw the pictures.

use std::path::PathBuf;

use anyhow::Result;

use super::launch::RunOutcome;
use super::session::Session;
use crate::config::BaselineKind;
use crate::metrics::bootstrap::{paired_drop, BootstrapSpec, Chance, DropInterval};
use crate::report::summary::ParamSummary;
use crate::report::{self, judge, Judging, RunSummary, TaskRef};

impl Session {
    /// Judge the run, write `summary.json`, drop the resume state.
    pub fn finish(self, train_seconds: f64) -> Result<RunOutcome> {
        let env = &self.env;
        let exp = &env.exp;
        let refs = env.task_refs()?;
        let judging = Judging {
            tolerance: exp.eval.tolerance,
            tolerance_kind: exp.eval.tolerance_kind,
            baseline: exp.baseline_kind(),
            chance_margin: exp.eval.chance_margin,
            confidence: exp.eval.confidence,
        };
        let verdict = &self.progress.verdict;
        let reference = self.single_task.as_ref().map(|(_, s)| s);
        let mut tasks = judge(&refs, &self.progress.history, verdict, &judging, reference)?;
        let clock = std::time::Instant::now();
        for (i, (t, r)) in tasks.iter_mut().zip(&refs).enumerate() {
            if let Some((d, files)) = self.bootstrap(r, i)? {
                *t = t.clone().with_interval(&d, &judging);
                t.scores = Some(files.map(|f| f.display().to_string()));
            }
        }
        tracing::debug!(
            "verdict intervals in {:.2} s",
            clock.elapsed().as_secs_f64()
        );
        let mut final_metrics = std::collections::BTreeMap::new();
        for t in &refs {
            if let Some(r) = verdict
                .iter()
                .filter(|r| r.task == t.task)
                .max_by_key(|r| r.global_epoch)
            {
                for (k, v) in &r.metrics {
                    final_metrics.insert(format!("{}_{k}", t.task), *v);
                }
            }
        }
        let matrix = self.write_matrix(env.stages.len())?;
        let stage_tasks = env.stage_tasks();
        let learned: Vec<usize> = matrix
            .tasks
            .iter()
            .map(|t| stage_tasks.iter().rposition(|s| s == t).unwrap_or(0))
            .collect();
        let forgetting =
            crate::metrics::forgetting::forgetting(&matrix.tasks, &matrix.values, &learned);
        let counts = crate::model::count_params(&env.varmap);
        let last = env.stages.len() - 1;
        let ctx = env.ctx(last, &self.progress.pools);
        let buffers = self
            .plugins
            .iter()
            .filter_map(|p| Some((p.name().to_string(), p.memory(&ctx)?)))
            .collect();
        let summary = RunSummary {
            name: exp.name.clone(),
            run_dir: self.run_dir.display().to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            git_commit: report::GIT_COMMIT.into(),
            seed: exp.seed,
            device: format!("{:?}", env.device),
            tolerance: exp.eval.tolerance,
            tolerance_kind: exp.eval.tolerance_kind,
            baseline_kind: exp.baseline_kind(),
            baseline_run: self
                .single_task
                .as_ref()
                .map(|(d, _)| d.display().to_string()),
            chance_margin: exp.eval.chance_margin,
            verdict_split: env.verdict_split().name().into(),
            confidence: exp.eval.confidence,
            resamples: exp.eval.resamples,
            pass: tasks.iter().all(|t| t.pass),
            tasks,
            final_metrics,
            matrix,
            forgetting,
            params: ParamSummary {
                total: counts.total,
                backbone: counts.backbone,
                neck: counts.neck,
                head: counts.head,
                used_in_forward: counts.used(),
            },
            buffers,
            latency_ms: crate::model::info::median_latency_ms(
                &env.model,
                exp.model.image_size,
                &env.device,
                10,
            )?,
            train_seconds,
            peak_rss_mib: crate::ops::peak_rss_mib(),
            started_at: report::utc_rfc3339(self.progress.started),
            finished_at: report::utc_rfc3339(report::now_secs()),
        };
        report::write_atomic(
            &self.run_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        // The resume state (model + optimiser moments) is only for unfinished runs: a
        // finished run keeps its per-stage checkpoints.
        let _ = std::fs::remove_dir_all(self.run_dir.join("state"));
        super::session::remove_partial_files(&self.run_dir)?;
        // Pictures are a view of the files just written: a failure to draw them is reported,
        // never a failed run (`onehead plot` redraws them).
        match report::draw_run(&self.run_dir) {
            Ok(files) => tracing::info!(
                "report: {} ({} files)",
                self.run_dir.join("report.html").display(),
                files.len()
            ),
            Err(e) => tracing::warn!("drawing the run's pictures failed: {e:#}"),
        }
        Ok(RunOutcome {
            run_dir: self.run_dir,
            summary,
        })
    }

    /// The paired bootstrap of task `r`'s drop from its baseline's per-image scores (the
    /// reference's, or this run's at the end of the task's stage) to its final ones; `None`
    /// without scores on both sides, with `[eval] resamples = 0`, or for `stage_best`
    /// (chosen on val, where no per-image scores are kept).
    fn bootstrap(&self, r: &TaskRef, index: usize) -> Result<Option<(DropInterval, [PathBuf; 2])>> {
        let exp = &self.env.exp;
        let baseline_file = match (exp.baseline_kind(), &self.single_task) {
            _ if exp.eval.resamples == 0 => return Ok(None),
            (BaselineKind::SingleTask, Some((dir, summary))) => {
                let Some(st) = summary.tasks.iter().find(|t| t.task == r.task) else {
                    return Ok(None);
                };
                report::scores_file(dir, st.stage, &r.task)
            }
            (BaselineKind::StageEnd, _) => report::scores_file(&self.run_dir, r.stage + 1, &r.task),
            _ => return Ok(None),
        };
        let Some(last) = self
            .progress
            .verdict
            .iter()
            .filter(|v| v.task == r.task)
            .max_by_key(|v| v.global_epoch)
        else {
            return Ok(None);
        };
        let final_file = report::scores_file(&self.run_dir, last.stage + 1, &r.task);
        let (Some(b), Some(f)) = (
            report::read_scores(&baseline_file)?,
            report::read_scores(&final_file)?,
        ) else {
            return Ok(None);
        };
        let spec = BootstrapSpec {
            resamples: exp.eval.resamples,
            confidence: exp.eval.confidence,
            // Its own stream per task, fixed by the run's seed.
            seed: exp.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64 + 1),
        };
        let chance_scores = self
            .env
            .tasks
            .get(&r.task)?
            .chance_scores(self.env.verdict_split());
        let chance = match &chance_scores {
            Some(c) if c.len() == b.len() => Chance::Scores(c),
            _ => Chance::Level(r.chance),
        };
        let d = paired_drop(&[(&b, &f)], &r.metric, chance, &spec)?;
        Ok(Some((d, [baseline_file, final_file])))
    }
}
