//! Pretrained backbone weights: where they come from ([`WeightsSpec`], [`resolve`]) and how they
//! enter the model ([`load_backbone`]).
//!
//! The backbone's tensor names are timm's `mobilenetv3_small_100`, so the hub file
//! `timm/mobilenetv3_small_100.lamb_in1k/model.safetensors` loads by name under `backbone.`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// The default pretrained backbone.
pub const DEFAULT_REPO: &str = "timm/mobilenetv3_small_100.lamb_in1k";
/// The default file inside a hub repo.
pub const DEFAULT_FILE: &str = "model.safetensors";

/// Where the backbone weights come from. Parsed from / printed as a string:
/// `hf:<owner/name>[@rev][/file]` (file defaults to `model.safetensors`), a local path ending
/// in `.safetensors`, or `none` (random init).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSpec {
    Hub {
        repo: String,
        revision: Option<String>,
        file: String,
    },
    File(PathBuf),
    None,
}

impl Default for WeightsSpec {
    /// `hf:timm/mobilenetv3_small_100.lamb_in1k`.
    fn default() -> Self {
        WeightsSpec::Hub {
            repo: DEFAULT_REPO.to_string(),
            revision: None,
            file: DEFAULT_FILE.to_string(),
        }
    }
}

impl FromStr for WeightsSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("none") {
            return Ok(WeightsSpec::None);
        }
        if let Some(rest) = s.strip_prefix("hf:") {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.iter().any(|p| p.is_empty()) {
                bail!("weights spec {s:?}: empty path component; expected hf:<owner/name>[@rev][/file]")
            }
            // The repo is `owner/name` (or a bare `name`); `@rev` may follow the name.
            let (repo_parts, file_parts) = if parts.len() >= 2 {
                parts.split_at(2)
            } else {
                parts.split_at(1)
            };
            let mut repo = repo_parts.join("/");
            let mut revision = None;
            if let Some((r, rev)) = repo.clone().split_once('@') {
                if rev.is_empty() {
                    bail!("weights spec {s:?}: empty revision after '@'")
                }
                revision = Some(rev.to_string());
                repo = r.to_string();
            }
            let file = if file_parts.is_empty() {
                DEFAULT_FILE.to_string()
            } else {
                file_parts.join("/")
            };
            return Ok(WeightsSpec::Hub {
                repo,
                revision,
                file,
            });
        }
        if s.ends_with(".safetensors") {
            return Ok(WeightsSpec::File(PathBuf::from(s)));
        }
        bail!(
            "weights spec {s:?} not understood: use `hf:<owner/name>[@rev][/file]`, a path to a .safetensors file, or `none`"
        )
    }
}

impl fmt::Display for WeightsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsSpec::None => write!(f, "none"),
            WeightsSpec::File(p) => write!(f, "{}", p.display()),
            WeightsSpec::Hub {
                repo,
                revision,
                file,
            } => {
                write!(f, "hf:{repo}")?;
                if let Some(rev) = revision {
                    write!(f, "@{rev}")?;
                }
                if file != DEFAULT_FILE {
                    write!(f, "/{file}")?;
                }
                Ok(())
            }
        }
    }
}

impl serde::Serialize for WeightsSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for WeightsSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How to reach the hub. [`HubOptions::from_env`] reads `HF_ENDPOINT`, `HF_HOME` (through
/// hf-hub) and `HF_HUB_OFFLINE=1` (cache only; hf-hub 0.5 does not read it by itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// e.g. `http://127.0.0.1:8080`; `None`: `HF_ENDPOINT` or `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// The hub cache (`$HF_HOME/hub`); `None`: hf-hub's choice from the environment.
    pub cache_dir: Option<PathBuf>,
    /// Use only the local cache.
    pub offline: bool,
    /// Show a download progress bar.
    pub progress: bool,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        Self {
            endpoint: None,
            cache_dir: None,
            offline,
            progress: true,
        }
    }
}

/// File name a hub spec is pinned under: `<repo with '/' as '-'>.safetensors`.
pub fn pin_file_name(repo: &str) -> String {
    format!("{}.safetensors", repo.replace('/', "-"))
}

/// Resolve `spec` to a local file (`None` for random init), with [`HubOptions::from_env`].
/// With `pin_dir`, a hub file is also copied to `pin_dir/<repo-with-dashes>.safetensors`
/// and that path is returned.
pub fn resolve(spec: &WeightsSpec, pin_dir: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    resolve_with(spec, pin_dir, &HubOptions::from_env())
}

/// [`resolve`] with explicit hub options.
pub fn resolve_with(
    spec: &WeightsSpec,
    pin_dir: Option<&Path>,
    opts: &HubOptions,
) -> anyhow::Result<Option<PathBuf>> {
    let (repo, revision, file) = match spec {
        WeightsSpec::None => return Ok(None),
        WeightsSpec::File(p) => {
            if !p.is_file() {
                bail!("weights file {} does not exist", p.display())
            }
            return Ok(Some(p.clone()));
        }
        WeightsSpec::Hub {
            repo,
            revision,
            file,
        } => (repo, revision, file),
    };
    let hub_repo = match revision {
        Some(rev) => Repo::with_revision(repo.clone(), RepoType::Model, rev.clone()),
        None => Repo::new(repo.clone(), RepoType::Model),
    };
    let fetched = if opts.offline {
        let cache = match &opts.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        };
        cache.repo(hub_repo).get(file).with_context(|| {
            format!(
                "HF_HUB_OFFLINE is set and {spec} is not in the hub cache {}; fetch it once online, or pass a local .safetensors path",
                cache.path().display()
            )
        })?
    } else {
        let mut builder = ApiBuilder::from_env().with_progress(opts.progress);
        if let Some(e) = &opts.endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        if let Some(dir) = &opts.cache_dir {
            builder = builder.with_cache_dir(dir.clone());
        }
        let api = builder.build().context("building the hub client")?;
        api.repo(hub_repo).get(file).with_context(|| {
            format!(
                "fetching {spec} from the hub failed (no network? set HF_ENDPOINT for a mirror, HF_HUB_OFFLINE=1 to use only the cache, or pass a local .safetensors path)"
            )
        })?
    };
    match pin_dir {
        None => Ok(Some(fetched)),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            let pinned = dir.join(pin_file_name(repo));
            std::fs::copy(&fetched, &pinned).with_context(|| {
                format!("copying {} to {}", fetched.display(), pinned.display())
            })?;
            Ok(Some(pinned))
        }
    }
}

/// What [`load_backbone`] did, by tensor name (names as in the file, without the prefix).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Set into the VarMap.
    pub loaded: Vec<String>,
    /// In the file, not in the model, skipped on purpose (`conv_head.*`, `classifier.*`,
    /// `*.num_batches_tracked`).
    pub ignored: Vec<String>,
    /// In the file, not in the model, not expected to be there either.
    pub unexpected: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loaded {} tensors, ignored {} (classifier head), unexpected {}",
            self.loaded.len(),
            self.ignored.len(),
            self.unexpected.len()
        )?;
        if !self.unexpected.is_empty() {
            write!(f, ": {}", self.unexpected.join(", "))?;
        }
        Ok(())
    }
}

fn ignored_on_purpose(name: &str) -> bool {
    name.starts_with("conv_head.")
        || name.starts_with("classifier.")
        || name.ends_with("num_batches_tracked")
}

/// Set every VarMap variable under `prefix` (e.g. `"backbone."`) from the safetensors file at
/// `path`, whose names are the variables' names without the prefix (timm layout).
///
/// Errors (and changes nothing) when a variable under `prefix` is absent from the file or a
/// tensor's shape differs; tensors are converted to each variable's dtype and device.
pub fn load_backbone(varmap: &VarMap, path: &Path, prefix: &str) -> anyhow::Result<LoadReport> {
    let file: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading weights {}", path.display()))?;
    let vars = varmap.data().lock().expect("VarMap lock poisoned");
    let wanted: BTreeMap<&str, _> = vars
        .iter()
        .filter_map(|(name, var)| name.strip_prefix(prefix).map(|short| (short, var)))
        .collect();
    if wanted.is_empty() {
        bail!("no model variables under {prefix:?}: build the model before loading weights")
    }
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (short, var) in &wanted {
        match file.get(*short) {
            None => missing.push(short.to_string()),
            Some(t) if t.dims() != var.dims() => misshaped.push(format!(
                "{prefix}{short}: file has {:?}, model wants {:?}",
                t.dims(),
                var.dims()
            )),
            Some(_) => {}
        }
    }
    if !misshaped.is_empty() {
        bail!(
            "weights {}: {} tensor(s) have the wrong shape (is this a mobilenetv3_small_100 checkpoint?): {}",
            path.display(),
            misshaped.len(),
            misshaped.join("; ")
        )
    }
    if !missing.is_empty() {
        bail!(
            "weights {}: {} backbone tensor(s) missing (is this a timm mobilenetv3_small_100 checkpoint?): {}",
            path.display(),
            missing.len(),
            missing.join(", ")
        )
    }
    let mut report = LoadReport::default();
    for (short, var) in &wanted {
        let t = &file[*short];
        let t = t
            .to_dtype(var.dtype())?
            .to_device(var.device())
            .with_context(|| format!("moving {prefix}{short} to the model's device"))?;
        var.set(&t)
            .with_context(|| format!("setting {prefix}{short}"))?;
        report.loaded.push(short.to_string());
    }
    let mut extra: Vec<&String> = file
        .keys()
        .filter(|k| !wanted.contains_key(k.as_str()))
        .collect();
    extra.sort();
    for k in extra {
        if ignored_on_purpose(k) {
            report.ignored.push(k.clone());
        } else {
            report.unexpected.push(k.clone());
        }
    }
    Ok(report)
}
