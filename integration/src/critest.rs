//! Runs the Go-built `critest` (cri-tools' CRI conformance suite) against a harness containerd, offline.
//! Start containerd with [`with_critest_mirrors`]: the images critest pulls from `registry.k8s.io` and
//! `gcr.io` are then served by the local registry, where `scripts/build-test-images.sh` pushed our builds
//! under upstream's names (busybox always; the rest with `--only critest`, see
//! scripts/lib/critest-images.sh). (critest's own `--registry-prefix` is not used: v1.34 pulls the
//! prefixed name without its tag but creates containers from the unprefixed one.)

use crate::containerd::{Containerd, ContainerdOptions};
use crate::registry::Registry;
use crate::{paths, require};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The registries critest pulls from, mirrored to `registry` (which must hold the critest images for
/// the full suite: `scripts/build-test-images.sh --only critest`).
pub fn with_critest_mirrors(opts: ContainerdOptions, registry: &Registry) -> ContainerdOptions {
    opts.mirror("registry.k8s.io", registry)
        .mirror("gcr.io", registry)
}

/// Every spec critest has (its default when no focus is given).
pub const ALL_FOCUS: &str = ".";

/// critest's conformance specs...
pub const CONFORMANCE_FOCUS: &str = "Conformance";
/// ...minus those that need the critest images beyond busybox (nginx, the image-manager and user test
/// images; built only for scripts/critest.sh, which runs the full suite), and `execSync with timeout`
/// (its process check does not hold with busybox's `ps`). With runc this leaves 26 specs that pass: a
/// quick baseline for the test command.
pub const OFFLINE_SKIP: &str =
    "port mapping|Image Manager|Multiple Containers|portforward|execSync with timeout";

#[derive(Debug, Clone)]
pub struct Critest {
    pub focus: String,
    pub skip: Option<String>,
    /// CRI runtime handler (`--runtime-handler`), e.g. `spry`; None = containerd's default.
    pub runtime_handler: Option<String>,
}

impl Critest {
    pub fn new(focus: &str) -> Self {
        Critest {
            focus: focus.to_string(),
            skip: None,
            runtime_handler: None,
        }
    }

    /// The whole suite; needs the critest images ([`with_critest_mirrors`]).
    pub fn full() -> Self {
        Critest::new(ALL_FOCUS)
    }

    /// Every conformance spec that can run offline ([`CONFORMANCE_FOCUS`] minus [`OFFLINE_SKIP`]).
    pub fn offline_conformance() -> Self {
        Critest::new(CONFORMANCE_FOCUS).skip(OFFLINE_SKIP)
    }

    pub fn skip(mut self, skip: &str) -> Self {
        self.skip = Some(skip.to_string());
        self
    }

    pub fn runtime_handler(mut self, handler: &str) -> Self {
        self.runtime_handler = Some(handler.to_string());
        self
    }

    /// Runs the suite and returns whether critest succeeded, with its whole output.
    pub fn output(&self, containerd: &Containerd) -> Result<(bool, String)> {
        let bin = require::require_tool(&critest_bin())?;
        let endpoint = format!("unix://{}", containerd.socket().display());
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--runtime-endpoint={endpoint}"))
            .arg(format!("--image-endpoint={endpoint}"))
            .arg(format!("--ginkgo.focus={}", self.focus))
            .arg("--ginkgo.no-color");
        if let Some(skip) = &self.skip {
            cmd.arg(format!("--ginkgo.skip={skip}"));
        }
        if let Some(handler) = &self.runtime_handler {
            cmd.arg(format!("--runtime-handler={handler}"));
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !text.contains("Ran ") || text.contains("Ran 0 of") {
            bail!(
                "critest ran no spec for focus {:?}:\n{}",
                self.focus,
                tail(&text, 40)
            );
        }
        Ok((out.status.success(), text))
    }

    /// Runs the suite; fails with critest's output unless every focused spec passed. Returns the output.
    pub fn run(&self, containerd: &Containerd) -> Result<String> {
        let (ok, text) = self.output(containerd)?;
        if !ok {
            bail!("critest failed:\n{}", tail(&text, 120));
        }
        Ok(text)
    }
}

/// Pass/fail counts and failing spec names from critest's (ginkgo's) output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CritestSummary {
    pub passed: u32,
    pub failed: u32,
    pub failures: Vec<String>,
}

impl CritestSummary {
    /// Reads ginkgo's `N Passed | M Failed` line and its `[FAIL]` lines.
    pub fn parse(output: &str) -> Self {
        let count = |line: &str, word: &str| -> Option<u32> {
            let before = line.split(word).next()?;
            before
                .split(|c: char| !c.is_ascii_digit())
                .rfind(|s| !s.is_empty())?
                .parse()
                .ok()
        };
        let mut summary = CritestSummary::default();
        if let Some(line) = output.lines().rev().find(|l| l.contains(" Passed |")) {
            summary.passed = count(line, " Passed").unwrap_or(0);
            summary.failed = count(line, " Failed").unwrap_or(0);
        }
        let mut failures: Vec<String> = output
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("[FAIL]"))
            .map(|l| l.trim_start_matches("[FAIL]").trim().to_string())
            .collect();
        failures.sort();
        failures.dedup();
        summary.failures = failures;
        summary
    }
}

/// Runs every spec (or those `focus` matches) with the CRI runtime handler `handler`
/// (`runc`: containerd's default), prints the counts and failures, and returns the summary
/// with critest's output.
pub fn run_with_handler(
    containerd: &Containerd,
    handler: &str,
    focus: Option<&str>,
) -> Result<(CritestSummary, String)> {
    let mut critest = Critest::full();
    if let Some(focus) = focus {
        critest.focus = focus.to_string();
    }
    if handler != "runc" {
        critest = critest.runtime_handler(handler);
    }
    let t0 = std::time::Instant::now();
    let (_, output) = critest
        .output(containerd)
        .with_context(|| format!("critest with {handler}"))?;
    let summary = CritestSummary::parse(&output);
    println!(
        "{handler}: {} passed, {} failed ({:.0} s)",
        summary.passed,
        summary.failed,
        t0.elapsed().as_secs_f64()
    );
    for name in &summary.failures {
        println!("  FAIL {name}");
    }
    Ok((summary, output))
}

/// The specs a VM runtime fails by design (Kata fails them too): they need the host's own
/// network or IPC namespace inside the pod, or a mount made inside the container to appear
/// on the host (`rshared`). Matched against the failures' text.
pub const VM_BY_DESIGN: &[&str] = &[
    "runtime should support HostIpc is true",
    "runtime should support HostNetwork is true",
    "runtime should support portforward in host network",
    "mount with 'rshared' should support propagation from host to container and vice versa",
];

/// Whether a failure (as [`CritestSummary`] lists it) is one of [`VM_BY_DESIGN`].
pub fn failed_by_design(failure: &str) -> bool {
    VM_BY_DESIGN.iter().any(|spec| failure.ends_with(spec))
}

/// A ginkgo focus that matches exactly the specs of `failures` (their leaf text, after
/// ginkgo's `[It] ` marker, regex-escaped).
pub fn focus_on(failures: &[String]) -> String {
    let leaf = |f: &String| f.rsplit("[It] ").next().unwrap_or(f).to_string();
    let escaped: Vec<String> = failures
        .iter()
        .map(leaf)
        .map(|text| {
            text.chars()
                .flat_map(|c| {
                    let special = "\\.+*?()|[]{}^$".contains(c);
                    special
                        .then_some('\\')
                        .into_iter()
                        .chain(std::iter::once(c))
                })
                .collect()
        })
        .collect();
    escaped.join("|")
}

pub fn critest_bin() -> PathBuf {
    paths::deps_bin_dir().join("critest")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ginkgo_summaries() {
        let out = "Summarizing 2 Failures:\n  [FAIL] [sig-node] Container runtime should support attach [Conformance]\n  [FAIL] [sig-node] Streaming exec\n\nRan 26 of 80 Specs in 40.1 seconds\nFAIL! -- 24 Passed | 2 Failed | 0 Pending | 54 Skipped\n";
        let s = CritestSummary::parse(out);
        assert_eq!((s.passed, s.failed), (24, 2));
        assert_eq!(s.failures.len(), 2);
        let ok = CritestSummary::parse("SUCCESS! -- 26 Passed | 0 Failed | 0 Pending | 54 Skipped");
        assert_eq!((ok.passed, ok.failed), (26, 0));
    }

    #[test]
    fn failures_are_refocused_by_their_leaf_text_and_by_design_ones_known() {
        let failures = vec![
            "[k8s.io] Security Context NamespaceOption [It] runtime should support HostIpc is true".to_string(),
            "[k8s.io] Image Manager [It] public image with digest should be pulled (and removed) [Conformance]".to_string(),
        ];
        assert_eq!(
            focus_on(&failures),
            "runtime should support HostIpc is true|public image with digest should be pulled \\(and removed\\) \\[Conformance\\]"
        );
        assert!(failed_by_design(&failures[0]));
        assert!(!failed_by_design(&failures[1]));
    }
}
