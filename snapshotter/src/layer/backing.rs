//! The layer's side of FUSE passthrough: which cached file backs a regular file of the
//! layer once all its chunks are here (see `cache/files.rs`).

use super::{LayerError, RemoteLayer};

/// Largest multi-chunk file assembled for passthrough.
pub const MAX_ASSEMBLED: u64 = 1 << 30;
use crate::cache::{Piece, Verified};

impl RemoteLayer {
    /// The file of entry `entry` as one verified cached file, when every chunk of it is
    /// cached and sound. `None` when it cannot be (the layer is poisoned, the file is
    /// empty, a chunk is missing or was corrupt): reads then go through the daemon.
    pub fn backing_file(
        &self,
        entry: usize,
    ) -> Result<Option<crate::cache::BackingFile>, LayerError> {
        if self.poisoned.get().is_some() {
            return Ok(None);
        }
        let Some(pieces) = self.pieces(entry) else {
            return Ok(None);
        };
        // Assembling copies the file inside an open (and doubles its space in the cache):
        // huge files stay on the daemon's path.
        if pieces.len() > 1 && pieces.iter().map(|p| p.size).sum::<u64>() > MAX_ASSEMBLED {
            return Ok(None);
        }
        match self.cache.verified_file(&pieces)? {
            Verified::Ready(file) => Ok(Some(file)),
            Verified::Missing | Verified::Corrupt { .. } => Ok(None),
        }
    }

    /// Whether the layer was found not to be the one its image claims (see `verify.rs`).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.get().is_some()
    }

    fn pieces(&self, entry: usize) -> Option<Vec<Piece<'_>>> {
        let chunks = self.index.chunks.get(&entry).filter(|c| !c.is_empty())?;
        Some(
            chunks
                .iter()
                .map(|c| Piece {
                    digest: &c.digest,
                    size: c.size,
                })
                .collect(),
        )
    }
}
