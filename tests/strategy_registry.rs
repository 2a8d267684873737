//! A strategy added from outside the crate is one type and one `register` line: an L2 pull
//! toward the weights at the end of the previous stage, defined only in this file, owns its
//! `[l2]` table (defaults, unknown keys refused with file and line, its own checks), trains
//! through the unchanged loop, resumes bit-identically, and is switched off in the
//! single-task reference without the engine knowing its name.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use candle_core::Tensor;
use onehead::config::Experiment;
use onehead::model::info::is_running_stat;
use onehead::plugins::{BuildCtx, LossTerm, Plugin, PluginState, RunCtx, StepView, Strategy};
use onehead::registry::Registry;
use onehead::train::{resume_with, run_with, RunOptions, Stopped};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct L2Settings {
    /// Weight of `Σ (θ − θ_prev)²` (0 = off).
    lambda: f64,
}

struct L2 {
    lambda: f64,
    /// The trainable weights at the end of the latest stage.
    anchor: BTreeMap<String, Tensor>,
}

impl Plugin for L2 {
    fn name(&self) -> &str {
        "l2"
    }

    fn loss_terms(&self) -> Vec<String> {
        vec!["l2".into()]
    }

    fn loss(&mut self, ctx: &RunCtx, _step: &StepView) -> Result<Vec<LossTerm>> {
        if self.anchor.is_empty() {
            return Ok(vec![]);
        }
        let vars = ctx.varmap.data().lock().unwrap().clone();
        let mut sum: Option<Tensor> = None;
        for (name, anchor) in &self.anchor {
            let d = (vars[name].as_tensor() - anchor)?.sqr()?.sum_all()?;
            sum = Some(match sum {
                Some(s) => (s + d)?,
                None => d,
            });
        }
        Ok(sum
            .map(|s| LossTerm {
                name: "l2".into(),
                task: None,
                value: (s * self.lambda).unwrap(),
            })
            .into_iter()
            .collect())
    }

    fn after_stage(&mut self, ctx: &RunCtx, _rng: &mut ChaCha8Rng) -> Result<()> {
        self.anchor = onehead::model::tensors_of(ctx.varmap)?;
        self.anchor.retain(|n, _| !is_running_stat(n));
        Ok(())
    }

    fn state(&self) -> Result<PluginState> {
        Ok(PluginState {
            json: serde_json::Value::Null,
            tensors: self.anchor.clone(),
        })
    }

    fn load_state(&mut self, state: PluginState) -> Result<()> {
        self.anchor = state.tensors;
        Ok(())
    }
}

impl Strategy for L2 {
    const NAME: &'static str = "l2";
    type Settings = L2Settings;

    fn is_on(s: &L2Settings) -> bool {
        s.lambda > 0.0
    }

    fn validate(s: &L2Settings, _exp: &Experiment) -> Result<(), String> {
        if !(s.lambda >= 0.0 && s.lambda.is_finite()) {
            return Err(format!("l2.lambda = {} must be >= 0", s.lambda));
        }
        Ok(())
    }

    fn build(s: L2Settings, _ctx: &BuildCtx) -> Result<Self> {
        Ok(L2 {
            lambda: s.lambda,
            anchor: BTreeMap::new(),
        })
    }
}

fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.strategies.register::<L2>();
    r
}

fn write(dir: &Path, file: &str, l2: &str) -> std::path::PathBuf {
    let text = format!(
        "name = \"l2\"\nseed = 3\n{setup}\n[[stages]]\ntask = \"seg\"\nepochs = 1\nbatch_size = 4\n[[stages]]\ntask = \"det\"\nepochs = 2\nbatch_size = 4\n{l2}",
        setup = common::tiny_setup(dir),
    );
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_strategy_table_is_checked_by_its_own_strategy() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "l2.toml", "[l2]\nlambda = 0.5\n");
    // The built-in engine has no such strategy: the table is an error with its line.
    let msg = Registry::builtin().load(&p, &[]).unwrap_err().to_string();
    assert!(msg.contains("l2.toml") && msg.contains("[l2]"), "{msg}");
    let line = std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .position(|l| l == "[l2]")
        .unwrap()
        + 1;
    assert!(msg.contains(&format!("line {line}")), "{msg}");

    let reg = registry();
    let exp = reg.load(&p, &[]).unwrap();
    assert_eq!(exp.strategies["l2"]["lambda"].as_float(), Some(0.5));
    // Every built-in strategy's table is resolved too, at its defaults.
    assert_eq!(exp.strategies["replay"]["enabled"].as_bool(), Some(false));

    let typo = write(tmp.path(), "typo.toml", "[l2]\nlamda = 0.5\n");
    let msg = reg.load(&typo, &[]).unwrap_err().to_string();
    assert!(
        msg.contains("lamda") && msg.contains(&format!("line {}", line + 1)),
        "{msg}"
    );
    let negative = write(tmp.path(), "negative.toml", "[l2]\nlambda = -1.0\n");
    let msg = reg.load(&negative, &[]).unwrap_err().to_string();
    assert!(msg.contains("l2.lambda = -1"), "{msg}");
    // --set reaches it like any key; a reference mode refuses it while it is on.
    let msg = reg
        .load(&p, &["mode=\"joint\"".into()])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("reference run") && msg.contains("l2"), "{msg}");

    // The single-task reference switches it off without knowing it.
    let reference = reg.single_task_reference(&exp);
    assert_eq!(reference.strategies["l2"]["lambda"].as_float(), Some(0.0));
    assert!(reg.strategies.active(&reference).unwrap().is_empty());
    assert_eq!(reg.strategies.active(&exp).unwrap(), vec!["l2"]);
}

#[test]
fn a_registered_strategy_trains_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry();
    let exp = reg
        .load(&write(tmp.path(), "l2.toml", "[l2]\nlambda = 0.5\n"), &[])
        .unwrap();
    let quiet = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    let full = run_with(&exp, &reg, &quiet).unwrap();
    let (h, rows) = common::read_csv(&full.run_dir.join("epochs.csv"));
    let col = |n: &str| h.iter().position(|c| c == n).unwrap();
    let v = |r: usize| rows[r][col("loss_l2")].parse::<f64>().unwrap();
    assert_eq!(
        rows[0][col("loss_l2")],
        "",
        "no anchor during the first stage: no term, an empty cell"
    );
    assert!(v(2) > 0.0, "the pull is on once the first stage ended");
    // The run folder's config holds the resolved table and loads back equal.
    let stored = reg.load(&full.run_dir.join("config.toml"), &[]).unwrap();
    assert_eq!(stored, exp);

    // Stopped in the second stage, then resumed: the same epochs, to the last digit.
    let err = run_with(
        &exp,
        &reg,
        &RunOptions {
            stop_after_epochs: Some(2),
            ..quiet.clone()
        },
    )
    .unwrap_err();
    let dir = err.downcast_ref::<Stopped>().unwrap().run_dir.clone();
    resume_with(&dir, &reg, &quiet).unwrap();
    let (_, again) = common::read_csv(&dir.join("epochs.csv"));
    assert_eq!(again.len(), rows.len());
    for (a, b) in again.iter().zip(&rows) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if !common::is_timing(&h[i]) {
                assert_eq!(x, y, "{} differs after resume", h[i]);
            }
        }
    }
}
