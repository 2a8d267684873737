//! Weights: spec parsing, loading a timm-named safetensors file, hub download from a loopback
//! server, offline cache use, pinning.

mod common_hub;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onehead::model::weights::{
    load_backbone, pin_file_name, resolve_with, HubOptions, WeightsSpec,
};
use onehead::model::{OneHead, OneHeadConfig};

fn build() -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    OneHead::new(&OneHeadConfig::default(), vb).unwrap();
    varmap
}

/// A timm-style checkpoint: every backbone var with random values (running_var positive),
/// plus the classifier tensors timm ships, plus `extra`.
fn timm_file(varmap: &VarMap, extra: &[(&str, Tensor)]) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if let Some(short) = name.strip_prefix("backbone.") {
            let t = Tensor::rand(0.5f32, 1.5f32, var.shape(), &Device::Cpu).unwrap();
            m.insert(short.to_string(), t);
        }
    }
    m.insert(
        "conv_head.weight".into(),
        Tensor::zeros((1024, 576, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    m.insert(
        "classifier.bias".into(),
        Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap(),
    );
    for (k, t) in extra {
        m.insert(k.to_string(), t.clone());
    }
    m
}

fn get(varmap: &VarMap, name: &str) -> Tensor {
    varmap.data().lock().unwrap()[name].as_tensor().clone()
}

#[test]
fn spec_parses_and_round_trips() {
    let d = WeightsSpec::default();
    assert_eq!(d.to_string(), "hf:timm/mobilenetv3_small_100.lamb_in1k");
    assert_eq!(
        "hf:timm/mobilenetv3_small_100.lamb_in1k"
            .parse::<WeightsSpec>()
            .unwrap(),
        d
    );
    let s: WeightsSpec = "hf:me/repo@v1.2/sub/w.safetensors".parse().unwrap();
    assert_eq!(
        s,
        WeightsSpec::Hub {
            repo: "me/repo".into(),
            revision: Some("v1.2".into()),
            file: "sub/w.safetensors".into()
        }
    );
    assert_eq!(s.to_string(), "hf:me/repo@v1.2/sub/w.safetensors");
    assert_eq!("none".parse::<WeightsSpec>().unwrap(), WeightsSpec::None);
    assert_eq!(
        "weights/x.safetensors".parse::<WeightsSpec>().unwrap(),
        WeightsSpec::File(PathBuf::from("weights/x.safetensors"))
    );
    assert!("weights/x.bin".parse::<WeightsSpec>().is_err());
    assert!("hf:me//x".parse::<WeightsSpec>().is_err());
    // serde as a plain string.
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(json, "\"hf:me/repo@v1.2/sub/w.safetensors\"");
    assert_eq!(serde_json::from_str::<WeightsSpec>(&json).unwrap(), s);
    assert!(serde_json::from_str::<WeightsSpec>("\"nope\"").is_err());
}

#[test]
fn loads_timm_names_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let varmap = build();
    let unexpected = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let file = timm_file(&varmap, &[("bogus.tensor", unexpected)]);
    let path = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&file, &path).unwrap();
    let report = load_backbone(&varmap, &path, "backbone.").unwrap();
    assert_eq!(report.ignored, vec!["classifier.bias", "conv_head.weight"]);
    assert_eq!(report.unexpected, vec!["bogus.tensor"]);
    assert_eq!(report.loaded.len(), file.len() - 3);
    for name in [
        "conv_stem.weight",
        "blocks.4.2.bn3.running_var",
        "blocks.0.0.se.conv_reduce.bias",
    ] {
        let want = file[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = get(&varmap, &format!("backbone.{name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want, "{name}");
    }
    assert!(report.to_string().contains("bogus.tensor"));
}

#[test]
fn misshaped_and_missing_tensors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let varmap = build();
    let wrong = Tensor::zeros((16, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let file = timm_file(&varmap, &[("conv_stem.weight", wrong)]);
    let path = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&file, &path).unwrap();
    let before = get(&varmap, "backbone.bn1.weight")
        .to_vec1::<f32>()
        .unwrap();
    let err = format!(
        "{:#}",
        load_backbone(&varmap, &path, "backbone.").unwrap_err()
    );
    assert!(err.contains("backbone.conv_stem.weight"), "{err}");
    assert!(
        err.contains("[16, 3, 5, 5]") && err.contains("[16, 3, 3, 3]"),
        "{err}"
    );
    // Nothing was set.
    assert_eq!(
        get(&varmap, "backbone.bn1.weight")
            .to_vec1::<f32>()
            .unwrap(),
        before
    );

    let mut file = timm_file(&varmap, &[]);
    file.remove("blocks.3.1.conv_dw.weight");
    let path = dir.path().join("missing.safetensors");
    candle_core::safetensors::save(&file, &path).unwrap();
    let err = format!(
        "{:#}",
        load_backbone(&varmap, &path, "backbone.").unwrap_err()
    );
    assert!(
        err.contains("missing") && err.contains("blocks.3.1.conv_dw.weight"),
        "{err}"
    );
}

#[test]
fn none_and_local_file_specs_resolve_without_network() {
    let opts = HubOptions::default();
    assert_eq!(resolve_with(&WeightsSpec::None, None, &opts).unwrap(), None);
    let err = resolve_with(
        &WeightsSpec::File("/nonexistent/w.safetensors".into()),
        None,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn hub_download_from_loopback_then_offline_cache_and_pin() {
    let dir = tempfile::tempdir().unwrap();
    let varmap = build();
    let file = timm_file(&varmap, &[]);
    let src = dir.path().join("served.safetensors");
    candle_core::safetensors::save(&file, &src).unwrap();
    let body = std::fs::read(&src).unwrap();
    let repo = "timm/mobilenetv3_small_100.lamb_in1k";
    let server = common_hub::serve(repo, "main", "model.safetensors", body.clone());

    let cache = dir.path().join("hf/hub");
    let spec = WeightsSpec::default();
    let online = HubOptions {
        endpoint: Some(server.endpoint.clone()),
        cache_dir: Some(cache.clone()),
        offline: false,
        progress: false,
    };
    let pin = dir.path().join("weights");
    let got = resolve_with(&spec, Some(&pin), &online).unwrap().unwrap();
    assert_eq!(got, pin.join(pin_file_name(repo)));
    assert_eq!(
        got.file_name().unwrap(),
        "timm-mobilenetv3_small_100.lamb_in1k.safetensors"
    );
    assert_eq!(std::fs::read(&got).unwrap(), body);
    assert!(server.requests() >= 2, "metadata + download");
    let report = load_backbone(&varmap, &got, "backbone.").unwrap();
    assert!(report.unexpected.is_empty());

    // Offline: served from the cache, no request.
    let before = server.requests();
    let offline = HubOptions {
        offline: true,
        ..online.clone()
    };
    let cached = resolve_with(&spec, None, &offline).unwrap().unwrap();
    assert_eq!(std::fs::read(&cached).unwrap(), body);
    assert_eq!(server.requests(), before);

    // Offline with an empty cache: a clear error.
    let empty = HubOptions {
        cache_dir: Some(dir.path().join("empty")),
        ..offline
    };
    let err = format!("{:#}", resolve_with(&spec, None, &empty).unwrap_err());
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("not in the hub cache"),
        "{err}"
    );

    // Unknown file on the server: an error naming the spec.
    let missing = WeightsSpec::Hub {
        repo: repo.into(),
        revision: None,
        file: "other.safetensors".into(),
    };
    let err = format!("{:#}", resolve_with(&missing, None, &online).unwrap_err());
    assert!(err.contains("other.safetensors"), "{err}");
}
