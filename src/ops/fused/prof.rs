//! Optional per-kernel timing of the fused executor (off by default; `onehead bench
//! --profile` turns it on). The executor times each node as a whole and charges it to the
//! node's kind; kernels that mix kinds (a dense conv's im2col and gemms, a conv's bias)
//! time those parts as nested sections, charged to their own kinds. Convolution gemms also
//! count their floating-point operations so achieved GFLOP/s can be reported.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What a timed section computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// gemm of 1×1 and dense convolutions (forward, weight and input gradients).
    Gemm,
    /// im2col / col2im of dense convolutions.
    Im2col,
    Depthwise,
    /// BatchNorm statistics + normalisation + activation (fused), forward and backward.
    BatchNorm,
    /// Stand-alone activations and conv biases.
    Activation,
    SqueezeExcite,
    /// Residual adds, FPN upsample-adds, gradient accumulation.
    AddUpsample,
    /// NCHW ↔ CNHW conversions at the op's boundary.
    Layout,
    /// Winograd tile transforms of the 3×3 convolutions (their gemms count as `Gemm`).
    Winograd,
}

pub const KINDS: [Kind; 9] = [
    Kind::Gemm,
    Kind::Im2col,
    Kind::Depthwise,
    Kind::BatchNorm,
    Kind::Activation,
    Kind::SqueezeExcite,
    Kind::AddUpsample,
    Kind::Layout,
    Kind::Winograd,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gemm => "gemm (1x1 + dense convs)",
            Kind::Im2col => "im2col / col2im",
            Kind::Depthwise => "depthwise convs",
            Kind::BatchNorm => "BatchNorm + activation (fused)",
            Kind::Activation => "activations / biases",
            Kind::SqueezeExcite => "squeeze-excite",
            Kind::AddUpsample => "adds / upsample / grad accumulation",
            Kind::Layout => "layout NCHW<->CNHW",
            Kind::Winograd => "Winograd tile transforms",
        }
    }

    fn index(self) -> usize {
        KINDS.iter().position(|&k| k == self).unwrap_or(0)
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];
static FLOPS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

/// Turn timing on or off (process-wide).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zero all counters.
pub fn reset() {
    for i in 0..KINDS.len() {
        NANOS[i].store(0, Ordering::Relaxed);
        FLOPS[i].store(0, Ordering::Relaxed);
    }
}

/// `(kind, seconds, flops)` accumulated since the last [`reset`].
pub fn snapshot() -> Vec<(Kind, f64, u64)> {
    KINDS
        .iter()
        .map(|&k| {
            let i = k.index();
            (
                k,
                NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                FLOPS[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Whether [`clock`] measures process CPU time (`ONEHEAD_PROFILE_CPU=1`) instead of wall
/// time. CPU time is robust to other processes on a shared machine; with
/// `RAYON_NUM_THREADS=1` it is the single-core cost of each kernel.
pub fn cpu_clock() -> bool {
    static CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| std::env::var("ONEHEAD_PROFILE_CPU").is_ok_and(|v| v == "1"))
}

/// Seconds on the profiling clock (wall time, or process CPU time, see [`cpu_clock`]).
pub fn clock() -> f64 {
    if cpu_clock() {
        #[cfg(unix)]
        {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes one timespec.
            unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

thread_local! {
    /// Seconds charged by the sections nested in the innermost running [`time`] section of
    /// this thread (so far).
    static NESTED: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Run `f`, charging its time (and `flops`) to `kind` when timing is on. Sections nest:
/// time spent in a nested section is charged to the nested section's kind only, so the
/// executor can time a whole node as its kind while the node's kernels time finer parts
/// (a dense conv's im2col inside its gemm node).
#[inline]
pub fn time<R>(kind: Kind, flops: u64, f: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let outer = NESTED.with(|n| n.replace(0.0));
    let t0 = clock();
    let r = f();
    let dt = clock() - t0;
    let inner = NESTED.with(|n| n.replace(outer + dt));
    let i = kind.index();
    NANOS[i].fetch_add(((dt - inner).max(0.0) * 1e9) as u64, Ordering::Relaxed);
    FLOPS[i].fetch_add(flops, Ordering::Relaxed);
    r
}

/// Per-node times of the fused executor: `(label, forward seconds, backward seconds)`, summed
/// over the steps timed since the last [`reset_nodes`].
static NODES: std::sync::Mutex<Vec<(String, f64, f64)>> = std::sync::Mutex::new(Vec::new());

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn reset_nodes() {
    NODES.lock().expect("node times").clear();
}

pub fn node_time(i: usize, label: impl FnOnce() -> String, secs: f64, backward: bool) {
    let mut n = NODES.lock().expect("node times");
    if n.len() <= i {
        n.resize(i + 1, (String::new(), 0.0, 0.0));
    }
    if n[i].0.is_empty() {
        n[i].0 = label();
    }
    if backward {
        n[i].2 += secs;
    } else {
        n[i].1 += secs;
    }
}

pub fn nodes() -> Vec<(String, f64, f64)> {
    NODES.lock().expect("node times").clone()
}
