//! The disk the VM's next container gets for its writable layer, plugged ahead.
//!
//! A container's writable layer is a disk of its own, and the guest probes every disk
//! plugged into it (~18-23 ms of each container create in a warm VM under TCG, the agent
//! waiting for it). So while the VM idles the sandbox plugs an empty disk of a writable
//! layer's size ([`Vm::plug_empty_disk`]); the next container's attach backs it with that
//! container's image ([`Vm::fill_disk`]) instead of plugging one, and the guest finds a
//! disk it has already probed. The image itself is made as before, in the container's
//! snapshot, where CRI counts its usage. No empty disk (the first container of a pod, or
//! one started right after another), or a fill that fails: the image is plugged as a new
//! disk, as without this.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::writable::WRITABLE_LAYER_BYTES;
use super::RootfsError;
use crate::vm::{HostRelease, ScsiAddr, Vm};

/// At most one empty disk per VM.
#[derive(Debug, Clone, Default)]
pub struct NextWritableDisk {
    /// Held while a disk is being plugged, so an attach meanwhile waits for it (QMP's
    /// part takes a few ms; the guest's probe goes on without us).
    empty: Arc<Mutex<Option<ScsiAddr>>>,
}

impl NextWritableDisk {
    /// Plugs an empty disk unless one is there.
    pub async fn prepare(&self, vm: &dyn Vm) -> Result<(), RootfsError> {
        let mut empty = self.empty.lock().await;
        if empty.is_none() {
            let addr = vm
                .plug_empty_disk(WRITABLE_LAYER_BYTES)
                .await
                .map_err(|source| RootfsError::EmptyDisk { source })?;
            *empty = Some(addr);
        }
        Ok(())
    }

    /// Gives `image` to the guest as a read-write disk: the empty one if there is one,
    /// else a new one.
    pub async fn plug(
        &self,
        vm: &dyn Vm,
        container_id: &str,
        image: &Path,
    ) -> Result<ScsiAddr, RootfsError> {
        let empty = self.empty.lock().await.take();
        if let Some(addr) = empty {
            match vm.fill_disk(addr, image).await {
                Ok(()) => {
                    tracing::info!(
                        container_id,
                        target = addr.target,
                        lun = addr.lun,
                        "writable layer on the disk plugged ahead"
                    );
                    return Ok(addr);
                }
                Err(error) => {
                    tracing::warn!(
                        container_id,
                        error = %crate::error_chain(&error),
                        "cannot back the VM's empty disk with the writable layer; plugging a new disk"
                    );
                    if let Err(error) = vm.unplug_disk(addr, HostRelease::Background).await {
                        tracing::debug!(%error, "cannot unplug the empty disk");
                    }
                }
            }
        }
        vm.hotplug_disk(image, false)
            .await
            .map_err(|source| RootfsError::Hotplug {
                container_id: container_id.to_string(),
                source,
            })
    }
}
