//! Builds a container's root filesystem from its `Rootfs` message and tears it down again.
//!
//! Layout under `<run>/containers/<id>/`: `layers/<n>` (read-only disk mounts), `rw` (a tmpfs
//! holding the overlay's `upper` and `work`), `rootfs` (the overlay). Teardown unmounts in
//! reverse order and only removes directories it made, never recursively: a failed unmount
//! must not delete a layer's or the shared directory's contents.

mod scsi;
mod scsi_probes;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use spry_proto::agent::{storage::Source, Rootfs, ScsiDisk, Storage};
use tokio::sync::Mutex;

pub use scsi::SysfsPaths;
pub use scsi_probes::{ScsiProbes, UeventError};

/// How long a just-attached disk may answer ENXIO before we give up on it.
const DISK_ATTACH_GRACE: Duration = Duration::from_secs(3);

/// Errors of mounting or unmounting container storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("the rootfs has no layers")]
    NoLayers,
    #[error("layer {index} has no source")]
    NoSource { index: usize },
    #[error("layer {index} has a source kind this agent does not know")]
    UnknownSource { index: usize },
    #[error("shared path {path:?} must be relative, without '..', ':' or ','")]
    BadSharedPath { path: String },
    #[error("shared path {path} does not exist")]
    SharedPathMissing { path: PathBuf },
    #[error("no SCSI disk appeared at target {target} lun {lun} within {waited:?}")]
    DiskNotFound {
        target: u32,
        lun: u32,
        waited: Duration,
    },
    #[error("{path} holds an unexpected device number {value:?}")]
    BadDeviceNumber { path: PathBuf, value: String },
    #[error("failed to create device node {path}")]
    Mknod { path: PathBuf, source: nix::Error },
    #[error("failed to mount {what} at {target}")]
    Mount {
        what: String,
        target: PathBuf,
        source: nix::Error,
    },
    #[error("failed to unmount {target}")]
    Unmount { target: PathBuf, source: nix::Error },
    #[error("I/O on {path} failed")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where shared (virtio-fs) directories come from.
#[derive(Debug, Clone)]
pub enum SharedFs {
    /// In the VM: virtio-fs with this tag, mounted on first use at `<run>/shared`.
    VirtioFs { tag: String },
    /// Host test mode: shared paths are relative to this directory.
    HostDir(PathBuf),
}

/// Mounts container storage.
pub struct StorageManager {
    run_dir: PathBuf,
    shared: SharedFs,
    sysfs: SysfsPaths,
    probes: Arc<ScsiProbes>,
    shared_mounted: Mutex<bool>,
}

/// A container's mounted rootfs; pass it back to [`StorageManager::unmount`].
#[derive(Debug, Default)]
pub struct MountedRootfs {
    /// The directory to use as the OCI root.
    pub rootfs: PathBuf,
    /// Whether the OCI root must be read-only (a lone read-only layer).
    pub readonly: bool,
    mounts: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl StorageManager {
    pub fn new(run_dir: &Path, shared: SharedFs) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            shared,
            sysfs: SysfsPaths::default(),
            probes: Arc::new(ScsiProbes::unheard()),
            shared_mounted: Mutex::new(false),
        }
    }

    /// From now on waits for hot-plugged disks' probes, as the kernel's uevents announce
    /// them, not just for their block devices. On an error nothing changes.
    pub fn listen_for_scsi_probes(&mut self) -> Result<(), UeventError> {
        self.probes = ScsiProbes::listen(&self.sysfs.scsi_devices)?;
        Ok(())
    }

    fn shared_root(&self) -> PathBuf {
        match &self.shared {
            SharedFs::VirtioFs { .. } => self.run_dir.join("shared"),
            SharedFs::HostDir(dir) => dir.clone(),
        }
    }

    async fn ensure_shared_mounted(&self) -> Result<PathBuf, StorageError> {
        let root = self.shared_root();
        let SharedFs::VirtioFs { tag } = &self.shared else {
            return Ok(root);
        };
        let mut mounted = self.shared_mounted.lock().await;
        if !*mounted {
            create_dir(&root)?;
            mount(
                Some(tag.as_str()),
                &root,
                Some("virtiofs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|source| StorageError::Mount {
                what: format!("virtio-fs {tag}"),
                target: root.clone(),
                source,
            })?;
            *mounted = true;
        }
        Ok(root)
    }

    /// Mounts `rootfs` for container `id`. On error, everything mounted so far is undone.
    pub async fn mount(&self, id: &str, rootfs: &Rootfs) -> Result<MountedRootfs, StorageError> {
        let mut mounted = MountedRootfs::default();
        match self.mount_inner(id, rootfs, &mut mounted).await {
            Ok(()) => Ok(mounted),
            Err(err) => {
                if let Err(cleanup) = self.unmount(&mut mounted) {
                    tracing::error!(container = id, error = %cleanup, "cleaning up a failed rootfs mount");
                }
                Err(err)
            }
        }
    }

    async fn mount_inner(
        &self,
        id: &str,
        rootfs: &Rootfs,
        out: &mut MountedRootfs,
    ) -> Result<(), StorageError> {
        if rootfs.layers.is_empty() {
            return Err(StorageError::NoLayers);
        }
        let base = self.run_dir.join("containers").join(id);
        let layers_dir = base.join("layers");
        let mut lowers = Vec::new();
        for (index, layer) in rootfs.layers.iter().enumerate() {
            lowers.push(self.mount_layer(index, layer, &layers_dir, out).await?);
        }
        if lowers.len() == 1 && !rootfs.writable {
            out.rootfs = lowers.remove(0);
            out.readonly = true;
            return Ok(());
        }
        let target = base.join("rootfs");
        tracked_dir(&target, out)?;
        let mut data = format!("lowerdir={}", join_lowers(&lowers));
        if rootfs.writable {
            let rw = base.join("rw");
            match rootfs.upper.as_ref() {
                // On its own disk: what the container writes is host disk, not guest RAM.
                Some(upper) => {
                    self.mount_disk(upper, &rw, false, out).await?;
                }
                None => {
                    tracked_dir(&rw, out)?;
                    tracked_mount(
                        Some("tmpfs"),
                        &rw,
                        Some("tmpfs"),
                        MsFlags::MS_NODEV,
                        Some("mode=0755"),
                        out,
                    )?;
                }
            }
            let (upper, work) = (rw.join("upper"), rw.join("work"));
            create_dir(&upper)?;
            create_dir(&work)?;
            // Volatile: the writable layer dies with its container (a VM that crashes
            // takes the container along), so nothing ever reads it after a crash; without
            // it every file copy-up ends with an fsync, a cache flush of the layer's
            // image on the host.
            data.push_str(&format!(
                ",upperdir={},workdir={},volatile",
                upper.display(),
                work.display()
            ));
        }
        tracked_mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            MsFlags::empty(),
            Some(&data),
            out,
        )?;
        out.rootfs = target;
        Ok(())
    }

    async fn mount_layer(
        &self,
        index: usize,
        layer: &Storage,
        layers_dir: &Path,
        out: &mut MountedRootfs,
    ) -> Result<PathBuf, StorageError> {
        match &layer.source {
            None => Err(StorageError::NoSource { index }),
            Some(Source::SharedPath(relative)) => {
                let relative_path = checked_relative(relative)?;
                let path = self.ensure_shared_mounted().await?.join(relative_path);
                if !path.is_dir() {
                    return Err(StorageError::SharedPathMissing { path });
                }
                Ok(path)
            }
            Some(Source::Scsi(_)) => {
                let target = layers_dir.join(index.to_string());
                self.mount_disk(layer, &target, true, out).await?;
                Ok(target)
            }
            Some(_) => Err(StorageError::UnknownSource { index }),
        }
    }

    /// Mounts the hot-plugged disk `storage` names at `target` (created).
    async fn mount_disk(
        &self,
        storage: &Storage,
        target: &Path,
        read_only: bool,
        out: &mut MountedRootfs,
    ) -> Result<(), StorageError> {
        let Some(Source::Scsi(disk)) = &storage.source else {
            return Err(StorageError::UnknownSource { index: 0 });
        };
        let device = scsi::wait_for_disk(&self.sysfs, &self.probes, disk.target, disk.lun).await?;
        tracked_dir(target, out)?;
        let (mut flags, data) = mount_options(&storage.options);
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let fstype = if storage.fstype.is_empty() {
            "erofs"
        } else {
            storage.fstype.as_str()
        };
        // A freshly hot-plugged disk can refuse opens (ENXIO) for a moment after
        // its node appears, while the SCSI disk driver finishes attaching it.
        let started = std::time::Instant::now();
        let mut backoff = scsi::Backoff::new();
        loop {
            let mounted = tracked_mount(
                Some(device.to_string_lossy().as_ref()),
                target,
                Some(fstype),
                flags,
                (!data.is_empty()).then_some(data.as_str()),
                out,
            );
            match mounted {
                Err(StorageError::Mount {
                    source: nix::errno::Errno::ENXIO,
                    ..
                }) if started.elapsed() < DISK_ATTACH_GRACE => backoff.wait().await,
                Ok(()) => break,
                Err(e) => return Err(e),
            }
        }
        // Only once mounted and probed (`wait_for_disk` waited for the probe, which ends
        // by setting the kernel's default): the first open revalidates a freshly plugged
        // disk (its pending partition scan), which resets the readahead too. Files opened
        // from now on read ahead this far.
        if storage.read_ahead_kib != 0 {
            scsi::set_read_ahead(&self.sysfs, &device, storage.read_ahead_kib)?;
        }
        Ok(())
    }

    /// Mounts a pod volume's disk at `target` for the pod's life (it goes with the VM, so
    /// nothing tracks it).
    pub async fn mount_pod_disk(
        &self,
        storage: &Storage,
        target: &Path,
    ) -> Result<(), StorageError> {
        let mut mounted = MountedRootfs::default();
        let result = self.mount_disk(storage, target, false, &mut mounted).await;
        if result.is_err() {
            if let Err(e) = self.unmount(&mut mounted) {
                tracing::warn!(target = %target.display(), error = %e, "cleaning up a failed pod disk mount");
            }
        }
        result
    }

    /// The guest's node of a hot-plugged disk, once it appears.
    pub async fn disk_node(&self, disk: &ScsiDisk) -> Result<PathBuf, StorageError> {
        scsi::wait_for_disk(&self.sysfs, &self.probes, disk.target, disk.lun).await
    }

    /// Unmounts and removes what [`StorageManager::mount`] made, in reverse order. Keeps going
    /// after a failure and reports the first one.
    pub fn unmount(&self, mounted: &mut MountedRootfs) -> Result<(), StorageError> {
        let mut first_error = None;
        while let Some(target) = mounted.mounts.pop() {
            if let Err(source) = umount2(&target, MntFlags::MNT_DETACH) {
                if source != nix::errno::Errno::EINVAL && source != nix::errno::Errno::ENOENT {
                    first_error.get_or_insert(StorageError::Unmount { target, source });
                }
            }
        }
        if first_error.is_none() {
            while let Some(dir) = mounted.dirs.pop() {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        first_error.get_or_insert(StorageError::Io { path: dir, source });
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Unmounts the shared filesystem (shutdown).
    pub async fn unmount_shared(&self) {
        let mut mounted = self.shared_mounted.lock().await;
        if *mounted {
            let _ = umount2(&self.shared_root(), MntFlags::MNT_DETACH);
            *mounted = false;
        }
    }
}

fn create_dir(path: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(path).map_err(|source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn tracked_dir(path: &Path, out: &mut MountedRootfs) -> Result<(), StorageError> {
    match std::fs::create_dir(path) {
        Ok(()) => {
            out.dirs.push(path.to_path_buf());
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                tracked_dir(parent, out)?;
            }
            tracked_dir(path, out)
        }
        Err(source) => Err(StorageError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn tracked_mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
    out: &mut MountedRootfs,
) -> Result<(), StorageError> {
    mount(source, target, fstype, flags, data).map_err(|err| StorageError::Mount {
        what: format!("{} ({})", source.unwrap_or("none"), fstype.unwrap_or("")),
        target: target.to_path_buf(),
        source: err,
    })?;
    out.mounts.push(target.to_path_buf());
    Ok(())
}

fn checked_relative(relative: &str) -> Result<PathBuf, StorageError> {
    let path = Path::new(relative);
    let ok = !relative.is_empty()
        && !relative.contains([':', ','])
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(path.to_path_buf())
    } else {
        Err(StorageError::BadSharedPath {
            path: relative.to_string(),
        })
    }
}

fn join_lowers(lowers: &[PathBuf]) -> String {
    lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Splits mount options into flags and filesystem data.
fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_paths_cannot_escape_the_share() {
        assert!(checked_relative("snapshots/12/fs").is_ok());
        for bad in ["", "/abs", "../x", "a/../../b", "a:b", "a,b"] {
            assert!(
                matches!(
                    checked_relative(bad),
                    Err(StorageError::BadSharedPath { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) =
            mount_options(&["ro".into(), "nodev".into(), "cache=none".into(), "x".into()]);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
        assert_eq!(data, "cache=none,x");
        assert_eq!(join_lowers(&["/a".into(), "/b".into()]), "/a:/b");
    }

    #[tokio::test]
    async fn a_lone_read_only_shared_layer_is_used_in_place() {
        let share = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(share.path().join("img/fs")).unwrap();
        let run = tempfile::tempdir().unwrap();
        let manager =
            StorageManager::new(run.path(), SharedFs::HostDir(share.path().to_path_buf()));
        let mut rootfs = Rootfs::new();
        let mut layer = Storage::new();
        layer.set_shared_path("img/fs".into());
        rootfs.layers.push(layer);
        let mut mounted = manager.mount("c1", &rootfs).await.unwrap();
        assert_eq!(mounted.rootfs, share.path().join("img/fs"));
        assert!(mounted.readonly);
        manager.unmount(&mut mounted).unwrap();
        assert!(
            share.path().join("img/fs").is_dir(),
            "teardown must never touch the share"
        );

        rootfs.layers[0].set_shared_path("missing".into());
        assert!(matches!(
            manager.mount("c2", &rootfs).await,
            Err(StorageError::SharedPathMissing { .. })
        ));
    }
}
