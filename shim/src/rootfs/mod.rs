//! Getting a container rootfs into the VM, behind [`RootfsShare`].
//!
//! The default is [`ErofsBlockShare`]: the rootfs directory becomes a read-only erofs
//! image, hot-plugged as a virtio-scsi disk, with a tmpfs upper layer in the guest.
//! Measured under TCG, 5,000 small files read in 0.30 s from erofs on a virtual disk
//! against 5.2 s over virtio-fs (cache=always), and a block device keeps working with
//! copy-on-write VM templates, where vhost-user virtio-fs (which needs guest RAM shared
//! with virtiofsd) cannot. Disks are always hot-plugged, so a new container's rootfs can
//! appear in a running VM (in-place image replacement, templates) without a reboot.

mod erofs;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use spry_proto::agent as pb;
use tracing::debug;

use crate::vm::{ScsiAddr, Vm, VmError};

pub use erofs::ErofsError;

/// Failure to share a rootfs with the VM.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs {path} does not exist or is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot create rootfs work dir {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] ErofsError),
    #[error("cannot hot-plug the rootfs image of container {container_id} into the VM")]
    Hotplug {
        container_id: String,
        #[source]
        source: VmError,
    },
    #[error("cannot unplug the rootfs disk of container {container_id} from the VM")]
    Unplug {
        container_id: String,
        #[source]
        source: VmError,
    },
}

/// Where a container's root filesystem comes from on the host.
#[derive(Debug, Clone)]
pub enum RootfsSource {
    /// A plain directory tree (e.g. `spry vm run --rootfs DIR`, or a mounted bundle rootfs).
    Directory(PathBuf),
}

/// A rootfs made visible in the VM; hand it back to [`RootfsShare::detach`].
#[derive(Debug)]
pub struct AttachedRootfs {
    pub container_id: String,
    /// What the agent needs to mount it.
    pub rootfs: pb::Rootfs,
    disks: Vec<ScsiAddr>,
    files: Vec<PathBuf>,
}

/// One way of making a host rootfs visible inside a running VM.
#[async_trait]
pub trait RootfsShare: Send + Sync {
    async fn attach(
        &self,
        vm: &dyn Vm,
        container_id: &str,
        source: &RootfsSource,
    ) -> Result<AttachedRootfs, RootfsError>;

    /// Undoes `attach` once the agent has unmounted the rootfs. Must also succeed when
    /// the VM is already gone (then only host files are removed).
    async fn detach(&self, vm: &dyn Vm, attached: AttachedRootfs) -> Result<(), RootfsError>;
}

/// Rootfs as an erofs image on a hot-plugged virtio-scsi disk (see the module docs).
#[derive(Debug, Clone)]
pub struct ErofsBlockShare {
    /// Where images are written; one file per container, removed on detach.
    work_dir: PathBuf,
}

impl ErofsBlockShare {
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
        }
    }

    fn image_path(&self, container_id: &str) -> PathBuf {
        self.work_dir.join(format!("{container_id}.erofs"))
    }
}

#[async_trait]
impl RootfsShare for ErofsBlockShare {
    async fn attach(
        &self,
        vm: &dyn Vm,
        container_id: &str,
        source: &RootfsSource,
    ) -> Result<AttachedRootfs, RootfsError> {
        let RootfsSource::Directory(dir) = source;
        if !dir.is_dir() {
            return Err(RootfsError::NotADirectory { path: dir.clone() });
        }
        std::fs::create_dir_all(&self.work_dir).map_err(|source| RootfsError::WorkDir {
            path: self.work_dir.clone(),
            source,
        })?;
        let image = self.image_path(container_id);
        erofs::build_image(dir, &image).await?;
        let addr = match vm.hotplug_disk(&image, true).await {
            Ok(addr) => addr,
            Err(source) => {
                remove_file_quietly(&image);
                return Err(RootfsError::Hotplug {
                    container_id: container_id.to_string(),
                    source,
                });
            }
        };
        debug!(container_id, image = %image.display(), ?addr, "rootfs disk attached");
        let layer = pb::Storage {
            source: Some(pb::storage::Source::Scsi(pb::ScsiDisk {
                target: addr.target,
                lun: addr.lun,
                ..Default::default()
            })),
            fstype: "erofs".into(),
            options: vec!["ro".into()],
            ..Default::default()
        };
        Ok(AttachedRootfs {
            container_id: container_id.to_string(),
            rootfs: pb::Rootfs {
                layers: vec![layer],
                writable: true,
                ..Default::default()
            },
            disks: vec![addr],
            files: vec![image],
        })
    }

    async fn detach(&self, vm: &dyn Vm, attached: AttachedRootfs) -> Result<(), RootfsError> {
        let mut result = Ok(());
        if vm.exit_watch().borrow().is_none() {
            for addr in &attached.disks {
                if let Err(source) = vm.unplug_disk(*addr).await {
                    result = Err(RootfsError::Unplug {
                        container_id: attached.container_id.clone(),
                        source,
                    });
                }
            }
        }
        // Host files go even when unplugging failed: the VM holds its own file
        // descriptor, so nothing in the guest breaks, and nothing leaks on the host.
        for file in &attached.files {
            remove_file_quietly(file);
        }
        // The work dir is per sandbox; it goes with its last image.
        let _ = std::fs::remove_dir(&self.work_dir);
        result
    }
}

fn remove_file_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove rootfs image");
        }
    }
}
