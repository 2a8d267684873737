//! The image side of every task's split: files decoded once, kept in memory as `u8`, and
//! turned into normalised `(B, 3, S, S)` batches with augmentation.
//!
//! Each image is cached twice at most: at the model input size `S × S` (aspect stretched,
//! triangle filter; evaluation and un-cropped training read this), and, when training crops
//! are on and the original is larger, at a size large enough that a crop is never upsampled
//! from a blurred copy ([`crop_source_side`]). Crops are given as fractions of the image, so
//! the same [`Augment`] maps image, mask and boxes alike.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use super::{aug_at, Augment};
use crate::data::imageio::{decode_rgb, resize_rgb};
use crate::data::{IMAGENET_MEAN, IMAGENET_STD};

/// An image cached at some size: `w × h × 3` HWC RGB bytes.
#[derive(Debug, Clone)]
pub struct Pixels {
    pub w: usize,
    pub h: usize,
    pub data: Vec<u8>,
}

/// One decoded image: `S × S` bytes, the crop-source copy if kept, the original size.
type Decoded = (Vec<u8>, Option<Pixels>, (u32, u32));

/// The decoded images of one split.
pub struct ImageSet {
    /// Square side of the model input.
    pub image_size: usize,
    /// Source file of each sample.
    pub files: Vec<PathBuf>,
    /// `(width, height)` of each original image in pixels.
    pub orig_sizes: Vec<(u32, u32)>,
    /// Each image at `S × S`.
    base: Vec<Vec<u8>>,
    /// Each image at the crop-source size, when that differs from `base` (crops on, original
    /// larger than `S`).
    large: Vec<Option<Pixels>>,
}

/// How large the crop source of an image is kept: its shorter side at most `2·S` (a crop of
/// the smallest default area, 0.35 at aspect 4/3, spans about half the shorter side, so it
/// is never upsampled), never larger than the original.
pub fn crop_source_side(image_size: usize) -> usize {
    2 * image_size
}

impl ImageSet {
    /// Decode `files` in parallel. `keep_large` keeps a crop-source copy of images larger than
    /// the model input (training splits with random crops).
    pub fn load(files: Vec<PathBuf>, image_size: usize, keep_large: bool) -> Result<Self> {
        let decoded: Vec<Decoded> = files
            .par_iter()
            .map(|p| load_one(p, image_size, keep_large))
            .collect::<Result<_>>()?;
        let mut set = Self {
            image_size,
            files,
            orig_sizes: Vec::with_capacity(decoded.len()),
            base: Vec::with_capacity(decoded.len()),
            large: Vec::with_capacity(decoded.len()),
        };
        for (base, large, size) in decoded {
            set.base.push(base);
            set.large.push(large);
            set.orig_sizes.push(size);
        }
        Ok(set)
    }

    /// A set of images already decoded (`onehead predict`), each brought to `S × S` exactly
    /// as [`ImageSet::load`] does it (no crop-source copies).
    pub fn from_decoded(files: Vec<PathBuf>, images: &[RgbImage], image_size: usize) -> Self {
        assert_eq!(files.len(), images.len(), "one file per image");
        Self {
            image_size,
            files,
            orig_sizes: images.iter().map(|im| im.dimensions()).collect(),
            base: images
                .par_iter()
                .map(|im| resize_rgb(im, image_size))
                .collect(),
            large: vec![None; images.len()],
        }
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// Width / height of the original image `i` (random crops are drawn in its pixels).
    pub fn aspect(&self, i: usize) -> f32 {
        let (w, h) = self.orig_sizes[i];
        w as f32 / h.max(1) as f32
    }

    /// The `S × S × 3` HWC bytes of sample `i` (for overlays and checks).
    pub fn pixels(&self, i: usize) -> &[u8] {
        &self.base[i]
    }

    /// `(B, 3, S, S)` normalised images of samples `indices`, sample k cropped and flipped as
    /// `augs[k]` says (`augs` empty: none). Deterministic: all randomness is in the `augs`.
    pub fn tensor(&self, indices: &[usize], augs: &[Augment], device: &Device) -> Result<Tensor> {
        let s = self.image_size;
        let plane = s * s;
        // Per-channel lookup table: u8 value -> normalised f32.
        let lut: Vec<[f32; 256]> = (0..3)
            .map(|c| {
                let mut t = [0f32; 256];
                for (v, e) in t.iter_mut().enumerate() {
                    *e = (v as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                }
                t
            })
            .collect();
        let mut data = vec![0f32; indices.len() * 3 * plane];
        data.par_chunks_mut(3 * plane)
            .enumerate()
            .try_for_each(|(k, out)| -> Result<()> {
                let i = indices[k];
                let aug = aug_at(augs, k);
                if let Some(crop) = aug.crop {
                    let src = match &self.large[i] {
                        Some(p) => (p.data.as_slice(), p.w, p.h),
                        None => (self.base[i].as_slice(), s, s),
                    };
                    let rect = crop_rect(crop, src.1, src.2)?;
                    // Same arithmetic as the table, so integer values give identical floats.
                    let norm = |c: usize, v: f32| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                    resize_crop_rgb(src, rect, s, aug.flip, out, norm);
                    return Ok(());
                }
                let px = &self.base[i];
                for y in 0..s {
                    for x in 0..s {
                        let sx = if aug.flip { s - 1 - x } else { x };
                        let p = (y * s + sx) * 3;
                        for c in 0..3 {
                            out[c * plane + y * s + x] = lut[c][px[p + c] as usize];
                        }
                    }
                }
                Ok(())
            })?;
        Ok(Tensor::from_vec(data, (indices.len(), 3, s, s), device)?)
    }
}

fn load_one(path: &Path, image_size: usize, keep_large: bool) -> Result<Decoded> {
    let img = decode_rgb(path)?;
    let (w, h) = img.dimensions();
    let base = resize_rgb(&img, image_size);
    let large = (keep_large && (w as usize > image_size || h as usize > image_size))
        .then(|| shrink_to_crop_source(&img, crop_source_side(image_size)));
    Ok((base, large, (w, h)))
}

/// The image with its shorter side brought down to `side` (aspect kept), or as it is if it
/// is already that small.
fn shrink_to_crop_source(img: &RgbImage, side: usize) -> Pixels {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let short = w.min(h);
    if short <= side {
        return Pixels {
            w,
            h,
            data: img.as_raw().clone(),
        };
    }
    let f = side as f64 / short as f64;
    let (nw, nh) = (
        ((w as f64 * f).round() as u32).max(1),
        ((h as f64 * f).round() as u32).max(1),
    );
    let data =
        image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle).into_raw();
    Pixels {
        w: nw as usize,
        h: nh as usize,
        data,
    }
}

/// A crop given as fractions `[x0, y0, x1, y1]` of an image, in pixels of a `w × h` copy of
/// it: `(x0, y0, width, height)`, validated.
pub fn crop_rect(crop: [f32; 4], w: usize, h: usize) -> Result<(f32, f32, f32, f32)> {
    let [x0, y0, x1, y1] = crop;
    anyhow::ensure!(
        crop.iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
            && x1 > x0
            && y1 > y0,
        "augment: crop {crop:?} is not a rectangle inside [0, 1]"
    );
    let (w, h) = (w as f32, h as f32);
    Ok((x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h))
}

/// Bilinear resize of the crop `(cx, cy, cw, ch)` (pixels) of a `w × h` HWC RGB image to
/// `s × s`, written as normalised planar CHW into `out` through `norm(channel, value)`.
/// Sample centres follow the half-pixel convention (`align_corners = false`) and are clamped
/// to the crop's edge pixels (as if the crop were cut out first), so pixels outside the crop
/// never leak in and the whole image maps to itself exactly. `flip` mirrors the output.
pub(crate) fn resize_crop_rgb(
    (px, w, h): (&[u8], usize, usize),
    (cx, cy, cw, ch): (f32, f32, f32, f32),
    s: usize,
    flip: bool,
    out: &mut [f32],
    norm: impl Fn(usize, f32) -> f32,
) {
    let plane = s * s;
    let (fx, fy) = (cw / s as f32, ch / s as f32);
    // Source coordinate of output pixel `i` along one axis, inside the crop's edge pixels.
    let src = |c: f32, f: f32, len: f32, last: f32, i: usize| {
        let hi = (c + len - 1.0).min(last);
        let lo = c.min(hi);
        (c + (i as f32 + 0.5) * f - 0.5).clamp(lo, hi)
    };
    // Horizontal taps are the same for every row.
    let xs: Vec<(usize, usize, f32)> = (0..s)
        .map(|x| {
            let sx = src(cx, fx, cw, (w - 1) as f32, x);
            let x0 = sx.floor() as usize;
            (x0, (x0 + 1).min(w - 1), sx - x0 as f32)
        })
        .collect();
    for y in 0..s {
        let sy = src(cy, fy, ch, (h - 1) as f32, y);
        let y0 = sy.floor() as usize;
        let y1 = (y0 + 1).min(h - 1);
        let wy = sy - y0 as f32;
        let (r0, r1) = (&px[y0 * w * 3..], &px[y1 * w * 3..]);
        for (x, &(x0, x1, wx)) in xs.iter().enumerate() {
            let ox = if flip { s - 1 - x } else { x };
            for c in 0..3 {
                let top = (1.0 - wx) * r0[x0 * 3 + c] as f32 + wx * r0[x1 * 3 + c] as f32;
                let bot = (1.0 - wx) * r1[x0 * 3 + c] as f32 + wx * r1[x1 * 3 + c] as f32;
                out[c * plane + y * s + ox] = norm(c, (1.0 - wy) * top + wy * bot);
            }
        }
    }
}

/// Nearest-neighbour resize of the crop `(cx, cy, cw, ch)` of a `w × h` label mask to
/// `s × s` (values, including the ignore value, are copied, never mixed); `flip` mirrors
/// the output.
pub(crate) fn resize_crop_mask(
    (mask, w, h): (&[u8], usize, usize),
    (cx, cy, cw, ch): (f32, f32, f32, f32),
    s: usize,
    flip: bool,
) -> Vec<u8> {
    let (fx, fy) = (cw / s as f32, ch / s as f32);
    let near =
        |c: f32, f: f32, last: usize, i: usize| ((c + (i as f32 + 0.5) * f) as usize).min(last);
    let xs: Vec<usize> = (0..s).map(|x| near(cx, fx, w - 1, x)).collect();
    let mut out = vec![0u8; s * s];
    for (y, row) in out.chunks_mut(s).enumerate() {
        let src = &mask[near(cy, fy, h - 1, y) * w..][..w];
        for (x, o) in row.iter_mut().enumerate() {
            let ox = if flip { s - 1 - x } else { x };
            *o = src[xs[ox]];
        }
    }
    out
}

/// Mirror a `w`-wide row-major mask left-right.
pub fn flip_mask(mask: &[u8], w: usize) -> Vec<u8> {
    let mut out = mask.to_vec();
    for row in out.chunks_mut(w) {
        row.reverse();
    }
    out
}
