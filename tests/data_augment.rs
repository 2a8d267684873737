//! Random resized crops and flips in the data layer: identity, geometry of a known crop,
//! masks, and the reproducibility of draws.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{Device, Tensor};
use onehead::boxes::DetBox;
use onehead::data::{
    generate, Augment, AugmentConfig, Split, SynthOptions, IGNORE_INDEX, IMAGENET_MEAN,
    IMAGENET_STD, VOC_CLASSES,
};
use onehead::tasks::cls::ClsSplit;
use onehead::tasks::det::DetSplit;
use onehead::tasks::seg::SegSplit;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn synth(dir: &Path) {
    generate(
        dir,
        &SynthOptions {
            seed: 3,
            train: 10,
            val: 10,
            test: 0,
            size: 48,
        },
    )
    .unwrap();
}

fn images(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn boxes(b: &[DetBox]) -> Vec<[f32; 4]> {
    b.iter().map(|b| b.bbox).collect()
}

/// For one split type: a full-image crop equals no crop, flipped or not, and empty `augs`
/// mean no augmentation.
macro_rules! full_crop_is_identity {
    ($ds:expr, $name:expr) => {{
        let ds = $ds;
        let dev = Device::Cpu;
        let idx: Vec<usize> = (0..ds.len()).collect();
        for flip in [false, true] {
            let flips = vec![Augment::flip_only(flip); idx.len()];
            let plain = ds.batch(&idx, &flips, &dev).unwrap();
            let full = vec![
                Augment {
                    flip,
                    crop: Some([0.0, 0.0, 1.0, 1.0]),
                };
                idx.len()
            ];
            let cropped = ds.batch(&idx, &full, &dev).unwrap();
            assert_eq!(
                images(&plain.0),
                images(&cropped.0),
                "{} flip={flip}: images",
                $name
            );
            assert_eq!(plain.1, cropped.1, "{} flip={flip}: targets", $name);
            if !flip {
                let none = ds.batch(&idx, &[], &dev).unwrap();
                assert_eq!(images(&plain.0), images(&none.0));
                assert_eq!(plain.1, none.1);
            }
        }
    }};
}

#[test]
fn full_image_crop_is_identity() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    // 32 px: the cached images are resized from the 48 px files.
    let root = dir.path();
    full_crop_is_identity!(
        SegSplit::open(root, Split::Train, 32, false).unwrap(),
        "seg"
    );
    full_crop_is_identity!(
        DetSplit::open(root, Split::Train, 32, false).unwrap(),
        "det"
    );
    full_crop_is_identity!(
        ClsSplit::open(root, Split::Train, 32, false).unwrap(),
        "cls"
    );
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
        (4, [10.0, 30.0, 26.0, 10.0]), // 4 of 26 px inside: an ignore region
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
    let ds = DetSplit::open(dir.path(), Split::Train, 64, false).unwrap();
    assert_eq!(ds.boxes(0).len(), 4);
    let right = Some([0.5, 0.0, 1.0, 1.0]);
    let (px, targets) = ds
        .batch(
            &[0],
            &[Augment {
                flip: false,
                crop: right,
            }],
            &dev,
        )
        .unwrap();
    // x: (x - 32) * 2, y unchanged; the box with 4 of its 26 px visible stays as an ignore
    // region (its visible pixels must not be taught as background).
    assert_eq!(
        boxes(&targets[0]),
        vec![
            [16.0, 8.0, 40.0, 24.0],
            [0.0, 30.0, 16.0, 40.0],
            [0.0, 30.0, 8.0, 40.0]
        ]
    );
    let crowd: Vec<bool> = targets[0].iter().map(|b| b.crowd).collect();
    assert_eq!(crowd, [false, false, true]);
    // Only white pixels in the crop: nothing from the black half leaks in.
    let white: Vec<f32> = (0..3)
        .map(|c| (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        .collect();
    let px = images(&px);
    for (c, plane) in px.chunks(64 * 64).enumerate() {
        assert!(plane.iter().all(|&v| v == white[c]), "channel {c}");
    }
    // Flipped after cropping: x' = 64 - x.
    let (_, targets) = ds
        .batch(
            &[0],
            &[Augment {
                flip: true,
                crop: right,
            }],
            &dev,
        )
        .unwrap();
    assert_eq!(
        boxes(&targets[0]),
        vec![
            [24.0, 8.0, 48.0, 24.0],
            [48.0, 30.0, 64.0, 40.0],
            [56.0, 30.0, 64.0, 40.0]
        ]
    );
    // A crop that is not a rectangle inside the image is an error.
    let bad = Augment {
        flip: false,
        crop: Some([0.6, 0.0, 0.4, 1.0]),
    };
    assert!(ds.batch(&[0], &[bad], &dev).is_err());
}

#[test]
fn cropped_masks_keep_valid_ids_and_labels_stay() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    let dev = Device::Cpu;
    let cfg = AugmentConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let seg = SegSplit::open(dir.path(), Split::Train, 32, false).unwrap();
    let idx: Vec<usize> = (0..seg.len()).collect();
    let mut cropped = 0;
    for _ in 0..3 {
        let augs: Vec<Augment> = idx.iter().map(|_| cfg.draw(&mut rng, 1.0)).collect();
        cropped += augs.iter().filter(|a| a.crop.is_some()).count();
        let (_, masks) = seg.batch(&idx, &augs, &dev).unwrap();
        for (&i, m) in idx.iter().zip(&masks) {
            let orig = seg.mask(i);
            assert_eq!(m.len(), 32 * 32);
            let before: BTreeSet<u8> = orig.iter().copied().collect();
            for &v in m.iter() {
                assert!((v as usize) < VOC_CLASSES.len() || v == IGNORE_INDEX, "{v}");
                assert!(before.contains(&v), "value {v} not in the source mask");
            }
        }
    }
    assert!(
        cropped > 20,
        "default config should crop most samples ({cropped}/30)"
    );
    let cls = ClsSplit::open(dir.path(), Split::Train, 32, false).unwrap();
    let augs: Vec<Augment> = idx.iter().map(|_| cfg.draw(&mut rng, 1.0)).collect();
    let (_, labels) = cls.batch(&idx, &augs, &dev).unwrap();
    for (&i, &y) in idx.iter().zip(&labels) {
        assert_eq!(y, cls.label(i));
    }
}

#[test]
fn draws_are_reproducible_and_in_range() {
    let cfg = AugmentConfig::default();
    let seq = |seed: u64| -> Vec<Augment> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..200).map(|_| cfg.draw(&mut rng, 1.0)).collect()
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
            let a = cfg.draw(&mut rng, 1.0);
            assert_eq!(a.crop, None);
            // Exactly the draws the training loop made before crops existed.
            assert_eq!(a.flip, flip && old.random_bool(0.5));
        }
        assert_eq!(rng.random::<u64>(), old.random::<u64>());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    assert_eq!(
        AugmentConfig::none().draw(&mut rng, 1.0),
        Augment::default()
    );
}
