//! What an engine knows: its tasks and its strategies, by name. Loading an experiment file
//! goes through here, because checking it needs both: stage tasks must be registered tasks,
//! and every strategy table must belong to a registered strategy and pass its checks.
//! `Registry::builtin()` knows `seg`, `det`, `cls` and the built-in strategies; a library
//! user adds more (`registry.tasks.register(…)`, `registry.strategies.register::<S>()`).

use std::path::Path;

use crate::config::{ConfigError, Experiment};

pub struct Registry {
    pub tasks: crate::tasks::Registry,
    pub strategies: crate::plugins::Registry,
}

impl Registry {
    pub fn builtin() -> Self {
        Self {
            tasks: crate::tasks::Registry::builtin(),
            strategies: crate::plugins::Registry::builtin(),
        }
    }

    /// Read `path`, apply `key=value` overrides, fill in every default and check it all,
    /// before any training.
    pub fn load(&self, path: &Path, overrides: &[String]) -> Result<Experiment, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.parse(&text, path, overrides)
    }

    /// [`Registry::load`] of a file's text (`path` names it in errors).
    pub fn parse(
        &self,
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<Experiment, ConfigError> {
        let mut exp = Experiment::from_toml_str(text, path, overrides)?;
        exp.validate(path)?;
        exp.validate_task_names(path, &self.tasks.names())?;
        self.check_task_settings(&exp, path, text)?;
        self.check_verdict_metrics(&exp, path, text)?;
        self.strategies.resolve(&mut exp, path, text)?;
        Ok(exp)
    }

    /// `[eval] metric`: each named metric is one its task reports (for tasks that declare
    /// their metrics; the others are checked once their data is open).
    fn check_verdict_metrics(
        &self,
        exp: &Experiment,
        path: &Path,
        text: &str,
    ) -> Result<(), ConfigError> {
        for (task, metric) in &exp.eval.metric {
            let Some(known) = self.tasks.metrics(task) else {
                continue;
            };
            if !known.contains(metric) {
                let line = crate::config::line_of(text, Some("eval"), "metric")
                    .map(|l| format!(" (line {l})"))
                    .unwrap_or_default();
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "eval.metric: task '{task}' has no metric '{metric}' (it has {}){line}",
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// Every `[tasks.<name>]` table through its task's check; errors name the file and, where
    /// the message names a key, its line.
    fn check_task_settings(
        &self,
        exp: &Experiment,
        path: &Path,
        text: &str,
    ) -> Result<(), ConfigError> {
        for (name, table) in &exp.tasks {
            if let Err(e) = self.tasks.check_settings(name, table) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: crate::config::with_line(
                        format!("{e:#}"),
                        text,
                        &format!("tasks.{name}"),
                    ),
                });
            }
        }
        Ok(())
    }

    /// The single-task reference of a sequential experiment: each stage's task trained alone
    /// from the same initialisation with its stage's budget (epochs, batch, optimiser,
    /// schedule), all layers at full rate and every strategy off. Named `<name>__single_task`.
    pub fn single_task_reference(&self, exp: &Experiment) -> Experiment {
        let mut r = exp.clone();
        r.name = format!("{}__single_task", exp.name);
        r.mode = crate::config::Mode::SingleTask;
        r.seeds = None;
        self.strategies.all_off(&mut r);
        r.eval.baseline = crate::config::BaselineKind::StageEnd;
        for s in &mut r.stages {
            s.lr_scale = Default::default();
            s.freeze = crate::config::Freeze::None;
        }
        r
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}
