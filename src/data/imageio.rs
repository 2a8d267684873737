//! Image and mask files: decoding, resizing, palette-PNG masks, JPEG encoding, listing.
//!
//! Masks are read with the `png` crate with its default (identity) transformations, which
//! returns the raw palette *indices* (the class ids); the `image` crate would expand a palette
//! PNG to RGB and lose them.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{imageops::FilterType, RgbImage};

use super::DataError;

/// File extensions accepted as images (case as found in the real sets).
pub const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "JPEG", "png"];

/// Name of the marker file that `synth` and `prepare` leave in each dataset folder they write;
/// they only ever delete a folder that carries it.
pub const MARKER: &str = ".onehead";

/// Whether `path` has one of [`IMAGE_EXTS`] (`.JPG` too).
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

/// Whether `path` is a JPEG by extension.
pub fn is_jpeg(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg"))
        .unwrap_or(false)
}

/// Regular files of `dir` (symbolic links followed), sorted by file name (byte order) so
/// that every listing is deterministic across file systems.
pub fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = entries(dir)?
        .into_iter()
        .filter(|(_, m)| m.is_file())
        .map(|(p, _)| p)
        .collect();
    out.sort();
    Ok(out)
}

/// Sub-folders of `dir` (symbolic links followed), sorted by name.
pub fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = entries(dir)?
        .into_iter()
        .filter(|(_, m)| m.is_dir())
        .map(|(p, _)| p)
        .collect();
    out.sort();
    Ok(out)
}

/// Every entry of `dir` with the metadata of what it points to: a symbolic link counts as
/// its target (a linked class folder is a class), and a link to nothing is an error naming
/// it, never an entry quietly left out.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let meta = std::fs::metadata(&path).with_context(|| {
            format!(
                "{} cannot be read (a symbolic link to nothing?): fix or remove it",
                path.display()
            )
        })?;
        out.push((path, meta));
    }
    Ok(out)
}

/// Decode an image file (JPEG or PNG, any colour type) to 8-bit RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let corrupt = |reason: String| DataError::CorruptImage {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| corrupt(format!("reading it failed: {e}")))?;
    if is_jpeg(path) && !has_jpeg_end(&bytes) {
        // Decoders fill a cut-off JPEG with grey and say nothing: a copy or download that
        // stopped early would train as a half-grey image.
        return Err(corrupt("truncated: the JPEG has no end-of-image marker".into()).into());
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| corrupt(e.to_string()))?;
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => corrupt(format!(
            "too large to decode ({}): above the decoder's memory limit; downscale it",
            image::image_dimensions(path)
                .map(|(w, h)| format!("{w}x{h} pixels"))
                .unwrap_or_else(|_| "size unknown".into())
        )),
        e => corrupt(e.to_string()),
    })?;
    Ok(img.to_rgb8())
}

/// Whether a JPEG ends with its end-of-image marker (`FF D9`, trailing zero padding allowed).
fn has_jpeg_end(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    end >= 2 && bytes[end - 2..end] == [0xFF, 0xD9]
}

/// Width and height of an image file from its header (no full decode).
pub fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    image::image_dimensions(path).map_err(|e| {
        DataError::CorruptImage {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
        .into()
    })
}

/// Resize to `size x size` with a triangle (bilinear) filter; returns HWC u8 bytes.
pub fn resize_rgb(img: &RgbImage, size: usize) -> Vec<u8> {
    if img.width() as usize == size && img.height() as usize == size {
        return img.as_raw().clone();
    }
    image::imageops::resize(img, size as u32, size as u32, FilterType::Triangle).into_raw()
}

/// Nearest-neighbour resize of a `w x h` label map to `size x size` (labels must never be
/// interpolated). Pixel centres are mapped: `src = floor((dst + 0.5) * w / size)`.
pub fn resize_mask(mask: &[u8], w: usize, h: usize, size: usize) -> Vec<u8> {
    let xs: Vec<usize> = (0..size)
        .map(|x| ((2 * x + 1) * w / (2 * size)).min(w - 1))
        .collect();
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        let sy = ((2 * y + 1) * h / (2 * size)).min(h - 1);
        let row = &mask[sy * w..(sy + 1) * w];
        out.extend(xs.iter().map(|&sx| row[sx]));
    }
    out
}

/// A decoded label mask: `width x height` raw indices, row-major.
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Read a segmentation mask PNG as raw class indices. Accepts 8-bit palette PNGs (VOC) and
/// 8-bit greyscale PNGs (values taken as ids); anything else is a [`DataError::BadMask`].
pub fn read_mask(path: &Path) -> Result<Mask> {
    let bad = |reason: String| DataError::BadMask {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    // Default transformations are the identity: palette images stay indices.
    let decoder = png::Decoder::new(BufReader::new(file));
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("image too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(e.to_string()))?;
    if info.bit_depth != png::BitDepth::Eight
        || !matches!(
            info.color_type,
            png::ColorType::Indexed | png::ColorType::Grayscale
        )
    {
        return Err(bad(format!(
            "expected an 8-bit palette or greyscale PNG, found {:?} {:?}",
            info.color_type, info.bit_depth
        ))
        .into());
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let mut data = Vec::with_capacity(w * h);
    for row in buf.chunks(info.line_size).take(h) {
        data.extend_from_slice(&row[..w]);
    }
    Ok(Mask {
        width: info.width,
        height: info.height,
        data,
    })
}

/// The PASCAL VOC colour map (256 RGB entries; 255 = the ignore colour (224, 224, 192)).
pub fn voc_palette() -> Vec<u8> {
    let mut pal = Vec::with_capacity(256 * 3);
    for i in 0..256u32 {
        let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
        let mut c = i;
        for j in 0..8 {
            r |= ((c & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        pal.extend_from_slice(&[r, g, b]);
    }
    pal
}

/// Encode a `w x h` label map as an 8-bit palette PNG with the VOC palette (as VOC ships its
/// `SegmentationClass` masks).
pub fn encode_mask_png(w: u32, h: u32, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(voc_palette());
        let mut writer = enc.write_header().context("writing mask PNG header")?;
        writer
            .write_image_data(data)
            .context("writing mask PNG data")?;
        writer.finish().context("finishing mask PNG")?;
    }
    Ok(out)
}

/// Encode RGB pixels (HWC) as a baseline JPEG.
pub fn encode_jpeg(w: u32, h: u32, rgb: &[u8], quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(rgb, w, h, image::ExtendedColorType::Rgb8)
        .context("encoding JPEG")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        RgbImage::from_fn(16, 12, |x, y| image::Rgb([x as u8 * 10, y as u8 * 10, 90]))
            .save(&p)
            .unwrap();
        p
    }

    #[test]
    fn a_cut_off_jpeg_is_named_not_decoded_half_grey() {
        let tmp = tempfile::tempdir().unwrap();
        let p = jpeg(tmp.path(), "ok.jpg");
        assert_eq!(decode_rgb(&p).unwrap().dimensions(), (16, 12));
        let bytes = std::fs::read(&p).unwrap();
        let cut = tmp.path().join("cut.jpg");
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let msg = decode_rgb(&cut).unwrap_err().to_string();
        assert!(
            msg.contains("cut.jpg") && msg.contains("truncated"),
            "{msg}"
        );
        // Zero padding after the end marker is fine.
        let padded = tmp.path().join("padded.jpg");
        std::fs::write(&padded, [bytes.as_slice(), &[0, 0, 0]].concat()).unwrap();
        assert!(decode_rgb(&padded).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn linked_folders_and_files_count_and_a_dangling_link_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        let img = jpeg(&real, "a.jpg");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(root.join("plain")).unwrap();
        std::os::unix::fs::symlink(&real, root.join("linked")).unwrap();
        std::os::unix::fs::symlink(&img, root.join("b.jpg")).unwrap();
        let dirs = sorted_dirs(&root).unwrap();
        assert_eq!(dirs, [root.join("linked"), root.join("plain")]);
        assert_eq!(sorted_files(&root).unwrap(), [root.join("b.jpg")]);
        std::os::unix::fs::symlink(tmp.path().join("gone"), root.join("gone")).unwrap();
        let msg = sorted_dirs(&root).unwrap_err().to_string();
        assert!(
            msg.contains("gone") && msg.contains("symbolic link"),
            "{msg}"
        );
    }
}
