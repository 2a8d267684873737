//! Ctrl-C (SIGINT) and SIGTERM: the first asks the run to stop after the current step with
//! its state saved (resumable, exit code 3); a second one aborts at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Install the process-wide handler (once) and return the flag it sets. Library users who
/// run experiments in-process can pass their own flag in `RunOptions::interrupt` instead.
pub fn install() -> anyhow::Result<Arc<AtomicBool>> {
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let presses = Arc::new(AtomicUsize::new(0));
    let (f, p) = (flag.clone(), presses.clone());
    ctrlc::set_handler(move || {
        if p.fetch_add(1, Ordering::SeqCst) == 0 {
            f.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupt: finishing the current step and saving the run state (press Ctrl-C again to abort at once)");
        } else {
            eprintln!("\ninterrupt: aborting");
            std::process::exit(130);
        }
    })?;
    let _ = FLAG.set(flag.clone());
    Ok(FLAG.get().cloned().unwrap_or(flag))
}
