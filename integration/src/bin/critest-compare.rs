//! Runs cri-tools' whole critest suite against one containerd with runc and with Spry,
//! offline (the images critest pulls are our builds, served through containerd's mirrors of
//! gcr.io and registry.k8s.io), and prints both pass/fail counts, the failing specs, and
//! the specs runc passes that Spry fails. Writes target/bench/critest.json. Run by
//! scripts/critest.sh (root), which builds and pushes the images first.

use anyhow::Result;
use spry_integration::{
    require_root, with_critest_mirrors, Containerd, ContainerdOptions, Registry, SpryHandler,
};

fn main() -> Result<()> {
    require_root()?;
    // Optional: `--focus REGEX` narrows the specs (e.g. to debug one failure);
    // `--handlers runc` (or `spry`) runs one side only.
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let focus = value_of("--focus");
    let handlers = value_of("--handlers").unwrap_or_else(|| "runc,spry".into());
    let root = spry_integration::paths::repo_root();
    let state = tempfile::Builder::new()
        .prefix("spry-bench-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "release", None)?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(spry.register(with_critest_mirrors(
        ContainerdOptions::new("critest").registry(&registry),
        &registry,
    )))?;
    let mut report = serde_json::Map::new();
    for handler in handlers.split(',') {
        anyhow::ensure!(
            handler == "runc" || handler == "spry",
            "--handlers takes runc and/or spry, not {handler:?}"
        );
        let (summary, output) =
            spry_integration::critest::run_with_handler(&containerd, handler, focus.as_deref())?;
        let log = root.join(format!("target/bench/critest-{handler}.log"));
        std::fs::create_dir_all(log.parent().expect("has a parent"))?;
        std::fs::write(&log, &output)?;
        report.insert(
            handler.to_string(),
            serde_json::json!({ "passed": summary.passed, "failed": summary.failed, "failures": summary.failures }),
        );
    }
    if !(report.contains_key("runc") && report.contains_key("spry")) {
        println!("one side only: target/bench/critest.json is left as it was");
        return Ok(());
    }
    let failures = |handler: &str| -> Vec<String> {
        report
            .get(handler)
            .map_or(&serde_json::Value::Null, |v| &v["failures"])
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let runc_failures = failures("runc");
    let only_spry: Vec<String> = failures("spry")
        .into_iter()
        .filter(|f| !runc_failures.contains(f))
        .collect();
    println!("specs runc passes and Spry fails: {}", only_spry.len());
    for name in &only_spry {
        println!("  {name}");
    }
    report.insert(
        "spry_fails_runc_passes".into(),
        serde_json::json!(only_spry),
    );
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("critest.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    Ok(())
}
