//! A read-only FUSE filesystem over one remote eStargz layer. File contents
//! come from [`RemoteLayer`], which fetches and verifies chunks on demand.

mod lower;
mod tree;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, IoctlFlags, LockOwner,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};

pub use lower::{DirMeta, LowerLayers};
pub use tree::{Tree, OPAQUE_XATTR};

use crate::cache::CacheError;
use crate::layer::{LayerError, RemoteLayer};

// Layers are immutable: let the kernel cache attributes and entries.
const TTL: Duration = Duration::from_secs(3600);
const FUSE_THREADS: usize = 4;

/// Errors mounting a layer.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("failed to mount the layer filesystem at {path}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to unmount {path}")]
    Unmount { path: PathBuf, source: nix::Error },
}

/// The FUSE filesystem of one layer.
pub struct LayerFs {
    layer: Arc<RemoteLayer>,
    tree: Arc<Tree>,
    recorder: Option<AccessRecorder>,
}

impl LayerFs {
    /// A filesystem serving `layer` over the layers `lowers`.
    pub fn new(
        layer: Arc<RemoteLayer>,
        recorder: Option<AccessRecorder>,
        lowers: LowerLayers,
    ) -> Self {
        let tree = Arc::new(Tree::build_over(layer.index(), lowers));
        LayerFs {
            layer,
            tree,
            recorder,
        }
    }
}

/// Appends the path of every regular file opened for the first time to a
/// file: the list `convert --prioritized-files` takes (`--record`).
pub struct AccessRecorder {
    out: std::sync::Mutex<(std::fs::File, std::collections::HashSet<usize>)>,
}

impl AccessRecorder {
    /// Records into `path` (appending).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(AccessRecorder {
            out: std::sync::Mutex::new((file, Default::default())),
        })
    }

    fn record(&self, entry: usize, name: &str) {
        let mut guard = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if guard.1.insert(entry) {
            use std::io::Write;
            let _ = writeln!(guard.0, "{name}");
        }
    }
}

fn read_errno(err: &LayerError) -> Errno {
    match err {
        LayerError::Cache(CacheError::DiskFull { .. }) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

impl Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.tree.lookup(parent.0, name) {
            Some(node) => reply.entry(&TTL, &node.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.get(ino.0) {
            Some(node) => reply.attr(&TTL, &node.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.get(ino.0).and_then(|n| n.symlink.as_ref()) {
            Some(target) => reply.data(target),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.tree.get(ino.0) {
            // Contents never change: let the page cache keep them.
            Some(node) => {
                if let (Some(recorder), Some(entry)) = (&self.recorder, node.entry) {
                    recorder.record(entry, &self.layer.index().entries[entry].name);
                }
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(entry) = self.tree.get(ino.0).and_then(|n| n.entry) else {
            return reply.data(&[]);
        };
        // A panic below must still answer the kernel: an unanswered request blocks the
        // reader (and unmounting) forever.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.layer.read_file(entry, offset, size as usize)
        }));
        let name = &self.layer.index().entries[entry].name;
        match read {
            Ok(Ok(data)) => reply.data(&data),
            Ok(Err(err)) => {
                tracing::error!(file = %name, offset, error = %error_chain(&err), "read failed");
                reply.error(read_errno(&err));
            }
            Err(_) => {
                tracing::error!(file = %name, offset, "read panicked; answered EIO");
                reply.error(Errno::EIO);
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(node) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // Offsets are positions: 1 and 2 are "." and "..", 3 + i the i-th entry. Resuming
        // at an offset indexes the sorted list (no walk over what was already listed).
        let dots = [(ino.0, "."), (node.parent, "..")];
        let start = offset as usize;
        let listing = dots.iter().copied().skip(start).chain(
            node.children
                .get(start.saturating_sub(dots.len())..)
                .unwrap_or_default()
                .iter()
                .map(|(name, child)| (*child, name.as_str())),
        );
        for (i, (child, name)) in listing.enumerate() {
            let kind = self
                .tree
                .get(child)
                .map(|n| n.attr.kind)
                .unwrap_or(fuser::FileType::Directory);
            if reply.add(INodeNo(child), (start + i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.layer.index().content_size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.tree.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = self
            .tree
            .get(ino.0)
            .and_then(|n| name.to_str().and_then(|k| n.xattrs.get(k)));
        match value {
            None => reply.error(Errno::ENODATA),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some(v) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(node) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for key in node.xattrs.keys() {
            list.extend_from_slice(key.as_bytes());
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }
}

/// A mounted layer; unmounts when dropped.
pub struct LayerMount {
    session: Option<fuser::BackgroundSession>,
    path: PathBuf,
}

impl LayerMount {
    /// Mounts `layer` read-only at `path` (which must exist), alone.
    pub fn mount(
        layer: Arc<RemoteLayer>,
        path: &Path,
        name: &str,
        recorder: Option<AccessRecorder>,
    ) -> Result<Self, FsError> {
        Self::mount_over(layer, path, name, recorder, LowerLayers::default())
    }

    /// Mounts `layer` read-only at `path` (which must exist), as the layer over `lowers`.
    pub fn mount_over(
        layer: Arc<RemoteLayer>,
        path: &Path,
        name: &str,
        recorder: Option<AccessRecorder>,
        lowers: LowerLayers,
    ) -> Result<Self, FsError> {
        // A previous process may have left a dead mount here (ENOTCONN).
        let _ = detach(path);
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName(format!("spry:{name}")),
            MountOption::Subtype("spry".to_string()),
            MountOption::DefaultPermissions,
            // Device numbers and setuid bits come from the image's TOC: honoured on this
            // mount they would let any process that reaches it open a device the image
            // names or gain root. Containers see the layer through their overlay mount,
            // whose own flags govern exec there (setuid binaries in a container still work).
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::Exec,
        ];
        // Containers run as any uid; the kernel checks modes (DefaultPermissions).
        config.acl = SessionACL::All;
        config.n_threads = Some(FUSE_THREADS);
        let session = fuser::Session::new(LayerFs::new(layer, recorder, lowers), path, &config)
            .and_then(|s| s.spawn())
            .map_err(|source| FsError::Mount {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(LayerMount {
            session: Some(session),
            path: path.to_path_buf(),
        })
    }

    /// Where the layer is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and waits for the FUSE threads.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), FsError> {
        if let Some(session) = self.session.take() {
            session.umount_and_join().map_err(|source| FsError::Mount {
                path: self.path.clone(),
                source,
            })?;
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

/// Lazily detaches whatever is mounted at `path`.
pub fn detach(path: &Path) -> Result<(), FsError> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|source| FsError::Unmount {
        path: path.to_path_buf(),
        source,
    })
}

/// `error: cause: cause` for logs, each cause said once (as the shim's and the agent's).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // A cause some message already quotes (`{source}` in its format) is said once.
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
