//! Per-op timings on the model's real shapes (batch 16, 224), ignored by default:
//! `cargo test --release --test model_profile -- --ignored --nocapture`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use onehead::ops::depthwise_conv2d;

fn time<F: FnMut() -> Tensor>(name: &str, mut f: F) {
    let _ = f();
    let t0 = Instant::now();
    let n = 3;
    for _ in 0..n {
        let y = f();
        let _ = y.sum_all().unwrap().to_scalar::<f32>().unwrap();
    }
    println!(
        "{name:<48} {:8.2} ms",
        t0.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

#[test]
#[ignore = "profiling"]
fn profile_ops() {
    let dev = Device::Cpu;
    let b = 16;
    let r = |s: &[usize]| Tensor::randn(0f32, 1f32, s, &dev).unwrap();
    let x = r(&[b, 3, 224, 224]);
    let w = r(&[16, 3, 3, 3]);
    time("stem conv2d 3->16 k3 s2 @224", || {
        x.conv2d(&w, 1, 2, 1, 1).unwrap()
    });
    let x = r(&[b, 72, 56, 56]);
    let w = r(&[72, 1, 3, 3]);
    time("dw k3 s2 72 @56", || {
        depthwise_conv2d(&x, &w, 2, 1).unwrap()
    });
    let x = r(&[b, 240, 14, 14]);
    let w = r(&[240, 1, 5, 5]);
    time("dw k5 s1 240 @14", || {
        depthwise_conv2d(&x, &w, 1, 2).unwrap()
    });
    let x = r(&[b, 16, 56, 56]);
    let w = r(&[72, 16]);
    time("pw matmul 16->72 @56", || {
        w.broadcast_matmul(&x.reshape((b, 16, 56 * 56)).unwrap())
            .unwrap()
    });
    let w4 = r(&[72, 16, 1, 1]);
    time("pw conv2d 16->72 @56", || {
        x.conv2d(&w4, 0, 1, 1, 1).unwrap()
    });
    let x = r(&[b, 96, 7, 7]);
    let w = r(&[576, 96]);
    time("pw matmul 96->576 @7", || {
        w.broadcast_matmul(&x.reshape((b, 96, 49)).unwrap())
            .unwrap()
    });
    let x = r(&[b, 128, 28, 28]);
    let w = r(&[128, 128, 3, 3]);
    time("conv2d 128->128 k3 @28", || {
        x.conv2d(&w, 1, 1, 1, 1).unwrap()
    });
    let x = r(&[b, 72, 56, 56]);
    time("hardswish 72 @56", || {
        (&x * ((&x + 3.0).unwrap().clamp(0f32, 6f32).unwrap() / 6.0).unwrap()).unwrap()
    });
    let m = r(&[72]);
    time("bn-eval-like affine 72 @56", || {
        x.broadcast_sub(&m.reshape((1, 72, 1, 1)).unwrap())
            .unwrap()
            .broadcast_div(&m.reshape((1, 72, 1, 1)).unwrap())
            .unwrap()
            .broadcast_mul(&m.reshape((1, 72, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&m.reshape((1, 72, 1, 1)).unwrap())
            .unwrap()
    });
    time("relu 72 @56", || x.relu().unwrap());
    time("mean_keepdim(3).mean_keepdim(2) 72 @56", || {
        x.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap()
    });
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

#[test]
#[ignore = "profiling"]
fn profile_train_step_parts() {
    use candle_core::{DType, Var};
    use candle_nn::{VarBuilder, VarMap};
    use onehead::model::{OneHead, OneHeadConfig};
    use onehead::ops::resize_bilinear;
    use onehead::tasks::seg::pixel_cross_entropy as seg_cross_entropy;
    let dev = Device::Cpu;
    let (b, s) = (16, 224);
    let varmap = VarMap::new();
    let model = OneHead::new(
        &OneHeadConfig::default(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1f32, (b, 3, s, s), &dev).unwrap();
    let seg_t = Tensor::zeros((b, s, s), DType::U32, &dev).unwrap();
    for rep in 0..2 {
        let t0 = Instant::now();
        let out = model.forward_t(&x, true).unwrap();
        let f = ms(t0);
        let t0 = Instant::now();
        let loss_simple = out.sqr().unwrap().mean_all().unwrap();
        let l = ms(t0);
        let t0 = Instant::now();
        let _g = loss_simple.backward().unwrap();
        let bw = ms(t0);
        println!(
            "rep {rep}: model forward(train) {f:.1} ms, simple loss {l:.1} ms, backward {bw:.1} ms"
        );
    }
    // The benchmark's segmentation loss on its own.
    let logits = Var::randn(0f32, 1f32, (b, 21, s / 8, s / 8), &dev).unwrap();
    for _ in 0..2 {
        let t0 = Instant::now();
        let up = resize_bilinear(&logits, s, s).unwrap();
        let t1 = ms(t0);
        let loss = seg_cross_entropy(&up, &seg_t, 255).unwrap();
        let t2 = ms(t0);
        let _g = loss.backward().unwrap();
        println!(
            "seg loss: resize {t1:.1} ms, +CE {:.1} ms, +backward {:.1} ms",
            t2 - t1,
            ms(t0) - t2
        );
    }
    // Dense 3x3 128->128 @28 forward + backward.
    let xx = Var::randn(0f32, 1f32, (b, 128, 28, 28), &dev).unwrap();
    let w = Var::randn(0f32, 1f32, (128, 128, 3, 3), &dev).unwrap();
    for _ in 0..2 {
        let t0 = Instant::now();
        let y = xx.conv2d(&w, 1, 1, 1, 1).unwrap();
        let t1 = ms(t0);
        let _g = y.sum_all().unwrap().backward().unwrap();
        println!("conv3x3 128 @28: fwd {t1:.1} ms, bwd {:.1} ms", ms(t0) - t1);
    }
    let xs = Tensor::randn(0f32, 1f32, (b, 3, s, s), &dev).unwrap();
    let ws = Var::randn(0f32, 1f32, (16, 3, 3, 3), &dev).unwrap();
    for _ in 0..2 {
        let t0 = Instant::now();
        let y = xs.conv2d(&ws, 1, 2, 1, 1).unwrap();
        let t1 = ms(t0);
        let _g = y.sum_all().unwrap().backward().unwrap();
        println!("stem conv: fwd {t1:.1} ms, bwd {:.1} ms", ms(t0) - t1);
    }
}

#[test]
#[ignore = "profiling"]
fn profile_fwd_bwd_blocks() {
    use candle_core::{DType, ModuleT, Var};
    use candle_nn::{VarBuilder, VarMap};
    use onehead::ops::channel::hard_swish;
    use onehead::ops::conv2d_im2col;
    let dev = Device::Cpu;
    let b = 16;
    let fb = |name: &str, x: &Var, f: &dyn Fn(&Tensor) -> Tensor| {
        let _ = f(x);
        let t0 = Instant::now();
        let y = f(x);
        let t1 = ms(t0);
        let _g = y.sum_all().unwrap().backward().unwrap();
        println!("{name:<40} fwd {t1:7.1} ms  bwd {:7.1} ms", ms(t0) - t1);
    };
    let x = Var::randn(0f32, 1f32, (b, 72, 56, 56), &dev).unwrap();
    let vm = VarMap::new();
    let bn = onehead::model::layers::batch_norm(72, VarBuilder::from_varmap(&vm, DType::F32, &dev))
        .unwrap();
    fb("bn train 72@56", &x, &|t| bn.forward_t(t, true).unwrap());
    fb("hardswish 72@56", &x, &|t| hard_swish(t).unwrap());
    fb("relu 72@56", &x, &|t| t.relu().unwrap());
    let k = Var::randn(0f32, 1f32, (72, 1, 3, 3), &dev).unwrap();
    fb("dw k3 s2 72@56", &x, &|t| {
        onehead::ops::depthwise_conv2d(t, &k, 2, 1).unwrap()
    });
    let w = Var::randn(0f32, 1f32, (24, 72), &dev).unwrap();
    fb("pw 72->24 @56", &x, &|t| {
        w.broadcast_matmul(&t.reshape((b, 72, 56 * 56)).unwrap())
            .unwrap()
    });
    let x2 = Var::randn(0f32, 1f32, (b, 128, 28, 28), &dev).unwrap();
    let w2 = Var::randn(0f32, 1f32, (128, 128, 3, 3), &dev).unwrap();
    fb("im2col conv 128 k3 @28", &x2, &|t| {
        conv2d_im2col(t, &w2, 1, 1).unwrap()
    });
    let x3 = Var::randn(0f32, 1f32, (b, 3, 224, 224), &dev).unwrap();
    let w3 = Var::randn(0f32, 1f32, (16, 3, 3, 3), &dev).unwrap();
    fb("im2col stem 3->16 s2 @224", &x3, &|t| {
        conv2d_im2col(t, &w3, 2, 1).unwrap()
    });
    let x4 = Var::randn(0f32, 1f32, (b, 16, 112, 112), &dev).unwrap();
    let vm4 = VarMap::new();
    let bn4 =
        onehead::model::layers::batch_norm(16, VarBuilder::from_varmap(&vm4, DType::F32, &dev))
            .unwrap();
    fb("bn train 16@112", &x4, &|t| bn4.forward_t(t, true).unwrap());
    fb("hardswish 16@112", &x4, &|t| hard_swish(t).unwrap());
}

#[test]
#[ignore = "profiling: run under `perf record`"]
fn train_steps_224() {
    let r = onehead::bench::bench_train_step(224, 16, 3, &Device::Cpu).unwrap();
    println!("training {r}");
}

#[test]
#[ignore = "profiling: run under `perf record`"]
fn infer_b1_224() {
    let r = onehead::bench::bench_inference(224, 1, 200, &Device::Cpu).unwrap();
    println!("inference {r}");
}

/// Achieved sgemm GFLOP/s of the `gemm` crate (what candle and the fused kernels call) on
/// conv-like shapes, all threads.
#[test]
#[ignore = "profiling"]
fn sgemm_peak() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for &(m, n, k) in &[
        (512usize, 512usize, 512usize),
        (1024, 1024, 1024),
        (128, 12544, 1152),
        (128, 784, 1152),
        (1152, 784, 128),
        (128, 1152, 784),
        (72, 200704, 16),
        (576, 784, 96),
    ] {
        let a = vec![1.0f32; m * k];
        let b = vec![1.0f32; k * n];
        let mut c = vec![0.0f32; m * n];
        let run = |c: &mut [f32]| unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        };
        run(&mut c);
        let reps = (2e9 / (2.0 * (m * n * k) as f64)).clamp(3.0, 200.0) as usize;
        let t0 = Instant::now();
        for _ in 0..reps {
            run(&mut c);
        }
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "sgemm m{m} n{n} k{k}: {:.2} ms, {:.1} GFLOP/s",
            s * 1e3,
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
}

/// The fused executor's depthwise kernels on MobileNetV3-Small's depthwise layers (batch 16,
/// 224×224): forward, input gradient, kernel gradient, summed over the network.
#[test]
#[ignore = "profiling"]
fn fused_depthwise_kernels() {
    use onehead::ops::fused::kernels::{
        depthwise_bwd_input, depthwise_bwd_kernel, depthwise_fwd, ConvGeom,
    };
    // (C, H, k, stride, count in the network) at 224 input.
    let layers = [
        (16, 112, 3, 2, 1),
        (72, 56, 3, 2, 1),
        (88, 28, 3, 1, 1),
        (96, 28, 5, 2, 1),
        (240, 14, 5, 1, 2),
        (120, 14, 5, 1, 1),
        (144, 14, 5, 1, 1),
        (288, 14, 5, 2, 1),
        (576, 7, 5, 1, 2),
    ];
    let b = 16;
    let (mut tf, mut ti, mut tk) = (0f64, 0f64, 0f64);
    for &(c, h, k, s, count) in &layers {
        let g = ConvGeom::new(b, c, h, h, k, s);
        let x: Vec<f32> = (0..c * b * h * h).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..c * k * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..c * b * g.ho * g.wo).map(|i| (i % 3) as f32).collect();
        let mut y = vec![0f32; dy.len()];
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; w.len()];
        let reps = 10;
        // CPU time of the whole process (all threads): robust to other processes on the
        // machine. Run with RAYON_NUM_THREADS=1 for a per-core figure.
        let t = |f: &mut dyn FnMut()| {
            f();
            let t0 = cpu_time_s();
            for _ in 0..reps {
                f();
            }
            (cpu_time_s() - t0) * 1e3 / reps as f64
        };
        let a = t(&mut || depthwise_fwd(&g, &x, &w, &mut y, None));
        let bb = t(&mut || depthwise_bwd_input(&g, &dy, &w, &mut dx));
        let cc = t(&mut || depthwise_bwd_kernel(&g, &x, &dy, &mut dw));
        println!("dw c{c} {h}x{h} k{k} s{s}: fwd {a:.2} ms, bwd-in {bb:.2} ms, bwd-k {cc:.2} ms");
        tf += a * count as f64;
        ti += bb * count as f64;
        tk += cc * count as f64;
    }
    println!("network total: fwd {tf:.1} ms, bwd-in {ti:.1} ms, bwd-k {tk:.1} ms");
}

/// CPU seconds used by this process so far (user + system, all threads).
fn cpu_time_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The dense 3×3 conv gemm (M=128, K=1152, N=4096) with the operands in every storage
/// order the executor could use: which one the `gemm` crate runs fastest.
#[test]
#[ignore = "profiling"]
fn sgemm_layouts() {
    let threads = rayon::current_num_threads();
    for (m, n, k) in [
        (128usize, 4096usize, 1152usize),
        (4096, 128, 1152),
        (1152, 4096, 128),
        (4096, 1152, 128),
        (128, 1152, 4096),
        (1152, 128, 4096),
    ] {
        println!("m{m} n{n} k{k}");
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        // Every storage order (d: dst, l: lhs, r: rhs; R row-major, C column-major).
        let mut cases = Vec::new();
        for code in 0..8u32 {
            let (dc, lc, rc) = (code & 4 != 0, code & 2 != 0, code & 1 != 0);
            let name = format!(
                "d{} l{} r{}",
                if dc { 'C' } else { 'R' },
                if lc { 'C' } else { 'R' },
                if rc { 'C' } else { 'R' }
            );
            let (dcs, drs) = if dc { (m, 1) } else { (1, n) };
            let (lcs, lrs) = if lc { (m, 1) } else { (1, k) };
            let (rcs, rrs) = if rc { (k, 1) } else { (1, n) };
            cases.push((name, dcs, drs, lcs, lrs, rcs, rrs));
        }
        for (name, dcs, drs, lcs, lrs, rcs, rrs) in cases {
            let run = |c: &mut [f32]| unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    dcs as isize,
                    drs as isize,
                    false,
                    a.as_ptr(),
                    lcs as isize,
                    lrs as isize,
                    b.as_ptr(),
                    rcs as isize,
                    rrs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            };
            run(&mut c);
            let reps = 20;
            let t0 = cpu_time_s();
            for _ in 0..reps {
                run(&mut c);
            }
            let s = (cpu_time_s() - t0) / reps as f64;
            println!(
                "  {name:<20} {:.2} ms cpu, {:.1} GFLOP/s per cpu-second",
                s * 1e3,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
    }
}
