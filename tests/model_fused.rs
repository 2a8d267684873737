//! The fused CPU executor (`ops::fused`) against candle's composed ops: every layer kind on
//! its own (forward, input gradient, parameter gradients; odd sizes, stride 2), and the whole
//! model against its per-layer path (outputs, every parameter gradient, running statistics).

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::{Executor, OneHead, OneHeadConfig};
use onehead::ops::fused::{self, Act, BnRef, ConvKind, PlanBuilder};
use onehead::ops::upsample_nearest2x;

fn var(shape: &[usize], seed: u64) -> Var {
    // Deterministic pseudo-random values in [-1, 1).
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `|a − b|∞ ≤ tol · max(1, |b|∞)`.
fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let d = max_abs(&(a - b).unwrap());
    let scale = max_abs(b).max(1.0);
    assert!(d <= tol * scale, "{what}: max diff {d} (scale {scale})");
}

/// A fixed random projection of `y` to a scalar loss (so every output element matters).
/// The head map split as the report's layout: seg 21 | det 5 + 10 (per cell) | cls 10 (pooled).
struct Out {
    seg: Tensor,
    det: Tensor,
    cls: Tensor,
}

/// Every head of `a` within 1e-4 (relative) of `b`.
fn assert_outputs_close(a: &Out, b: &Out, what: &str) {
    assert_close(&a.seg, &b.seg, 1e-4, &format!("{what}: seg"));
    assert_close(&a.det, &b.det, 1e-4, &format!("{what}: det"));
    assert_close(&a.cls, &b.cls, 1e-4, &format!("{what}: cls"));
}

fn split(map: Tensor) -> Out {
    Out {
        seg: map.narrow(1, 0, 21).unwrap(),
        det: onehead::tasks::det::cells(&map.narrow(1, 21, 15).unwrap()).unwrap(),
        cls: onehead::tasks::cls::logits(&map.narrow(1, 36, 10).unwrap()).unwrap(),
    }
}

fn loss_of(y: &Tensor, seed: u64) -> Tensor {
    let r = var(y.dims(), seed);
    (y * r.as_tensor()).unwrap().sum_all().unwrap()
}

/// Run `plan(x)` fused and `reference(x)` composed; compare the outputs and the gradients of
/// a random projection with respect to x and `params`.
fn check<F, R>(name: &str, x: &Var, params: &[&Var], build: F, reference: R)
where
    F: Fn(&mut PlanBuilder) -> fused::Id,
    R: Fn(&Tensor) -> Tensor,
{
    let mut pb = PlanBuilder::new();
    let out = build(&mut pb);
    let y = pb.finish(out).run(x.as_tensor(), true).unwrap();
    let y_ref = reference(x.as_tensor());
    assert_close(&y, &y_ref, 1e-5, &format!("{name}: forward"));
    let g = loss_of(&y, 7).backward().unwrap();
    let g_ref = loss_of(&y_ref, 7).backward().unwrap();
    assert_close(
        g.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
        1e-4,
        &format!("{name}: input gradient"),
    );
    for (i, p) in params.iter().enumerate() {
        assert_close(
            g.get(p.as_tensor()).unwrap(),
            g_ref.get(p.as_tensor()).unwrap(),
            1e-4,
            &format!("{name}: parameter {i} gradient"),
        );
    }
}

#[test]
fn dense_conv_matches_candle_odd_sizes_stride_2_and_winograd() {
    for &(b, c, h, w, o, k, s) in &[
        (2, 5, 9, 7, 6, 3, 2),
        (3, 4, 7, 7, 3, 3, 1),
        (1, 3, 11, 9, 8, 3, 2),
        (2, 6, 5, 5, 4, 1, 2),
        (17, 3, 7, 5, 4, 3, 2),
        // 3×3 stride 1 over 8 or more images: Winograd F(4×4, 3×3), even and odd maps.
        (9, 4, 6, 8, 5, 3, 1),
        (20, 3, 7, 5, 6, 3, 1),
        // The stem's direct forward (whole 16-image lanes, 16 output channels, few taps),
        // odd maps and two channel blocks.
        (16, 3, 9, 7, 16, 3, 2),
        (32, 3, 8, 8, 32, 3, 2),
    ] {
        let x = var(&[b, c, h, w], 1);
        let wt = var(&[o, c, k, k], 2);
        let bias = var(&[o], 3);
        let (wt2, bias2) = (wt.as_tensor().clone(), bias.as_tensor().clone());
        check(
            &format!("dense conv {b}x{c}x{h}x{w} -> {o}, k{k} s{s}"),
            &x,
            &[&wt, &bias],
            |pb| {
                let i = pb.input();
                pb.conv(
                    i,
                    wt.as_tensor(),
                    Some(bias.as_tensor()),
                    ConvKind::Dense { k, stride: s },
                )
                .unwrap()
            },
            move |x| {
                x.conv2d(&wt2, k / 2, s, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias2.reshape((1, o, 1, 1)).unwrap())
                    .unwrap()
            },
        );
    }
}

#[test]
fn depthwise_conv_matches_candle_odd_sizes_and_stride_2() {
    for &(b, c, h, w, k, s) in &[
        (2, 3, 9, 11, 5, 2),
        (3, 4, 7, 5, 3, 1),
        (1, 2, 3, 3, 5, 1),
        (2, 3, 8, 6, 3, 2),
        // Lane blocks of 16 + 4 and 8 + 1 (the kernels vectorise over the batch).
        (20, 3, 9, 7, 5, 2),
        (9, 2, 6, 5, 3, 1),
        (16, 2, 5, 5, 5, 1),
    ] {
        let x = var(&[b, c, h, w], 4);
        let wt = var(&[c, 1, k, k], 5);
        let wt2 = wt.as_tensor().clone();
        check(
            &format!("depthwise {b}x{c}x{h}x{w}, k{k} s{s}"),
            &x,
            &[&wt],
            |pb| {
                let i = pb.input();
                pb.conv(
                    i,
                    wt.as_tensor(),
                    None,
                    ConvKind::Depthwise { k, stride: s },
                )
                .unwrap()
            },
            move |x| x.conv2d(&wt2, k / 2, s, 1, c).unwrap(),
        );
    }
}

#[test]
fn pointwise_conv_matches_candle() {
    // The second has 9216 pixel columns: its weight gradient is summed in parts side by side.
    for (b, c, h, w, o) in [(3, 7, 5, 3, 4), (16, 7, 24, 24, 4)] {
        pointwise_case(b, c, h, w, o);
    }
}

fn pointwise_case(b: usize, c: usize, h: usize, w: usize, o: usize) {
    let x = var(&[b, c, h, w], 6);
    let wt = var(&[o, c, 1, 1], 7);
    let wt2 = wt.as_tensor().clone();
    check(
        "pointwise",
        &x,
        &[&wt],
        |pb| {
            let i = pb.input();
            pb.conv(i, wt.as_tensor(), None, ConvKind::Pointwise)
                .unwrap()
        },
        move |x| x.conv2d(&wt2, 0, 1, 1, 1).unwrap(),
    );
}

/// BatchNorm with batch statistics, composed from candle ops.
fn bn_reference(
    x: &Tensor,
    g: &Tensor,
    b: &Tensor,
    train: bool,
    rm: &Tensor,
    rv: &Tensor,
) -> Tensor {
    let c = x.dim(1).unwrap();
    let sh = (1, c, 1, 1);
    let (mean, var) = if train {
        let xt = x
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((c, ()))
            .unwrap();
        let mean = xt.mean_keepdim(1).unwrap();
        let var = xt
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_keepdim(1)
            .unwrap();
        (mean.reshape(sh).unwrap(), var.reshape(sh).unwrap())
    } else {
        (rm.reshape(sh).unwrap(), rv.reshape(sh).unwrap())
    };
    let xhat = x
        .broadcast_sub(&mean)
        .unwrap()
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    xhat.broadcast_mul(&g.reshape(sh).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(sh).unwrap())
        .unwrap()
}

fn act_reference(x: &Tensor, act: Act) -> Tensor {
    match act {
        Act::None => x.clone(),
        Act::Relu => x.relu().unwrap(),
        Act::HardSwish => (x * candle_nn::ops::hard_sigmoid(x).unwrap()).unwrap(),
        Act::HardSigmoid => candle_nn::ops::hard_sigmoid(x).unwrap(),
    }
}

#[test]
fn batch_norm_act_matches_candle_train_and_eval() {
    for &(train, act) in &[
        (true, Act::HardSwish),
        (true, Act::Relu),
        (true, Act::None),
        (false, Act::HardSwish),
        (false, Act::Relu),
    ] {
        let (b, c, h, w) = (3, 4, 5, 3);
        // Scaled so hard-swish sees values on both sides of ±3.
        let x = Var::from_tensor(&(var(&[b, c, h, w], 8).as_tensor() * 4.0).unwrap()).unwrap();
        let g = var(&[c], 9);
        let bb = var(&[c], 10);
        let rm = Var::from_tensor(&(var(&[c], 11).as_tensor() * 0.1).unwrap()).unwrap();
        let rv =
            Var::from_tensor(&(var(&[c], 12).as_tensor().abs().unwrap() + 0.5).unwrap()).unwrap();
        let (rm0, rv0) = (
            rm.as_tensor().copy().unwrap(),
            rv.as_tensor().copy().unwrap(),
        );
        let bn = BnRef {
            running_mean: rm.clone(),
            running_var: rv.clone(),
            eps: 1e-5,
            momentum: 0.1,
            train,
        };
        let (g2, b2) = (g.as_tensor().clone(), bb.as_tensor().clone());
        check(
            &format!("batch norm train={train} {act:?}"),
            &x,
            &[&g, &bb],
            |pb| {
                let i = pb.input();
                pb.bn_act(i, g.as_tensor(), bb.as_tensor(), bn.clone(), act)
            },
            |x| act_reference(&bn_reference(x, &g2, &b2, train, &rm0, &rv0), act),
        );
        if train {
            // Running statistics: momentum 0.1, unbiased variance (one forward ran in check).
            let m = (b * h * w) as f64;
            let xt = x
                .as_tensor()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((c, ()))
                .unwrap();
            let mean = xt.mean(1).unwrap();
            let var = xt
                .broadcast_sub(&xt.mean_keepdim(1).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean(1)
                .unwrap();
            let want_m = ((&rm0 * 0.9).unwrap() + (mean * 0.1).unwrap()).unwrap();
            let want_v = ((&rv0 * 0.9).unwrap() + (var * (0.1 * m / (m - 1.0))).unwrap()).unwrap();
            assert_close(rm.as_tensor(), &want_m, 1e-6, "running mean");
            assert_close(rv.as_tensor(), &want_v, 1e-6, "running var");
        } else {
            assert_close(rm.as_tensor(), &rm0, 0.0, "running mean unchanged in eval");
        }
    }
}

#[test]
fn squeeze_excite_matches_candle() {
    let (b, c, h, w, rd) = (3, 6, 5, 3, 4);
    let x = var(&[b, c, h, w], 13);
    let wr = var(&[rd, c, 1, 1], 14);
    let br = var(&[rd], 15);
    let we = Var::from_tensor(&(var(&[c, rd, 1, 1], 16).as_tensor() * 3.0).unwrap()).unwrap();
    let be = var(&[c], 17);
    let t = |v: &Var| v.as_tensor().clone();
    let (wr2, br2, we2, be2) = (t(&wr), t(&br), t(&we), t(&be));
    check(
        "squeeze-excite",
        &x,
        &[&wr, &br, &we, &be],
        |pb| {
            let i = pb.input();
            pb.se(
                i,
                wr.as_tensor(),
                br.as_tensor(),
                we.as_tensor(),
                be.as_tensor(),
            )
            .unwrap()
        },
        move |x| {
            let s = x.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap();
            let s = s
                .conv2d(&wr2, 0, 1, 1, 1)
                .unwrap()
                .broadcast_add(&br2.reshape((1, rd, 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap();
            let e = s
                .conv2d(&we2, 0, 1, 1, 1)
                .unwrap()
                .broadcast_add(&be2.reshape((1, c, 1, 1)).unwrap())
                .unwrap();
            x.broadcast_mul(&candle_nn::ops::hard_sigmoid(&e).unwrap())
                .unwrap()
        },
    );
}

#[test]
fn residual_add_upsample_add_and_act_match_candle() {
    // y = relu(up2(conv_s2(x)) + x) + x: exercises Add, Up2Add, Act and gradient accumulation
    // into a value with three consumers.
    let (b, c, h, w) = (2, 3, 6, 4);
    let x = var(&[b, c, h, w], 18);
    let wt = var(&[c, c, 3, 3], 19);
    let wt2 = wt.as_tensor().clone();
    check(
        "add / upsample-add / relu",
        &x,
        &[&wt],
        |pb| {
            let i = pb.input();
            let d = pb
                .conv(i, wt.as_tensor(), None, ConvKind::Dense { k: 3, stride: 2 })
                .unwrap();
            let u = pb.up2_add(d, i);
            let r = pb.act(u, Act::Relu);
            pb.add(r, i)
        },
        move |x| {
            let d = x.conv2d(&wt2, 1, 2, 1, 1).unwrap();
            let u = (upsample_nearest2x(&d).unwrap() + x).unwrap();
            (u.relu().unwrap() + x).unwrap()
        },
    );
}

/// A model whose every variable is set deterministically from its name (non-trivial
/// BatchNorm parameters and statistics, so that every term is tested).
fn deterministic_model() -> (VarMap, OneHead) {
    let cfg = OneHeadConfig::default();
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = OneHead::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    {
        let d = vm.data().lock().unwrap();
        for (name, v) in d.iter() {
            let seed = name
                .bytes()
                .fold(17u64, |h, c| h.wrapping_mul(31).wrapping_add(c as u64));
            let r = var(v.dims(), seed).as_tensor().clone();
            let t = if name.ends_with("running_var") {
                (r.abs().unwrap() + 0.5).unwrap()
            } else if name.contains(".bn") && name.ends_with("weight") {
                ((r * 0.3).unwrap() + 1.0).unwrap()
            } else if name.ends_with("running_mean") || name.contains(".bn") {
                (r * 0.3).unwrap()
            } else {
                // Conv weights: scaled like a fan-in init so activations stay O(1).
                let fan_in = (v.elem_count() / v.dims()[0]).max(1) as f64;
                (r * (3.0 / fan_in).sqrt()).unwrap()
            };
            v.set(&t).unwrap();
        }
    }
    (vm, m)
}

/// Two models with identical parameters and running statistics: the first runs the fused
/// executor, the second candle's per-layer ops.
fn twin_models() -> (VarMap, OneHead, VarMap, OneHead) {
    let (vm_a, a) = deterministic_model();
    let (vm_b, b) = deterministic_model();
    (
        vm_a,
        a.with_executor(Executor::Fused),
        vm_b,
        b.with_executor(Executor::PerLayer),
    )
}

fn image(b: usize, h: usize, w: usize, seed: u64) -> Tensor {
    var(&[b, 3, h, w], seed).as_tensor().clone()
}

/// The whole model, fused vs per-layer: outputs, every gradient, running statistics.
fn compare_whole_model(backbone_train: bool, head_train: bool, batch: usize, h: usize, w: usize) {
    let (vm_a, a, vm_b, b) = twin_models();
    let x = image(batch, h, w, 20);
    let loss = |o: &Out| {
        ((loss_of(&o.seg, 1) + loss_of(&o.det, 2)).unwrap() + loss_of(&o.cls, 3)).unwrap()
    };
    let oa = split(a.forward_parts(&x, backbone_train, head_train).unwrap());
    let ob = split(b.forward_parts(&x, backbone_train, head_train).unwrap());
    let what = format!("train=({backbone_train},{head_train}) {batch}x{h}x{w}");
    assert_outputs_close(&oa, &ob, &what);
    let ga = loss(&oa).backward().unwrap();
    let gb = loss(&ob).backward().unwrap();
    let da = vm_a.data().lock().unwrap();
    let db = vm_b.data().lock().unwrap();
    let mut compared = 0;
    let mut pairs = Vec::new();
    for (name, va) in da.iter() {
        let vb = &db[name];
        match (ga.get(va.as_tensor()), gb.get(vb.as_tensor())) {
            (Some(x), Some(y)) => {
                pairs.push((name.clone(), max_abs(&(x - y).unwrap()), max_abs(y)));
                compared += 1;
            }
            (None, None) => {}
            (x, y) => panic!(
                "{what}: gradient of {name}: fused {} vs per-layer {}",
                x.is_some(),
                y.is_some()
            ),
        }
        assert_close(
            va.as_tensor(),
            vb.as_tensor(),
            1e-5,
            &format!("{what}: value of {name}"),
        );
    }
    // Relative to each tensor's own magnitude, with a floor at 1e-3 of the largest gradient
    // of the model: BatchNorm biases that feed another batch-statistics BatchNorm through a
    // linear conv have a true gradient of exactly 0: both paths return cancellation noise
    // (up to ~1e-4 here, against a largest gradient of ~400).
    let global = pairs.iter().map(|p| p.2).fold(0f32, f32::max);
    let mut worst = (0f32, String::new());
    for (name, diff, mag) in &pairs {
        let rel = diff / mag.max(1e-3 * global);
        assert!(
            rel <= 2e-3,
            "{what}: gradient of {name}: |diff| {diff:.3e}, |per-layer| {mag:.3e}, largest gradient {global:.3e}"
        );
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    eprintln!(
        "{what}: worst gradient difference {:.2e} ({}), relative to max(|grad|, 1e-3·{global:.2e})",
        worst.0, worst.1
    );
    // Every parameter except the unused FPN output convs (layer_blocks.1/.2, weight and bias)
    // and the running statistics.
    let trainable = da
        .keys()
        .filter(|n| {
            !n.contains("running_")
                && !n.contains("layer_blocks.1")
                && !n.contains("layer_blocks.2")
        })
        .count();
    assert_eq!(compared, trainable, "{what}: gradients compared");
}

#[test]
fn whole_model_matches_per_layer_path_in_training() {
    compare_whole_model(true, true, 3, 64, 96);
}

/// The engine's batch layout: 16 + 4 replayed images (lane blocks of 16 and 4).
#[test]
fn whole_model_matches_per_layer_path_at_batch_20() {
    compare_whole_model(true, true, 20, 32, 64);
    compare_whole_model(false, true, 17, 32, 32);
}

/// Whole 16-image lanes at 96×96: the stem's direct forward and its weight gradient summed in
/// chunks side by side, the first 1×1 convs' weight gradients in parts (24×24×16 columns).
#[test]
fn whole_model_matches_per_layer_path_at_batch_16() {
    compare_whole_model(true, true, 16, 96, 96);
}

#[test]
fn whole_model_matches_per_layer_path_with_frozen_backbone_bn() {
    compare_whole_model(false, true, 3, 64, 64);
}

#[test]
fn whole_model_matches_per_layer_path_in_eval() {
    let (_va, a, _vb, b) = twin_models();
    let x = image(2, 96, 64, 21);
    let oa = split(a.forward_t(&x, false).unwrap());
    let ob = split(b.forward_t(&x, false).unwrap());
    assert_outputs_close(&oa, &ob, "eval");
    // An evaluation forward keeps no activations but stays differentiable (the backward
    // recomputes them): same gradients as the per-layer path, also for a second backward.
    let ga = loss_of(&oa.seg, 6).backward().unwrap();
    let ga2 = loss_of(&oa.seg, 6).backward().unwrap();
    let gb = loss_of(&ob.seg, 6).backward().unwrap();
    let da = _va.data().lock().unwrap();
    let db = _vb.data().lock().unwrap();
    for (name, v) in da.iter() {
        if let Some(g) = ga.get(v.as_tensor()) {
            let gref = gb.get(db[name].as_tensor()).unwrap();
            assert_close(g, gref, 2e-3, &format!("eval gradient of {name}"));
            assert_close(ga2.get(v.as_tensor()).unwrap(), g, 0.0, "second backward");
        }
    }
    drop((da, db));
    // Same input again: bit-identical outputs.
    let od = split(a.forward_t(&x.detach(), false).unwrap());
    assert_close(&od.seg, &oa.seg, 0.0, "eval seg again");
    // 16 images: the lane kernels, each BatchNorm applied by the convolution before it
    // (the stem's direct kernel, depthwise channels, 1×1 column blocks).
    let x16 = image(16, 64, 96, 22);
    let (oa, ob) = (
        split(a.forward_t(&x16, false).unwrap()),
        split(b.forward_t(&x16, false).unwrap()),
    );
    assert_outputs_close(&oa, &ob, "eval b16");
}

/// `OneHead::inference` (the fused plan prepared once): the values of `forward_t(x, false)`
/// bit for bit, on both executors; a snapshot (a weight changed afterwards does not reach it,
/// a new one sees it); refused for a plan with train-mode BatchNorm.
#[test]
fn prepared_inference_is_the_eval_forward_and_a_snapshot() {
    let (va, a, _vb, b) = twin_models();
    for (m, what) in [(&a, "fused"), (&b, "per-layer")] {
        let inf = m.inference().unwrap();
        for x in [image(1, 64, 96, 24), image(16, 64, 64, 25)] {
            let want = m.forward_t(&x, false).unwrap();
            let got = inf.forward(&x).unwrap();
            assert_close(&got, &want, 0.0, what);
        }
    }
    let x = image(2, 64, 64, 26);
    let inf = a.inference().unwrap();
    let before = inf.forward(&x).unwrap();
    let w = va.data().lock().unwrap()["head.out.weight"].clone();
    w.set(&(w.as_tensor() * 2.0).unwrap()).unwrap();
    assert_close(&inf.forward(&x).unwrap(), &before, 0.0, "snapshot");
    let after = a.inference().unwrap().forward(&x).unwrap();
    assert!(
        max_abs(&(after.clone() - &before).unwrap()) > 1e-3,
        "a new one sees it"
    );
    assert_close(&after, &a.forward_t(&x, false).unwrap(), 0.0, "new weights");
    let mut pb = PlanBuilder::new();
    let mean = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let var1 = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let (g, bb) = (var(&[3], 1), var(&[3], 2));
    let bn = BnRef {
        running_mean: mean,
        running_var: var1,
        eps: 1e-3,
        momentum: 0.1,
        train: true,
    };
    let input = pb.input();
    let y = pb.bn_act(input, g.as_tensor(), bb.as_tensor(), bn, Act::Relu);
    let err = pb
        .finish(y)
        .prepare()
        .err()
        .expect("train-mode BatchNorm refused");
    assert!(err.to_string().contains("evaluation"), "{err}");
}

/// One image: the batch-1 kernels (the stem's small-batch direct conv, Winograd with lanes
/// over tiles, the depthwise row kernel, one-lane squeeze-excite and upsampling) against
/// candle's ops, forward and the gradients of a backward through them.
#[test]
fn whole_model_matches_per_layer_path_at_batch_1() {
    let (va, a, vb, b) = twin_models();
    let x = image(1, 96, 128, 23);
    let oa = split(a.forward_t(&x, false).unwrap());
    let ob = split(b.forward_t(&x, false).unwrap());
    assert_outputs_close(&oa, &ob, "b1");
    let ga = loss_of(&oa.seg, 7).backward().unwrap();
    let gb = loss_of(&ob.seg, 7).backward().unwrap();
    let (da, db) = (va.data().lock().unwrap(), vb.data().lock().unwrap());
    let mut checked = 0;
    for (name, v) in da.iter() {
        if let Some(g) = ga.get(v.as_tensor()) {
            let gref = gb.get(db[name].as_tensor()).unwrap();
            assert_close(g, gref, 2e-3, &format!("b1 gradient of {name}"));
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} gradients compared");
}

#[test]
fn fused_model_gradient_wrt_input_matches() {
    let (_va, a, _vb, b) = twin_models();
    let xv = Var::from_tensor(&image(2, 64, 64, 22)).unwrap();
    let oa = split(a.forward_t(xv.as_tensor(), true).unwrap());
    let ob = split(b.forward_t(xv.as_tensor(), true).unwrap());
    let ga = loss_of(&oa.seg, 4).backward().unwrap();
    let gb = loss_of(&ob.seg, 4).backward().unwrap();
    assert_close(
        ga.get(xv.as_tensor()).unwrap(),
        gb.get(xv.as_tensor()).unwrap(),
        2e-3,
        "input gradient",
    );
}

#[test]
fn fused_training_is_bit_deterministic() {
    let run = || {
        let (_va, a, _vb, _b) = twin_models();
        let x = image(4, 64, 64, 23);
        let o = split(a.forward_t(&x, true).unwrap());
        let g = loss_of(&o.seg, 5).backward().unwrap();
        let w = a_first_weight_grad(&g, &_va);
        (o.seg.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w)
    };
    let (s1, w1) = run();
    let (s2, w2) = run();
    assert!(s1 == s2 && w1 == w2, "two identical runs differ");
}

fn a_first_weight_grad(g: &candle_core::backprop::GradStore, vm: &VarMap) -> Vec<f32> {
    let d = vm.data().lock().unwrap();
    let mut names: Vec<&String> = d.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        if let Some(t) = g.get(d[n].as_tensor()) {
            out.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
    out
}

#[test]
fn conv_and_module_paths_agree_for_a_single_layer() {
    // The Module/ModuleT API still goes through the per-layer ops (only OneHead fuses).
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let bn = onehead::model::layers::batch_norm(3, vb.pp("bn")).unwrap();
    let x = image(2, 8, 8, 24);
    let y = bn.forward_t(&x, false).unwrap();
    assert_eq!(y.dims(), x.dims());
    let conv = onehead::model::layers::Conv::new(
        3,
        4,
        3,
        1,
        onehead::model::layers::ConvKind::Dense,
        true,
        candle_nn::Init::Const(0.5),
        candle_nn::Init::Const(0.0),
        vb.pp("c"),
    )
    .unwrap();
    assert_eq!(conv.forward(&x).unwrap().dims(), &[2, 4, 8, 8]);
}
