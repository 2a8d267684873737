//! `prepare` end to end against a loopback HTTP server serving tiny archives laid out like
//! the real ones (this machine has no internet).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use onehead::data::coco::CocoFile;
use onehead::data::imageio::{encode_jpeg, encode_mask_png};
use onehead::data::{prepare, DataError, PrepareOptions, Split};
use onehead::tasks::cls::ClsSplit;
use onehead::tasks::det::DetSplit;
use onehead::tasks::seg::SegSplit;

/// A request the server saw: (path, `Range` start if any).
type Log = Arc<Mutex<Vec<(String, Option<u64>)>>>;

/// A tiny HTTP/1.1 file server on 127.0.0.1:0: honours `Range: bytes=N-`, answers 404 for
/// unknown paths, closes every connection, and stops by itself (guard dropped or 30 s).
struct Server {
    base: String,
    log: Log,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(files: BTreeMap<String, Vec<u8>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (log2, stop2) = (log.clone(), stop.clone());
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
            let mut conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).to_string();
            let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
            let range: Option<u64> = text.lines().find_map(|l| {
                let l = l.to_ascii_lowercase();
                l.strip_prefix("range: bytes=")
                    .and_then(|r| r.trim_end_matches('-').trim().parse().ok())
            });
            log2.lock().unwrap().push((path.clone(), range));
            let (head, body): (String, &[u8]) = match files.get(&path) {
                None => ("HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n".into(), b"not found"),
                Some(data) => match range {
                    Some(n) if n as usize >= data.len() => {
                        (format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\n", data.len()), &[][..])
                    }
                    Some(n) => (
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{}\r\nContent-Length: {}\r\n",
                            data.len() - 1,
                            data.len(),
                            data.len() - n as usize
                        ),
                        &data[n as usize..],
                    ),
                    None => (format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", data.len()), &data[..]),
                },
            };
            let _ = conn.write_all(
                format!(
                    "{head}Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            );
            let _ = conn.write_all(body);
            let _ = conn.flush();
        }
    });
    Server { base, log, stop }
}

fn jpeg(seed: u8) -> Vec<u8> {
    let (w, h) = (24u32, 20u32);
    let px: Vec<u8> = (0..w * h * 3)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect();
    encode_jpeg(w, h, &px, 90).unwrap()
}

fn tar_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        z.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap().into_inner()
}

const WNIDS: [&str; 3] = ["n01440764", "n02102040", "n02979186"];

/// The four archives, keyed by file name.
fn archives() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    // Imagenette: 3 classes, 3 train + 2 val images each.
    let mut e = Vec::new();
    for (c, wnid) in WNIDS.iter().enumerate() {
        for (split, n) in [("train", 3), ("val", 2)] {
            for k in 0..n {
                e.push((
                    format!("imagenette2-160/{split}/{wnid}/{wnid}_{k}.JPEG"),
                    jpeg((c * 10 + k + 1) as u8),
                ));
            }
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_of(&e)).unwrap();
    out.insert("imagenette2-160.tgz".into(), gz.finish().unwrap());
    // VOC: 10 images with masks (7 in train.txt, 3 in val.txt) and 3 without.
    let mut e = Vec::new();
    let v = "VOCdevkit/VOC2012";
    for k in 0..13 {
        let id = format!("2007_{k:06}");
        e.push((format!("{v}/JPEGImages/{id}.jpg"), jpeg(k as u8 + 3)));
        if k < 10 {
            let mask: Vec<u8> = (0..24 * 20)
                .map(|i| if i % 24 < 4 { 255 } else { (k % 21) as u8 })
                .collect();
            e.push((
                format!("{v}/SegmentationClass/{id}.png"),
                encode_mask_png(24, 20, &mask).unwrap(),
            ));
        }
    }
    let list = |r: std::ops::Range<usize>| {
        r.map(|k| format!("2007_{k:06}\n"))
            .collect::<String>()
            .into_bytes()
    };
    e.push((format!("{v}/ImageSets/Segmentation/train.txt"), list(0..7)));
    e.push((format!("{v}/ImageSets/Segmentation/val.txt"), list(7..10)));
    e.push((
        format!("{v}/ImageSets/Segmentation/trainval.txt"),
        list(0..10),
    ));
    out.insert("VOCtrainval_11-May-2012.tar".into(), tar_of(&e));
    // COCO: 12 images; 0..10 hold chosen categories (one crowd), 10..12 only others.
    let mut e = Vec::new();
    let mut images = Vec::new();
    let mut anns = Vec::new();
    for k in 0..12u64 {
        let name = format!("{:012}.jpg", 1000 + k);
        e.push((format!("val2017/{name}"), jpeg(k as u8 + 40)));
        images.push(serde_json::json!({"id": 1000 + k, "file_name": name, "width": 24, "height": 20, "license": 1}));
        let cats: &[u64] = if k < 10 { &[1, 18, 5] } else { &[5, 90] };
        for (j, &cat) in cats.iter().enumerate() {
            anns.push(serde_json::json!({
                "id": 5000 + k * 10 + j as u64, "image_id": 1000 + k, "category_id": cat,
                "bbox": [2.0, 3.0, 10.5, 8.0], "area": 84.0, "iscrowd": if k == 0 && j == 1 { 1 } else { 0 },
                "segmentation": [[2.0, 3.0, 12.5, 3.0, 12.5, 11.0]]
            }));
        }
    }
    let mut cats: Vec<_> = onehead::data::COCO_CATEGORIES
        .iter()
        .map(|c| serde_json::json!({"id": c.0, "name": c.1, "supercategory": "x"}))
        .collect();
    cats.push(serde_json::json!({"id": 5, "name": "airplane", "supercategory": "vehicle"}));
    cats.push(serde_json::json!({"id": 90, "name": "toothbrush", "supercategory": "indoor"}));
    let full =
        serde_json::json!({"info": {}, "images": images, "annotations": anns, "categories": cats});
    out.insert("val2017.zip".into(), zip_of(&e));
    out.insert(
        "annotations_trainval2017.zip".into(),
        zip_of(&[(
            "annotations/instances_val2017.json".into(),
            serde_json::to_vec(&full).unwrap(),
        )]),
    );
    out
}

/// Options writing to `out` with the download cache `cache` (never the user's own cache).
fn options(out: &Path, cache: &Path, mirror: &str) -> PrepareOptions {
    let mut o = PrepareOptions::new(out);
    o.seed = 5;
    o.mirror = Some(mirror.to_string());
    o.train = 6;
    o.val = 3;
    o.downloads = Some(cache.to_path_buf());
    o
}

/// The entries of a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn prepare_end_to_end_with_resume() {
    let files = archives();
    let served: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(k, v)| (format!("/mirror/{k}"), v.clone()))
        .collect();
    let server = serve(served);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let cache = dir.path().join("cache");
    // An interrupted earlier download in the cache: the first half of the VOC archive.
    let voc = &files["VOCtrainval_11-May-2012.tar"];
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(
        cache.join("VOCtrainval_11-May-2012.tar.part"),
        &voc[..voc.len() / 2],
    )
    .unwrap();

    let opts = options(&out, &cache, &format!("{}/mirror/", server.base));
    let sum = prepare(&opts).unwrap();
    assert_eq!(sum.cls_images, [6, 3]);
    assert_eq!(sum.seg_images, [6, 3]);
    assert_eq!(sum.det_images, [6, 3]);
    // Chosen categories only: 2 annotations (person, dog) per kept image.
    assert_eq!(sum.det_annotations, [12, 6]);
    {
        let log = server.log.lock().unwrap();
        assert_eq!(log.len(), 4, "{log:?}");
        assert!(log.contains(&(
            "/mirror/VOCtrainval_11-May-2012.tar".into(),
            Some(voc.len() as u64 / 2)
        )));
    }
    assert_eq!(
        std::fs::read(cache.join("VOCtrainval_11-May-2012.tar")).unwrap(),
        *voc
    );
    assert!(!cache.join("VOCtrainval_11-May-2012.tar.part").exists());
    // The archives stay in the cache; the dataset folder holds only the sampled sets.
    assert_eq!(
        listing(&cache),
        [
            "VOCtrainval_11-May-2012.tar",
            "annotations_trainval2017.zip",
            "imagenette2-160.tgz",
            "val2017.zip"
        ]
    );
    assert_eq!(
        listing(&out),
        ["imagenette_160", "mini_coco_det", "mini_voc_seg"]
    );

    // The datasets load.
    let cls = ClsSplit::open(&out, Split::Train, 16, false).unwrap();
    assert_eq!(cls.class_names, WNIDS);
    assert_eq!(cls.len(), 6);
    let seg = SegSplit::open(&out, Split::Val, 16, false).unwrap();
    assert_eq!(seg.len(), 3);
    // Val comes from VOC's val.txt (ids 7..10), masks read as indices.
    for i in 0..3 {
        let stem = seg.images.files[i]
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let k: u8 = stem[5..].parse().unwrap();
        assert!((7..10).contains(&k));
        let m = seg.mask(i);
        assert!(m.iter().all(|&v| v == k || v == 255));
    }
    let det = DetSplit::open(&out, Split::Train, 16, false).unwrap();
    assert_eq!(det.len(), 6);
    assert_eq!(det.class_names.len(), 10);
    let json = CocoFile::read(&out.join("mini_coco_det/annotations/instances_train.json")).unwrap();
    assert_eq!(json.categories.len(), 10);
    assert!(json
        .annotations
        .iter()
        .all(|a| a.category_id == 1 || a.category_id == 18));
    let crowd = json.images.iter().any(|im| im.id == 1000);
    assert_eq!(json.annotations.iter().any(|a| a.iscrowd == 1), crowd);

    // A rerun downloads nothing and, with the same seed, selects the same files.
    let before: Vec<_> = std::fs::read_dir(out.join("mini_voc_seg/train"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    prepare(&opts).unwrap();
    assert_eq!(server.log.lock().unwrap().len(), 4);
    let after: Vec<_> = std::fs::read_dir(out.join("mini_voc_seg/train"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let (mut b, mut a) = (before, after);
    b.sort();
    a.sort();
    assert_eq!(a, b);

    // Another seed into another folder reuses the cached archives: no request at all.
    let other = dir.path().join("data_seed6");
    let mut o6 = options(&other, &cache, &format!("{}/mirror/", server.base));
    o6.seed = 6;
    let sum6 = prepare(&o6).unwrap();
    assert_eq!(sum6.seg_images, [6, 3]);
    assert_eq!(server.log.lock().unwrap().len(), 4, "the cache is reused");
    assert_eq!(
        listing(&other),
        ["imagenette_160", "mini_coco_det", "mini_voc_seg"]
    );

    // The CLI finds the cache through ONEHEAD_CACHE (and --cache): still no request.
    let cli_out = dir.path().join("data_cli");
    let run_cli = |extra: &[&str], env_cache: Option<&Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_onehead"));
        cmd.args([
            "prepare", "--seed", "7", "--train", "6", "--val", "3", "--mirror",
        ])
        .arg(format!("{}/mirror/", server.base))
        .arg("--out")
        .arg(&cli_out)
        .args(extra)
        .env_remove("ONEHEAD_CACHE");
        if let Some(c) = env_cache {
            cmd.env("ONEHEAD_CACHE", c);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run_cli(&[], Some(&cache));
    let cache_arg = cache.display().to_string();
    run_cli(
        &["--cache", &cache_arg],
        Some(&dir.path().join("elsewhere")),
    );
    assert_eq!(
        server.log.lock().unwrap().len(),
        4,
        "the CLI reuses the cache"
    );
    assert!(
        !dir.path().join("elsewhere").exists(),
        "--cache wins over ONEHEAD_CACHE"
    );
    assert_eq!(
        listing(&cli_out),
        ["imagenette_160", "mini_coco_det", "mini_voc_seg"]
    );

    // Archives an older prepare left in OUT/downloads move into the cache.
    let legacy = dir.path().join("data_legacy");
    std::fs::create_dir_all(legacy.join("downloads")).unwrap();
    for f in listing(&cache) {
        std::fs::copy(cache.join(&f), legacy.join("downloads").join(&f)).unwrap();
    }
    let fresh_cache = dir.path().join("cache2");
    prepare(&options(
        &legacy,
        &fresh_cache,
        &format!("{}/mirror/", server.base),
    ))
    .unwrap();
    assert_eq!(
        server.log.lock().unwrap().len(),
        4,
        "the old archives are used"
    );
    assert_eq!(listing(&fresh_cache), listing(&cache));
    assert!(!legacy.join("downloads").exists());
}

#[test]
fn the_cache_folder_is_the_variable_else_the_platform_cache() {
    use onehead::data::prepare::cache_dir_from;
    let platform = Some(PathBuf::from("/home/u/.cache"));
    assert_eq!(
        cache_dir_from(None, platform.clone()).unwrap(),
        PathBuf::from("/home/u/.cache/onehead/downloads")
    );
    assert_eq!(
        cache_dir_from(Some("/big/disk".into()), platform.clone()).unwrap(),
        PathBuf::from("/big/disk")
    );
    // An empty variable counts as unset.
    assert_eq!(
        cache_dir_from(Some("".into()), platform).unwrap(),
        PathBuf::from("/home/u/.cache/onehead/downloads")
    );
    let err = cache_dir_from(None, None).unwrap_err();
    assert!(format!("{err}").contains("--cache"), "{err}");
}

#[test]
fn prepare_reports_http_404_and_bad_checksum() {
    let server = serve(BTreeMap::new());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let err = prepare(&options(dir.path(), &cache, &server.base)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("404") && msg.contains("imagenette2-160.tgz"),
        "{msg}"
    );
    assert!(matches!(
        err.downcast_ref::<DataError>(),
        Some(DataError::Http { status: 404, .. })
    ));

    let files = archives();
    let served: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(k, v)| (format!("/{k}"), v.clone()))
        .collect();
    let server = serve(served);
    let mut opts = options(dir.path(), &cache, &server.base);
    opts.archives[0].sha256 = Some("00".repeat(32));
    let err = prepare(&opts).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<DataError>(),
            Some(DataError::ChecksumMismatch { .. })
        ),
        "{err:#}"
    );
    assert!(!cache.join("imagenette2-160.tgz").exists());
}
