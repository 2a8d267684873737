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

    /// Draw one sample's augmentation from `rng`, for an image of aspect ratio `image_aspect`
    /// (width / height of the original).
    ///
    /// Randomness consumed, in order (so that streams are reproducible and documented):
    /// 1. only if [`crops`](Self::crops): up to [`CROP_TRIES`] tries of four `f32` draws each
    ///    (area fraction uniform in `scale`, log aspect uniform in `ln ratio`, then the
    ///    rectangle's left and top position uniform over where it fits), as torchvision's
    ///    `RandomResizedCrop` (area and aspect in pixels of the original); the first try that
    ///    fits in the image is used; if none fits, torchvision's fallback: the largest
    ///    centred crop whose aspect lies within `ratio` (`crop: None` when that is the whole
    ///    image). Position draws happen in every try, fitting or not.
    /// 2. only if `flip`: one `random_bool(0.5)`.
    ///
    /// With `scale = (1, 1)` this is exactly the stream the training loop used before crops
    /// existed (`flip && rng.random_bool(0.5)` per sample).
    pub fn draw(&self, rng: &mut impl Rng, image_aspect: f32) -> Augment {
        let crop = if self.crops() {
            self.draw_crop(rng, image_aspect)
        } else {
            None
        };
        let flip = self.flip && rng.random_bool(0.5);
        Augment { flip, crop }
    }

    fn draw_crop(&self, rng: &mut impl Rng, a: f32) -> Option<[f32; 4]> {
        let (s0, s1) = self.scale;
        let (l0, l1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..CROP_TRIES {
            let area = s0 + (s1 - s0) * rng.random::<f32>();
            let aspect = (l0 + (l1 - l0) * rng.random::<f32>()).exp();
            let (u, v) = (rng.random::<f32>(), rng.random::<f32>());
            // Fractions of the image's width and height: in pixels w·h = area·W·H and
            // w / h = aspect, so with a = W / H, w/W = √(area·aspect/a), h/H = √(area·a/aspect).
            let w = (area * aspect / a).sqrt();
            let h = (area * a / aspect).sqrt();
            if w > 0.0 && h > 0.0 && w <= 1.0 && h <= 1.0 {
                let x0 = u * (1.0 - w);
                let y0 = v * (1.0 - h);
                return Some([x0, y0, (x0 + w).min(1.0), (y0 + h).min(1.0)]);
            }
        }
        // torchvision's fallback: a centre crop, clamped to the aspect range.
        let (w, h) = if a < self.ratio.0 {
            (1.0, a / self.ratio.0)
        } else if a > self.ratio.1 {
            (self.ratio.1 / a, 1.0)
        } else {
            return None;
        };
        let (x0, y0) = ((1.0 - w) / 2.0, (1.0 - h) / 2.0);
        Some([x0, y0, x0 + w, y0 + h])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crops_follow_the_image_aspect_and_fall_back_to_a_centre_crop() {
        let cfg = AugmentConfig::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        // A 2:1 image: the crop's aspect in pixels (w·W / h·H) stays within 3/4..4/3.
        for _ in 0..200 {
            if let Some([x0, y0, x1, y1]) = cfg.draw(&mut rng, 2.0).crop {
                let px_aspect = (x1 - x0) * 2.0 / (y1 - y0);
                assert!((0.749..=1.334).contains(&px_aspect), "{px_aspect}");
            }
        }
        // Nothing fits (area 1 of a 3:1 image at aspect ≤ 4/3): the centre crop, full height,
        // 4/3 of the height wide.
        let tight = AugmentConfig {
            scale: (1.0, 1.0 - 1e-7),
            ..AugmentConfig::default()
        };
        let c = tight.draw(&mut rng, 3.0).crop.unwrap();
        let want = [(1.0 - 4.0 / 9.0) / 2.0, 0.0, (1.0 + 4.0 / 9.0) / 2.0, 1.0];
        for (g, w) in c.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{c:?}");
        }
        // An image whose own aspect is within the range keeps the whole image (no crop).
        let square = AugmentConfig {
            scale: (1.0, 1.0 - 1e-7),
            ratio: (2.0, 3.0),
            ..AugmentConfig::default()
        };
        assert_eq!(square.draw(&mut rng, 2.5).crop, None);
    }
}
