//! The run state saved after every epoch, so that an interrupted run continues where it
//! stopped (`onehead resume RUN_DIR`) and ends exactly as an uninterrupted run would on the
//! same device: every random draw comes from one ChaCha RNG whose state is saved, and the
//! model, BatchNorm statistics, optimiser moments and strategy state are saved with it.
//!
//! Layout inside a run folder: `state/state.json` (written last, atomically: it is the commit
//! point) naming `state/epoch-<N>.safetensors` (model variables under their own names,
//! optimiser state under `optim.`). Older tensor files are removed once the JSON points past
//! them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::report;
use crate::train::tasks::TaskMetrics;
use crate::TaskKind;

const OPTIM_PREFIX: &str = "optim.";

/// Everything besides tensors that the training loop needs to continue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// Stage index of the last completed epoch.
    pub stage: usize,
    /// 1-based epoch (within `stage`) of the last completed epoch.
    pub epoch: usize,
    pub global_epoch: usize,
    /// The run's RNG after that epoch.
    pub rng: ChaCha8Rng,
    /// The stage's training indices (a seeded subset when `train_limit` is set).
    pub pool: Vec<usize>,
    pub baselines: BTreeMap<TaskKind, f64>,
    pub latest: BTreeMap<TaskKind, TaskMetrics>,
    /// One JSON value per strategy, in hook order.
    pub strategies: Vec<serde_json::Value>,
    /// Training seconds spent so far (over all sessions of the run).
    pub train_seconds: f64,
    /// Unix seconds when the run first started.
    pub started: u64,
    /// Tensor file (relative to the state folder).
    pub tensors: String,
}

fn state_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("state")
}

/// Save `state` with the model variables and the optimiser state.
pub fn save(
    run_dir: &Path,
    state: &RunState,
    varmap: &VarMap,
    optim: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let dir = state_dir(run_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    for (k, t) in optim {
        tensors.insert(format!("{OPTIM_PREFIX}{k}"), t.clone());
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
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}

/// Load the saved state, copy the model variables into `varmap`, and return the optimiser
/// state (names without the `optim.` prefix).
pub fn load(
    run_dir: &Path,
    varmap: &VarMap,
    device: &Device,
) -> Result<(RunState, BTreeMap<String, Tensor>)> {
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
    let optim = tensors
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix(OPTIM_PREFIX).map(|k| (k.to_string(), t)))
        .collect();
    Ok((state, optim))
}
