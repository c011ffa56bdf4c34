//! Verified diffIDs: "blob sha256:B decompresses to a tar with sha256 D", recorded once a
//! whole blob was streamed, its bytes hashed to B and its tar to D (`layer/verify.rs`).
//! Such a fact is true of the blob for good, so a later mount of a layer with that blob
//! can check its image's claim (the chain ID) without streaming the blob again: what a
//! native mount (`service/native.rs`) needs before it serves anything, since it cannot be
//! poisoned afterwards.
//!
//! One small file per blob, `diffids/<hex>`, holding the diffID; written atomically.

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use super::{sha256_hex, CacheError, ChunkCache};

const DIR: &str = "diffids";

impl ChunkCache {
    fn diff_id_path(&self, blob: &str) -> Result<PathBuf, CacheError> {
        Ok(self.dir.join(DIR).join(sha256_hex(blob)?))
    }

    /// Records that the blob `blob` (whose bytes were hashed to that digest) has diffID
    /// `diff_id`.
    pub fn record_diff_id(&self, blob: &str, diff_id: &str) -> Result<(), CacheError> {
        sha256_hex(diff_id)?;
        let path = self.diff_id_path(blob)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| {
            fs::create_dir_all(self.dir.join(DIR))?;
            let mut f = fs::File::create(&tmp)?;
            f.write_all(diff_id.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        result.map_err(|source| {
            let _ = fs::remove_file(&tmp);
            CacheError::Write { path, source }
        })
    }

    /// The diffID recorded for blob `blob`, if any (and well-formed).
    pub fn diff_id_of(&self, blob: &str) -> Option<String> {
        let text = fs::read_to_string(self.diff_id_path(blob).ok()?).ok()?;
        let valid = sha256_hex(&text).is_ok();
        valid.then_some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_diff_id_is_found_again_and_malformed_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let blob = format!("sha256:{}", "b".repeat(64));
        let diff = format!("sha256:{}", "d".repeat(64));
        assert_eq!(cache.diff_id_of(&blob), None);
        cache.record_diff_id(&blob, &diff).unwrap();
        assert_eq!(cache.diff_id_of(&blob), Some(diff.clone()));
        // Reopened: still there, and not counted as cached chunks.
        let cache = ChunkCache::open(dir.path()).unwrap();
        assert_eq!(cache.diff_id_of(&blob), Some(diff));
        assert_eq!(cache.size(), 0);
        // A path-like or short digest is refused, never used as a file name.
        assert!(cache.record_diff_id("sha256:../../x", "sha256:1").is_err());
        assert_eq!(cache.diff_id_of("sha256:../x"), None);
        // A torn or tampered record does not count.
        std::fs::write(dir.path().join(DIR).join("b".repeat(64)), "sha256:zz").unwrap();
        assert_eq!(cache.diff_id_of(&blob), None);
    }
}
