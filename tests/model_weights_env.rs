//! `resolve` reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE. The only test in this binary, so
//! changing the process environment cannot race with another test.

mod common_hub;

use onehead::model::weights::{resolve, WeightsSpec};

#[test]
fn resolve_honours_hf_endpoint_home_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let body = b"not really safetensors, only bytes to move".to_vec();
    let server = common_hub::serve("me/tiny", "v2", "w.safetensors", body.clone());
    std::env::set_var("HF_ENDPOINT", &server.endpoint);
    std::env::set_var("HF_HOME", dir.path().join("hf"));
    std::env::remove_var("HF_HUB_OFFLINE");
    let spec: WeightsSpec = "hf:me/tiny@v2/w.safetensors".parse().unwrap();
    let path = resolve(&spec, None).unwrap().unwrap();
    assert!(
        path.starts_with(dir.path().join("hf/hub")),
        "{}",
        path.display()
    );
    assert_eq!(std::fs::read(&path).unwrap(), body);

    std::env::set_var("HF_HUB_OFFLINE", "1");
    let n = server.requests();
    assert_eq!(resolve(&spec, None).unwrap().unwrap(), path);
    assert_eq!(server.requests(), n, "offline must not touch the network");
    let other: WeightsSpec = "hf:me/other".parse().unwrap();
    let err = format!("{:#}", resolve(&other, None).unwrap_err());
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}
