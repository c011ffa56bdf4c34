//! QEMU block nodes and SCSI devices of a VM's disks: images are opened here and passed
//! to QEMU by fd (its jail reaches no file), each disk a raw node on the guest's
//! virtio-scsi bus at a target of its own.

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use serde_json::json;

use super::QemuVm;
use crate::vm::cmdline::SCSI_BUS;
use crate::vm::{ScsiAddr, VmError};

impl QemuVm {
    /// Opens `image` here and hands it to QEMU (which cannot reach it from its jail) as
    /// block node `node`: a raw node over the file.
    pub(super) async fn add_block_node(
        &self,
        image: &Path,
        file_driver: &str,
        node: &str,
        read_only: bool,
    ) -> Result<(), VmError> {
        // Writable disks pass the guest's discards down as holes, so a sparse image
        // shrinks when the guest deletes files.
        let discard = if read_only { "ignore" } else { "unmap" };
        self.add_node_on_file(image, read_only, |filename| {
            json!({
                "driver": "raw",
                "node-name": node,
                "read-only": read_only,
                "discard": discard,
                "file": {
                    "driver": file_driver,
                    "filename": filename,
                    "read-only": read_only,
                    "discard": discard,
                },
            })
        })
        .await
    }

    /// Opens `image` here, passes it to QEMU and adds the block node `node_options` makes
    /// of the name QEMU opens it by.
    pub(super) async fn add_node_on_file(
        &self,
        image: &Path,
        read_only: bool,
        node_options: impl FnOnce(String) -> serde_json::Value,
    ) -> Result<(), VmError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(image)
            .map_err(|source| VmError::DiskImage {
                path: image.to_owned(),
                source,
            })?;
        let fdset = self
            .qmp
            .add_fd(file.as_fd())
            .await
            .map_err(|e| self.qmp_error(e))?;
        let added = self
            .qmp
            .execute(
                "blockdev-add",
                Some(node_options(format!("/dev/fdset/{fdset}"))),
            )
            .await;
        // The node holds its own copy of the fd now (or failed): the set is not needed.
        if let Err(error) = self.qmp.remove_fdset(fdset).await {
            tracing::debug!(%error, fdset, "cannot drop a QMP fd set");
        }
        added.map(drop).map_err(|e| self.qmp_error(e))
    }
}

impl QemuVm {
    /// A free SCSI target, reserved: give it back with `scsi_slots.cancel` if unused.
    pub(super) fn reserve_target(&self) -> Result<ScsiAddr, VmError> {
        self.scsi_slots
            .reserve()
            .ok_or_else(|| VmError::NoFreeScsiTarget {
                id: self.id.clone(),
            })
    }

    /// Plugs block node `node` into the guest as the disk at `addr` (reserved). On failure
    /// the node is deleted and the target freed.
    pub(super) async fn add_scsi_device(&self, addr: ScsiAddr, node: &str) -> Result<(), VmError> {
        let device = self
            .qmp
            .execute(
                "device_add",
                Some(json!({
                    "driver": "scsi-hd",
                    "id": device_id(addr),
                    "bus": SCSI_BUS,
                    "drive": node,
                    "scsi-id": addr.target,
                    "lun": addr.lun,
                })),
            )
            .await;
        if let Err(source) = device {
            let _ = self
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": node })))
                .await;
            self.scsi_slots.cancel(addr);
            return Err(self.qmp_error(source));
        }
        Ok(())
    }
}

pub(super) fn node_name(addr: ScsiAddr) -> String {
    format!("spry-disk-{}-{}", addr.target, addr.lun)
}

pub(super) fn device_id(addr: ScsiAddr) -> String {
    format!("spry-scsi-{}-{}", addr.target, addr.lun)
}
