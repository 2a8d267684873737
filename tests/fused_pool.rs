//! The fused executor's passes run on rayon's pool beside helper jobs that keep the other
//! workers polling (`ops::fused::exec::on_pool`). Helpers hand their thread back now and
//! then because one can land on a worker that waits inside the pass; this runs passes from
//! three callers at once on a 4-worker pool (helpers of one caller meet the others' work)
//! and checks that each finishes with the bits of a lone pass.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::init::init_all;
use onehead::model::{Executor, OneHead, OneHeadConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The same seeded model every call (each pass has its own: a training forward moves the
/// running statistics).
fn model() -> (VarMap, OneHead) {
    let vm = VarMap::new();
    let cfg = OneHeadConfig::default();
    let m = OneHead::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    init_all(&vm, &mut ChaCha8Rng::seed_from_u64(3), &[]).unwrap();
    (vm, m.with_executor(Executor::Fused))
}

/// An evaluation forward, a training forward and backward: their values as bits.
fn passes(x: &Tensor) -> Vec<u32> {
    let (vm, m) = model();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect()
    };
    let mut out = bits(&m.inference().unwrap().forward(x).unwrap());
    let y = m.forward_t(x, true).unwrap();
    out.extend(bits(&y));
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for n in names {
        if let Some(g) = grads.get(data[n].as_tensor()) {
            out.extend(bits(g));
        }
    }
    out
}

#[test]
fn passes_finish_and_agree_with_four_workers_and_three_callers() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build_global()
        .expect("this test binary sets the global pool first");
    let x = common::seeded_input(2, 64, 64, 7).as_tensor().detach();
    let lone = passes(&x);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..3 {
            let tx = tx.clone();
            let x = &x;
            s.spawn(move || {
                for _ in 0..3 {
                    tx.send(passes(x)).unwrap();
                }
            });
        }
        for i in 0..9 {
            // A deadlocked pass would hang: fail instead.
            let got = rx
                .recv_timeout(Duration::from_secs(300))
                .unwrap_or_else(|_| panic!("pass {i} did not finish in 300 s"));
            assert!(got == lone, "pass {i} differs from the lone pass");
        }
    });
}
