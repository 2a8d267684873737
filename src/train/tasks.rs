//! The four places a task differs — its output slice, loss, metric and dataset — live here,
//! so the engine says `task_loss(task, …)` / `evaluate(task, …)` and never branches on tasks.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::data::{self, Batch, Target, TaskDataset, IGNORE_INDEX};
use crate::metrics::map::MapEvaluator;
use crate::metrics::miou::{argmax_masks, ConfusionMatrix};
use crate::metrics::topk::TopK;
use crate::model::detect::{decode, DecodeParams};
use crate::model::{HeadOutputs, OneHead, OUTPUT_STRIDE};
use crate::ops::resize::resize_bilinear;
use crate::train::det_loss::{det_loss, DetLossParams};
use crate::train::losses::{cls_cross_entropy, seg_cross_entropy};
use crate::TaskKind;

/// Rows `start..start+len` of every output (one forward pass serves several batches).
pub fn slice_rows(out: &HeadOutputs, start: usize, len: usize) -> Result<HeadOutputs> {
    Ok(HeadOutputs {
        seg: out.seg.narrow(0, start, len)?,
        det: out.det.narrow(0, start, len)?,
        cls: out.cls.narrow(0, start, len)?,
        grid: out.grid,
    })
}

/// A task's loss on its batch: the scalar to optimise plus named parts for logging.
pub struct TaskLoss {
    pub total: Tensor,
    pub parts: Vec<(&'static str, f64)>,
}

/// The loss of `batch` (all of one task) given the outputs for exactly its rows.
pub fn task_loss(out: &HeadOutputs, batch: &Batch, device: &Device) -> Result<TaskLoss> {
    let image_size = batch.images.dim(2)?;
    match batch.task {
        TaskKind::Seg => {
            // Cross-entropy on logits upsampled to the mask's size (255 ignored).
            let logits = resize_bilinear(&out.seg, image_size, image_size)?;
            let masks = data::dataset::seg_masks(batch, device)?;
            let total = seg_cross_entropy(&logits, &masks, IGNORE_INDEX as u32)?;
            Ok(TaskLoss {
                parts: vec![],
                total,
            })
        }
        TaskKind::Det => {
            let targets: Vec<Vec<data::DetBox>> = batch
                .targets
                .iter()
                .map(|t| match t {
                    Target::Det(b) => Ok(b.clone()),
                    other => {
                        anyhow::bail!("detection batch holds a non-detection target {other:?}")
                    }
                })
                .collect::<Result<_>>()?;
            let l = det_loss(
                &out.det,
                out.grid,
                OUTPUT_STRIDE,
                &targets,
                &DetLossParams::default(),
            )?;
            Ok(TaskLoss {
                parts: vec![
                    ("obj", l.obj as f64),
                    ("cls", l.cls as f64),
                    ("box", l.bbox as f64),
                ],
                total: l.total,
            })
        }
        TaskKind::Cls => {
            let labels: Vec<u32> = batch
                .targets
                .iter()
                .map(|t| match t {
                    Target::Cls(c) => Ok(*c as u32),
                    other => anyhow::bail!("classification batch holds {other:?}"),
                })
                .collect::<Result<_>>()?;
            let labels = Tensor::new(labels, device)?;
            Ok(TaskLoss {
                total: cls_cross_entropy(&out.cls, &labels)?,
                parts: vec![],
            })
        }
    }
}

/// Settings of evaluation that do not depend on the task.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub batch_size: usize,
    pub decode: DecodeParams,
}

impl EvalSettings {
    pub fn from_experiment(exp: &crate::config::Experiment) -> Self {
        Self {
            batch_size: exp.eval.batch_size,
            decode: DecodeParams {
                score_threshold: exp.eval.score_threshold as f32,
                nms_iou: exp.eval.nms_iou as f32,
                ..DecodeParams::default()
            },
        }
    }
}

/// Validation metrics of one task, `key → value` (`miou`, `pixel_acc`, `map50`, …, and
/// per class `iou.<class>` / `ap50.<class>` for classes present in the split).
pub type TaskMetrics = BTreeMap<String, f64>;

/// Evaluate `model` (inference mode) on a whole split of `ds`.
pub fn evaluate(
    model: &OneHead,
    ds: &TaskDataset,
    settings: &EvalSettings,
    device: &Device,
) -> Result<TaskMetrics> {
    let n = ds.len();
    let s = ds.image_size;
    let no_flips = vec![false; settings.batch_size];
    let mut cm = ConfusionMatrix::new(ds.num_classes());
    let mut map = MapEvaluator::new(ds.num_classes());
    let mut topk = TopK::new();
    for start in (0..n).step_by(settings.batch_size) {
        let idx: Vec<usize> = (start..(start + settings.batch_size).min(n)).collect();
        let batch = ds.batch(&idx, &no_flips[..idx.len()], device)?;
        let out = model.forward_t(&batch.images, false)?;
        match ds.task {
            TaskKind::Seg => {
                let logits = resize_bilinear(&out.seg, s, s)?;
                let preds = argmax_masks(&logits)?;
                for (p, t) in preds.iter().zip(&batch.targets) {
                    if let Target::Seg(gt) = t {
                        cm.add(p, gt)?;
                    }
                }
            }
            TaskKind::Det => {
                let dets = decode(&out.det, out.grid, OUTPUT_STRIDE, (s, s), &settings.decode)?;
                for (d, t) in dets.iter().zip(&batch.targets) {
                    if let Target::Det(gt) = t {
                        map.add_image(d, gt)?;
                    }
                }
            }
            TaskKind::Cls => {
                let logits = out.cls.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for (row, t) in logits.iter().zip(&batch.targets) {
                    if let Target::Cls(c) = t {
                        topk.add(row, *c)?;
                    }
                }
            }
        }
    }
    let mut m = TaskMetrics::new();
    match ds.task {
        TaskKind::Seg => {
            m.insert("miou".into(), cm.miou());
            m.insert("pixel_acc".into(), cm.pixel_accuracy());
            for (name, iou) in ds.class_names.iter().zip(cm.per_class_iou()) {
                if let Some(iou) = iou {
                    m.insert(format!("iou.{name}"), iou);
                }
            }
        }
        TaskKind::Det => {
            let s = map.summarize();
            m.insert("map50".into(), s.map50);
            m.insert("map50_95".into(), s.map50_95);
            for (name, ap) in ds.class_names.iter().zip(&s.per_class_ap50) {
                if let Some(ap) = ap {
                    m.insert(format!("ap50.{name}"), *ap);
                }
            }
        }
        TaskKind::Cls => {
            m.insert("top1".into(), topk.top1());
            if let Some(t5) = topk.top5() {
                m.insert("top5".into(), t5);
            }
        }
    }
    Ok(m)
}
