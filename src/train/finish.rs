//! The end of a run: judge every task against its baseline, write `summary.json` (verdicts,
//! the task × stage matrix, forgetting, parameters, latency, time), drop the resume state
//! and draw the pictures.

use anyhow::Result;

use super::launch::RunOutcome;
use super::session::Session;
use crate::report::summary::ParamSummary;
use crate::report::{self, judge, Judging, RunSummary};

impl Session {
    /// Judge the run, write `summary.json`, drop the resume state.
    pub fn finish(self, train_seconds: f64) -> Result<RunOutcome> {
        let env = &self.env;
        let exp = &env.exp;
        let refs = env.task_refs()?;
        let judging = Judging {
            tolerance: exp.eval.tolerance,
            tolerance_kind: exp.eval.tolerance_kind,
            baseline: exp.eval.baseline,
            chance_margin: exp.eval.chance_margin,
        };
        let history = &self.progress.history;
        let single = self.single_task.as_ref().map(|(_, b)| b);
        let tasks = judge(&refs, history, &judging, single)?;
        let mut final_metrics = std::collections::BTreeMap::new();
        for t in &refs {
            if let Some(r) = history
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
        let summary = RunSummary {
            name: exp.name.clone(),
            run_dir: self.run_dir.display().to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            git_commit: report::GIT_COMMIT.into(),
            seed: exp.seed,
            device: format!("{:?}", env.device),
            tolerance: exp.eval.tolerance,
            tolerance_kind: exp.eval.tolerance_kind,
            baseline_kind: exp.eval.baseline,
            baseline_run: self
                .single_task
                .as_ref()
                .map(|(d, _)| d.display().to_string()),
            chance_margin: exp.eval.chance_margin,
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
}
