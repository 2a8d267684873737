//! A hash of the f32 bits of the evaluation forward's output at the batch sizes and image
//! sizes the speed figures use (batch 1 and 16 at 224 px) and a few others (partial tiles,
//! non-square maps, small batches): for checking that a kernel change keeps every bit of the
//! inference path, which `tests/fused_fingerprint.rs` covers only at small training sizes.
//!
//! `cargo run --release --example inference_hashes` before and after a change, on the same
//! machine (the bits depend on its SIMD level and cache sizes), with the same thread count.
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::{init::init_all, OneHead, OneHeadConfig};
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = OneHead::new(
        &OneHeadConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    init_all(&vm, &mut rng, &[(25, -4.595)])?;
    let m = m.inference()?;
    for (b, h, w) in [
        (1, 224, 224),
        (1, 160, 160),
        (1, 256, 256),
        (1, 224, 352),
        (2, 224, 224),
        (4, 160, 160),
        (16, 224, 224),
        (16, 160, 160),
    ] {
        let n = b * 3 * h * w;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(x, (b, 3, h, w), &dev)?;
        let y = m.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let mut hh: u64 = 0xcbf29ce484222325;
        for v in &y {
            for byte in v.to_bits().to_le_bytes() {
                hh ^= byte as u64;
                hh = hh.wrapping_mul(0x100000001b3);
            }
        }
        println!("b{b} {h}x{w}: {hh:016x}");
    }
    Ok(())
}
