//! Seeded, deterministic initialisation of every variable. candle's own initialisers draw
//! from an RNG that cannot be seeded on CPU, so the run's seeded generator re-initialises the
//! whole VarMap after the model is built (names in sorted order → the same seed gives the same
//! weights everywhere). Scheme as torchvision's MobileNetV3: Kaiming-normal (fan_out) for
//! convs, N(0, 0.01) for linear layers and the head's prediction layer, zero biases,
//! BatchNorm γ = 1, β = 0.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    // Box–Muller; two uniforms per normal keeps the stream layout simple and deterministic.
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// Re-initialise every variable of `varmap`. `head_bias` lists `(channel, value)` of
/// `head.out.bias` entries that start away from 0 (the tasks' priors, e.g. detection's
/// objectness).
pub fn init_all(varmap: &VarMap, rng: &mut ChaCha8Rng, head_bias: &[(usize, f32)]) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let dims = shape.dims().to_vec();
        let n = shape.elem_count();
        let dev = var.device();
        let values: Vec<f32> = if name.ends_with("running_var") {
            vec![1.0; n]
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            vec![0.0; n]
        } else if name == "head.out.weight" {
            // The prediction layer starts near zero (as FCOS/RetinaNet heads do): initial
            // logits ≈ 0 give sane first losses (ln C for cross-entropy) on all three tasks.
            normal(rng, n, 0.01)
        } else if dims.len() == 4 {
            let fan_out = dims[0] * dims[2] * dims[3];
            normal(rng, n, (2.0 / fan_out as f64).sqrt())
        } else if dims.len() == 2 {
            normal(rng, n, 0.01)
        } else {
            // BatchNorm γ (rank-1 `.weight`).
            vec![1.0; n]
        };
        let mut values = values;
        if name == "head.out.bias" {
            for &(ch, v) in head_bias {
                if ch < n {
                    values[ch] = v;
                }
            }
        }
        var.set(&Tensor::from_vec(values, shape, dev)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{Init, VarBuilder};
    use rand::SeedableRng;

    fn build() -> VarMap {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        vb.get_with_hints((64, 32, 3, 3), "conv.weight", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints(64, "bn.weight", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints(64, "bn.running_var", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints(46, "head.out.bias", Init::Const(1.0))
            .unwrap();
        vm
    }

    fn get(vm: &VarMap, name: &str) -> Vec<f32> {
        vm.data().lock().unwrap()[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn same_seed_same_weights_and_kaiming_scale() {
        let (a, b) = (build(), build());
        init_all(&a, &mut ChaCha8Rng::seed_from_u64(3), &[(25, -4.595)]).unwrap();
        init_all(&b, &mut ChaCha8Rng::seed_from_u64(3), &[(25, -4.595)]).unwrap();
        let wa = get(&a, "conv.weight");
        assert_eq!(wa, get(&b, "conv.weight"));
        let std = (wa.iter().map(|x| x * x).sum::<f32>() / wa.len() as f32).sqrt();
        let expect = (2.0f32 / (64.0 * 9.0)).sqrt();
        assert!((std / expect - 1.0).abs() < 0.05, "{std} vs {expect}");
        assert!(get(&a, "bn.weight").iter().all(|&x| x == 1.0));
        assert!(get(&a, "bn.running_var").iter().all(|&x| x == 1.0));
        let bias = get(&a, "head.out.bias");
        assert!((bias[25] + 4.595).abs() < 1e-3, "{}", bias[25]);
        assert_eq!(bias[0], 0.0);

        let c = build();
        init_all(&c, &mut ChaCha8Rng::seed_from_u64(4), &[]).unwrap();
        assert_ne!(wa, get(&c, "conv.weight"));
    }
}
