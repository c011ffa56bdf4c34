//! The host side of a container's rootfs: containerd's mounts at `<bundle>/rootfs`.

use std::path::Path;

use containerd_shim::protos::api::Mount;
use tracing::warn;

use super::error::ShimError;

/// Mounts containerd's rootfs mounts (usually one overlay) at `target`.
pub async fn mount(id: &str, mounts: &[Mount], target: &Path) -> Result<(), ShimError> {
    for m in mounts {
        containerd_shim::asynchronous::util::mount_rootfs(m, target)
            .await
            .map_err(|source| ShimError::MountRootfs {
                id: id.to_string(),
                target: target.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

pub fn unmount(target: &Path) {
    if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        warn!(target = %target.display(), error = %e, "cannot unmount container rootfs");
    }
}

/// Each mount's type and options, as `RootfsSource::for_mounts` reads them.
pub fn kinds(mounts: &[Mount]) -> Vec<(&str, &[String])> {
    mounts
        .iter()
        .map(|m| (m.type_.as_str(), m.options.as_slice()))
        .collect()
}
