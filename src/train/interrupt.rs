//! Ctrl-C (SIGINT) and SIGTERM ask the run to stop after the current step with its state
//! saved (resumable, exit code 3). A second Ctrl-C aborts at once; SIGTERM never does: a
//! scheduler (Slurm's cancel, requeue, preemption, time limit) sends it to every process of
//! a job, and a job script that forwards it sends a second one, and either must end in a
//! saved state.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// SIGTERM's handler: set the flag, nothing else (async-signal-safe: an atomic store; the
/// flag is set up before the handler is installed).
extern "C" fn on_term(_: libc::c_int) {
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::SeqCst);
    }
}

/// Install the process-wide handlers (once) and return the flag they set. Library users who
/// run experiments in-process can pass their own flag in `RunOptions::interrupt` instead.
pub fn install() -> anyhow::Result<Arc<AtomicBool>> {
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = FLAG
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
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
    // Replaces ctrlc's SIGTERM handling (it counts TERM as a press).
    // SAFETY: installing a handler that only performs an atomic store.
    let previous =
        unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    anyhow::ensure!(
        previous != libc::SIG_ERR,
        "installing the SIGTERM handler failed"
    );
    Ok(flag)
}
