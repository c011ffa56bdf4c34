//! Decompression and verification of single gzip members: chunks and the TOC.

use std::io::Read;

use sha2::{Digest, Sha256};

use super::{EstargzError, Toc, MAX_CHUNK_SIZE, MAX_TOC_JSON, TOC_TAR_NAME};

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Decompresses the first `size` bytes of the gzip member that starts at
/// the beginning of `compressed` and checks them against `digest`.
/// Never returns bytes that do not match. Decompresses no more than `size` bytes (a gzip
/// bomb stops there) and refuses sizes over [`MAX_CHUNK_SIZE`].
pub fn decode_chunk(
    compressed: &[u8],
    compressed_offset: u64,
    size: u64,
    digest: &str,
) -> Result<Vec<u8>, EstargzError> {
    if size > MAX_CHUNK_SIZE {
        return Err(EstargzError::ChunkDecompress {
            digest: digest.to_string(),
            offset: compressed_offset,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("chunk of {size} bytes is over the {MAX_CHUNK_SIZE}-byte limit"),
            ),
        });
    }
    let mut out = Vec::with_capacity(size as usize);
    let read = flate2::read::GzDecoder::new(compressed)
        .take(size)
        .read_to_end(&mut out);
    let read = read.map_err(|source| EstargzError::ChunkDecompress {
        digest: digest.to_string(),
        offset: compressed_offset,
        source,
    })?;
    if read as u64 != size {
        return Err(EstargzError::ChunkDecompress {
            digest: digest.to_string(),
            offset: compressed_offset,
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "gzip member ended before the chunk did",
            ),
        });
    }
    let actual = sha256_digest(&out);
    if actual != digest {
        return Err(EstargzError::ChunkDigestMismatch {
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(out)
}

/// Decompresses the TOC member (the bytes between the TOC offset and the
/// footer), verifies the JSON against `expected_digest` when given and
/// parses it. Returns the TOC and the digest of its JSON. At most [`MAX_TOC_JSON`] bytes
/// (plus tar framing) are decompressed, however the member claims otherwise.
pub fn decode_toc_member(
    member: &[u8],
    expected_digest: Option<&str>,
) -> Result<(Toc, String), EstargzError> {
    // Tar headers and padding around the JSON, and a little slack for entries before it.
    const FRAMING: u64 = 64 << 10;
    let decoder = flate2::read::MultiGzDecoder::new(member).take(MAX_TOC_JSON + FRAMING);
    let mut archive = tar::Archive::new(decoder);
    let entries = archive
        .entries()
        .map_err(|source| EstargzError::TocDecompress { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| EstargzError::TocDecompress { source })?;
        let is_toc = entry.path_bytes().as_ref().eq(TOC_TAR_NAME.as_bytes());
        if !is_toc {
            continue;
        }
        if entry.size() > MAX_TOC_JSON {
            return Err(EstargzError::TocTooLarge {
                what: "JSON",
                limit: MAX_TOC_JSON,
            });
        }
        let mut json = Vec::new();
        entry
            .read_to_end(&mut json)
            .map_err(|source| EstargzError::TocDecompress { source })?;
        let actual = sha256_digest(&json);
        if let Some(expected) = expected_digest {
            if expected != actual {
                return Err(EstargzError::TocDigestMismatch {
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        let toc =
            serde_json::from_slice(&json).map_err(|source| EstargzError::TocJson { source })?;
        return Ok((toc, actual));
    }
    Err(EstargzError::TocMissing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn chunk_verified() {
        let data = b"hello chunk".repeat(100);
        let mut member = gzip(&data);
        member.extend_from_slice(&gzip(b"next member"));
        let digest = sha256_digest(&data);
        let out = decode_chunk(&member, 0, data.len() as u64, &digest).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn chunk_with_wrong_digest_is_rejected() {
        let data = b"hello chunk".to_vec();
        let member = gzip(&data);
        let wrong = sha256_digest(b"other");
        let err = decode_chunk(&member, 0, data.len() as u64, &wrong).unwrap_err();
        assert!(matches!(err, EstargzError::ChunkDigestMismatch { .. }));
    }

    #[test]
    fn truncated_chunk_is_rejected() {
        let data = b"hello chunk".repeat(1000);
        let member = gzip(&data);
        let digest = sha256_digest(&data);
        let err =
            decode_chunk(&member[..member.len() / 2], 0, data.len() as u64, &digest).unwrap_err();
        assert!(matches!(err, EstargzError::ChunkDecompress { .. }));
    }
}
