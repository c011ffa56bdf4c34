//! The packer's data copy: each regular file's bytes into its extent of the image.

use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;

use super::{io_at, open_failed, same_inode, DirTree, FileRef, Stop, PIECE, RUN};
use crate::sys;

/// Copies runs of [`RUN`] extents, taking the next run from `next`, until none is left.
pub(super) fn copy_runs(
    tree: &DirTree,
    extents: &[spry_erofs::Extent],
    next: &AtomicUsize,
    root: BorrowedFd<'_>,
    out: &File,
    copier: &mut Copier,
    stop: impl Fn() -> bool,
) -> Result<(), Stop> {
    loop {
        let start = next.fetch_add(RUN, Ordering::SeqCst);
        if start >= extents.len() {
            return Ok(());
        }
        let run = &extents[start..extents.len().min(start + RUN)];
        if let Some(batch) = Batch::of(run) {
            batch.copy(tree, root, out, copier, &stop)?;
            continue;
        }
        for extent in run {
            let (file, source) = open_source(tree, root, extent, &stop)?;
            copier
                .copy(&source, out, extent.offset, extent.size)
                .map_err(|(on_source, e)| {
                    if on_source {
                        io_at(&file.path)(e)
                    } else {
                        Stop::Image(e)
                    }
                })?;
        }
    }
}

/// Opens the file of `extent`, refusing one that is not the inode the walk saw.
fn open_source<'t>(
    tree: &'t DirTree,
    root: BorrowedFd<'_>,
    extent: &spry_erofs::Extent,
    stop: &impl Fn() -> bool,
) -> Result<(&'t FileRef, File), Stop> {
    if stop() {
        return Err(Stop::Cancelled);
    }
    let file = &tree.files[extent.entry];
    let source =
        sys::open_beneath(root, &file.path, OFlag::O_RDONLY).map_err(open_failed(&file.path))?;
    same_inode(&source, (file.dev, file.ino)).map_err(io_at(&file.path))?;
    Ok((file, File::from(source)))
}

/// A run of small files whose data spans at most [`PIECE`] of the image: read into one
/// buffer and written with one call. Why: a write takes the image's inode lock, and with
/// one write per file (python's image: 11k files, most under a few KiB) the copy threads
/// spent their time waiting for each other on it.
struct Batch<'a> {
    run: &'a [spry_erofs::Extent],
    start: u64,
    len: usize,
}

impl<'a> Batch<'a> {
    fn of(run: &'a [spry_erofs::Extent]) -> Option<Self> {
        let (first, last) = (run.first()?, run.last()?);
        let len = usize::try_from(last.offset + last.size - first.offset).ok()?;
        (len <= PIECE).then_some(Self {
            run,
            start: first.offset,
            len,
        })
    }

    fn copy(
        &self,
        tree: &DirTree,
        root: BorrowedFd<'_>,
        out: &File,
        copier: &mut Copier,
        stop: &impl Fn() -> bool,
    ) -> Result<(), Stop> {
        let buf = copier.piece();
        // Zeros between extents (block padding) and after a source shorter than its size.
        buf[..self.len].fill(0);
        for extent in self.run {
            let (file, source) = open_source(tree, root, extent, stop)?;
            let at = (extent.offset - self.start) as usize;
            read_up_to(&source, &mut buf[at..at + extent.size as usize])
                .map_err(io_at(&file.path))?;
        }
        out.write_all_at(&buf[..self.len], self.start)
            .map_err(Stop::Image)
    }
}

/// Fills `buf` from the start of `file`, or as much as the file has.
fn read_up_to(file: &File, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies file data in the kernel while it can, else through a buffer.
pub(super) struct Copier {
    in_kernel: bool,
    buf: Vec<u8>,
}

impl Copier {
    pub(super) fn new() -> Self {
        Self {
            in_kernel: true,
            buf: Vec::new(),
        }
    }

    /// The copy buffer ([`PIECE`] bytes), allocated on first use.
    fn piece(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0; PIECE];
        }
        &mut self.buf
    }

    /// Copies `len` bytes of `source` to `out` at `offset`. A source shorter than `len`
    /// leaves zeros (the image's size fields say `len`). Errors say whether the source
    /// (true) or the image failed.
    fn copy(
        &mut self,
        source: &File,
        out: &File,
        offset: u64,
        len: u64,
    ) -> Result<(), (bool, io::Error)> {
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(PIECE as u64 * 64) as usize;
            if self.in_kernel {
                let mut off_in = done as i64;
                let mut off_out = (offset + done) as i64;
                match nix::fcntl::copy_file_range(
                    source,
                    Some(&mut off_in),
                    out,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(0) => return Ok(()),
                    Ok(n) => done += n as u64,
                    Err(Errno::EINTR) => {}
                    // Different file systems (EXDEV), or one that cannot: copy by hand.
                    Err(Errno::EXDEV | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS) => {
                        self.in_kernel = false;
                    }
                    Err(e) => return Err((false, e.into())),
                }
                continue;
            }
            let want = want.min(PIECE);
            let buf = self.piece();
            let n = match source.read_at(&mut buf[..want], done) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((true, e)),
            };
            out.write_all_at(&buf[..n], offset + done)
                .map_err(|e| (false, e))?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use spry_erofs::{Extent, OwnedTree};

    use super::*;

    fn file_ref(root: &Path, name: &str) -> FileRef {
        let meta = std::fs::metadata(root.join(name)).unwrap();
        FileRef {
            path: name.into(),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    fn copy_all(tree: &DirTree, extents: &[Extent], root: &Path, out: &File) -> Result<(), Stop> {
        let root = File::open(root).unwrap();
        copy_runs(
            tree,
            extents,
            &AtomicUsize::new(0),
            root.as_fd(),
            out,
            &mut Copier::new(),
            || false,
        )
    }

    /// What the walk saw: `names` with their sizes then, one extent per block.
    fn walked(root: &Path, names: &[(&str, u64)]) -> (DirTree, Vec<Extent>) {
        let files = names.iter().map(|(name, _)| file_ref(root, name)).collect();
        let extents = names
            .iter()
            .enumerate()
            .map(|(entry, (_, size))| Extent {
                offset: entry as u64 * 4096,
                size: *size,
                entry,
            })
            .collect();
        let tree = DirTree {
            inodes: OwnedTree::default(),
            files,
        };
        (tree, extents)
    }

    #[test]
    fn a_batch_puts_each_file_at_its_extent_and_zeros_past_a_shrunk_files_end() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a"), b"aaaaaaaaaa").unwrap();
        std::fs::write(root.path().join("b"), b"bbbbb").unwrap();
        let (tree, extents) = walked(root.path(), &[("a", 10), ("b", 5)]);
        assert!(
            Batch::of(&extents).is_some(),
            "two small files make one batch"
        );
        // Shrunk after the walk: its extent keeps the walked size, the rest reads as zeros.
        std::fs::write(root.path().join("a"), b"AAA").unwrap();
        let image = tempfile::tempfile().unwrap();
        // Stale bytes where the batch writes: all of them are overwritten.
        image.write_all_at(&[0xee; 8192], 0).unwrap();
        assert!(copy_all(&tree, &extents, root.path(), &image).is_ok());
        let mut got = vec![0u8; 4096 + 5];
        image.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got[..3], b"AAA");
        assert!(
            got[3..4096].iter().all(|b| *b == 0),
            "past a's end and the padding"
        );
        assert_eq!(&got[4096..], b"bbbbb");
    }

    #[test]
    fn a_file_replaced_after_the_walk_is_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a"), b"a").unwrap();
        std::fs::write(root.path().join("b"), b"b").unwrap();
        let (tree, extents) = walked(root.path(), &[("a", 1), ("b", 1)]);
        // Another inode under b's name (made while b's exists, so never b's number).
        std::fs::write(root.path().join("b2"), b"x").unwrap();
        std::fs::rename(root.path().join("b2"), root.path().join("b")).unwrap();
        let image = tempfile::tempfile().unwrap();
        match copy_all(&tree, &extents, root.path(), &image) {
            Err(Stop::Io { path, .. }) => assert_eq!(path, Path::new("b")),
            Err(_) => panic!("another error than the changed file"),
            Ok(()) => panic!("a replaced file was copied"),
        }
    }
}
