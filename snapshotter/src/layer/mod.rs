//! A remote eStargz layer: its verified index, the blob it is read from and
//! the chunk cache. Serves file ranges, prefetches and fetches everything in
//! the background. All reads verify chunk digests before anything is cached.

mod backing;
mod fetch;
mod marked;
mod verify;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use fetch::{BlobFetcher, FetchError};
pub use verify::{chain_id, BlobDigests};

use crate::cache::{CacheError, ChunkCache, FillError};
use crate::estargz::{self, footer, ChunkRef, EstargzError, LayerIndex, Prefetch};

/// Errors of a remote layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("blob is {size} bytes, too small for an eStargz footer")]
    TooSmall { size: u64 },
    #[error("failed to fetch bytes {offset}..{end} of the blob after {attempts} attempts")]
    Fetch {
        offset: u64,
        end: u64,
        attempts: u32,
        source: FetchError,
    },
    #[error("the registry did not answer for bytes {offset}..{end} within {deadline:?}; reads fail at once until {cooldown:?} have passed")]
    Unresponsive {
        offset: u64,
        end: u64,
        deadline: Duration,
        cooldown: Duration,
    },
    #[error("blob is not a valid eStargz layer")]
    Format { source: EstargzError },
    #[error("chunk {digest} failed verification")]
    Verify {
        digest: String,
        source: EstargzError,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("background fetch was cancelled")]
    Cancelled,
    #[error("file entry {index} does not exist in the layer")]
    NoSuchEntry { index: usize },
    #[error("failed to decompress the layer blob")]
    Decompress { source: std::io::Error },
    #[error("the layer is not the one its image claims: {reason}")]
    Poisoned { reason: String },
}

/// How hard to try a range request before giving up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub backoff: Duration,
    /// Bound on one range fetch, all attempts together: a registry that stops answering
    /// (rather than refusing) fails the read with EIO after this, not after attempts ×
    /// the request timeout.
    pub deadline: Duration,
    /// After a fetch missed its deadline, fetches fail at once for this long: the kernel
    /// re-issues a failed read (and readahead asks too), and each would wait again.
    pub cooldown: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(200),
            deadline: Duration::from_secs(20),
            cooldown: Duration::from_secs(5),
        }
    }
}

/// Counters for tests, `warm` progress and the benchmark.
#[derive(Debug, Default)]
pub struct LayerStats {
    pub bytes_fetched: AtomicU64,
    pub requests: AtomicU64,
}

/// An opened eStargz layer.
pub struct RemoteLayer {
    index: LayerIndex,
    fetcher: Arc<dyn BlobFetcher>,
    cache: Arc<ChunkCache>,
    retry: RetryPolicy,
    stats: LayerStats,
    cancelled: AtomicBool,
    /// Set when a fetch missed its deadline: fetches fail at once until then.
    unresponsive_until: std::sync::Mutex<Option<Instant>>,
    /// Why the layer must no longer be served (it is not the layer its image claims).
    poisoned: std::sync::OnceLock<String>,
}

// Batches for background fetching: large enough to amortize a request,
// small enough to bound memory.
const BATCH_BYTES: u64 = 16 << 20;
// Prefetch is on the pod's critical path: fewer, larger requests (one for a typical
// recorded prefetch list), still bounded whatever the layer's landmark says.
const PREFETCH_BATCH_BYTES: u64 = 64 << 20;

impl RemoteLayer {
    /// Fetches the footer and TOC, verifies the TOC against `toc_digest` and
    /// builds the index.
    pub fn open(
        fetcher: Arc<dyn BlobFetcher>,
        cache: Arc<ChunkCache>,
        toc_digest: &str,
        retry: RetryPolicy,
    ) -> Result<Self, LayerError> {
        let layer = RemoteLayer {
            index: LayerIndex::default(),
            fetcher,
            cache,
            retry,
            stats: LayerStats::default(),
            cancelled: AtomicBool::new(false),
            unresponsive_until: std::sync::Mutex::new(None),
            poisoned: std::sync::OnceLock::new(),
        };
        layer.load_index(toc_digest)
    }

    fn load_index(mut self, toc_digest: &str) -> Result<Self, LayerError> {
        let layer = &mut self;
        let size = layer.fetcher.size().map_err(|source| LayerError::Fetch {
            offset: 0,
            end: 0,
            attempts: 1,
            source,
        })?;
        if size < footer::FOOTER_SIZE {
            return Err(LayerError::TooSmall { size });
        }
        let footer_start = size - footer::FOOTER_SIZE;
        let footer_bytes = layer.fetch_range(footer_start, size)?;
        let toc_offset =
            footer::decode(&footer_bytes).map_err(|source| LayerError::Format { source })?;
        if toc_offset >= footer_start {
            return Err(LayerError::Format {
                source: EstargzError::TocOffset {
                    toc_offset,
                    blob_size: size,
                },
            });
        }
        if footer_start - toc_offset > estargz::MAX_TOC_MEMBER {
            return Err(LayerError::Format {
                source: EstargzError::TocTooLarge {
                    what: "compressed member",
                    limit: estargz::MAX_TOC_MEMBER,
                },
            });
        }
        let member = layer.fetch_range(toc_offset, footer_start)?;
        let (toc, digest) = estargz::decode_toc_member(&member, Some(toc_digest))
            .map_err(|source| LayerError::Format { source })?;
        layer.index = LayerIndex::new(toc, toc_offset, digest)
            .map_err(|source| LayerError::Format { source })?;
        Ok(self)
    }

    /// The verified index.
    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    /// Fetch counters.
    pub fn stats(&self) -> &LayerStats {
        &self.stats
    }

    /// Reads up to `len` bytes at `offset` of the regular file at `entry`.
    pub fn read_file(&self, entry: usize, offset: u64, len: usize) -> Result<Vec<u8>, LayerError> {
        if let Some(reason) = self.poisoned.get() {
            return Err(LayerError::Poisoned {
                reason: reason.clone(),
            });
        }
        let file = self
            .index
            .entries
            .get(entry)
            .ok_or(LayerError::NoSuchEntry { index: entry })?;
        let size = file.size.max(0) as u64;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + len as u64).min(size);
        let Some(chunks) = self.index.chunks.get(&entry) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity((end - offset) as usize);
        // Chunks are sorted by file offset; find the first overlapping one.
        let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
        for chunk in &chunks[first..] {
            if chunk.file_offset >= end {
                break;
            }
            let from = offset.max(chunk.file_offset) - chunk.file_offset;
            let to = end.min(chunk.file_offset + chunk.size) - chunk.file_offset;
            // A cached chunk found unsound on first use is removed: fetched again, once.
            let mut bytes = None;
            for _ in 0..2 {
                self.ensure_cached(chunk)?;
                bytes = self.cache.read(&chunk.digest, from, (to - from) as usize)?;
                if bytes.is_some() {
                    break;
                }
            }
            let bytes = bytes.ok_or_else(|| {
                LayerError::Cache(CacheError::Read {
                    path: self.cache.dir().to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "chunk vanished from the cache",
                    ),
                })
            })?;
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    /// Fetches what the layer asks to prefetch: the chunks its TOC marks, or else the
    /// prioritized files (before `.prefetch.landmark`) in as few range requests as batches
    /// allow. Returns the number of compressed bytes fetched.
    pub fn prefetch(&self) -> Result<u64, LayerError> {
        let end = match self.index.prefetch {
            Prefetch::Marked => return self.fetch_marked(),
            Prefetch::UpTo { end } => end,
            Prefetch::Nothing | Prefetch::Unspecified => return Ok(0),
        };
        let chunks = self
            .index
            .all_chunks()
            .into_iter()
            .filter(|c| c.compressed_offset < end);
        self.fetch_chunks(chunks, PREFETCH_BATCH_BYTES, &mut |_, _| {})
    }

    /// Fetches every chunk not yet cached, in batched range requests.
    /// `progress(done, total)` is called with uncompressed byte counts.
    pub fn fetch_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64, LayerError> {
        self.fetch_chunks(self.index.all_chunks().into_iter(), BATCH_BYTES, progress)
    }

    /// Fetches the uncached ones of `chunks` (in blob order) in range requests of contiguous
    /// chunks, each at most `batch_limit` bytes unless one chunk alone is larger (that is
    /// bounded by [`estargz::MAX_CHUNK_RANGE`]): what a layer declares never sizes a request
    /// beyond that.
    fn fetch_chunks(
        &self,
        chunks: impl Iterator<Item = ChunkRef>,
        batch_limit: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, LayerError> {
        let all: Vec<ChunkRef> = chunks.collect();
        let total: u64 = all.iter().map(|c| c.size).sum();
        let mut done = 0;
        let mut fetched = 0;
        let mut batch: Vec<ChunkRef> = Vec::new();
        for chunk in all {
            if self.cancelled.load(Ordering::Relaxed) {
                return Err(LayerError::Cancelled);
            }
            if self.cache.contains(&chunk.digest) {
                done += chunk.size;
                continue;
            }
            let contiguous = batch
                .last()
                .is_none_or(|last| last.compressed_end == chunk.compressed_offset);
            let batch_start = batch
                .first()
                .map(|c| c.compressed_offset)
                .unwrap_or(chunk.compressed_offset);
            if !contiguous || chunk.compressed_end - batch_start > batch_limit {
                fetched += self.fetch_batch(&batch)?;
                done += batch.iter().map(|c| c.size).sum::<u64>();
                progress(done, total);
                batch.clear();
            }
            batch.push(chunk);
        }
        fetched += self.fetch_batch(&batch)?;
        done += batch.iter().map(|c| c.size).sum::<u64>();
        progress(done, total);
        Ok(fetched)
    }

    /// Stops serving the layer: every later read fails (EIO) with `reason`.
    pub fn poison(&self, reason: String) {
        let _ = self.poisoned.set(reason);
    }

    /// Stops a running [`Self::fetch_all`] at the next chunk.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether the chunk with `digest` is cached.
    pub fn is_cached(&self, digest: &str) -> bool {
        self.cache.contains(digest)
    }

    /// Whether every chunk of the layer is cached.
    pub fn fully_cached(&self) -> bool {
        self.index
            .all_chunks()
            .iter()
            .all(|c| self.cache.contains(&c.digest))
    }

    fn fetch_batch(&self, chunks: &[ChunkRef]) -> Result<u64, LayerError> {
        let (Some(first), Some(last)) = (
            chunks.first(),
            chunks.iter().map(|c| c.compressed_end).max(),
        ) else {
            return Ok(0);
        };
        let start = first.compressed_offset;
        let bytes = self.fetch_range(start, last)?;
        for chunk in chunks {
            let from = (chunk.compressed_offset - start) as usize;
            let to = (chunk.compressed_end - start) as usize;
            self.cache
                .get_or_fill(&chunk.digest, || {
                    estargz::decode_chunk(
                        &bytes[from..to],
                        chunk.compressed_offset,
                        chunk.size,
                        &chunk.digest,
                    )
                })
                .map_err(|e| self.fill_error(chunk, e))?;
        }
        Ok(last - start)
    }

    fn ensure_cached(&self, chunk: &ChunkRef) -> Result<(), LayerError> {
        self.cache
            .get_or_fill(&chunk.digest, || -> Result<Vec<u8>, LayerError> {
                let compressed = self.fetch_range(chunk.compressed_offset, chunk.compressed_end)?;
                decode_verified(chunk, &compressed)
            })
            .map_err(|e| match e {
                FillError::Fill { source } => source,
                FillError::Cache(c) => LayerError::Cache(c),
            })
    }

    fn fill_error(&self, chunk: &ChunkRef, e: FillError<EstargzError>) -> LayerError {
        match e {
            FillError::Fill { source } => LayerError::Verify {
                digest: chunk.digest.clone(),
                source,
            },
            FillError::Cache(c) => LayerError::Cache(c),
        }
    }

    /// One range request with bounded retries, all within the policy's deadline.
    fn fetch_range(&self, offset: u64, end: u64) -> Result<Vec<u8>, LayerError> {
        let unresponsive = || LayerError::Unresponsive {
            offset,
            end,
            deadline: self.retry.deadline,
            cooldown: self.retry.cooldown,
        };
        let mut latch = self
            .unresponsive_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *latch {
            Some(until) if Instant::now() < until => return Err(unresponsive()),
            Some(_) => *latch = None,
            None => {}
        }
        drop(latch);
        let deadline = Instant::now() + self.retry.deadline;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(self.mark_unresponsive(unresponsive()));
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let source = match self.fetcher.fetch_within(offset, end - offset, left) {
                Ok(bytes) if bytes.len() as u64 == end - offset => {
                    self.stats
                        .bytes_fetched
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    return Ok(bytes);
                }
                Ok(bytes) => FetchError::ShortRead {
                    expected: end - offset,
                    got: bytes.len() as u64,
                },
                Err(FetchError::Deadline { .. }) => {
                    return Err(self.mark_unresponsive(unresponsive()));
                }
                Err(source) => source,
            };
            if attempt >= self.retry.attempts {
                return Err(LayerError::Fetch {
                    offset,
                    end,
                    attempts: attempt,
                    source,
                });
            }
            tracing::warn!(offset, end, attempt, error = %source, "range request failed, retrying");
            std::thread::sleep(self.retry.backoff * attempt);
        }
    }

    fn mark_unresponsive(&self, err: LayerError) -> LayerError {
        *self
            .unresponsive_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + self.retry.cooldown);
        tracing::warn!(error = %err, "registry unresponsive");
        err
    }
}

/// The uncompressed bytes of `chunk` from its compressed range, checked against its digest.
fn decode_verified(chunk: &ChunkRef, compressed: &[u8]) -> Result<Vec<u8>, LayerError> {
    estargz::decode_chunk(
        compressed,
        chunk.compressed_offset,
        chunk.size,
        &chunk.digest,
    )
    .map_err(|source| LayerError::Verify {
        digest: chunk.digest.clone(),
        source,
    })
}

#[cfg(test)]
mod tests;
