//! The README's schema block cannot drift from the code: it must parse as an experiment
//! (so it holds no stale key), every value in it must be the code's default, and every key
//! the code serialises must appear in it.

use std::path::Path;

use onehead::config::Experiment;
use onehead::registry::Registry;
use onehead::tasks::det::DetSettings;

/// The ```toml block under the README's "Experiment schema" heading.
fn schema_block() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("## Experiment schema")
        .expect("README has an 'Experiment schema' section");
    let rest = &readme[start..];
    let open = rest.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let close = rest[open..].find("```").unwrap();
    rest[open..open + close].to_string()
}

/// Every dotted key of a TOML value (tables recursed, arrays of tables by their first entry).
fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(p.clone());
                keys(v, &p, out);
            }
        }
        toml::Value::Array(a) if a.first().is_some_and(|x| x.is_table()) => {
            keys(&a[0], prefix, out)
        }
        _ => {}
    }
}

#[test]
fn the_readme_schema_block_is_the_code_defaults() {
    let block = schema_block();
    let p = Path::new("README.md");
    // The block shows every table at once (one stage, yet `[tasks.det]`): parsed, and every
    // strategy's table resolved and checked, without the cross-table checks.
    let registry = Registry::builtin();
    let mut exp = Experiment::from_toml_str(&block, p, &[]).unwrap_or_else(|e| panic!("{e}"));
    registry
        .strategies
        .resolve(&mut exp, p, &block)
        .unwrap_or_else(|e| panic!("{e}"));
    // The defaults: the same file with only the required keys.
    let minimal = registry
        .parse("name = \"replay\"\n[[stages]]\ntask = \"seg\"\n", p, &[])
        .unwrap();
    let mut expected = minimal.clone();
    // Keys the block shows commented out or as an example are optional with no default value,
    // and `[tasks.det]` is checked against the detection task's own defaults below.
    expected.tasks = exp.tasks.clone();
    assert_eq!(
        exp, expected,
        "README schema values differ from the code's defaults"
    );
    let det: DetSettings = exp.tasks["det"].clone().try_into().unwrap();
    assert_eq!(det, DetSettings::default());

    // Completeness: every key the code writes to a run's config.toml is in the block.
    let mut code_keys = Vec::new();
    keys(
        &toml::Value::try_from(&minimal).unwrap(),
        "",
        &mut code_keys,
    );
    let mut det_keys = Vec::new();
    keys(
        &toml::Value::try_from(DetSettings::default()).unwrap(),
        "tasks.det",
        &mut det_keys,
    );
    code_keys.extend(det_keys);
    let mut readme_keys = Vec::new();
    keys(
        &block.parse::<toml::Table>().unwrap().into(),
        "",
        &mut readme_keys,
    );
    for k in code_keys {
        assert!(readme_keys.contains(&k), "README schema lacks `{k}`");
    }
}
