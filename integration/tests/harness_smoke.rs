//! Proves the harness and the Go-built tools: a local registry, containerd 2.x with runc, crictl pulling
//! busybox from the registry, a pod with a container that echoes, its logs, exec, stats, teardown through
//! CRI, a containerd restart, and no leaks. Needs root, `scripts/install-deps.sh` and
//! `scripts/build-test-images.sh`; fails (never skips) without them.

use anyhow::{ensure, Context, Result};
use spry_integration::{
    require_root, ContainerConfig, Containerd, ContainerdOptions, PodConfig, Registry,
};
use std::time::{Duration, Instant};

#[test]
fn runc_pod_lifecycle_through_crictl() -> Result<()> {
    require_root()?;
    let t0 = Instant::now();
    let registry = Registry::start()?;
    let mut containerd = Containerd::start(ContainerdOptions::new("smoke").registry(&registry))?;
    let leaks = containerd.leak_check()?;
    let crictl = containerd.crictl();
    eprintln!("registry + containerd up in {:?}", t0.elapsed());

    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    ensure!(
        crictl
            .images()?
            .iter()
            .any(|i| i["repoTags"].to_string().contains(&image)),
        "pulled image {image} not listed by crictl images"
    );

    let pod_cfg = PodConfig::new("smoke").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let pod_info = crictl.inspectp(&pod)?;
    ensure!(
        pod_info["status"]["state"] == "SANDBOX_READY",
        "pod not ready: {}",
        pod_info["status"]
    );
    let pod_ip = pod_info["status"]["network"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        pod_ip.starts_with("10."),
        "pod has no IP from our CNI network: {}",
        pod_info["status"]["network"]
    );

    // A container that prints and exits, then one that stays up for exec and stats.
    let echo_cfg = ContainerConfig::new("echo", &image)
        .command(&[
            "sh",
            "-c",
            "echo hello from $GREETING; cat /spry/hello.txt; echo oops >&2",
        ])
        .env("GREETING", "spry-smoke")
        .write_to(&containerd.dir())?;
    let echo = crictl.create(&pod, &echo_cfg, &pod_cfg)?;
    crictl.start(&echo)?;
    let exited = crictl.wait_container_state(&echo, "CONTAINER_EXITED", Duration::from_secs(30))?;
    ensure!(
        exited["status"]["exitCode"] == 0,
        "echo container failed: {}",
        exited["status"]
    );
    let logs = crictl.logs(&echo)?;
    for expected in [
        "hello from spry-smoke",
        "hello from spry busybox image",
        "oops",
    ] {
        ensure!(logs.contains(expected), "logs lack {expected:?}: {logs:?}");
    }

    let sleeper_cfg = ContainerConfig::new("sleeper", &image)
        .command(&["sleep", "3600"])
        .write_to(&containerd.dir())?;
    let sleeper = crictl.create(&pod, &sleeper_cfg, &pod_cfg)?;
    crictl.start(&sleeper)?;
    crictl.wait_container_state(&sleeper, "CONTAINER_RUNNING", Duration::from_secs(30))?;
    let out = crictl.exec(&sleeper, &["sh", "-c", "hostname; exit 3"])?;
    ensure!(
        out.code == 3 && out.stdout.trim() == "smoke",
        "exec: {out:?}"
    );
    let out = crictl.exec_sync(&sleeper, &["cat", "/etc/passwd"], Duration::from_secs(10))?;
    ensure!(
        out.code == 0 && out.stdout.starts_with("root:x:0:0"),
        "exec --sync: {out:?}"
    );
    let stats = crictl.stats(&sleeper)?;
    ensure!(
        stats["attributes"]["id"] == sleeper.as_str(),
        "stats for the wrong container: {stats}"
    );
    ensure!(
        crictl.ps(false)?.len() == 1,
        "expected exactly the sleeper running"
    );

    // containerd restart: the running container survives and is still managed.
    let shim_pids_before = shim_pids(&containerd)?;
    containerd.restart()?;
    ensure!(
        crictl.container_state(&sleeper)? == "CONTAINER_RUNNING",
        "sleeper lost across restart"
    );
    ensure!(
        shim_pids(&containerd)? == shim_pids_before,
        "shims changed across containerd restart"
    );

    crictl.stop(&sleeper, 2)?;
    crictl.rm(&sleeper)?;
    crictl.rm(&echo)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    ensure!(crictl.pods()?.is_empty(), "pods left after rmp");
    leaks
        .assert_clean()
        .context("after removing the pod through CRI")?;

    // Full teardown leaves nothing either: no containerd dirs, mounts, shims or bridge.
    let host_wide = spry_integration::LeakCheck::capture(containerd.leak_scope())?;
    let (dir, bridge) = (containerd.dir(), containerd.bridge().to_string());
    containerd.cleanup()?;
    ensure!(!dir.exists(), "{} survived cleanup", dir.display());
    ensure!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists(),
        "bridge {bridge} survived cleanup"
    );
    host_wide.assert_clean()?;
    eprintln!("smoke test done in {:?}", t0.elapsed());
    Ok(())
}

fn shim_pids(containerd: &Containerd) -> Result<Vec<i32>> {
    let mut pids: Vec<i32> = containerd.shims()?.into_iter().map(|p| p.pid).collect();
    pids.sort();
    ensure!(
        !pids.is_empty(),
        "no shim of this containerd found (marker {})",
        containerd.marker()
    );
    Ok(pids)
}

/// The leak check is not vacuous: a pod left running shows up (its shim and its mounts), and disappears
/// once the pod is removed.
#[test]
fn leak_check_reports_a_pod_left_running() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(ContainerdOptions::new("leaky").registry(&registry))?;
    let leaks = containerd.leak_check()?.settle(Duration::from_secs(2));
    let crictl = containerd.crictl();
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("leaky").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let ctr_cfg = ContainerConfig::new("sleeper", &image)
        .command(&["sleep", "3600"])
        .write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    crictl.start(&ctr)?;

    let found = leaks.leaks()?;
    ensure!(
        found
            .iter()
            .any(|l| l.starts_with("process") && l.contains("containerd-shim-runc-v2")),
        "running pod's shim not reported: {found:#?}"
    );
    ensure!(
        found
            .iter()
            .any(|l| l.starts_with("mount") && l.contains("type overlay")),
        "running container's rootfs mount not reported: {found:#?}"
    );
    let err = leaks
        .assert_clean()
        .expect_err("assert_clean passed with a pod running");
    ensure!(err.to_string().contains("leaked after the test"), "{err}");

    crictl.rmp_all_force()?;
    leaks.settle(Duration::from_secs(15)).assert_clean()
}

/// The big debootstrap-based image pulls, unpacks (3 layers) and runs python.
#[test]
fn python_image_runs() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(ContainerdOptions::new("python").registry(&registry))?;
    let leaks = containerd.leak_check()?;
    let crictl = containerd.crictl();
    let image = registry.image("python:1");
    let t0 = Instant::now();
    crictl.pull(&image)?;
    eprintln!("pulled {image} in {:?}", t0.elapsed());
    let layers = crictl.inspecti(&image)?["info"]["imageSpec"]["rootfs"]["diff_ids"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(
        layers == 3,
        "python image should have 3 layers, has {layers}"
    );
    let pod_cfg = PodConfig::new("python").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let ctr_cfg = ContainerConfig::new("hello", &image).write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    crictl.start(&ctr)?;
    let status = crictl.wait_container_state(&ctr, "CONTAINER_EXITED", Duration::from_secs(60))?;
    let logs = crictl.logs(&ctr)?;
    ensure!(
        status["status"]["exitCode"] == 0,
        "python failed: {}\n{logs}",
        status["status"]
    );
    ensure!(
        logs.contains("hello from spry python image: python 3."),
        "logs: {logs:?}"
    );
    crictl.rmp_all_force()?;
    leaks.assert_clean()
}

/// cri-tools' conformance suite (the 26 specs that can run offline) passes against the harness with
/// runc: the baseline for other runtime handlers.
#[test]
fn critest_offline_conformance_with_runc() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(
        ContainerdOptions::new("critest")
            .registry(&registry)
            .mirror("registry.k8s.io", &registry),
    )?;
    let leaks = containerd.leak_check()?;
    let t0 = Instant::now();
    let out = spry_integration::Critest::offline_conformance().run(&containerd)?;
    let summary = out
        .lines()
        .filter(|l| l.starts_with("Ran ") || l.contains("Passed"))
        .collect::<Vec<_>>();
    eprintln!("critest in {:?}: {summary:?}", t0.elapsed());
    ensure!(
        out.contains("SUCCESS!") && out.contains("0 Failed"),
        "critest did not report success:\n{out}"
    );
    leaks.assert_clean()
}

/// A snapshotter a killed test left behind (its `serve`, its state dir) is ended and
/// removed by the next instance's sweep, as a left containerd is.
#[test]
fn the_sweep_ends_a_snapshotter_whose_test_died() -> Result<()> {
    use spry_integration::stale::{self, InstanceId, INSTANCE_ENV};
    require_root()?;
    // A pid that is gone: a child that exited and was reaped.
    let mut gone = std::process::Command::new("true").spawn()?;
    gone.wait()?;
    let dead = InstanceId::new("snapshotter", 0x5eed_0001);
    let dead = InstanceId {
        pid: gone.id(),
        ..dead
    };
    let parent = spry_integration::paths::harness_dir();
    std::fs::create_dir_all(&parent)?;
    let dir = parent.join(format!("{}-left", dead.id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        spry_integration::snapshotter::Snapshotter::state_config(&dir),
    )?;
    let mut serve = std::process::Command::new(spry_integration::snapshotter::snapshotter_bin()?)
        .args(["--config", &config.display().to_string(), "serve"])
        .env(INSTANCE_ENV, dead.id())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = Instant::now();
    while !dir.join("snapshotter.sock").exists() {
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "serve made no socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cleaned = stale::clean_stale_instances()?;
    // The sweep ended it (reaped here: it is this test's child, not init's).
    let ended = serve.try_wait()?;
    if ended.is_none() {
        serve.kill()?;
        serve.wait()?;
    }
    ensure!(ended.is_some(), "the sweep left the snapshotter running");
    ensure!(
        cleaned.iter().any(|c| c.contains(&dead.id())),
        "the sweep did not name the left instance: {cleaned:?}"
    );
    ensure!(!dir.exists(), "{} is still there", dir.display());
    Ok(())
}
