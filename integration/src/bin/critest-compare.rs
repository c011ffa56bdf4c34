//! Runs cri-tools' conformance suite (the specs that can run offline) against one
//! containerd with runc and with Spry, and prints both pass/fail counts and the failing
//! specs. Writes target/bench/critest.json. Run by scripts/critest.sh (root).

use std::time::Instant;

use anyhow::{Context, Result};
use spry_integration::{
    require_root, Containerd, ContainerdOptions, Critest, CritestSummary, Registry, SpryHandler,
};

fn main() -> Result<()> {
    require_root()?;
    // Optional: `--focus REGEX` narrows the specs (e.g. to debug one failure).
    let args: Vec<String> = std::env::args().collect();
    let focus = args
        .iter()
        .position(|a| a == "--focus")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let root = spry_integration::paths::repo_root();
    let state = tempfile::Builder::new()
        .prefix("spry-bench-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "release", None)?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(
        spry.register(
            ContainerdOptions::new("critest")
                .registry(&registry)
                .mirror("registry.k8s.io", &registry),
        ),
    )?;
    let mut report = serde_json::Map::new();
    for handler in ["runc", "spry"] {
        let mut critest = Critest::offline_conformance();
        if let Some(focus) = &focus {
            critest.focus = focus.clone();
        }
        if handler == "spry" {
            critest = critest.runtime_handler("spry");
        }
        let t0 = Instant::now();
        let (_, output) = critest
            .output(&containerd)
            .with_context(|| format!("critest with {handler}"))?;
        let summary = CritestSummary::parse(&output);
        let log = root.join(format!("target/bench/critest-{handler}.log"));
        std::fs::create_dir_all(log.parent().expect("has a parent"))?;
        std::fs::write(&log, &output)?;
        println!(
            "{handler}: {} passed, {} failed ({:.0} s)",
            summary.passed,
            summary.failed,
            t0.elapsed().as_secs_f64()
        );
        for name in &summary.failures {
            println!("  FAIL {name}");
        }
        report.insert(
            handler.to_string(),
            serde_json::json!({ "passed": summary.passed, "failed": summary.failed, "failures": summary.failures }),
        );
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("critest.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    Ok(())
}
