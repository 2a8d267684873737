//! The loaders round-trip what `synth` writes; `synth` is deterministic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp};
use onehead::data::coco::CocoFile;
use onehead::data::imageio::read_mask;
use onehead::data::{
    generate, Augment, Split, SynthOptions, COCO_CATEGORIES, IGNORE_INDEX, SEG_DIR,
};
use onehead::tasks::cls::ClsSplit;
use onehead::tasks::det::DetSplit;
use onehead::tasks::seg::{masks_tensor, SegSplit};

fn small(seed: u64) -> SynthOptions {
    SynthOptions {
        seed,
        train: 10,
        val: 10,
        test: 0,
        size: 48,
    }
}

/// All files under `dir`, relative paths sorted, with contents.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push((
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn same_seed_identical_bytes_different_seed_differs() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    generate(a.path(), &small(7)).unwrap();
    generate(b.path(), &small(7)).unwrap();
    generate(c.path(), &small(8)).unwrap();
    let (ta, tb, tc) = (tree(a.path()), tree(b.path()), tree(c.path()));
    // 3 tasks x 20 images, + 20 masks, + 2 JSON, + 3 markers.
    assert_eq!(ta.len(), 60 + 20 + 2 + 3);
    assert!(ta == tb, "same seed must give byte-identical files");
    let differing = ta.iter().zip(&tc).filter(|(x, y)| x.1 != y.1).count();
    assert!(
        differing > 70,
        "a different seed must change nearly every file ({differing})"
    );
    // Re-generating over an earlier output replaces it (marker present).
    generate(a.path(), &small(7)).unwrap();
    assert!(tree(a.path()) == tb);
}

#[test]
fn test_split_leaves_train_and_val_bytes_unchanged() {
    let (without, with) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    generate(without.path(), &small(5)).unwrap();
    let sum = generate(
        with.path(),
        &SynthOptions {
            test: 10,
            ..small(5)
        },
    )
    .unwrap();
    assert_eq!(sum.cls_images, [10, 10, 10]);
    assert_eq!(sum.det_images[2], 10);
    let is_test = |p: &Path| {
        let s = p.to_string_lossy();
        s.contains("/test/") || s.ends_with("instances_test.json")
    };
    let (ta, tb) = (tree(without.path()), tree(with.path()));
    let kept: Vec<_> = tb.iter().filter(|(p, _)| !is_test(p)).cloned().collect();
    assert!(
        kept == ta,
        "train and val files must be byte-identical with a test split"
    );
    // 3 tasks x 10 test images, + 10 test masks, + the test JSON.
    assert_eq!(tb.len() - ta.len(), 30 + 10 + 1);
    assert!(
        ta.iter().all(|(p, _)| !is_test(p)),
        "no test folder without a test split"
    );
    // The test images are new images, not copies of val ones.
    let val_bytes: BTreeSet<&Vec<u8>> = ta.iter().map(|(_, b)| b).collect();
    assert!(tb
        .iter()
        .filter(|(p, _)| is_test(p) && p.extension().unwrap() == "jpg")
        .all(|(_, b)| !val_bytes.contains(b)));
    assert!(generate(
        with.path(),
        &SynthOptions {
            test: 5,
            ..small(5)
        }
    )
    .is_err());
}

#[test]
fn tasks_load_a_test_split_only_where_the_data_has_one() {
    use onehead::tasks::{cls::ClsTask, det::DetTask, seg::SegTask, OpenOptions, Task};
    let (without, with) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    generate(without.path(), &small(6)).unwrap();
    generate(
        with.path(),
        &SynthOptions {
            test: 10,
            ..small(6)
        },
    )
    .unwrap();
    let dev = Device::Cpu;
    for (root, n) in [(without.path(), 0), (with.path(), 10)] {
        let o = OpenOptions::new(root, 32);
        let tasks: Vec<Box<dyn Task>> = vec![
            Box::new(SegTask::open(&o).unwrap()),
            Box::new(DetTask::open(&o).unwrap()),
            Box::new(ClsTask::open(&o).unwrap()),
        ];
        for t in &tasks {
            assert_eq!(t.len(Split::Test), n, "{}", t.name());
            let batch = t.batch(Split::Test, &[0], &[], &dev);
            assert_eq!(batch.is_ok(), n > 0, "{}", t.name());
            let chance = t.chance(t.primary_metric(), Split::Test);
            // Classification's chance is 1/C on any split; the others' need the split.
            assert_eq!(chance.is_some(), n > 0 || t.name() == "cls", "{}", t.name());
        }
        if n == 0 {
            let err = tasks[0].batch(Split::Test, &[0], &[], &dev).err().unwrap();
            assert!(format!("{err:#}").contains("no test split"), "{err:#}");
        }
    }
}

#[test]
fn refuses_to_overwrite_foreign_folder() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join(SEG_DIR)).unwrap();
    std::fs::write(d.path().join(SEG_DIR).join("mine.txt"), "x").unwrap();
    let err = generate(d.path(), &small(1)).unwrap_err();
    assert!(
        format!("{err:#}").contains("refusing to overwrite"),
        "{err:#}"
    );
}

#[test]
fn loaders_round_trip_synth() {
    let d = tempfile::tempdir().unwrap();
    let sum = generate(d.path(), &small(3)).unwrap();
    assert_eq!(sum.seg_images, [10, 10, 0]);
    let dev = Device::Cpu;

    // Segmentation: palette masks read back as indices 0..=20 and 255.
    let seg_dir = d.path().join(SEG_DIR).join("train");
    let mut raw_values = BTreeSet::new();
    for e in std::fs::read_dir(&seg_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().unwrap() == "png" {
            raw_values.extend(read_mask(&p).unwrap().data);
        }
    }
    assert!(raw_values.contains(&IGNORE_INDEX) && raw_values.contains(&0));
    assert!(raw_values.iter().all(|&v| v <= 20 || v == IGNORE_INDEX));
    assert!(
        raw_values
            .iter()
            .filter(|&&v| (1..=20).contains(&v))
            .count()
            >= 3
    );
    let seg = SegSplit::open(d.path(), Split::Train, 32, false).unwrap();
    assert_eq!(seg.len(), 10);
    let mut loaded_values = BTreeSet::new();
    for i in 0..seg.len() {
        let m = seg.mask(i);
        assert_eq!(m.len(), 32 * 32);
        loaded_values.extend(m.iter().copied());
    }
    // Nearest-neighbour resizing never invents labels.
    assert!(loaded_values.is_subset(&raw_values));

    // Flip mirrors image and mask consistently.
    let flips = [Augment::flip_only(false), Augment::flip_only(true)];
    let (images, masks) = seg.batch(&[0, 0], &flips, &dev).unwrap();
    assert_eq!(images.dims(), &[2, 3, 32, 32]);
    let plain = images.i(0).unwrap().flip(&[2]).unwrap();
    let flipped = images.i(1).unwrap();
    let diff = (plain - flipped)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let (m0, m1) = (&masks[0], &masks[1]);
    for y in 0..32 {
        for x in 0..32 {
            assert_eq!(m0[y * 32 + x], m1[y * 32 + 31 - x]);
        }
    }
    let masks = masks_tensor(&masks, 32, &dev).unwrap();
    assert_eq!(masks.dims(), &[2, 32, 32]);
    assert_eq!(
        masks.i((1, 0, 31)).unwrap().to_scalar::<u32>().unwrap(),
        m0[0] as u32
    );

    // Detection: COCO ids are the real (non-contiguous) ones, remapped to 0..10 sorted by id.
    let json = CocoFile::read(
        &d.path()
            .join("mini_coco_det/annotations/instances_val.json"),
    )
    .unwrap();
    let ids: Vec<u64> = json.categories.iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        COCO_CATEGORIES
            .iter()
            .map(|c| c.0 as u64)
            .collect::<Vec<_>>()
    );
    let det = DetSplit::open(d.path(), Split::Val, 64, false).unwrap();
    assert_eq!(det.class_names.len(), 10);
    assert_eq!(det.class_names[0], "person");
    assert_eq!(det.category_ids, ids);
    let mut n_boxes = 0;
    for (i, im) in json.images.iter().enumerate() {
        assert_eq!(det.image_ids[i], im.id);
        let boxes = det.boxes(i);
        let anns: Vec<_> = json
            .annotations
            .iter()
            .filter(|a| a.image_id == im.id)
            .collect();
        assert_eq!(boxes.len(), anns.len());
        assert!((1..=6).contains(&anns.len()) || anns.is_empty());
        let (sx, sy) = (64.0 / im.width as f32, 64.0 / im.height as f32);
        for (b, a) in boxes.iter().zip(&anns) {
            assert_eq!(det.category_ids[b.class], a.category_id);
            let want = [
                a.bbox[0] as f32 * sx,
                a.bbox[1] as f32 * sy,
                (a.bbox[0] + a.bbox[2]) as f32 * sx,
                (a.bbox[1] + a.bbox[3]) as f32 * sy,
            ];
            for k in 0..4 {
                assert!(
                    (b.bbox[k] - want[k]).abs() < 1e-3,
                    "{:?} vs {want:?}",
                    b.bbox
                );
            }
            n_boxes += 1;
        }
        let (_, fb) = det.batch(&[i], &[Augment::flip_only(true)], &dev).unwrap();
        for (f, b) in fb[0].iter().zip(boxes) {
            assert_eq!(
                f.bbox,
                [64.0 - b.bbox[2], b.bbox[1], 64.0 - b.bbox[0], b.bbox[3]]
            );
            assert_eq!(f.class, b.class);
        }
    }
    assert!(n_boxes >= 10);

    // Classification: 10 Imagenette folders, sorted, balanced.
    let cls = ClsSplit::open(d.path(), Split::Train, 40, false).unwrap();
    assert_eq!(cls.class_names.len(), 10);
    assert_eq!(cls.class_names[0], "n01440764");
    assert_eq!(cls.len(), 10);
    let (images, labels) = cls.batch(&[3, 9], &[], &dev).unwrap();
    assert_eq!(labels, vec![3, 9]);
    // ImageNet normalisation: values span roughly [-2.1, 2.6].
    let mn = images.min_all().unwrap().to_scalar::<f32>().unwrap();
    let mx = images.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(mn >= -2.2 && mx <= 2.7 && mx > mn);
}

/// Measure the default generation (3 x 300 images at 160 px). Not a test: run with
/// `ONEHEAD_SYNTH_OUT=/tmp/x cargo test --release --test data_synth -- --ignored --nocapture`.
#[test]
#[ignore]
fn synth_default_timing() {
    let out = std::env::var("ONEHEAD_SYNTH_OUT").unwrap_or_else(|_| "/tmp/onehead_synth".into());
    let t = std::time::Instant::now();
    let s = generate(Path::new(&out), &SynthOptions::default()).unwrap();
    eprintln!("generated {s:?} in {:.2} s", t.elapsed().as_secs_f64());
}

/// Write a PNG contact sheet of generated images (for eyeballing the benchmark; not a test):
/// `ONEHEAD_SYNTH_OUT=/tmp/x cargo test --test data_synth -- --ignored synth_contact_sheet`.
#[test]
#[ignore]
fn synth_contact_sheet() {
    let out = std::env::var("ONEHEAD_SYNTH_OUT").unwrap_or_else(|_| "/tmp/onehead_synth".into());
    let root = Path::new(&out);
    let s = 128usize;
    let mut sheet = image::RgbImage::new((s * 8) as u32, (s * 3) as u32);
    let seg = SegSplit::open(root, Split::Val, s, false).unwrap();
    let det = DetSplit::open(root, Split::Val, s, false).unwrap();
    let cls = ClsSplit::open(root, Split::Val, s, false).unwrap();
    for (row, (images, is_det)) in [
        (&seg.images, false),
        (&det.images, true),
        (&cls.images, false),
    ]
    .into_iter()
    .enumerate()
    {
        for col in 0..8 {
            let i = (col * 7) % images.len();
            let px = images.pixels(i);
            for y in 0..s {
                for x in 0..s {
                    let p = (y * s + x) * 3;
                    let mut c = [px[p], px[p + 1], px[p + 2]];
                    if is_det {
                        for b in det.boxes(i) {
                            let (xf, yf) = (x as f32, y as f32);
                            let on_x = (xf - b.bbox[0]).abs() < 1.0 || (xf - b.bbox[2]).abs() < 1.0;
                            let on_y = (yf - b.bbox[1]).abs() < 1.0 || (yf - b.bbox[3]).abs() < 1.0;
                            if (on_x && yf >= b.bbox[1] && yf <= b.bbox[3])
                                || (on_y && xf >= b.bbox[0] && xf <= b.bbox[2])
                            {
                                c = [255, 0, 255];
                            }
                        }
                    }
                    sheet.put_pixel((col * s + x) as u32, (row * s + y) as u32, image::Rgb(c));
                }
            }
        }
    }
    sheet.save(root.join("contact_sheet.png")).unwrap();
}

#[test]
fn coco_categories_sorted_by_id_and_png_images_accepted() {
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), &small(11)).unwrap();
    // Categories listed out of order in the JSON: indices still follow increasing id.
    let json = d
        .path()
        .join("mini_coco_det/annotations/instances_train.json");
    let mut c = CocoFile::read(&json).unwrap();
    c.categories.reverse();
    c.write(&json).unwrap();
    let det = DetSplit::open(d.path(), Split::Train, 32, false).unwrap();
    let names: Vec<&str> = COCO_CATEGORIES.iter().map(|c| c.1).collect();
    assert_eq!(det.class_names, names);
    let a = &c.annotations[0];
    let i = det
        .image_ids
        .iter()
        .position(|&id| id == a.image_id)
        .unwrap();
    let boxes = det.boxes(i);
    let first = c
        .annotations
        .iter()
        .find(|x| x.image_id == a.image_id)
        .unwrap();
    assert_eq!(det.category_ids[boxes[0].class], first.category_id);

    // A .png image in a class folder is read like a JPEG.
    let dir = d.path().join("imagenette_160/train/n01440764");
    let jpg = dir.join("synth_train_000000.JPEG");
    image::open(&jpg)
        .unwrap()
        .save(dir.join("extra.png"))
        .unwrap();
    let cls = ClsSplit::open(d.path(), Split::Train, 16, false).unwrap();
    assert_eq!(cls.len(), 11);
    assert!(cls.images.files.iter().any(|f| f.ends_with("extra.png")));
}

#[test]
fn synth_test_is_checked_and_named_in_the_data_root() {
    use onehead::config::{DataConfig, Experiment};
    let d = DataConfig::default();
    assert_eq!(d.synth_test, 300);
    let root = d.resolved_root();
    assert_eq!(root, Path::new("data/synthetic-s0-160px-240x60x300"));
    let none = DataConfig {
        synth_test: 0,
        ..DataConfig::default()
    };
    assert_eq!(
        none.resolved_root(),
        Path::new("data/synthetic-s0-160px-240x60")
    );
    let p = Path::new("exp.toml");
    let check = |test: usize| {
        let text =
            format!("name = \"t\"\n[[stages]]\ntask = \"seg\"\n[data]\nsynth_test = {test}\n");
        Experiment::from_toml_str(&text, p, &[])
            .and_then(|e| e.validate(p))
            .map_err(|e| e.to_string())
    };
    assert!(check(0).is_ok() && check(10).is_ok());
    for bad in [5, 10_000_000] {
        let msg = check(bad).unwrap_err();
        assert!(msg.contains("data.synth_test"), "{msg}");
    }
}
