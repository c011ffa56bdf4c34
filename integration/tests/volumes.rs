//! Pod volumes through stock containerd 2.x and crictl: host directories and files bound
//! into a Spry pod are live both ways (the pod's file share), read-only ones stay
//! read-only, a symlinked source works, two containers share a directory and the pod's
//! /dev/shm, in cold and template pods, and nothing (server, mounts, share dirs) outlives
//! the pod. Needs root, scripts/install-deps.sh,
//! scripts/build-guest.sh and scripts/build-test-images.sh; fails (never skips) without them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::{
    require_root, spry::SpryNode, ContainerConfig, Containerd, Crictl, PodConfig,
};

/// Host-side volume sources of one pod, as kubelet would lay them out.
struct HostVolumes {
    data: std::path::PathBuf,
    readonly: std::path::PathBuf,
    file: std::path::PathBuf,
    link: std::path::PathBuf,
}

fn host_volumes(root: &Path, pod: &str) -> Result<HostVolumes> {
    let base = root.join(pod);
    let data = base.join("data");
    let readonly = base.join("readonly");
    let target = base.join("link-target");
    for dir in [&data, &readonly, &target] {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(data.join("from-host"), "host says hi\n")?;
    std::fs::write(readonly.join("config"), "read me\n")?;
    std::fs::write(target.join("through-link"), "linked\n")?;
    let file = base.join("single-file");
    std::fs::write(&file, "one file\n")?;
    let link = base.join("link");
    std::os::unix::fs::symlink(&target, &link)?;
    Ok(HostVolumes {
        data,
        readonly,
        file,
        link,
    })
}

fn run(crictl: &Crictl, container: &str, argv: &[&str]) -> Result<String> {
    crictl.exec_ok(container, argv)
}

/// Waits up to `limit` for `argv` to print `want` in the container.
fn wait_for_output(
    crictl: &Crictl,
    container: &str,
    argv: &[&str],
    want: &str,
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let out = crictl.exec_sync(container, argv, Duration::from_secs(30))?;
        if out.code == 0 && out.stdout.trim() == want {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!(
                "{argv:?} printed {:?} / {:?} after {limit:?}, not {want:?}",
                out.stdout,
                out.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_pod(
    containerd: &Containerd,
    crictl: &Crictl,
    image: &str,
    runtime: &str,
    sources: &Path,
    state: &Path,
) -> Result<()> {
    let name = format!("vol-{runtime}");
    let host = host_volumes(sources, &name)?;
    let pod_cfg = PodConfig::new(&name).write_to(&containerd.dir())?;
    let pod = crictl
        .runp(&pod_cfg, Some(runtime))
        .with_context(|| format!("runp {name}: {}", containerd.log_tail(30)))?;
    let config = |ctr: &str| {
        ContainerConfig::new(&format!("{name}-{ctr}"), image)
            .command(&["sleep", "3600"])
            .mount(&host.data, "/data", false)
            .mount(&host.readonly, "/config", true)
            .mount(&host.file, "/etc/one-file", false)
            .mount(&host.link, "/linked", false)
            .write_to(&containerd.dir())
    };
    let a = crictl.create(&pod, &config("a")?, &pod_cfg)?;
    crictl.start(&a).with_context(|| console_tails(state))?;
    let b = crictl.create(&pod, &config("b")?, &pod_cfg)?;
    crictl.start(&b)?;

    // Host → guest, at start and live.
    ensure!(run(crictl, &a, &["cat", "/data/from-host"])? == "host says hi");
    ensure!(run(crictl, &a, &["cat", "/config/config"])? == "read me");
    ensure!(run(crictl, &a, &["cat", "/etc/one-file"])? == "one file");
    ensure!(run(crictl, &a, &["cat", "/linked/through-link"])? == "linked");
    std::fs::write(host.data.join("later"), "written later\n")?;
    let seen = wait_for_output(
        crictl,
        &a,
        &["cat", "/data/later"],
        "written later",
        Duration::from_secs(5),
    )?;
    std::fs::write(&host.file, "one file, changed\n")?;
    wait_for_output(
        crictl,
        &a,
        &["cat", "/etc/one-file"],
        "one file, changed",
        Duration::from_secs(5),
    )?;
    eprintln!("{runtime}: a host write showed in the guest after {seen:?}");

    // Guest → host, and container a → container b through the same directory.
    run(
        crictl,
        &a,
        &[
            "sh",
            "-c",
            "echo from a > /data/from-guest && mkdir /data/dir && echo x > /data/dir/f",
        ],
    )?;
    let written = std::fs::read_to_string(host.data.join("from-guest"))?;
    ensure!(written == "from a\n", "host reads {written:?}");
    ensure!(host.data.join("dir/f").is_file());
    ensure!(run(crictl, &b, &["cat", "/data/from-guest"])? == "from a");
    run(crictl, &b, &["rm", "/data/from-guest"])?;
    ensure!(
        !host.data.join("from-guest").exists(),
        "a guest delete did not reach the host"
    );

    // Read-only stays read-only, in the guest and on the host.
    let out = crictl.exec_sync(
        &a,
        &["sh", "-c", "echo no > /config/config"],
        Duration::from_secs(30),
    )?;
    ensure!(out.code != 0, "a write to a read-only volume succeeded");
    ensure!(std::fs::read_to_string(host.readonly.join("config"))? == "read me\n");

    // The pod's /dev/shm: a tmpfs both containers see.
    run(crictl, &a, &["sh", "-c", "echo shared > /dev/shm/seg"])?;
    ensure!(run(crictl, &b, &["cat", "/dev/shm/seg"])? == "shared");
    let df = run(crictl, &b, &["df", "-k", "/dev/shm"])?;
    ensure!(
        df.contains("65536"),
        "/dev/shm is not the 64 MiB pod tmpfs: {df}"
    );

    // (A missing source never reaches the shim through CRI: containerd creates it as a
    // directory. The shim's own refusal is unit-tested in shim/src/volumes/tests.rs.)

    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    // The host data is the user's: the pod's removal must not touch it.
    ensure!(host.data.join("from-host").is_file() && host.data.join("dir/f").is_file());
    Ok(())
}

/// The guest consoles of the test's running VMs, for failures the agent explains there.
fn console_tails(state: &Path) -> String {
    let vms = state.join("run/vms");
    let mut tails = String::new();
    for log in glob_consoles(&vms) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        tails.push_str(&format!("{}:\n{tail}\n", log.display()));
    }
    tails
}

fn glob_consoles(root: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "console.log") {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn host_volumes_are_live_both_ways_in_cold_and_template_pods() -> Result<()> {
    require_root()?;
    let sources = tempfile::Builder::new()
        .prefix("spry-vol-src-")
        .tempdir_in("/var/tmp")?;
    let node = SpryNode::start("spry-vol", true)?;
    let (containerd, image) = (&node.containerd, node.image.clone());
    let state = &node.state;
    let leaks = node.leak_check()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(240));

    check_pod(
        containerd,
        &crictl,
        &image,
        "spry-cold",
        sources.path(),
        state.path(),
    )?;
    check_pod(
        containerd,
        &crictl,
        &image,
        "spry",
        sources.path(),
        state.path(),
    )?;

    // The shim SIGKILLed under a pod whose container holds volumes: the file server dies
    // with it, and `containerd-shim-spry-v2 delete` unmounts and removes the share.
    let host = host_volumes(sources.path(), "vol-killed")?;
    let pod_cfg = PodConfig::new("vol-killed").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let ctr_cfg = ContainerConfig::new("vol-killed-a", &image)
        .command(&["sleep", "3600"])
        .mount(&host.data, "/data", false)
        .mount(&host.readonly, "/config", true)
        .write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    crictl.start(&ctr)?;
    ensure!(run(&crictl, &ctr, &["cat", "/data/from-host"])? == "host says hi");
    // The container goes first: containerd reports only the sandbox task of a dead grouped
    // shim as exited, so an app container would stay "running" in CRI (issue 17). Its
    // volumes leave the share with it; the share itself and its server stay.
    crictl.stop(&ctr, 10)?;
    crictl.rm(&ctr)?;
    containerd.kill_shim_of(&pod)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while spry_integration::system::processes()?.iter().any(|p| {
        p.cmdline_contains("fs-serve") && p.cmdline_contains(&state.path().display().to_string())
    }) {
        ensure!(
            Instant::now() < deadline,
            "the file server outlived its shim"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    crictl.rmp_all_force()?;
    ensure!(
        host.data.join("from-host").is_file(),
        "the user's data is gone"
    );

    let shares = state.path().join("run/shares");
    let left: Vec<_> = std::fs::read_dir(&shares)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "share dirs left behind: {left:?}");
    leaks.assert_clean()?;
    Ok(())
}

/// `Shmem` of /proc/meminfo in the container's VM, in MiB (tmpfs lives there).
fn guest_shmem_mib(crictl: &Crictl, container: &str) -> Result<u64> {
    let meminfo = run(crictl, container, &["cat", "/proc/meminfo"])?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Shmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .context("no Shmem in the guest's /proc/meminfo")
}

#[test]
fn a_gigabyte_written_to_the_rootfs_is_host_disk_not_guest_ram() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-wl", false)?;
    let (containerd, image) = (&node.containerd, node.image.clone());
    let leaks = node.leak_check()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(240));
    let pod_cfg = PodConfig::new("writable").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let ctr_cfg = ContainerConfig::new("writable-a", &image)
        .command(&["sleep", "3600"])
        .write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    crictl.start(&ctr)?;

    let shmem_before = guest_shmem_mib(&crictl, &ctr)?;
    let started = Instant::now();
    let out = crictl.exec_sync(
        &ctr,
        &[
            "dd",
            "if=/dev/zero",
            "of=/big",
            "bs=1M",
            "count=1024",
            "conv=fsync",
        ],
        Duration::from_secs(600),
    )?;
    ensure!(
        out.code == 0,
        "writing 1 GiB to the rootfs failed: {}",
        out.stderr
    );
    eprintln!("1 GiB written to the rootfs in {:?}", started.elapsed());
    let shmem_after = guest_shmem_mib(&crictl, &ctr)?;
    ensure!(
        shmem_after < shmem_before + 64,
        "guest shared memory grew from {shmem_before} to {shmem_after} MiB: the layer is in RAM"
    );
    // CRI reports the container snapshot's usage, refreshed every few seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut used = 0;
    while used < 1 << 30 {
        ensure!(
            Instant::now() < deadline,
            "crictl stats shows a writable layer of {used} bytes after writing 1 GiB"
        );
        std::thread::sleep(Duration::from_secs(2));
        used = crictl.writable_layer_bytes(&ctr)?;
    }
    eprintln!("crictl stats: writable layer {} MiB", used >> 20);
    // Memory stats mean what runc's mean: no limit → no availableBytes (not ~2^64),
    // rssBytes and page faults from the guest cgroup.
    let memory = &crictl.stats(&ctr)?["memory"];
    let number = |key: &str| -> u64 {
        let v = &memory[key]["value"];
        v.as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| v.as_u64())
            .unwrap_or(0)
    };
    ensure!(
        number("availableBytes") == 0,
        "availableBytes {} without a memory limit: {memory}",
        number("availableBytes")
    );
    ensure!(
        number("rssBytes") > 0 && number("pageFaults") > 0,
        "no rssBytes or pageFaults: {memory}"
    );
    // Deleting the file frees the host's blocks again (discard → holes in the image).
    run(&crictl, &ctr, &["sh", "-c", "rm /big && sync"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        used = crictl.writable_layer_bytes(&ctr)?;
        if used < 256 << 20 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the writable layer still uses {used} bytes after the file was deleted"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()?;
    Ok(())
}

/// A configMap laid out by kubelet's atomic writer, updated 100 times on the host: each
/// version reaches the guest within 2 s as one swap (a watcher never reads keys of two
/// versions). The volume is a guest tmpfs, where the agent's swap is one rename of
/// `..data` that inotify reports as under runc (agent/src/volumes/synced.rs tests that;
/// the test image's busybox has no inotifyd).
#[test]
fn configmap_updates_reach_the_guest_atomically_with_inotify() -> Result<()> {
    require_root()?;
    let sources = tempfile::Builder::new()
        .prefix("spry-cm-src-")
        .tempdir_in("/var/tmp")?;
    let node = SpryNode::start("spry-cm", true)?;
    let leaks = node.leak_check()?;
    for runtime in ["spry-cold", "spry"] {
        check_configmap_updates(&node, runtime, &sources.path().join(runtime))?;
    }
    leaks.assert_clean()?;
    Ok(())
}

fn check_configmap_updates(node: &SpryNode, runtime: &str, sources: &Path) -> Result<()> {
    use spry_integration::atomic_writer;
    let (containerd, image) = (&node.containerd, node.image.clone());
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(240));
    let cfg = sources.join("volumes/kubernetes.io~configmap/cfg");
    let out = sources.join("out");
    std::fs::create_dir_all(&out)?;
    atomic_writer::write_version(&cfg, "v0")?;
    let pod_cfg = PodConfig::new(&format!("configmap-{runtime}")).write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some(runtime))?;
    let watcher = ContainerConfig::new(&format!("configmap-watcher-{runtime}"), &image)
        .command(&["sh", "-c", atomic_writer::WATCHER])
        .mount(&cfg, "/cfg", true)
        .mount(&out, "/out", false)
        .write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &watcher, &pod_cfg)?;
    crictl.start(&ctr)?;
    let mounts = run(&crictl, &ctr, &["cat", "/proc/mounts"])?;
    ensure!(
        mounts.lines().any(|l| l.contains(" /cfg tmpfs ")),
        "/cfg is not a guest tmpfs: {mounts}"
    );
    let seen = out.join("seen");
    let wait_for = |value: &str, limit: Duration| -> Result<Duration> {
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&seen).unwrap_or_default();
            if text.lines().any(|l| l == value) {
                return Ok(started.elapsed());
            }
            ensure!(started.elapsed() < limit, "{value} never reached the guest");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    wait_for("v0", Duration::from_secs(60))?;
    let mut latencies = Vec::new();
    for n in 1..=100 {
        let value = format!("v{n}");
        let started = Instant::now();
        atomic_writer::write_version(&cfg, &value)?;
        wait_for(&value, Duration::from_secs(10))?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let (p50, max) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    eprintln!("{runtime}: configMap update → guest: p50 {p50:?}, max {max:?}");
    ensure!(max < Duration::from_secs(2), "an update took {max:?}");
    let text = std::fs::read_to_string(&seen)?;
    ensure!(
        !text.lines().any(|l| l == "torn"),
        "a reader saw two versions at once"
    );
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}
