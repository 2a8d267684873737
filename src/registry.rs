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

    /// The single-task reference of an experiment: each stage's task trained alone from the
    /// same initialisation with its stage's budget (epochs, batch, optimiser, schedule), all
    /// layers at full rate and every strategy off. Everything that cannot change what it
    /// learns is set to one value (name, seeds list, logging, the verdict's settings, and
    /// evaluation only at stage ends), so that every strategy of one benchmark and seed has
    /// the same reference ([`Registry::reference_key`]).
    pub fn single_task_reference(&self, exp: &Experiment) -> Experiment {
        let mut r = exp.clone();
        r.name = "single_task".into();
        r.mode = crate::config::Mode::SingleTask;
        r.seeds = None;
        self.strategies.all_off(&mut r);
        r.log = Default::default();
        r.eval = crate::config::EvalConfig {
            baseline: crate::config::BaselineKind::StageEnd,
            // Evaluated at stage ends only: that is all a baseline needs.
            every: r.stages.iter().map(|s| s.epochs).max().unwrap_or(1).max(1),
            batch_size: exp.eval.batch_size,
            ..Default::default()
        };
        for s in &mut r.stages {
            s.lr_scale = Default::default();
            s.freeze = crate::config::Freeze::None;
        }
        // Each task alone from the same initialisation does not depend on the order the
        // experiment learns them in; the stages go in registry order (seg, det, cls), so that
        // every task order of one benchmark and seed shares one reference.
        let names = self.tasks.names();
        let rank = |t: &str| names.iter().position(|n| *n == t).unwrap_or(usize::MAX);
        r.stages.sort_by_key(|s| rank(&s.task));
        r
    }

    /// The cache key of a single-task reference: a hash of its resolved config without the
    /// folder it is written to, so that any run or sweep that needs the same reference finds
    /// it again (`<results>/references/<key>/`). The strategies' tables are left out too:
    /// a reference has every strategy off, so they determine nothing, and a version that
    /// adds a strategy (or a setting of one) still finds the references trained before it.
    pub fn reference_key(reference: &Experiment) -> String {
        use sha2::Digest as _;
        let mut r = reference.clone();
        r.results_dir = Default::default();
        r.strategies.clear();
        let digest = sha2::Sha256::digest(r.to_toml().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "a"
seed = 1
[[stages]]
task = "seg"
epochs = 2
[[stages]]
task = "det"
epochs = 2
"#;

    fn key(text: &str) -> String {
        let r = Registry::builtin();
        let exp = r.parse(text, Path::new("x.toml"), &[]).unwrap();
        Registry::reference_key(&r.single_task_reference(&exp))
    }

    #[test]
    fn strategies_of_one_benchmark_and_seed_share_one_reference() {
        let control = key(BASE);
        // Another name, a strategy, slowed layers, frozen BatchNorm, other verdict settings:
        // none of it changes what the single-task reference learns.
        let replay = format!(
            "{}\n[replay]\nenabled = true\nimages_per_batch = 4\n[eval]\ntolerance = 0.1\nevery = 3\n",
            BASE.replace("name = \"a\"", "name = \"b\"")
                .replace("epochs = 2\n[[stages]]\ntask = \"det\"", "epochs = 2\n[[stages]]\ntask = \"det\"\nfreeze = \"backbone_bn\"")
        );
        assert_eq!(key(&replay), control);
        let lwf = format!("{BASE}\n[lwf]\nalpha = 2.0\n");
        assert_eq!(key(&lwf), control);
        // The seed, the data and a stage's budget do.
        assert_ne!(key(&BASE.replace("seed = 1", "seed = 2")), control);
        assert_ne!(key(&format!("{BASE}\n[data]\nsynth_seed = 5\n")), control);
        assert_ne!(key(&BASE.replacen("epochs = 2", "epochs = 3", 1)), control);
        // Nor does the order the tasks are learned in.
        let swapped = BASE
            .replace("task = \"seg\"", "task = \"tmp\"")
            .replace("task = \"det\"", "task = \"seg\"")
            .replace("task = \"tmp\"", "task = \"det\"");
        assert_ne!(swapped, BASE);
        assert_eq!(key(&swapped), control);
        // Nor does a strategy the version adds (its table, all off in a reference).
        let r = Registry::builtin();
        let exp = r.parse(BASE, Path::new("x.toml"), &[]).unwrap();
        let mut reference = r.single_task_reference(&exp);
        assert!(!reference.strategies.is_empty());
        reference.strategies.insert(
            "newcomer".into(),
            toml::Value::Table(toml::map::Map::from_iter([(
                "enabled".to_string(),
                toml::Value::Boolean(false),
            )])),
        );
        assert_eq!(Registry::reference_key(&reference), control);
        // The folder it is written to does not.
        assert_eq!(
            key(&format!("results_dir = \"elsewhere\"\n{BASE}")),
            control
        );
    }
}
