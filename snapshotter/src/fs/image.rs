//! One remote layer as a single file: its erofs image (`crate::erofs`), for a VM that
//! attaches the layer as a read-only disk. The mount holds a directory with one file,
//! [`IMAGE_FILE`]; reading it fetches (and verifies) only the chunks of the files the
//! read covers. The layer's own tree mount stays for runc containers.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, ReplyOpen, Request,
};

use super::{AccessRecorder, FsError, ServeOptions};
use crate::erofs::ErofsImage;
use crate::layer::RemoteLayer;

/// Where a snapshot's image is mounted, beside its tree (`<snapshot>/fs`). Spry's shim
/// looks for `<lowerdir>/../erofs/layer.erofs`: keep the two names as they are.
pub const IMAGE_DIR: &str = "erofs";
/// The image's name in its mount.
pub const IMAGE_FILE: &str = "layer.erofs";
const IMAGE_INO: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);

/// The filesystem: a root directory holding the image.
struct ImageFs {
    layer: Arc<RemoteLayer>,
    image: ErofsImage,
    /// Readahead to ask for at init, in bytes (`lazy.readahead_kib`).
    readahead: u32,
    /// The layer's recorder (`lazy.record_accesses`): a VM's reads of the image are
    /// recorded as the files' reads they are, as the tree mount records a container's.
    recorder: Option<Arc<AccessRecorder>>,
}

impl ImageFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            1 => (FileType::Directory, 0o555, 0, 2),
            IMAGE_INO => (FileType::RegularFile, 0o444, self.image.size(), 1),
            _ => return None,
        };
        let mut attr = super::tree::base_attr(ino, kind, perm);
        attr.size = size;
        attr.blocks = size.div_ceil(512);
        attr.nlink = nlink;
        Some(attr)
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Reads of the image are direct (see `open`), so the kernel never reads ahead here;
        // the mount's readahead (its bdi's `read_ahead_kb`) tells the reader of the image
        // how far to read ahead instead: Spry's shim has the guest read the layer's disk
        // with it, so the guest asks for what a recorded prefetch fetched, not 128 KiB
        // past it into cold chunks. Above the kernel's maximum, the kernel's value stays.
        if let Err(max) = config.set_max_readahead(self.readahead.max(4096)) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(IMAGE_INO) {
            Some(attr) if parent.0 == 1 && name == IMAGE_FILE => {
                reply.entry(&TTL, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if ino.0 != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        // Reads reach the daemon as asked, never widened by the host's readahead: a read
        // past the file it is for would fetch the next files' chunks. The reader (the
        // guest) caches what it read in its own page cache.
        reply.opened(FileHandle(0), fuser::FopenFlags::FOPEN_DIRECT_IO);
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
        if ino.0 != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        super::reply_read(reply, "the layer image", offset, || {
            self.image.read_at(offset, size as usize, |entry, at, len| {
                if let Some(recorder) = &self.recorder {
                    let name = &self.layer.index().entries[entry].name;
                    recorder.record(entry, name);
                    recorder.record_read(name, at, len);
                }
                self.layer.read_file(entry, at, len)
            })
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (IMAGE_INO, FileType::RegularFile, IMAGE_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A layer's image mounted at a directory; unmounts when dropped.
pub struct ImageMount {
    session: Option<fuser::BackgroundSession>,
    path: PathBuf,
}

impl ImageMount {
    /// Mounts `image` of `layer` at `path` (which must exist): `path/layer.erofs`, with
    /// the readahead (see `ImageFs::init`) and recorder of the layer's tree mount.
    pub fn mount(
        layer: Arc<RemoteLayer>,
        image: ErofsImage,
        path: &Path,
        name: &str,
        options: &ServeOptions,
    ) -> Result<Self, FsError> {
        let _ = super::detach(path);
        let config =
            super::mount::session_config(format!("spry-image:{name}"), MountOption::NoExec);
        let session = fuser::Session::new(
            ImageFs {
                layer,
                image,
                readahead: options.readahead,
                recorder: options.recorder.clone(),
            },
            path,
            &config,
        )
        .and_then(|s| s.spawn())
        .map_err(|source| FsError::Mount {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            session: Some(session),
            path: path.to_path_buf(),
        })
    }

    /// The image file.
    pub fn image_path(&self) -> PathBuf {
        self.path.join(IMAGE_FILE)
    }

    /// Unmounts and waits for the FUSE threads.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), FsError> {
        match self.session.take() {
            Some(session) => super::mount::end_session(session, &self.path),
            None => Ok(()),
        }
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!(path = %self.path.display(), error = %err, "failed to unmount layer image");
        }
    }
}
