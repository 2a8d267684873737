//! `onehead prepare`: the report's Steps 1–4 for the real course sets.
//!
//! 1. Lay out `OUT/{imagenette_160,mini_voc_seg,mini_coco_det}` and a temp area `OUT/tmp`.
//! 2. Download the four archives of [`ARCHIVES`] into the download cache, outside the data
//!    root ([`default_cache_dir`]: `$ONEHEAD_CACHE`, else the platform's cache folder +
//!    `onehead/downloads`; `--cache DIR`), where they are kept, so a rerun (any seed, any
//!    `--out`) skips them; an interrupted download resumes from its `.part` file there with
//!    an HTTP Range request. Verify them, and extract them into the temp area.
//! 3. Sample with the seed: Imagenette keeps its class folders (stratified: equal share per
//!    class, train from Imagenette's train split, val from its val split); VOC keeps only
//!    images that have a `SegmentationClass` mask (train from VOC's segmentation `train.txt`,
//!    val from `val.txt` when those lists exist); COCO keeps images containing at least one of
//!    the 10 [`super::COCO_CATEGORIES`], only those categories' annotations (crowd ones
//!    included) and writes one small JSON per split.
//! 4. Delete the temp area (also when a step fails): `OUT` holds only the sampled sets.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::coco::{CocoAnnotation, CocoFile};
use super::imageio::{is_image, sorted_dirs, sorted_files};
use super::synth::fresh_dataset_dir;
use super::{DataError, Split, CLS_DIR, COCO_CATEGORIES, DET_DIR, SEG_DIR};

/// One archive to download: where from and, where known, what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSpec {
    /// Full URL; its last path segment is the archive's file name.
    pub url: String,
    /// Exact size in bytes, if known (checked after download).
    pub size: Option<u64>,
    /// Lower-case hex SHA-256, if known (checked after download).
    pub sha256: Option<String>,
}

impl ArchiveSpec {
    /// The archive's file name (last segment of the URL).
    pub fn file_name(&self) -> &str {
        self.url.rsplit('/').next().unwrap_or(&self.url)
    }

    /// The URL to fetch: `<mirror>/<file name>` when a mirror is given, else [`Self::url`].
    pub fn resolved_url(&self, mirror: Option<&str>) -> String {
        match mirror {
            Some(m) => format!("{}/{}", m.trim_end_matches('/'), self.file_name()),
            None => self.url.clone(),
        }
    }
}

/// Index of each archive in [`ARCHIVES`] / [`PrepareOptions::archives`].
pub const IMAGENETTE: usize = 0;
pub const VOC: usize = 1;
pub const COCO_IMAGES: usize = 2;
pub const COCO_ANNOTATIONS: usize = 3;

/// THE download table: `(url, size in bytes, sha256)`, in the order of the index constants
/// above. `--mirror URL` replaces everything before the file name.
///
/// Sizes and checksums are `None`: the publishers list none in a form we could verify offline
/// (VOC and COCO publish MD5s at most, and this crate only has SHA-256), so we do not guess.
/// Every download is still checked against the server's Content-Length, and a value filled in
/// here is enforced.
pub const ARCHIVES: [(&str, Option<u64>, Option<&str>); 4] = [
    (
        "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
        None,
        None,
    ),
    (
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        None,
        None,
    ),
    ("http://images.cocodataset.org/zips/val2017.zip", None, None),
    (
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        None,
        None,
    ),
];

/// [`ARCHIVES`] as owned specs.
pub fn default_archives() -> [ArchiveSpec; 4] {
    ARCHIVES.map(|(url, size, sha)| ArchiveSpec {
        url: url.to_string(),
        size,
        sha256: sha.map(str::to_string),
    })
}

/// Options of [`prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareOptions {
    /// Data root to write (`--out`).
    pub out: PathBuf,
    /// Sampling seed (`--seed`).
    pub seed: u64,
    /// Replaces scheme+host+path of every URL: files are fetched as `<mirror>/<file name>`.
    pub mirror: Option<String>,
    /// Training images per dataset (default 240).
    pub train: usize,
    /// Validation images per dataset (default 60).
    pub val: usize,
    /// The archives (default [`ARCHIVES`]), order as the index constants.
    pub archives: [ArchiveSpec; 4],
    /// Where archives are downloaded and kept (default [`default_cache_dir`]).
    pub downloads: Option<PathBuf>,
}

impl PrepareOptions {
    /// Defaults: seed 0, no mirror, 240/60, the official URLs.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        PrepareOptions {
            out: out.into(),
            seed: 0,
            mirror: None,
            train: 240,
            val: 60,
            archives: default_archives(),
            downloads: None,
        }
    }
}

/// The environment variable naming the download cache (the folder that holds the archives).
pub const CACHE_ENV: &str = "ONEHEAD_CACHE";

/// The folder where `prepare` keeps its downloaded archives: `$ONEHEAD_CACHE` when set and
/// not empty, else the platform's cache folder + `onehead/downloads` (`$XDG_CACHE_HOME` or
/// `~/.cache` on Linux, `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows).
pub fn default_cache_dir() -> Result<PathBuf> {
    cache_dir_from(std::env::var_os(CACHE_ENV), dirs::cache_dir())
}

/// [`default_cache_dir`] from the variable's value and the platform's cache folder.
pub fn cache_dir_from(
    env: Option<std::ffi::OsString>,
    platform: Option<PathBuf>,
) -> Result<PathBuf> {
    match (env, platform) {
        (Some(v), _) if !v.is_empty() => Ok(PathBuf::from(v)),
        (_, Some(p)) => Ok(p.join("onehead").join("downloads")),
        _ => {
            anyhow::bail!("this platform has no cache folder: pass --cache DIR or set {CACHE_ENV}")
        }
    }
}

/// Archives left in `OUT/downloads` by an older `prepare` are moved into the cache (a
/// rename: free on the same file system); where that fails they are left with a warning.
fn adopt_legacy_downloads(out: &Path, cache: &Path, specs: &[ArchiveSpec]) {
    let legacy = out.join("downloads");
    if !legacy.is_dir() || legacy == cache {
        return;
    }
    for spec in specs {
        let (old, new) = (legacy.join(spec.file_name()), cache.join(spec.file_name()));
        if old.is_file() && !new.exists() {
            match std::fs::rename(&old, &new) {
                Ok(()) => tracing::info!("moved {} into the cache {}", old.display(), cache.display()),
                Err(e) => tracing::warn!(
                    "{} is from an older prepare and could not be moved into the cache {} ({e}): move it there by hand to skip downloading it again",
                    old.display(),
                    cache.display()
                ),
            }
        }
    }
    // Remove the folder if that emptied it.
    let _ = std::fs::remove_dir(&legacy);
}

/// What [`prepare`] wrote; counts are `[train, val]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareSummary {
    pub root: PathBuf,
    pub cls_images: [usize; 2],
    pub seg_images: [usize; 2],
    pub det_images: [usize; 2],
    pub det_annotations: [usize; 2],
}

/// Deletes the temp area when dropped (Step 4, also on failure).
struct TempArea(PathBuf);

impl Drop for TempArea {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Download, extract, sample and write the three course datasets (Steps 1–4).
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let out = &opts.out;
    anyhow::ensure!(
        opts.train > 0 && opts.val > 0,
        "prepare: train and val sizes must be positive"
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let downloads = match &opts.downloads {
        Some(d) => d.clone(),
        None => default_cache_dir()?,
    };
    std::fs::create_dir_all(&downloads)
        .with_context(|| format!("creating the download cache {}", downloads.display()))?;
    adopt_legacy_downloads(out, &downloads, &opts.archives);
    tracing::info!("download cache: {}", downloads.display());

    // Step 2a: downloads (all first, so a network failure leaves nothing half-written).
    let mut files = Vec::new();
    for spec in &opts.archives {
        files.push(download(spec, opts.mirror.as_deref(), &downloads)?);
    }

    // Step 1 + 2b: temp area and extraction.
    let tmp = TempArea(out.join("tmp"));
    if tmp.0.exists() {
        std::fs::remove_dir_all(&tmp.0).with_context(|| format!("clearing {}", tmp.0.display()))?;
    }
    let (t_cls, t_voc, t_coco) = (
        tmp.0.join("imagenette"),
        tmp.0.join("voc"),
        tmp.0.join("coco"),
    );
    extract(&files[IMAGENETTE], &t_cls)?;
    extract(&files[VOC], &t_voc)?;
    extract(&files[COCO_IMAGES], &t_coco)?;
    extract(&files[COCO_ANNOTATIONS], &t_coco)?;

    // Step 3: sampling. One RNG, used in a fixed order, so the seed fixes the selection.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let cls_images = sample_imagenette(
        &t_cls.join("imagenette2-160"),
        &out.join(CLS_DIR),
        opts,
        &mut rng,
    )?;
    let seg_images = sample_voc(
        &t_voc.join("VOCdevkit").join("VOC2012"),
        &out.join(SEG_DIR),
        opts,
        &mut rng,
    )?;
    let (det_images, det_annotations) = sample_coco(&t_coco, &out.join(DET_DIR), opts, &mut rng)?;

    // Step 4.
    drop(tmp);
    Ok(PrepareSummary {
        root: out.clone(),
        cls_images,
        seg_images,
        det_images,
        det_annotations,
    })
}

/// Download `spec` into `dir` unless already there; resume a `.part` file with a Range
/// request; verify size (Content-Length and [`ArchiveSpec::size`]) and checksum.
pub fn download(spec: &ArchiveSpec, mirror: Option<&str>, dir: &Path) -> Result<PathBuf> {
    let name = spec.file_name();
    let url = spec.resolved_url(mirror);
    let dest = dir.join(name);
    if dest.is_file() {
        tracing::info!("{} already downloaded", dest.display());
        verify(&dest, spec)?;
        return Ok(dest);
    }
    let part = dir.join(format!("{name}.part"));
    let have = part.metadata().map(|m| m.len()).unwrap_or(0);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .build()
        .into();
    // Ask for the bytes as stored: a transparently decompressed body would not match the
    // archive's size, its checksum or a byte offset to resume from.
    let mut req = agent.get(&url).header("Accept-Encoding", "identity");
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let resp = req.call().with_context(|| {
        format!("downloading {url} (no network here? `--mirror URL` fetches the archives from a mirror)")
    })?;
    let status = resp.status().as_u16();
    let header = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let length: Option<u64> = header("content-length").and_then(|v| v.trim().parse().ok());
    let (file, start, total) = match status {
        206 if have > 0 => {
            // "Content-Range: bytes START-END/TOTAL": the server must resume where we stopped.
            let cr = header("content-range").unwrap_or_default();
            let from: Option<u64> = cr
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.trim().parse().ok());
            anyhow::ensure!(
                from == Some(have),
                "downloading {url}: asked to resume at byte {have}, server answered Content-Range '{cr}'"
            );
            let total = cr
                .rsplit('/')
                .next()
                .and_then(|t| t.trim().parse().ok())
                .or(length.map(|l| l + have));
            let f = OpenOptions::new()
                .append(true)
                .open(&part)
                .with_context(|| format!("opening {}", part.display()))?;
            (f, have, total)
        }
        // A full answer (the server ignored the range, or there was none): start over.
        200 => (
            File::create(&part).with_context(|| format!("creating {}", part.display()))?,
            0,
            length,
        ),
        416 if have > 0 => {
            // The part is not a prefix of the file on the server: drop it and retry once.
            std::fs::remove_file(&part)?;
            return download(spec, mirror, dir);
        }
        _ => return Err(DataError::Http { url, status }.into()),
    };
    if start > 0 {
        tracing::info!("resuming {url} at byte {start}");
    }
    let mut body = resp.into_body().into_reader();
    stream_to(&mut body, file, &part, &url, (start, total))?;
    let got = part.metadata()?.len();
    if let Some(t) = total {
        if got != t {
            return Err(DataError::SizeMismatch {
                path: part,
                got,
                expected: t,
            }
            .into());
        }
    }
    std::fs::rename(&part, &dest)
        .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
    if let Err(e) = verify(&dest, spec) {
        // A wrong file must not be mistaken for a finished download next time.
        let _ = std::fs::remove_file(&dest);
        return Err(e);
    }
    Ok(dest)
}

/// Copy `body` to the end of `file` (the partial download `part`, `start` bytes in, of
/// `total` when known), with a progress bar.
fn stream_to(
    body: &mut impl Read,
    mut file: File,
    part: &Path,
    url: &str,
    (start, total): (u64, Option<u64>),
) -> Result<()> {
    let pb = indicatif::ProgressBar::new(total.unwrap_or(0));
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(
        part.file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".part").to_string())
            .unwrap_or_default(),
    );
    pb.set_position(start);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = body.read(&mut buf).with_context(|| {
            format!(
                "downloading {url} (the partial file {} is kept; run again to resume)",
                part.display()
            )
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        pb.inc(n as u64);
    }
    file.flush()?;
    drop(file);
    pb.finish_and_clear();
    Ok(())
}

/// Check a finished download against the known size and SHA-256 of `spec`.
fn verify(path: &Path, spec: &ArchiveSpec) -> Result<()> {
    let got = path
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if let Some(expected) = spec.size {
        if got != expected {
            return Err(DataError::SizeMismatch {
                path: path.to_path_buf(),
                got,
                expected,
            }
            .into());
        }
    }
    if let Some(expected) = &spec.sha256 {
        let mut h = Sha256::new();
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
        let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if &got != expected {
            return Err(DataError::ChecksumMismatch {
                path: path.to_path_buf(),
                got,
                expected: expected.clone(),
            }
            .into());
        }
    }
    Ok(())
}

/// Extract a `.zip`, `.tar`, `.tgz` or `.tar.gz` archive into `dest`.
pub fn extract(archive: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let name = archive
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_ascii_lowercase();
    let ctx = || format!("extracting {} into {}", archive.display(), dest.display());
    let file = File::open(archive).with_context(ctx)?;
    if name.ends_with(".zip") {
        zip::ZipArchive::new(file)
            .with_context(ctx)?
            .extract(dest)
            .with_context(ctx)?;
    } else if name.ends_with(".tgz") || name.ends_with(".tar.gz") {
        tar::Archive::new(flate2::read::GzDecoder::new(file))
            .unpack(dest)
            .with_context(ctx)?;
    } else if name.ends_with(".tar") {
        tar::Archive::new(file).unpack(dest).with_context(ctx)?;
    } else {
        anyhow::bail!(
            "{}: unknown archive type (expected .zip, .tar, .tgz or .tar.gz)",
            archive.display()
        );
    }
    Ok(())
}

fn expect_dir(path: &Path, archive: &str) -> Result<()> {
    anyhow::ensure!(
        path.is_dir(),
        "the archive {archive} did not contain the expected folder {}",
        path.display()
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn file_name(p: &Path) -> &std::ffi::OsStr {
    p.file_name().unwrap_or_default()
}

/// Imagenette: stratified per class (class c gets `n / C` images, plus one for the first
/// `n % C` classes), train from Imagenette's train split and val from its val split.
fn sample_imagenette(
    src: &Path,
    out: &Path,
    opts: &PrepareOptions,
    rng: &mut ChaCha8Rng,
) -> Result<[usize; 2]> {
    let archive = opts.archives[IMAGENETTE].file_name().to_string();
    let out = fresh_dataset_dir(out, "prepare")?;
    let mut counts = [0; 2];
    for (si, (split, n)) in [(Split::Train, opts.train), (Split::Val, opts.val)]
        .into_iter()
        .enumerate()
    {
        let sdir = src.join(split.name());
        expect_dir(&sdir, &archive)?;
        let classes = sorted_dirs(&sdir)?;
        anyhow::ensure!(!classes.is_empty(), "{}: no class folders", sdir.display());
        let nc = classes.len();
        for (c, cdir) in classes.iter().enumerate() {
            let quota = n / nc + usize::from(c < n % nc);
            let mut files: Vec<PathBuf> = sorted_files(cdir)?
                .into_iter()
                .filter(|f| is_image(f))
                .collect();
            anyhow::ensure!(
                files.len() >= quota.max(1),
                "{}: {} images, but {quota} are needed for the {} split",
                cdir.display(),
                files.len(),
                split.name()
            );
            files.shuffle(rng);
            let odir = out.join(split.name()).join(file_name(cdir));
            std::fs::create_dir_all(&odir)?;
            for f in files.iter().take(quota) {
                copy(f, &odir.join(file_name(f)))?;
            }
            counts[si] += quota;
        }
    }
    Ok(counts)
}

/// VOC: only images with a `SegmentationClass` mask; the official segmentation train/val
/// lists separate the splits when present, else one pool is shuffled and cut.
fn sample_voc(
    src: &Path,
    out: &Path,
    opts: &PrepareOptions,
    rng: &mut ChaCha8Rng,
) -> Result<[usize; 2]> {
    let archive = opts.archives[VOC].file_name().to_string();
    let (jpegs, masks) = (src.join("JPEGImages"), src.join("SegmentationClass"));
    expect_dir(&jpegs, &archive)?;
    expect_dir(&masks, &archive)?;
    let has_pair = |id: &str| {
        masks.join(format!("{id}.png")).is_file() && jpegs.join(format!("{id}.jpg")).is_file()
    };
    let read_list = |name: &str| -> Result<Option<Vec<String>>> {
        let p = src.join("ImageSets").join("Segmentation").join(name);
        if !p.is_file() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let mut ids: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && has_pair(l))
            .map(String::from)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(Some(ids))
    };
    let (mut train_ids, mut val_ids) = match (read_list("train.txt")?, read_list("val.txt")?) {
        (Some(t), Some(v)) => (t, v),
        _ => {
            let mut all: Vec<String> = sorted_files(&masks)?
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "png"))
                .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .filter(|id| has_pair(id))
                .collect();
            all.shuffle(rng);
            anyhow::ensure!(
                all.len() >= opts.train + opts.val,
                "{}: only {} images with masks, {} needed",
                masks.display(),
                all.len(),
                opts.train + opts.val
            );
            let val = all.split_off(opts.train);
            (all, val)
        }
    };
    let out = fresh_dataset_dir(out, "prepare")?;
    let mut counts = [0; 2];
    for (si, (split, ids, n)) in [
        (Split::Train, &mut train_ids, opts.train),
        (Split::Val, &mut val_ids, opts.val),
    ]
    .into_iter()
    .enumerate()
    {
        ids.shuffle(rng);
        anyhow::ensure!(
            ids.len() >= n,
            "{}: only {} images with masks in VOC's {} list, {n} needed",
            src.display(),
            ids.len(),
            split.name()
        );
        let odir = out.join(split.name());
        std::fs::create_dir_all(&odir)?;
        for id in ids.iter().take(n) {
            copy(
                &jpegs.join(format!("{id}.jpg")),
                &odir.join(format!("{id}.jpg")),
            )?;
            copy(
                &masks.join(format!("{id}.png")),
                &odir.join(format!("{id}.png")),
            )?;
        }
        counts[si] = n;
    }
    Ok(counts)
}

/// COCO val2017: images with at least one annotation of the chosen categories; only those
/// annotations (crowd included); one lightweight JSON per split.
fn sample_coco(
    src: &Path,
    out: &Path,
    opts: &PrepareOptions,
    rng: &mut ChaCha8Rng,
) -> Result<([usize; 2], [usize; 2])> {
    let images_dir = src.join("val2017");
    expect_dir(&images_dir, opts.archives[COCO_IMAGES].file_name())?;
    let json = src.join("annotations").join("instances_val2017.json");
    anyhow::ensure!(
        json.is_file(),
        "the archive {} did not contain {}",
        opts.archives[COCO_ANNOTATIONS].file_name(),
        json.display()
    );
    let full = CocoFile::read(&json)?;
    let chosen: Vec<u64> = COCO_CATEGORIES.iter().map(|c| c.0 as u64).collect();
    let mut categories: Vec<_> = full
        .categories
        .iter()
        .filter(|c| chosen.contains(&c.id))
        .cloned()
        .collect();
    categories.sort_by_key(|c| c.id);
    for &(id, name, _) in &COCO_CATEGORIES {
        anyhow::ensure!(
            categories.iter().any(|c| c.id == id as u64),
            "{}: category {id} ({name}) is missing",
            json.display()
        );
    }
    let anns: Vec<CocoAnnotation> = full
        .annotations
        .into_iter()
        .filter(|a| chosen.contains(&a.category_id))
        .collect();
    let mut keep: Vec<u64> = anns.iter().map(|a| a.image_id).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut images: Vec<_> = full
        .images
        .into_iter()
        .filter(|im| keep.binary_search(&im.id).is_ok())
        .collect();
    images.sort_by_key(|im| im.id);
    anyhow::ensure!(
        images.len() >= opts.train + opts.val,
        "{}: only {} images contain the chosen categories, {} needed",
        json.display(),
        images.len(),
        opts.train + opts.val
    );
    images.shuffle(rng);
    images.truncate(opts.train + opts.val);
    let val_images = images.split_off(opts.train);
    let out = fresh_dataset_dir(out, "prepare")?;
    std::fs::create_dir_all(out.join("annotations"))?;
    let mut counts = ([0; 2], [0; 2]);
    for (si, (split, mut imgs)) in [(Split::Train, images), (Split::Val, val_images)]
        .into_iter()
        .enumerate()
    {
        imgs.sort_by_key(|im| im.id);
        let odir = out.join(split.name());
        std::fs::create_dir_all(&odir)?;
        for im in &imgs {
            copy(&images_dir.join(&im.file_name), &odir.join(&im.file_name))?;
        }
        let mut split_anns: Vec<CocoAnnotation> = anns
            .iter()
            .filter(|a| imgs.binary_search_by_key(&a.image_id, |im| im.id).is_ok())
            .cloned()
            .collect();
        split_anns.sort_by_key(|a| a.id);
        counts.0[si] = imgs.len();
        counts.1[si] = split_anns.len();
        CocoFile {
            images: imgs,
            annotations: split_anns,
            categories: categories.clone(),
        }
        .write(
            &out.join("annotations")
                .join(format!("instances_{}.json", split.name())),
        )?;
    }
    Ok(counts)
}
