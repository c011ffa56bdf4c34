//! The host side of a container's rootfs: containerd's mounts at `<bundle>/rootfs`.
//!
//! A writable overlay is mounted `volatile`. Unmounting an overlay otherwise syncs its
//! whole upper filesystem (overlayfs' `sync_fs`, i.e. all of `/var/lib`'s dirty pages:
//! 0.9 s after an image pull here), and containerd's StopContainer waits for that unmount,
//! so every stop after a pull paid for the pull's writeback. The rootfs of a container is
//! ephemeral: after a host crash kubelet makes new containers, never reuses a writable
//! layer, which is why a synced upper buys nothing (containerd offers the same option as
//! `mount_options = ["volatile"]` on its overlay snapshotter).

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use tracing::{debug, warn};

use super::error::ShimError;

const VOLATILE: &str = "volatile";

/// containerd's rootfs mounts, mounted at a task's `<bundle>/rootfs`.
#[derive(Debug)]
pub struct MountedRootfs {
    target: PathBuf,
    /// The markers of the overlays mounted `volatile`: the kernel refuses to mount an
    /// upper directory again while its marker is there (a crash may have lost writes).
    volatile_markers: Vec<PathBuf>,
}

/// Mounts containerd's rootfs mounts (usually one overlay) at `target`; `None` when there
/// are none (the rootfs is already in the bundle).
pub async fn mount(
    id: &str,
    mounts: &[Mount],
    target: &Path,
) -> Result<Option<MountedRootfs>, ShimError> {
    let mut mounted = MountedRootfs {
        target: target.to_path_buf(),
        volatile_markers: Vec::new(),
    };
    for m in mounts {
        if let Some((fast, marker)) = volatile(m) {
            match containerd_shim::asynchronous::util::mount_rootfs(&fast, target).await {
                Ok(()) => {
                    mounted.volatile_markers.push(marker);
                    continue;
                }
                // A kernel older than 5.10 does not know the option.
                Err(error) => {
                    debug!(%error, "cannot mount the overlay volatile; mounting it as given")
                }
            }
        }
        containerd_shim::asynchronous::util::mount_rootfs(m, target)
            .await
            .map_err(|source| ShimError::MountRootfs {
                id: id.to_string(),
                target: target.to_path_buf(),
                source,
            })?;
    }
    Ok((!mounts.is_empty()).then_some(mounted))
}

/// `m` with the `volatile` option, and the marker the kernel will create, if `m` is a
/// writable overlay without it.
fn volatile(m: &Mount) -> Option<(Mount, PathBuf)> {
    if m.type_ != "overlay"
        || !m.options.iter().any(|o| o.starts_with("upperdir="))
        || m.options.iter().any(|o| o == VOLATILE)
    {
        return None;
    }
    let workdir = m.options.iter().find_map(|o| o.strip_prefix("workdir="))?;
    let mut fast = m.clone();
    fast.options.push(VOLATILE.to_string());
    Some((fast, Path::new(workdir).join("work/incompat/volatile")))
}

impl MountedRootfs {
    /// Unmounts it. Its volatile markers go too: the upper directory stays usable by
    /// whoever mounts the snapshot next (a commit, a diff), as with a plain overlay.
    pub fn unmount(&self) {
        if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            warn!(target = %self.target.display(), error = %e, "cannot unmount container rootfs");
            return;
        }
        for marker in &self.volatile_markers {
            match std::fs::remove_dir_all(marker) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(marker = %marker.display(), error = %e, "cannot remove an overlay's volatile marker")
                }
            }
        }
    }
}

/// Each mount's type and options, as `RootfsSource::for_mounts` reads them.
pub fn kinds(mounts: &[Mount]) -> Vec<(&str, &[String])> {
    mounts
        .iter()
        .map(|m| (m.type_.as_str(), m.options.as_slice()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_writable_overlays_are_made_volatile() {
        let writable = overlay(&["lowerdir=/l", "upperdir=/s/fs", "workdir=/s/work"]);
        let (fast, marker) = volatile(&writable).unwrap();
        assert_eq!(fast.options.last().map(String::as_str), Some("volatile"));
        assert_eq!(marker, Path::new("/s/work/work/incompat/volatile"));
        // Read-only views, mounts already volatile and binds are left as given.
        assert!(volatile(&overlay(&["lowerdir=/a:/b"])).is_none());
        let already = overlay(&["upperdir=/u", "workdir=/w", "volatile"]);
        assert!(volatile(&already).is_none());
        let bind = Mount {
            type_: "bind".into(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        assert!(volatile(&bind).is_none());
    }
}
