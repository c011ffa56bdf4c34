//! Finding a hot-plugged virtio-scsi disk by its SCSI address.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::scsi_probes::ScsiProbes;
use super::StorageError;

/// How long to wait for a hot-plugged disk to show up.
const DISK_TIMEOUT: Duration = Duration::from_secs(5);
/// When to ask the SCSI hosts to rescan if the disk has not appeared.
const RESCAN_AFTER: Duration = Duration::from_millis(500);

/// Poll intervals while waiting for a hot-plugged disk: the kernel usually finishes a few
/// milliseconds after the host's hot-plug, so the first polls are 1 ms apart (a fixed
/// 20 ms poll cost up to 20 ms per step: disk seen, node made, open accepted); doubling
/// up to 20 ms keeps a slow attach from spinning a vCPU.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_millis(20);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// Sleeps for the current interval, then lengthens it.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }
}

/// Where the kernel publishes SCSI devices and hosts (overridable for tests).
#[derive(Debug, Clone)]
pub struct SysfsPaths {
    pub scsi_devices: PathBuf,
    pub scsi_hosts: PathBuf,
    pub dev: PathBuf,
    /// Block devices by name (`<block>/sdX/dev`, `<block>/sdX/queue/...`).
    pub block: PathBuf,
}

impl Default for SysfsPaths {
    fn default() -> Self {
        Self {
            scsi_devices: "/sys/bus/scsi/devices".into(),
            scsi_hosts: "/sys/class/scsi_host".into(),
            dev: "/dev".into(),
            block: "/sys/class/block".into(),
        }
    }
}

/// The block device name (`sdX`) of the disk at `<host>:0:<target>:<lun>`, if present.
pub fn find_block_device(paths: &SysfsPaths, target: u32, lun: u32) -> Option<String> {
    let suffix = format!(":0:{target}:{lun}");
    let entries = std::fs::read_dir(&paths.scsi_devices).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(host) = name.strip_suffix(&suffix) else {
            continue;
        };
        if host.is_empty() || !host.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Some(block) = std::fs::read_dir(entry.path().join("block"))
            .ok()
            .and_then(|mut blocks| blocks.next())
            .and_then(|b| b.ok())
        {
            return Some(block.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

fn rescan(paths: &SysfsPaths) {
    let Ok(hosts) = std::fs::read_dir(&paths.scsi_hosts) else {
        return;
    };
    for host in hosts.flatten() {
        let scan = host.path().join("scan");
        if let Err(err) = std::fs::write(&scan, "- - -") {
            tracing::debug!(path = %scan.display(), error = %err, "SCSI rescan failed");
        }
    }
}

/// Waits for the disk at `target:lun` and returns its device node, creating it when devtmpfs
/// has not. With `probes` listening, waits until the kernel has finished attaching the disk
/// too (see `scsi_probes`); a disk seen but never announced is used after the timeout.
pub async fn wait_for_disk(
    paths: &SysfsPaths,
    probes: &ScsiProbes,
    target: u32,
    lun: u32,
) -> Result<PathBuf, StorageError> {
    let started = Instant::now();
    let mut rescanned = false;
    let mut backoff = Backoff::new();
    let name = loop {
        let found = find_block_device(paths, target, lun);
        if let Some(name) = &found {
            if probes.attached(target, lun) {
                break name.clone();
            }
        }
        if started.elapsed() > DISK_TIMEOUT {
            let Some(name) = found else {
                return Err(StorageError::DiskNotFound {
                    target,
                    lun,
                    waited: DISK_TIMEOUT,
                });
            };
            tracing::warn!(
                target,
                lun,
                disk = name,
                "the kernel never announced the disk's probe; using it (its readahead may be the kernel's)"
            );
            break name;
        }
        if !rescanned && started.elapsed() > RESCAN_AFTER {
            tracing::info!(
                target,
                lun,
                "hot-plugged disk not seen yet; rescanning the SCSI hosts"
            );
            rescan(paths);
            rescanned = true;
        }
        backoff.wait().await;
    };
    tracing::debug!(
        target,
        lun,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "disk found"
    );
    let node = paths.dev.join(&name);
    let mut backoff = Backoff::new();
    while !node.exists() && started.elapsed() < DISK_TIMEOUT {
        backoff.wait().await;
    }
    if !node.exists() {
        make_node(paths, &name, &node)?;
    }
    Ok(node)
}

/// Sets the readahead of the disk whose node is `device` to `kib` KiB.
pub fn set_read_ahead(paths: &SysfsPaths, device: &Path, kib: u32) -> Result<(), StorageError> {
    let name = device.file_name().unwrap_or(device.as_os_str());
    let file = paths.block.join(name).join("queue/read_ahead_kb");
    std::fs::write(&file, kib.to_string()).map_err(|source| StorageError::Io { path: file, source })
}

fn make_node(paths: &SysfsPaths, name: &str, node: &Path) -> Result<(), StorageError> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let dev_file = paths.block.join(name).join("dev");
    let text = std::fs::read_to_string(&dev_file).map_err(|source| StorageError::Io {
        path: dev_file.clone(),
        source,
    })?;
    let (major, minor) = text
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| StorageError::BadDeviceNumber {
            path: dev_file.clone(),
            value: text.trim().to_string(),
        })?;
    mknod(
        node,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        makedev(major, minor),
    )
    .map_err(|source| StorageError::Mknod {
        path: node.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs_in(dir: &Path) -> SysfsPaths {
        SysfsPaths {
            scsi_devices: dir.join("devices"),
            scsi_hosts: dir.join("hosts"),
            dev: dir.join("dev"),
            block: dir.join("block"),
        }
    }

    #[test]
    fn finds_the_disk_by_target_and_lun_on_any_host() {
        let dir = tempfile::tempdir().unwrap();
        let paths = sysfs_in(dir.path());
        std::fs::create_dir_all(paths.scsi_devices.join("0:0:1:0/block/sda")).unwrap();
        std::fs::create_dir_all(paths.scsi_devices.join("2:0:3:1/block/sdc")).unwrap();
        std::fs::create_dir_all(paths.scsi_devices.join("host2")).unwrap();
        assert_eq!(find_block_device(&paths, 3, 1).as_deref(), Some("sdc"));
        assert_eq!(find_block_device(&paths, 1, 0).as_deref(), Some("sda"));
        assert_eq!(find_block_device(&paths, 13, 1), None);
    }

    #[test]
    fn the_readahead_is_set_on_the_disks_queue() {
        let dir = tempfile::tempdir().unwrap();
        let paths = sysfs_in(dir.path());
        let queue = paths.block.join("sdb/queue");
        std::fs::create_dir_all(&queue).unwrap();
        set_read_ahead(&paths, &paths.dev.join("sdb"), 32).unwrap();
        let written = std::fs::read_to_string(queue.join("read_ahead_kb")).unwrap();
        assert_eq!(written, "32");
        // A disk the kernel does not list is an error naming the file.
        let err = set_read_ahead(&paths, &paths.dev.join("sdz"), 32).unwrap_err();
        assert!(
            matches!(&err, StorageError::Io { path, .. } if path.ends_with("sdz/queue/read_ahead_kb"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_starts_short_and_is_capped() {
        let mut backoff = Backoff::new();
        let started = tokio::time::Instant::now();
        for _ in 0..5 {
            backoff.wait().await;
        }
        // 1 + 2 + 4 + 8 + 16 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(31));
        backoff.wait().await;
        backoff.wait().await;
        assert_eq!(started.elapsed(), Duration::from_millis(71));
    }

    #[tokio::test]
    async fn a_missing_disk_times_out_with_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let paths = sysfs_in(dir.path());
        let err = wait_for_disk(&paths, &ScsiProbes::unheard(), 4, 2)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StorageError::DiskNotFound {
                target: 4,
                lun: 2,
                ..
            }
        ));
    }
}
