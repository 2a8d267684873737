//! CUDA against the CPU: the same model, weights and inputs on both devices give the same
//! outputs, gradients and BatchNorm statistics (the CPU runs onehead's own kernels, CUDA runs
//! candle's ops), and the seg loss agrees. Built only with `--features cuda`; each test
//! returns early, saying so, when no CUDA device is present (a CPU-only build or machine).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::{OneHead, OneHeadConfig};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Max |a − b| over max(|b|, 1e-3 · max|b|): a relative error that tolerates exact zeros.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d.to_scalar::<f32>().unwrap() / m.max(1e-6)
}

/// A model on `dev` whose variables are copies of `from`'s.
fn copy_model(from: &VarMap, dev: &Device) -> (VarMap, OneHead) {
    let vm = VarMap::new();
    let m = OneHead::new(
        &OneHeadConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F32, dev),
    )
    .unwrap();
    {
        let src = from.data().lock().unwrap();
        let dst = vm.data().lock().unwrap();
        for (name, v) in src.iter() {
            dst[name]
                .set(&v.as_tensor().to_device(dev).unwrap())
                .unwrap();
        }
    }
    (vm, m)
}

#[test]
fn model_forward_gradients_and_statistics_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::Cpu;
    let vm_cpu = VarMap::new();
    let m_cpu = OneHead::new(
        &OneHeadConfig::default(),
        VarBuilder::from_varmap(&vm_cpu, DType::F32, &cpu),
    )
    .unwrap();
    let (vm_gpu, m_gpu) = copy_model(&vm_cpu, &gpu);
    let x = Tensor::randn(0f32, 1f32, (4, 3, 96, 64), &cpu).unwrap();
    for train in [false, true] {
        let y_cpu = m_cpu.forward_t(&x, train).unwrap();
        let y_gpu = m_gpu.forward_t(&x.to_device(&gpu).unwrap(), train).unwrap();
        let r = rel_diff(&y_gpu, &y_cpu);
        assert!(r < 1e-3, "train={train}: outputs differ by {r:.2e}");
        // A random projection of the outputs as the loss: every parameter gets a gradient.
        let w = Tensor::randn(0f32, 1f32, y_cpu.dims(), &cpu).unwrap();
        let g_cpu = (&y_cpu * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_gpu = (&y_gpu * &w.to_device(&gpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let a = vm_cpu.data().lock().unwrap();
        let b = vm_gpu.data().lock().unwrap();
        let mut compared = 0;
        for (name, va) in a.iter() {
            let vb: &Var = &b[name];
            if let (Some(ga), Some(gb)) = (g_cpu.get(va.as_tensor()), g_gpu.get(vb.as_tensor())) {
                let r = rel_diff(gb, ga);
                assert!(
                    r < 5e-3,
                    "train={train}: gradient of {name} differs by {r:.2e}"
                );
                compared += 1;
            }
            // BatchNorm running statistics (updated in training mode) stay in step.
            let r = rel_diff(vb.as_tensor(), va.as_tensor());
            assert!(r < 1e-4, "train={train}: {name} differs by {r:.2e}");
        }
        assert!(compared > 100, "only {compared} gradients compared");
    }
}

#[test]
fn seg_loss_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::Cpu;
    let logits = Var::randn(0f32, 1f32, (2, 21, 12, 10), &cpu).unwrap();
    let masks = Tensor::rand(0f32, 20.99, (2, 96, 80), &cpu)
        .unwrap()
        .floor()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let l_cpu = onehead::tasks::seg::upsampled_pixel_cross_entropy(&logits, &masks, 255).unwrap();
    let lg = Var::from_tensor(&logits.as_tensor().to_device(&gpu).unwrap()).unwrap();
    let l_gpu = onehead::tasks::seg::upsampled_pixel_cross_entropy(
        &lg,
        &masks.to_device(&gpu).unwrap(),
        255,
    )
    .unwrap();
    let r = rel_diff(&l_gpu, &l_cpu);
    assert!(r < 1e-4, "loss differs by {r:.2e}");
    let ga = l_cpu.backward().unwrap();
    let gb = l_gpu.backward().unwrap();
    let r = rel_diff(
        gb.get(lg.as_tensor()).unwrap(),
        ga.get(logits.as_tensor()).unwrap(),
    );
    assert!(r < 1e-3, "gradient differs by {r:.2e}");
}
