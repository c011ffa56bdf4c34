//! Disks the VM's next container gets, plugged ahead: one for its writable layer, one for
//! an image's layers.
//!
//! The guest probes every disk plugged into it (~18-23 ms of a container's create in a
//! warm VM under TCG, the agent waiting for it, more in a VM that idled), and a
//! container's create plugs a disk for its writable layer and one for its image's layers
//! unless the pod's VM already holds that image. So while the VM idles the sandbox plugs an
//! empty disk of each kind ([`Vm::plug_empty_disk`]: read-write of a writable layer's size;
//! read-only of [`LAYER_DISK_BYTES`], the size every shared layer image is padded to); the
//! next container's attach backs one with its image ([`Vm::fill_disk`]) instead of
//! plugging a disk, and the guest finds a disk it has already probed. The images are made
//! as before. No empty disk of the kind (a pod's first container, one started right after
//! another), an image of another size (a layer image larger than the padding, one the
//! snapshotter served, a container's own packed rootfs), or a fill that fails: the image is
//! plugged as a new disk, as without this.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::writable::WRITABLE_LAYER_BYTES;
use super::RootfsError;
use crate::vm::{HostRelease, ScsiAddr, Vm};

/// The size shared layer images are padded to (sparse: a hole past the image's end, no
/// memory or disk) so that one of them fits the empty read-only disk plugged ahead. Large
/// enough for nearly every image; the guest only sees a larger disk than erofs uses.
pub const LAYER_DISK_BYTES: u64 = 16 << 30;

/// At most one empty disk of one kind per VM.
#[derive(Debug, Clone)]
pub struct DiskAhead {
    /// The disk's size: only an image of exactly this size goes on it.
    bytes: u64,
    read_only: bool,
    /// What goes on it, for the log.
    what: &'static str,
    /// Held while a disk is being plugged, so an attach meanwhile waits for it (QMP's
    /// part takes a few ms; the guest's probe goes on without us).
    empty: Arc<Mutex<Option<ScsiAddr>>>,
}

impl DiskAhead {
    /// The disk for the next container's writable layer.
    pub fn writable_layer() -> Self {
        Self::new(WRITABLE_LAYER_BYTES, false, "writable layer")
    }

    /// The disk for the next image's layers (a shared layer image, padded).
    pub fn image_layers() -> Self {
        Self::new(LAYER_DISK_BYTES, true, "image layers")
    }

    fn new(bytes: u64, read_only: bool, what: &'static str) -> Self {
        Self {
            bytes,
            read_only,
            what,
            empty: Arc::default(),
        }
    }

    /// Plugs an empty disk unless one is there.
    pub async fn prepare(&self, vm: &dyn Vm) -> Result<(), RootfsError> {
        let mut empty = self.empty.lock().await;
        if empty.is_none() {
            let addr = vm
                .plug_empty_disk(self.bytes, self.read_only)
                .await
                .map_err(|source| RootfsError::EmptyDisk { source })?;
            *empty = Some(addr);
        }
        Ok(())
    }

    /// Gives `image` to the guest as a disk of this kind: the empty one if there is one
    /// and the image is of its size, else a new one.
    pub async fn plug(
        &self,
        vm: &dyn Vm,
        container_id: &str,
        image: &Path,
    ) -> Result<ScsiAddr, RootfsError> {
        let fits = std::fs::metadata(image).is_ok_and(|m| m.len() == self.bytes);
        let empty = if fits {
            self.empty.lock().await.take()
        } else {
            None
        };
        if let Some(addr) = empty {
            match vm.fill_disk(addr, image).await {
                Ok(()) => {
                    tracing::info!(
                        container_id,
                        target = addr.target,
                        lun = addr.lun,
                        "{} on the disk plugged ahead",
                        self.what
                    );
                    return Ok(addr);
                }
                Err(error) => {
                    tracing::warn!(
                        container_id,
                        image = %image.display(),
                        error = %crate::error_chain(&error),
                        "cannot back the VM's empty disk with the {}; plugging a new disk",
                        self.what
                    );
                    if let Err(error) = vm.unplug_disk(addr, HostRelease::Background).await {
                        tracing::debug!(%error, "cannot unplug the empty disk");
                    }
                }
            }
        }
        vm.hotplug_disk(image, self.read_only)
            .await
            .map_err(|source| RootfsError::Hotplug {
                container_id: container_id.to_string(),
                source,
            })
    }
}
