//! A guest that never answers (issue 17's fault list): the kernel boots, but its /init
//! never starts the agent. A pod of it, cold or through a template handler (whose build
//! fails the same way, so the pod falls back to a cold boot), fails its runp within the
//! configured boot timeout, saying that the agent did not answer, and leaves nothing: no
//! QEMU, no mount, no netns, no state. Needs root, the guest and the test images.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::spry::watch_pod_state;
use spry_integration::{
    require_root, Containerd, ContainerdOptions, PodConfig, Registry, SpryHandler,
};
use spry_shim::assets::cpio::CpioArchive;

/// The boot timeout of the silent handlers: short, so the test does not wait a minute.
const BOOT_TIMEOUT_S: u64 = 8;

/// An initramfs whose /init sleeps forever: busybox-static (the host's) and a script.
fn silent_initramfs(path: &std::path::Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .context("busybox-static missing (scripts/install-deps.sh installs it)")?;
    let mut archive = CpioArchive::new();
    archive.add_parents("bin/busybox")?;
    archive.add_file("bin/busybox", 0o755, std::fs::read(busybox)?)?;
    archive.add_file(
        "init",
        0o755,
        b"#!/bin/busybox sh\n# A guest that boots and never answers the host.\nexec /bin/busybox sleep 1000000\n".to_vec(),
    )?;
    std::fs::write(path, archive.to_bytes()?)?;
    Ok(())
}

#[test]
fn a_guest_that_never_answers_fails_runp_in_time_and_leaves_nothing() -> Result<()> {
    require_root()?;
    // The sandbox (pause) image's registry.
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-silent-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    let initramfs = state.path().join("silent-initramfs.img");
    silent_initramfs(&initramfs)?;
    // The harness's config ends in its [vm] table: the silent guest's keys go there.
    let base = std::fs::read_to_string(state.path().join("config.toml"))?;
    let silent_vm = format!(
        "initramfs = \"{}\"\nboot_timeout_s = {BOOT_TIMEOUT_S}\n",
        initramfs.display()
    );
    let mut opts = ContainerdOptions::new("spry-silent").registry(&registry);
    for (handler, top) in [
        ("spry-silent-cold", "template = \"off\"\n"),
        ("spry-silent", ""),
    ] {
        let config = state.path().join(format!("{handler}.toml"));
        // Top-level keys first: the harness's text begins with them, before its [vm].
        let (top_level, vm) = base.split_once("[vm]\n").context("no [vm] in the config")?;
        let vm = vm
            .lines()
            .filter(|l| !l.starts_with("initramfs"))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&config, format!("{top}{top_level}[vm]\n{vm}\n{silent_vm}"))?;
        opts = spry.register_variant(opts, handler, &config);
    }
    let containerd = Containerd::start(opts)?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    for handler in ["spry-silent-cold", "spry-silent"] {
        let pod_cfg = PodConfig::new(handler).write_to(&containerd.dir())?;
        let t0 = Instant::now();
        let Err(err) = crictl.runp(&pod_cfg, Some(handler)) else {
            bail!("a pod of the silent guest ({handler}) started");
        };
        let took = t0.elapsed();
        let err = format!("{err:#}");
        eprintln!("{handler}: runp failed in {took:?}: {err}");
        let says = format!("the agent did not answer within {BOOT_TIMEOUT_S}s");
        ensure!(
            err.contains(&says),
            "{handler}: the error does not say {says:?}: {err}"
        );
        // A template handler first tries (and fails) to build its template, then boots
        // cold: two boot timeouts, plus QEMU's start and stop.
        let limit = Duration::from_secs(2 * BOOT_TIMEOUT_S + 40);
        ensure!(
            took < limit,
            "{handler}: runp took {took:?}, past {limit:?} for a {BOOT_TIMEOUT_S} s boot timeout"
        );
        leaks
            .assert_clean()
            .with_context(|| format!("after the failed runp of {handler}"))?;
    }
    Ok(())
}
