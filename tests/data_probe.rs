//! Difficulty probe for the synthetic benchmark (not a test; not run by default): trains a
//! tiny from-scratch CNN briefly on the classification and segmentation sets and prints
//! Top-1 and mIoU. A pretrained MobileNetV3 should do better than this probe; if the probe
//! is near perfect the benchmark is too easy. Run:
//! `cargo test --release --test data_probe -- --ignored --nocapture` (about 10 min on 2
//! shared cores). Measured once at seed 0, 96 px, 25 epochs, 5-conv net from scratch:
//! cls Top-1 0.55, seg mIoU 0.30 (stride-4 logits, 21 classes incl. background).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{conv2d, linear, Conv2dConfig, Optimizer, VarBuilder, VarMap};
use onehead::data::{generate, Split, SynthOptions};
use onehead::tasks::cls::ClsSplit;
use onehead::tasks::seg::SegSplit;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const S: usize = 96;

struct Trunk {
    convs: Vec<candle_nn::Conv2d>,
}

impl Trunk {
    fn new(vb: VarBuilder, widths: &[usize]) -> Trunk {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut convs = Vec::new();
        let mut c = 3;
        for (i, &w) in widths.iter().enumerate() {
            convs.push(conv2d(c, w, 3, cfg, vb.pp(format!("c{i}"))).unwrap());
            c = w;
        }
        Trunk { convs }
    }

    /// Conv-ReLU, 2x max-pool after each of the first `pools` convs.
    fn forward(&self, x: &Tensor, pools: usize) -> Tensor {
        let mut x = x.clone();
        for (i, c) in self.convs.iter().enumerate() {
            x = c.forward(&x).unwrap().relu().unwrap();
            if i < pools {
                x = x.max_pool2d(2).unwrap();
            }
        }
        x
    }
}

fn probe_cls(root: &std::path::Path, dev: &Device) -> f32 {
    let tr = ClsSplit::open(root, Split::Train, S, false).unwrap();
    let va = ClsSplit::open(root, Split::Val, S, false).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let trunk = Trunk::new(vb.pp("t"), &[24, 48, 64, 96, 96]);
    let head = linear(96, 10, vb.pp("h")).unwrap();
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 2e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let label = |b: &(Tensor, Vec<usize>)| {
        let v: Vec<u32> = b.1.iter().map(|&c| c as u32).collect();
        Tensor::new(v, dev).unwrap()
    };
    for _epoch in 0..25 {
        let mut idx: Vec<usize> = (0..tr.len()).collect();
        idx.shuffle(&mut rng);
        for chunk in idx.chunks(16) {
            let flips: Vec<onehead::data::Augment> = chunk
                .iter()
                .map(|_| onehead::data::Augment::flip_only(rng.random_bool(0.5)))
                .collect();
            let b = tr.batch(chunk, &flips, dev).unwrap();
            let f = trunk
                .forward(&b.0, 4)
                .mean(D::Minus1)
                .unwrap()
                .mean(D::Minus1)
                .unwrap();
            let loss =
                candle_nn::loss::cross_entropy(&head.forward(&f).unwrap(), &label(&b)).unwrap();
            opt.backward_step(&loss).unwrap();
        }
    }
    let idx: Vec<usize> = (0..va.len()).collect();
    let mut correct = 0;
    for chunk in idx.chunks(30) {
        let b = va.batch(chunk, &[], dev).unwrap();
        let f = trunk
            .forward(&b.0, 4)
            .mean(D::Minus1)
            .unwrap()
            .mean(D::Minus1)
            .unwrap();
        let pred: Vec<u32> = head
            .forward(&f)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let y: Vec<u32> = label(&b).to_vec1().unwrap();
        correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
    }
    correct as f32 / va.len() as f32
}

fn probe_seg(root: &std::path::Path, dev: &Device) -> f32 {
    let tr = SegSplit::open(root, Split::Train, S, false).unwrap();
    let va = SegSplit::open(root, Split::Val, S, false).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let trunk = Trunk::new(vb.pp("t"), &[24, 48, 64, 96, 96]);
    let head = conv2d(96, 21, 1, Default::default(), vb.pp("h")).unwrap();
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 2e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let h = S / 4;
    // Masks subsampled to the logits' stride-4 grid (nearest).
    let low = |b: &(Tensor, Vec<Vec<u8>>)| -> Vec<u32> {
        let m: Vec<u32> = b.1.iter().flatten().map(|&v| v as u32).collect();
        let n = m.len() / (S * S);
        let mut out = Vec::with_capacity(n * h * h);
        for k in 0..n {
            for y in 0..h {
                for x in 0..h {
                    out.push(m[k * S * S + (4 * y + 2) * S + 4 * x + 2]);
                }
            }
        }
        out
    };
    let logits = |b: &(Tensor, Vec<Vec<u8>>)| {
        let l = head.forward(&trunk.forward(&b.0, 2)).unwrap(); // (B,21,h,h)
        l.permute((0, 2, 3, 1)).unwrap().reshape(((), 21)).unwrap()
    };
    for _epoch in 0..25 {
        let mut idx: Vec<usize> = (0..tr.len()).collect();
        idx.shuffle(&mut rng);
        for chunk in idx.chunks(16) {
            let flips: Vec<onehead::data::Augment> = chunk
                .iter()
                .map(|_| onehead::data::Augment::flip_only(rng.random_bool(0.5)))
                .collect();
            let b = tr.batch(chunk, &flips, dev).unwrap();
            let t = low(&b);
            let valid: Vec<f32> = t
                .iter()
                .map(|&v| if v == 255 { 0.0 } else { 1.0 })
                .collect();
            let t: Vec<u32> = t.iter().map(|&v| if v == 255 { 0 } else { v }).collect();
            let nvalid: f32 = valid.iter().sum();
            let lsm = candle_nn::ops::log_softmax(&logits(&b), D::Minus1).unwrap();
            let g = lsm
                .gather(&Tensor::new(t, dev).unwrap().unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            let loss = (g * Tensor::new(valid, dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .affine(-1.0 / nvalid.max(1.0) as f64, 0.0)
                .unwrap();
            opt.backward_step(&loss).unwrap();
        }
    }
    let mut conf = vec![[0usize; 21]; 21];
    let idx: Vec<usize> = (0..va.len()).collect();
    for chunk in idx.chunks(30) {
        let b = va.batch(chunk, &[], dev).unwrap();
        let pred: Vec<u32> = logits(&b).argmax(D::Minus1).unwrap().to_vec1().unwrap();
        for (p, t) in pred.iter().zip(low(&b)) {
            if t != 255 {
                conf[t as usize][*p as usize] += 1;
            }
        }
    }
    let mut ious = Vec::new();
    for (c, row) in conf.iter().enumerate() {
        let tp = row[c];
        let fn_: usize = row.iter().sum::<usize>() - tp;
        let fp: usize = (0..21).map(|r| conf[r][c]).sum::<usize>() - tp;
        if tp + fn_ + fp > 0 {
            ious.push(tp as f32 / (tp + fn_ + fp) as f32);
        }
    }
    ious.iter().sum::<f32>() / ious.len() as f32
}

#[test]
#[ignore]
fn synth_difficulty_probe() {
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), &SynthOptions::default()).unwrap();
    let dev = Device::Cpu;
    let t = std::time::Instant::now();
    let top1 = probe_cls(d.path(), &dev);
    eprintln!(
        "cls probe: top1 {top1:.3} ({:.0} s)",
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    let miou = probe_seg(d.path(), &dev);
    eprintln!(
        "seg probe: mIoU {miou:.3} ({:.0} s)",
        t.elapsed().as_secs_f64()
    );
}
