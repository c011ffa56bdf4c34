//! Building erofs images with `mkfs.erofs` (erofs-utils).

use std::path::{Path, PathBuf};

use tokio::process::Command;

/// Failure to build an erofs image.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("cannot run mkfs.erofs (install erofs-utils)")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.erofs failed to build {image} from {source_dir}: {stderr}")]
    Failed {
        image: PathBuf,
        source_dir: PathBuf,
        stderr: String,
    },
}

/// Packs `dir` into a read-only erofs image at `image` (replacing it). Timestamps are
/// kept as they are; ownership and modes too, so the container sees the same tree.
pub async fn build_image(dir: &Path, image: &Path) -> Result<(), ErofsError> {
    let output = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(image)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| ErofsError::Spawn { source })?;
    if !output.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(ErofsError::Failed {
            image: image.to_path_buf(),
            source_dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_an_image_with_the_erofs_magic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::write(dir.path().join("root/hello"), b"hi").unwrap();
        let image = dir.path().join("img.erofs");
        build_image(&dir.path().join("root"), &image).await.unwrap();
        let bytes = std::fs::read(&image).unwrap();
        // The erofs superblock sits at offset 1024 and starts with 0xE0F5E1E2 (LE).
        assert_eq!(&bytes[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
    }

    #[tokio::test]
    async fn missing_source_is_an_error_and_leaves_no_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img.erofs");
        let err = build_image(Path::new("/nonexistent/rootfs"), &image)
            .await
            .unwrap_err();
        assert!(matches!(err, ErofsError::Failed { .. }), "{err}");
        assert!(!image.exists());
    }
}
