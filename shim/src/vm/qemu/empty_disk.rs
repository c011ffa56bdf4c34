//! Disks plugged empty and filled later ([`Vm::plug_empty_disk`], [`Vm::fill_disk`]).
//!
//! An empty disk is a raw node over a `null-co` node (no file: it reads zeros and drops
//! writes) of the size its image will have, plugged as any disk, so the guest probes it
//! while nothing waits. Filling it adds a `file` node for the image (its fd passed in, as
//! every disk's) and points the raw node at it with `blockdev-reopen`, which frees the null
//! node; the guest's device stays as it was. The guest drops a block device's page cache
//! when its last opener closes it, so what its probe read (zeros) is gone by the time the
//! agent mounts the filled disk. The image's node is the monitor's, not the raw node's,
//! so it is deleted after the raw node when the disk is unplugged.
//!
//! [`Vm::plug_empty_disk`]: crate::vm::Vm::plug_empty_disk
//! [`Vm::fill_disk`]: crate::vm::Vm::fill_disk

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use serde_json::json;

use super::block_nodes::node_name;
use super::QemuVm;
use crate::vm::{ScsiAddr, VmError};

/// The empty and filled disks of one VM (the rest of its disks are not here).
#[derive(Debug, Default)]
pub(super) struct EmptyDisks {
    disks: Mutex<BTreeMap<ScsiAddr, EmptyDisk>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EmptyDisk {
    Empty { bytes: u64 },
    Filled,
}

impl EmptyDisks {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ScsiAddr, EmptyDisk>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk at `addr` is being unplugged: the block node of its image, if it has one,
    /// is to be deleted after its raw node.
    pub(super) fn unplugging(&self, addr: ScsiAddr) -> Option<String> {
        match self.lock().remove(&addr) {
            Some(EmptyDisk::Filled) => Some(file_node_name(addr)),
            Some(EmptyDisk::Empty { .. }) | None => None,
        }
    }
}

fn empty_node_name(addr: ScsiAddr) -> String {
    format!("{}-empty", node_name(addr))
}

fn file_node_name(addr: ScsiAddr) -> String {
    format!("{}-file", node_name(addr))
}

impl QemuVm {
    pub(super) async fn plug_empty(&self, bytes: u64) -> Result<ScsiAddr, VmError> {
        if let Some(error) = self.exited() {
            return Err(error);
        }
        let addr = self.reserve_target()?;
        let node = node_name(addr);
        let added = self
            .qmp
            .execute(
                "blockdev-add",
                Some(json!({
                    "driver": "raw",
                    "node-name": node,
                    "read-only": false,
                    "discard": "unmap",
                    "file": {
                        "driver": "null-co",
                        "node-name": empty_node_name(addr),
                        "size": bytes,
                        "read-zeroes": true,
                    },
                })),
            )
            .await;
        if let Err(source) = added {
            self.scsi_slots.cancel(addr);
            return Err(self.qmp_error(source));
        }
        self.add_scsi_device(addr, &node).await?;
        self.empty_disks
            .lock()
            .insert(addr, EmptyDisk::Empty { bytes });
        tracing::debug!(
            target = addr.target,
            lun = addr.lun,
            bytes,
            "empty disk plugged"
        );
        Ok(addr)
    }

    pub(super) async fn fill(&self, addr: ScsiAddr, image: &Path) -> Result<(), VmError> {
        if let Some(error) = self.exited() {
            return Err(error);
        }
        let unknown = || VmError::UnknownDisk {
            id: self.id.clone(),
            addr,
        };
        let Some(EmptyDisk::Empty { bytes }) = self.empty_disks.lock().get(&addr).copied() else {
            return Err(unknown());
        };
        if !self.scsi_slots.is_plugged(addr) {
            return Err(unknown());
        }
        let size = std::fs::metadata(image)
            .map_err(|source| VmError::DiskImage {
                path: image.to_owned(),
                source,
            })?
            .len();
        if size != bytes {
            return Err(VmError::DiskSizeMismatch {
                path: image.to_owned(),
                size,
                addr,
                disk_size: bytes,
            });
        }
        let file_node = file_node_name(addr);
        self.add_node_on_file(image, false, |filename| {
            json!({
                "driver": "file",
                "node-name": file_node,
                "filename": filename,
                "read-only": false,
                "discard": "unmap",
            })
        })
        .await?;
        let reopened = self
            .qmp
            .execute(
                "blockdev-reopen",
                Some(json!({ "options": [{
                    "driver": "raw",
                    "node-name": node_name(addr),
                    "read-only": false,
                    "discard": "unmap",
                    "file": file_node,
                }]})),
            )
            .await;
        if let Err(source) = reopened {
            let _ = self
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": file_node })))
                .await;
            return Err(self.qmp_error(source));
        }
        self.empty_disks.lock().insert(addr, EmptyDisk::Filled);
        Ok(())
    }
}
