//! Datasets: the three on-disk formats (VOC-style segmentation, COCO-style detection,
//! class-folder classification), the built-in synthetic benchmark written in those same
//! formats, `prepare` for the real course sets, and batching.
//!
//! Layout under a data root (identical for the synthetic benchmark and the real sets):
//! ```text
//! ROOT/mini_voc_seg/{train,val,test}/<stem>.jpg + <stem>.png   (palette PNG, ids 0..C-1, 255 = ignore)
//! ROOT/mini_coco_det/{train,val,test}/<file_name>              (images)
//! ROOT/mini_coco_det/annotations/instances_{train,val,test}.json
//! ROOT/imagenette_160/{train,val,test}/<class-folder>/*.JPEG
//! ```
//!
//! The `test` split is held out: only the synthetic benchmark writes one (`data.synth_test`
//! images per task), and nothing reads it for training, replay, Fisher information, teachers
//! or model selection. The real course sets (`prepare`) have none; the tasks then report 0
//! samples for it.
//!
//! Writers: [`generate()`] (`onehead synth --out ROOT`) draws the synthetic benchmark;
//! [`prepare()`] (`onehead prepare --out ROOT`) downloads and samples the real course sets.
//! Both mark the dataset folders they write with a `.onehead` file and only ever replace
//! folders carrying that marker. Readers: each task's split type in [`crate::tasks`]
//! (`SegSplit`, `DetSplit`, `ClsSplit`); errors as [`DataError`].

/// Folder names of the three datasets under a data root.
pub const SEG_DIR: &str = "mini_voc_seg";
pub const DET_DIR: &str = "mini_coco_det";
pub const CLS_DIR: &str = "imagenette_160";

/// ImageNet normalisation (the pretrained backbone expects it).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Mask value meaning "ignore this pixel" (VOC convention).
pub const IGNORE_INDEX: u8 = 255;

/// Which split of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    /// Model selection, verdicts during development.
    Val,
    /// Held out: scored only, never trained on or selected with (synthetic benchmark only).
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// The 21 segmentation classes (index = mask value), PASCAL VOC order; 0 is background.
/// The synthetic benchmark draws one object type per foreground class.
pub const VOC_CLASSES: [&str; 21] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// The 10 detection categories: `(COCO category id, name, VOC class index)`, sorted by COCO id.
///
/// This is the ONE place where the detection class list lives: `prepare` keeps exactly these
/// categories of COCO 2017, and `synth` writes exactly these ids (real COCO ids, not 0-based,
/// so that loaders must remap them) and draws each one with the visual signature of the VOC
/// class in the third column (the same object type the segmentation set uses).
pub const COCO_CATEGORIES: [(u32, &str, usize); 10] = [
    (1, "person", 15),
    (2, "bicycle", 2),
    (3, "car", 7),
    (6, "bus", 6),
    (16, "bird", 3),
    (17, "cat", 8),
    (18, "dog", 12),
    (19, "horse", 13),
    (44, "bottle", 5),
    (62, "chair", 9),
];

/// Imagenette's 10 classes: `(folder name = WordNet id, readable name)`, sorted by folder name
/// (which is the label order of the class-folder loader).
pub const IMAGENETTE_CLASSES: [(&str, &str); 10] = [
    ("n01440764", "tench"),
    ("n02102040", "English springer"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw"),
    ("n03028079", "church"),
    ("n03394916", "French horn"),
    ("n03417042", "garbage truck"),
    ("n03425413", "gas pump"),
    ("n03445777", "golf ball"),
    ("n03888605", "parachute"),
];

pub use crate::data::augment::{Augment, AugmentConfig};
pub use crate::data::error::DataError;
pub use crate::data::prepare::{prepare, ArchiveSpec, PrepareOptions, PrepareSummary};
pub use crate::data::synth::{generate, SynthOptions, SynthSummary};

pub mod augment;
pub mod coco;
pub mod error;
pub mod imageio;
pub mod prepare;
pub mod synth;
