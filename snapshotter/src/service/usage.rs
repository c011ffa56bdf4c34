//! Disk usage of a snapshot directory, counting hard links once.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes (allocated blocks) and inodes under `root`.
pub fn disk_usage(root: &Path) -> io::Result<(i64, i64)> {
    let mut seen = HashSet::new();
    let mut size = 0i64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if seen.insert((meta.dev(), meta.ino())) {
            size += meta.blocks() as i64 * 512;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok((size, seen.len() as i64))
}
