//! Throughput measurements behind `onehead bench` (see shared/BENCHMARKS.md for the PyTorch
//! reference figures measured the same way).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};

use crate::config::OptimizerKind;
use crate::model::info::median;
use crate::model::{OneHead, OneHeadConfig};
use crate::ops::resize_bilinear;
use crate::tasks::{cls, det};
use crate::train::optim::{trainable_params, Optimizer};

/// Median time per step and the images/s it implies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchResult {
    pub ms_per_step: f64,
    pub images_per_sec: f64,
    pub batch: usize,
    pub image_size: usize,
    /// Timed steps (after warm-up).
    pub steps: usize,
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch {} at {}x{}: {:.1} ms/step, {:.1} img/s (median of {})",
            self.batch,
            self.image_size,
            self.image_size,
            self.ms_per_step,
            self.images_per_sec,
            self.steps
        )
    }
}

const WARMUP_STEPS: usize = 2;

fn result(times_ms: &[f64], batch: usize, image_size: usize) -> BenchResult {
    let ms = median(times_ms);
    BenchResult {
        ms_per_step: ms,
        images_per_sec: batch as f64 * 1e3 / ms,
        batch,
        image_size,
        steps: times_ms.len(),
    }
}

const SEG: usize = 21;
const DET: usize = 10;
const CLS: usize = 10;

/// The benchmark loss of BENCHMARKS.md: `CE(seg upsampled bilinearly to the input size) +
/// CE(cls) + MSE(det)`.
fn bench_loss(
    model: &OneHead,
    x: &Tensor,
    seg_t: &Tensor,
    cls_t: &Tensor,
    det_t: &Tensor,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let map = model.forward_t(x, true)?;
    // The report's layout: seg 21 | det 5 + 10 | cls 10.
    let seg = resize_bilinear(&map.narrow(1, 0, SEG)?, h, w)?;
    let l_seg = crate::ops::pixel_cross_entropy(&seg, seg_t, Some(255))?;
    let cls_logits =
        cls::logits(&map.narrow(1, SEG + 5 + DET, CLS)?).map_err(candle_core::Error::wrap)?;
    let l_cls = candle_nn::loss::cross_entropy(&cls_logits, cls_t)?;
    let det_cells = det::cells(&map.narrow(1, SEG, 5 + DET)?).map_err(candle_core::Error::wrap)?;
    let l_det = candle_nn::loss::mse(&det_cells, det_t)?;
    (l_seg + l_cls)? + l_det
}

/// Random-init model with the default config, random batch and targets.
fn setup(
    image_size: usize,
    batch: usize,
    device: &Device,
) -> anyhow::Result<(VarMap, OneHead, Tensor)> {
    let cfg = OneHeadConfig::default();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = OneHead::new(&cfg, vb)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, image_size, image_size), device)?;
    Ok((varmap, model, x))
}

/// Time `steps` training steps (forward + backward + AdamW step, BatchNorm in training mode)
/// at `batch × 3 × image_size²`, after 2 warm-up steps. Applies
/// [`crate::ops::tune_cpu_runtime`] first (so call it in `main` too, or the engine will run
/// slower than this measures).
pub fn bench_train_step(
    image_size: usize,
    batch: usize,
    steps: usize,
    device: &Device,
) -> anyhow::Result<BenchResult> {
    crate::ops::tune_cpu_runtime();
    let (varmap, model, x) = setup(image_size, batch, device)?;
    let cells = (image_size / 8) * (image_size / 8);
    let seg_t = Tensor::rand(0f32, SEG as f32, (batch, image_size, image_size), device)?
        .floor()?
        .to_dtype(DType::U32)?;
    let cls_t = Tensor::rand(0f32, CLS as f32, batch, device)?
        .floor()?
        .to_dtype(DType::U32)?;
    let det_t = Tensor::randn(0f32, 1f32, (batch, cells, 5 + DET), device)?;
    // The engine's own optimiser (AdamW, decay on conv weights, running stats excluded), so
    // the benchmark times what training runs.
    let mut opt = Optimizer::new(
        OptimizerKind::Adamw,
        trainable_params(&varmap, &[]),
        1e-4,
        0.0,
    );
    let mut times = Vec::with_capacity(steps);
    for i in 0..WARMUP_STEPS + steps.max(1) {
        let t0 = Instant::now();
        let loss = bench_loss(&model, &x, &seg_t, &cls_t, &det_t)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3, 1.0)?;
        // Reading the loss back synchronises asynchronous devices.
        let _ = loss.to_scalar::<f32>()?;
        if i >= WARMUP_STEPS {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(result(&times, batch, image_size))
}

/// Time `steps` eval-mode forward passes at `batch × 3 × image_size²`, after 2 warm-ups.
pub fn bench_inference(
    image_size: usize,
    batch: usize,
    steps: usize,
    device: &Device,
) -> anyhow::Result<BenchResult> {
    crate::ops::tune_cpu_runtime();
    let (_, model, x) = setup(image_size, batch, device)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..WARMUP_STEPS + steps.max(1) {
        let t0 = Instant::now();
        let out = model.forward_t(&x, false)?;
        // Reading the output back synchronises asynchronous devices.
        let _ = out.max(D::Minus1)?.sum_all()?.to_scalar::<f32>()?;
        if i >= WARMUP_STEPS {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(result(&times, batch, image_size))
}
