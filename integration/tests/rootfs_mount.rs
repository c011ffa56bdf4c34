//! The host side of a Spry container's rootfs: containerd's writable overlay is mounted
//! `volatile` (its unmount at every stop would otherwise sync the node's whole `/var/lib`),
//! and it can be mounted again once the container stopped, as a plain overlay can; a
//! container started in an idle pod gets its writable layer on the disk the shim plugged
//! ahead, what it writes is its own, and its overlay in the guest is volatile too. Needs
//! root, the guest and the test images.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use spry_integration::spry::SpryNode;
use spry_integration::{require_root, ContainerConfig, PodConfig};

#[test]
fn a_containers_overlay_is_volatile_and_can_be_mounted_again_once_it_stopped() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("rootfs-volatile", false)?;
    let leaks = node.leak_check()?;
    let writer = Writer::start(&node)?;

    let started = Instant::now();
    writer.crictl.stop(&writer.id, 10)?;
    eprintln!("the container stopped in {:?}", started.elapsed());
    writer.check_released("the stop")?;

    writer.crictl.rm(&writer.id)?;
    writer.crictl.stopp(&writer.pod)?;
    writer.crictl.rmp(&writer.pod)?;
    leaks.assert_clean()?;
    Ok(())
}

/// While a pod idles, the shim plugs an empty disk into its VM; the next container's
/// writable layer (its image in its own snapshot) goes on it, so the guest finds a disk it
/// has already probed. What that container writes lands in its own image (CRI counts it)
/// and no other container (one started right after it among them) sees it.
#[test]
fn a_container_started_in_an_idle_pod_writes_to_its_own_layer_on_the_disk_plugged_ahead(
) -> Result<()> {
    require_root()?;
    let node = SpryNode::start("rootfs-ahead", false)?;
    let leaks = node.leak_check()?;
    let crictl = node
        .containerd
        .crictl()
        .with_timeout(Duration::from_secs(240));
    let dir = node.containerd.dir();
    let pod_cfg = PodConfig::new("ahead").write_to(&dir)?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let start = |name: &str| -> Result<String> {
        let cfg = ContainerConfig::new(name, &node.image)
            .command(&["sleep", "3600"])
            .write_to(&dir)?;
        let id = crictl.create(&pod, &cfg, &pod_cfg)?;
        crictl.start(&id)?;
        Ok(id)
    };
    let first = start("first")?;
    // Idle well past the shim's wait before it plugs the next disk (100 ms).
    std::thread::sleep(Duration::from_secs(2));
    let second = start("second")?;
    let third = start("third")?;
    let ahead = |id: &str| {
        node.containerd
            .log()
            .lines()
            .any(|l| l.contains("writable layer on the disk plugged ahead") && l.contains(id))
    };
    ensure!(
        ahead(&second),
        "the second container's writable layer was not put on the disk plugged ahead"
    );

    // In the guest too the container's overlay is volatile: its layer dies with it, so
    // the fsync after each copy-up (a flush of the layer's image on the host) buys nothing.
    let mountinfo = crictl.exec_sync(
        &second,
        &["cat", "/proc/self/mountinfo"],
        Duration::from_secs(60),
    )?;
    let guest_options = overlay_options_in(&mountinfo.stdout, Path::new("/"))
        .with_context(|| format!("no overlay at / in the container:\n{}", mountinfo.stdout))?;
    ensure!(
        is_volatile(&guest_options),
        "the container's overlay in the guest is not volatile: {guest_options}"
    );

    let write =
        "dd if=/dev/urandom of=/written bs=1M count=32 conv=fsync 2>/dev/null && md5sum /written";
    let out = crictl.exec_sync(&second, &["sh", "-c", write], Duration::from_secs(120))?;
    ensure!(
        out.code == 0,
        "writing to the rootfs failed: {}",
        out.stderr
    );
    let again = crictl.exec_sync(&second, &["md5sum", "/written"], Duration::from_secs(60))?;
    ensure!(
        again.stdout == out.stdout,
        "the file reads back differently: {} then {}",
        out.stdout,
        again.stdout
    );
    for other in [&first, &third] {
        let seen = crictl.exec_sync(other, &["test", "-e", "/written"], Duration::from_secs(60))?;
        ensure!(
            seen.code != 0,
            "container {other} sees the second one's file"
        );
    }
    // CRI reports the container snapshot's usage (the image is in it), refreshed every
    // few seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let used = crictl.writable_layer_bytes(&second)?;
        if used >= 32 << 20 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "crictl stats shows a writable layer of {used} bytes after writing 32 MiB"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()?;
    Ok(())
}

/// A shim that dies cannot unmount: containerd's `shim delete` must remove the marker.
#[test]
fn a_killed_shims_overlay_can_be_mounted_again() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("rootfs-killed", false)?;
    let leaks = node.leak_check()?;
    let writer = Writer::start(&node)?;

    node.containerd.kill_shim_of(&writer.pod)?;
    // containerd sees the shim go and runs `shim delete` for each of its tasks.
    writer
        .crictl
        .wait_container_state(&writer.id, "CONTAINER_EXITED", Duration::from_secs(60))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while writer.marker.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "DEBUG {}",
        node.containerd
            .log()
            .lines()
            .filter(|l| l.contains("delete")
                || l.contains("cleanup")
                || l.contains("marker")
                || l.contains("dead"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    writer.check_released("the killed shim's cleanup")?;

    writer.crictl.rm(&writer.id)?;
    writer.crictl.stopp(&writer.pod)?;
    writer.crictl.rmp(&writer.pod)?;
    leaks.assert_clean()?;
    Ok(())
}

/// A running Spry container that wrote to its rootfs, and its overlay as mounted.
struct Writer {
    crictl: spry_integration::Crictl,
    pod: String,
    id: String,
    rootfs: PathBuf,
    options: String,
    marker: PathBuf,
}

impl Writer {
    fn start(node: &SpryNode) -> Result<Self> {
        let crictl = node
            .containerd
            .crictl()
            .with_timeout(Duration::from_secs(180));
        let pod_cfg = PodConfig::new("rootfs-volatile").write_to(&node.containerd.dir())?;
        let pod = crictl.runp(&pod_cfg, Some("spry"))?;
        let cfg = ContainerConfig::new("writer", &node.image)
            .command(&["sh", "-c", "echo kept > /written && sleep 3600"])
            .write_to(&node.containerd.dir())?;
        let id = crictl.create(&pod, &cfg, &pod_cfg)?;
        crictl.start(&id)?;
        crictl.wait_container_state(&id, "CONTAINER_RUNNING", Duration::from_secs(60))?;

        let rootfs = node
            .containerd
            .state_dir()
            .join("io.containerd.runtime.v2.task/k8s.io")
            .join(&id)
            .join("rootfs");
        let options = overlay_options(&rootfs)?
            .with_context(|| format!("no overlay mounted at {}", rootfs.display()))?;
        ensure!(
            is_volatile(&options),
            "the rootfs overlay is not volatile: {options}"
        );
        let marker = Path::new(&option(&options, "workdir")?).join("work/incompat/volatile");
        ensure!(
            marker.is_dir(),
            "no volatile marker at {}",
            marker.display()
        );
        Ok(Self {
            crictl,
            pod,
            id,
            rootfs,
            options,
            marker,
        })
    }

    /// After `what`: the rootfs is unmounted, its marker gone, and the snapshot can be
    /// mounted again (what a commit or a diff of the stopped container does).
    fn check_released(&self, what: &str) -> Result<()> {
        ensure!(
            overlay_options(&self.rootfs)?.is_none(),
            "the rootfs is still mounted after {what}"
        );
        ensure!(
            !self.marker.exists(),
            "{what} left the volatile marker {}: the snapshot cannot be mounted again",
            self.marker.display()
        );
        let again = tempfile::tempdir()?;
        let plain: Vec<&str> = ["lowerdir", "upperdir", "workdir"]
            .iter()
            .map(|key| {
                self.options
                    .split(',')
                    .find(|o| o.starts_with(&format!("{key}=")))
            })
            .collect::<Option<_>>()
            .with_context(|| format!("overlay options without a layer dir: {}", self.options))?;
        nix::mount::mount(
            Some("overlay"),
            again.path(),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(plain.join(",").as_str()),
        )
        .with_context(|| format!("mounting the snapshot again after {what}"))?;
        let listed = std::fs::read_dir(again.path()).map(|d| d.count());
        nix::mount::umount2(again.path(), nix::mount::MntFlags::MNT_DETACH)?;
        ensure!(
            listed? > 0,
            "the snapshot mounted again after {what} is empty"
        );
        Ok(())
    }
}

/// The super options of the overlay mounted at `target`, if one is.
fn overlay_options(target: &Path) -> Result<Option<String>> {
    let target = target
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(target));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(overlay_options_in(&mountinfo, &target))
}

/// The super options of the overlay at `target` in a mountinfo text (this process's, or
/// a container's read in the guest).
fn overlay_options_in(mountinfo: &str, target: &Path) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        let mut right = right.split(' ');
        let (fstype, _source, options) = (right.next()?, right.next()?, right.next()?);
        (fstype == "overlay" && Path::new(mount_point) == target).then(|| options.to_string())
    })
}

/// Whether overlay super options say `volatile` (newer kernels show `fsync=volatile`).
fn is_volatile(options: &str) -> bool {
    options
        .split(',')
        .any(|o| o == "volatile" || o == "fsync=volatile")
}

fn option(options: &str, key: &str) -> Result<String> {
    options
        .split(',')
        .find_map(|o| o.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .with_context(|| format!("no {key} in {options}"))
}
