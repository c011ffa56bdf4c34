//! The guest console log: its tail for error reports, and a bound on the memory it holds.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{fallocate, FallocateFlags};

/// How many console lines an exit report carries.
pub const TAIL_LINES: usize = 20;
/// Only the end of the log is read: it can grow large over a pod's life.
const TAIL_BYTES: u64 = 16 * 1024;

/// The last `lines` lines of the file joined by newlines, oldest first;
/// empty when unreadable.
pub fn tail(path: &Path, lines: usize) -> String {
    tail_lines(path, lines).join("\n")
}

fn tail_lines(path: &Path, lines: usize) -> Vec<String> {
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        // The first line was cut by the seek.
        all.remove(0);
    }
    all.iter()
        .map(|line| line.trim_end_matches('\r').to_owned())
        .filter(|line| !line.is_empty())
        .rev()
        .take(lines)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// How often a running VM's console log is checked against [`MAX_RESIDENT`]: the guest
/// is not trusted, and an emulated UART takes a few MiB/s, so a guest flooding its
/// console holds at most about that much more than the bound (a check is one fstat).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Console bytes a VM may hold in its state dir (tmpfs: host RAM) before the oldest go.
const MAX_RESIDENT: u64 = 1024 * 1024;
/// What stays after a trim: far more than error reports quote.
const KEEP: u64 = 256 * 1024;

/// Keeps the console log of a running VM from growing without bound: a pod that lives for
/// months would otherwise fill host RAM a line at a time. Runs until dropped.
pub async fn keep_bounded(path: PathBuf) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        if let Err(error) = trim(&path, MAX_RESIDENT, KEEP) {
            tracing::debug!(path = %path.display(), %error, "cannot trim the console log");
        }
    }
}

/// When more than `max_resident` bytes of the file are allocated, frees all but about the
/// last `keep` bytes by punching a hole over its head. QEMU goes on writing at its own
/// offset and the tail stays where [`tail`] reads it; only the file's apparent size keeps
/// growing, as a sparse file. Returns whether it trimmed.
fn trim(path: &Path, max_resident: u64, keep: u64) -> std::io::Result<bool> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let meta = file.metadata()?;
    if meta.blocks() * 512 <= max_resident {
        return Ok(false);
    }
    let page = 4096;
    let end = meta.len().saturating_sub(keep) / page * page;
    if end == 0 {
        return Ok(false);
    }
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        end as i64,
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let text: String = (0..100).map(|i| format!("line {i}\r\n")).collect();
        std::fs::write(&log, text).unwrap();
        assert_eq!(tail(&log, 3), "line 97\nline 98\nline 99");
        assert!(tail(&dir.path().join("missing"), 3).is_empty());
    }

    #[test]
    fn a_huge_log_is_read_from_its_end_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let last = tail_lines(&log, TAIL_LINES);
        assert_eq!(last.len(), TAIL_LINES);
        assert_eq!(last.last().unwrap(), "line 19999");
        assert!(last.iter().all(|l| l.starts_with("line ")));
    }

    #[test]
    fn trimming_frees_the_head_and_keeps_the_tail() {
        // /dev/shm is tmpfs, like the state dir under /run.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let log = dir.path().join("console.log");
        let text: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, &text).unwrap();
        let size = std::fs::metadata(&log).unwrap().len();
        assert!(!trim(&log, size * 2, 64 * 1024).unwrap(), "under the bound");
        assert!(trim(&log, 256 * 1024, 64 * 1024).unwrap());
        let meta = std::fs::metadata(&log).unwrap();
        assert_eq!(meta.len(), size, "the apparent size stays (sparse)");
        assert!(
            meta.blocks() * 512 <= 64 * 1024 + 8192,
            "{} bytes still held",
            meta.blocks() * 512
        );
        assert_eq!(tail(&log, 2), "line 199998\nline 199999");
        assert!(
            !trim(&log, 256 * 1024, 64 * 1024).unwrap(),
            "nothing more to free"
        );
    }
}
