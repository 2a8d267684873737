//! `onehead info` and `onehead bench`: the model's size and speed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::registry::Registry;
use crate::train as engine;

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Take image size, FPN width and device from this experiment.
    pub file: Option<PathBuf>,
    /// Square input side for the shapes and the latency (a multiple of 32, 64 to 1024;
    /// default: the experiment's, else 224).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(64..=1024))]
    pub image_size: Option<usize>,
    /// Device: auto, cpu, cuda or cuda:N (default: the experiment's, else auto).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Square input sizes of the training measurements (multiples of 32, 64 to 1024).
    #[arg(long, value_delimiter = ',', default_value = "160,224", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(64..=1024))]
    pub sizes: Vec<usize>,
    /// Images per training and inference batch (1 to 1024).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub batch: usize,
    /// Replayed images added to the engine-style training step (0: skip it).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024))]
    pub replay: usize,
    /// Timed steps per measurement (after 2 warm-ups).
    #[arg(long, default_value_t = 10, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000))]
    pub steps: usize,
    /// Input size of the inference (batch 16) and latency (batch 1) measurements.
    #[arg(long, default_value_t = 224, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(64..=1024))]
    pub inference_size: usize,
    /// Batch-1 forwards whose median is the latency (at least 30).
    #[arg(long, default_value_t = 50, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000))]
    pub latency_runs: usize,
    /// Time every kernel kind inside the fused network op (per training step).
    #[arg(long)]
    pub profile: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Parameter counts, output shapes and inference latency of the model.
pub fn info(args: InfoArgs) -> Result<ExitCode> {
    let InfoArgs {
        file,
        image_size,
        device,
    } = args;
    let exp = match &file {
        Some(f) => Some(Registry::builtin().load(f, &[])?),
        None => None,
    };
    if let Some(s) = image_size.filter(|s| s % 32 != 0) {
        anyhow::bail!("info: --image-size {s} is not a multiple of 32 (the model's output stride)");
    }
    let size = image_size
        .or(exp.as_ref().map(|e| e.model.image_size))
        .unwrap_or(224);
    let fpn = exp.as_ref().map(|e| e.model.fpn_channels).unwrap_or(128);
    let device = engine::select_device(
        device
            .as_deref()
            .or(exp.as_ref().map(|e| e.device.as_str()))
            .unwrap_or("auto"),
    )?;
    let cfg = crate::model::OneHeadConfig {
        fpn_channels: fpn,
        ..Default::default()
    };
    println!("{}", crate::model::info_report(&cfg, size, &device)?);
    Ok(ExitCode::SUCCESS)
}

/// Training and inference throughput, batch-1 latency, peak memory, sgemm peak
/// (side by side with PyTorch: scripts/bench_vs_torch.sh).
pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    let a = args;
    if let Some(s) = a
        .sizes
        .iter()
        .chain([&a.inference_size])
        .find(|s| *s % 32 != 0)
    {
        anyhow::bail!("bench: size {s} is not a multiple of 32 (the model's output stride)");
    }
    let device = engine::select_device(&a.device)?;
    let opts = crate::bench::BenchOptions {
        sizes: a.sizes,
        batch: a.batch,
        replay: a.replay,
        steps: a.steps,
        inference_size: a.inference_size,
        latency_runs: a.latency_runs,
        profile: a.profile,
    };
    let report = crate::bench::run_bench(&opts, &device)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
