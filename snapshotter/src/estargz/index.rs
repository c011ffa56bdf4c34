//! A validated, lookup-friendly view of a TOC: normalized names, each
//! regular file's chunks with their compressed byte ranges, prefetch info.

use std::collections::{BTreeSet, HashMap};

use super::{
    toc::clean_name, EntryType, EstargzError, Toc, TocEntry, MAX_CHUNK_RANGE, MAX_CHUNK_SIZE,
    MAX_NAME_LEN, MAX_PATH_LEN, MAX_TOC_ENTRIES, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
};

/// Where one chunk of a file lives in the compressed blob and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Start of the gzip member whose output begins with this chunk.
    pub compressed_offset: u64,
    /// End (exclusive) of the compressed range to fetch for this chunk.
    pub compressed_end: u64,
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    /// Uncompressed size of the chunk.
    pub size: u64,
    /// `sha256:` digest of the uncompressed chunk.
    pub digest: String,
    /// Marked for prefetch in the TOC (`spryPrefetch`).
    pub hot: bool,
}

/// What the layer asks to prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// Fetch compressed bytes `[0, end)` ahead of time.
    UpTo { end: u64 },
    /// The layer says there is nothing to prefetch.
    Nothing,
    /// The layer has no landmark at all.
    #[default]
    Unspecified,
    /// Fetch the chunks the TOC marks (`spryPrefetch`: what a recorded workload read),
    /// whatever the landmark says.
    Marked,
}

/// A validated index of one eStargz layer.
#[derive(Debug, Clone, Default)]
pub struct LayerIndex {
    /// Non-chunk entries with cleaned names, in TOC order.
    pub entries: Vec<TocEntry>,
    /// Chunks of each regular file, keyed by the index in `entries`.
    pub chunks: HashMap<usize, Vec<ChunkRef>>,
    /// Offset of the TOC gzip member.
    pub toc_offset: u64,
    /// Prefetch range from the landmark files.
    pub prefetch: Prefetch,
    /// Digest of the TOC JSON.
    pub toc_digest: String,
}

impl LayerIndex {
    /// Validates `toc` and builds the index.
    pub fn new(toc: Toc, toc_offset: u64, toc_digest: String) -> Result<Self, EstargzError> {
        if toc.entries.len() > MAX_TOC_ENTRIES {
            return Err(EstargzError::TocTooLarge {
                what: "entry count",
                limit: MAX_TOC_ENTRIES as u64,
            });
        }
        // Every gzip member that starts a chunk is a boundary; a chunk's
        // compressed range ends at the next boundary (or the TOC).
        let mut boundaries = BTreeSet::new();
        boundaries.insert(toc_offset);
        for e in &toc.entries {
            if is_data_entry(e) {
                boundaries.insert(offset_of(e)?);
            }
        }

        let mut entries: Vec<TocEntry> = Vec::new();
        let mut chunks: HashMap<usize, Vec<ChunkRef>> = HashMap::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut prefetch = Prefetch::Unspecified;
        for mut e in toc.entries {
            check_path(&e, &e.name)?;
            e.name = clean_name(&e.name);
            if e.kind == EntryType::Hardlink {
                check_path(&e, &e.link_name)?;
                e.link_name = clean_name(&e.link_name);
            }
            if e.kind == EntryType::Symlink && e.link_name.len() > MAX_PATH_LEN {
                return Err(invalid(&e, "symlink target longer than PATH_MAX"));
            }
            if e.kind == EntryType::Chunk {
                let idx = *by_name
                    .get(&e.name)
                    .ok_or_else(|| invalid(&e, "chunk before its file"))?;
                let size = entries[idx].size;
                let list = chunks.entry(idx).or_default();
                list.push(chunk_of(&e, size, &boundaries)?);
                continue;
            }
            if e.kind == EntryType::Reg {
                match e.name.as_str() {
                    PREFETCH_LANDMARK => {
                        prefetch = Prefetch::UpTo {
                            end: offset_of(&e)?,
                        }
                    }
                    NO_PREFETCH_LANDMARK => prefetch = Prefetch::Nothing,
                    _ => {}
                }
            }
            let idx = entries.len();
            if is_data_entry(&e) {
                chunks.insert(idx, vec![chunk_of(&e, e.size, &boundaries)?]);
            }
            by_name.insert(e.name.clone(), idx);
            entries.push(e);
        }

        if chunks.values().flatten().any(|c| c.hot) {
            prefetch = Prefetch::Marked;
        }
        for (idx, list) in &chunks {
            let e = &entries[*idx];
            let mut expected = 0;
            for c in list {
                if c.file_offset != expected {
                    return Err(invalid(e, "chunks are not contiguous"));
                }
                expected += c.size;
            }
            if expected != e.size as u64 {
                return Err(invalid(e, "chunks do not cover the file"));
            }
        }
        Ok(LayerIndex {
            entries,
            chunks,
            toc_offset,
            prefetch,
            toc_digest,
        })
    }

    /// All chunks of the layer, in blob order.
    pub fn all_chunks(&self) -> Vec<ChunkRef> {
        let mut all: Vec<ChunkRef> = self.chunks.values().flatten().cloned().collect();
        all.sort_by_key(|c| c.compressed_offset);
        all
    }

    /// The chunks marked for prefetch, in blob order.
    pub fn hot_chunks(&self) -> Vec<ChunkRef> {
        let mut hot: Vec<ChunkRef> = self
            .chunks
            .values()
            .flatten()
            .filter(|c| c.hot)
            .cloned()
            .collect();
        hot.sort_by_key(|c| c.compressed_offset);
        hot
    }

    /// Total uncompressed size of regular file contents.
    pub fn content_size(&self) -> u64 {
        self.chunks.values().flatten().map(|c| c.size).sum()
    }
}

fn is_data_entry(e: &TocEntry) -> bool {
    (e.kind == EntryType::Reg && e.size > 0) || e.kind == EntryType::Chunk
}

fn invalid(e: &TocEntry, reason: &'static str) -> EstargzError {
    EstargzError::InvalidEntry {
        name: e.name.clone(),
        reason,
    }
}

/// Names the kernel could not look up are refused here, before anything walks them.
fn check_path(e: &TocEntry, path: &str) -> Result<(), EstargzError> {
    if path.len() > MAX_PATH_LEN {
        return Err(invalid(e, "path longer than PATH_MAX"));
    }
    if path.split('/').any(|part| part.len() > MAX_NAME_LEN) {
        return Err(invalid(e, "name longer than NAME_MAX"));
    }
    if path.contains('\0') {
        return Err(invalid(e, "path contains a NUL byte"));
    }
    Ok(())
}

fn offset_of(e: &TocEntry) -> Result<u64, EstargzError> {
    u64::try_from(e.offset).map_err(|_| invalid(e, "negative offset"))
}

fn chunk_of(
    e: &TocEntry,
    file_size: i64,
    boundaries: &BTreeSet<u64>,
) -> Result<ChunkRef, EstargzError> {
    if e.chunk_digest.is_empty() {
        return Err(invalid(e, "chunk has no chunkDigest"));
    }
    if e.chunk_offset < 0 || e.chunk_size < 0 || e.chunk_offset > file_size {
        return Err(invalid(e, "chunk offset or size out of range"));
    }
    let size = if e.chunk_size == 0 {
        file_size - e.chunk_offset
    } else {
        e.chunk_size
    };
    let past_end = e
        .chunk_offset
        .checked_add(size)
        .is_none_or(|end| end > file_size);
    if size <= 0 || past_end {
        return Err(invalid(e, "chunk extends past the end of the file"));
    }
    if size as u64 > MAX_CHUNK_SIZE {
        return Err(invalid(e, "chunk is larger than MAX_CHUNK_SIZE"));
    }
    let start = offset_of(e)?;
    let end = *boundaries
        .range(start + 1..)
        .next()
        .ok_or_else(|| invalid(e, "chunk lies after the TOC"))?;
    if end - start > MAX_CHUNK_RANGE {
        return Err(invalid(
            e,
            "chunk's compressed range is larger than MAX_CHUNK_RANGE",
        ));
    }
    Ok(ChunkRef {
        compressed_offset: start,
        compressed_end: end,
        file_offset: e.chunk_offset as u64,
        size: size as u64,
        digest: e.chunk_digest.clone(),
        hot: e.prefetch,
    })
}
