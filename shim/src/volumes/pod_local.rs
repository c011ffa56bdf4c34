//! kubelet's emptyDir volumes kept in the guest, where the pod's containers use them at
//! guest speed instead of through the file share.
//!
//! kubelet makes an emptyDir at `<pod>/volumes/kubernetes.io~empty-dir/<name>` (a tmpfs
//! there for `medium: Memory`, sized by `sizeLimit`) and binds it, or a subPath of it
//! through `<pod>/volume-subpaths/<name>/<container>/<n>`, into each container. Nobody
//! but the pod's containers reads it, so its data can live in the VM:
//! - on disk: a sparse journaled ext4 image inside kubelet's emptyDir dir, hot-plugged
//!   once per pod (kubelet's usage accounting and `sizeLimit` eviction count its blocks,
//!   and a new sandbox of the same pod finds the same data);
//! - `medium: Memory`: a guest tmpfs of the host tmpfs's size (pod memory, as under
//!   runc, where it counts against the container's memory limit).
//!
//! The agent makes the volume for the first container that mounts it and shares it with
//! the pod's later containers and restarts.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use spry_proto::agent::{pod_volume, volume_mount, PodVolume, VolumeMount};
use tokio::sync::Mutex;

use super::VolumeError;
use crate::rootfs::{create_image, scsi_storage, ImageUse, UPPER_MOUNT_OPTIONS};
use crate::vm::{ScsiAddr, Vm};

/// kubelet's directory for emptyDir volumes under a pod's `volumes/`.
pub const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";
/// The disk image in an emptyDir's host directory.
pub const IMAGE_NAME: &str = ".spry-empty-dir.img";
/// Entries looked at when finding which subdirectory a subPath mount is (kubelet made
/// them; the guest's data is not on the host, so the host dir holds almost nothing).
const MAX_SUBPATH_SCAN: usize = 10_000;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Where an emptyDir's data lives in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Medium {
    /// An ext4 image of `bytes` (sparse) at `image`.
    Disk { image: PathBuf, bytes: u64 },
    /// A tmpfs of `bytes`.
    Memory { bytes: u64 },
}

/// A container's mount of an emptyDir kept in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLocalVolume {
    pub destination: PathBuf,
    /// The volume in the pod (one path component).
    pub id: String,
    pub medium: Medium,
    /// The subPath the container mounts, relative; empty for the whole volume.
    pub sub_path: PathBuf,
    pub options: Vec<String>,
}

/// The emptyDir a container's bind source is, or is a subPath of, when kubelet laid it
/// out: `(the emptyDir's host dir, the subPath in it)`. `source` has its symlinks resolved.
pub fn empty_dir_of(source: &Path) -> Option<(PathBuf, PathBuf)> {
    let parent = source.parent()?;
    if parent.file_name()? == EMPTY_DIR_PLUGIN && parent.parent()?.file_name()? == "volumes" {
        return Some((source.to_path_buf(), PathBuf::new()));
    }
    // <pod>/volume-subpaths/<name>/<container>/<n>: a bind of a path inside the volume.
    let name_dir = parent.parent()?;
    let subpaths = name_dir.parent()?;
    if subpaths.file_name()? != "volume-subpaths" {
        return None;
    }
    let empty_dir = subpaths
        .parent()?
        .join("volumes")
        .join(EMPTY_DIR_PLUGIN)
        .join(name_dir.file_name()?);
    let sub_path = find_same_inode(&empty_dir, source)?;
    Some((empty_dir, sub_path))
}

/// The path inside `root` of the directory `target` is (a bind mount of it), by device
/// and inode; symlinks are not followed.
fn find_same_inode(root: &Path, target: &Path) -> Option<PathBuf> {
    let wanted = std::fs::metadata(target).ok()?;
    if !wanted.is_dir() {
        return None;
    }
    let mut pending = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            seen += 1;
            if seen > MAX_SUBPATH_SCAN {
                return None;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            let path = entry.path();
            if meta.dev() == wanted.dev() && meta.ino() == wanted.ino() {
                return path.strip_prefix(root).ok().map(Path::to_path_buf);
            }
            pending.push(path);
        }
    }
    None
}

/// Classifies the emptyDir at `empty_dir` (kubelet's host dir): a tmpfs there means
/// `medium: Memory` of the tmpfs's size; else a disk as large as the host filesystem,
/// so the container can fill what it could under runc.
pub fn medium_of(empty_dir: &Path) -> std::io::Result<Medium> {
    let fs = nix::sys::statfs::statfs(empty_dir).map_err(std::io::Error::from)?;
    let size = nix::sys::statvfs::statvfs(empty_dir).map_err(std::io::Error::from)?;
    let bytes = size.blocks() as u64 * size.fragment_size() as u64;
    Ok(if fs.filesystem_type().0 as i64 == TMPFS_MAGIC {
        Medium::Memory { bytes }
    } else {
        Medium::Disk {
            image: empty_dir.join(IMAGE_NAME),
            bytes,
        }
    })
}

/// The volume's id in the pod: its name, made unique by its host path.
pub fn volume_id(empty_dir: &Path) -> String {
    let name: String = empty_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(63)
        .collect();
    let digest = Sha256::digest(empty_dir.as_os_str().as_encoded_bytes());
    format!("{name}-{}", &hex::encode(digest)[..12])
}

/// The pod's emptyDir disks plugged into its VM, by volume id; they stay for the pod's life.
#[derive(Debug, Default)]
pub struct PodLocalDisks {
    attached: Mutex<HashMap<String, ScsiAddr>>,
}

impl PodLocalDisks {
    /// The agent's mounts for `volumes`, plugging each disk the VM does not have yet
    /// (making its image when kubelet's dir has none).
    pub async fn mounts(
        &self,
        vm: &dyn Vm,
        volumes: &[PodLocalVolume],
    ) -> Result<Vec<VolumeMount>, VolumeError> {
        let mut mounts = Vec::with_capacity(volumes.len());
        for volume in volumes {
            let backing = match &volume.medium {
                Medium::Memory { bytes } => pod_volume::Backing::MemoryBytes(*bytes),
                Medium::Disk { image, bytes } => {
                    let addr = self.plug(vm, &volume.id, image, *bytes).await?;
                    pod_volume::Backing::Disk(scsi_storage(addr, "ext4", &UPPER_MOUNT_OPTIONS))
                }
            };
            mounts.push(VolumeMount {
                destination: volume.destination.display().to_string(),
                source: Some(volume_mount::Source::PodVolume(PodVolume {
                    id: volume.id.clone(),
                    backing: Some(backing),
                    sub_path: volume.sub_path.display().to_string(),
                    ..Default::default()
                })),
                options: volume.options.clone(),
                ..Default::default()
            });
        }
        Ok(mounts)
    }

    async fn plug(
        &self,
        vm: &dyn Vm,
        id: &str,
        image: &Path,
        bytes: u64,
    ) -> Result<ScsiAddr, VolumeError> {
        let mut attached = self.attached.lock().await;
        if let Some(addr) = attached.get(id) {
            return Ok(*addr);
        }
        let created = !image.exists();
        if created {
            create_image(image, bytes, ImageUse::PodVolume)
                .await
                .map_err(|source| VolumeError::DiskImage {
                    path: image.to_path_buf(),
                    source,
                })?;
        }
        match vm.hotplug_disk(image, false).await {
            Ok(addr) => {
                tracing::info!(volume = id, image = %image.display(), created, "emptyDir disk plugged");
                attached.insert(id.to_string(), addr);
                Ok(addr)
            }
            Err(source) => {
                if created {
                    let _ = std::fs::remove_file(image);
                }
                Err(VolumeError::Plug {
                    path: image.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pods/uid-1");
        (dir, pod)
    }

    #[test]
    fn an_empty_dir_is_recognized_by_kubelets_layout() {
        let (_dir, pod) = pod_dir();
        let empty = pod.join("volumes").join(EMPTY_DIR_PLUGIN).join("cache");
        std::fs::create_dir_all(&empty).unwrap();
        assert_eq!(empty_dir_of(&empty), Some((empty.clone(), PathBuf::new())));
        let host_path = pod.join("volumes/kubernetes.io~host-path/cache");
        assert_eq!(empty_dir_of(&host_path), None);
        // A plugin dir elsewhere than a pod's volumes is not kubelet's.
        let stray = pod.join("other").join(EMPTY_DIR_PLUGIN).join("cache");
        assert_eq!(empty_dir_of(&stray), None);
    }

    #[test]
    fn a_sub_path_is_found_by_its_inode_in_the_volume() {
        let (_dir, pod) = pod_dir();
        let empty = pod.join("volumes").join(EMPTY_DIR_PLUGIN).join("data");
        std::fs::create_dir_all(empty.join("a/b")).unwrap();
        std::fs::create_dir_all(empty.join("c")).unwrap();
        // kubelet binds the subPath; a symlink stands in for the bind (metadata follows
        // it, read_dir's entries do not).
        let subpaths = pod.join("volume-subpaths/data/main");
        std::fs::create_dir_all(&subpaths).unwrap();
        let mount = subpaths.join("0");
        std::os::unix::fs::symlink(empty.join("a/b"), &mount).unwrap();
        assert_eq!(empty_dir_of(&mount), Some((empty.clone(), "a/b".into())));
        // A subPath of a volume that is not an emptyDir: not ours.
        let other = pod.join("volume-subpaths/config/main");
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(empty.join("c"), other.join("0")).unwrap();
        assert_eq!(empty_dir_of(&other.join("0")), None);
    }

    #[test]
    fn a_plain_dir_is_a_disk_as_large_as_its_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        match medium_of(dir.path()).unwrap() {
            Medium::Disk { image, bytes } => {
                assert_eq!(image, dir.path().join(IMAGE_NAME));
                assert!(bytes > 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_are_one_safe_component_and_differ_by_path() {
        let a = volume_id(Path::new("/p/1/volumes/kubernetes.io~empty-dir/cache"));
        let b = volume_id(Path::new("/p/2/volumes/kubernetes.io~empty-dir/cache"));
        assert_ne!(a, b);
        assert!(a.starts_with("cache-"), "{a}");
        assert!(!a.contains('/'));
        let odd = volume_id(Path::new("/p/x/we ird/..name"));
        assert!(!odd.contains(' ') && !odd.contains('/'), "{odd}");
    }
}
