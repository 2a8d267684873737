//! An evaluation forward splits its batch into one group of images per thread, each group's
//! whole pass on one core (`ops::fused::eval_groups`). No kernel mixes images, so the output
//! must be the ungrouped pass's, bit for bit, whatever the grouping.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::init::init_all;
use onehead::model::{Executor, OneHead, OneHeadConfig};
use onehead::ops::fused::eval_groups;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The evaluation output's bits for `x` on a pool of `threads`, and the groups it ran in.
fn eval_bits(x: &Tensor, threads: usize) -> (Vec<u32>, usize) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let vm = VarMap::new();
        let cfg = OneHeadConfig::default();
        let m = OneHead::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .unwrap()
            .with_executor(Executor::Fused);
        init_all(&vm, &mut ChaCha8Rng::seed_from_u64(5), &[]).unwrap();
        let y = m.inference().unwrap().forward(x).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let groups = eval_groups(x.dims()[0]);
        (v.iter().map(|v| v.to_bits()).collect(), groups)
    })
}

#[test]
fn grouped_evaluation_keeps_the_whole_batchs_bits() {
    // 16 images: 2 groups of 8 on 2 threads (8-image lanes: paired tiles and pixels), none on
    // 1 or 3; 32 images: 2 groups of 16; 24 images: no groups on 2 threads (12 each).
    for (b, h, w) in [(16, 64, 64), (32, 32, 32), (24, 32, 64)] {
        let x = common::seeded_input(b, h, w, 11).as_tensor().detach();
        let (one, g1) = eval_bits(&x, 1);
        assert_eq!(g1, 1);
        let (two, g2) = eval_bits(&x, 2);
        assert_eq!(g2, if b == 24 { 1 } else { 2 }, "b{b}");
        assert!(one == two, "b{b} {h}x{w}: 2 threads differ from 1");
        let (three, _) = eval_bits(&x, 3);
        assert!(one == three, "b{b} {h}x{w}: 3 threads differ from 1");
    }
}
