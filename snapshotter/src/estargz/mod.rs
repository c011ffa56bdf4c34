//! eStargz: the seekable, chunked tar.gz layer format (stargz-snapshotter's
//! `docs/estargz.md`). This module is pure: it parses and produces bytes and
//! leaves fetching to `layer` and `registry`.

mod chunk;
pub mod footer;
mod index;
pub mod plan;
pub mod toc;
pub mod writer;

#[cfg(test)]
mod hostile_tests;

pub use chunk::{decode_chunk, decode_toc_member, sha256_digest};
pub use index::{ChunkRef, LayerIndex, Prefetch};
pub use plan::HotRanges;
pub use toc::{EntryType, Toc, TocEntry};
pub use writer::{EstargzWriter, WriterOutput};

/// Name of the TOC entry inside the layer tar.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Layer annotation with the digest of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation with the size of the uncompressed layer tar.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Files before this entry are the ones to prefetch.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Present when the layer has nothing to prefetch.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one-byte content of both landmark files.
pub const LANDMARK_CONTENTS: u8 = 0x0f;
/// Default chunk size of the writer.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

// Bounds on what a layer may declare. A TOC is registry input: without these a hostile
// layer makes the snapshotter allocate, fetch or decompress as much as it likes. A layer
// beyond them is not served lazily; containerd then pulls it in full (ordinary unpacking).
/// Largest uncompressed chunk (Go's writer makes 4 MiB chunks).
pub const MAX_CHUNK_SIZE: u64 = 32 << 20;
/// Largest compressed range fetched for one chunk: the chunk's gzip member plus the small
/// members of the entries without data (directories, links) that follow it.
pub const MAX_CHUNK_RANGE: u64 = MAX_CHUNK_SIZE + (16 << 20);
/// Largest compressed TOC member fetched.
pub const MAX_TOC_MEMBER: u64 = 64 << 20;
/// Largest TOC JSON decompressed (about 250,000 files at typical entry sizes).
pub const MAX_TOC_JSON: u64 = 64 << 20;
/// Most TOC entries (files plus extra chunks).
pub const MAX_TOC_ENTRIES: usize = 1 << 20;
/// Longest path, and longest name in a path, as Linux's PATH_MAX and NAME_MAX.
pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_NAME_LEN: usize = 255;

/// Errors parsing or verifying eStargz data.
#[derive(Debug, thiserror::Error)]
pub enum EstargzError {
    #[error("footer is {len} bytes, expected 51")]
    FooterSize { len: usize },
    #[error("footer is not a gzip member")]
    FooterNotGzip,
    #[error("footer has no eStargz extra field")]
    FooterMagic,
    #[error("footer TOC offset is not hexadecimal")]
    FooterOffset,
    #[error("TOC offset {toc_offset} is outside the {blob_size}-byte blob")]
    TocOffset { toc_offset: u64, blob_size: u64 },
    #[error("failed to decompress the TOC member")]
    TocDecompress { source: std::io::Error },
    #[error("TOC member does not contain {TOC_TAR_NAME}")]
    TocMissing,
    #[error("TOC {what} exceeds the limit of {limit} (a layer this large is pulled in full)")]
    TocTooLarge { what: &'static str, limit: u64 },
    #[error("TOC digest is {actual}, expected {expected}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("TOC JSON is malformed")]
    TocJson { source: serde_json::Error },
    #[error("TOC entry {name:?} is invalid: {reason}")]
    InvalidEntry { name: String, reason: &'static str },
    #[error("failed to decompress chunk {digest} at compressed offset {offset}")]
    ChunkDecompress {
        digest: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("chunk digest is {actual}, expected {expected}")]
    ChunkDigestMismatch { expected: String, actual: String },
    #[error("failed to write the eStargz layer")]
    Write { source: std::io::Error },
    #[error("failed to read the source tar")]
    ReadTar { source: std::io::Error },
}
