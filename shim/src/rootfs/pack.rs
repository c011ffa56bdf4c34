//! Packing a directory tree (a layer chain's merged view) into an erofs image without
//! `mkfs.erofs`: one walk reads the tree's metadata, `spry-erofs` lays the image out,
//! and each file's data is copied whole into its extent.
//!
//! Why: mkfs.erofs 1.5 reads and writes in 4 KiB pieces (python's 256 MB image: 83k
//! pwrite and 64k read calls, 0.68 s, mostly system time), and the kubelet path of an
//! in-place image swap waits for that image. Here a file costs an open, a stat and a
//! copy (copy_file_range where the kernel can, a read/write loop of 1 MiB pieces where
//! the two files are on different file systems, as an overlay and the state dir are).
//!
//! The tree is untrusted (image content): every open is confined under the root with
//! no symlink followed (openat2), and each file opened for its data must be the inode
//! the walk saw. A tree the image format cannot hold as it is (an xattr erofs has no
//! prefix for, xattrs over a block, a name over 255 bytes) is [`Packed::Unsupported`]:
//! the caller packs it with mkfs.erofs instead.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, SFlag};
use spry_erofs::{Attr, ErofsImage, Kind, OwnedNode, OwnedTree};

use super::erofs::ErofsError;
use crate::sys;

const ROOT_INO: u64 = OwnedTree::ROOT;
/// The read/write loop's piece, when the kernel cannot copy between the two files.
const PIECE: usize = 1 << 20;
/// At most this many threads copy file data.
const COPY_THREADS: usize = 4;
/// Files a copy thread takes at a time.
const RUN: usize = 32;

/// How a packing ended (errors aside).
#[derive(Debug, PartialEq, Eq)]
pub enum Packed {
    Done,
    /// The tree needs what this writer does not do; the reason, for the log.
    Unsupported(String),
    /// `cancel` was set; the partial image is removed.
    Cancelled,
}

/// Packs `dir` into a new erofs image at `image`, with timestamps, ownership, modes,
/// xattrs and hard links as they are. Leaves no file at `image` unless it returns
/// [`Packed::Done`]. `fits(bytes)` is asked, before anything is written, whether the
/// image's bytes fit where it goes.
pub fn pack(
    dir: &Path,
    image: &Path,
    cancel: &AtomicBool,
    fits: impl FnOnce(u64) -> Result<(), ErofsError>,
) -> Result<Packed, ErofsError> {
    let read_err = |path: &Path, source: io::Error| ErofsError::ReadTree {
        path: dir.join(path),
        source,
    };
    let root = File::open(dir).map_err(|e| read_err(Path::new(""), e))?;
    let tree = match walk(root.as_fd(), cancel) {
        Ok(tree) => tree,
        Err(Stop::Io { path, source }) => return Err(read_err(&path, source)),
        Err(Stop::Image(source)) => return Err(write_err(image, source)),
        Err(Stop::Unsupported(reason)) => return Ok(Packed::Unsupported(reason)),
        Err(Stop::Cancelled) => return Ok(Packed::Cancelled),
    };
    let layout = match ErofsImage::build(&tree.inodes) {
        Ok(layout) => layout,
        Err(e) => return Ok(Packed::Unsupported(e.to_string())),
    };
    let data: u64 = layout.extents().iter().map(|e| e.size).sum();
    fits(layout.metadata().len() as u64 + data)?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|source| write_err(image, source))?;
    let written = write(&tree, &layout, root.as_fd(), &out, cancel);
    // Cancelled at the very end is cancelled too: nobody will rename this image.
    let written = match written {
        Ok(Packed::Done) if cancel.load(Ordering::SeqCst) => Ok(Packed::Cancelled),
        other => other,
    };
    match written {
        Ok(Packed::Done) => Ok(Packed::Done),
        other => {
            let _ = std::fs::remove_file(image);
            match other {
                Ok(packed) => Ok(packed),
                Err(Stop::Image(source)) => Err(write_err(image, source)),
                Err(Stop::Io { path, source }) => Err(read_err(&path, source)),
                Err(Stop::Unsupported(reason)) => Ok(Packed::Unsupported(reason)),
                Err(Stop::Cancelled) => Ok(Packed::Cancelled),
            }
        }
    }
}

fn write_err(image: &Path, source: io::Error) -> ErofsError {
    ErofsError::WriteImage {
        image: image.to_path_buf(),
        source,
    }
}

/// Why a walk or a copy stopped.
enum Stop {
    /// Reading the tree at `path` (relative to its root) failed.
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// Writing the image failed.
    Image(io::Error),
    Unsupported(String),
    Cancelled,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Stop + '_ {
    move |source| Stop::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Like [`io_at`], but a path over the kernel's PATH_MAX (a tree nested deeper than
/// paths can name; opening along it by fds is not worth it for such trees) goes to
/// mkfs.erofs, as every tree did before this packer.
fn open_failed(path: &Path) -> impl FnOnce(io::Error) -> Stop + '_ {
    move |source| match source.raw_os_error() {
        Some(libc::ENAMETOOLONG) => Stop::Unsupported(format!(
            "a path of {} bytes is over PATH_MAX",
            path.as_os_str().len()
        )),
        _ => io_at(path)(source),
    }
}

/// The walked tree, and regular files' paths for their data (by [`OwnedNode::entry`]).
struct DirTree {
    inodes: OwnedTree,
    files: Vec<FileRef>,
}

/// A regular file: where it is under the root, and which inode the walk found there.
struct FileRef {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Reads the tree under `root`, breadth first, one directory open at a time.
fn walk(root: BorrowedFd<'_>, cancel: &AtomicBool) -> Result<DirTree, Stop> {
    let here = Path::new("");
    let stat = fstat(root.as_raw_fd()).map_err(|e| io_at(here)(e.into()))?;
    let xattrs = named(sys::xattr::list_fd(root).map_err(io_at(here))?)?;
    let mut tree = DirTree {
        inodes: OwnedTree::default(),
        files: Vec::new(),
    };
    tree.inodes.push(node_of(&stat, ROOT_INO, xattrs));
    // Non-directories with more than one link, by (device, inode): one erofs inode each.
    let mut linked: HashMap<(u64, u64), u64> = HashMap::new();
    let mut queue = VecDeque::from([(ROOT_INO, PathBuf::new(), (stat.st_dev, stat.st_ino))]);
    while let Some((dir_ino, path, identity)) = queue.pop_front() {
        if cancel.load(Ordering::SeqCst) {
            return Err(Stop::Cancelled);
        }
        let fd = if dir_ino == ROOT_INO {
            root.try_clone_to_owned()
        } else {
            sys::open_beneath(root, &path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
        }
        .map_err(open_failed(&path))?;
        same_inode(&fd, identity).map_err(io_at(&path))?;
        // A second fd on the directory for the per-entry calls: the listing holds the first.
        let at = fd.try_clone().map_err(io_at(&path))?;
        let dir_fd = at.as_raw_fd();
        let mut dir = Dir::from_fd(fd.into_raw_fd()).map_err(|e| io_at(&path)(e.into()))?;
        let mut children = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| io_at(&path)(e.into()))?;
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let child_path = path.join(OsStr::from_bytes(name.to_bytes()));
            let stat = fstatat(Some(dir_fd), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| io_at(&child_path)(e.into()))?;
            let kind = kind_of(&stat);
            let key = (stat.st_dev, stat.st_ino);
            if kind != Kind::Directory && stat.st_nlink > 1 {
                if let Some(&ino) = linked.get(&key) {
                    add_link(&mut tree.inodes, ino);
                    children.push((name.to_bytes().to_vec(), ino));
                    continue;
                }
            }
            let ino = tree.inodes.nodes.len() as u64 + 1;
            let xattrs = sys::xattr::list_at(at.as_fd(), name).map_err(io_at(&child_path))?;
            let mut node = node_of(&stat, dir_ino, named(xattrs)?);
            match kind {
                Kind::Directory => {
                    queue.push_back((ino, child_path, key));
                    add_link(&mut tree.inodes, dir_ino);
                }
                Kind::Symlink => {
                    let target = nix::fcntl::readlinkat(Some(dir_fd), name)
                        .map_err(|e| io_at(&child_path)(e.into()))?;
                    node.symlink = Some(target.into_encoded_bytes());
                }
                Kind::Regular => {
                    node.entry = Some(tree.files.len());
                    tree.files.push(FileRef {
                        path: child_path,
                        dev: stat.st_dev,
                        ino: stat.st_ino,
                    });
                }
                _ => {}
            }
            if kind != Kind::Directory && stat.st_nlink > 1 {
                linked.insert(key, ino);
            }
            tree.inodes.push(node);
            children.push((name.to_bytes().to_vec(), ino));
        }
        if let Some(dir) = tree.inodes.get_mut(dir_ino) {
            dir.children = children;
        }
    }
    Ok(tree)
}

/// One more link to `ino`: another name of a file, or a subdirectory's `..`.
fn add_link(inodes: &mut OwnedTree, ino: u64) {
    if let Some(node) = inodes.get_mut(ino) {
        node.attr.nlink += 1;
    }
}

/// Refuses an fd that is not the inode the walk found at its path (the tree changed).
fn same_inode(fd: &OwnedFd, (dev, ino): (u64, u64)) -> io::Result<()> {
    let stat = fstat(fd.as_raw_fd())?;
    if (stat.st_dev, stat.st_ino) != (dev, ino) {
        return Err(io::Error::other(
            "the file changed while its image was being packed",
        ));
    }
    Ok(())
}

/// xattr names as erofs takes them (UTF-8); others are the mkfs.erofs path's.
fn named(xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Vec<(String, Vec<u8>)>, Stop> {
    xattrs
        .into_iter()
        .map(|(name, value)| match String::from_utf8(name) {
            Ok(name) => Ok((name, value)),
            Err(e) => Err(Stop::Unsupported(format!(
                "xattr name {:?} is not UTF-8",
                String::from_utf8_lossy(e.as_bytes())
            ))),
        })
        .collect()
}

fn kind_of(stat: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Kind::Directory,
        SFlag::S_IFLNK => Kind::Symlink,
        SFlag::S_IFCHR => Kind::CharDevice,
        SFlag::S_IFBLK => Kind::BlockDevice,
        SFlag::S_IFIFO => Kind::Fifo,
        SFlag::S_IFSOCK => Kind::Socket,
        _ => Kind::Regular,
    }
}

fn node_of(stat: &FileStat, parent: u64, xattrs: Vec<(String, Vec<u8>)>) -> OwnedNode {
    let kind = kind_of(stat);
    let mtime = u64::try_from(stat.st_mtime)
        .ok()
        .map_or(UNIX_EPOCH, |secs| {
            UNIX_EPOCH + Duration::new(secs, stat.st_mtime_nsec.clamp(0, 999_999_999) as u32)
        });
    let (major, minor) = (
        nix::sys::stat::major(stat.st_rdev),
        nix::sys::stat::minor(stat.st_rdev),
    );
    OwnedNode {
        attr: Attr {
            kind,
            perm: (stat.st_mode & 0o7777) as u16,
            uid: stat.st_uid,
            gid: stat.st_gid,
            mtime,
            // Directories: 2 and one per subdirectory (counted as they are found);
            // others: one per link found.
            nlink: if kind == Kind::Directory { 2 } else { 1 },
            // The kernel's new_encode_dev.
            rdev: ((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as u32,
            size: if kind == Kind::Regular {
                stat.st_size as u64
            } else {
                0
            },
        },
        parent,
        children: Vec::new(),
        symlink: None,
        xattrs,
        entry: None,
    }
}

/// Writes the image: sized (sparse) first, the metadata, then each file's data, by a
/// few threads taking runs of files in turn (a file's copy is mostly waiting on the
/// kernel, and a node has cores to spare while a container waits for its image).
fn write(
    tree: &DirTree,
    layout: &ErofsImage,
    root: BorrowedFd<'_>,
    out: &File,
    cancel: &AtomicBool,
) -> Result<Packed, Stop> {
    out.set_len(layout.size()).map_err(Stop::Image)?;
    out.write_all_at(layout.metadata(), 0)
        .map_err(Stop::Image)?;
    let extents = layout.extents();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, COPY_THREADS);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Vec<Result<(), Stop>> = std::thread::scope(|scope| {
        let copy = || {
            let mut copier = Copier::new();
            let result = copy_runs(tree, extents, &next, root, out, &mut copier, || {
                cancel.load(Ordering::SeqCst) || failed.load(Ordering::SeqCst)
            });
            if result.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            result
        };
        let threads: Vec<_> = (1..workers).map(|_| scope.spawn(copy)).collect();
        let mut results = vec![copy()];
        for thread in threads {
            results.push(thread.join().expect("a copy thread does not panic"));
        }
        results
    });
    // An error over the cancellation it may have caused in the other threads.
    let mut cancelled = false;
    for result in results {
        match result {
            Ok(()) => {}
            Err(Stop::Cancelled) => cancelled = true,
            Err(stop) => return Err(stop),
        }
    }
    Ok(if cancelled {
        Packed::Cancelled
    } else {
        Packed::Done
    })
}

#[path = "pack_copy.rs"]
mod copy;
use copy::{copy_runs, Copier};

#[cfg(test)]
#[path = "pack_tests.rs"]
mod tests;
