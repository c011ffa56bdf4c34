//! On-disk chunk cache keyed by chunk digest, with coalescing of concurrent
//! fills: when several readers miss the same chunk, one fetches it and the
//! others wait for it.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};

mod diff_ids;
mod evict;
mod files;

pub use files::{assembled_key, BackingFile, Piece, Verified};

/// Errors of the chunk cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("failed to create the cache directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("the chunk cache at {path} is out of disk space")]
    DiskFull { path: PathBuf },
    #[error("failed to write cache entry {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("failed to read cache entry {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("digest {digest:?} is not a sha256 digest")]
    BadDigest { digest: String },
}

/// Outcome of [`ChunkCache::get_or_fill`] when the fill itself failed.
#[derive(Debug, thiserror::Error)]
pub enum FillError<E: std::error::Error + 'static> {
    #[error("failed to fetch the chunk")]
    Fill { source: E },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

#[derive(Default)]
struct InFlight {
    done: Mutex<bool>,
    cv: Condvar,
}

/// The right to fill one chunk ([`ChunkCache::claim`]); dropping it unfilled lets waiting
/// readers fetch the chunk themselves.
pub struct FillClaim<'a> {
    cache: &'a ChunkCache,
    digest: String,
    flight: Arc<InFlight>,
}

impl FillClaim<'_> {
    /// The digest claimed.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Stores the chunk's verified bytes and releases the waiting readers.
    pub fn fill(self, data: &[u8]) -> Result<(), CacheError> {
        self.cache.insert(&self.digest, data)
    }
}

impl Drop for FillClaim<'_> {
    fn drop(&mut self) {
        self.cache.end_flight(&self.digest, &self.flight);
    }
}

// Open chunk files kept around: FUSE reads come in 128 KiB pieces, and
// reopening the chunk file for each one costs more than the read itself.
const OPEN_FILES: usize = 256;

/// A directory of verified chunks, `sha256/<hex>`.
pub struct ChunkCache {
    dir: PathBuf,
    in_flight: Mutex<HashMap<String, Arc<InFlight>>>,
    open_files: Mutex<HashMap<String, Arc<fs::File>>>,
    /// Most bytes kept (0: no bound); see `evict.rs`.
    limit: u64,
    /// This process's view of the cache's size: a scan at open plus what it added.
    approx_size: AtomicU64,
    /// Chunks this process wrote or hashed: known to match their digests.
    sound: Mutex<std::collections::HashSet<String>>,
}

impl ChunkCache {
    /// Opens (creating if needed) the cache under `dir`.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let sha = dir.join("sha256");
        // Chunks are image content: the cache is root's alone, like the snapshot root.
        crate::private::create_dir(dir)
            .and_then(|_| fs::create_dir_all(&sha))
            .map_err(|source| CacheError::CreateDir {
                path: sha.clone(),
                source,
            })?;
        Ok(ChunkCache {
            dir: dir.to_path_buf(),
            in_flight: Mutex::new(HashMap::new()),
            open_files: Mutex::new(HashMap::new()),
            limit: 0,
            approx_size: AtomicU64::new(0),
            sound: Mutex::default(),
        })
    }

    /// Bounds the cache to `max_bytes` (0: unbounded), evicting least recently used
    /// chunks when a fill passes it.
    pub fn with_limit(mut self, max_bytes: u64) -> Self {
        self.limit = max_bytes;
        if max_bytes > 0 {
            *self.approx_size.get_mut() = self.size();
        }
        self
    }

    /// Directory of the cache.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self.dir.join("sha256").join(sha256_hex(digest)?))
    }

    /// Whether the chunk is cached.
    pub fn contains(&self, digest: &str) -> bool {
        if self
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(digest)
        {
            return true;
        }
        self.path_of(digest).map(|p| p.exists()).unwrap_or(false)
    }

    /// An open handle of a cached chunk, `None` if not cached.
    fn open_chunk(&self, digest: &str) -> Result<Option<Arc<fs::File>>, CacheError> {
        if let Some(f) = self
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            return Ok(Some(f.clone()));
        }
        let path = self.path_of(digest)?;
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CacheError::Read { path, source }),
        };
        if !self.sound(digest, &file, &path)? {
            return Ok(None);
        }
        Self::touch(&file);
        let file = Arc::new(file);
        let mut open = self.open_files.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        open.insert(digest.to_string(), file.clone());
        Ok(Some(file))
    }

    /// Whether the cached chunk `file` holds what `digest` says. Each process hashes a
    /// chunk it did not write itself once, before first serving it: a chunk torn by a
    /// crash or damaged on disk is removed (and so fetched again), never served.
    fn sound(&self, digest: &str, file: &fs::File, path: &Path) -> Result<bool, CacheError> {
        if self
            .sound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(digest)
        {
            return Ok(true);
        }
        let actual = files::hash_file(file).map_err(|source| CacheError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if actual != digest {
            tracing::warn!(%digest, "cached chunk does not match its digest; removed, it will be fetched again");
            self.remove(digest);
            return Ok(false);
        }
        self.mark_sound(digest);
        Ok(true)
    }

    fn mark_sound(&self, digest: &str) {
        self.sound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_string());
    }

    /// Stores a verified chunk. Atomic: readers never see partial entries.
    pub fn insert(&self, digest: &str, data: &[u8]) -> Result<(), CacheError> {
        let path = self.path_of(digest)?;
        if path.exists() {
            return Ok(());
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        // No fsync: syncing each chunk scatters them on disk (reading a cold cache was ~6x
        // slower) and costs a flush per chunk. A chunk a crash left torn is caught when
        // this or a later process first uses it (`sound`), and fetched again.
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            fs::rename(&tmp, &path)
        })();
        if result.is_ok() {
            self.account(data.len() as u64);
            self.mark_sound(digest);
        }
        result.map_err(|source| {
            let _ = fs::remove_file(&tmp);
            if source.raw_os_error() == Some(libc::ENOSPC) {
                CacheError::DiskFull {
                    path: self.dir.clone(),
                }
            } else {
                CacheError::Write { path, source }
            }
        })
    }

    /// Reads `len` bytes at `offset` of a cached chunk; `None` if not cached.
    pub fn read(
        &self,
        digest: &str,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(file) = self.open_chunk(digest)? else {
            return Ok(None);
        };
        let path = self.path_of(digest)?;
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            let n = file
                .read_at(&mut buf[filled..], offset + filled as u64)
                .map_err(|source| CacheError::Read {
                    path: path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(Some(buf))
    }

    /// Claims the filling of `digest` when it is neither cached nor being filled: until the
    /// claim is filled or dropped, [`Self::get_or_fill`] of the digest waits for it rather
    /// than fetching the chunk a second time (a read racing the prefetch that has it in
    /// flight).
    pub fn claim(&self, digest: &str) -> Option<FillClaim<'_>> {
        if self.contains(digest) {
            return None;
        }
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(digest) {
            return None;
        }
        let flight = Arc::new(InFlight::default());
        map.insert(digest.to_string(), flight.clone());
        Some(FillClaim {
            cache: self,
            digest: digest.to_string(),
            flight,
        })
    }

    fn end_flight(&self, digest: &str, flight: &InFlight) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest);
        *flight.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        flight.cv.notify_all();
    }

    /// Makes sure the chunk is cached, calling `fill` to produce its verified
    /// bytes unless another thread is already doing so for the same digest.
    pub fn get_or_fill<E, F>(&self, digest: &str, fill: F) -> Result<(), FillError<E>>
    where
        E: std::error::Error + 'static,
        F: FnOnce() -> Result<Vec<u8>, E>,
    {
        // Wait at most once for another filler: if it failed, fill ourselves
        // instead of queueing behind a possibly failing leader forever.
        let mut waited = false;
        loop {
            if self.contains(digest) {
                return Ok(());
            }
            let leader = {
                let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(digest) {
                    Some(existing) if !waited => Err(existing.clone()),
                    _ => {
                        let mine = Arc::new(InFlight::default());
                        map.insert(digest.to_string(), mine.clone());
                        Ok(mine)
                    }
                }
            };
            match leader {
                Err(other) => {
                    let mut done = other.done.lock().unwrap_or_else(|p| p.into_inner());
                    while !*done {
                        done = other.cv.wait(done).unwrap_or_else(|p| p.into_inner());
                    }
                    waited = true;
                }
                Ok(mine) => {
                    let result = fill()
                        .map_err(|source| FillError::Fill { source })
                        .and_then(|data| self.insert(digest, &data).map_err(FillError::from));
                    self.end_flight(digest, &mine);
                    return result;
                }
            }
        }
    }

    /// Total bytes of cached chunks and assembled files.
    pub fn size(&self) -> u64 {
        self.entries()
            .filter_map(|path| fs::metadata(path).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// The 64 hex digits of a `sha256:` digest: a file name, never a path.
fn sha256_hex(digest: &str) -> Result<&str, CacheError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| CacheError::BadDigest {
            digest: digest.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    #[test]
    fn insert_and_read_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        assert_eq!(cache.read(D, 0, 5).unwrap(), None);
        cache.insert(D, b"hello").unwrap();
        assert_eq!(cache.read(D, 1, 3).unwrap().unwrap(), b"ell");
        assert_eq!(cache.read(D, 3, 10).unwrap().unwrap(), b"lo");
        assert!(matches!(
            cache.insert("md5:x", b"x"),
            Err(CacheError::BadDigest { .. })
        ));
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path()).unwrap());
        let fills = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                let fills = fills.clone();
                std::thread::spawn(move || {
                    cache
                        .get_or_fill::<Boom, _>(D, || {
                            fills.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            Ok(b"hello".to_vec())
                        })
                        .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fills.load(Ordering::SeqCst), 1);
        assert_eq!(cache.read(D, 0, 5).unwrap().unwrap(), b"hello");
    }

    #[test]
    fn a_chunk_another_process_left_is_hashed_before_it_is_served() {
        let dir = tempfile::tempdir().unwrap();
        ChunkCache::open(dir.path())
            .unwrap()
            .insert(D, b"hello")
            .unwrap();
        // Torn by a crash (chunks are not fsynced): same length, other bytes.
        std::fs::write(dir.path().join("sha256").join(&D[7..]), b"hellx").unwrap();
        let later = ChunkCache::open(dir.path()).unwrap();
        assert_eq!(
            later.read(D, 0, 5).unwrap(),
            None,
            "a torn chunk was served"
        );
        assert!(!later.contains(D), "the torn chunk was kept");
        later.insert(D, b"hello").unwrap();
        assert_eq!(later.read(D, 0, 5).unwrap().unwrap(), b"hello");
    }

    #[test]
    fn failed_fill_is_reported_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let err = cache.get_or_fill(D, || Err(Boom)).unwrap_err();
        assert!(matches!(err, FillError::Fill { .. }));
        assert!(!cache.contains(D));
    }

    #[test]
    fn a_reader_of_a_claimed_chunk_waits_for_the_claim_instead_of_fetching() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let fills = AtomicUsize::new(0);
        let claim = cache.claim(D).unwrap();
        assert!(cache.claim(D).is_none(), "claimed twice");
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                cache.get_or_fill(D, || -> Result<Vec<u8>, Boom> {
                    fills.fetch_add(1, Ordering::SeqCst);
                    Ok(b"hello".to_vec())
                })
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            claim.fill(b"hello").unwrap();
            reader.join().unwrap().unwrap();
        });
        assert_eq!(fills.load(Ordering::SeqCst), 0, "the reader fetched too");
        assert!(cache.claim(D).is_none(), "a cached chunk was claimable");

        // A claim dropped unfilled (its fetch failed) leaves the reader to fetch it.
        let other = "sha256:486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7";
        let claim = cache.claim(other).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                cache.get_or_fill(other, || -> Result<Vec<u8>, Boom> { Ok(b"world".to_vec()) })
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(claim);
            reader.join().unwrap().unwrap();
        });
        assert_eq!(cache.read(other, 0, 5).unwrap().unwrap(), b"world");
    }
}
