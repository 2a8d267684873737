//! A process-wide free list of `f32` buffers for the fused network executor.
//!
//! Why: every training step allocates and frees the same few hundred activation and
//! gradient buffers. Fresh allocations are zero-filled (one more pass over memory), and glibc
//! serves requests above its mmap threshold (at most 32 MiB) with fresh pages that fault in
//! one by one every step. Buffers taken from here keep their previous contents: the kernels
//! that use [`take`] overwrite every element.
//!
//! Bounded: at most [`limit_bytes`] are kept (oldest dropped first), so memory stays flat
//! however many steps run; `ONEHEAD_POOL_MB` overrides the limit (0 disables pooling).

use std::sync::Mutex;

struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

/// Buffers smaller than this are not worth pooling.
const MIN_POOLED: usize = 1 << 12;

/// Upper bound on the bytes kept in the free list (default 2 GiB: a batch-20 training step
/// at 224×224 keeps ≈ 0.5 GiB of activations).
pub fn limit_bytes() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("ONEHEAD_POOL_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(2048 << 20, |mb| mb << 20)
    })
}

/// A buffer of length `n` with unspecified (stale but initialised) contents.
pub fn take(n: usize) -> Vec<f32> {
    if n >= MIN_POOLED {
        let mut pool = POOL.lock().expect("buffer pool");
        // Best fit among buffers no more than 2× too large.
        let mut best: Option<(usize, usize)> = None;
        for (i, v) in pool.free.iter().enumerate() {
            let cap = v.capacity();
            if cap >= n && cap <= 2 * n && best.is_none_or(|(_, c)| cap < c) {
                best = Some((i, cap));
            }
        }
        if let Some((i, cap)) = best {
            let mut v = pool.free.swap_remove(i);
            pool.bytes -= cap * 4;
            drop(pool);
            if v.len() >= n {
                v.truncate(n);
            } else {
                v.resize(n, 0.0);
            }
            return v;
        }
    }
    vec![0f32; n]
}

/// A zero-filled buffer of length `n`.
pub fn take_zeroed(n: usize) -> Vec<f32> {
    let mut v = take(n);
    v.fill(0.0);
    v
}

/// Return a buffer to the free list.
pub fn give(v: Vec<f32>) {
    let cap = v.capacity();
    let limit = limit_bytes();
    if cap < MIN_POOLED || cap * 4 > limit {
        return;
    }
    let mut pool = POOL.lock().expect("buffer pool");
    pool.bytes += cap * 4;
    pool.free.push(v);
    while pool.bytes > limit {
        let old = pool.free.remove(0);
        pool.bytes -= old.capacity() * 4;
    }
}

/// Bytes currently held in the free list.
pub fn pooled_bytes() -> usize {
    POOL.lock().expect("buffer pool").bytes
}
