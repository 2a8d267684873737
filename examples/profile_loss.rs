//! Median time of the segmentation loss (cross-entropy of logits upsampled 8× on the fly) on a
//! batch of 16 at 224 px, with its gradient made in the forward (`train`) or not.
//!
//! `cargo run --release --example profile_loss -- STEPS [train]` prints the median ms.

use candle_core::{Device, Tensor, Var};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args.first().map_or(Ok(20), |s| s.parse())?;
    let train = args.get(1).is_some_and(|a| a == "train");
    let dev = Device::Cpu;
    let logits = Var::randn(0f32, 2f32, (16, 21, 28, 28), &dev)?;
    let t: Vec<u32> = (0..16 * 224 * 224)
        .map(|i| ((i * 7 / 3000) % 21) as u32)
        .collect();
    let targets = Tensor::from_vec(t, (16, 224, 224), &dev)?;
    let input = if train {
        logits.as_tensor().clone()
    } else {
        logits.as_tensor().detach()
    };
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t0 = std::time::Instant::now();
        let l = onehead::ops::upsampled_pixel_cross_entropy(&input, &targets, Some(255))?;
        let _ = l.to_scalar::<f32>()?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!("{:.3} ms", times[times.len() / 2]);
    Ok(())
}
