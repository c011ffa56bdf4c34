//! Lazy pulling end to end: containerd 2.x with `spry-snapshotter` as a proxy
//! snapshotter, crictl and runc, against a real docker-registry. Needs root,
//! the Go-built tools (scripts/install-deps.sh), the test images
//! (scripts/build-test-images.sh) and `cargo build -p spry-snapshotter`.

use std::path::Path;
use std::time::{Duration, Instant};

mod lazy_pull_support;
#[path = "lazy_pull/recorded_prefetch.rs"]
mod recorded_prefetch;
#[path = "lazy_pull/vm_trees.rs"]
mod vm_trees;
use lazy_pull_support::{
    convert, convert_layout, push_layout, push_layout_dir, CountingProxy, Snapshotter,
};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::containerd_config::proxy_snapshotter_toml;
use spry_integration::{
    require_root, ContainerConfig, Containerd, ContainerdOptions, Crictl, PodConfig, Registry,
};

/// Lists every file of the root filesystem with its metadata and checksum.
/// Directory mtimes are left out: runc creates mount points in them.
const TREE_SCRIPT: &str = "cat /spry/hello.txt; \
    X='! -path /etc/hostname ! -path /etc/hosts ! -path /etc/resolv.conf ! -path /dev/termination-log'; \
    find / -xdev -mindepth 1 $X ! -type d -exec stat -c '%n %a %u %g %s %F %Y' {} + | sort; \
    find / -xdev -mindepth 1 -type d -exec stat -c '%n %a %u %g %F' {} + | sort; \
    find / -xdev -type f $X -exec sha256sum {} + | sort; \
    find / -xdev -type l -exec readlink {} + | sort | uniq -c";

// Fields drop in this order: pods and containerd first, the registry last.
struct Cluster {
    containerd: Containerd,
    snapshotter: Snapshotter,
    proxy: CountingProxy,
    registry: Registry,
    _storage: tempfile::TempDir,
}

fn cluster(name: &str, snapshotter_config: &str) -> Result<Cluster> {
    cluster_with(name, snapshotter_config, Ok)
}

fn cluster_with(
    name: &str,
    snapshotter_config: &str,
    customize: impl FnOnce(ContainerdOptions) -> Result<ContainerdOptions>,
) -> Result<Cluster> {
    require_root()?;
    let storage = tempfile::Builder::new()
        .prefix("spry-lazy-reg-")
        .tempdir_in("/var/tmp")?;
    let registry = Registry::start_with_storage(storage.path())?;
    push_layout(&registry, "pause")?;
    let proxy = CountingProxy::start(registry.addr())?;
    let hosts = format!(
        "[registry.hosts.{:?}]\ninsecure = true\nendpoint = {:?}\n",
        registry.host(),
        proxy.addr
    );
    let snapshotter = Snapshotter::start(&format!("{snapshotter_config}\n{hosts}"))?;
    let containerd = Containerd::start(customize(
        ContainerdOptions::new(name)
            .registry(&registry)
            .snapshotter("spry")
            .extra_toml(&proxy_snapshotter_toml("spry", &snapshotter.socket())),
    )?)?;
    Ok(Cluster {
        containerd,
        snapshotter,
        proxy,
        registry,
        _storage: storage,
    })
}

/// A cluster whose containerd also runs Spry (`spry`, templates on; `spry-cold`), its
/// snapshotter configured by `snapshotter_config`, with busybox converted to eStargz and
/// pulled. Returns the cluster, Spry's state dir (dropped after it) and the image.
fn spry_lazy_busybox(
    name: &str,
    snapshotter_config: &str,
) -> Result<(Cluster, tempfile::TempDir, String)> {
    spry_lazy_image(name, snapshotter_config, "busybox")
}

/// As [`spry_lazy_busybox`], for the test image `layout` (under `build/images`).
fn spry_lazy_image(
    name: &str,
    snapshotter_config: &str,
    layout: &str,
) -> Result<(Cluster, tempfile::TempDir, String)> {
    let dir = spry_integration::paths::repo_root()
        .join("build/images")
        .join(layout);
    spry_lazy_layout(name, snapshotter_config, &dir, layout)
}

/// As [`spry_lazy_busybox`], for the OCI layout `dir` (tag `1`), pushed as `<image>:1` and
/// converted to `<image>:estargz` (pulled).
fn spry_lazy_layout(
    name: &str,
    snapshotter_config: &str,
    dir: &Path,
    image: &str,
) -> Result<(Cluster, tempfile::TempDir, String)> {
    let spry_state = tempfile::Builder::new()
        .prefix(&format!("spry-{name}-"))
        .tempdir_in("/run")?;
    let spry = spry_integration::SpryHandler::new(spry_state.path(), "debug", None)?;
    let cold = spry.variant("cold", "template = \"off\"")?;
    let c = cluster_with(name, snapshotter_config, |opts| {
        Ok(spry.register_variant(spry.register(opts), "spry-cold", &cold))
    })?;
    push_layout_dir(&c.registry, dir, image)?;
    let lazy = format!("{image}:estargz");
    convert_layout(&c.registry, dir, &lazy, &[])?;
    let lazy = c.registry.image(&lazy);
    c.containerd
        .crictl()
        .with_timeout(Duration::from_secs(180))
        .pull(&lazy)?;
    Ok((c, spry_state, lazy))
}

/// Runs TREE_SCRIPT in a container of `image` inside `pod`; returns its log.
fn run_tree(c: &Cluster, pod: &str, pod_cfg: &Path, name: &str, image: &str) -> Result<String> {
    run_listing(c, pod, pod_cfg, name, image, TREE_SCRIPT)
}

/// Runs the shell `script` in a container of `image` inside `pod`; returns its log.
fn run_listing(
    c: &Cluster,
    pod: &str,
    pod_cfg: &Path,
    name: &str,
    image: &str,
    script: &str,
) -> Result<String> {
    let crictl = c.containerd.crictl();
    let cfg = ContainerConfig::new(name, image)
        .command(&["sh", "-c", script])
        .write_to(&c.containerd.dir())?;
    let id = crictl.create(pod, &cfg, pod_cfg)?;
    crictl.start(&id)?;
    // A whole image's checksums in a VM under TCG (python: ~5,400 files) take a while.
    crictl.wait_container_state(&id, "CONTAINER_EXITED", Duration::from_secs(600))?;
    let logs = crictl.logs(&id)?;
    crictl.rm(&id)?;
    Ok(logs)
}

/// `tree` (a listing by `TREE_SCRIPT`, of the image served as `kind`) is the normal pull's.
fn ensure_same_tree(kind: &str, tree: &str, normal_tree: &str) -> Result<()> {
    ensure!(
        tree.lines().count() > 100,
        "{kind} tree listing too short:\n{tree}"
    );
    if tree != normal_tree {
        let diff: Vec<String> = tree
            .lines()
            .zip(normal_tree.lines())
            .filter(|(a, b)| a != b)
            .take(20)
            .map(|(a, b)| format!("{kind}: {a}\nnormal: {b}"))
            .collect();
        bail!(
            "{kind} tree differs from the normal pull:\n{}",
            diff.join("\n")
        );
    }
    Ok(())
}

#[test]
fn estargz_busybox_starts_lazily_and_matches_the_normal_pull() -> Result<()> {
    let c = cluster(
        "lazy-busybox",
        "[lazy]\nbackground_fetch = false\nprefetch = false\n",
    )?;
    push_layout(&c.registry, "busybox")?;
    let converted = convert(&c.registry, "busybox", &[])?;
    let layer_size = converted["layers"][0]["size"]
        .as_u64()
        .context("no layer size")?;

    let crictl = c.containerd.crictl();
    let lazy_image = c.registry.image("busybox:estargz");
    crictl.pull(&lazy_image)?;
    let pod_cfg = PodConfig::new("lazy").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let cfg = ContainerConfig::new("hello", &lazy_image)
        .command(&["cat", "/spry/hello.txt"])
        .write_to(&c.containerd.dir())?;
    let hello = crictl.create(&pod, &cfg, &pod_cfg)?;
    let before_start = c.proxy.served();
    eprintln!(
        "{before_start} bytes fetched by the snapshotter before start; layer is {layer_size} bytes"
    );
    let fuse_mounts = c
        .snapshotter
        .mounts_left()
        .iter()
        .filter(|l| l.contains(" - fuse spry:"))
        .count();
    ensure!(
        fuse_mounts == 1 && before_start > 0,
        "the layer was not mounted lazily ({fuse_mounts} FUSE mounts, {before_start} bytes fetched); snapshotter log:\n{}",
        c.snapshotter.log()
    );
    ensure!(
        before_start * 10 < layer_size,
        "pull+create fetched {before_start} of {layer_size} bytes: not lazy; snapshotter log:\n{}",
        c.snapshotter.log()
    );
    crictl.start(&hello)?;
    crictl.wait_container_state(&hello, "CONTAINER_EXITED", Duration::from_secs(60))?;
    let out = crictl.logs(&hello)?;
    ensure!(
        out.contains("hello from spry busybox image"),
        "unexpected output: {out}"
    );
    crictl.rm(&hello)?;

    // The whole tree, lazily vs. through the normal-layers (overlayfs) path.
    let lazy_tree = run_tree(&c, &pod, &pod_cfg, "tree-lazy", &lazy_image)?;
    let normal_image = c.registry.image("busybox:1");
    crictl.pull(&normal_image)?;
    let normal_tree = run_tree(&c, &pod, &pod_cfg, "tree-normal", &normal_image)?;
    ensure_same_tree("lazy", &lazy_tree, &normal_tree)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

/// A Spry pod (a microVM) on lazily pulled layers: the shim packs the container's merged
/// rootfs into the VM's disk image, which reads every file through the FUSE layers, so this
/// is correct but not lazy inside the VM (virtio-fs would be).
#[test]
fn a_spry_pod_runs_an_estargz_image_from_the_lazy_snapshotter() -> Result<()> {
    let spry_state = tempfile::Builder::new()
        .prefix("spry-lazy-vm-")
        .tempdir_in("/run")?;
    let spry = spry_integration::SpryHandler::new(spry_state.path(), "debug", None)?;
    let c = cluster_with(
        "lazy-spry",
        "[lazy]\nbackground_fetch = false\nprefetch = false\n",
        |opts| Ok(spry.register(opts)),
    )?;
    push_layout(&c.registry, "busybox")?;
    convert(&c.registry, "busybox", &[])?;
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = c.registry.image("busybox:estargz");
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("lazy-vm").write_to(&c.containerd.dir())?;
    let pod = crictl
        .runp(&pod_cfg, Some("spry"))
        .with_context(|| c.containerd.log_tail(40))?;
    let cfg = ContainerConfig::new("hello", &image)
        .command(&["sh", "-c", "cat /spry/hello.txt; uname -r"])
        .write_to(&c.containerd.dir())?;
    let hello = crictl
        .create(&pod, &cfg, &pod_cfg)
        .with_context(|| c.containerd.log_tail(40))?;
    crictl.start(&hello)?;
    crictl.wait_container_state(&hello, "CONTAINER_EXITED", Duration::from_secs(120))?;
    let out = crictl.logs(&hello)?;
    ensure!(
        out.contains("hello from spry busybox image") && out.contains("6.1.0-56-cloud-amd64"),
        "not the image's file in the guest: {out}"
    );
    crictl.rm(&hello)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

/// Waits until `container`'s `sleep` is asleep in the kernel. Start returns once the init
/// is told to exec, not when its binary is loaded: a registry outage before that fails
/// the exec itself (busybox's pages are fetched lazily), not the read under test.
fn wait_until_asleep(crictl: &Crictl, container: &str) -> Result<()> {
    let started = Instant::now();
    // The pod shares one PID namespace (PID 1 is pause, or the agent in a VM): look at
    // every process. A stat line reads "PID (comm) STATE ...": the comm is set by the
    // exec, and S only once the process sleeps.
    let stats = ["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null; true"];
    loop {
        let out = crictl.exec_sync(container, &stats, Duration::from_secs(60))?;
        if out.stdout.contains(" (sleep) S ") {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the container's sleep never went to sleep: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// With the registry unreachable, `cat` of a file not fetched yet in `container` fails
/// with EIO within `limit`; once it is back the same read works. Returns how long the
/// failing read took.
fn outage_gives_eio_then_recovers(
    c: &Cluster,
    container: &str,
    limit: Duration,
) -> Result<Duration> {
    let crictl = c.containerd.crictl();
    wait_until_asleep(&crictl, container)?;
    c.proxy.set_down(true);
    let started = Instant::now();
    let out = crictl.exec_sync(container, &["cat", "/spry/hello.txt"], limit * 2);
    let took = started.elapsed();
    c.proxy.set_down(false);
    let out = out?;
    ensure!(
        out.code != 0
            && out.stderr.contains("Input/output error")
            && out.stderr.contains("cat: read error"),
        "read during the outage: {out:?}; the container: {}; layer daemon log:\n{}\n\
         containerd log:\n{}",
        crictl
            .inspect(container)
            .map(|v| v["status"].to_string())
            .unwrap_or_else(|e| format!("{e:#}")),
        c.snapshotter.daemon_logs(),
        c.containerd.log_tail(60)
    );
    ensure!(took < limit, "read during the outage took {took:?}");
    let out = crictl.exec_sync(container, &["cat", "/spry/hello.txt"], limit)?;
    ensure!(
        out.code == 0 && out.stdout.contains("hello from spry"),
        "read after the outage: {out:?}"
    );
    Ok(took)
}

#[test]
fn a_spry_pods_lazy_reads_fail_cleanly_in_an_outage_and_survive_a_snapshotter_restart() -> Result<()>
{
    let (mut c, _spry_state, image) = spry_lazy_busybox(
        "lazy-vm-out",
        "[lazy]\nbackground_fetch = false\nprefetch = false\nvm_images = true\nfetch_attempts = 2\nfetch_backoff_ms = 100\n[registry]\nrequest_timeout_ms = 3000\n",
    )?;
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(180));
    let pod_cfg = PodConfig::new("lazy-vm-out").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let cfg = ContainerConfig::new("sleeper", &image)
        .command(&["sleep", "3600"])
        .write_to(&c.containerd.dir())?;
    let sleeper = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&sleeper)?;
    crictl.wait_container_state(&sleeper, "CONTAINER_RUNNING", Duration::from_secs(60))?;

    let took = outage_gives_eio_then_recovers(&c, &sleeper, Duration::from_secs(60))?;
    eprintln!("a read in the VM failed {took:?} into the outage");

    c.snapshotter.stop()?;
    let out = crictl.exec_sync(&sleeper, &["cat", "/etc/group"], Duration::from_secs(60))?;
    ensure!(
        out.code == 0 && out.stdout.contains("root"),
        "a read with the snapshotter down: {out:?}"
    );
    c.snapshotter.spawn()?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

#[test]
fn running_pods_survive_a_snapshotter_restart_and_registry_outages_give_eio() -> Result<()> {
    let mut c = cluster("lazy-restart", "[lazy]\nbackground_fetch = false\nprefetch = false\nfetch_attempts = 2\nfetch_backoff_ms = 100\n[registry]\nrequest_timeout_ms = 3000\n")?;
    push_layout(&c.registry, "busybox")?;
    convert(&c.registry, "busybox", &[])?;
    let crictl = c.containerd.crictl();
    let image = c.registry.image("busybox:estargz");
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("restart").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let cfg = ContainerConfig::new("sleeper", &image)
        .command(&["sleep", "3600"])
        .write_to(&c.containerd.dir())?;
    let sleeper = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&sleeper)?;
    crictl.wait_container_state(&sleeper, "CONTAINER_RUNNING", Duration::from_secs(60))?;
    ensure!(
        !c.snapshotter.layer_daemons().is_empty(),
        "no layer daemon; log:\n{}",
        c.snapshotter.log()
    );

    // Registry unreachable: a read of a file not fetched yet fails with EIO, boundedly.
    outage_gives_eio_then_recovers(&c, &sleeper, Duration::from_secs(30))?;

    // Snapshotter down: with the kernel's caches dropped, reads go to the
    // layer daemon, which keeps serving the running container.
    c.snapshotter.stop()?;
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    let out = crictl.exec_sync(
        &sleeper,
        &["sh", "-c", "cat /spry/hello.txt && ls /bin | wc -l"],
        Duration::from_secs(30),
    )?;
    ensure!(
        out.code == 0 && out.stdout.contains("hello from spry"),
        "read with the snapshotter down failed: {out:?}"
    );
    c.snapshotter.spawn()?;
    let cfg = ContainerConfig::new("after-restart", &image)
        .command(&["cat", "/etc/group"])
        .write_to(&c.containerd.dir())?;
    // containerd reconnects to the proxy plugin with gRPC backoff; retry like kubelet does.
    let started = Instant::now();
    let after = loop {
        match crictl.create(&pod, &cfg, &pod_cfg) {
            Ok(id) => break id,
            Err(e)
                if started.elapsed() < Duration::from_secs(60)
                    && format!("{e:#}").contains("Unavailable") =>
            {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    crictl.start(&after)?;
    crictl.wait_container_state(&after, "CONTAINER_EXITED", Duration::from_secs(60))?;
    ensure!(
        crictl.logs(&after)?.contains("root"),
        "container after restart printed: {}",
        crictl.logs(&after)?
    );
    let logs = c.snapshotter.daemon_logs();
    ensure!(
        logs.contains("read failed"),
        "the EIO was not logged:\n{logs}"
    );

    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

/// Runs `cat /spry/hello.txt` of `image` in `pod` to its end; checks what it printed and
/// returns the container's id.
fn run_hello(c: &Cluster, pod: &str, pod_cfg: &Path, image: &str) -> Result<String> {
    let crictl = c.containerd.crictl();
    let cfg = ContainerConfig::new("hello", image)
        .command(&["cat", "/spry/hello.txt"])
        .write_to(&c.containerd.dir())?;
    let id = crictl.create(pod, &cfg, pod_cfg)?;
    crictl.start(&id)?;
    crictl.wait_container_state(&id, "CONTAINER_EXITED", Duration::from_secs(60))?;
    let logs = crictl.logs(&id)?;
    ensure!(
        logs.contains("hello from spry"),
        "unexpected output: {logs}"
    );
    Ok(id)
}

#[test]
fn a_warmed_image_starts_without_fetching_file_contents() -> Result<()> {
    let c = cluster(
        "lazy-warm",
        "[lazy]\nbackground_fetch = false\nprefetch = false\n",
    )?;
    push_layout(&c.registry, "busybox")?;
    let converted = convert(&c.registry, "busybox", &["spry/hello.txt"])?;
    let layer_size = converted["layers"][0]["size"]
        .as_u64()
        .context("no layer size")?;
    let image = c.registry.image("busybox:estargz");
    let warm = std::process::Command::new(lazy_pull_support::snapshotter_bin()?)
        .arg("--config")
        .arg(c.snapshotter.config())
        .args(["warm", "--all", &image])
        .output()?;
    ensure!(
        warm.status.success(),
        "warm failed: {}",
        String::from_utf8_lossy(&warm.stderr)
    );
    let progress = String::from_utf8_lossy(&warm.stderr);
    ensure!(
        progress.contains("(100%)"),
        "no progress output: {progress}"
    );
    let warmed = c.proxy.served();
    ensure!(
        warmed >= layer_size,
        "warm fetched {warmed} bytes of a {layer_size}-byte layer"
    );

    ensure!(
        progress.contains("verified"),
        "warm --all did not verify the layer's diffID: {progress}"
    );

    let crictl = c.containerd.crictl();
    crictl.pull(&image)?;
    // Fully cached and verified: mounted by the kernel from its erofs image, no daemon.
    ensure!(
        !c.snapshotter.native_mounts().is_empty(),
        "the warmed layer was not mounted natively: {:?}",
        c.snapshotter.mounts_left()
    );
    let pod_cfg = PodConfig::new("warm").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let id = run_hello(&c, &pod, &pod_cfg, &image)?;
    // Only the footer and the TOC (metadata, not cached) went over the wire again.
    let after = c.proxy.served() - warmed;
    ensure!(
        after < 16 * 1024,
        "the warmed image still fetched {after} bytes"
    );
    crictl.rm(&id)?;
    // The natively mounted layer shows the same tree as the normal pull.
    let native_tree = run_tree(&c, &pod, &pod_cfg, "tree-native", &image)?;
    let normal_image = c.registry.image("busybox:1");
    crictl.pull(&normal_image)?;
    let normal_tree = run_tree(&c, &pod, &pod_cfg, "tree-normal", &normal_image)?;
    ensure_same_tree("native", &native_tree, &normal_tree)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

#[test]
fn a_layer_fetched_in_the_background_is_mounted_natively_for_new_containers() -> Result<()> {
    // The defaults: a layer daemon, prefetch and background fetch, native mounts.
    let mut c = cluster("lazy-switch", "")?;
    push_layout(&c.registry, "busybox")?;
    convert(&c.registry, "busybox", &[])?;
    let image = c.registry.image("busybox:estargz");
    let crictl = c.containerd.crictl();
    crictl.pull(&image)?;
    // The daemon fetches the rest, checks the diffID and stacks the native mount.
    let started = Instant::now();
    while c.snapshotter.native_mounts().is_empty() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        !c.snapshotter.native_mounts().is_empty(),
        "no native mount after the background fetch; daemon log:\n{}",
        c.snapshotter.daemon_logs()
    );
    let pod_cfg = PodConfig::new("switch").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    run_hello(&c, &pod, &pod_cfg, &image)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    // A stopped daemon takes down both of its layer's mounts, the native one first.
    let daemons = c.snapshotter.layer_daemons();
    ensure!(!daemons.is_empty(), "no layer daemon");
    c.snapshotter.stop()?;
    for pid in daemons {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )?;
    }
    let started = Instant::now();
    while !c.snapshotter.layer_daemons().is_empty() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<String> = c
        .snapshotter
        .mounts_left()
        .into_iter()
        .filter(|l| l.contains("/fs "))
        .collect();
    ensure!(
        c.snapshotter.layer_daemons().is_empty() && left.is_empty(),
        "after SIGTERM: daemons {:?}, layer mounts left:\n{}",
        c.snapshotter.layer_daemons(),
        left.join("\n")
    );
    Ok(())
}

#[test]
fn spry_upgrade_warms_a_lazy_image_before_the_old_container_stops() -> Result<()> {
    // The snapshotter fetches nothing by itself: only the warm-up can have fetched the
    // prioritized file before it is read.
    let c = cluster(
        "lazy-upgrade",
        "[lazy]\nbackground_fetch = false\nprefetch = false\n",
    )?;
    push_layout(&c.registry, "busybox")?;
    convert(&c.registry, "busybox", &["spry/hello.txt"])?;
    let crictl = c.containerd.crictl();
    let (old_image, new_image) = (
        c.registry.image("busybox:1"),
        c.registry.image("busybox:estargz"),
    );
    crictl.pull(&old_image)?;
    let pod_cfg = PodConfig::new("lazy-up").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let cfg = ContainerConfig::new("app", &old_image)
        .command(&["sleep", "3600"])
        .write_to(&c.containerd.dir())?;
    let old = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&old)?;

    let out = std::process::Command::new(spry_integration::spry::bin_dir("debug").join("spry"))
        .args(["upgrade", "--pod", &pod, "--container", "app"])
        .args(["--image", &new_image, "--grace", "1s"])
        .arg("--snapshotter-config")
        .arg(c.snapshotter.config())
        .arg("--runtime-endpoint")
        .arg(c.containerd.socket())
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "spry upgrade failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let phases: Vec<&str> = said
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let at = |phase: &str| phases.iter().position(|p| *p == phase);
    ensure!(
        at("pull") < at("warm") && at("warm") < at("stop") && at("warm").is_some(),
        "no warm-up between pull and stop: {said}"
    );
    let new = crictl
        .ps(false)?
        .iter()
        .find(|c| c["podSandboxId"] == pod.as_str() && c["metadata"]["name"] == "app")
        .and_then(|c| c["id"].as_str().map(str::to_owned))
        .context("no running app container after the upgrade")?;
    let before = c.proxy.served();
    let hello = crictl.exec_ok(&new, &["cat", "/spry/hello.txt"])?;
    ensure!(hello.contains("hello from spry"), "read {hello:?}");
    ensure!(
        c.proxy.served() == before,
        "the warmed file was fetched again ({} bytes)",
        c.proxy.served() - before
    );
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}
