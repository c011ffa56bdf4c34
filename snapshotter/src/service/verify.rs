//! After a lazy layer is fully fetched, whether it is the layer its image claims (see
//! `layer/verify.rs`). A layer that is not is poisoned: its reads fail, a marker in its
//! snapshot directory says why, and the service refuses to build on it.

use std::path::Path;

use super::store::RemoteSource;
use crate::cache::ChunkCache;
use crate::fs::error_chain;
use crate::layer::{chain_id, BlobDigests, LayerError, RemoteLayer};

const POISONED: &str = "poisoned";

/// Checks `layer` against the chain ID containerd committed it under; poisons it when the
/// content says otherwise. Returns whether the claim held (`None`: nothing to check, or the
/// check could not finish).
pub fn check_claim(
    layer: &RemoteLayer,
    source: &RemoteSource,
    snapshot_dir: &Path,
    cache: &ChunkCache,
) -> Option<bool> {
    if source.chain_id.is_empty() {
        return None;
    }
    let diff_id = match layer.digests() {
        Ok(digests) => {
            record_diff_id(cache, &source.layer_digest, &digests);
            digests.diff_id
        }
        Err(LayerError::Cancelled) => return None,
        Err(err) => {
            tracing::warn!(layer = %source.layer_digest, error = %error_chain(&err), "could not verify the layer's diffID");
            return None;
        }
    };
    let actual = chain_id(&source.parent_chain, &diff_id);
    if actual == source.chain_id {
        tracing::info!(layer = %source.layer_digest, %diff_id, "layer matches its diffID");
        return Some(true);
    }
    let reason = format!(
        "layer {} of {} has diffID {diff_id} (chain {actual}), but was committed as chain {}: \
         the image claims another layer's identity; remove the image and the snapshot",
        source.layer_digest, source.image_ref, source.chain_id
    );
    tracing::error!(%reason, "poisoned layer: reads now fail");
    layer.poison(reason.clone());
    if let Err(err) = crate::private::write_file(&snapshot_dir.join(POISONED), reason.as_bytes()) {
        tracing::error!(error = %err, "cannot mark the snapshot poisoned");
    }
    Some(false)
}

/// Records the diffID of the blob `expected` (the digest its manifest names) when the bytes
/// streamed were that blob, so that later mounts of it can check claims without streaming
/// it again (`cache/diff_ids.rs`). Returns whether it was recorded.
pub fn record_diff_id(cache: &ChunkCache, expected: &str, digests: &BlobDigests) -> bool {
    if digests.blob != expected {
        tracing::warn!(layer = %expected, served = %digests.blob, "the registry served other bytes than the layer's digest names; its diffID is not recorded");
        return false;
    }
    match cache.record_diff_id(expected, &digests.diff_id) {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(layer = %expected, error = %error_chain(&err), "cannot record the layer's verified diffID");
            false
        }
    }
}

/// Why the snapshot in `snapshot_dir` must not be used, if it is poisoned.
pub fn poisoned(snapshot_dir: &Path) -> Option<String> {
    std::fs::read_to_string(snapshot_dir.join(POISONED)).ok()
}
