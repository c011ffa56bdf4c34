//! The cache's size bound: least recently used chunks go first. Layer daemons share the
//! directory, so the bound is kept by scanning it (a few thousand files), not by one
//! process's bookkeeping; recency is each file's mtime, refreshed when a chunk is opened.
//! Assembled files (`files.rs`) count and age the same way.
//! An evicted chunk that a layer still needs is fetched again on its next read.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::files::FILES_DIR;
use super::ChunkCache;

/// After eviction the cache is at most this share of its limit: room to fill before the
/// next scan.
const LOW_WATER_PERCENT: u64 = 90;

/// Recency is kept to this precision.
const TOUCH_GRANULARITY: std::time::Duration = std::time::Duration::from_secs(600);

impl ChunkCache {
    /// Counts `added` bytes, and evicts when the cache may be over its limit.
    pub(super) fn account(&self, added: u64) {
        if self.limit == 0 {
            return;
        }
        let total = self.approx_size.fetch_add(added, Ordering::Relaxed) + added;
        if total > self.limit {
            self.evict_to(self.limit / 100 * LOW_WATER_PERCENT);
        }
    }

    /// Marks a chunk as just used (its mtime orders eviction). Only when its mtime is
    /// older than `TOUCH_GRANULARITY`: each update dirties the inode (a journal write), and
    /// a layer's first reads open thousands of chunks; eviction needs no finer recency.
    pub(super) fn touch(file: &fs::File) {
        let now = SystemTime::now();
        let fresh = file.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
            now.duration_since(t)
                .is_ok_and(|age| age < TOUCH_GRANULARITY)
        });
        if !fresh {
            let _ = file.set_modified(now);
        }
    }

    /// Removes least recently used chunks until the cache holds at most `target` bytes.
    /// Returns the number of chunks removed.
    pub fn evict_to(&self, target: u64) -> usize {
        let mut chunks: Vec<(SystemTime, u64, PathBuf)> = self
            .entries()
            .filter_map(|path| {
                let meta = fs::metadata(&path).ok()?;
                Some((meta.modified().ok()?, meta.len(), path))
            })
            .collect();
        let mut total: u64 = chunks.iter().map(|c| c.1).sum();
        chunks.sort();
        let mut removed = 0;
        for (_, len, path) in chunks {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
                removed += 1;
                self.forget_open(&path);
            }
        }
        self.approx_size.store(total, Ordering::Relaxed);
        if removed > 0 {
            tracing::info!(
                removed,
                bytes = total,
                limit = self.limit,
                "evicted least recently used chunks"
            );
        }
        removed
    }

    /// Removes the chunk `digest` (its layer's image is gone). Readers holding it open
    /// keep their copy; later reads fetch it again.
    pub fn remove(&self, digest: &str) -> bool {
        match self.path_of(digest) {
            Ok(path) => self.remove_path(&path),
            Err(_) => false,
        }
    }

    /// Removes the assembled file named `key` (see `files.rs`): its layer's image is gone.
    pub fn remove_assembled(&self, key: &str) -> bool {
        if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        self.remove_path(&self.dir.join(FILES_DIR).join(key))
    }

    pub(super) fn remove_path(&self, path: &Path) -> bool {
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let removed = fs::remove_file(path).is_ok();
        if removed {
            self.forget_open(path);
            let _ = self
                .approx_size
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                    Some(s.saturating_sub(len))
                });
        }
        removed
    }

    /// Every complete entry: chunks and assembled files (temporary files have a dot).
    pub(super) fn entries(&self) -> impl Iterator<Item = PathBuf> {
        [self.dir.join("sha256"), self.dir.join(FILES_DIR)]
            .into_iter()
            .flat_map(|dir| fs::read_dir(dir).into_iter().flatten().flatten())
            .filter(|e| !e.file_name().to_string_lossy().contains('.'))
            .map(|e| e.path())
    }

    fn forget_open(&self, path: &Path) {
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            self.open_files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&format!("sha256:{name}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::estargz::sha256_digest;

    fn chunk(i: u8) -> (String, Vec<u8>) {
        let data = vec![i; 1000];
        (sha256_digest(&data), data)
    }

    fn age(cache: &ChunkCache, digest: &str, secs_ago: u64) {
        let f = fs::File::options()
            .write(true)
            .open(cache.path_of(digest).unwrap())
            .unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs_ago))
            .unwrap();
    }

    #[test]
    fn least_recently_used_chunks_go_first_and_the_bound_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap().with_limit(3500);
        let chunks: Vec<_> = (0..3).map(chunk).collect();
        for (i, (d, data)) in chunks.iter().enumerate() {
            cache.insert(d, data).unwrap();
            // Minutes apart: recency is kept to ten minutes.
            age(&cache, d, (100 - i as u64 * 10) * 60);
        }
        // The oldest is read again: now the most recent.
        cache.open_files.lock().unwrap().clear();
        assert!(cache.read(&chunks[0].0, 0, 10).unwrap().is_some());
        let (d3, data3) = chunk(3);
        cache.insert(&d3, &data3).unwrap();
        // 4,000 bytes > 3,500: evicted down to 90% (3,150), oldest first: chunk 1 only.
        assert!(cache.size() <= 3500, "{} bytes", cache.size());
        assert!(
            cache.contains(&chunks[0].0),
            "a chunk just read was evicted"
        );
        assert!(
            !cache.contains(&chunks[1].0),
            "the least recently used chunk was kept"
        );
        assert!(cache.contains(&chunks[2].0) && cache.contains(&d3));
    }

    #[test]
    fn removed_chunks_are_gone_and_no_limit_means_no_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        for i in 0..5 {
            let (d, data) = chunk(i);
            cache.insert(&d, &data).unwrap();
        }
        assert_eq!(cache.size(), 5000);
        let (d0, _) = chunk(0);
        assert!(cache.remove(&d0));
        assert!(!cache.contains(&d0));
        assert!(!cache.remove(&d0));
        assert!(!cache.remove("sha256:../../etc"));
    }
}
