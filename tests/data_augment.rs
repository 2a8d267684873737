//! Random resized crops and flips in the data layer: identity, geometry of a known crop,
//! masks, and the reproducibility of draws.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::Device;
use onehead::data::{
    generate, Augment, AugmentConfig, Batch, DetBox, Split, SynthOptions, Target, TaskDataset,
    IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES,
};
use onehead::TaskKind;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn synth(dir: &Path) {
    generate(
        dir,
        &SynthOptions {
            seed: 3,
            train: 10,
            val: 10,
            size: 48,
        },
    )
    .unwrap();
}

fn images(b: &Batch) -> Vec<f32> {
    b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn boxes(t: &Target) -> &[DetBox] {
    match t {
        Target::Det(b) => b,
        other => panic!("not a detection target: {other:?}"),
    }
}

#[test]
fn full_image_crop_is_identity() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    let dev = Device::Cpu;
    for task in [TaskKind::Seg, TaskKind::Det, TaskKind::Cls] {
        // 32 px: the cached images are resized from the 48 px files.
        let ds = TaskDataset::open(task, dir.path(), Split::Train, 32).unwrap();
        let idx: Vec<usize> = (0..ds.len()).collect();
        for flip in [false, true] {
            let flips = vec![flip; idx.len()];
            let plain = ds.batch(&idx, &flips, &dev).unwrap();
            let full = vec![
                Augment {
                    flip,
                    crop: Some([0.0, 0.0, 1.0, 1.0]),
                };
                idx.len()
            ];
            let cropped = ds.batch_augmented(&idx, &full, &dev).unwrap();
            assert_eq!(
                images(&plain),
                images(&cropped),
                "{task} flip={flip}: images"
            );
            assert_eq!(
                plain.targets, cropped.targets,
                "{task} flip={flip}: targets"
            );
            // `augs` empty = no augmentation = `batch` with no flips.
            if !flip {
                let none = ds.batch_augmented(&idx, &[], &dev).unwrap();
                assert_eq!(images(&plain), images(&none));
                assert_eq!(plain.targets, none.targets);
            }
        }
    }
}

/// A one-image COCO detection set: 64x64, left half black, right half white, four boxes.
fn tiny_det(root: &Path) {
    let det = root.join("mini_coco_det");
    std::fs::create_dir_all(det.join("train")).unwrap();
    std::fs::create_dir_all(det.join("annotations")).unwrap();
    let img = image::RgbImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            image::Rgb([0, 0, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    img.save(det.join("train/a.png")).unwrap();
    // COCO boxes are [x, y, w, h].
    let anns = [
        (1, [40.0, 8.0, 12.0, 16.0]),  // right half: kept
        (2, [4.0, 8.0, 16.0, 16.0]),   // left half: dropped
        (3, [24.0, 30.0, 16.0, 10.0]), // half inside: clipped, kept
        (4, [10.0, 30.0, 26.0, 10.0]), // 4 of 26 px inside: dropped
    ];
    let anns: Vec<String> = anns
        .iter()
        .map(|(id, b)| {
            format!(
                r#"{{"id": {id}, "image_id": 1, "category_id": 1, "bbox": [{}, {}, {}, {}], "area": 1, "iscrowd": 0}}"#,
                b[0], b[1], b[2], b[3]
            )
        })
        .collect();
    let json = format!(
        r#"{{"images": [{{"id": 1, "file_name": "a.png", "width": 64, "height": 64}}],
            "annotations": [{}],
            "categories": [{{"id": 1, "name": "person", "supercategory": "person"}}]}}"#,
        anns.join(",")
    );
    std::fs::write(det.join("annotations/instances_train.json"), json).unwrap();
}

#[test]
fn right_half_crop_maps_boxes_and_pixels() {
    let dir = tempfile::tempdir().unwrap();
    tiny_det(dir.path());
    let dev = Device::Cpu;
    let ds = TaskDataset::open(TaskKind::Det, dir.path(), Split::Train, 64).unwrap();
    assert_eq!(boxes(ds.target(0)).len(), 4);
    let right = Some([0.5, 0.0, 1.0, 1.0]);
    let b = ds
        .batch_augmented(
            &[0],
            &[Augment {
                flip: false,
                crop: right,
            }],
            &dev,
        )
        .unwrap();
    // x: (x - 32) * 2, y unchanged.
    let got: Vec<[f32; 4]> = boxes(&b.targets[0]).iter().map(|b| b.bbox).collect();
    assert_eq!(got, vec![[16.0, 8.0, 40.0, 24.0], [0.0, 30.0, 16.0, 40.0]]);
    // Only white pixels in the crop: nothing from the black half leaks in.
    let white: Vec<f32> = (0..3)
        .map(|c| (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        .collect();
    let px = images(&b);
    for (c, plane) in px.chunks(64 * 64).enumerate() {
        assert!(plane.iter().all(|&v| v == white[c]), "channel {c}");
    }
    // Flipped after cropping: x' = 64 - x.
    let b = ds
        .batch_augmented(
            &[0],
            &[Augment {
                flip: true,
                crop: right,
            }],
            &dev,
        )
        .unwrap();
    let got: Vec<[f32; 4]> = boxes(&b.targets[0]).iter().map(|b| b.bbox).collect();
    assert_eq!(got, vec![[24.0, 8.0, 48.0, 24.0], [48.0, 30.0, 64.0, 40.0]]);
    // A crop that is not a rectangle inside the image is an error.
    let bad = Augment {
        flip: false,
        crop: Some([0.6, 0.0, 0.4, 1.0]),
    };
    assert!(ds.batch_augmented(&[0], &[bad], &dev).is_err());
}

#[test]
fn cropped_masks_keep_valid_ids_and_labels_stay() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    let dev = Device::Cpu;
    let cfg = AugmentConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let seg = TaskDataset::open(TaskKind::Seg, dir.path(), Split::Train, 32).unwrap();
    let idx: Vec<usize> = (0..seg.len()).collect();
    let mut cropped = 0;
    for _ in 0..3 {
        let augs: Vec<Augment> = idx.iter().map(|_| cfg.draw(&mut rng)).collect();
        cropped += augs.iter().filter(|a| a.crop.is_some()).count();
        let b = seg.batch_augmented(&idx, &augs, &dev).unwrap();
        for (&i, t) in idx.iter().zip(&b.targets) {
            let (Target::Seg(m), Target::Seg(orig)) = (t, seg.target(i)) else {
                panic!("not a mask")
            };
            assert_eq!(m.len(), 32 * 32);
            let before: BTreeSet<u8> = orig.iter().copied().collect();
            for &v in m {
                assert!((v as usize) < VOC_CLASSES.len() || v == IGNORE_INDEX, "{v}");
                assert!(before.contains(&v), "value {v} not in the source mask");
            }
        }
    }
    assert!(
        cropped > 20,
        "default config should crop most samples ({cropped}/30)"
    );
    let cls = TaskDataset::open(TaskKind::Cls, dir.path(), Split::Train, 32).unwrap();
    let augs: Vec<Augment> = idx.iter().map(|_| cfg.draw(&mut rng)).collect();
    let b = cls.batch_augmented(&idx, &augs, &dev).unwrap();
    for (&i, t) in idx.iter().zip(&b.targets) {
        assert_eq!(t, cls.target(i));
    }
}

#[test]
fn draws_are_reproducible_and_in_range() {
    let cfg = AugmentConfig::default();
    let seq = |seed: u64| -> Vec<Augment> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..200).map(|_| cfg.draw(&mut rng)).collect()
    };
    let (a, b, c) = (seq(5), seq(5), seq(6));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().any(|x| x.flip) && a.iter().any(|x| !x.flip));
    for crop in a.iter().filter_map(|x| x.crop) {
        let [x0, y0, x1, y1] = crop;
        assert!(0.0 <= x0 && x0 < x1 && x1 <= 1.0 && 0.0 <= y0 && y0 < y1 && y1 <= 1.0);
        let (w, h) = (x1 - x0, y1 - y0);
        assert!(
            w * h >= 0.35 - 1e-4 && w * h <= 1.0 + 1e-4,
            "area {}",
            w * h
        );
        assert!(
            w / h >= 0.75 - 1e-3 && w / h <= 4.0 / 3.0 + 1e-3,
            "aspect {}",
            w / h
        );
    }
}

#[test]
fn unit_scale_never_crops_and_keeps_the_flip_stream() {
    for flip in [false, true] {
        let cfg = AugmentConfig {
            flip,
            scale: (1.0, 1.0),
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut old = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..100 {
            let a = cfg.draw(&mut rng);
            assert_eq!(a.crop, None);
            // Exactly the draws the training loop made before crops existed.
            assert_eq!(a.flip, flip && old.random_bool(0.5));
        }
        assert_eq!(rng.random::<u64>(), old.random::<u64>());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    assert_eq!(AugmentConfig::none().draw(&mut rng), Augment::default());
}
