//! Issue 12: `onehead predict` and `onehead eval --export`, on a run folder of the tiny
//! synthetic benchmark (non-square originals larger than the model input, so every output
//! has to be scaled back) whose checkpoints hold the seeded initial model: untrained, its
//! masks mix many classes and its boxes are everywhere, which checks the resizing and the
//! box scaling far harder than a model that predicts background. Then:
//!
//! - the round trip: export → read the files back → onehead's metric functions on them equal
//!   what `eval` returned (mIoU exactly, from the PNGs against the ground-truth masks; mAP
//!   from the COCO results JSON against the COCO ground truth in original pixels, up to the
//!   float rounding of box coordinates; Top-1 / mean accuracy from the CSV exactly);
//! - `predict` on the val images gives the very masks and boxes that were exported
//!   (preprocessing identical to evaluation), handles greyscale and RGBA PNGs, reports a
//!   corrupt file and still processes the others; a missing checkpoint names those there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use onehead::boxes::{DetBox, Detection};
use onehead::config::Experiment;
use onehead::data::coco::CocoFile;
use onehead::data::imageio::read_mask;
use onehead::metrics::map::MapEvaluator;
use onehead::metrics::miou::ConfusionMatrix;
use onehead::predict::{predict, PredictOptions};
use onehead::registry::Registry;
use onehead::tasks::det::CocoResult;
use onehead::train::assemble::{build_model, open_tasks};
use onehead::train::{evaluate_checkpoint_export, load_run};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn experiment(dir: &Path) -> Experiment {
    let text = format!(
        r#"
name = "tiny_predict"
seed = 1
device = "cpu"
results_dir = "{results}"
[model]
weights = "none"
image_size = 64
fpn_channels = 16
[data]
source = "synthetic"
root = "{data}"
synth_train = 24
synth_val = 10
synth_test = 0
synth_size = 96
[[stages]]
task = "seg"
epochs = 2
batch_size = 8
lr = 3e-3
[[stages]]
task = "det"
epochs = 3
batch_size = 8
lr = 3e-3
[[stages]]
task = "cls"
epochs = 1
batch_size = 8
[eval]
batch_size = 4
"#,
        results = dir.join("results").display(),
        data = dir.join("data").display(),
    );
    let p = dir.join("tiny.toml");
    std::fs::write(&p, text).unwrap();
    Registry::builtin().load(&p, &[]).unwrap()
}

/// A run folder as a finished run leaves it (`config.toml`, `checkpoints/`), its three
/// checkpoints holding the seeded initial model.
fn untrained_run(dir: &Path, exp: &Experiment, registry: &Registry) -> PathBuf {
    let run_dir = dir.join("run");
    std::fs::create_dir_all(run_dir.join("checkpoints")).unwrap();
    std::fs::write(run_dir.join("config.toml"), exp.to_toml()).unwrap();
    let tasks = open_tasks(exp, &registry.tasks).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(exp.seed);
    let (varmap, _, _) = build_model(exp, &tasks, &Device::Cpu, &mut rng, false).unwrap();
    for ck in ["stage1-seg", "stage2-det", "stage3-cls"] {
        varmap
            .save(run_dir.join(format!("checkpoints/{ck}.safetensors")))
            .unwrap();
    }
    run_dir
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// mIoU, pixel accuracy and nanmean from the exported PNGs against the ground-truth masks.
fn seg_metrics_from_files(export: &Path, gt_dir: &Path) -> BTreeMap<&'static str, f64> {
    let mut cm = ConfusionMatrix::new(21).unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(gt_dir).unwrap() {
        let gt_path = entry.unwrap().path();
        if gt_path.extension().and_then(|e| e.to_str()) != Some("png") {
            continue;
        }
        let name = gt_path.file_name().unwrap();
        let gt = read_mask(&gt_path).unwrap();
        let pred = read_mask(&export.join("seg").join(name)).unwrap();
        assert_eq!(
            (pred.width, pred.height),
            (gt.width, gt.height),
            "{name:?}: the exported mask has the ground truth's size"
        );
        cm.add(&pred.data, &gt.data).unwrap();
        n += 1;
    }
    assert_eq!(n, 10, "one exported mask per val image");
    BTreeMap::from([
        ("miou", cm.miou()),
        ("miou_nanmean", cm.miou_nanmean()),
        ("pixel_acc", cm.pixel_accuracy()),
        ("miou_classes", cm.classes_with_gt().len() as f64),
    ])
}

/// mAP from the COCO results JSON against the COCO ground truth, both in original-image
/// pixels (what pycocotools computes).
fn det_metrics_from_files(results: &Path, gt_json: &Path) -> (f64, f64, f64) {
    let mut gt = CocoFile::read(gt_json).unwrap();
    gt.categories.sort_by_key(|c| c.id);
    gt.images.sort_by_key(|im| im.id);
    let class_of: BTreeMap<u64, usize> = gt
        .categories
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id, i))
        .collect();
    let res: Vec<CocoResult> = serde_json::from_slice(&std::fs::read(results).unwrap()).unwrap();
    assert!(!res.is_empty());
    let mut ev = MapEvaluator::new(gt.categories.len());
    for im in &gt.images {
        let (w, h) = (im.width as f32, im.height as f32);
        let gts: Vec<DetBox> = gt
            .annotations
            .iter()
            .filter(|a| a.image_id == im.id)
            .filter_map(|a| {
                let b = a.bbox;
                let bbox = [
                    (b[0] as f32).clamp(0.0, w),
                    (b[1] as f32).clamp(0.0, h),
                    ((b[0] + b[2]) as f32).clamp(0.0, w),
                    ((b[1] + b[3]) as f32).clamp(0.0, h),
                ];
                (bbox[2] > bbox[0] && bbox[3] > bbox[1]).then_some(DetBox {
                    bbox,
                    class: class_of[&a.category_id],
                    crowd: a.iscrowd != 0,
                })
            })
            .collect();
        let dets: Vec<Detection> = res
            .iter()
            .filter(|r| r.image_id == im.id)
            .map(|r| {
                let [x, y, bw, bh] = r.bbox;
                Detection {
                    bbox: [x, y, x + bw, y + bh],
                    score: r.score,
                    class: class_of[&r.category_id],
                }
            })
            .collect();
        assert!(dets
            .iter()
            .all(|d| d.bbox[2] <= w + 1e-3 && d.bbox[3] <= h + 1e-3));
        ev.add_image(&dets, &gts).unwrap();
    }
    let s = ev.summarize();
    (s.map50, s.map50_95, s.map75)
}

/// Top-1 and mean per-class accuracy from the CSV.
fn cls_metrics_from_files(csv_path: &Path) -> (f64, f64, usize) {
    let mut r = csv::Reader::from_path(csv_path).unwrap();
    assert_eq!(
        r.headers().unwrap().iter().collect::<Vec<_>>(),
        ["file", "true", "predicted", "probability"]
    );
    let mut per_class: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut n, mut hits) = (0, 0);
    for rec in r.records() {
        let rec = rec.unwrap();
        let (t, p) = (rec[1].to_string(), rec[2].to_string());
        let prob: f64 = rec[3].parse().unwrap();
        assert!((0.0..=1.0).contains(&prob));
        let e = per_class.entry(t.clone()).or_default();
        e.0 += 1;
        if t == p {
            e.1 += 1;
            hits += 1;
        }
        n += 1;
    }
    let mean = per_class
        .values()
        .map(|&(k, h)| h as f64 / k as f64)
        .sum::<f64>()
        / per_class.len() as f64;
    (hits as f64 / n as f64, mean, n)
}

fn write_png(path: &Path, img: image::DynamicImage) {
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

#[test]
fn export_round_trip_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path());
    let registry = Registry::builtin();
    let run_dir = untrained_run(tmp.path(), &exp, &registry);
    let data = tmp.path().join("data");

    // --- eval --export, and the round trip ---------------------------------------------
    let export = tmp.path().join("export");
    let metrics: BTreeMap<String, BTreeMap<String, f64>> =
        evaluate_checkpoint_export(&run_dir, None, &registry, Some(&export))
            .unwrap()
            .into_iter()
            .collect();
    let manifest = read_json(&export.join("manifest.json"));
    assert_eq!(manifest["checkpoint"], "stage3-cls");
    eprintln!("eval: {metrics:?}");

    let seg = seg_metrics_from_files(&export, &data.join("mini_voc_seg/val"));
    for (k, v) in &seg {
        assert_eq!(*v, metrics["seg"][*k], "seg {k}: files vs eval");
    }
    assert!(seg["miou"] > 0.0);
    assert!(
        seg["miou_nanmean"] != seg["miou"],
        "the untrained model predicts classes absent from the ground truth"
    );

    let gt_json = PathBuf::from(manifest["tasks"]["det"]["ground_truth"].as_str().unwrap());
    assert_eq!(
        gt_json,
        std::fs::canonicalize(data.join("mini_coco_det/annotations/instances_val.json")).unwrap(),
        "the manifest names the ground truth by its absolute path"
    );
    let (m50, m5095, m75) = det_metrics_from_files(
        &export.join(manifest["tasks"]["det"]["results"].as_str().unwrap()),
        &gt_json,
    );
    eprintln!(
        "det from files: map50 {m50} map50_95 {m5095} map75 {m75}; eval: {} {} {}",
        metrics["det"]["map50"], metrics["det"]["map50_95"], metrics["det"]["map75"]
    );
    for (k, v) in [("map50", m50), ("map50_95", m5095), ("map75", m75)] {
        assert!(
            (v - metrics["det"][k]).abs() < 1e-6,
            "det {k}: {v} from the exported JSON, {} from eval",
            metrics["det"][k]
        );
    }
    assert!(
        m50 > 0.0,
        "the round trip is only a check with detections that score"
    );

    let (top1, mean_acc, n) = cls_metrics_from_files(&export.join("cls/predictions.csv"));
    assert_eq!(n, 10);
    assert_eq!(top1, metrics["cls"]["top1"]);
    assert_eq!(mean_acc, metrics["cls"]["mean_acc"]);

    // A second export into the same folder replaces the first (an earlier export).
    evaluate_checkpoint_export(&run_dir, Some("stage1-seg"), &registry, Some(&export)).unwrap();
    assert_eq!(
        read_json(&export.join("manifest.json"))["checkpoint"],
        "stage1-seg"
    );
    // … but a folder holding anything else is refused.
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let err = evaluate_checkpoint_export(&run_dir, None, &registry, Some(&busy)).unwrap_err();
    assert!(
        format!("{err:#}").contains("onehead did not write"),
        "{err:#}"
    );
    // A foreign folder that happens to hold a `manifest.json` and a `seg/` folder: refused,
    // and nothing in it deleted (it used to lose seg/, det/ and cls/).
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(foreign.join("seg")).unwrap();
    std::fs::write(
        foreign.join("manifest.json"),
        r#"{"name": "not onehead's"}"#,
    )
    .unwrap();
    std::fs::write(foreign.join("seg/keep.png"), "mine").unwrap();
    let err = evaluate_checkpoint_export(&run_dir, None, &registry, Some(&foreign)).unwrap_err();
    assert!(
        format!("{err:#}").contains("onehead did not write"),
        "{err:#}"
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("seg/keep.png")).unwrap(),
        "mine"
    );
    // Put the final export back for the comparisons below.
    evaluate_checkpoint_export(&run_dir, None, &registry, Some(&export)).unwrap();

    // --- predict -------------------------------------------------------------------------
    let loaded = load_run(&run_dir, None, &registry).unwrap();
    assert_eq!(loaded.learned, ["seg", "det", "cls"]);
    // Odd inputs: greyscale and RGBA PNGs of other sizes, a corrupt file.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let grey = image::GrayImage::from_fn(50, 30, |x, y| image::Luma([(x * 5 + y * 3) as u8]));
    write_png(&odd.join("grey.png"), image::DynamicImage::ImageLuma8(grey));
    let rgba = image::RgbaImage::from_fn(33, 70, |x, y| {
        image::Rgba([x as u8 * 7, y as u8 * 3, 90, 128])
    });
    write_png(&odd.join("rgba.png"), image::DynamicImage::ImageRgba8(rgba));
    std::fs::write(odd.join("broken.jpg"), b"not a jpeg at all").unwrap();

    let pred_dir = tmp.path().join("pred");
    let opts = PredictOptions {
        run_dir: run_dir.clone(),
        checkpoint: None,
        inputs: vec![
            data.join("mini_voc_seg/val"),
            data.join("mini_coco_det/val"),
            odd.clone(),
        ],
        out: pred_dir.clone(),
        quiet: true,
        batch_size: Some(exp.eval.batch_size),
    };
    let report = onehead::predict::predict_with(&loaded, &opts).unwrap();
    assert_eq!(report.checkpoint, "stage3-cls");
    // 10 seg val images (their masks skipped), 10 det val images, grey and RGBA.
    assert_eq!(report.written.len(), 10 + 10 + 2, "{:?}", report.failures);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].0, odd.join("broken.jpg"));
    assert!(
        report.failures[0].1.contains("broken.jpg"),
        "{:?}",
        report.failures
    );

    // Segmentation: the predicted masks are the exported ones (same preprocessing, same
    // resizing to the original size).
    for entry in std::fs::read_dir(data.join("mini_voc_seg/val")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("jpg") {
            continue;
        }
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        let j = read_json(&pred_dir.join(format!("{stem}.json")));
        assert_eq!(j["image"].as_str().unwrap(), p.display().to_string());
        assert_eq!(j["tasks"]["seg"]["mask"], format!("{stem}.seg.png"));
        let predicted = read_mask(&pred_dir.join(format!("{stem}.seg.png"))).unwrap();
        let exported = read_mask(&export.join(format!("seg/{stem}.png"))).unwrap();
        assert_eq!(
            (predicted.width, predicted.height),
            (exported.width, exported.height)
        );
        assert!(predicted.data == exported.data, "{stem}: predict vs export");
        assert!(pred_dir.join(format!("{stem}.overlay.png")).is_file());
    }

    // Detection: predict's boxes (original pixels) are the exported ones for that image.
    let gt = CocoFile::read(&data.join("mini_coco_det/annotations/instances_val.json")).unwrap();
    let res: Vec<CocoResult> =
        serde_json::from_slice(&std::fs::read(export.join("det/coco_results.json")).unwrap())
            .unwrap();
    for im in &gt.images {
        let stem = Path::new(&im.file_name)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        // The seg and det val images have the same names: the det ones come second (`-2`).
        let j = read_json(&pred_dir.join(format!("{stem}-2.json")));
        assert_eq!(
            j["image"].as_str().unwrap(),
            data.join("mini_coco_det/val")
                .join(&im.file_name)
                .display()
                .to_string()
        );
        assert_eq!(
            (j["width"].as_u64().unwrap(), j["height"].as_u64().unwrap()),
            (im.width as u64, im.height as u64)
        );
        let dets = j["tasks"]["det"]["detections"].as_array().unwrap();
        let expected: Vec<&CocoResult> = res.iter().filter(|r| r.image_id == im.id).collect();
        assert_eq!(dets.len(), expected.len(), "{}", im.file_name);
        for (d, e) in dets.iter().zip(&expected) {
            let b: Vec<f32> = d["bbox"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(d["category_id"].as_u64().unwrap(), e.category_id);
            assert!((d["score"].as_f64().unwrap() as f32 - e.score).abs() < 1e-6);
            for k in 0..4 {
                assert!(
                    (b[k] - e.bbox[k]).abs() < 1e-3,
                    "{}: {b:?} vs {:?}",
                    im.file_name,
                    e.bbox
                );
            }
        }
    }

    // Greyscale and RGBA: results at the image's own size.
    for (name, (w, h)) in [("grey", (50u32, 30u32)), ("rgba", (33, 70))] {
        let j = read_json(&pred_dir.join(format!("{name}.json")));
        assert_eq!(
            (j["width"].as_u64().unwrap(), j["height"].as_u64().unwrap()),
            (w as u64, h as u64)
        );
        let m = read_mask(&pred_dir.join(format!("{name}.seg.png"))).unwrap();
        assert_eq!((m.width, m.height), (w, h));
        let cls = &j["tasks"]["cls"];
        let probs: f64 = cls["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap())
            .sum();
        assert!((probs - 1.0).abs() < 1e-9);
        assert_eq!(cls["top"].as_array().unwrap().len(), 5);
        let overlay = image::open(pred_dir.join(format!("{name}.overlay.png"))).unwrap();
        assert!(
            overlay.width().max(overlay.height()) >= 480,
            "small images are drawn larger"
        );
        for d in j["tasks"]["det"]["detections"].as_array().unwrap() {
            let b: Vec<f64> = d["bbox"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert!(
                b[0] >= 0.0
                    && b[1] >= 0.0
                    && b[0] + b[2] <= w as f64 + 1e-3
                    && b[1] + b[3] <= h as f64 + 1e-3
            );
        }
    }

    // An earlier checkpoint predicts only what had been learned by then.
    let early = predict(
        &PredictOptions {
            checkpoint: Some("stage1-seg".into()),
            inputs: vec![odd.join("grey.png")],
            out: tmp.path().join("early"),
            ..opts.clone()
        },
        &registry,
    )
    .unwrap();
    assert_eq!(early.tasks, ["seg"]);
    let j = read_json(&tmp.path().join("early/grey.json"));
    assert_eq!(
        j["tasks"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["seg"]
    );

    // A missing checkpoint names those there.
    let err = load_run(&run_dir, Some("stage9-x"), &registry)
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("stage1-seg, stage2-det, stage3-cls"), "{msg}");

    // The CLI: a corrupt input is named, the others are written, the exit code is not 0.
    let cli_out = tmp.path().join("cli");
    let o = Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args([
            "predict",
            &run_dir.display().to_string(),
            "--quiet",
            "--out",
        ])
        .arg(&cli_out)
        .arg(odd.join("grey.png"))
        .arg(odd.join("broken.jpg"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("broken.jpg"), "{stderr}");
    assert!(cli_out.join("grey.json").is_file());
    let o = Command::new(env!("CARGO_BIN_EXE_onehead"))
        .args([
            "eval",
            &run_dir.display().to_string(),
            "--checkpoint",
            "nope",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr.contains("available: stage1-seg, stage2-det, stage3-cls"),
        "{stderr}"
    );
}
