//! The built-in synthetic benchmark: three small datasets written in exactly the formats of
//! the real course sets (VOC palette masks, COCO JSON, Imagenette class folders), drawn
//! procedurally from ONE visual vocabulary so that the tasks interfere the way real ones do.
//!
//! Vocabulary: each of the 20 VOC foreground classes is an *object type* = a shape family
//! (10 shapes, each shared by a pair of classes) + a surface texture + a base hue. Pairs that
//! share a shape differ only by texture (and often have near hues); several classes of
//! different shapes share a texture. Instances get colour jitter, random scale (log-uniform),
//! rotation, aspect, shading; scenes get gradient/noise backgrounds (sometimes textured with
//! the same texture vocabulary), background clutter, thin occluders, lighting gradients, colour
//! casts, pixel noise and JPEG compression. Detection uses the 10 object types of
//! [`super::COCO_CATEGORIES`] (other types appear unannotated, as in COCO); a classification
//! image is a scene dominated by one object type (mapped to an Imagenette class folder) with
//! smaller distractors, sometimes of the look-alike type.
//!
//! Determinism: every image has its own ChaCha RNG seeded from (seed, task, split, index), so
//! the rayon-parallel generation writes byte-identical files for a given seed.

use std::f32::consts::PI;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::coco::{chosen_categories, CocoAnnotation, CocoFile, CocoImage};
use super::imageio::{encode_jpeg, encode_mask_png, MARKER};
use super::{
    DataError, Split, CLS_DIR, COCO_CATEGORIES, DET_DIR, IGNORE_INDEX, IMAGENETTE_CLASSES, SEG_DIR,
};

/// Options of [`generate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Master seed; same seed → byte-identical files.
    pub seed: u64,
    /// Training images per task (≥ 10: classification needs one image per class).
    pub train: usize,
    /// Validation images per task (≥ 10).
    pub val: usize,
    /// Held-out test images per task (0 = no test split, else ≥ 10). Drawn from their own
    /// random streams: the train and val images do not depend on this count.
    pub test: usize,
    /// Longer side of detection/segmentation images and shorter side of classification images,
    /// in pixels (Imagenette-160 style). At least 32.
    pub size: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            train: 240,
            val: 60,
            test: 300,
            size: 160,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// The data root (`--out`).
    pub root: PathBuf,
    /// Image+mask pairs per split `[train, val, test]`.
    pub seg_images: [usize; 3],
    /// Detection images per split.
    pub det_images: [usize; 3],
    /// Detection annotations per split.
    pub det_annotations: [usize; 3],
    /// Classification images per split.
    pub cls_images: [usize; 3],
}

/// Generate the synthetic benchmark under `out` (see the module docs and [`super`] for the
/// layout). Dataset folders already present are replaced only if onehead wrote them
/// (they carry a `.onehead` marker); otherwise this fails with [`DataError::WouldOverwrite`].
pub fn generate(out: &Path, opts: &SynthOptions) -> Result<SynthSummary> {
    anyhow::ensure!(
        opts.size >= 32,
        "synth: --size must be at least 32 (got {})",
        opts.size
    );
    anyhow::ensure!(
        opts.train >= 10 && opts.val >= 10,
        "synth: --train and --val must each be at least 10 (one image per class), got {} and {}",
        opts.train,
        opts.val
    );
    anyhow::ensure!(
        opts.test == 0 || opts.test >= 10,
        "synth: --test must be 0 (no test split) or at least 10 (one image per class), got {}",
        opts.test
    );
    let seg_root = fresh_dataset_dir(&out.join(SEG_DIR), "synth")?;
    let det_root = fresh_dataset_dir(&out.join(DET_DIR), "synth")?;
    let cls_root = fresh_dataset_dir(&out.join(CLS_DIR), "synth")?;
    std::fs::create_dir_all(det_root.join("annotations"))?;
    let mut summary = SynthSummary {
        root: out.to_path_buf(),
        seg_images: [0; 3],
        det_images: [0; 3],
        det_annotations: [0; 3],
        cls_images: [0; 3],
    };
    let splits = [
        (Split::Train, opts.train),
        (Split::Val, opts.val),
        (Split::Test, opts.test),
    ];
    // No folder at all for an absent test split: the loaders take a missing folder to mean
    // "this dataset has no test split", as for the real course sets.
    for (si, (split, n)) in splits.into_iter().enumerate().filter(|(_, (_, n))| *n > 0) {
        write_seg_split(&seg_root, split, n, opts)?;
        summary.seg_images[si] = n;
        summary.det_annotations[si] = write_det_split(&det_root, split, n, opts)?;
        summary.det_images[si] = n;
        write_cls_split(&cls_root, split, n, opts)?;
        summary.cls_images[si] = n;
    }
    Ok(summary)
}

/// The segmentation images and masks of one split.
fn write_seg_split(seg_root: &Path, split: Split, n: usize, opts: &SynthOptions) -> Result<()> {
    let dir = seg_root.join(split.name());
    std::fs::create_dir_all(&dir)?;
    (0..n).into_par_iter().try_for_each(|i| -> Result<()> {
        let mut rng = image_rng(opts.seed, Stream::Seg, split, i);
        let (img, mask) = render_seg(&mut rng, opts.size);
        let stem = format!("synth_{}_{i:06}", split.name());
        write(&dir.join(format!("{stem}.jpg")), &img.jpeg(&mut rng)?)?;
        write(
            &dir.join(format!("{stem}.png")),
            &encode_mask_png(img.w as u32, img.h as u32, &mask)?,
        )
    })?;
    Ok(())
}

/// The detection images and the COCO JSON of one split; the number of boxes.
fn write_det_split(det_root: &Path, split: Split, n: usize, opts: &SynthOptions) -> Result<usize> {
    let dir = det_root.join(split.name());
    std::fs::create_dir_all(&dir)?;
    let per_image: Vec<(CocoImage, Vec<CocoAnnotation>)> = (0..n)
        .into_par_iter()
        .map(|i| -> Result<_> {
            let mut rng = image_rng(opts.seed, Stream::Det, split, i);
            let (img, anns) = render_det(&mut rng, opts.size);
            let file_name = format!("synth_{}_{i:06}.jpg", split.name());
            write(&dir.join(&file_name), &img.jpeg(&mut rng)?)?;
            let id = i as u64 + 1; // COCO ids start at 1
            let info = CocoImage {
                id,
                file_name,
                width: img.w as u32,
                height: img.h as u32,
            };
            let anns = anns
                .into_iter()
                .map(|(category_id, bbox, area)| CocoAnnotation {
                    id: 0,
                    image_id: id,
                    category_id,
                    bbox,
                    area,
                    iscrowd: 0,
                })
                .collect();
            Ok((info, anns))
        })
        .collect::<Result<_>>()?;
    let mut coco = CocoFile {
        images: Vec::new(),
        annotations: Vec::new(),
        categories: chosen_categories(),
    };
    for (info, anns) in per_image {
        coco.images.push(info);
        coco.annotations.extend(anns);
    }
    for (k, a) in coco.annotations.iter_mut().enumerate() {
        a.id = k as u64 + 1;
    }
    coco.write(
        &det_root
            .join("annotations")
            .join(format!("instances_{}.json", split.name())),
    )?;
    Ok(coco.annotations.len())
}

/// The classification images of one split: balanced, class = index mod 10.
fn write_cls_split(cls_root: &Path, split: Split, n: usize, opts: &SynthOptions) -> Result<()> {
    let dir = cls_root.join(split.name());
    for (wnid, _) in IMAGENETTE_CLASSES {
        std::fs::create_dir_all(dir.join(wnid))?;
    }
    (0..n).into_par_iter().try_for_each(|i| -> Result<()> {
        let mut rng = image_rng(opts.seed, Stream::Cls, split, i);
        let class = i % IMAGENETTE_CLASSES.len();
        let img = render_cls(&mut rng, opts.size, CLS_DOMINANT[class]);
        let path = dir
            .join(IMAGENETTE_CLASSES[class].0)
            .join(format!("synth_{}_{i:06}.JPEG", split.name()));
        write(&path, &img.jpeg(&mut rng)?)
    })?;
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Make `dir` an empty dataset folder owned by onehead: delete it first if it carries the
/// marker, refuse if it holds anything else. Returns `dir`.
pub(crate) fn fresh_dataset_dir(dir: &Path, writer: &str) -> Result<PathBuf> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .next()
            .is_none();
        if dir.join(MARKER).is_file() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        } else if !empty {
            return Err(DataError::WouldOverwrite {
                path: dir.to_path_buf(),
            }
            .into());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write(
        &dir.join(MARKER),
        format!("written by onehead {writer}\n").as_bytes(),
    )?;
    Ok(dir.to_path_buf())
}

/// The three independent random streams of the generator (one per dataset).
#[derive(Clone, Copy)]
enum Stream {
    Seg,
    Det,
    Cls,
}

/// Per-image RNG from (seed, dataset, split, index): independent streams so that rayon's
/// scheduling cannot change any image, and so that adding the test split (key 3) leaves
/// every train and val image as it was.
fn image_rng(seed: u64, task: Stream, split: Split, index: usize) -> ChaCha8Rng {
    let t = match task {
        Stream::Seg => 1u64,
        Stream::Det => 2,
        Stream::Cls => 3,
    };
    let s = match split {
        Split::Train => 1u64,
        Split::Val => 2,
        Split::Test => 3,
    };
    let mut k = splitmix(seed);
    k = splitmix(k ^ t);
    k = splitmix(k ^ s);
    k = splitmix(k ^ index as u64);
    ChaCha8Rng::seed_from_u64(k)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------------------------
// The visual vocabulary.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Disk,
    Square,
    Triangle,
    Hexagon,
    Star,
    Cross,
    Ring,
    Crescent,
    Ellipse,
    Heart,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Texture {
    Solid,
    /// Stripes at an angle in degrees.
    Stripes(f32),
    Checker,
    Dots,
    Waves,
    Concentric,
    Grid,
}

const TEXTURES: [Texture; 9] = [
    Texture::Solid,
    Texture::Stripes(0.0),
    Texture::Stripes(45.0),
    Texture::Stripes(90.0),
    Texture::Checker,
    Texture::Dots,
    Texture::Waves,
    Texture::Concentric,
    Texture::Grid,
];

/// `STYLES[c - 1]` = (shape, texture, base hue in degrees) of VOC class `c` (1..=20).
/// Classes 2k+1 and 2k+2 share a shape (the hard pairs).
const STYLES: [(Shape, Texture, f32); 20] = [
    (Shape::Disk, Texture::Stripes(0.0), 210.0), // 1 aeroplane
    (Shape::Disk, Texture::Dots, 30.0),          // 2 bicycle
    (Shape::Square, Texture::Checker, 55.0),     // 3 bird
    (Shape::Square, Texture::Stripes(45.0), 190.0), // 4 boat
    (Shape::Triangle, Texture::Solid, 120.0),    // 5 bottle
    (Shape::Triangle, Texture::Stripes(0.0), 95.0), // 6 bus
    (Shape::Hexagon, Texture::Dots, 0.0),        // 7 car
    (Shape::Hexagon, Texture::Checker, 20.0),    // 8 cat
    (Shape::Star, Texture::Solid, 280.0),        // 9 chair
    (Shape::Star, Texture::Grid, 40.0),          // 10 cow
    (Shape::Cross, Texture::Waves, 160.0),       // 11 diningtable
    (Shape::Cross, Texture::Concentric, 175.0),  // 12 dog
    (Shape::Ring, Texture::Solid, 330.0),        // 13 horse
    (Shape::Ring, Texture::Stripes(90.0), 240.0), // 14 motorbike
    (Shape::Crescent, Texture::Stripes(45.0), 15.0), // 15 person
    (Shape::Crescent, Texture::Dots, 130.0),     // 16 pottedplant
    (Shape::Ellipse, Texture::Checker, 250.0),   // 17 sheep
    (Shape::Ellipse, Texture::Waves, 300.0),     // 18 sofa
    (Shape::Heart, Texture::Grid, 350.0),        // 19 train
    (Shape::Heart, Texture::Stripes(90.0), 200.0), // 20 tvmonitor
];

/// The VOC object type dominating each Imagenette class's scenes (index = class folder order).
/// Includes two look-alike pairs (19/20 hearts, 11/12 crosses) and types that detection uses.
const CLS_DOMINANT: [usize; 10] = [4, 12, 20, 14, 19, 10, 6, 11, 1, 17];

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

/// Inside test in the object's normalised frame (unit radius).
fn inside(shape: Shape, u: f32, v: f32) -> bool {
    let rho = (u * u + v * v).sqrt();
    match shape {
        Shape::Disk => rho <= 1.0,
        Shape::Square => u.abs().max(v.abs()) <= 0.8,
        Shape::Triangle => (-0.95..=0.65).contains(&v) && u.abs() <= (v + 0.95) * 0.6,
        Shape::Hexagon => polygon_radius(6, u, v) * 0.95 >= rho,
        Shape::Star => {
            let a = v.atan2(u) + PI / 2.0;
            let sector = 2.0 * PI / 5.0;
            let t = (a.rem_euclid(sector) / sector - 0.5).abs() * 2.0; // 1 at tips, 0 between
            rho <= 0.42 + 0.58 * t
        }
        Shape::Cross => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
        Shape::Ring => (0.5..=1.0).contains(&rho),
        Shape::Crescent => rho <= 1.0 && (u - 0.5).powi(2) + (v + 0.15).powi(2) > 0.72 * 0.72,
        Shape::Ellipse => u * u + (v / 0.5).powi(2) <= 1.0,
        Shape::Heart => {
            let x = u * 1.15;
            let y = -v * 1.15 + 0.25;
            let q = x * x + y * y - 1.0;
            q * q * q - x * x * y * y * y <= 0.0
        }
    }
}

/// Radius of a regular n-gon (circumradius 1) in the direction of (u, v).
fn polygon_radius(n: u32, u: f32, v: f32) -> f32 {
    let sector = 2.0 * PI / n as f32;
    let a = v.atan2(u).rem_euclid(sector) - sector / 2.0;
    (PI / n as f32).cos() / a.cos()
}

/// Texture mix weight in [0, 1] at normalised coords, period `p`.
fn texture(tex: Texture, u: f32, v: f32, p: f32, phase: f32) -> f32 {
    let soft = |s: f32| (0.5 + 1.5 * s).clamp(0.0, 1.0);
    let tau = 2.0 * PI;
    match tex {
        Texture::Solid => 0.5 - 0.5 * (u * 0.8 + v * 0.6).clamp(-1.0, 1.0) * 0.6,
        Texture::Stripes(deg) => {
            let a = deg.to_radians();
            soft((tau * (u * a.sin() + v * a.cos()) / p + phase).sin())
        }
        Texture::Checker => soft((tau * u / p + phase).sin() * (tau * v / p + phase).sin() * 2.0),
        Texture::Dots => {
            let fu = (u / p + phase).rem_euclid(1.0) - 0.5;
            let fv = (v / p).rem_euclid(1.0) - 0.5;
            if fu * fu + fv * fv < 0.09 {
                1.0
            } else {
                0.0
            }
        }
        Texture::Waves => {
            soft((tau * (v + 0.25 * p * (tau * u / (1.5 * p)).sin()) / p + phase).sin())
        }
        Texture::Concentric => soft((tau * (u * u + v * v).sqrt() / p + phase).sin()),
        Texture::Grid => {
            let fu = (u / p + phase).rem_euclid(1.0);
            let fv = (v / p).rem_euclid(1.0);
            if fu < 0.22 || fv < 0.22 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// A drawn image: `w x h` RGB in [0, 1] plus a label map (VOC class ids) and an instance map.
struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<[f32; 3]>,
    label: Vec<u8>,
    inst: Vec<u16>,
}

/// One object instance.
struct Obj {
    class: usize,
    cx: f32,
    cy: f32,
    r: f32,
    cos: f32,
    sin: f32,
    ax: f32,
    ay: f32,
    col1: [f32; 3],
    col2: [f32; 3],
    period: f32,
    phase: f32,
}

impl Obj {
    fn random(rng: &mut ChaCha8Rng, class: usize, cx: f32, cy: f32, r: f32) -> Obj {
        let (_, _, hue) = STYLES[class - 1];
        let hue = hue + rng.random_range(-25.0..25.0);
        let s = rng.random_range(0.45..0.95);
        let v = rng.random_range(0.45..1.0);
        let col1 = hsv(hue, s, v);
        let col2 = hsv(
            hue + rng.random_range(20.0..60.0),
            s * rng.random_range(0.6..1.0),
            v * rng.random_range(0.25..0.55),
        );
        let rot: f32 = rng.random_range(-0.45..0.45);
        let asp: f32 = rng.random_range(0.85..1.18);
        Obj {
            class,
            cx,
            cy,
            r,
            cos: rot.cos(),
            sin: rot.sin(),
            ax: asp,
            ay: 1.0 / asp,
            col1,
            col2,
            period: rng.random_range(0.28..0.45),
            phase: rng.random_range(0.0..2.0 * PI),
        }
    }

    /// Axis-aligned extent (x0, y0, x1, y1), not clipped.
    fn extent(&self) -> [f32; 4] {
        let e = self.r * self.ax.max(self.ay) * 1.05;
        [self.cx - e, self.cy - e, self.cx + e, self.cy + e]
    }
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            rgb: vec![[0.0; 3]; w * h],
            label: vec![0; w * h],
            inst: vec![0; w * h],
        }
    }

    /// Gradient + low-frequency waves + (sometimes) a faint vocabulary texture.
    fn background(&mut self, rng: &mut ChaCha8Rng) {
        let ca = hsv(
            rng.random_range(0.0..360.0),
            rng.random_range(0.0..0.6),
            rng.random_range(0.2..0.9),
        );
        let cb = hsv(
            rng.random_range(0.0..360.0),
            rng.random_range(0.0..0.6),
            rng.random_range(0.2..0.9),
        );
        let ga: f32 = rng.random_range(0.0..2.0 * PI);
        let (gx, gy) = (ga.cos(), ga.sin());
        let waves: Vec<(f32, f32, f32, f32)> = (0..3)
            .map(|_| {
                let a: f32 = rng.random_range(0.0..2.0 * PI);
                let f = rng.random_range(1.0..6.0) * 2.0 * PI / self.w.max(self.h) as f32;
                (
                    a.cos() * f,
                    a.sin() * f,
                    rng.random_range(0.0..2.0 * PI),
                    rng.random_range(0.03..0.12),
                )
            })
            .collect();
        let tex = if rng.random_bool(0.35) {
            Some((
                TEXTURES[rng.random_range(0..TEXTURES.len())],
                rng.random_range(0.08..0.25),
                rng.random_range(0.05..0.2),
                hsv(
                    rng.random_range(0.0..360.0),
                    rng.random_range(0.2..0.8),
                    rng.random_range(0.2..0.9),
                ),
            ))
        } else {
            None
        };
        let n = self.w.max(self.h) as f32;
        for y in 0..self.h {
            for x in 0..self.w {
                let (xf, yf) = (x as f32 / n - 0.5, y as f32 / n - 0.5);
                let t = (0.5 + xf * gx + yf * gy).clamp(0.0, 1.0);
                let mut c = [0.0; 3];
                for k in 0..3 {
                    c[k] = ca[k] * (1.0 - t) + cb[k] * t;
                }
                let wv: f32 = waves
                    .iter()
                    .map(|&(fx, fy, ph, a)| a * (fx * x as f32 + fy * y as f32 + ph).sin())
                    .sum();
                if let Some((tx, p, strength, col)) = tex {
                    let m = texture(tx, xf, yf, p, 0.0) * strength;
                    for k in 0..3 {
                        c[k] = c[k] * (1.0 - m) + col[k] * m;
                    }
                }
                self.rgb[y * self.w + x] = [c[0] + wv, c[1] + wv, c[2] + wv];
            }
        }
    }

    /// Background clutter: small blobs, bars and line segments (label 0).
    fn clutter(&mut self, rng: &mut ChaCha8Rng, n: usize) {
        let m = self.w.min(self.h) as f32;
        for _ in 0..n {
            let col = hsv(
                rng.random_range(0.0..360.0),
                rng.random_range(0.0..0.9),
                rng.random_range(0.1..1.0),
            );
            let cx = rng.random_range(0.0..self.w as f32);
            let cy = rng.random_range(0.0..self.h as f32);
            match rng.random_range(0..3) {
                0 => {
                    // Irregular blob.
                    let r0 = rng.random_range(0.02..0.08) * m;
                    let (k1, p1, k2, p2) = (
                        rng.random_range(2..5) as f32,
                        rng.random_range(0.0..6.3),
                        rng.random_range(3..7) as f32,
                        rng.random_range(0.0..6.3),
                    );
                    self.fill(
                        cx - 1.6 * r0,
                        cy - 1.6 * r0,
                        cx + 1.6 * r0,
                        cy + 1.6 * r0,
                        col,
                        0,
                        0,
                        |x, y| {
                            let (dx, dy) = (x - cx, y - cy);
                            let a = dy.atan2(dx);
                            (dx * dx + dy * dy).sqrt()
                                <= r0
                                    * (1.0 + 0.35 * (k1 * a + p1).sin() + 0.2 * (k2 * a + p2).sin())
                        },
                    );
                }
                1 => {
                    let len = m * rng.random_range(0.1..0.5);
                    let hw = rng.random_range(0.6..2.0);
                    self.segment(rng, cx, cy, len, hw, col, 0)
                }
                _ => {
                    let (hw, hh) = (
                        rng.random_range(0.01..0.06) * m,
                        rng.random_range(0.01..0.06) * m,
                    );
                    self.fill(cx - hw, cy - hh, cx + hw, cy + hh, col, 0, 0, |_, _| true);
                }
            }
        }
    }

    /// A straight segment of half-width `hw` from (cx, cy), random direction, writing `label`.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &mut self,
        rng: &mut ChaCha8Rng,
        cx: f32,
        cy: f32,
        len: f32,
        hw: f32,
        col: [f32; 3],
        label: u8,
    ) {
        let a: f32 = rng.random_range(0.0..PI);
        let (dx, dy) = (a.cos(), a.sin());
        let (ex, ey) = (cx + dx * len, cy + dy * len);
        self.fill(
            cx.min(ex) - hw,
            cy.min(ey) - hw,
            cx.max(ex) + hw,
            cy.max(ey) + hw,
            col,
            label,
            0,
            |x, y| {
                let (px, py) = (x - cx, y - cy);
                let t = (px * dx + py * dy).clamp(0.0, len);
                let (qx, qy) = (px - t * dx, py - t * dy);
                qx * qx + qy * qy <= hw * hw
            },
        );
    }

    /// Paint a flat colour where `test(x, y)` holds, within a box.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &mut self,
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
        col: [f32; 3],
        label: u8,
        inst: u16,
        test: impl Fn(f32, f32) -> bool,
    ) {
        let (xa, xb) = (
            x0.floor().max(0.0) as usize,
            (x1.ceil().max(0.0) as usize).min(self.w),
        );
        let (ya, yb) = (
            y0.floor().max(0.0) as usize,
            (y1.ceil().max(0.0) as usize).min(self.h),
        );
        for y in ya..yb {
            for x in xa..xb {
                if test(x as f32 + 0.5, y as f32 + 0.5) {
                    let i = y * self.w + x;
                    self.rgb[i] = col;
                    self.label[i] = label;
                    self.inst[i] = inst;
                }
            }
        }
    }

    /// Draw an object; returns the number of pixels drawn (before later occlusion).
    fn draw(&mut self, o: &Obj, inst: u16) -> usize {
        let (shape, tex, _) = STYLES[o.class - 1];
        let [x0, y0, x1, y1] = o.extent();
        let (xa, xb) = (
            x0.floor().max(0.0) as usize,
            (x1.ceil().max(0.0) as usize).min(self.w),
        );
        let (ya, yb) = (
            y0.floor().max(0.0) as usize,
            (y1.ceil().max(0.0) as usize).min(self.h),
        );
        let mut count = 0;
        for y in ya..yb {
            for x in xa..xb {
                let (dx, dy) = (x as f32 + 0.5 - o.cx, y as f32 + 0.5 - o.cy);
                // Rotate into the object frame, then undo aspect and scale.
                let u = (dx * o.cos + dy * o.sin) / (o.r * o.ax);
                let v = (-dx * o.sin + dy * o.cos) / (o.r * o.ay);
                if !inside(shape, u, v) {
                    continue;
                }
                let t = texture(tex, u, v, o.period, o.phase);
                // Soft directional shading so objects are not flat stickers.
                let shade = 1.0 - 0.18 * (u - v).clamp(-1.4, 1.4);
                let i = y * self.w + x;
                for k in 0..3 {
                    self.rgb[i][k] = (o.col1[k] * (1.0 - t) + o.col2[k] * t) * shade;
                }
                self.label[i] = o.class as u8;
                self.inst[i] = inst;
                count += 1;
            }
        }
        count
    }

    /// Lighting (gain, colour cast, illumination gradient), pixel noise; returns RGB u8 HWC.
    fn finish(&self, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let gain = rng.random_range(0.65..1.3);
        let bias = rng.random_range(-0.08..0.08);
        let cast = [
            rng.random_range(0.85..1.15),
            rng.random_range(0.85..1.15),
            rng.random_range(0.85..1.15),
        ];
        let la: f32 = rng.random_range(0.0..2.0 * PI);
        let ls = rng.random_range(0.0..0.5);
        let sigma = rng.random_range(0.015..0.06);
        let n = self.w.max(self.h) as f32;
        let mut out = Vec::with_capacity(self.w * self.h * 3);
        for y in 0..self.h {
            for x in 0..self.w {
                let l =
                    1.0 + ls * ((x as f32 / n - 0.5) * la.cos() + (y as f32 / n - 0.5) * la.sin());
                let c = self.rgb[y * self.w + x];
                for k in 0..3 {
                    let noise = (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>()
                        - 1.5)
                        * 2.0
                        * sigma;
                    let val = c[k] * gain * cast[k] * l + bias + noise;
                    out.push((val.clamp(0.0, 1.0) * 255.0 + 0.5) as u8);
                }
            }
        }
        out
    }
}

/// A finished image ready to encode.
struct Rendered {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Rendered {
    fn jpeg(&self, rng: &mut ChaCha8Rng) -> Result<Vec<u8>> {
        encode_jpeg(
            self.w as u32,
            self.h as u32,
            &self.rgb,
            rng.random_range(80..=95),
        )
    }
}

/// Image size: longer side `size` (landscape or portrait), the other 75–100 % of it.
fn scene_dims(rng: &mut ChaCha8Rng, size: usize) -> (usize, usize) {
    let short = ((size as f32) * rng.random_range(0.75..=1.0)).round() as usize;
    if rng.random_bool(0.7) {
        (size, short)
    } else {
        (short, size)
    }
}

fn log_uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    (rng.random_range(lo.ln()..hi.ln())).exp()
}

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: [f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter).max(1e-6)
}

/// Place `n` objects of the given classes with radii drawn by `radius`, rejecting placements
/// that overlap an earlier one by more than `max_iou` (after 20 tries the last is kept: some
/// heavy overlap is wanted too). Centres stay `margin` (fraction of the side) from the border.
#[allow(clippy::too_many_arguments)]
fn place(
    rng: &mut ChaCha8Rng,
    w: usize,
    h: usize,
    classes: &[usize],
    radius: &dyn Fn(&mut ChaCha8Rng) -> f32,
    max_iou: f32,
    margin: f32,
    placed: &mut Vec<Obj>,
) {
    for &class in classes {
        let mut obj = None;
        for _ in 0..20 {
            let r = radius(rng);
            let cx = rng.random_range(margin..1.0 - margin) * w as f32;
            let cy = rng.random_range(margin..1.0 - margin) * h as f32;
            let o = Obj::random(rng, class, cx, cy, r);
            let ok = placed
                .iter()
                .all(|p| iou(p.extent(), o.extent()) <= max_iou);
            obj = Some(o);
            if ok {
                break;
            }
        }
        placed.extend(obj);
    }
}

/// Thin occluders drawn over objects (branches, poles): they cut objects, labelled background.
fn occluders(c: &mut Canvas, rng: &mut ChaCha8Rng) {
    let m = c.w.min(c.h) as f32;
    for _ in 0..rng.random_range(0..=2) {
        let col = hsv(
            rng.random_range(0.0..360.0),
            rng.random_range(0.0..0.5),
            rng.random_range(0.1..0.9),
        );
        let (cx, cy) = (
            rng.random_range(0.0..c.w as f32),
            rng.random_range(0.0..c.h as f32),
        );
        let len = m * rng.random_range(0.3..0.8);
        let hw = rng.random_range(0.8..2.2);
        c.segment(rng, cx, cy, len, hw, col, 0);
    }
}

/// Segmentation scene: 1–4 objects of any of the 20 types; mask with a 255 band along every
/// label boundary (VOC marks object outlines "void").
fn render_seg(rng: &mut ChaCha8Rng, size: usize) -> (Rendered, Vec<u8>) {
    let (w, h) = scene_dims(rng, size);
    let mut c = Canvas::new(w, h);
    c.background(rng);
    let nclut = rng.random_range(3..=10);
    c.clutter(rng, nclut);
    let m = w.min(h) as f32;
    let classes: Vec<usize> = (0..rng.random_range(1..=4))
        .map(|_| rng.random_range(1..=20))
        .collect();
    let mut objs = Vec::new();
    place(
        rng,
        w,
        h,
        &classes,
        &|r| log_uniform(r, 0.1 * m, 0.38 * m),
        0.5,
        0.05,
        &mut objs,
    );
    for (k, o) in objs.iter().enumerate() {
        c.draw(o, k as u16 + 1);
    }
    occluders(&mut c, rng);
    let rgb = c.finish(rng);
    let mut mask = c.label.clone();
    for y in 0..h {
        for x in 0..w {
            let l = c.label[y * w + x];
            let differs = (y.saturating_sub(1)..(y + 2).min(h)).any(|yy| {
                (x.saturating_sub(1)..(x + 2).min(w)).any(|xx| c.label[yy * w + xx] != l)
            });
            if differs {
                mask[y * w + x] = IGNORE_INDEX;
            }
        }
    }
    (Rendered { w, h, rgb }, mask)
}

/// Detection scene: 1–6 objects of the 10 COCO types (several scales, some overlap) plus 0–2
/// unannotated objects of other types. Boxes are tight around the *visible* pixels (as COCO's
/// are); an object less than 30 % visible is dropped from the annotations.
/// Returns the image and `(COCO category id, [x, y, w, h], visible area)` per object.
fn render_det(rng: &mut ChaCha8Rng, size: usize) -> (Rendered, Vec<(u64, [f64; 4], f64)>) {
    let (w, h) = scene_dims(rng, size);
    let mut c = Canvas::new(w, h);
    c.background(rng);
    let nclut = rng.random_range(3..=10);
    c.clutter(rng, nclut);
    let m = w.min(h) as f32;
    let n = rng.random_range(1..=6);
    let det_types: Vec<usize> = (0..n)
        .map(|_| COCO_CATEGORIES[rng.random_range(0..10)].2)
        .collect();
    let others: Vec<usize> = (1..=20)
        .filter(|v| !COCO_CATEGORIES.iter().any(|c| c.2 == *v))
        .collect();
    let nd = rng.random_range(0..=2);
    let distract: Vec<usize> = (0..nd)
        .map(|_| others[rng.random_range(0..others.len())])
        .collect();
    let mut objs = Vec::new();
    let radius = |r: &mut ChaCha8Rng| log_uniform(r, 0.06 * m, 0.3 * m);
    place(rng, w, h, &det_types, &radius, 0.4, 0.05, &mut objs);
    let n_annot = objs.len();
    place(rng, w, h, &distract, &radius, 0.4, 0.05, &mut objs);
    // Random drawing order: distractors may occlude annotated objects and vice versa.
    let mut order: Vec<usize> = (0..objs.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut drawn = vec![0usize; objs.len()];
    for &k in &order {
        drawn[k] = c.draw(&objs[k], k as u16 + 1);
    }
    occluders(&mut c, rng);
    let rgb = c.finish(rng);
    // Visible extent of each instance.
    let mut ext = vec![(usize::MAX, usize::MAX, 0usize, 0usize, 0usize); objs.len()];
    for y in 0..h {
        for x in 0..w {
            let id = c.inst[y * w + x] as usize;
            if id > 0 {
                let e = &mut ext[id - 1];
                e.0 = e.0.min(x);
                e.1 = e.1.min(y);
                e.2 = e.2.max(x + 1);
                e.3 = e.3.max(y + 1);
                e.4 += 1;
            }
        }
    }
    let mut anns = Vec::new();
    for k in 0..n_annot {
        let (x0, y0, x1, y1, count) = ext[k];
        if count == 0 || (count as f32) < 0.3 * drawn[k] as f32 || count < 6 {
            continue;
        }
        let cat = COCO_CATEGORIES
            .iter()
            .find(|c| c.2 == objs[k].class)
            .map(|c| c.0)
            .unwrap_or(0);
        anns.push((
            cat as u64,
            [x0 as f64, y0 as f64, (x1 - x0) as f64, (y1 - y0) as f64],
            count as f64,
        ));
    }
    (Rendered { w, h, rgb }, anns)
}

/// Classification scene: 1–2 large instances of `dominant` plus 1–3 smaller distractors
/// (sometimes the look-alike type sharing its shape).
fn render_cls(rng: &mut ChaCha8Rng, size: usize, dominant: usize) -> Rendered {
    let short = size;
    let long = ((size as f32) * rng.random_range(1.0..1.33)).round() as usize;
    let (w, h) = if rng.random_bool(0.7) {
        (long, short)
    } else {
        (short, long)
    };
    let mut c = Canvas::new(w, h);
    c.background(rng);
    let nclut = rng.random_range(3..=10);
    c.clutter(rng, nclut);
    let m = w.min(h) as f32;
    let ndom = if rng.random_bool(0.3) { 2 } else { 1 };
    let mut objs = Vec::new();
    place(
        rng,
        w,
        h,
        &vec![dominant; ndom],
        &|r| r.random_range(0.18 * m..0.34 * m),
        0.3,
        0.25,
        &mut objs,
    );
    let twin = if dominant % 2 == 1 {
        dominant + 1
    } else {
        dominant - 1
    };
    let distract: Vec<usize> = (0..rng.random_range(1..=3))
        .map(|_| {
            if rng.random_bool(0.3) {
                twin
            } else {
                let mut d = rng.random_range(1..=20);
                while d == dominant {
                    d = rng.random_range(1..=20);
                }
                d
            }
        })
        .collect();
    place(
        rng,
        w,
        h,
        &distract,
        &|r| r.random_range(0.06 * m..0.16 * m),
        0.3,
        0.05,
        &mut objs,
    );
    for (k, o) in objs.iter().enumerate() {
        c.draw(o, k as u16 + 1);
    }
    occluders(&mut c, rng);
    let rgb = c.finish(rng);
    Rendered { w, h, rgb }
}
