//! What the integration tests share: the tiny model and synthetic data every test run uses,
//! and reading a CSV back. (Each test file compiles this module on its own, and not every
//! file uses every item.)
#![allow(dead_code)]

use std::path::Path;

/// The experiment lines after its own top-level keys: CPU, results under `dir/results`, a
/// 64-px model with a 16-channel neck, and the built-in benchmark with 16 / 10 / 10 images
/// per split (train / val / held-out test) generated into `dir/data`. Tables follow (`[data]` is last, so a caller may add to it).
pub fn tiny_setup(dir: &Path) -> String {
    format!(
        r#"device = "cpu"
results_dir = "{results}"
[model]
weights = "none"
image_size = 64
fpn_channels = 16
[data]
source = "synthetic"
root = "{data}"
synth_train = 16
synth_val = 10
synth_test = 10
synth_size = 64
"#,
        results = dir.join("results").display(),
        data = dir.join("data").display(),
    )
}

/// Whether an `epochs.csv` column holds wall-clock time (`seconds`, `end_time`, the split of the seconds): the only
/// columns two identical runs, or a run and its resumed twin, may differ in.
pub fn is_timing(column: &str) -> bool {
    matches!(
        column,
        "seconds" | "end_time" | "data_seconds" | "step_seconds" | "eval_seconds"
    )
}

/// A CSV file's header and rows, as strings.
pub fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).unwrap();
    let h = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|x| x.unwrap().iter().map(String::from).collect())
        .collect();
    (h, rows)
}

/// A `(b, 3, h, w)` input in [-2, 2) from `seed`, tracked (gradients flow to it).
pub fn seeded_input(b: usize, h: usize, w: usize, seed: u64) -> candle_core::Var {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * 3 * h * w)
        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
        .collect();
    let t = candle_core::Tensor::from_vec(v, (b, 3, h, w), &candle_core::Device::Cpu).unwrap();
    candle_core::Var::from_tensor(&t).unwrap()
}
