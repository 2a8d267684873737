//! Optional per-kernel timing of the fused executor (off by default; `onehead bench
//! --profile` turns it on). Each kernel call is timed as a whole; convolution gemms also
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
}

pub const KINDS: [Kind; 8] = [
    Kind::Gemm,
    Kind::Im2col,
    Kind::Depthwise,
    Kind::BatchNorm,
    Kind::Activation,
    Kind::SqueezeExcite,
    Kind::AddUpsample,
    Kind::Layout,
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
        }
    }

    fn index(self) -> usize {
        KINDS.iter().position(|&k| k == self).unwrap_or(0)
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static FLOPS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

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

/// Run `f`, charging its time (and `flops`) to `kind` when timing is on.
#[inline]
pub fn time<R>(kind: Kind, flops: u64, f: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let i = kind.index();
    NANOS[i].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    FLOPS[i].fetch_add(flops, Ordering::Relaxed);
    r
}
