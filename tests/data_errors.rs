//! Bad input gives a clear error naming the file (never a panic).

use std::path::Path;

use onehead::data::coco::CocoFile;
use onehead::data::imageio::encode_mask_png;
use onehead::data::{generate, DataError, Split, SynthOptions};
use onehead::tasks::cls::ClsSplit;
use onehead::tasks::det::DetSplit;
use onehead::tasks::seg::SegSplit;

fn synth(dir: &Path) {
    let o = SynthOptions {
        seed: 1,
        train: 10,
        val: 10,
        test: 0,
        size: 32,
    };
    generate(dir, &o).unwrap();
}

/// Open the train split of `task` and return the error it must give.
fn open_err(task: &str, root: &Path) -> (anyhow::Error, String) {
    let result = match task {
        "seg" => SegSplit::open(root, Split::Train, 24, false).map(|_| ()),
        "det" => DetSplit::open(root, Split::Train, 24, false).map(|_| ()),
        _ => ClsSplit::open(root, Split::Train, 24, false).map(|_| ()),
    };
    let err = match result {
        Ok(()) => panic!("expected an error"),
        Err(e) => e,
    };
    let msg = format!("{err:#}");
    (err, msg)
}

fn data_err(e: &anyhow::Error) -> &DataError {
    e.downcast_ref::<DataError>()
        .unwrap_or_else(|| panic!("not a DataError: {e:#}"))
}

#[test]
fn missing_dataset_names_the_commands() {
    let d = tempfile::tempdir().unwrap();
    for task in ["seg", "det", "cls"] {
        let (e, msg) = open_err(task, d.path());
        assert!(matches!(data_err(&e), DataError::MissingDataset { .. }));
        let root = d.path().display().to_string();
        assert!(
            msg.contains(&format!("onehead synth --out {root}")),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("onehead prepare --out {root}")),
            "{msg}"
        );
        assert!(msg.contains("train"), "{msg}");
    }
    // Detection images present but the JSON missing: the JSON path is named.
    std::fs::create_dir_all(d.path().join("mini_coco_det/train")).unwrap();
    let (e, msg) = open_err("det", d.path());
    assert!(matches!(data_err(&e), DataError::MissingDataset { .. }));
    assert!(msg.contains("instances_train.json"), "{msg}");
}

#[test]
fn corrupt_images_are_named() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path());
    let bad = d
        .path()
        .join("imagenette_160/train/n02102040/synth_train_000001.JPEG");
    std::fs::write(&bad, b"definitely not a jpeg").unwrap();
    let (e, msg) = open_err("cls", d.path());
    assert!(matches!(data_err(&e), DataError::CorruptImage { .. }));
    assert!(msg.contains("synth_train_000001.JPEG"), "{msg}");

    let bad = d.path().join("mini_voc_seg/train/synth_train_000004.jpg");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap(); // truncated JPEG
    let (e, msg) = open_err("seg", d.path());
    assert!(
        matches!(data_err(&e), DataError::CorruptImage { .. }),
        "{msg}"
    );
    assert!(msg.contains("synth_train_000004.jpg"), "{msg}");
}

#[test]
fn bad_masks_are_named() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path());
    let mask = d.path().join("mini_voc_seg/train/synth_train_000002.png");
    // Wrong size.
    std::fs::write(&mask, encode_mask_png(7, 5, &[0; 35]).unwrap()).unwrap();
    let (e, msg) = open_err("seg", d.path());
    assert!(
        matches!(
            data_err(&e),
            DataError::MaskSizeMismatch {
                mask_w: 7,
                mask_h: 5,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("synth_train_000002.png") && msg.contains("synth_train_000002.jpg"),
        "{msg}"
    );

    // Right size, but an id outside 0..=20 / 255.
    let img = image::open(d.path().join("mini_voc_seg/train/synth_train_000002.jpg")).unwrap();
    let (w, h) = (img.width(), img.height());
    let mut data = vec![0u8; (w * h) as usize];
    data[3] = 77;
    std::fs::write(&mask, encode_mask_png(w, h, &data).unwrap()).unwrap();
    let (e, msg) = open_err("seg", d.path());
    assert!(matches!(data_err(&e), DataError::BadMask { .. }), "{msg}");
    assert!(
        msg.contains("77") && msg.contains("synth_train_000002.png"),
        "{msg}"
    );

    // An RGB PNG (colours, not indices).
    image::RgbImage::new(w, h).save(&mask).unwrap();
    let (e, msg) = open_err("seg", d.path());
    assert!(matches!(data_err(&e), DataError::BadMask { .. }), "{msg}");

    // An image without its mask.
    std::fs::remove_file(&mask).unwrap();
    let (e, msg) = open_err("seg", d.path());
    assert!(matches!(data_err(&e), DataError::Unpaired { .. }), "{msg}");
    assert!(msg.contains("synth_train_000002.jpg"), "{msg}");
}

#[test]
fn bad_coco_annotations_are_named() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path());
    let json = d
        .path()
        .join("mini_coco_det/annotations/instances_train.json");
    let good = CocoFile::read(&json).unwrap();

    let mut c = good.clone();
    c.annotations[0].image_id = 9999;
    let ann_id = c.annotations[0].id;
    c.write(&json).unwrap();
    let (e, msg) = open_err("det", d.path());
    assert!(
        matches!(data_err(&e), DataError::UnknownImage { image_id: 9999, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("instances_train.json") && msg.contains(&format!("annotation {ann_id}")),
        "{msg}"
    );

    let mut c = good.clone();
    c.annotations[1].category_id = 4; // motorcycle: real COCO id, not among the 10
    c.write(&json).unwrap();
    let (e, msg) = open_err("det", d.path());
    assert!(
        matches!(
            data_err(&e),
            DataError::UnknownCategory { category_id: 4, .. }
        ),
        "{msg}"
    );

    good.write(&json).unwrap();
    let gone = d
        .path()
        .join("mini_coco_det/train")
        .join(&good.images[3].file_name);
    std::fs::remove_file(&gone).unwrap();
    let (e, msg) = open_err("det", d.path());
    assert!(
        matches!(data_err(&e), DataError::MissingImageFile { .. }),
        "{msg}"
    );
    assert!(msg.contains(&good.images[3].file_name), "{msg}");

    std::fs::write(&json, b"{ not json").unwrap();
    let (_, msg) = open_err("det", d.path());
    assert!(msg.contains("instances_train.json"), "{msg}");
}

#[test]
fn empty_class_folder_is_named() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path());
    let empty = d.path().join("imagenette_160/train/n99999999");
    std::fs::create_dir_all(&empty).unwrap();
    let (e, msg) = open_err("cls", d.path());
    assert!(
        matches!(data_err(&e), DataError::EmptyFolder { .. }),
        "{msg}"
    );
    assert!(msg.contains("n99999999"), "{msg}");
}

#[test]
fn bad_batch_arguments_are_errors() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path());
    let ds = ClsSplit::open(d.path(), Split::Val, 16, false).unwrap();
    let dev = candle_core::Device::Cpu;
    assert!(ds.batch(&[0, 99], &[], &dev).is_err());
    let one_aug = [onehead::data::Augment::flip_only(true)];
    assert!(ds.batch(&[0, 1], &one_aug, &dev).is_err());
    // A batch of one task handed to another task's loss is an error, not a panic.
    use onehead::tasks::Task;
    let root = d.path().to_path_buf();
    let opts = onehead::tasks::OpenOptions::new(root, 32);
    let cls = onehead::tasks::cls::ClsTask::open(&opts).unwrap();
    let seg = onehead::tasks::seg::SegTask::open(&opts).unwrap();
    let b = cls.batch(Split::Val, &[0], &[], &dev).unwrap();
    let out = candle_core::Tensor::zeros((1, 21, 4, 4), candle_core::DType::F32, &dev).unwrap();
    let err = seg
        .loss(&out, &b)
        .err()
        .expect("a classification batch is no seg batch");
    assert!(format!("{err:#}").contains("targets"), "{err:#}");
}
