//! Training-time augmentation: random resized crops (scale jitter) and horizontal flips.
//!
//! The data layer itself holds no randomness: [`AugmentConfig::draw`] turns draws from the
//! caller's seeded RNG into a plain [`Augment`] per sample, and
//! [`TaskDataset::batch_augmented`](crate::data::TaskDataset::batch_augmented) applies it
//! deterministically. Runs therefore stay reproducible and resumable from the RNG state.
//!
//! Geometry: a crop is a rectangle of the cached `S x S` image given as fractions
//! `[x0, y0, x1, y1]` of its side; it is resized back to `S x S` (images bilinear, masks
//! nearest-neighbour, boxes shifted and scaled), then the flip, if any, mirrors the result.

use rand::Rng;

use super::DetBox;

/// What to do to one training sample. `Augment::default()` leaves it unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Augment {
    /// Mirror left-right (after cropping).
    pub flip: bool,
    /// `[x0, y0, x1, y1]` as fractions `0..=1` of the cached `S x S` image; `None` = whole image.
    pub crop: Option<[f32; 4]>,
}

impl Augment {
    /// No crop, flip or not (the behaviour of [`TaskDataset::batch`](crate::data::TaskDataset::batch)).
    pub fn flip_only(flip: bool) -> Self {
        Self { flip, crop: None }
    }
}

/// How [`Augment`]s are drawn: torchvision's `RandomResizedCrop(scale, ratio)` followed by
/// `RandomHorizontalFlip(0.5)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentConfig {
    /// Draw horizontal flips with probability 1/2.
    pub flip: bool,
    /// Range of the crop's area as a fraction of the image area; `(1.0, 1.0)` = never crop.
    pub scale: (f32, f32),
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    pub ratio: (f32, f32),
}

impl Default for AugmentConfig {
    /// The setting recommended for this project's small from-scratch model:
    /// scale `(0.35, 1.0)`, ratio `(3/4, 4/3)`, flips on. (Experiments keep crops off unless
    /// `data.crop_scale` asks for them, so older configs reproduce.)
    fn default() -> Self {
        Self {
            flip: true,
            scale: (0.35, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

/// How many crop rectangles [`AugmentConfig::draw`] tries before using the whole image.
pub const CROP_TRIES: usize = 10;

impl AugmentConfig {
    /// No crops, no flips: `draw` consumes no randomness and returns `Augment::default()`.
    pub fn none() -> Self {
        Self {
            flip: false,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
        }
    }

    /// Whether `draw` samples crops at all (`scale != (1, 1)`).
    pub fn crops(&self) -> bool {
        self.scale != (1.0, 1.0)
    }

    /// Draw one sample's augmentation from `rng`.
    ///
    /// Randomness consumed, in order (so that streams are reproducible and documented):
    /// 1. only if [`crops`](Self::crops): up to [`CROP_TRIES`] tries of four `f32` draws each
    ///    (area fraction uniform in `scale`, log aspect uniform in `ln ratio`, then the
    ///    rectangle's left and top position uniform over where it fits); the first try whose
    ///    width and height fit in the image is used; if none fits, the whole image
    ///    (`crop: None`). Position draws happen in every try, fitting or not.
    /// 2. only if `flip`: one `random_bool(0.5)`.
    ///
    /// With `scale = (1, 1)` this is exactly the stream the training loop used before crops
    /// existed (`flip && rng.random_bool(0.5)` per sample).
    pub fn draw(&self, rng: &mut impl Rng) -> Augment {
        let crop = if self.crops() {
            self.draw_crop(rng)
        } else {
            None
        };
        let flip = self.flip && rng.random_bool(0.5);
        Augment { flip, crop }
    }

    fn draw_crop(&self, rng: &mut impl Rng) -> Option<[f32; 4]> {
        let (s0, s1) = self.scale;
        let (l0, l1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..CROP_TRIES {
            let area = s0 + (s1 - s0) * rng.random::<f32>();
            let aspect = (l0 + (l1 - l0) * rng.random::<f32>()).exp();
            let (u, v) = (rng.random::<f32>(), rng.random::<f32>());
            // The image is square, so fractions of its side: w * h = area, w / h = aspect.
            let w = (area * aspect).sqrt();
            let h = (area / aspect).sqrt();
            if w > 0.0 && h > 0.0 && w <= 1.0 && h <= 1.0 {
                let x0 = u * (1.0 - w);
                let y0 = v * (1.0 - h);
                return Some([x0, y0, (x0 + w).min(1.0), (y0 + h).min(1.0)]);
            }
        }
        None
    }
}

/// A crop in pixels of the `s x s` image: `(x0, y0, width, height)`, validated.
pub(crate) fn crop_pixels(crop: [f32; 4], s: usize) -> anyhow::Result<(f32, f32, f32, f32)> {
    let [x0, y0, x1, y1] = crop;
    anyhow::ensure!(
        crop.iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
            && x1 > x0
            && y1 > y0,
        "augment: crop {crop:?} is not a rectangle inside [0, 1]"
    );
    let s = s as f32;
    Ok((x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s))
}

/// Bilinear resize of the crop `(cx, cy, cw, ch)` (pixels) of an `s x s` HWC RGB image back
/// to `s x s`, written as normalised planar CHW into `out` through `norm(channel, value)`.
/// Sample centres follow the half-pixel convention (`align_corners = false`) and are clamped
/// to the crop's edge pixels (as if the crop were cut out first), so pixels outside the crop
/// never leak in and the whole image maps to itself exactly. `flip` mirrors the output.
pub(crate) fn resize_crop_rgb(
    px: &[u8],
    s: usize,
    (cx, cy, cw, ch): (f32, f32, f32, f32),
    flip: bool,
    out: &mut [f32],
    norm: impl Fn(usize, f32) -> f32,
) {
    let plane = s * s;
    let (fx, fy) = (cw / s as f32, ch / s as f32);
    // Source coordinate of output pixel `i` along one axis, inside the crop's edge pixels.
    let last = (s - 1) as f32;
    let src = |c: f32, f: f32, len: f32, i: usize| {
        let hi = (c + len - 1.0).min(last);
        let lo = c.min(hi);
        (c + (i as f32 + 0.5) * f - 0.5).clamp(lo, hi)
    };
    // Horizontal taps are the same for every row.
    let xs: Vec<(usize, usize, f32)> = (0..s)
        .map(|x| {
            let sx = src(cx, fx, cw, x);
            let x0 = sx.floor() as usize;
            (x0, (x0 + 1).min(s - 1), sx - x0 as f32)
        })
        .collect();
    for y in 0..s {
        let sy = src(cy, fy, ch, y);
        let y0 = sy.floor() as usize;
        let y1 = (y0 + 1).min(s - 1);
        let wy = sy - y0 as f32;
        let (r0, r1) = (&px[y0 * s * 3..], &px[y1 * s * 3..]);
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

/// Nearest-neighbour resize of the crop of an `s x s` mask back to `s x s` (values, including
/// the ignore value, are copied, never mixed); `flip` mirrors the output.
pub(crate) fn resize_crop_mask(
    mask: &[u8],
    s: usize,
    (cx, cy, cw, ch): (f32, f32, f32, f32),
    flip: bool,
) -> Vec<u8> {
    let (fx, fy) = (cw / s as f32, ch / s as f32);
    let near = |c: f32, f: f32, i: usize| ((c + (i as f32 + 0.5) * f) as usize).min(s - 1);
    let xs: Vec<usize> = (0..s).map(|x| near(cx, fx, x)).collect();
    let mut out = vec![0u8; s * s];
    for (y, row) in out.chunks_mut(s).enumerate() {
        let src = &mask[near(cy, fy, y) * s..][..s];
        for (x, o) in row.iter_mut().enumerate() {
            let ox = if flip { s - 1 - x } else { x };
            *o = src[xs[ox]];
        }
    }
    out
}

/// A box must keep at least this fraction of its area inside the crop.
pub const MIN_VISIBLE_AREA: f32 = 0.25;
/// A box clipped by the crop must keep sides of at least this many output pixels.
pub const MIN_CLIPPED_SIDE: f32 = 2.0;

/// Map boxes of an `s x s` image into the crop `(cx, cy, cw, ch)` resized back to `s x s`:
/// shift and scale, clip to the crop, and drop boxes that keep less than
/// [`MIN_VISIBLE_AREA`] of their area or that the crop clipped to a side under
/// [`MIN_CLIPPED_SIDE`] output pixels (boxes wholly inside the crop are kept: they only grow).
/// Boxes are not flipped here.
pub(crate) fn crop_boxes(boxes: &[DetBox], s: usize, crop: (f32, f32, f32, f32)) -> Vec<DetBox> {
    let (cx, cy, cw, ch) = crop;
    let (kx, ky) = (s as f32 / cw, s as f32 / ch);
    boxes
        .iter()
        .filter_map(|b| {
            let [x0, y0, x1, y1] = b.bbox;
            let (vx0, vy0) = (x0.max(cx), y0.max(cy));
            let (vx1, vy1) = (x1.min(cx + cw), y1.min(cy + ch));
            if vx1 <= vx0 || vy1 <= vy0 {
                return None;
            }
            let area = (x1 - x0) * (y1 - y0);
            let visible = (vx1 - vx0) * (vy1 - vy0);
            if visible < MIN_VISIBLE_AREA * area {
                return None;
            }
            let nb = [
                (vx0 - cx) * kx,
                (vy0 - cy) * ky,
                (vx1 - cx) * kx,
                (vy1 - cy) * ky,
            ];
            let clipped = visible < area;
            if clipped && (nb[2] - nb[0] < MIN_CLIPPED_SIDE || nb[3] - nb[1] < MIN_CLIPPED_SIDE) {
                return None;
            }
            Some(DetBox { bbox: nb, ..*b })
        })
        .collect()
}
