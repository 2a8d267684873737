//! Which device a run trains on: `auto` falls back to the CPU when a CUDA build finds no
//! GPU; an explicit `cuda` that cannot start is a one-line error.

use anyhow::{Context, Result};
use candle_core::Device;

/// `auto` → CUDA device 0 when compiled with CUDA and one is present, else CPU.
pub fn select_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            // `cuda_is_available` only says the build has CUDA; a CUDA build on a machine
            // without a GPU (or driver) must still run, on the CPU.
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::warn!(
                        "device auto: CUDA could not start ({}); using the CPU",
                        first_line(&e)
                    ),
                }
            }
            Ok(Device::Cpu)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()
                .with_context(|| format!("device '{s}': expected cuda:<N>"))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "device '{s}' asked for, but this build has no CUDA support (rebuild with `--features cuda`) or no GPU is present; use device = \"cpu\" or \"auto\""
                );
            }
            Device::new_cuda(ordinal).map_err(|e| {
                anyhow::anyhow!(
                    "device '{s}': CUDA could not start ({}); use device = \"cpu\" or \"auto\"",
                    first_line(&e)
                )
            })
        }
        other => anyhow::bail!("device '{other}': expected auto, cpu, cuda or cuda:N"),
    }
}

/// The first line of an error (candle appends a backtrace when RUST_BACKTRACE is set).
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
