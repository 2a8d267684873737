//! Median time of an evaluation forward, for A/B timings of two builds alternated run by run
//! (the machine's speed drifts between minutes; `onehead bench` takes many more seconds).
//!
//! `cargo run --release --example profile_inference -- SIZE BATCH STEPS` prints the median
//! ms per forward of `BATCH` images of `SIZE²` over `STEPS` forwards (after 2 warm-ups).

fn main() -> anyhow::Result<()> {
    let usage = "usage: profile_inference SIZE BATCH STEPS";
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{usage}: {e}"))?;
    let [size, batch, steps] = args[..] else {
        anyhow::bail!("{usage}")
    };
    let r = onehead::bench::bench_inference(size, batch, steps, &candle_core::Device::Cpu)?;
    println!("{:.3} ms", r.ms_per_step);
    Ok(())
}
