//! `onehead predict`: a trained run's model on any images.
//!
//! For each image, `OUT/<stem>.json` (the raw results of every task learned by the
//! checkpoint, in pixels of the original image), `OUT/<stem>.overlay.png` (the picture with
//! the results drawn on it, see [`overlay`]) and the files the tasks add (segmentation:
//! `OUT/<stem>.seg.png`, the mask as a VOC-palette PNG of the image's size). The JSON and the
//! overlay are assembled from what each task's [`Task::predict`](crate::tasks::Task::predict)
//! returns, so a registered task of one's own shows up without changes here.
//!
//! Preprocessing is exactly evaluation's: any colour type decoded to RGB (greyscale and RGBA
//! too; alpha dropped), stretched to `S × S` by [`ImageSet`], ImageNet-normalised; each
//! task brings its outputs back to the original size as its evaluator does. Directories are
//! walked recursively (their sub-folders kept in `OUT`); a VOC-style mask (`<stem>.png`
//! beside `<stem>.jpg`) in a walked folder is skipped. Images are decoded, post-processed and
//! written in parallel, and run through the model in batches. An image that cannot be read
//! is reported and the others are still processed.

pub mod overlay;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::data::imageio::{decode_rgb, is_image, is_jpeg};
use crate::registry::Registry;
use crate::tasks::images::ImageSet;
use crate::tasks::{PredictInput, Task};
use crate::train::checkpoints::{load_run, LoadedRun};

/// What to predict and where to write it.
#[derive(Debug, Clone, Default)]
pub struct PredictOptions {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Checkpoint name (`stage3-cls`, `last`); `None`: the run's final stage's.
    pub checkpoint: Option<String>,
    /// Image files and folders.
    pub inputs: Vec<PathBuf>,
    /// Output folder (created).
    pub out: PathBuf,
    /// No progress bar.
    pub quiet: bool,
    /// Images per forward pass (default: the experiment's `[eval] batch_size`).
    pub batch_size: Option<usize>,
}

/// What [`predict`] did.
#[derive(Debug, Clone, Default)]
pub struct PredictReport {
    /// The checkpoint used.
    pub checkpoint: String,
    /// The tasks whose results were written.
    pub tasks: Vec<String>,
    /// The JSON file of every image processed.
    pub written: Vec<PathBuf>,
    /// Inputs that could not be processed, with the reason.
    pub failures: Vec<(PathBuf, String)>,
}

/// One image to process: its file and where its outputs go (`OUT/<rel>.json`, …).
#[derive(Debug, Clone, PartialEq)]
struct Item {
    path: PathBuf,
    /// Output path without extension, relative to `OUT` (`sub/cat`).
    rel: PathBuf,
}

/// Predict every image of `opts.inputs` with the run's checkpoint (built-in tasks and those
/// of `registry`).
pub fn predict(opts: &PredictOptions, registry: &Registry) -> Result<PredictReport> {
    anyhow::ensure!(!opts.inputs.is_empty(), "predict: no images given");
    let run = load_run(&opts.run_dir, opts.checkpoint.as_deref(), registry)?;
    predict_with(&run, opts)
}

/// [`predict`] with a run already loaded.
pub fn predict_with(run: &LoadedRun, opts: &PredictOptions) -> Result<PredictReport> {
    let (items, mut failures) = collect_inputs(&opts.inputs);
    crate::files::claim_output_dir(&opts.out, "--out", |_| false)?;
    let tasks: Vec<&dyn Task> = run
        .learned
        .iter()
        .map(|n| run.tasks.get(n))
        .collect::<Result<_>>()?;
    let s = run.exp.model.image_size;
    let bs = opts.batch_size.unwrap_or(run.exp.eval.batch_size).max(1);
    let pb = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(items.len() as u64)
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("predict [{bar:30}] {pos}/{len} images, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut written = Vec::new();
    let model = run.model.inference()?;
    for chunk in items.chunks(bs) {
        let decoded: Vec<Result<image::RgbImage>> =
            chunk.par_iter().map(|it| decode_rgb(&it.path)).collect();
        let (mut ok, mut images) = (Vec::new(), Vec::new());
        for (it, d) in chunk.iter().zip(decoded) {
            match d {
                Ok(img) => {
                    ok.push(it);
                    images.push(img);
                }
                Err(e) => failures.push((it.path.clone(), format!("{e:#}"))),
            }
        }
        if !ok.is_empty() {
            let files = ok.iter().map(|it| it.path.clone()).collect();
            let set = ImageSet::from_decoded(files, &images, s);
            let idx: Vec<usize> = (0..ok.len()).collect();
            let x = set.tensor(&idx, &[], &run.device)?;
            let map = model.forward(&x)?;
            let slices = tasks
                .iter()
                .map(|t| run.tasks.slice(&map, t.name()))
                .collect::<Result<Vec<_>>>()?;
            let results: Vec<Result<PathBuf>> = ok
                .par_iter()
                .zip(&images)
                .enumerate()
                .map(|(k, (it, img))| {
                    let outs = slices
                        .iter()
                        .map(|sl| Ok(sl.narrow(0, k, 1)?))
                        .collect::<Result<Vec<_>>>()?;
                    write_one(run, &tasks, &outs, it, img, &opts.out)
                })
                .collect();
            for (it, r) in ok.iter().zip(results) {
                match r {
                    Ok(p) => written.push(p),
                    Err(e) => failures.push((it.path.clone(), format!("{e:#}"))),
                }
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(PredictReport {
        checkpoint: run.checkpoint.clone(),
        tasks: run.learned.clone(),
        written,
        failures,
    })
}

/// Run every task's `predict` on one image and write its JSON, overlay and task files.
fn write_one(
    run: &LoadedRun,
    tasks: &[&dyn Task],
    outs: &[candle_core::Tensor],
    it: &Item,
    img: &image::RgbImage,
    out_dir: &Path,
) -> Result<PathBuf> {
    let base = out_dir.join(&it.rel);
    let dir = base.parent().unwrap_or(out_dir).to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = base
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let input = PredictInput {
        orig_size: img.dimensions(),
        image_size: run.exp.model.image_size,
        stem: &stem,
    };
    let mut json_tasks = serde_json::Map::new();
    let mut marks = Vec::new();
    for (t, out) in tasks.iter().zip(outs) {
        let Some(p) = t
            .predict(out, &input)
            .with_context(|| format!("task {}", t.name()))?
        else {
            continue;
        };
        for (name, bytes) in &p.files {
            let f = dir.join(name);
            std::fs::write(&f, bytes).with_context(|| format!("writing {}", f.display()))?;
        }
        json_tasks.insert(t.name().to_string(), p.json);
        marks.extend(p.marks);
    }
    let overlay_name = format!("{stem}.overlay.png");
    let picture = overlay::render(img, &marks)?;
    let f = dir.join(&overlay_name);
    std::fs::write(&f, overlay::encode_png(&picture)?)
        .with_context(|| format!("writing {}", f.display()))?;
    let (w, h) = img.dimensions();
    let json = serde_json::json!({
        "image": it.path.display().to_string(),
        "width": w,
        "height": h,
        "run_dir": run.run_dir.display().to_string(),
        "checkpoint": run.checkpoint,
        "image_size": run.exp.model.image_size,
        "overlay": overlay_name,
        "tasks": json_tasks,
    });
    let f = dir.join(format!("{stem}.json"));
    std::fs::write(&f, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", f.display()))?;
    Ok(f)
}

/// The images of `inputs`: files as given, folders walked recursively (sorted; hidden entries
/// and VOC-style masks beside their JPEGs skipped). Output names are the file stems (below a
/// folder: its relative path), made unique with `-2`, `-3`… Inputs that do not exist, and
/// folders without images, are returned as failures.
fn collect_inputs(inputs: &[PathBuf]) -> (Vec<Item>, Vec<(PathBuf, String)>) {
    let mut items = Vec::new();
    let mut failures = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found = Vec::new();
            let mut visited = BTreeSet::new();
            if let Err(e) = walk(input, input, &mut found, &mut visited) {
                failures.push((input.clone(), format!("{e:#}")));
                continue;
            }
            if found.is_empty() {
                failures.push((
                    input.clone(),
                    "no images (.jpg, .jpeg, .png) in this folder".into(),
                ));
            }
            items.extend(found);
        } else if input.exists() {
            items.push(Item {
                path: input.clone(),
                rel: PathBuf::from(input.file_stem().unwrap_or_default()),
            });
        } else {
            failures.push((input.clone(), "no such file or folder".into()));
        }
    }
    let mut seen = BTreeSet::new();
    for it in &mut items {
        let mut rel = it.rel.clone();
        let mut k = 2;
        while !seen.insert(rel.clone()) {
            let mut name = it.rel.file_name().unwrap_or_default().to_os_string();
            name.push(format!("-{k}"));
            rel = it.rel.with_file_name(name);
            k += 1;
        }
        it.rel = rel;
    }
    (items, failures)
}

/// Images under `dir`, symbolic links followed; a folder reached twice (a link back up, or
/// two links to one folder) is walked once, so a loop neither repeats images nor hangs.
fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<Item>,
    visited: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let real =
        std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    if !visited.insert(real) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    let jpeg_stems: BTreeSet<_> = entries
        .iter()
        .filter(|p| is_jpeg(p))
        .filter_map(|p| p.file_stem().map(|s| s.to_os_string()))
        .collect();
    for p in entries {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            walk(root, &p, out, visited)?;
        } else if is_image(&p) {
            let stem = p.file_stem().unwrap_or_default().to_os_string();
            if !is_jpeg(&p) && jpeg_stems.contains(&stem) {
                continue; // a segmentation mask beside its image
            }
            let rel = p.strip_prefix(root).unwrap_or(&p).with_extension("");
            out.push(Item { path: p, rel });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_symlink_loop_is_walked_once() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("set");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a.jpg"), b"x").unwrap();
        // Two loops: each folder links back to the top.
        std::os::unix::fs::symlink(&d, d.join("sub/up")).unwrap();
        std::os::unix::fs::symlink(&d, d.join("again")).unwrap();
        let (items, failures) = collect_inputs(std::slice::from_ref(&d));
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(items.len(), 1, "one image, listed once");
    }

    #[test]
    fn inputs_are_walked_named_uniquely_and_masks_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("set/sub")).unwrap();
        for f in [
            "set/a.jpg",
            "set/a.png",
            "set/b.png",
            "set/sub/c.JPEG",
            "set/.x.jpg",
            "set/n.txt",
            "a.jpg",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let (items, failures) =
            collect_inputs(&[d.join("set"), d.join("a.jpg"), d.join("missing.jpg")]);
        let rels: Vec<String> = items.iter().map(|i| i.rel.display().to_string()).collect();
        assert_eq!(rels, ["a", "b", "sub/c", "a-2"]);
        assert_eq!(items[3].path, d.join("a.jpg"));
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, d.join("missing.jpg"));
    }
}
