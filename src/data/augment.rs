//! Training-time augmentation: random resized crops (scale jitter) and horizontal flips.
//!
//! The data layer itself holds no randomness: [`AugmentConfig::draw`] turns draws from the
//! caller's seeded RNG into a plain [`Augment`] per sample, and each task's `batch` applies
//! it deterministically (see [`crate::tasks::images`]). Runs therefore stay reproducible and
//! resumable from the RNG state.
//!
//! Geometry: a crop is a rectangle of the image given as fractions `[x0, y0, x1, y1]` of its
//! width and height; it is resized to the `S x S` model input (images bilinear, masks
//! nearest-neighbour, boxes shifted and scaled), then the flip, if any, mirrors the result.

use rand::Rng;

/// What to do to one training sample. `Augment::default()` leaves it unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Augment {
    /// Mirror left-right (after cropping).
    pub flip: bool,
    /// `[x0, y0, x1, y1]` as fractions `0..=1` of the image's width and height; `None` = whole image.
    pub crop: Option<[f32; 4]>,
}

impl Augment {
    /// No crop, flip or not.
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
