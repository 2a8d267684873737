//! The run state saved after every epoch (and when a run is interrupted mid-epoch), so that
//! an interrupted run continues where it stopped (`onehead resume RUN_DIR`) and ends exactly
//! as an uninterrupted run would on the same device: every random draw comes from one
//! ChaCha RNG whose state is saved, and the model, BatchNorm statistics, optimiser moments
//! and plug-in state (JSON and tensors) are saved with it.
//!
//! Layout inside a run folder: `state/state.json` (written last, atomically: it is the commit
//! point) naming `state/<tensors>.safetensors` (model variables under their own names,
//! optimiser state under `optim.`, plug-in tensors under `plugin.<i>.<name>.`). Older tensor
//! files are removed once the JSON points past them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::report::{self, EvalRecord};

const OPTIM_PREFIX: &str = "optim.";
const PLUGIN_PREFIX: &str = "plugin.";

/// Where in an epoch an interrupted run stopped (the epoch's shuffled order, the steps
/// done and the running loss sums), so that it continues with the next step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// 1-based epoch within the stage.
    pub epoch: usize,
    pub order: Vec<usize>,
    pub steps_done: usize,
    /// Sum over the steps done of each loss term, by CSV column name.
    pub sums: BTreeMap<String, f64>,
    /// Seconds spent in the epoch before the interruption.
    pub seconds: f64,
    /// Of those, the seconds spent assembling batches and computing steps (absent in
    /// states of older versions: the split then counts the resumed part only).
    #[serde(default)]
    pub data_seconds: f64,
    #[serde(default)]
    pub step_seconds: f64,
}

/// Everything besides tensors that the training loop needs to continue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// onehead version that wrote the state (a state of another layout is refused).
    pub version: String,
    /// Stage index (0-based) the run is in.
    pub stage: usize,
    /// Last completed epoch within `stage` (1-based; 0 = none yet).
    pub epoch: usize,
    /// Completed epochs over the whole run.
    pub global_epoch: usize,
    /// The run's RNG at this point.
    pub rng: ChaCha8Rng,
    /// The training indices of every stage started so far.
    pub pools: Vec<Vec<usize>>,
    /// Every evaluation so far.
    pub history: Vec<EvalRecord>,
    /// The stage-end evaluations on the verdict's split (absent in states of older
    /// versions).
    #[serde(default)]
    pub verdict: Vec<EvalRecord>,
    /// One JSON value per plug-in, in hook order.
    pub plugins: Vec<serde_json::Value>,
    /// Set when the run was interrupted inside an epoch.
    pub partial: Option<PartialEpoch>,
    /// Training seconds spent so far (over all sessions of the run).
    pub train_seconds: f64,
    /// Unix seconds when the run first started.
    pub started: u64,
    /// Tensor file (relative to the state folder).
    pub tensors: String,
    /// The resolved experiment (`config.toml`'s text) the run trained with, so that a resume
    /// notices a `config.toml` edited since (absent in states of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

fn state_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("state")
}

/// Tensors saved with a state besides the model: the optimiser's and each plug-in's.
#[derive(Debug, Default)]
pub struct ExtraTensors {
    pub optim: BTreeMap<String, Tensor>,
    /// Per plug-in (hook order): its named tensors.
    pub plugins: Vec<BTreeMap<String, Tensor>>,
}

/// Save `state` with the model variables, the optimiser state and plug-in tensors.
pub fn save(run_dir: &Path, state: &RunState, varmap: &VarMap, extra: &ExtraTensors) -> Result<()> {
    let dir = state_dir(run_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    for (k, t) in &extra.optim {
        tensors.insert(format!("{OPTIM_PREFIX}{k}"), t.clone());
    }
    for (i, p) in extra.plugins.iter().enumerate() {
        for (k, t) in p {
            tensors.insert(format!("{PLUGIN_PREFIX}{i}.{k}"), t.clone());
        }
    }
    let file = dir.join(&state.tensors);
    let tmp = dir.join(format!(".{}.tmp", state.tensors));
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &file)?;
    let previous = load_json(run_dir).ok().map(|s| s.tensors);
    report::write_atomic(
        &dir.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    if let Some(prev) = previous.filter(|p| *p != state.tensors) {
        let _ = std::fs::remove_file(dir.join(prev));
    }
    Ok(())
}

fn load_json(run_dir: &Path) -> Result<RunState> {
    let path = state_dir(run_dir).join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} not found: the run did not finish an epoch, so there is nothing to resume (start it again with `onehead run`)",
            path.display()
        )
    })?;
    let state: RunState = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a readable run state (edited, truncated, or written by another onehead version)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        state.version == env!("CARGO_PKG_VERSION"),
        "{} was written by onehead {}; this is {}: resume it with that version",
        path.display(),
        state.version,
        env!("CARGO_PKG_VERSION")
    );
    Ok(state)
}

/// Load the saved state and copy the model variables into `varmap`; returns the optimiser
/// and plug-in tensors (names without their prefixes).
pub fn load(run_dir: &Path, varmap: &VarMap, device: &Device) -> Result<(RunState, ExtraTensors)> {
    let state = load_json(run_dir)?;
    let file = state_dir(run_dir).join(&state.tensors);
    let tensors = candle_core::safetensors::load(&file, device)
        .with_context(|| format!("reading {}", file.display()))?;
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .with_context(|| format!("{} lacks the variable {name}", file.display()))?;
        var.set(t)
            .with_context(|| format!("restoring {name} from {}", file.display()))?;
    }
    let mut extra = ExtraTensors {
        plugins: vec![BTreeMap::new(); state.plugins.len()],
        ..Default::default()
    };
    for (k, t) in tensors {
        if let Some(k) = k.strip_prefix(OPTIM_PREFIX) {
            extra.optim.insert(k.to_string(), t);
        } else if let Some(rest) = k.strip_prefix(PLUGIN_PREFIX) {
            let (i, name) = rest
                .split_once('.')
                .with_context(|| format!("{}: bad plug-in tensor name {k}", file.display()))?;
            let i: usize = i
                .parse()
                .ok()
                .filter(|&i| i < extra.plugins.len())
                .with_context(|| format!("{}: plug-in tensor {k} of no plug-in", file.display()))?;
            extra.plugins[i].insert(name.to_string(), t);
        }
    }
    Ok((state, extra))
}
