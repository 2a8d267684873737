//! `onehead info`: parameter counts, output shapes and batch-1 inference latency.

use std::fmt;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{OneHead, OneHeadConfig};

/// Trainable parameter counts (BatchNorm running statistics excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamCounts {
    pub total: usize,
    /// `backbone.*`
    pub backbone: usize,
    /// `fpn.*`
    pub neck: usize,
    /// `head.*`
    pub head: usize,
    /// Parameters the forward pass never reads: the FPN's coarser output convolutions,
    /// kept for torchvision's layout and the report's parameter count (see
    /// [`super::fpn::feeds_nothing`]).
    pub unused: usize,
}

impl ParamCounts {
    /// Parameters the forward pass reads.
    pub fn used(&self) -> usize {
        self.total - self.unused
    }
}

/// The original report's parameter count: this model's plus an unused `Linear(1, 10)`.
pub const REPORT_PARAMS: usize = 1_605_602;

/// True for BatchNorm running statistics (saved with the model, never trained).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Count the VarMap's parameters by part; names outside the three parts count in `total` only.
pub fn count_params(varmap: &VarMap) -> ParamCounts {
    let vars = varmap.data().lock().expect("VarMap lock poisoned");
    let mut c = ParamCounts::default();
    for (name, var) in vars.iter() {
        if is_running_stat(name) {
            continue;
        }
        let n = var.elem_count();
        c.total += n;
        if super::fpn::feeds_nothing(name) {
            c.unused += n;
        }
        if name.starts_with("backbone.") {
            c.backbone += n;
        } else if name.starts_with("fpn.") {
            c.neck += n;
        } else if name.starts_with("head.") {
            c.head += n;
        }
    }
    c
}

/// What `onehead info` prints.
#[derive(Debug, Clone)]
pub struct InfoReport {
    pub config: OneHeadConfig,
    pub image_size: usize,
    pub device: String,
    pub params: ParamCounts,
    /// `(name, dims)` of the outputs for a batch of 1.
    pub output_shapes: Vec<(String, Vec<usize>)>,
    /// Median per-image latency, batch 1, eval mode, after warm-up.
    pub latency_ms: f64,
    pub latency_runs: usize,
}

impl fmt::Display for InfoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        writeln!(
            f,
            "model: MobileNetV3-Small -> FPN({}) -> head",
            self.config.fpn_channels
        )?;
        writeln!(
            f,
            "parameters: {} total = backbone {} + neck {} + head {} (the report's {} counts an unused Linear(1, 10) more)",
            p.total, p.backbone, p.neck, p.head, REPORT_PARAMS
        )?;
        writeln!(
            f,
            "            {} used by the forward pass ({} in FPN output convolutions that feed nothing, not computed)",
            p.used(),
            p.unused
        )?;
        writeln!(
            f,
            "outputs for 1x3x{0}x{0} (head on the stride-8 map):",
            self.image_size
        )?;
        for (name, dims) in &self.output_shapes {
            writeln!(f, "  {name:<4} {dims:?}")?;
        }
        write!(
            f,
            "inference latency, batch 1, {0}x{0}, {1}: {2:.2} ms (median of {3})",
            self.image_size, self.device, self.latency_ms, self.latency_runs
        )
    }
}

/// Median of a non-empty slice (sorted copy).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Median per-image inference latency of `model` (batch 1, eval mode) over `runs` timed
/// forwards after 3 warm-ups, in milliseconds.
pub fn median_latency_ms(
    model: &OneHead,
    image_size: usize,
    device: &Device,
    runs: usize,
) -> anyhow::Result<f64> {
    let x = Tensor::randn(0f32, 1f32, (1, 3, image_size, image_size), device)?;
    // What `predict` runs: the model prepared once for evaluation forwards.
    let model = model.inference()?;
    for _ in 0..3 {
        model.forward(&x)?.sum_all()?.to_scalar::<f32>()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        // Wall time (or process CPU time under ONEHEAD_PROFILE_CPU=1, see ops::fused::prof).
        let t0 = crate::ops::fused::prof::clock();
        let o = model.forward(&x)?;
        // Reading the outputs back synchronises asynchronous devices.
        o.sum_all()?.to_scalar::<f32>()?;
        times.push((crate::ops::fused::prof::clock() - t0) * 1e3);
    }
    Ok(median(&times))
}

/// Build a randomly initialised model on `device`, count parameters, run a `(1,3,S,S)` input
/// and time `runs` eval forwards after 3 warm-up runs.
pub fn info_report_with_runs(
    cfg: &OneHeadConfig,
    image_size: usize,
    device: &Device,
    runs: usize,
) -> anyhow::Result<InfoReport> {
    crate::ops::tune_cpu_runtime();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = OneHead::new(cfg, vb)?;
    let params = count_params(&varmap);
    let x = Tensor::randn(0f32, 1f32, (1, 3, image_size, image_size), device)?;
    let out = model.forward_t(&x, false)?;
    let output_shapes = vec![("head".to_string(), out.dims().to_vec())];
    let latency_ms = median_latency_ms(&model, image_size, device, runs)?;
    Ok(InfoReport {
        config: cfg.clone(),
        image_size,
        device: format!("{device:?}"),
        params,
        output_shapes,
        latency_ms,
        latency_runs: runs.max(1),
    })
}

/// [`info_report_with_runs`] with 30 timed runs.
pub fn info_report(
    cfg: &OneHeadConfig,
    image_size: usize,
    device: &Device,
) -> anyhow::Result<InfoReport> {
    info_report_with_runs(cfg, image_size, device, 30)
}
