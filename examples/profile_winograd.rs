//! One Winograd 3×3 convolution (128 → 128 channels at 28 × 28: the head's and the FPN's output
//! conv at 224 px) timed alone, with its gemms and tile transforms apart.
//!
//! `cargo run --release --example profile_winograd -- BATCH REPS` prints ms per forward, the
//! split, and a checksum of the output (equal across builds that keep the values).

use onehead::ops::fused::{prof, winograd};

fn main() -> anyhow::Result<()> {
    let usage = "usage: profile_winograd BATCH REPS";
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{usage}: {e}"))?;
    let [b, reps] = args[..] else {
        anyhow::bail!("{usage}")
    };
    let g = winograd::Geom {
        b,
        c: 128,
        h: 28,
        w: 28,
        o: 128,
    };
    // Fixed pseudo-random values (no RNG: the checksum must not depend on a crate version).
    let x: Vec<f32> = (0..128 * 28 * 28 * b)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let wt: Vec<f32> = (0..128 * 128 * 9)
        .map(|i| ((i * 104729) % 1000) as f32 / 10000.0 - 0.05)
        .collect();
    let mut y = vec![0f32; x.len()];
    // Inside the pool, as the network's passes run (see `exec::on_pool`).
    rayon::scope(|_| {
        for _ in 0..3 {
            winograd::forward(&g, &x, &wt, &mut y);
        }
        prof::enable(true);
        prof::reset();
        let t0 = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            winograd::forward(&g, &x, &wt, &mut y);
        }
        let per = t0.elapsed().as_secs_f64() * 1e3 / reps.max(1) as f64;
        prof::enable(false);
        println!("batch {b}: {per:.3} ms per forward");
        for (kind, secs, flops) in prof::snapshot() {
            if secs > 0.0 {
                let ms = secs * 1e3 / reps.max(1) as f64;
                let gflops = flops as f64 / secs / 1e9;
                println!("  {:<32} {ms:.3} ms  {gflops:.0} GFLOP/s", kind.name());
            }
        }
    });
    let sum: f64 = y.iter().map(|&v| v as f64).sum();
    println!("checksum {sum:.6}");
    Ok(())
}
