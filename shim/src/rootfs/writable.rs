//! A container's writable layer as a disk: a sparse file with a fresh ext4 (e2fsprogs'
//! `mkfs.ext4`), hot-plugged read-write. The guest puts the overlay's upper and work dirs
//! on it, so what a container writes to its rootfs is disk on the host, not guest RAM,
//! and its allocated blocks are what the container's writable layer uses.

use std::path::{Path, PathBuf};

use tokio::process::Command;

/// The writable layer's size. Sparse: only what the container writes (plus ~4 MiB of
/// ext4 metadata) is allocated on the host.
pub const WRITABLE_LAYER_BYTES: u64 = 10 << 30;
/// Where, in a container's rootfs as the host mounted it (its own snapshot), the image
/// lives: the snapshot's usage, which CRI reports as the writable layer's, then counts it.
pub const IMAGE_NAME: &str = ".spry-writable-layer.img";

/// Failure to make a writable layer image.
#[derive(Debug, thiserror::Error)]
pub enum WritableError {
    #[error("cannot create the writable layer image {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run mkfs.ext4 (install e2fsprogs)")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 failed on {path}: {stderr}")]
    Failed { path: PathBuf, stderr: String },
}

/// What an image's data must survive, which decides its journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageUse {
    /// A container's writable layer: it dies with its container, so there is nothing to
    /// recover after a crash: no journal.
    WritableLayer,
    /// A pod volume (emptyDir): it outlives a killed VM (kubelet keeps an emptyDir for
    /// the pod's life and a new sandbox of the pod mounts it again): journaled.
    PodVolume,
}

/// Creates a sparse file of `bytes` at `path` with an empty ext4 on it (lazy inode
/// tables and journal, so the host writes almost nothing now; the guest mounts it with
/// `noinit_itable` so it does not zero them later either).
pub async fn create_image(path: &Path, bytes: u64, usage: ImageUse) -> Result<(), WritableError> {
    let created = std::fs::File::create_new(path).and_then(|file| file.set_len(bytes));
    created.map_err(|source| WritableError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    let journal = match usage {
        ImageUse::WritableLayer => "^has_journal",
        ImageUse::PodVolume => "has_journal",
    };
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", journal])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let failure = match output {
        Ok(output) if output.status.success() => return Ok(()),
        Ok(output) => WritableError::Failed {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        },
        Err(source) => WritableError::Spawn { source },
    };
    let _ = std::fs::remove_file(path);
    Err(failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn the_image_is_a_sparse_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IMAGE_NAME);
        create_image(&path, WRITABLE_LAYER_BYTES, ImageUse::WritableLayer)
            .await
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), WRITABLE_LAYER_BYTES);
        assert!(
            meta.blocks() * 512 < 16 << 20,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let mut head = [0u8; 2048];
        std::io::Read::read_exact(&mut std::fs::File::open(&path).unwrap(), &mut head).unwrap();
        // The ext4 superblock magic 0xEF53 at offset 1024 + 56.
        assert_eq!(head[1024 + 56..1024 + 58], 0xEF53u16.to_le_bytes());
    }

    #[tokio::test]
    async fn an_existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::write(&path, "data").unwrap();
        let err = create_image(&path, 1 << 20, ImageUse::PodVolume)
            .await
            .unwrap_err();
        assert!(matches!(err, WritableError::Create { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
