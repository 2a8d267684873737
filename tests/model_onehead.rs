//! The assembled model: names, shapes, parameter counts, BatchNorm modes, gradients.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::mobilenetv3::make_divisible;
use onehead::model::{count_params, OneHead, OneHeadConfig};

fn build(cfg: &OneHeadConfig) -> (VarMap, OneHead) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = OneHead::new(cfg, vb).unwrap();
    (varmap, model)
}

fn var(varmap: &VarMap, name: &str) -> Tensor {
    varmap
        .data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no variable {name}"))
        .as_tensor()
        .clone()
}

#[test]
fn parameter_counts_match_the_report() {
    let (varmap, _) = build(&OneHeadConfig::default());
    let c = count_params(&varmap);
    // Report: 1,605,602 = backbone 927,008 + FPN 525,056 + head 153,518 + unused Linear(1,10) 20.
    assert_eq!(c.backbone, 927_008);
    assert_eq!(c.neck, 525_056);
    assert_eq!(c.head, 153_518);
    assert_eq!(c.total, 1_605_582);
}

#[test]
fn tensor_names_and_shapes_are_timm_and_torchvision() {
    let (varmap, _) = build(&OneHeadConfig::default());
    let want: &[(&str, &[usize])] = &[
        ("backbone.conv_stem.weight", &[16, 3, 3, 3]),
        ("backbone.bn1.running_var", &[16]),
        ("backbone.blocks.0.0.conv_dw.weight", &[16, 1, 3, 3]),
        ("backbone.blocks.0.0.se.conv_reduce.weight", &[8, 16, 1, 1]),
        ("backbone.blocks.0.0.se.conv_reduce.bias", &[8]),
        ("backbone.blocks.0.0.se.conv_expand.weight", &[16, 8, 1, 1]),
        ("backbone.blocks.0.0.conv_pw.weight", &[16, 16, 1, 1]),
        ("backbone.blocks.0.0.bn2.running_mean", &[16]),
        ("backbone.blocks.1.0.conv_pw.weight", &[72, 16, 1, 1]),
        ("backbone.blocks.1.1.conv_pwl.weight", &[24, 88, 1, 1]),
        ("backbone.blocks.2.0.conv_dw.weight", &[96, 1, 5, 5]),
        ("backbone.blocks.2.0.se.conv_reduce.weight", &[24, 96, 1, 1]),
        (
            "backbone.blocks.2.2.se.conv_reduce.weight",
            &[64, 240, 1, 1],
        ),
        (
            "backbone.blocks.3.0.se.conv_reduce.weight",
            &[32, 120, 1, 1],
        ),
        (
            "backbone.blocks.3.1.se.conv_reduce.weight",
            &[40, 144, 1, 1],
        ),
        (
            "backbone.blocks.4.0.se.conv_reduce.weight",
            &[72, 288, 1, 1],
        ),
        (
            "backbone.blocks.4.2.se.conv_expand.weight",
            &[576, 144, 1, 1],
        ),
        ("backbone.blocks.4.2.bn3.weight", &[96]),
        ("backbone.blocks.5.0.conv.weight", &[576, 96, 1, 1]),
        ("backbone.blocks.5.0.bn1.bias", &[576]),
        ("fpn.inner_blocks.0.0.weight", &[128, 24, 1, 1]),
        ("fpn.inner_blocks.2.0.weight", &[128, 576, 1, 1]),
        ("fpn.inner_blocks.1.0.bias", &[128]),
        ("fpn.layer_blocks.2.0.weight", &[128, 128, 3, 3]),
        ("head.conv.weight", &[128, 128, 3, 3]),
        ("head.out.weight", &[46, 128, 1, 1]),
        ("head.out.bias", &[46]),
    ];
    for (name, dims) in want {
        assert_eq!(var(&varmap, name).dims(), *dims, "{name}");
    }
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    assert!(names
        .iter()
        .all(|n| n.starts_with("backbone.") || n.starts_with("fpn.") || n.starts_with("head.")));
    assert!(!names
        .iter()
        .any(|n| n.contains("conv_head") || n.contains("classifier")));
    // SE widths follow make_divisible(mid/4, 8).
    assert_eq!(make_divisible(16.0 / 4.0, 8), 8);
    assert_eq!(make_divisible(240.0 / 4.0, 8), 64);
    assert_eq!(make_divisible(144.0 / 4.0, 8), 40);
}

#[test]
fn forward_shapes_and_input_check() {
    let cfg = OneHeadConfig::default();
    let (_, model) = build(&cfg);
    let x = Tensor::randn(0f32, 1f32, (2, 3, 64, 96), &Device::Cpu).unwrap();
    let out = model.forward_t(&x, false).unwrap();
    assert_eq!(out.dims(), &[2, 46, 8, 12]);
    let bad = Tensor::zeros((1, 3, 48, 64), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward_t(&bad, false).unwrap_err().to_string();
    assert!(err.contains("multiples of 32"), "{err}");
}

#[test]
fn task_views_of_the_head_map() {
    use onehead::tasks::{cls, det};
    // Channel c holds the value c at every pixel; pixel (y, x) of cell n = y*w + x adds 100·n.
    let (ch, h, w) = (3 + 7 + 4, 2, 3);
    let mut v = Vec::new();
    for c in 0..ch {
        for n in 0..h * w {
            v.push((c + 100 * n) as f32);
        }
    }
    let y = Tensor::from_vec(v, (1, ch, h, w), &Device::Cpu).unwrap();
    // A seg | det | cls layout of 3 | 5 + 2 | 4 channels.
    let d = det::cells(&y.narrow(1, 3, 7).unwrap()).unwrap();
    let d = d.get(0).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(d.len(), 6);
    assert_eq!(d[4], vec![403., 404., 405., 406., 407., 408., 409.]);
    let c = cls::logits(&y.narrow(1, 10, 4).unwrap()).unwrap();
    assert_eq!(c.to_vec2::<f32>().unwrap()[0], vec![260., 261., 262., 263.]);
}

/// `cls::logits` of a channel slice (it pools a contiguous copy) has the bits of the pooling
/// on the strided slice itself, at the head map's shape.
#[test]
fn class_logits_of_a_slice_are_those_of_the_strided_mean() {
    let y = Tensor::randn(0f32, 1f32, (3, 46, 28, 28), &Device::Cpu).unwrap();
    let slice = y.narrow(1, 36, 10).unwrap();
    let strided = slice
        .mean_keepdim(3)
        .unwrap()
        .mean_keepdim(2)
        .unwrap()
        .reshape((3, 10))
        .unwrap();
    let got = onehead::tasks::cls::logits(&slice).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    assert_eq!(bits(&got), bits(&strided));
}

#[test]
fn batchnorm_modes_and_frozen_backbone_stats() {
    let cfg = OneHeadConfig::default();
    let (varmap, model) = build(&cfg);
    let name = "backbone.blocks.1.0.bn1.running_mean";
    let x = Tensor::randn(0.5f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let before = var(&varmap, name).to_vec1::<f32>().unwrap();
    model.forward_t(&x, false).unwrap();
    assert_eq!(var(&varmap, name).to_vec1::<f32>().unwrap(), before);
    model.forward_parts(&x, false, true).unwrap();
    assert_eq!(var(&varmap, name).to_vec1::<f32>().unwrap(), before);
    model.forward_t(&x, true).unwrap();
    let after = var(&varmap, name).to_vec1::<f32>().unwrap();
    assert_ne!(
        after, before,
        "training mode must update running statistics"
    );
    // Eval output is deterministic; train output differs (batch statistics).
    let a = model.forward_t(&x, false).unwrap().flatten_all().unwrap();
    let b = model.forward_t(&x, false).unwrap().flatten_all().unwrap();
    assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
}

#[test]
fn gradients_reach_every_trainable_part() {
    let cfg = OneHeadConfig::default();
    let (varmap, model) = build(&cfg);
    let x = Tensor::randn(0f32, 1f32, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let out = model.forward_t(&x, true).unwrap();
    let loss = out.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for name in [
        "backbone.conv_stem.weight",
        "backbone.blocks.0.0.conv_dw.weight",
        "backbone.blocks.0.0.se.conv_reduce.bias",
        "backbone.blocks.2.1.conv_dw.weight",
        "backbone.blocks.5.0.conv.weight",
        "fpn.inner_blocks.2.0.weight",
        "fpn.layer_blocks.0.0.bias",
        "head.conv.weight",
        "head.out.bias",
    ] {
        let g = grads
            .get(&var(&varmap, name))
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite() && n > 0.0, "{name}: grad norm² {n}");
    }
    // Only the stride-8 FPN output feeds the head.
    assert!(grads
        .get(&var(&varmap, "fpn.layer_blocks.2.0.weight"))
        .is_none());
}

#[test]
fn trainable_params_split_decay_and_skip_running_stats() {
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    use onehead::model::OneHead;
    use onehead::train::optim::trainable_params;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    OneHead::new(&OneHeadConfig::default(), vb).unwrap();
    let all = trainable_params(&varmap, &[]);
    let n: usize = all.iter().map(|p| p.var.elem_count()).sum();
    assert_eq!(n, count_params(&varmap).total);
    // Weight decay only on conv weights; BatchNorm affine parameters are spared.
    assert!(all.iter().filter(|p| p.decay).all(|p| p.var.rank() == 4));
    assert!(all
        .iter()
        .any(|p| p.name == "backbone.bn1.weight" && !p.decay));
    assert!(!all
        .iter()
        .any(|p| p.name.ends_with("running_mean") || p.name.ends_with("running_var")));
    // Freezing the backbone leaves only neck and head.
    let heads = trainable_params(&varmap, &["backbone."]);
    assert!(!heads.is_empty() && heads.iter().all(|p| !p.name.starts_with("backbone.")));
    let names: Vec<&String> = all.iter().map(|p| &p.name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}
