//! Volumes that live in the guest or are plugged into it, through stock containerd 2.x
//! and crictl, laid out on the host exactly as kubelet does:
//! - emptyDir on disk: one ext4 disk per pod whose image sits in kubelet's emptyDir dir
//!   (so kubelet's usage accounting counts it), shared by the pod's containers, kept
//!   across a container's replacement and across a new sandbox of the same pod, with a
//!   subPath of it (kubelet's `volume-subpaths` bind) showing the same data;
//! - emptyDir `medium: Memory` (a tmpfs kubelet mounted): a guest tmpfs of its size;
//! - a host block device (CRI `devices`, kubelet's `volumeDevices`) at the spec's path,
//!   read-write or read-only as its permissions say.
//!
//! In cold and template pods. Needs root, scripts/install-deps.sh, scripts/build-guest.sh
//! and scripts/build-test-images.sh; fails (never skips) without them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use spry_integration::{require_root, spry::SpryNode, ContainerConfig, Crictl, PodConfig};

const EMPTY_DIR_IMAGE: &str = ".spry-empty-dir.img";

/// A pod's volume dirs as kubelet makes them, and the host mounts it would hold.
struct KubeletPodDir {
    cache: PathBuf,
    scratch: PathBuf,
    /// The subPath `logs` of `cache` for container b, bind-mounted like kubelet does.
    logs_subpath: PathBuf,
}

impl KubeletPodDir {
    fn new(root: &Path, uid: &str) -> Result<Self> {
        let pod = root.join("pods").join(uid);
        let empty_dirs = pod.join("volumes/kubernetes.io~empty-dir");
        let cache = empty_dirs.join("cache");
        let scratch = empty_dirs.join("scratch");
        std::fs::create_dir_all(cache.join("logs"))?;
        std::fs::create_dir_all(&scratch)?;
        // medium: Memory with sizeLimit 32Mi: kubelet mounts a tmpfs of that size.
        sh(&format!(
            "mount -t tmpfs -o size=32m,mode=0777 tmpfs {}",
            scratch.display()
        ))?;
        let logs_subpath = pod.join("volume-subpaths/cache/b/1");
        std::fs::create_dir_all(&logs_subpath)?;
        sh(&format!(
            "mount --bind {} {}",
            cache.join("logs").display(),
            logs_subpath.display()
        ))?;
        Ok(Self {
            cache,
            scratch,
            logs_subpath,
        })
    }
}

impl Drop for KubeletPodDir {
    fn drop(&mut self) {
        for target in [&self.logs_subpath, &self.scratch] {
            let _ = sh(&format!("umount {}", target.display()));
        }
    }
}

fn sh(script: &str) -> Result<String> {
    let out = Command::new("sh").args(["-c", script]).output()?;
    ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The mount table line for `target` in the container.
fn mount_line(crictl: &Crictl, container: &str, target: &str) -> Result<String> {
    let mounts = crictl.exec_ok(container, &["cat", "/proc/mounts"])?;
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(target))
        .map(str::to_owned)
        .with_context(|| format!("nothing mounted at {target}: {mounts}"))
}

fn check_pod(node: &SpryNode, runtime: &str, root: &Path) -> Result<()> {
    let crictl = node.containerd.crictl();
    let dir = KubeletPodDir::new(root, &format!("uid-{runtime}"))?;
    let pod_cfg = PodConfig::new(&format!("ed-{runtime}")).write_to(&node.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some(runtime))?;
    let a_cfg = ContainerConfig::new(&format!("ed-{runtime}-a"), &node.image)
        .command(&["sleep", "3600"])
        .mount(&dir.cache, "/cache", false)
        .mount(&dir.scratch, "/scratch", false)
        .write_to(&node.containerd.dir())?;
    let b_cfg = ContainerConfig::new(&format!("ed-{runtime}-b"), &node.image)
        .command(&["sleep", "3600"])
        .mount(&dir.cache, "/cache", false)
        .mount(&dir.logs_subpath, "/logs", false)
        .write_to(&node.containerd.dir())?;
    let a = crictl.create(&pod, &a_cfg, &pod_cfg)?;
    crictl.start(&a)?;
    let b = crictl.create(&pod, &b_cfg, &pod_cfg)?;
    crictl.start(&b)?;

    // On a guest ext4 disk, shared by both containers, the subPath the same data.
    let line = mount_line(&crictl, &a, "/cache")?;
    ensure!(
        line.contains(" ext4 "),
        "/cache is not the pod's disk: {line}"
    );
    crictl.exec_ok(
        &a,
        &[
            "sh",
            "-c",
            "echo from a > /cache/f && echo log > /cache/logs/l",
        ],
    )?;
    ensure!(crictl.exec_ok(&b, &["cat", "/cache/f"])? == "from a");
    ensure!(crictl.exec_ok(&b, &["cat", "/logs/l"])? == "log");
    crictl.exec_ok(&b, &["sh", "-c", "echo from b > /logs/m"])?;
    ensure!(crictl.exec_ok(&a, &["cat", "/cache/logs/m"])? == "from b");
    let mode = crictl.exec_ok(&a, &["stat", "-c", "%a", "/cache"])?;
    ensure!(mode == "777", "emptyDir mode {mode}, kubelet's is 777");

    // The data is in the guest; the host holds its image, in kubelet's dir, and counts it.
    ensure!(
        !dir.cache.join("f").exists(),
        "guest data reached the host dir"
    );
    let image = dir.cache.join(EMPTY_DIR_IMAGE);
    let before = std::fs::metadata(&image)?.blocks() * 512;
    let started = Instant::now();
    crictl.exec_ok(
        &a,
        &[
            "dd",
            "if=/dev/zero",
            "of=/cache/big",
            "bs=1M",
            "count=64",
            "conv=fsync",
        ],
    )?;
    let mib_s = 64.0 / started.elapsed().as_secs_f64();
    let after = std::fs::metadata(&image)?.blocks() * 512;
    ensure!(
        after >= before + (60 << 20),
        "64 MiB written, the image grew {} bytes",
        after - before
    );
    eprintln!("{runtime}: 64 MiB into the emptyDir disk at {mib_s:.1} MiB/s (dd in the guest, incl. exec)");

    // medium: Memory: a guest tmpfs of kubelet's size.
    let line = mount_line(&crictl, &a, "/scratch")?;
    ensure!(
        line.starts_with("emptydir /scratch tmpfs"),
        "/scratch: {line}"
    );
    let df = crictl.exec_ok(&a, &["df", "-k", "/scratch"])?;
    ensure!(df.contains("32768"), "/scratch is not 32 MiB: {df}");

    // A container replaced in the pod finds the volume as it was.
    crictl.stop(&a, 5)?;
    crictl.rm(&a)?;
    let c_cfg = ContainerConfig::new(&format!("ed-{runtime}-c"), &node.image)
        .command(&["sleep", "3600"])
        .mount(&dir.cache, "/cache", false)
        .write_to(&node.containerd.dir())?;
    let c = crictl.create(&pod, &c_cfg, &pod_cfg)?;
    crictl.start(&c)?;
    ensure!(crictl.exec_ok(&c, &["cat", "/cache/f"])? == "from a");
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;

    // A new sandbox of the same pod (kubelet keeps emptyDirs for the pod's life) mounts
    // the same disk again.
    let pod = crictl.runp(&pod_cfg, Some(runtime))?;
    let d = crictl.create(&pod, &c_cfg, &pod_cfg)?;
    crictl.start(&d)?;
    ensure!(crictl.exec_ok(&d, &["cat", "/cache/f"])? == "from a");
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

#[test]
fn empty_dirs_live_in_the_guest_shared_kept_and_sized() -> Result<()> {
    require_root()?;
    let root = tempfile::Builder::new()
        .prefix("spry-kubelet-")
        .tempdir_in("/var/tmp")?;
    let node = SpryNode::start("spry-ed", true)?;
    let leaks = node.leak_check()?;
    check_pod(&node, "spry-cold", root.path())?;
    check_pod(&node, "spry", root.path())?;
    leaks.assert_clean()?;
    Ok(())
}

/// A loop device over a sparse file, detached on drop.
struct LoopDevice {
    node: String,
    _file: tempfile::NamedTempFile,
}

impl LoopDevice {
    fn new() -> Result<Self> {
        let file = tempfile::Builder::new()
            .prefix("spry-blk-")
            .tempfile_in("/var/tmp")?;
        file.as_file().set_len(16 << 20)?;
        std::fs::write(file.path(), b"hello from host")?;
        file.as_file().set_len(16 << 20)?;
        let node = sh(&format!("losetup -f --show {}", file.path().display()))?;
        Ok(Self { node, _file: file })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = sh(&format!("losetup -d {}", self.node));
    }
}

#[test]
fn a_host_block_device_reaches_the_container_at_its_path() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-blk", true)?;
    let leaks = node.leak_check()?;
    for runtime in ["spry-cold", "spry"] {
        check_block_devices(&node, runtime)?;
    }
    leaks.assert_clean()?;
    Ok(())
}

fn check_block_devices(node: &SpryNode, runtime: &str) -> Result<()> {
    let crictl = node.containerd.crictl();
    let rw = LoopDevice::new()?;
    let ro = LoopDevice::new()?;
    let pod_cfg = PodConfig::new(&format!("blk-{runtime}")).write_to(&node.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some(runtime))?;
    let cfg = ContainerConfig::new(&format!("blk-{runtime}-a"), &node.image)
        .command(&["sleep", "3600"])
        .patch(serde_json::json!({ "devices": [
            { "container_path": "/dev/xvdb", "host_path": rw.node, "permissions": "rwm" },
            { "container_path": "/dev/xvdc", "host_path": ro.node, "permissions": "r" },
        ]}))
        .write_to(&node.containerd.dir())?;
    let a = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&a)?;

    let listing = crictl.exec_ok(&a, &["ls", "-l", "/dev/xvdb", "/dev/xvdc"])?;
    ensure!(
        listing.lines().all(|l| l.starts_with('b')),
        "not block devices: {listing}"
    );
    let head = crictl.exec_ok(
        &a,
        &["dd", "if=/dev/xvdb", "bs=15", "count=1", "status=none"],
    )?;
    ensure!(head == "hello from host", "the guest read {head:?}");
    crictl.exec_ok(
        &a,
        &[
            "sh",
            "-c",
            "echo -n guest wrote | dd of=/dev/xvdb bs=512 seek=1 conv=fsync status=none",
        ],
    )?;
    let out = crictl.exec_sync(
        &a,
        &[
            "sh",
            "-c",
            "echo no | dd of=/dev/xvdc bs=512 seek=1 conv=fsync",
        ],
        std::time::Duration::from_secs(30),
    )?;
    ensure!(out.code != 0, "a write to the read-only device succeeded");
    ensure!(
        crictl.exec_ok(
            &a,
            &["dd", "if=/dev/xvdc", "bs=15", "count=1", "status=none"]
        )? == "hello from host"
    );
    crictl.stop(&a, 5)?;
    crictl.rm(&a)?;

    // On the host, through the device itself.
    let written = sh(&format!(
        "dd if={} bs=512 skip=1 count=1 status=none iflag=direct | head -c 11",
        rw.node
    ))?;
    ensure!(written == "guest wrote", "the host reads {written:?}");
    let untouched = sh(&format!(
        "dd if={} bs=512 skip=1 count=1 status=none iflag=direct | tr -d '\\0'",
        ro.node
    ))?;
    ensure!(
        untouched.is_empty(),
        "the read-only device changed: {untouched:?}"
    );
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}
