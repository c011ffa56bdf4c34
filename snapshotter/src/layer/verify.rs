//! Whether a lazily served layer is the layer its image claims. containerd commits it under
//! a chain ID built from the image config's diffIDs, and reuses that snapshot for every
//! later image on the same base: an image that claims a popular base layer's diffID with
//! other files would otherwise serve its own files to them. Once the layer is fetched, its
//! whole blob is streamed once more (range requests, in order), decompressed and hashed:
//! that is its diffID, and with the parent's chain ID, its chain ID.

use std::io::Read;

use sha2::{Digest, Sha256};

use super::{LayerError, RemoteLayer};

// Range requests of this size feed the decompressor.
const STREAM_BYTES: u64 = 8 << 20;

/// containerd's chain ID of a layer with `diff_id` on the chain `parent` ("" for a base
/// layer): the diffID itself, else `sha256(parent + " " + diff_id)`.
pub fn chain_id(parent: &str, diff_id: &str) -> String {
    if parent.is_empty() {
        return diff_id.to_string();
    }
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(format!("{parent} {diff_id}")))
    )
}

/// What streaming a layer's whole blob shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobDigests {
    /// The sha256 of the uncompressed tar.
    pub diff_id: String,
    /// The sha256 of the blob's bytes as the registry served them: when it is the digest
    /// the manifest names, `diff_id` is a fact about that blob, whoever asks again.
    pub blob: String,
}

impl RemoteLayer {
    /// The sha256 of the layer's uncompressed tar (its diffID) and the digest of the blob it
    /// was computed from, in one pass streaming the blob from the registry: memory stays at
    /// one range request.
    pub fn digests(&self) -> Result<BlobDigests, LayerError> {
        let size = self.fetcher.size().map_err(|source| LayerError::Fetch {
            offset: 0,
            end: 0,
            attempts: 1,
            source,
        })?;
        let stream = BlobStream {
            layer: self,
            at: 0,
            end: size,
            buf: Vec::new(),
            pos: 0,
            failed: None,
            hash: Sha256::new(),
        };
        let mut tar = flate2::read::MultiGzDecoder::new(stream);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match tar.read(&mut buf) {
                Ok(n) => n,
                Err(source) => {
                    let stream = tar.into_inner();
                    return Err(stream.failed.unwrap_or(LayerError::Decompress { source }));
                }
            };
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        // Whatever follows the last gzip member counts for the blob's digest too.
        let mut stream = tar.into_inner();
        if let Err(source) = std::io::copy(&mut stream, &mut std::io::sink()) {
            return Err(stream.failed.unwrap_or(LayerError::Decompress { source }));
        }
        Ok(BlobDigests {
            diff_id: format!("sha256:{}", hex::encode(hash.finalize())),
            blob: format!("sha256:{}", hex::encode(stream.hash.finalize())),
        })
    }
}

/// The blob as a reader, fetched in order in [`STREAM_BYTES`] range requests.
struct BlobStream<'a> {
    layer: &'a RemoteLayer,
    at: u64,
    end: u64,
    buf: Vec<u8>,
    pos: usize,
    /// The fetch error behind an I/O error returned to the decompressor.
    failed: Option<LayerError>,
    /// Of every byte fetched, in order.
    hash: Sha256,
}

impl Read for BlobStream<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.at >= self.end {
                return Ok(0);
            }
            if self
                .layer
                .cancelled
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                self.failed = Some(LayerError::Cancelled);
                return Err(std::io::Error::other("cancelled"));
            }
            let to = (self.at + STREAM_BYTES).min(self.end);
            match self.layer.fetch_range(self.at, to) {
                Ok(bytes) => {
                    self.hash.update(&bytes);
                    self.buf = bytes;
                    self.pos = 0;
                    self.at = to;
                }
                Err(err) => {
                    self.failed = Some(err);
                    return Err(std::io::Error::other("fetch failed"));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
