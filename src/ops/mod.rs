//! Kernels candle lacks or gets slow/wrong for this model (see docs/CANDLE_NOTES.md).
//!
//! - [`fused`]: on the CPU, `OneHead`'s whole forward and backward as one autograd node
//!   (the training and inference path; see its module docs for why and how).
//! - The per-layer ops ([`depthwise`], [`im2col`], [`channel`], [`resize`]) are what the
//!   model's `Module` implementations use on other devices and what the fused path is tested
//!   against; [`loss`] holds the pixel cross-entropies (one of them fused with the bilinear
//!   upsampling of the logits), [`fastmath`] a vectorisable `exp`/`ln`, [`adamw_cpu`] the
//!   optimiser's update in one pass.

mod adamw;
pub mod aligned_alloc;
pub mod channel;
pub mod depthwise;
pub mod fastmath;
pub mod fused;
pub mod im2col;
pub mod loss;
pub mod resize;
mod simd;
mod storage;

pub use adamw::{adamw_cpu, AdamConsts};
pub use depthwise::depthwise_conv2d;
pub use im2col::conv2d_im2col;
pub use loss::{pixel_cross_entropy, upsampled_pixel_cross_entropy};
pub use resize::{resize_bilinear, subsample2, upsample_nearest2x};

/// CPU runtime settings measured to speed up training on this 2-core machine kind; call once
/// at the start of `main`, before any tensor work (later calls change nothing that already
/// started). Idempotent; explicit environment settings win.
///
/// - `CANDLE_NUM_THREADS=1` (unless set): candle's element-wise ops run on a "barrier pool"
///   whose workers and waiting caller spin; together with rayon's workers (our kernels, gemm)
///   that is three spinning threads on two cores. With other processes busy on the machine
///   the training step (224x224, batch 16) was 1.7x faster with the pool off; on an idle
///   machine the two settings measured within noise (≈ 5 %). Our kernels and gemm still use
///   all cores.
/// - `RAYON_NUM_THREADS` = available parallelism (unless set): saves candle re-reading
///   `/proc/cpuinfo` on every matmul.
/// - glibc only: keep freed activation buffers instead of returning them to the OS every step
///   (mmap threshold 32 MiB, trim threshold 1 GiB, top pad 256 MiB), as BENCHMARKS.md did for
///   PyTorch; measured another ≈ 15 %.
pub fn tune_cpu_runtime() {
    // candle asks for its thread count on every matmul; without RAYON_NUM_THREADS that parses
    // /proc/cpuinfo each time (≈ 4 % of a batch-1 forward in a profile).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Peak resident memory of this process so far (VmHWM), in MiB; `None` where unavailable.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
