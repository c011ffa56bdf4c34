//! The pod's volumes in the guest: its /dev/shm tmpfs and its file share (host volumes,
//! served by the shim over FUSE, see `share.rs`), set up once per sandbox, and the
//! resolution of a container's `VolumeMount`s to guest paths it bind-mounts.

mod devices;
mod pod_local;
mod share;
mod synced;

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};
use spry_proto::agent::{volume_mount, BlockDevice, VolumeMount, VolumeSnapshot};

pub use devices::GuestDevice;
use pod_local::PodLocal;
pub use share::{mount_share, ShareError, SharePort, PORT_NAME};

use crate::storage::{StorageError, StorageManager};

/// containerd's default /dev/shm size, used when the host does not say.
const DEFAULT_SHM_BYTES: u64 = 64 << 20;

/// Errors of the pod's volumes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot mount the pod's /dev/shm at {target}")]
    Shm { target: PathBuf, source: nix::Error },
    #[error("cannot create {path}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(
        "volume at {destination}: share path {path:?} must be relative and stay inside the share"
    )]
    BadSharePath { destination: String, path: String },
    #[error(
        "volume at {destination} is on the pod's file share, which this sandbox did not mount"
    )]
    NoShare { destination: String },
    #[error("volume at {destination} names no source")]
    NoSource { destination: String },
    #[error("synced volume {id:?}: {what}")]
    BadSnapshot { id: String, what: String },
    #[error("pod volume at {destination}: bad {what}")]
    BadPodVolume { destination: String, what: String },
    #[error("cannot mount the disk of pod volume {id}")]
    PodDisk { id: String, source: StorageError },
    #[error("cannot mount a tmpfs at {target}")]
    Tmpfs { target: PathBuf, source: nix::Error },
    #[error("block device {path}: {what}")]
    BadBlockDevice { path: String, what: String },
    #[error("the disk of block device {path} did not appear")]
    BlockDevice { path: String, source: StorageError },
}

/// A volume resolved to what the container bind-mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVolume {
    pub destination: PathBuf,
    /// The guest path bind-mounted at `destination`.
    pub source: PathBuf,
    /// OCI mount options, always including a bind.
    pub options: Vec<String>,
}

/// The pod's volume roots in this VM.
#[derive(Debug)]
pub struct PodVolumes {
    shm: PathBuf,
    share: Option<PathBuf>,
    /// Where synced volumes live (a tmpfs in a VM).
    synced: PathBuf,
    /// emptyDirs kept in the guest.
    local: PodLocal,
}

impl PodVolumes {
    /// Creates the pod's /dev/shm under `run_dir` (a tmpfs of `shm_bytes` when `mount` is
    /// set, a plain directory in host test mode) and mounts the file share if asked.
    pub fn setup(
        run_dir: &Path,
        shm_bytes: u64,
        file_share: bool,
        mount_allowed: bool,
    ) -> Result<Self, VolumeError> {
        let shm = run_dir.join("shm");
        let synced = run_dir.join("volumes");
        for dir in [&shm, &synced] {
            std::fs::create_dir_all(dir).map_err(|source| VolumeError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
        if mount_allowed {
            mount(
                Some("volumes"),
                &synced,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755"),
            )
            .map_err(|source| VolumeError::Shm {
                target: synced.clone(),
                source,
            })?;
            let size = if shm_bytes == 0 {
                DEFAULT_SHM_BYTES
            } else {
                shm_bytes
            };
            let data = format!("mode=1777,size={size}");
            mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(data.as_str()),
            )
            .map_err(|source| VolumeError::Shm {
                target: shm.clone(),
                source,
            })?;
        }
        let share = if file_share {
            let target = run_dir.join("share");
            mount_share(&SharePort::default(), &target)?;
            Some(target)
        } else {
            None
        };
        let local = PodLocal::new(run_dir.join("pod-volumes"), mount_allowed);
        Ok(Self {
            shm,
            share,
            synced,
            local,
        })
    }

    /// Drops a removed container's synced volumes (guest RAM otherwise kept by every
    /// container a crash-looping pod ever had).
    pub fn forget(&self, container_id: &str) {
        let Some(id) = single_name(container_id) else {
            return;
        };
        let dir = self.synced.join(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove a container's synced volumes");
            }
        }
    }

    /// Applies a new version of a synced volume (SyncVolume).
    pub fn sync(&self, snapshot: &VolumeSnapshot) -> Result<(), VolumeError> {
        synced::apply(&self.synced, snapshot).map(drop)
    }

    /// Where each of `volumes` comes from in the guest (making the pod volumes they are
    /// the first to mount).
    pub async fn resolve(
        &mut self,
        volumes: &[VolumeMount],
        storage: &StorageManager,
    ) -> Result<Vec<ResolvedVolume>, VolumeError> {
        let mut resolved = Vec::with_capacity(volumes.len());
        for volume in volumes {
            resolved.push(self.resolve_one(volume, storage).await?);
        }
        Ok(resolved)
    }

    /// The guest's numbers for a container's block devices.
    pub async fn block_devices(
        &self,
        devices: &[BlockDevice],
        storage: &StorageManager,
    ) -> Result<Vec<GuestDevice>, VolumeError> {
        devices::resolve(storage, devices).await
    }

    async fn resolve_one(
        &mut self,
        volume: &VolumeMount,
        storage: &StorageManager,
    ) -> Result<ResolvedVolume, VolumeError> {
        let destination = volume.destination.clone();
        let source = match &volume.source {
            Some(volume_mount::Source::SharePath(path)) => {
                let share = self.share.as_ref().ok_or_else(|| VolumeError::NoShare {
                    destination: destination.clone(),
                })?;
                share.join(
                    relative_inside(path).ok_or_else(|| VolumeError::BadSharePath {
                        destination: destination.clone(),
                        path: path.clone(),
                    })?,
                )
            }
            Some(volume_mount::Source::PodShm(true)) => self.shm.clone(),
            Some(volume_mount::Source::Synced(snapshot)) => synced::apply(&self.synced, snapshot)?,
            Some(volume_mount::Source::PodVolume(pod_volume)) => {
                self.local
                    .resolve(&destination, pod_volume, storage)
                    .await?
            }
            _ => return Err(VolumeError::NoSource { destination }),
        };
        let mut options = volume.options.clone();
        if !options.iter().any(|o| o == "bind" || o == "rbind") {
            options.insert(0, "rbind".into());
        }
        Ok(ResolvedVolume {
            destination: destination.into(),
            source,
            options,
        })
    }
}

/// `path` as a relative path of normal components only, or None.
fn relative_inside(path: &str) -> Option<&Path> {
    let path = Path::new(path);
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    (normal && path.components().next().is_some()).then_some(path)
}

/// `name` when it is one normal path component.
fn single_name(name: &str) -> Option<&str> {
    (relative_inside(name)?.components().count() == 1).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_volume(path: &str, options: &[&str]) -> VolumeMount {
        VolumeMount {
            destination: "/data".into(),
            source: Some(volume_mount::Source::SharePath(path.into())),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    fn storage() -> StorageManager {
        StorageManager::new(
            Path::new("/nonexistent"),
            crate::storage::SharedFs::HostDir("/nonexistent".into()),
        )
    }

    fn pod_volumes(shm: PathBuf, share: Option<PathBuf>, synced: PathBuf) -> PodVolumes {
        PodVolumes {
            local: PodLocal::new(synced.join("local"), false),
            shm,
            share,
            synced,
        }
    }

    #[tokio::test]
    async fn share_paths_resolve_under_the_share_and_get_a_bind() {
        let dir = tempfile::tempdir().unwrap();
        let mut volumes = pod_volumes(
            dir.path().join("shm"),
            Some(dir.path().join("share")),
            dir.path().join("volumes"),
        );
        let resolved = volumes
            .resolve(&[share_volume("c1/0", &["ro", "nosuid"])], &storage())
            .await
            .unwrap();
        assert_eq!(resolved[0].source, dir.path().join("share/c1/0"));
        assert_eq!(resolved[0].destination, Path::new("/data"));
        assert_eq!(resolved[0].options, ["rbind", "ro", "nosuid"]);
        let shm = VolumeMount {
            destination: "/dev/shm".into(),
            source: Some(volume_mount::Source::PodShm(true)),
            options: vec!["rbind".into()],
            ..Default::default()
        };
        assert_eq!(
            volumes.resolve(&[shm], &storage()).await.unwrap()[0].source,
            dir.path().join("shm")
        );
    }

    #[test]
    fn a_removed_containers_synced_volumes_go_and_no_other_path() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = pod_volumes(dir.path().join("shm"), None, dir.path().join("volumes"));
        let snapshot = VolumeSnapshot {
            id: "c1/s0".into(),
            version: "..v1".into(),
            ..Default::default()
        };
        volumes.sync(&snapshot).unwrap();
        assert!(dir.path().join("volumes/c1/s0/..data").exists());
        volumes.forget("../shm");
        volumes.forget("");
        assert!(dir.path().join("volumes/c1").exists());
        volumes.forget("c1");
        assert!(!dir.path().join("volumes/c1").exists());
    }

    #[tokio::test]
    async fn share_paths_cannot_leave_the_share() {
        let mut volumes = pod_volumes(
            "/run/spry/shm".into(),
            Some("/run/spry/share".into()),
            "/run/spry/volumes".into(),
        );
        for bad in ["", "/etc", "../etc", "c1/../../etc", "./c1"] {
            let err = volumes
                .resolve(&[share_volume(bad, &[])], &storage())
                .await
                .unwrap_err();
            assert!(
                matches!(err, VolumeError::BadSharePath { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn a_share_volume_without_a_share_or_a_source_is_refused() {
        let mut volumes = pod_volumes("/run/spry/shm".into(), None, "/run/spry/volumes".into());
        let err = volumes
            .resolve(&[share_volume("c1/0", &[])], &storage())
            .await
            .unwrap_err();
        assert!(matches!(err, VolumeError::NoShare { .. }));
        let empty = VolumeMount {
            destination: "/x".into(),
            ..Default::default()
        };
        let err = volumes.resolve(&[empty], &storage()).await.unwrap_err();
        assert!(matches!(err, VolumeError::NoSource { .. }));
    }
}
