//! The layout of Spry's state dir (`state_dir` in the config, `/run/spry` by default): every
//! path under it is named here and nowhere else.
//!
//! ```text
//! <state_dir>/
//!   vms/<vm>/            one running VM: QMP and agent sockets, console log (`vm/`);
//!                        `_template-<key>` builds a template (`template/leftovers.rs`)
//!   rootfs/<vm>/         per-container rootfs images of that VM's pod (`rootfs/`)
//!   shares/<vm>/         that pod's file share: binds of its host volumes (`volumes/share.rs`);
//!                        never removed recursively
//!   layer-images/        erofs images of image layer chains, shared by pods (`rootfs/cache.rs`)
//!   templates/<key>/     VM templates (`template/store.rs`)
//!   pool/<spare>/        one spare shim of the warm pool: its config, control socket, lock (`pool/`)
//!   accel-probe.json     the KVM probe's verdict for this host boot (`vm/accel.rs`)
//! ```

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The state dir is root's alone: it holds booted guest RAM (templates), image layers,
/// console logs and the sockets that drive every VM.
const PRIVATE_MODE: u32 = 0o700;

/// One state dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the root (parents as needed) with mode 0700, or takes an existing one's
    /// group and other permissions away, so nothing under it is reachable by other users
    /// whatever the modes of the files in it.
    pub fn make_private(&self) -> std::io::Result<()> {
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_MODE)
            .create(&self.root)
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mode = std::fs::metadata(&self.root)?.permissions().mode() & 0o7777;
        if mode != PRIVATE_MODE {
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(PRIVATE_MODE))?;
        }
        Ok(())
    }

    /// The state dir of VM `name` (created by the VM layer, which requires it to be new).
    pub fn vm(&self, name: &str) -> PathBuf {
        self.vms().join(name)
    }

    /// Where every VM's state dir is, pods' and template builders'.
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// The per-container rootfs images of VM `name`'s pod.
    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.root.join("rootfs").join(name)
    }

    /// The file share of VM `name`'s pod (holds mounts of users' host directories: only
    /// `volumes::remove_staging` may remove it).
    pub fn share(&self, name: &str) -> PathBuf {
        self.root.join("shares").join(name)
    }

    /// Shared erofs images of image layer chains.
    pub fn layer_images(&self) -> PathBuf {
        self.root.join("layer-images")
    }

    /// The pristine writable-layer image every container's writable layer is copied from
    /// (`rootfs/pristine.rs`).
    pub fn pristine_writable_layer(&self) -> PathBuf {
        self.root.join("writable-layer.img")
    }

    /// VM templates.
    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// The warm pool's spare shims, one dir each (`crate::pool`).
    pub fn pool(&self) -> PathBuf {
        self.root.join("pool")
    }

    /// What VM `name` leaves behind if its shim dies: its own dirs (shared ones excluded).
    pub fn per_vm_dirs(&self, name: &str) -> [PathBuf; 2] {
        [self.vm(name), self.rootfs(name)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_made_private_or_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = StateDir::new(dir.path().join("a/spry"));
        fresh.make_private().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(fresh.root()), 0o700);
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::new(&open).make_private().unwrap();
        assert_eq!(mode(&open), 0o700);
    }

    #[test]
    fn every_path_is_under_the_root_and_per_vm_paths_differ_by_name() {
        let state = StateDir::new("/run/spry");
        assert_eq!(state.vm("a"), Path::new("/run/spry/vms/a"));
        assert_eq!(state.rootfs("a"), Path::new("/run/spry/rootfs/a"));
        assert_eq!(state.layer_images(), Path::new("/run/spry/layer-images"));
        assert_eq!(state.templates(), Path::new("/run/spry/templates"));
        assert_eq!(state.per_vm_dirs("b"), [state.vm("b"), state.rootfs("b")]);
    }
}
