//! Open files and FUSE passthrough. A regular file whose chunks are all cached is opened
//! in passthrough mode: the kernel reads it from its verified backing file (see
//! `cache/files.rs`) without asking the daemon. Files still being fetched are opened
//! through the daemon as before; the switch is per open and invisible to readers.
//!
//! The kernel puts each inode in one of two io modes: while any open of it goes through
//! the daemon (page-cached), it refuses a passthrough open with EIO to the opener, and
//! while passthrough opens exist, it refuses daemon opens; all passthrough opens of an
//! inode must also share one backing id. This module keeps the same books so that it
//! never asks for a mode the kernel would refuse.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

use super::FsStats;
use crate::cache::BackingFile;

/// The open files of one layer filesystem.
pub(super) struct OpenFiles {
    /// Passthrough was asked for and the kernel agreed at init.
    enabled: AtomicBool,
    /// Said once: why passthrough is off.
    warned: AtomicBool,
    next_fh: AtomicU64,
    books: Mutex<Books>,
    /// Counted before each answer: once a reader has its file, the count includes it.
    stats: Arc<FsStats>,
}

#[derive(Default)]
struct Books {
    inodes: HashMap<u64, InodeIo>,
    handles: HashMap<u64, Handle>,
    /// Inodes holding a backing id, and their files' bytes.
    kept: usize,
    kept_bytes: u64,
}

/// Each kept id pins an open file in the kernel, and its disk space even after the cache
/// evicts it: bounded in count and in bytes.
const KEPT_BACKING_IDS: usize = 4096;
const KEPT_BACKING_BYTES: u64 = 256 << 20;

impl Books {
    /// Drops the backing ids no open handle uses, once more than the bounds are kept.
    fn bound_kept(&mut self) {
        if self.kept <= KEPT_BACKING_IDS && self.kept_bytes <= KEPT_BACKING_BYTES {
            return;
        }
        let (mut kept, mut kept_bytes) = (0, 0);
        for io in self.inodes.values_mut() {
            match &io.backing {
                Some(id) if Arc::strong_count(id) == 1 => io.backing = None,
                Some(_) => {
                    kept += 1;
                    kept_bytes += io.backing_bytes;
                }
                None => {}
            }
        }
        (self.kept, self.kept_bytes) = (kept, kept_bytes);
    }
}

#[derive(Default)]
struct InodeIo {
    /// Open handles answered through the daemon.
    daemon_opens: u32,
    /// The backing id its passthrough opens share. Kept after they close (up to
    /// `KEPT_BACKING_IDS` per filesystem): a file opened again, as most are, then costs no
    /// reopen and registration.
    backing: Option<Arc<BackingId>>,
    /// Size of the file behind `backing`.
    backing_bytes: u64,
    /// The backing file this process verified: later opens reopen it without hashing.
    verified: Option<PathBuf>,
}

enum Handle {
    Daemon { ino: u64 },
    Passthrough { _backing: Arc<BackingId> },
}

impl OpenFiles {
    pub(super) fn new(stats: Arc<FsStats>) -> Self {
        OpenFiles {
            enabled: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            next_fh: AtomicU64::new(0),
            books: Mutex::default(),
            stats,
        }
    }

    /// Turns passthrough on (the kernel supports it).
    pub(super) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Turns passthrough off for this filesystem, saying why once.
    pub(super) fn disable(&self, why: &str) {
        self.enabled.store(false, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                reason = why,
                "FUSE passthrough is off: fetched files are read through the daemon (slower)"
            );
        }
    }

    /// Whether passthrough is on.
    pub(super) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Answers the open of inode `ino`: in passthrough mode when the inode's io mode allows
    /// it and `backing` yields its verified file, through the daemon otherwise.
    /// `backing(None)` verifies (or assembles) the file; `backing(Some(path))` reopens a
    /// file this process already verified.
    pub(super) fn open(
        &self,
        ino: u64,
        reply: ReplyOpen,
        backing: impl Fn(Option<&PathBuf>) -> Option<BackingFile>,
    ) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
        let verified = {
            let mut books = self.lock();
            let io = books.inodes.entry(ino).or_default();
            if io.daemon_opens > 0 || (!self.enabled() && io.backing.is_none()) {
                return self.open_through_daemon(books, ino, fh, reply);
            }
            if let Some(id) = io.backing.clone() {
                return self.open_passthrough(books, fh, id, reply);
            }
            io.verified.clone()
        };
        // Hashing a file takes a while: not under the lock.
        let file = backing(verified.as_ref()).or_else(|| verified.and_then(|_| backing(None)));
        let mut books = self.lock();
        let io = books.inodes.entry(ino).or_default();
        // Another open may have settled the inode's mode meanwhile.
        if io.daemon_opens > 0 {
            return self.open_through_daemon(books, ino, fh, reply);
        }
        if let Some(id) = io.backing.clone() {
            return self.open_passthrough(books, fh, id, reply);
        }
        let Some(file) = file else {
            io.verified = None;
            return self.open_through_daemon(books, ino, fh, reply);
        };
        match reply.open_backing(&file.file) {
            Ok(id) => {
                let id = Arc::new(id);
                let bytes = file.file.metadata().map(|m| m.len()).unwrap_or(0);
                io.backing = Some(id.clone());
                io.backing_bytes = bytes;
                io.verified = Some(file.path);
                books.kept += 1;
                books.kept_bytes += bytes;
                books.bound_kept();
                self.open_passthrough(books, fh, id, reply)
            }
            Err(err) => {
                // EPERM (no CAP_SYS_ADMIN), ELOOP (the cache is on a stacked filesystem):
                // nothing later would do better.
                self.disable(&format!(
                    "registering {} as a backing file failed: {err}",
                    file.path.display()
                ));
                self.open_through_daemon(books, ino, fh, reply)
            }
        }
    }

    /// Answers an open that must not pass through (no contents, a poisoned layer):
    /// through the daemon, tracked like any other.
    pub(super) fn open_plain(&self, ino: u64, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
        self.open_through_daemon(self.lock(), ino, fh, reply)
    }

    /// Forgets handle `fh` (the kernel closed it).
    pub(super) fn release(&self, fh: u64) {
        let mut books = self.lock();
        if let Some(Handle::Daemon { ino }) = books.handles.remove(&fh) {
            if let Some(io) = books.inodes.get_mut(&ino) {
                io.daemon_opens = io.daemon_opens.saturating_sub(1);
            }
        }
        self.stats.releases.fetch_add(1, Ordering::Relaxed);
    }

    fn open_through_daemon(
        &self,
        mut books: std::sync::MutexGuard<'_, Books>,
        ino: u64,
        fh: u64,
        reply: ReplyOpen,
    ) {
        books.inodes.entry(ino).or_default().daemon_opens += 1;
        books.handles.insert(fh, Handle::Daemon { ino });
        drop(books);
        self.stats.daemon_opens.fetch_add(1, Ordering::Relaxed);
        // Contents never change: let the page cache keep them.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn open_passthrough(
        &self,
        mut books: std::sync::MutexGuard<'_, Books>,
        fh: u64,
        id: Arc<BackingId>,
        reply: ReplyOpen,
    ) {
        books.handles.insert(
            fh,
            Handle::Passthrough {
                _backing: id.clone(),
            },
        );
        drop(books);
        self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        // `id` is held until the kernel has its reference: no release can close it first.
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }
}
