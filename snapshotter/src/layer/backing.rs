//! The layer's side of FUSE passthrough: which cached file backs a regular file of the
//! layer once all its chunks are here (see `cache/files.rs`).

use std::path::PathBuf;

use super::{LayerError, RemoteLayer};
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
        match self.cache.verified_file(&pieces)? {
            Verified::Ready(file) => Ok(Some(file)),
            Verified::Missing | Verified::Corrupt { .. } => Ok(None),
        }
    }

    /// Where the backing file of `entry` is kept (whether or not it exists).
    pub fn backing_path(&self, entry: usize) -> Option<PathBuf> {
        if self.poisoned.get().is_some() {
            return None;
        }
        self.cache.backing_path(&self.pieces(entry)?).ok()
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
