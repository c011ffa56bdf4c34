//! Reading the tail of the guest console log for error reports.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

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
}
