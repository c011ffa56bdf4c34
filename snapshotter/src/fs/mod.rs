//! A read-only FUSE filesystem over one remote eStargz layer. File contents
//! come from [`RemoteLayer`], which fetches and verifies chunks on demand.

mod image;
mod lower;
mod mount;
mod passthrough;
mod tree;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileHandle, Filesystem, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

pub use image::{ImageMount, IMAGE_DIR, IMAGE_FILE};
pub use lower::{DirMeta, LowerLayers};
pub use mount::{detach, detach_stack, LayerMount};
pub use tree::{Node, Tree, OPAQUE_XATTR};

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
    recorder: Option<Arc<AccessRecorder>>,
    /// Ask the kernel for passthrough at init (`lazy.passthrough`).
    want_passthrough: bool,
    /// Readahead to ask for at init (`lazy.readahead_kib`).
    readahead: u32,
    open_files: passthrough::OpenFiles,
    stats: Arc<FsStats>,
    /// What the kernel agreed to at init.
    kernel: KernelFeatures,
}

/// Optional FUSE features the kernel agreed to.
#[derive(Default)]
struct KernelFeatures {
    /// Directories open without an OPENDIR round trip when it answers ENOSYS.
    no_opendir: bool,
}

/// How a mounted layer's files were served (logged at unmount; read by tests).
#[derive(Debug, Default)]
pub struct FsStats {
    /// Opens answered in passthrough mode: the kernel reads those from the cache.
    pub passthrough_opens: AtomicU64,
    /// Opens answered through the daemon.
    pub daemon_opens: AtomicU64,
    /// Handles the kernel closed.
    pub releases: AtomicU64,
    /// Reads the daemon served.
    pub daemon_reads: AtomicU64,
}

/// How a layer is served, besides its contents.
pub struct ServeOptions {
    /// Records first opens and reads (`lazy.record_accesses`); shared with the layer's
    /// image mount, whose reads are the same layer's files read by a VM.
    pub recorder: Option<Arc<AccessRecorder>>,
    /// The layers below it (their directories' attributes).
    pub lowers: LowerLayers,
    /// Serve fully cached files by FUSE passthrough when the kernel can.
    pub passthrough: bool,
    /// The mount's readahead in bytes (the kernel caps it at what it offers).
    pub readahead: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            recorder: None,
            lowers: LowerLayers::default(),
            passthrough: true,
            readahead: crate::config::DEFAULT_READAHEAD_KIB << 10,
        }
    }
}

impl LayerFs {
    /// A filesystem serving `layer` as `options` say.
    pub fn new(layer: Arc<RemoteLayer>, options: ServeOptions) -> Self {
        let tree = Arc::new(Tree::build_over(layer.index(), options.lowers));
        let stats = Arc::<FsStats>::default();
        LayerFs {
            kernel: KernelFeatures::default(),
            layer,
            tree,
            recorder: options.recorder,
            want_passthrough: options.passthrough,
            readahead: options.readahead,
            open_files: passthrough::OpenFiles::new(stats.clone()),
            stats,
        }
    }
}

impl LayerFs {
    /// The entries of directory `ino` from position `offset` on: (inode, position of the
    /// next entry, name). Positions 1 and 2 are "." and "..", 3 + i the i-th entry: resuming
    /// indexes the sorted list (no walk over what was already listed).
    fn listing(
        &self,
        ino: u64,
        offset: u64,
    ) -> Option<impl Iterator<Item = (u64, u64, &str)> + '_> {
        let node = self.tree.get(ino)?;
        let dots = [(ino, "."), (node.parent, "..")];
        let start = offset as usize;
        let listing = dots.into_iter().skip(start).chain(
            node.children
                .get(start.saturating_sub(dots.len())..)
                .unwrap_or_default()
                .iter()
                .map(|(name, child)| (*child, name.as_str())),
        );
        Some(
            listing
                .enumerate()
                .map(move |(i, (child, name))| (child, (start + i + 1) as u64, name)),
        )
    }
}

/// Appends the path of every regular file opened for the first time to a
/// file: the list `convert --prioritized-files` takes (`--record`); and every read the
/// daemon serves, as `OFFSET LENGTH PATH`, to another: what `convert --prefetch-ranges`
/// takes. The reads are the kernel's (readahead included), which is what a later mount
/// of the converted layer will ask for.
pub struct AccessRecorder {
    opens: std::sync::Mutex<(std::fs::File, std::collections::HashSet<usize>)>,
    reads: std::sync::Mutex<std::io::BufWriter<std::fs::File>>,
}

impl AccessRecorder {
    /// Records first opens into `opens` and reads into `reads` (appending).
    pub fn create(opens: &Path, reads: &Path) -> std::io::Result<Self> {
        let append = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        };
        Ok(AccessRecorder {
            opens: std::sync::Mutex::new((append(opens)?, Default::default())),
            reads: std::sync::Mutex::new(std::io::BufWriter::new(append(reads)?)),
        })
    }

    pub(super) fn record(&self, entry: usize, name: &str) {
        let mut guard = self.opens.lock().unwrap_or_else(|p| p.into_inner());
        if guard.1.insert(entry) {
            use std::io::Write;
            let _ = writeln!(guard.0, "{name}");
        }
    }

    pub(super) fn record_read(&self, name: &str, offset: u64, len: usize) {
        use std::io::Write;
        // One line per read: a name with a newline cannot be written (tar allows it).
        if name.contains('\n') {
            return;
        }
        let mut out = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        // Flushed per line: a recording ends by killing the workload, not by unmounting.
        let _ = writeln!(out, "{offset} {len} {name}").and_then(|_| out.flush());
    }
}

fn read_errno(err: &LayerError) -> Errno {
    match err {
        LayerError::Cache(CacheError::DiskFull { .. }) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each saves round trips on an immutable tree; a kernel without one works without it.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_CACHE_SYMLINKS);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        self.kernel.no_opendir = config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        // Above the kernel's maximum (or zero), the kernel's own value stays.
        if let Err(max) = config.set_max_readahead(self.readahead.max(4096)) {
            let _ = config.set_max_readahead(max);
        }
        if !self.want_passthrough {
            return Ok(());
        }
        // Depth 1: the backing files must be on a plain filesystem, and overlayfs can still
        // stack on this one (containerd's overlay over the layers).
        match config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .map_err(|_| "the kernel does not offer FUSE passthrough (Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH)")
            .and_then(|_| {
                config
                    .set_max_stack_depth(1)
                    .map_err(|_| "the kernel refused stack depth 1")
            }) {
            Ok(_) => self.open_files.enable(),
            Err(why) => self.open_files.disable(why),
        }
        Ok(())
    }

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
        let Some(node) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // A poisoned layer's reads fail through the daemon (and while passthrough opens of
        // the file exist, the kernel fails this open): no new passthrough.
        let Some(entry) = node.entry.filter(|_| !self.layer.is_poisoned()) else {
            return self.open_files.open_plain(ino.0, reply);
        };
        let name = &self.layer.index().entries[entry].name;
        if let Some(recorder) = &self.recorder {
            recorder.record(entry, name);
        }
        let layer = &self.layer;
        let backing = |verified: Option<&std::path::PathBuf>| match verified {
            Some(path) => std::fs::File::open(path)
                .ok()
                .map(|file| crate::cache::BackingFile {
                    file,
                    path: path.clone(),
                }),
            // A panic must still answer the kernel (as in `read`).
            None => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                layer.backing_file(entry)
            })) {
                Ok(Ok(file)) => file,
                Ok(Err(err)) => {
                    tracing::warn!(file = %name, error = %error_chain(&err), "cannot pass the file through; reading it through the daemon");
                    None
                }
                Err(_) => {
                    tracing::error!(file = %name, "verifying the backing file panicked; reading it through the daemon");
                    None
                }
            },
        };
        self.open_files.open(ino.0, reply, backing);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open_files.release(fh.0);
        reply.ok();
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
        self.stats.daemon_reads.fetch_add(1, Ordering::Relaxed);
        let name = &self.layer.index().entries[entry].name;
        if let Some(recorder) = &self.recorder {
            recorder.record_read(name, offset, size as usize);
        }
        reply_read(reply, name, offset, || {
            self.layer.read_file(entry, offset, size as usize)
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.kernel.no_opendir {
            // The kernel then opens directories without asking again.
            return reply.error(Errno::ENOSYS);
        }
        reply.opened(FileHandle(0), fuser::FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(listing) = self.listing(ino.0, offset) else {
            return reply.error(Errno::ENOENT);
        };
        for (child, next, name) in listing {
            let kind = self
                .tree
                .get(child)
                .map(|n| n.attr.kind)
                .unwrap_or(fuser::FileType::Directory);
            if reply.add(INodeNo(child), next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    // Entries with their attributes: a walk (`os.walk`, `find`, overlayfs over the layer)
    // then needs no lookup per entry.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(listing) = self.listing(ino.0, offset) else {
            return reply.error(Errno::ENOENT);
        };
        for (child, next, name) in listing {
            let Some(node) = self.tree.get(child) else {
                continue;
            };
            if reply.add(INodeNo(child), next, name, &TTL, &node.attr, Generation(0)) {
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
        // Nothing to flush on a read-only layer: ENOSYS makes the kernel stop sending a
        // FLUSH with every close.
        reply.error(Errno::ENOSYS);
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

/// Answers a read with what `read` gives, EIO when it panics: an unanswered request
/// blocks the reader (and unmounting) forever. `what` names the file in the log.
fn reply_read(
    reply: ReplyData,
    what: &str,
    offset: u64,
    read: impl FnOnce() -> Result<Vec<u8>, LayerError>,
) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(Ok(data)) => reply.data(&data),
        Ok(Err(err)) => {
            tracing::error!(file = %what, offset, error = %error_chain(&err), "read failed");
            reply.error(read_errno(&err));
        }
        Err(_) => {
            tracing::error!(file = %what, offset, "read panicked; answered EIO");
            reply.error(Errno::EIO);
        }
    }
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
mod passthrough_tests;
#[cfg(test)]
mod tests;
