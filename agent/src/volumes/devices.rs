//! Host block devices hot-plugged for a container (CRI devices, kubelet's volumeDevices):
//! each is found in the guest by its SCSI address, and the container's spec gets the
//! guest disk's device numbers in place of the host's.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use spry_proto::agent::BlockDevice;

use super::VolumeError;
use crate::storage::StorageManager;

/// A block device of the container as the guest has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDevice {
    /// Its path in the container.
    pub path: PathBuf,
    /// (major, minor) on the host: what the spec says.
    pub host: (u32, u32),
    /// (major, minor) in the guest: what the container gets.
    pub guest: (u32, u32),
}

/// Waits for each device's disk and reads its numbers.
pub async fn resolve(
    storage: &StorageManager,
    devices: &[BlockDevice],
) -> Result<Vec<GuestDevice>, VolumeError> {
    let mut resolved = Vec::with_capacity(devices.len());
    for device in devices {
        let bad = |what: &str| VolumeError::BadBlockDevice {
            path: device.path.clone(),
            what: what.to_string(),
        };
        if !device.path.starts_with('/') {
            return Err(bad("its path is not absolute"));
        }
        let scsi = device.scsi.as_ref().ok_or_else(|| bad("no disk"))?;
        let node = storage
            .disk_node(scsi)
            .await
            .map_err(|source| VolumeError::BlockDevice {
                path: device.path.clone(),
                source,
            })?;
        let meta = std::fs::metadata(&node).map_err(|source| VolumeError::Dir {
            path: node.clone(),
            source,
        })?;
        if !meta.file_type().is_block_device() {
            return Err(bad("its guest node is not a block device"));
        }
        let rdev = meta.rdev();
        resolved.push(GuestDevice {
            path: PathBuf::from(&device.path),
            host: (device.host_major, device.host_minor),
            guest: (
                nix::sys::stat::major(rdev) as u32,
                nix::sys::stat::minor(rdev) as u32,
            ),
        });
    }
    Ok(resolved)
}
