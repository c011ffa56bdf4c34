//! What names a packed layer image: the digest of its layer chain (`<key>.erofs`), and the
//! chain itself written next to it (`<key>.lowers`), so that an image whose layers
//! containerd has since removed can be told apart from one that may serve again.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The key of a layer chain (overlay lowerdirs, top first): their paths and identities
/// (device, inode, mtime), so a snapshot directory deleted and recreated under the same
/// path gets a new key. Fails with the directory that cannot be read.
pub(super) fn chain_key(lowers: &[PathBuf]) -> Result<String, (PathBuf, std::io::Error)> {
    let mut digest = Sha256::new();
    for lower in lowers {
        let meta = std::fs::metadata(lower).map_err(|e| (lower.clone(), e))?;
        digest.update(lower.as_os_str().as_encoded_bytes());
        digest.update([0]);
        for n in [
            meta.dev(),
            meta.ino(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
        ] {
            digest.update(n.to_le_bytes());
        }
    }
    Ok(hex::encode(digest.finalize()))
}

/// Where the chain of `key`'s image is listed.
pub(super) fn lowers_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.lowers"))
}

/// Lists `lowers` as the chain of `key`'s image (NUL-separated paths). Written by the
/// image's builder, under its build lock, before the image is renamed into place.
pub(super) fn write_lowers(dir: &Path, key: &str, lowers: &[PathBuf]) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    for lower in lowers {
        bytes.extend_from_slice(lower.as_os_str().as_bytes());
        bytes.push(0);
    }
    std::fs::write(lowers_path(dir, key), bytes)
}

/// Whether the layers `key`'s image was built from are still there, unchanged: false
/// when one is gone or recreated, or when the list is missing or names none.
pub(super) fn layers_unchanged(dir: &Path, key: &str) -> bool {
    let Ok(bytes) = std::fs::read(lowers_path(dir, key)) else {
        return false;
    };
    let lowers: Vec<PathBuf> = bytes
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(OsStr::from_bytes(p)))
        .collect();
    !lowers.is_empty() && chain_key(&lowers).is_ok_and(|now| now == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), name).unwrap();
        dir
    }

    #[test]
    fn the_key_follows_paths_order_and_identity() {
        let root = tempfile::tempdir().unwrap();
        let a = layer(root.path(), "a");
        let b = layer(root.path(), "b");
        let ab = chain_key(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(ab, chain_key(&[a.clone(), b.clone()]).unwrap());
        assert_ne!(ab, chain_key(&[b.clone(), a.clone()]).unwrap());
        // A snapshot dir recreated under the same path is a different layer.
        std::fs::remove_dir_all(&b).unwrap();
        let _keep_inode_busy = layer(root.path(), "c");
        layer(root.path(), "b");
        assert_ne!(ab, chain_key(&[a, b]).unwrap());
        let (path, _) = chain_key(&[root.path().join("nope")]).unwrap_err();
        assert_eq!(path, root.path().join("nope"));
    }

    #[test]
    fn an_images_layers_are_unchanged_until_one_goes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        std::fs::create_dir_all(&dir).unwrap();
        let lowers = vec![layer(root.path(), "a"), layer(root.path(), "with\nnewline")];
        let key = chain_key(&lowers).unwrap();
        assert!(!layers_unchanged(&dir, &key), "no list yet");
        write_lowers(&dir, &key, &lowers).unwrap();
        assert!(layers_unchanged(&dir, &key));
        assert!(!layers_unchanged(&dir, "another-key"));
        std::fs::remove_dir_all(&lowers[1]).unwrap();
        assert!(!layers_unchanged(&dir, &key), "a layer is gone");
        std::fs::write(lowers_path(&dir, &key), b"").unwrap();
        assert!(
            !layers_unchanged(&dir, &key),
            "an empty list names no layer"
        );
    }
}
