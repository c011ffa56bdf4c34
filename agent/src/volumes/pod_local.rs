//! The pod's guest-local volumes (kubelet's emptyDir): the first container that mounts
//! one makes it (mounts its disk, or a tmpfs), the pod's later containers and restarts
//! share it, and it goes with the VM.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use spry_proto::agent::{pod_volume, PodVolume};

use super::{relative_inside, single_name, VolumeError};
use crate::storage::StorageManager;

/// emptyDir's mode under kubelet: every user of the pod may write it.
const EMPTY_DIR_MODE: u32 = 0o777;

/// The pod's guest-local volumes by id, each mounted under `root`.
#[derive(Debug)]
pub struct PodLocal {
    root: PathBuf,
    mounted: HashMap<String, PathBuf>,
    /// False in host test mode: tmpfs volumes are plain directories there.
    mount_allowed: bool,
}

impl PodLocal {
    pub fn new(root: PathBuf, mount_allowed: bool) -> Self {
        Self {
            root,
            mounted: HashMap::new(),
            mount_allowed,
        }
    }

    /// The guest path a container mounting `volume` at `destination` binds: the volume's
    /// root or its subPath (made when missing), making the volume on first use.
    pub async fn resolve(
        &mut self,
        destination: &str,
        volume: &PodVolume,
        storage: &StorageManager,
    ) -> Result<PathBuf, VolumeError> {
        let bad = |what: String| VolumeError::BadPodVolume {
            destination: destination.to_string(),
            what,
        };
        let id = single_name(&volume.id).ok_or_else(|| bad(format!("id {:?}", volume.id)))?;
        let root = match self.mounted.get(id) {
            Some(root) => root.clone(),
            None => {
                let root = self.make(id, volume, storage).await?;
                self.mounted.insert(id.to_string(), root.clone());
                root
            }
        };
        if volume.sub_path.is_empty() {
            return Ok(root);
        }
        let sub_path = relative_inside(&volume.sub_path)
            .ok_or_else(|| bad(format!("subPath {:?}", volume.sub_path)))?;
        sub_dir(&root, sub_path).map_err(|e| match e {
            SubDirError::NotADir(path) => bad(format!(
                "subPath {:?}: {} is a symlink or not a directory",
                volume.sub_path,
                path.display()
            )),
            SubDirError::Io(path, source) => VolumeError::Dir { path, source },
        })
    }

    async fn make(
        &self,
        id: &str,
        volume: &PodVolume,
        storage: &StorageManager,
    ) -> Result<PathBuf, VolumeError> {
        let target = self.root.join(id);
        std::fs::create_dir_all(&target).map_err(|source| VolumeError::Dir {
            path: target.clone(),
            source,
        })?;
        match &volume.backing {
            Some(pod_volume::Backing::Disk(disk)) => storage
                .mount_pod_disk(disk, &target)
                .await
                .map_err(|source| VolumeError::PodDisk {
                    id: id.to_string(),
                    source,
                })?,
            Some(pod_volume::Backing::MemoryBytes(bytes)) if self.mount_allowed => {
                let mut data = format!("mode={EMPTY_DIR_MODE:o}");
                if *bytes > 0 {
                    data.push_str(&format!(",size={bytes}"));
                }
                mount(
                    Some("emptydir"),
                    &target,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(data.as_str()),
                )
                .map_err(|source| VolumeError::Tmpfs {
                    target: target.clone(),
                    source,
                })?;
            }
            Some(pod_volume::Backing::MemoryBytes(_)) => {}
            _ => {
                return Err(VolumeError::BadPodVolume {
                    destination: id.to_string(),
                    what: "no backing".into(),
                })
            }
        }
        // A fresh ext4's root is 0755 root: open it to the pod's users as kubelet does.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(EMPTY_DIR_MODE))
            .map_err(|source| VolumeError::Dir {
                path: target.clone(),
                source,
            })?;
        tracing::info!(volume = id, "pod volume made");
        Ok(target)
    }
}

#[derive(Debug)]
enum SubDirError {
    NotADir(PathBuf),
    Io(PathBuf, std::io::Error),
}

/// `root/sub`, each missing component made; a component that is a symlink (a container
/// may have put one there) or not a directory is refused, so a subPath never leads out
/// of its volume.
fn sub_dir(root: &Path, sub: &Path) -> Result<PathBuf, SubDirError> {
    let mut path = root.to_path_buf();
    for component in sub.components() {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(SubDirError::NotADir(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(EMPTY_DIR_MODE)
                    .create(&path)
                    .map_err(|e| SubDirError::Io(path.clone(), e))?;
            }
            Err(e) => return Err(SubDirError::Io(path, e)),
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SharedFs;

    fn memory_volume(id: &str, sub_path: &str) -> PodVolume {
        PodVolume {
            id: id.into(),
            backing: Some(pod_volume::Backing::MemoryBytes(1 << 20)),
            sub_path: sub_path.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_volume_is_made_once_and_shared_with_its_sub_paths() {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageManager::new(dir.path(), SharedFs::HostDir(dir.path().into()));
        let mut local = PodLocal::new(dir.path().join("local"), false);
        let root = local
            .resolve("/cache", &memory_volume("cache-1", ""), &storage)
            .await
            .unwrap();
        std::fs::write(root.join("kept"), "x").unwrap();
        let again = local
            .resolve("/c2", &memory_volume("cache-1", ""), &storage)
            .await
            .unwrap();
        assert_eq!(root, again);
        assert!(again.join("kept").exists());
        let sub = local
            .resolve("/logs", &memory_volume("cache-1", "a/b"), &storage)
            .await
            .unwrap();
        assert_eq!(sub, root.join("a/b"));
        assert!(sub.is_dir());
    }

    #[tokio::test]
    async fn hostile_ids_and_sub_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageManager::new(dir.path(), SharedFs::HostDir(dir.path().into()));
        let mut local = PodLocal::new(dir.path().join("local"), false);
        for (id, sub) in [
            ("..", ""),
            ("a/b", ""),
            ("", ""),
            ("v", "../x"),
            ("v", "/etc"),
        ] {
            let err = local
                .resolve("/d", &memory_volume(id, sub), &storage)
                .await
                .unwrap_err();
            assert!(
                matches!(err, VolumeError::BadPodVolume { .. }),
                "{id} {sub}: {err}"
            );
        }
        // A symlink a container left in the volume is not followed out of it.
        let root = local
            .resolve("/d", &memory_volume("v", ""), &storage)
            .await
            .unwrap();
        std::os::unix::fs::symlink("/", root.join("out")).unwrap();
        let err = local
            .resolve("/d", &memory_volume("v", "out/etc"), &storage)
            .await
            .unwrap_err();
        assert!(matches!(err, VolumeError::BadPodVolume { .. }), "{err}");
        // A volume without backing is refused.
        let mut none = memory_volume("w", "");
        none.backing = None;
        assert!(local.resolve("/d", &none, &storage).await.is_err());
    }
}
