//! Prefetch of the chunks a layer marks (`spryPrefetch`: what a recorded workload read
//! before it was ready). The marked chunks are scattered through the prioritized files, so
//! they are fetched as a few coalesced range requests, several at once, in blob order (the
//! order the workload first opened the files), while the workload already runs.
//!
//! Each chunk is claimed in the cache before its range is requested: a read of it meanwhile
//! waits for this fetch instead of fetching it a second time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{decode_verified, LayerError, RemoteLayer};
use crate::estargz::ChunkRef;

/// Marked chunks this close in the blob share one request, with the bytes between them:
/// cheaper than another request's round trip.
const JOIN_GAP: u64 = 64 << 10;
/// Largest coalesced request: readers waiting on a claimed chunk wait for its whole range.
const RANGE_MAX: u64 = 2 << 20;
/// Requests in flight at once: hides each request's round trip behind the others.
const WORKERS: usize = 4;

/// Runs of consecutive chunks (blob order) to fetch in one request each: from a marked
/// chunk to the last marked one within [`JOIN_GAP`] and [`RANGE_MAX`].
pub(super) fn coalesce(all: &[ChunkRef]) -> Vec<&[ChunkRef]> {
    let mut runs = Vec::new();
    let mut run: Option<(usize, usize)> = None; // first and last marked index
    for (i, chunk) in all.iter().enumerate().filter(|(_, c)| c.hot) {
        run = match run {
            Some((first, last))
                // Saturating: a hostile TOC may give two chunks one offset.
                if chunk.compressed_offset.saturating_sub(all[last].compressed_end) <= JOIN_GAP
                    && chunk.compressed_end.saturating_sub(all[first].compressed_offset)
                        <= RANGE_MAX =>
            {
                Some((first, i))
            }
            Some((first, last)) => {
                runs.push(&all[first..=last]);
                Some((i, i))
            }
            None => Some((i, i)),
        };
    }
    if let Some((first, last)) = run {
        runs.push(&all[first..=last]);
    }
    runs
}

impl RemoteLayer {
    /// Fetches the marked chunks not yet cached. Returns the compressed bytes fetched.
    pub(super) fn fetch_marked(&self) -> Result<u64, LayerError> {
        let all = self.index.all_chunks();
        let runs = coalesce(&all);
        let next = AtomicUsize::new(0);
        let fetched = AtomicU64::new(0);
        let failed: Mutex<Option<LayerError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..WORKERS.min(runs.len()) {
                scope.spawn(|| loop {
                    let stop = self.cancelled.load(Ordering::Relaxed)
                        || failed.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                    let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    if stop {
                        return;
                    }
                    match self.fetch_claimed(run) {
                        Ok(n) => {
                            fetched.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(err) => {
                            failed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(err);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(err) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(err);
        }
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(LayerError::Cancelled);
        }
        Ok(fetched.into_inner())
    }

    /// Claims the chunks of `run` that are neither cached nor being fetched, requests the
    /// range from the first to the last claimed one and fills the claimed ones.
    fn fetch_claimed(&self, run: &[ChunkRef]) -> Result<u64, LayerError> {
        let claims: Vec<_> = run
            .iter()
            .filter_map(|c| self.cache.claim(&c.digest).map(|claim| (c, claim)))
            .collect();
        let (Some((first, _)), Some((last, _))) = (claims.first(), claims.last()) else {
            return Ok(0);
        };
        let (start, end) = (first.compressed_offset, last.compressed_end);
        let bytes = self.fetch_range(start, end)?;
        for (chunk, claim) in claims {
            let from = (chunk.compressed_offset - start) as usize;
            let to = (chunk.compressed_end - start) as usize;
            claim.fill(&decode_verified(chunk, &bytes[from..to])?)?;
        }
        Ok(end - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(spec: &[(u64, bool)]) -> Vec<ChunkRef> {
        let mut at = 0;
        spec.iter()
            .enumerate()
            .map(|(i, &(len, hot))| {
                at += len;
                ChunkRef {
                    compressed_offset: at - len,
                    compressed_end: at,
                    file_offset: 0,
                    size: len,
                    digest: format!("sha256:{i:064x}"),
                    hot,
                }
            })
            .collect()
    }

    fn spans(runs: &[&[ChunkRef]]) -> Vec<(u64, u64)> {
        runs.iter()
            .map(|r| (r[0].compressed_offset, r[r.len() - 1].compressed_end))
            .collect()
    }

    #[test]
    fn marked_chunks_are_fetched_in_few_bounded_requests() {
        let k = 1024;
        let all = chunks(&[
            (10 * k, false),
            (4 * k, true),
            (60 * k, false), // joined: under the gap
            (4 * k, true),
            (100 * k, false), // split: over the gap
            (8 * k, true),
            (8 * k, false), // trailing cold chunks are not fetched
        ]);
        assert_eq!(
            spans(&coalesce(&all)),
            [(10 * k, 78 * k), (178 * k, 186 * k)]
        );
        // Requests stay under RANGE_MAX however close the marked chunks are.
        let many = chunks(&[(k << 10, true); 5]);
        assert_eq!(coalesce(&many).len(), 3);
        assert!(coalesce(&chunks(&[(k, false)])).is_empty());
        // Chunks a hostile TOC put at one offset: one request, no arithmetic overflow.
        let mut same = chunks(&[(4 * k, true), (4 * k, true)]);
        same[1].compressed_offset = 0;
        same[1].compressed_end = 4 * k;
        assert_eq!(spans(&coalesce(&same)), [(0, 4 * k)]);
    }
}
