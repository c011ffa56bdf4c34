//! Blobs of an OCI image layout (`convert --layout`): the layout's JSON names them by
//! digest, and the layout is as untrusted as a registry.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::image::ImageConvertError;

/// Where an OCI layout keeps the blob `digest`. The digest comes from the layout's own
/// JSON: anything but `sha256:<64 hex>` (a `../` in it, say) is refused, not joined.
fn layout_blob_path(dir: &Path, digest: &str) -> Result<PathBuf, ImageConvertError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| ImageConvertError::BadDigest {
            digest: digest.to_string(),
        })?;
    Ok(dir.join("blobs").join("sha256").join(hex))
}

/// Copies a layout blob into `out`, checking that its content has the digest it is filed
/// under (a layout is as untrusted as a registry).
pub(super) fn copy_layout_blob(
    dir: &Path,
    digest: &str,
    out: &mut std::fs::File,
) -> Result<(), ImageConvertError> {
    use sha2::Digest as _;
    use std::io::Write as _;
    let path = layout_blob_path(dir, digest)?;
    let layout_err = |source| ImageConvertError::Layout {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::File::open(&path).map_err(layout_err)?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(layout_err)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(layout_err)?;
    }
    let actual = format!("sha256:{}", hex::encode(hash.finalize()));
    if actual != digest {
        return Err(ImageConvertError::LayoutDigest {
            path,
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_that_are_not_sha256_hex_never_become_paths() {
        let dir = tempfile::tempdir().unwrap();
        for digest in [
            "sha256:../../../etc/shadow",
            "sha256:ABCDEF",
            &format!("sha256:{}/x", "a".repeat(62)),
            &format!("md5:{}", "a".repeat(64)),
        ] {
            let mut out = tempfile::tempfile().unwrap();
            let err = copy_layout_blob(dir.path(), digest, &mut out).unwrap_err();
            assert!(
                matches!(err, ImageConvertError::BadDigest { .. }),
                "{digest}: {err:?}"
            );
        }
    }

    #[test]
    fn a_blob_filed_under_another_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let claimed = format!("sha256:{}", "c".repeat(64));
        let path = layout_blob_path(dir.path(), &claimed).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not what the digest says").unwrap();
        let mut out = tempfile::tempfile().unwrap();
        let err = copy_layout_blob(dir.path(), &claimed, &mut out).unwrap_err();
        assert!(
            matches!(err, ImageConvertError::LayoutDigest { .. }),
            "{err:?}"
        );
        let good = crate::estargz::sha256_digest(b"layer");
        let path = layout_blob_path(dir.path(), &good).unwrap();
        std::fs::write(&path, b"layer").unwrap();
        copy_layout_blob(dir.path(), &good, &mut out).unwrap();
    }
}
