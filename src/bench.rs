//! `onehead bench`: training and inference throughput, latency, peak memory, the machine's
//! sgemm peak, and (optionally) a per-op-kind profile of a training step.
//!
//! The "reference" training step is the one `docs/torch_ref/bench.py` times for PyTorch
//! (batch 16, `CE(seg upsampled bilinearly to the input size) + CE(cls) + MSE(det)`, forward +
//! backward + optimiser step), so the two can be compared: run them one after the other, never
//! at the same time (`scripts/bench_vs_torch.sh`). The "engine" step adds a replay batch the
//! way the engine builds one (the stage's batch and the replayed samples concatenated into one
//! forward, a weighted replay loss).

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use crate::config::OptimizerKind;
use crate::model::info::median;
use crate::model::{OneHead, OneHeadConfig};
use crate::ops::fused::prof;
use crate::ops::upsampled_pixel_cross_entropy;
use crate::tasks::{cls, det};
use crate::train::optim::{trainable_params, Optimizer};

/// Median time per step and the images/s it implies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
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

/// Random-init model with the default config.
fn setup(device: &Device) -> anyhow::Result<(VarMap, OneHead)> {
    let cfg = OneHeadConfig::default();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = OneHead::new(&cfg, vb)?;
    Ok((varmap, model))
}

/// Random targets for `batch` images of `size²`.
struct Targets {
    seg: Tensor,
    cls: Tensor,
    det: Tensor,
}

/// The report's head layout: seg 21 | det 5 + 10 | cls 10.
const SEG: usize = 21;
const DET: usize = 10;
const CLS: usize = 10;

fn targets(batch: usize, size: usize, dev: &Device) -> anyhow::Result<Targets> {
    let cells = (size / 8) * (size / 8);
    let seg = Tensor::rand(0f32, SEG as f32, (batch, size, size), dev)?
        .floor()?
        .to_dtype(DType::U32)?;
    let cls = Tensor::rand(0f32, CLS as f32, batch, dev)?
        .floor()?
        .to_dtype(DType::U32)?;
    let det = Tensor::randn(0f32, 1f32, (batch, cells, 5 + DET), dev)?;
    Ok(Targets { seg, cls, det })
}

/// The reference loss of BENCHMARKS.md on rows `start..start+n` of the outputs:
/// `CE(seg upsampled bilinearly to the input size) + CE(cls) + MSE(det)`.
fn reference_loss(map: &Tensor, start: usize, t: &Targets) -> candle_core::Result<Tensor> {
    let n = t.cls.dim(0)?;
    let map = map.narrow(0, start, n)?;
    // = pixel_cross_entropy(resize_bilinear(seg, size, size), masks, 255), as the seg task
    // computes it, without materialising the upsampled logits.
    let seg = map.narrow(1, 0, SEG)?;
    let l_seg = upsampled_pixel_cross_entropy(&seg, &t.seg, Some(255))?;
    let cls_logits =
        cls::logits(&map.narrow(1, SEG + 5 + DET, CLS)?).map_err(candle_core::Error::wrap)?;
    let l_cls = candle_nn::loss::cross_entropy(&cls_logits, &t.cls)?;
    let det_cells = det::cells(&map.narrow(1, SEG, 5 + DET)?).map_err(candle_core::Error::wrap)?;
    let l_det = candle_nn::loss::mse(&det_cells, &t.det)?;
    (l_seg + l_cls)? + l_det
}

/// Milliseconds per phase of a training step (medians over the timed steps).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepPhases {
    pub forward_ms: f64,
    pub loss_ms: f64,
    pub backward_ms: f64,
    pub optimiser_ms: f64,
}

/// A training-step measurement with its phase split.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    #[serde(flatten)]
    pub result: BenchResult,
    /// Replayed images added to each step's batch (0: the reference step).
    pub replay: usize,
    pub phases: StepPhases,
    /// Per op kind inside the fused network op (filled with `profile`).
    pub kernels: Vec<KernelTime>,
}

/// Time per training step spent in one kind of kernel of the fused op.
#[derive(Debug, Clone, Serialize)]
pub struct KernelTime {
    pub kind: String,
    pub ms_per_step: f64,
    /// Achieved GFLOP/s (convolution gemms only; 0 elsewhere).
    pub gflops: f64,
}

/// Time `steps` training steps (forward + loss + backward + optimiser step with the engine's
/// AdamW, BatchNorm in training mode) on `batch` images of `size²` plus `replay` replayed
/// images in the same forward (weighted 0.5 in the loss), after 2 warm-ups.
pub fn bench_train(
    size: usize,
    batch: usize,
    replay: usize,
    steps: usize,
    profile: bool,
    device: &Device,
) -> anyhow::Result<TrainBench> {
    crate::ops::tune_cpu_runtime();
    let (varmap, model) = setup(device)?;
    let x = Tensor::randn(0f32, 1f32, (batch + replay, 3, size, size), device)?;
    let t_new = targets(batch, size, device)?;
    let t_old = targets(replay, size, device)?;
    // The engine's own optimiser (AdamW, decay on conv weights, running stats excluded).
    let mut opt = Optimizer::new(
        OptimizerKind::Adamw,
        trainable_params(&varmap, &[]),
        1e-4,
        0.0,
    );
    let mut times = Vec::new();
    let mut ph: [Vec<f64>; 4] = Default::default();
    let mut kernel_secs = vec![0f64; prof::KINDS.len()];
    let mut kernel_flops = vec![0f64; prof::KINDS.len()];
    prof::reset_nodes();
    for i in 0..WARMUP_STEPS + steps.max(1) {
        let timed = i >= WARMUP_STEPS;
        prof::enable(profile && timed);
        prof::reset();
        let t0 = prof::clock();
        let out = model.forward_t(&x, true)?;
        let t1 = prof::clock();
        let mut loss = reference_loss(&out, 0, &t_new)?;
        if replay > 0 {
            loss = (loss + (reference_loss(&out, batch, &t_old)? * 0.5)?)?;
        }
        // Reading the loss back synchronises asynchronous devices (the engine does it too).
        let _ = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let t2 = prof::clock();
        let grads = loss.backward()?;
        let t3 = prof::clock();
        opt.step(&grads, 1e-3, 1.0)?;
        drop(grads);
        let t4 = prof::clock();
        prof::enable(false);
        if timed {
            times.push((t4 - t0) * 1e3);
            for (v, (a, b)) in ph.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)]) {
                v.push((b - a) * 1e3);
            }
            for (j, (_, s, f)) in prof::snapshot().into_iter().enumerate() {
                kernel_secs[j] += s;
                kernel_flops[j] += f as f64;
            }
        }
    }
    let n = times.len() as f64;
    if profile && std::env::var("ONEHEAD_PROFILE_NODES").is_ok_and(|v| v == "1") {
        eprintln!("per node, ms per step (forward, backward), {size}x{size}:");
        for (i, (label, f, b)) in prof::nodes().iter().enumerate() {
            eprintln!("{i:4} {label:<48} {:8.2} {:8.2}", f * 1e3 / n, b * 1e3 / n);
        }
    }
    let kernels = if profile {
        prof::KINDS
            .iter()
            .enumerate()
            .map(|(j, k)| {
                let s = kernel_secs[j] / n;
                let gflops = if kernel_secs[j] > 0.0 {
                    kernel_flops[j] / kernel_secs[j] / 1e9
                } else {
                    0.0
                };
                KernelTime {
                    kind: k.name().to_string(),
                    ms_per_step: s * 1e3,
                    gflops,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(TrainBench {
        result: result(&times, batch + replay, size),
        replay,
        phases: StepPhases {
            forward_ms: median(&ph[0]),
            loss_ms: median(&ph[1]),
            backward_ms: median(&ph[2]),
            optimiser_ms: median(&ph[3]),
        },
        kernels,
    })
}

/// Time `steps` training steps of the reference workload (see [`bench_train`], no replay).
pub fn bench_train_step(
    image_size: usize,
    batch: usize,
    steps: usize,
    device: &Device,
) -> anyhow::Result<BenchResult> {
    Ok(bench_train(image_size, batch, 0, steps, false, device)?.result)
}

/// Time `steps` eval-mode forward passes at `batch × 3 × image_size²`, after 2 warm-ups.
pub fn bench_inference(
    image_size: usize,
    batch: usize,
    steps: usize,
    device: &Device,
) -> anyhow::Result<BenchResult> {
    crate::ops::tune_cpu_runtime();
    let (_, model) = setup(device)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, image_size, image_size), device)?;
    let mut times = Vec::with_capacity(steps);
    let nodes = std::env::var("ONEHEAD_PROFILE_NODES").is_ok_and(|v| v == "1");
    prof::reset_nodes();
    // As `predict` and the evaluation: the model prepared once for evaluation forwards.
    let model = model.inference()?;
    for i in 0..WARMUP_STEPS + steps.max(1) {
        prof::enable(nodes && i >= WARMUP_STEPS);
        let t0 = prof::clock();
        let out = model.forward(&x)?;
        // What PyTorch's model returns too: the class logits (the mean over the map), read back
        // (which also waits for asynchronous devices). The segmentation and detection slices
        // are views there and are not touched here either (a candle reduction over a channel
        // slice alone took ~5 ms, 10 % of the figure).
        let cls_logits = cls::logits(&out.narrow(1, SEG + 5 + DET, CLS)?)?;
        let _ = cls_logits.max(D::Minus1)?.sum_all()?.to_scalar::<f32>()?;
        if i >= WARMUP_STEPS {
            times.push((prof::clock() - t0) * 1e3);
        }
    }
    prof::enable(false);
    if nodes {
        let n = times.len() as f64;
        let groups = crate::ops::fused::eval_groups(batch);
        let summed = if groups > 1 {
            format!(" (summed over {groups} image groups run side by side: thread time)")
        } else {
            String::new()
        };
        eprintln!("inference per node, ms per batch, {image_size}x{image_size} b{batch}{summed}:");
        for (i, (label, f, _)) in prof::nodes().iter().enumerate() {
            eprintln!("{i:4} {label:<48} {:8.3}", f * 1e3 / n);
        }
    }
    Ok(result(&times, batch, image_size))
}

/// Achieved single-precision gemm GFLOP/s of the kernel library the convolutions use (the
/// `gemm` crate, all threads), best of a few runs of a 1024³ product and of the head conv's
/// shape: the machine's practical sgemm peak.
pub fn sgemm_peak_gflops() -> f64 {
    let threads = rayon::current_num_threads();
    let mut best = 0f64;
    for &(m, n, k) in &[(1024usize, 1024usize, 1024usize), (128, 2048, 1152)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        for _ in 0..8 {
            let t0 = Instant::now();
            // SAFETY: row-major m×k, k×n, m×n buffers of exactly those sizes.
            unsafe {
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
            }
            let s = t0.elapsed().as_secs_f64();
            best = best.max(2.0 * (m * n * k) as f64 / s / 1e9);
        }
    }
    best
}

/// One engine epoch's wall time and where it went (`epochs.csv`'s time columns), seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EpochTime {
    pub seconds: f64,
    /// Assembling the training batches: augmentation draws, decoding, cropping, resizing.
    pub data_s: f64,
    /// The training steps' forward, losses, backward and update.
    pub steps_s: f64,
    /// Evaluating every task learned so far.
    pub eval_s: f64,
}

/// One whole built-in-benchmark epoch: the detection epoch of a two-stage run (seg 1 epoch,
/// then det 1 epoch with 4 replayed seg images per batch) at `image_size`, as the engine
/// runs it: data loading, augmentation, training steps, and the evaluation of both tasks.
/// The run (and its generated data) lives in a temporary folder.
pub fn whole_epoch(image_size: usize, device: &Device) -> anyhow::Result<EpochTime> {
    let tmp = tempfile::tempdir()?;
    let dev = match device {
        Device::Cpu => "cpu",
        _ => "auto",
    };
    let root = tmp.path().join("data");
    let results = tmp.path().join("results");
    let text = format!(
        r#"name = "bench-epoch"
seed = 0
device = "{dev}"
results_dir = "{results}"
[model]
weights = "none"
image_size = {image_size}
[data]
source = "synthetic"
root = "{root}"
crop_scale = [0.35, 1.0]
[[stages]]
task = "seg"
epochs = 1
batch_size = 16
[[stages]]
task = "det"
epochs = 1
batch_size = 16
[replay]
enabled = true
images_per_batch = 4
[log]
tensorboard = false
"#,
        results = results.display(),
        root = root.display(),
    );
    let path = tmp.path().join("bench-epoch.toml");
    let exp = crate::registry::Registry::builtin().parse(&text, &path, &[])?;
    let opts = crate::train::RunOptions {
        quiet: true,
        run_dir: Some(tmp.path().join("run")),
        ..Default::default()
    };
    let out = crate::train::run(&exp, &opts)?;
    let path = out.run_dir.join("epochs.csv");
    let epochs = crate::report::read_epochs(&path, &[], &mut Vec::new())?;
    let last = epochs.rows.last().context("epochs.csv has rows")?;
    let cell = |v: Option<f64>, name: &str| {
        v.with_context(|| format!("{}: no {name} in the last row", path.display()))
    };
    Ok(EpochTime {
        seconds: cell(last.seconds, "seconds")?,
        data_s: cell(last.data_seconds, "data_seconds")?,
        steps_s: cell(last.step_seconds, "step_seconds")?,
        eval_s: cell(last.eval_seconds, "eval_seconds")?,
    })
}

/// Everything `onehead bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub threads: usize,
    pub cpu: String,
    pub sgemm_peak_gflops: Option<f64>,
    /// Reference training step (same work as `torch_ref/bench.py`), per size.
    pub train: Vec<TrainBench>,
    /// Engine-style training step with a replay batch, per size.
    pub train_replay: Vec<TrainBench>,
    pub inference_b16: BenchResult,
    /// Batch 1, median of `latency_runs`.
    pub latency_b1_ms: f64,
    pub latency_runs: usize,
    pub latency_size: usize,
    pub whole_epoch: EpochTime,
    pub peak_rss_mib: Option<f64>,
    /// Cores kept busy by other processes during the run (average; from /proc/stat): figures
    /// taken with this above ≈ 0.2 are contaminated.
    pub foreign_cores_busy: Option<f64>,
    /// "wall" or "cpu" (process CPU time, `ONEHEAD_PROFILE_CPU=1`).
    pub clock: &'static str,
}

/// `(wall s, machine busy s summed over cores, this process's CPU s)` (Linux).
fn cpu_sample() -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    let busy = v[..8].iter().sum::<f64>() - v[3] - v[4];
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    let own_s = (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / tck;
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let wall = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    Some((wall, busy / tck, own_s))
}

/// Options of [`run_bench`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub sizes: Vec<usize>,
    pub batch: usize,
    pub replay: usize,
    pub steps: usize,
    pub inference_size: usize,
    pub latency_runs: usize,
    pub profile: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            sizes: vec![160, 224],
            batch: 16,
            replay: 4,
            steps: 10,
            inference_size: 224,
            latency_runs: 50,
            profile: false,
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Run every measurement of `onehead bench` on `device`.
pub fn run_bench(opts: &BenchOptions, device: &Device) -> anyhow::Result<BenchReport> {
    crate::ops::tune_cpu_runtime();
    let load0 = cpu_sample();
    let mut train = Vec::new();
    let mut train_replay = Vec::new();
    for &size in &opts.sizes {
        train.push(bench_train(
            size,
            opts.batch,
            0,
            opts.steps,
            opts.profile,
            device,
        )?);
        if opts.replay > 0 {
            train_replay.push(bench_train(
                size,
                opts.batch,
                opts.replay,
                opts.steps,
                false,
                device,
            )?);
        }
    }
    let inference_b16 = bench_inference(opts.inference_size, 16, opts.steps.max(10), device)?;
    if std::env::var("ONEHEAD_PROFILE_NODES").is_ok_and(|v| v == "1") {
        // The batch-1 forward's nodes too (the latency figure below is taken unprofiled).
        let r = bench_inference(opts.inference_size, 1, 50, device)?;
        eprintln!("batch 1, profiled: median {:.2} ms", r.ms_per_step);
    }
    let (_, model) = setup(device)?;
    let runs = opts.latency_runs.max(30);
    let latency_b1_ms =
        crate::model::info::median_latency_ms(&model, opts.inference_size, device, runs)?;
    let whole_epoch = whole_epoch(opts.sizes[0], device)?;
    let foreign_cores_busy = match (load0, cpu_sample()) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            Some((((b.1 - a.1) - (b.2 - a.2)) / (b.0 - a.0)).max(0.0))
        }
        _ => None,
    };
    Ok(BenchReport {
        device: format!("{device:?}"),
        threads: rayon::current_num_threads(),
        cpu: cpu_model(),
        sgemm_peak_gflops: device.is_cpu().then(sgemm_peak_gflops),
        train,
        train_replay,
        inference_b16,
        latency_b1_ms,
        latency_runs: runs,
        latency_size: opts.inference_size,
        whole_epoch,
        peak_rss_mib: crate::ops::peak_rss_mib(),
        foreign_cores_busy,
        clock: if prof::cpu_clock() { "cpu" } else { "wall" },
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "device {} ({} threads, {})",
            self.device, self.threads, self.cpu
        )?;
        if let Some(p) = self.sgemm_peak_gflops {
            writeln!(f, "sgemm peak (gemm crate, all threads): {p:.1} GFLOP/s")?;
        }
        for t in self.train.iter().chain(&self.train_replay) {
            let what = if t.replay > 0 {
                format!(
                    "training (engine step, {} + {} replay)",
                    t.result.batch - t.replay,
                    t.replay
                )
            } else {
                "training (reference step)".to_string()
            };
            writeln!(f, "{what:<40} {}", t.result)?;
            let p = &t.phases;
            writeln!(
                f,
                "{:<40} forward {:.1} ms, loss {:.1} ms, backward {:.1} ms, optimiser {:.1} ms",
                "", p.forward_ms, p.loss_ms, p.backward_ms, p.optimiser_ms
            )?;
            for k in &t.kernels {
                let (name, ms) = (&k.kind, k.ms_per_step);
                if k.gflops > 0.0 {
                    let g = k.gflops;
                    writeln!(f, "{:<44} {name:<38} {ms:7.1} ms  {g:6.1} GFLOP/s", "")?;
                } else {
                    writeln!(f, "{:<44} {name:<38} {ms:7.1} ms", "")?;
                }
            }
        }
        writeln!(f, "{:<40} {}", "inference", self.inference_b16)?;
        writeln!(
            f,
            "{:<40} {:.2} ms at {}x{} (median of {})",
            "latency, batch 1",
            self.latency_b1_ms,
            self.latency_size,
            self.latency_size,
            self.latency_runs
        )?;
        let e = &self.whole_epoch;
        writeln!(
            f,
            "{:<40} {:.1} s (data {:.1} s, steps {:.1} s, evaluation {:.1} s)",
            "one built-in-benchmark epoch", e.seconds, e.data_s, e.steps_s, e.eval_s
        )?;
        match self.peak_rss_mib {
            Some(m) => writeln!(f, "{:<40} {m:.0} MiB", "peak resident memory")?,
            None => writeln!(f, "{:<40} n/a", "peak resident memory")?,
        }
        if let Some(l) = self.foreign_cores_busy {
            let warn = if l > 0.2 {
                "  <-- other processes were busy: figures contaminated"
            } else {
                ""
            };
            write!(
                f,
                "{:<40} {l:.2}{warn}",
                "cores busy elsewhere during the run"
            )?;
        }
        if self.clock == "cpu" {
            write!(f, "\n(times are process CPU time: ONEHEAD_PROFILE_CPU=1)")?;
        }
        Ok(())
    }
}
