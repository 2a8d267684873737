//! `onehead plot` and `onehead compare`: pictures and tables from run folders.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// Run folders (`results/<name>/<run-id>`).
    #[arg(required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// Also write the run's epochs as a TensorBoard event file (`<run>/tensorboard/`).
    #[arg(long)]
    pub tensorboard: bool,
}

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Run folders and/or sweep folders (with `index.csv` or run folders below).
    #[arg(required = true, value_name = "RUN_DIR|SWEEP_DIR")]
    pub inputs: Vec<PathBuf>,
    /// Write overlay charts, `summary.csv` and `report.html` here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Summary format: table, markdown or csv.
    #[arg(long, default_value = "table")]
    pub format: crate::report::CompareFormat,
}

/// Draw a run's pictures from its files (`plots/*.png|svg`, `report.html`); works on an
/// unfinished or interrupted run too.
pub fn plot(args: PlotArgs) -> Result<ExitCode> {
    let PlotArgs {
        run_dirs,
        tensorboard,
    } = args;
    for dir in &run_dirs {
        for f in crate::report::draw_run(dir)? {
            println!("{}", f.display());
        }
        if tensorboard {
            let f = crate::report::export_tensorboard(dir)?;
            println!("{}", f.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Compare runs and sweeps: the summary of every run, and with `--out` overlay charts per
/// task metric (seeds of one config as mean ± sd) and a `report.html`.
pub fn compare(args: CompareArgs) -> Result<ExitCode> {
    let CompareArgs {
        inputs,
        out,
        format,
    } = args;
    let result = crate::report::compare(&crate::report::CompareOptions {
        inputs,
        out,
        format,
    })?;
    for w in &result.warnings {
        tracing::warn!("{w}");
    }
    print!("{}", result.text);
    for f in &result.files {
        eprintln!("wrote {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}
