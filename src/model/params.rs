//! Parameter groups for optimisers, and building a ready model in one call.

use std::path::Path;

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};

use super::info::is_running_stat;
use super::weights::{load_backbone, LoadReport};
use super::{OneHead, OneHeadConfig};

/// Trainable variables split for weight decay, each with its VarMap name, sorted by name
/// (deterministic order for optimiser state and exact resume).
#[derive(Debug, Clone, Default)]
pub struct ParamGroups {
    /// Conv weights (rank ≥ 2): decayed.
    pub decay: Vec<(String, Var)>,
    /// Biases and BatchNorm weight/bias (rank 1): not decayed.
    pub no_decay: Vec<(String, Var)>,
}

/// Trainable variables whose name starts with one of `prefixes` (all when empty), BatchNorm
/// running statistics excluded (they get no gradient and must not be decayed).
pub fn param_groups(varmap: &VarMap, prefixes: &[&str]) -> ParamGroups {
    let vars = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = vars
        .keys()
        .filter(|n| !is_running_stat(n))
        .filter(|n| prefixes.is_empty() || prefixes.iter().any(|p| n.starts_with(p)))
        .collect();
    names.sort();
    let mut g = ParamGroups::default();
    for name in names {
        let var = vars[name].clone();
        if var.rank() >= 2 {
            g.decay.push((name.clone(), var));
        } else {
            g.no_decay.push((name.clone(), var));
        }
    }
    g
}

/// A new VarMap with a randomly initialised model (f32, on `device`), and the backbone set
/// from `backbone_weights` (timm safetensors) when given.
pub fn build_model(
    cfg: &OneHeadConfig,
    device: &Device,
    backbone_weights: Option<&Path>,
) -> anyhow::Result<(VarMap, OneHead, Option<LoadReport>)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = OneHead::new(cfg, vb)?;
    let report = match backbone_weights {
        Some(path) => Some(load_backbone(&varmap, path, "backbone.")?),
        None => None,
    };
    Ok((varmap, model, report))
}
