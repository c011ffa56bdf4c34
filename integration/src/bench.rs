//! What the benchmark binaries share: statistics, rounding, where reports go, and the
//! accelerator Spry's VMs ran with.

use std::path::Path;

use anyhow::{Context, Result};

use crate::containerd_config::proxy_snapshotter_toml;
use crate::snapshotter::Snapshotter;
use crate::{Containerd, ContainerdOptions, Registry, SpryHandler};

/// How often a bench asks `crictl logs` for a container's first output: the same for every
/// runtime in a run, and short against the 100-300 ms being timed.
pub const LOG_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The `p`th percentile (nearest rank) of `values`; NaN for none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[rank.min(v.len() - 1)]
}

/// One decimal (`+ 0.0` turns the -0.0 of an empty float sum into 0).
pub fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0 + 0.0
}

/// Two decimals, for ratios.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0 + 0.0
}

/// Writes `<dir>/<name>.json` (pretty) and `<dir>/<name>.md`, and prints the markdown.
pub fn write_report(dir: &Path, name: &str, report: &serde_json::Value, md: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(report)? + "\n",
    )?;
    std::fs::write(dir.join(format!("{name}.md")), md)?;
    print!("{md}");
    Ok(())
}

/// The accelerator the shim's VMs used, from the probe cache in Spry's state dir.
pub fn spry_accelerator(state_dir: &Path) -> String {
    std::fs::read_to_string(state_dir.join("accel-probe.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("accel").and_then(|a| a.as_str()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// What a benchmark compares in one run: one containerd with runc, Spry booting cold
/// (`spry-cold`, `template = "off"`) and Spry from VM templates (`spry-template`), each
/// configured through containerd's ConfigPath option, running the release build, with a
/// registry of the test images. Fields drop in order: containerd first.
pub struct BenchNode {
    pub containerd: Containerd,
    /// containerd's snapshotter when it is Spry's (`start_with_snapshotter`).
    pub snapshotter: Option<Snapshotter>,
    pub registry: Registry,
    /// Spry's state: its `run/` dir holds the VMs, templates and layer images.
    pub state: tempfile::TempDir,
}

impl BenchNode {
    /// Starts containerd with handlers `spry` (the harness's), `spry-cold` (templates off),
    /// `spry-template` and `spry-pool` (templates and a warm pool of [`POOL_SIZE`]); its
    /// registry must hold `images` (what the bench runs; its script builds only those).
    pub fn start(name: &str, images: &[&str]) -> Result<Self> {
        Self::start_with_snapshotter(name, images, None)
    }

    /// As [`BenchNode::start`]; with `snapshotter_config`, containerd's snapshotter for every
    /// handler is a `spry-snapshotter` with that config (what `spry install --snapshotter`
    /// sets up for the `spry` handler).
    pub fn start_with_snapshotter(
        name: &str,
        images: &[&str],
        snapshotter_config: Option<&str>,
    ) -> Result<Self> {
        let state = tempfile::Builder::new()
            .prefix(&format!("spry-{name}-"))
            .tempdir_in("/run")?;
        let spry = SpryHandler::new(state.path(), "release", None)?;
        let cold = spry.variant("cold", "template = \"off\"")?;
        let template = spry.variant("template", "template = \"auto\"")?;
        let registry = Registry::start_with_images(images)?;
        let opts = ContainerdOptions::new(name).registry(&registry);
        let opts = spry.register_variant(opts, "spry-cold", &cold);
        let opts = spry.register_variant(opts, "spry-template", &template);
        // The warm pool's table goes after the harness's [vm] table.
        let pool = spry.variant("pool", "template = \"auto\"")?;
        let text = std::fs::read_to_string(&pool)?;
        std::fs::write(&pool, format!("{text}[pool]\nsize = {POOL_SIZE}\n"))?;
        let opts = spry.register_variant(opts, "spry-pool", &pool);
        let snapshotter = snapshotter_config.map(Snapshotter::start).transpose()?;
        let opts = match &snapshotter {
            Some(s) => opts
                .snapshotter("spry")
                .extra_toml(&proxy_snapshotter_toml("spry", &s.socket())),
            None => opts,
        };
        let containerd = Containerd::start(spry.register(opts))?;
        Ok(Self {
            containerd,
            snapshotter,
            registry,
            state,
        })
    }
}

impl BenchNode {
    /// Ends the `spry-pool` handler's spare shims and their VMs (they outlive pods).
    pub fn drain_pool(&self) -> Result<usize> {
        crate::spry::drain_pool(&self.state.path().join("run"))
    }
}

/// The warm pool of the benchmarks' `spry-pool` handler.
pub const POOL_SIZE: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 95.0), 5.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(round(-0.04), 0.0);
        assert_eq!(round2(1.234), 1.23);
    }
}
