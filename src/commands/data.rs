//! `onehead synth` and `onehead prepare`: the built-in benchmark and the real course sets.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// The data root to write (created; must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// The benchmark's own seed (`data.synth_seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training images per task (10 to 100000).
    #[arg(long, default_value_t = 240, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(10..=100000))]
    pub train: usize,
    /// Validation images per task (10 to 100000).
    #[arg(long, default_value_t = 60, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(10..=100000))]
    pub val: usize,
    /// Held-out test images per task (`data.synth_test`): 0 for none, else 10 to 100000.
    #[arg(long, default_value_t = 300, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100000))]
    pub test: usize,
    /// Side of the generated images in pixels (32 to 1024).
    #[arg(long, default_value_t = 160, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(32..=1024))]
    pub size: usize,
}

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// The data root to write (only the small sampled sets go here).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the sampling of the images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fetch every archive as `<MIRROR>/<archive file name>` instead of the official URLs.
    #[arg(long)]
    pub mirror: Option<String>,
    /// Where the downloaded archives are kept (default: $ONEHEAD_CACHE, else the
    /// platform's cache folder + `onehead/downloads`, e.g. ~/.cache/onehead/downloads).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Training images sampled per dataset (1 to 100000).
    #[arg(long, default_value_t = 240, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000))]
    pub train: usize,
    /// Validation images sampled per dataset (1 to 100000).
    #[arg(long, default_value_t = 60, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000))]
    pub val: usize,
}

/// Write the built-in synthetic benchmark (same formats as the course sets).
pub fn synth(args: SynthArgs) -> Result<ExitCode> {
    let SynthArgs {
        out,
        seed,
        train,
        val,
        test,
        size,
    } = args;
    let t = std::time::Instant::now();
    crate::data::synth::generate(
        &out,
        &crate::data::synth::SynthOptions {
            seed,
            train,
            val,
            test,
            size,
        },
    )
    .with_context(|| format!("writing the synthetic benchmark to {}", out.display()))?;
    println!(
        "wrote the synthetic benchmark to {} in {:.1} s",
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Download and sample the real course sets (Imagenette, VOC 2012, COCO 2017).
pub fn prepare(args: PrepareArgs) -> Result<ExitCode> {
    let PrepareArgs {
        out,
        seed,
        mirror,
        cache,
        train,
        val,
    } = args;
    let mut opts = crate::data::prepare::PrepareOptions::new(&out);
    opts.seed = seed;
    opts.mirror = mirror;
    opts.downloads = cache;
    opts.train = train;
    opts.val = val;
    let s = crate::data::prepare::prepare(&opts)?;
    println!(
                "course sets ready under {}: classification {}/{}, segmentation {}/{}, detection {}/{} images ({}/{} boxes)",
                s.root.display(),
                s.cls_images[0],
                s.cls_images[1],
                s.seg_images[0],
                s.seg_images[1],
                s.det_images[0],
                s.det_images[1],
                s.det_annotations[0],
                s.det_annotations[1]
            );
    Ok(ExitCode::SUCCESS)
}
