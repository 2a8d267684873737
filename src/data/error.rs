//! Errors of the data layer that callers may want to match on (through
//! `anyhow::Error::downcast_ref::<DataError>()`). Every variant names the offending file.

use std::path::PathBuf;

/// A data-layer failure with the file or folder it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset folder is absent; the message says which command creates it.
    #[error(
        "dataset folder {} not found; create it with `onehead synth --out {}` (synthetic \
         benchmark) or `onehead prepare --out {}` (real course sets)",
        path.display(), root.display(), root.display()
    )]
    MissingDataset { path: PathBuf, root: PathBuf },
    /// An image file that cannot be read or decoded.
    #[error("cannot decode image {}: {reason}", path.display())]
    CorruptImage { path: PathBuf, reason: String },
    /// A segmentation mask that is not an 8-bit palette/grey PNG or holds out-of-range ids.
    #[error("bad segmentation mask {}: {reason}", path.display())]
    BadMask { path: PathBuf, reason: String },
    /// A mask whose size differs from its image's.
    #[error(
        "mask {} is {mask_w}x{mask_h} pixels but its image {} is {image_w}x{image_h}",
        mask.display(), image.display()
    )]
    MaskSizeMismatch {
        mask: PathBuf,
        image: PathBuf,
        mask_w: u32,
        mask_h: u32,
        image_w: u32,
        image_h: u32,
    },
    /// A segmentation image without a mask (or the reverse).
    #[error("{}: no matching {what} with the same file stem", path.display())]
    Unpaired { path: PathBuf, what: &'static str },
    /// A COCO annotation whose `image_id` is not among the JSON's `images`.
    #[error("{}: annotation {ann_id} refers to image id {image_id}, which is not listed in `images`", json.display())]
    UnknownImage {
        json: PathBuf,
        ann_id: u64,
        image_id: u64,
    },
    /// A COCO annotation whose `category_id` is not among the JSON's `categories`.
    #[error("{}: annotation {ann_id} has category id {category_id}, which is not listed in `categories`", json.display())]
    UnknownCategory {
        json: PathBuf,
        ann_id: u64,
        category_id: u64,
    },
    /// An image listed in a COCO JSON whose file does not exist.
    #[error("{}: image {} listed in the annotations does not exist", json.display(), path.display())]
    MissingImageFile { json: PathBuf, path: PathBuf },
    /// A class folder (or a whole split) without images.
    #[error("{} contains no images (.jpg, .jpeg, .JPEG or .png)", path.display())]
    EmptyFolder { path: PathBuf },
    /// An HTTP download answered with an error status.
    #[error("downloading {url} failed: HTTP status {status}")]
    Http { url: String, status: u16 },
    /// A downloaded file whose size is not the expected one.
    #[error("{}: {got} bytes, expected {expected}", path.display())]
    SizeMismatch {
        path: PathBuf,
        got: u64,
        expected: u64,
    },
    /// A downloaded file whose SHA-256 is not the expected one.
    #[error("{}: sha256 {got}, expected {expected}", path.display())]
    ChecksumMismatch {
        path: PathBuf,
        got: String,
        expected: String,
    },
    /// An output folder that onehead did not create and will not overwrite.
    #[error("refusing to overwrite {} (it was not written by onehead); remove it or pick another --out", path.display())]
    WouldOverwrite { path: PathBuf },
}
