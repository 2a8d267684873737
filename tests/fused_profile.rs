//! The fused executor's profile (`onehead bench --profile`): the executor times each node in
//! one place (a wrapper around the node's call) and the kernels time finer sections
//! themselves; every kind is still charged and every node labelled. Its own test binary: the
//! profile is process-wide state.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::{init::init_all, Executor, OneHead, OneHeadConfig};
use onehead::ops::fused::prof;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn model() -> (VarMap, OneHead) {
    let vm = VarMap::new();
    let m = OneHead::new(
        &OneHeadConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap()
    .with_executor(Executor::Fused);
    init_all(&vm, &mut ChaCha8Rng::seed_from_u64(7), &[]).unwrap();
    (vm, m)
}

fn loss(y: &Tensor) -> Tensor {
    let r = Tensor::ones(y.dims(), DType::F32, &Device::Cpu).unwrap();
    (y * r).unwrap().sum_all().unwrap()
}

/// Every kind charged, gemm flops counted, one labelled entry per node, forward and backward.
#[test]
fn profile_charges_every_kind_and_labels_every_node() {
    let (_vm, m) = model();
    let x = common::seeded_input(2, 32, 32, 12);
    prof::reset();
    prof::reset_nodes();
    prof::enable(true);
    let y = m.forward_t(x.as_tensor(), true).unwrap();
    loss(&y).backward().unwrap();
    let nodes = prof::nodes();
    // 8 images: the 3×3 stride-1 convs take the Winograd path (its transforms are a kind).
    let x8 = common::seeded_input(8, 32, 32, 13);
    let y8 = m.forward_t(x8.as_tensor(), true).unwrap();
    loss(&y8).backward().unwrap();
    prof::enable(false);
    for (kind, secs, flops) in prof::snapshot() {
        assert!(secs > 0.0, "{}: no time charged", kind.name());
        assert_eq!(
            flops > 0,
            kind == prof::Kind::Gemm,
            "{}: flops {flops}",
            kind.name()
        );
    }
    assert_eq!(nodes[0].0, "input -> 3x32x32 (B=2)");
    for want in [
        "conv Dense { k: 3, stride: 2 } -> 16x16x16 (B=2)",
        "bn+HardSwish -> 16x16x16 (B=2)",
        "conv Depthwise { k: 3, stride: 2 } -> 16x8x8 (B=2)",
        "squeeze-excite -> 16x8x8 (B=2)",
        "conv Pointwise -> 16x8x8 (B=2)",
        "upsample2x+add -> 128x4x4 (B=2)",
        "add -> 24x4x4 (B=2)",
        "Relu -> 128x4x4 (B=2)",
    ] {
        assert!(
            nodes.iter().any(|n| n.0 == want),
            "no node '{want}' in {nodes:?}"
        );
    }
    for (i, (label, fwd, bwd)) in nodes.iter().enumerate() {
        assert!(*fwd > 0.0, "node {i} ({label}): no forward time");
        assert_eq!(*bwd > 0.0, i > 0, "node {i} ({label}): backward time {bwd}");
    }
}
