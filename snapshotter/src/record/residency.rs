//! What a recorded workload read, told by the page cache: fanotify says which files were
//! opened, not which bytes were read. The unpacked image's files are written back and
//! dropped from the page cache before the workload starts; once it is stopped, the pages
//! of each opened file that are cached are those it read (with the host file system's
//! readahead, so a superset of what a lazy mount's smaller readahead would ask for).

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

use super::ReadRanges;
use crate::sys::{page_size, resident_pages};

/// Writes back the file system under `root` and drops the page cache of each regular file
/// of `files` (paths relative to `root`). Returns how many stayed cached (a tmpfs
/// `$TMPDIR` cannot drop them: their opens then count as reads of the whole file).
pub fn evict(root: &Path, files: &HashSet<String>) -> usize {
    if let Ok(dir) = std::fs::File::open(root) {
        let _ = nix::unistd::syncfs(dir.as_raw_fd());
    }
    let mut stayed = 0;
    for rel in files {
        let Some((file, len)) = open_regular(&root.join(rel)) else {
            continue;
        };
        let _ = posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        if resident_pages(&file, len).is_ok_and(|pages| pages.iter().any(|&p| p)) {
            stayed += 1;
        }
    }
    stayed
}

/// The cached byte ranges of each of `opened` (relative to `root`, first open first): what
/// the workload read. A file whose cache cannot be read counts as read whole.
pub fn read_ranges(root: &Path, opened: &[String]) -> ReadRanges {
    let page = page_size();
    let mut reads = ReadRanges::default();
    for rel in opened {
        let Some((file, len)) = open_regular(&root.join(rel)) else {
            continue;
        };
        let Ok(pages) = resident_pages(&file, len) else {
            reads.add(rel.clone(), 0, len);
            continue;
        };
        let mut run: Option<u64> = None;
        for (i, resident) in pages.iter().chain([&false]).enumerate() {
            let at = i as u64 * page;
            match (run, *resident) {
                (None, true) => run = Some(at),
                (Some(start), false) => {
                    reads.add(rel.clone(), start, at.min(len));
                    run = None;
                }
                _ => {}
            }
        }
    }
    reads
}

/// The readahead, in KiB, of the block device holding `path`: the grain of what the page
/// cache can tell (a disk reading 8 MiB ahead makes every file the workload touches look
/// read whole). `None` when it is not a block device's file system (tmpfs, overlay).
pub fn device_readahead_kib(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let block = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
    // A partition has no queue of its own: its disk's is one level up.
    [
        block.join("queue/read_ahead_kb"),
        block.join("../queue/read_ahead_kb"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|text| text.trim().parse().ok())
}

/// `path` opened read-only when it is a non-empty regular file (not through a symlink).
fn open_regular(path: &Path) -> Option<(std::fs::File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let len = meta.len();
    (meta.is_file() && len > 0).then_some((file, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    #[test]
    fn the_readahead_is_the_block_devices() {
        // procfs is no block device's.
        assert_eq!(device_readahead_kib(Path::new("/proc")), None);
        // Where the temp dir is on a disk, its queue's value (vda here: 8192).
        if let Some(kib) = device_readahead_kib(&std::env::temp_dir()) {
            assert!(kib > 0 && kib < 1 << 20, "{kib} KiB");
        }
    }

    #[test]
    fn pages_read_after_eviction_are_the_ranges() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7) as u8).collect();
        std::fs::write(dir.path().join("big"), &data).unwrap();
        std::fs::write(dir.path().join("untouched"), b"x").unwrap();
        let files: HashSet<String> = ["big".into(), "untouched".into(), "missing".into()].into();
        if evict(dir.path(), &files) > 0 {
            eprintln!(
                "the page cache of {} cannot be dropped; skipped",
                dir.path().display()
            );
            return;
        }
        // Read 10 bytes at 512 KiB, with readahead off for this file description.
        let mut f = std::fs::File::open(dir.path().join("big")).unwrap();
        posix_fadvise(f.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM).unwrap();
        f.seek(SeekFrom::Start(512 << 10)).unwrap();
        let mut buf = [0u8; 10];
        f.read_exact(&mut buf).unwrap();
        let reads = read_ranges(dir.path(), &["big".into(), "untouched".into()]);
        assert_eq!(reads.paths(), ["big"]);
        let page = page_size();
        assert_eq!(
            reads.into_hot()["big"],
            crate::estargz::HotRanges::Ranges(vec![(512 << 10, (512 << 10) + page)])
        );
    }
}
