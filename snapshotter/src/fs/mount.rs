//! Mounting a layer filesystem: the mount options, the FUSE session's life, unmounting.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuser::{MountOption, SessionACL};

use super::{AccessRecorder, FsError, FsStats, LayerFs, ServeOptions, FUSE_THREADS};
use crate::layer::RemoteLayer;

/// A mounted layer; unmounts when dropped.
pub struct LayerMount {
    session: Option<fuser::BackgroundSession>,
    path: PathBuf,
    stats: Arc<FsStats>,
}

impl LayerMount {
    /// Mounts `layer` read-only at `path` (which must exist), alone, with passthrough.
    pub fn mount(
        layer: Arc<RemoteLayer>,
        path: &Path,
        name: &str,
        recorder: Option<Arc<AccessRecorder>>,
    ) -> Result<Self, FsError> {
        let options = ServeOptions {
            recorder,
            ..ServeOptions::default()
        };
        Self::mount_with(layer, path, name, options)
    }

    /// Mounts `layer` read-only at `path` (which must exist), served as `options` say.
    pub fn mount_with(
        layer: Arc<RemoteLayer>,
        path: &Path,
        name: &str,
        options: ServeOptions,
    ) -> Result<Self, FsError> {
        // A previous process may have left a dead mount here (ENOTCONN).
        let _ = detach(path);
        let config = session_config(format!("spry:{name}"), MountOption::Exec);
        let fs = LayerFs::new(layer, options);
        let stats = fs.stats.clone();
        let session = fuser::Session::new(fs, path, &config)
            .and_then(|s| s.spawn())
            .map_err(|source| FsError::Mount {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(LayerMount {
            session: Some(session),
            path: path.to_path_buf(),
            stats,
        })
    }

    /// Where the layer is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How its files were served so far.
    pub fn stats(&self) -> &FsStats {
        &self.stats
    }

    /// Unmounts and waits for the FUSE threads.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), FsError> {
        if let Some(session) = self.session.take() {
            let s = &self.stats;
            tracing::info!(
                path = %self.path.display(),
                passthrough_opens = s.passthrough_opens.load(Ordering::Relaxed),
                daemon_opens = s.daemon_opens.load(Ordering::Relaxed),
                daemon_reads = s.daemon_reads.load(Ordering::Relaxed),
                "unmounting layer"
            );
            end_session(session, &self.path)?;
        }
        Ok(())
    }
}

impl Drop for LayerMount {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!(path = %self.path.display(), error = %err, "failed to unmount layer");
        }
    }
}

/// A read-only session of Spry's, named `fs_name`, with `exec` (`Exec` or `NoExec`).
pub(super) fn session_config(fs_name: String, exec: MountOption) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(fs_name),
        MountOption::Subtype("spry".to_string()),
        MountOption::DefaultPermissions,
        // Device numbers and setuid bits come from the image's TOC: honoured on this
        // mount they would let any process that reaches it open a device the image
        // names or gain root. Containers see the layer through their overlay mount,
        // whose own flags govern exec there (setuid binaries in a container still work).
        MountOption::NoDev,
        MountOption::NoSuid,
        exec,
    ];
    // Containers (and VMs, under their jail's uids) run as any uid; the kernel checks
    // modes (DefaultPermissions).
    config.acl = SessionACL::All;
    config.n_threads = Some(FUSE_THREADS);
    config
}

/// Lazily detaches whatever is mounted at `path`.
pub fn detach(path: &Path) -> Result<(), FsError> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|source| FsError::Unmount {
        path: path.to_path_buf(),
        source,
    })
}

/// Detaches every mount stacked at `path` (a layer's tree may be a native mount over a
/// FUSE one; `service/native.rs`), at most a few; returns how many were detached.
pub fn detach_stack(path: &Path) -> usize {
    (0..4).take_while(|_| detach(path).is_ok()).count()
}

/// Unmounts `session`'s mount at `path` and waits for its thread. The thread may end with
/// ECONNABORTED when the kernel tore the connection down as part of the unmount (a
/// request still in flight then): the mount is gone all the same, so that is success.
pub(super) fn end_session(session: fuser::BackgroundSession, path: &Path) -> Result<(), FsError> {
    match session.umount_and_join() {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
            tracing::debug!(path = %path.display(), "the FUSE connection was aborted at unmount");
            Ok(())
        }
        result => result.map_err(|source| FsError::Mount {
            path: path.to_path_buf(),
            source,
        }),
    }
}
