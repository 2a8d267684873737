//! Median time of an evaluation forward (or, with `train`, of a training step), for A/B
//! timings of two builds alternated run by run (the machine's speed drifts between minutes;
//! `onehead bench` takes many more seconds).
//!
//! `cargo run --release --example profile_inference -- SIZE BATCH STEPS [train]` prints the
//! median ms per forward (per training step) of `BATCH` images of `SIZE²` over `STEPS`
//! forwards (steps), after 2 warm-ups.

fn main() -> anyhow::Result<()> {
    let usage = "usage: profile_inference SIZE BATCH STEPS [train]";
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let train = args.last().is_some_and(|a| a == "train");
    if train {
        args.pop();
    }
    let nums: Vec<usize> = args
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{usage}: {e}"))?;
    let [size, batch, steps] = nums[..] else {
        anyhow::bail!("{usage}")
    };
    let dev = candle_core::Device::Cpu;
    let r = if train {
        onehead::bench::bench_train_step(size, batch, steps, &dev)?
    } else {
        onehead::bench::bench_inference(size, batch, steps, &dev)?
    };
    println!("{:.3} ms", r.ms_per_step);
    Ok(())
}
