//! Strategies by name: each anti-forgetting strategy is one file that implements
//! [`Strategy`] (its TOML table, its settings with defaults, its checks, when it is on, how
//! it is built) and one line in `Registry::builtin` (in `plugins/mod.rs`, beside the
//! strategies' modules). Nothing else in the engine names a strategy: the config keeps each
//! strategy's table as it was written, this registry resolves and checks it, and reference
//! runs switch every strategy off through [`Registry::all_off`] without knowing any of them.
//!
//! A strategy's table sits at the top level of the experiment file (`[replay]`, `[lwf]`…),
//! like the schema's own tables; a table that is neither is an error naming the file and line.

use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use candle_nn::VarMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Plugin;
use crate::config::{ConfigError, Experiment, Mode};

/// What a strategy is built from, besides its settings.
pub struct BuildCtx<'a> {
    pub exp: &'a Experiment,
    /// The run's variables as initialised (before any training).
    pub varmap: &'a VarMap,
    pub device: &'a Device,
}

/// One anti-forgetting strategy: a [`Plugin`] with its own `[NAME]` table.
pub trait Strategy: Plugin + Sized + 'static {
    /// The TOML table that configures it, e.g. `"replay"` for `[replay]`.
    const NAME: &'static str;
    /// Its settings: every field with a default (`#[serde(default)]`), unknown keys refused
    /// (`#[serde(deny_unknown_fields)]`). The defaults must leave the strategy off.
    type Settings: Serialize + DeserializeOwned + Default + Clone;
    /// Whether a reference run (`mode = "joint"` or `"single_task"`) may have it on; the
    /// single-task baselines switch every strategy off regardless.
    const IN_REFERENCE_RUNS: bool = false;

    /// Whether these settings turn the strategy on (a reference run needs them off).
    fn is_on(settings: &Self::Settings) -> bool;

    /// Checks that need the rest of the experiment (stage tasks…), before any training.
    /// The message names the key (`replay.tasks: …`); the registry adds the file.
    fn validate(_settings: &Self::Settings, _exp: &Experiment) -> Result<(), String> {
        Ok(())
    }

    fn build(settings: Self::Settings, ctx: &BuildCtx) -> Result<Self>;
}

/// A strategy with its types erased, as the registry holds it.
trait Entry: Send + Sync {
    fn name(&self) -> &'static str;
    /// The table with every default filled in (`None`: the file has no such table).
    fn resolve(&self, table: Option<&toml::Value>) -> Result<toml::Value, String>;
    fn defaults(&self) -> toml::Value;
    fn is_on(&self, table: &toml::Value) -> Result<bool, String>;
    fn in_reference_runs(&self) -> bool;
    fn validate(&self, table: &toml::Value, exp: &Experiment) -> Result<(), String>;
    fn build(&self, table: &toml::Value, ctx: &BuildCtx) -> Result<Box<dyn Plugin>>;
}

struct Typed<S>(std::marker::PhantomData<fn() -> S>);

impl<S: Strategy> Typed<S> {
    fn settings(&self, table: &toml::Value) -> Result<S::Settings, String> {
        table
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| format!("[{}]: {}", S::NAME, e.message().trim_end()))
    }
}

impl<S: Strategy> Entry for Typed<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }
    fn resolve(&self, table: Option<&toml::Value>) -> Result<toml::Value, String> {
        let settings = match table {
            Some(t) => self.settings(t)?,
            None => S::Settings::default(),
        };
        toml::Value::try_from(&settings).map_err(|e| format!("[{}]: {e}", S::NAME))
    }
    fn defaults(&self) -> toml::Value {
        toml::Value::try_from(S::Settings::default()).expect("strategy settings serialise")
    }
    fn is_on(&self, table: &toml::Value) -> Result<bool, String> {
        Ok(S::is_on(&self.settings(table)?))
    }
    fn in_reference_runs(&self) -> bool {
        S::IN_REFERENCE_RUNS
    }
    fn validate(&self, table: &toml::Value, exp: &Experiment) -> Result<(), String> {
        S::validate(&self.settings(table)?, exp)
    }
    fn build(&self, table: &toml::Value, ctx: &BuildCtx) -> Result<Box<dyn Plugin>> {
        let settings = self.settings(table).map_err(anyhow::Error::msg)?;
        Ok(Box::new(S::build(settings, ctx)?))
    }
}

/// The strategies an engine knows (the built-in ones: `Registry::builtin`), in hook order:
/// a step's extra batches and loss terms come in this order, weighting strategies last so
/// that they see every term.
pub struct Registry {
    entries: Vec<Box<dyn Entry>>,
}

impl Registry {
    pub fn new() -> Self {
        Self { entries: vec![] }
    }

    /// Add a strategy after the existing ones (or replace one of the same name in place).
    pub fn register<S: Strategy>(&mut self) {
        let entry: Box<dyn Entry> = Box::new(Typed::<S>(std::marker::PhantomData));
        match self.entries.iter_mut().find(|e| e.name() == S::NAME) {
            Some(e) => *e = entry,
            None => self.entries.push(entry),
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name()).collect()
    }

    /// Fill every strategy's table of `exp` with its defaults (absent tables included) and
    /// check them; `text` is the file as written, to point errors at a line.
    pub fn resolve(
        &self,
        exp: &mut Experiment,
        path: &Path,
        text: &str,
    ) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if let Some(unknown) = exp
            .strategies
            .keys()
            .find(|k| !self.names().contains(&k.as_str()))
        {
            let line = crate::config::line_of(text, None, unknown)
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default();
            return Err(bad(format!(
                "unknown table [{unknown}]{line}: not part of the schema and no strategy of that name (strategies: {})",
                self.names().join(", ")
            )));
        }
        for e in &self.entries {
            let resolved = e
                .resolve(exp.strategies.get(e.name()))
                .map_err(|m| bad(crate::config::with_line(m, text, e.name())))?;
            exp.strategies.insert(e.name().to_string(), resolved);
        }
        self.validate(exp, path)
    }

    /// The checks of every strategy, and that reference runs have none on.
    pub fn validate(&self, exp: &Experiment, path: &Path) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut on = Vec::new();
        for (e, table) in self.tables(exp) {
            e.validate(&table, exp).map_err(bad)?;
            if e.is_on(&table).map_err(bad)? && !e.in_reference_runs() {
                on.push(e.name());
            }
        }
        if exp.mode != Mode::Sequential && !on.is_empty() {
            return Err(bad(format!(
                "mode = {:?} is a reference run: it takes no anti-forgetting strategy (turn off: {})",
                exp.mode,
                on.join(", ")
            )));
        }
        Ok(())
    }

    /// `exp` with every strategy at its defaults, i.e. off (for reference runs).
    pub fn all_off(&self, exp: &mut Experiment) {
        exp.strategies = self
            .entries
            .iter()
            .map(|e| (e.name().to_string(), e.defaults()))
            .collect();
    }

    /// The strategies `exp` turns on, with their tables, in registry order.
    fn on<'a>(&'a self, exp: &Experiment) -> Result<Vec<(&'a dyn Entry, toml::Value)>> {
        let mut out = Vec::new();
        for (e, table) in self.tables(exp) {
            if e.is_on(&table).map_err(anyhow::Error::msg)? {
                out.push((e, table));
            }
        }
        Ok(out)
    }

    /// Every strategy with its table in `exp` (its defaults when absent), in registry order.
    fn tables<'a>(&'a self, exp: &Experiment) -> Vec<(&'a dyn Entry, toml::Value)> {
        self.entries
            .iter()
            .map(|e| {
                let table = exp.strategies.get(e.name()).cloned();
                (e.as_ref(), table.unwrap_or_else(|| e.defaults()))
            })
            .collect()
    }

    /// The names of the strategies `exp` turns on, in registry order.
    pub fn active(&self, exp: &Experiment) -> Result<Vec<&'static str>> {
        Ok(self.on(exp)?.into_iter().map(|(e, _)| e.name()).collect())
    }

    /// The plug-ins of the strategies `exp` turns on, in registry order.
    pub fn build(&self, ctx: &BuildCtx) -> Result<Vec<Box<dyn Plugin>>> {
        self.on(ctx.exp)?
            .into_iter()
            .map(|(e, table)| e.build(&table, ctx))
            .collect()
    }
}

/// The settings of strategy `S` in `exp` (its defaults when the table is absent).
pub fn settings<S: Strategy>(exp: &Experiment) -> Result<S::Settings> {
    match exp.strategies.get(S::NAME) {
        Some(t) => Typed::<S>(std::marker::PhantomData)
            .settings(t)
            .map_err(anyhow::Error::msg),
        None => Ok(S::Settings::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_strategy_is_off_at_its_defaults() {
        let r = Registry::builtin();
        assert_eq!(
            r.names(),
            ["replay", "der", "agem", "lwf", "ewc", "uncertainty"]
        );
        for e in &r.entries {
            assert_eq!(
                e.is_on(&e.defaults()),
                Ok(false),
                "{} is on by default",
                e.name()
            );
            // Resolving an absent table gives the defaults.
            assert_eq!(e.resolve(None).unwrap(), e.defaults());
        }
    }
}
