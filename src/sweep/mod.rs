//! Sweeps: a list of experiment files × a grid of overrides × seeds, planned into a sweep
//! folder and run as independent `onehead run` processes — side by side on one machine
//! ([`local`]) or as a Slurm job array ([`slurm`]). Runs share nothing but the filesystem,
//! so a sweep scales from a laptop to a cluster without a coordinator of its own.
//!
//! A sweep folder (`<results>/<name>/`):
//!
//! ```text
//! manifest.json          every planned run: index, name, source file, overrides, seed,
//!                        resolved config, run folder (the commit point of the plan)
//! configs/<i>-<name>.toml the resolved config of run i (what `onehead run` is given)
//! runs/<name>/           run i's folder (`onehead run <config> --run-dir <it>`), with log.txt
//! index.csv              one row per run: status (ok | failed | interrupted | running |
//!                        pending | missing), reason, varied values, seed, per-task results
//! summary.csv            one row per configuration (all varied keys but seed): mean ± std
//!                        over seeds of every task's final value and drop, the drop pooled
//!                        over seeds with its interval and verdict ([`stats`]), seeds
//!                        passing with the Clopper–Pearson interval of that rate
//! differences.csv        every two configurations: the paired difference of each task's
//!                        final over the seeds they share, with its interval
//! references/<key>/      the single-task reference runs the sweep's runs are judged against
//! sweep.sbatch, slurm/   the Slurm job-array script and its per-task output (`--slurm`)
//! ```
//!
//! The sweep never calls the engine in-process: it only writes configs, starts the
//! `onehead` binary and reads what the runs leave (`summary.json`, read as untyped JSON
//! as README's "What a run leaves" documents it), so it keeps working whatever the engine's internals become.

pub mod cli;
pub mod index;
pub mod local;
pub mod plan;
pub mod progress;
pub mod record;
pub mod scheduler;
pub mod slurm;
pub mod stats;

pub use index::{RunRecord, Status};
pub use local::{run_local, thread_budget, LocalOptions, SweepOutcome};
pub use plan::{plan, prepare_sweep_dir, Manifest, PlannedRun, SweepSpec};
pub use slurm::{SlurmOptions, SlurmSubmission};

/// One grid axis: `key=v1,v2,…`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GridAxis {
    pub key: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for GridAxis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, vals) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected key=v1,v2,…"))?;
        let values = split_top_level(vals);
        if key.trim().is_empty() || values.iter().any(|v| v.is_empty()) {
            return Err(format!("'{s}': empty key or value"));
        }
        Ok(Self {
            key: key.trim().to_string(),
            values,
        })
    }
}

/// Split at commas that are not inside brackets or quotes (`tasks=["seg","det"],"all"`).
fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut cur) = (0i32, None::<char>, String::new());
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_axes_split_at_top_level_commas() {
        let a: GridAxis = "replay.tasks=[\"seg\",\"det\"],\"all\"".parse().unwrap();
        assert_eq!(a.values, vec!["[\"seg\",\"det\"]", "\"all\""]);
        let b: GridAxis = "stages.0.lr=0.001, 0.01".parse().unwrap();
        assert_eq!(b.key, "stages.0.lr");
        assert_eq!(b.values, vec!["0.001", "0.01"]);
        assert!("nokey".parse::<GridAxis>().is_err());
        assert!("k=1,,2".parse::<GridAxis>().is_err());
    }
}
