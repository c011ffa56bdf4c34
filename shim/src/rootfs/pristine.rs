//! Writable layers copied from one pristine image instead of made by `mkfs.ext4` each.
//!
//! Every container's writable layer is the same empty ext4 of the same size, and making
//! one (spawning mkfs, which writes ~4 MiB of metadata into a sparse file) took ~25 ms
//! of each container start, on its critical path. The first container of a state dir
//! makes a pristine image (`<state>/writable-layer.img`, written under a temporary name
//! and renamed, so a reader never sees half of one); each container then gets a copy of
//! its data extents (SEEK_DATA/SEEK_HOLE), the holes left holes. The copies share the
//! file system's UUID and hash seed, which is harmless: each is mounted by its own disk in
//! its own VM, never by UUID, and they only ever hold their own container's files.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::unistd::{lseek, Whence};

use super::writable::{create_image, ImageUse, WritableError, WRITABLE_LAYER_BYTES};

/// More data than an empty ext4 holds means the file system cannot report holes (or the
/// image is not what we made): make the layer with mkfs instead of copying gigabytes.
const MAX_DATA_BYTES: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

/// The pristine writable-layer image of a state dir.
#[derive(Debug, Clone)]
pub struct PristineLayer {
    path: PathBuf,
}

impl PristineLayer {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Creates `target` (which must not exist) as an empty writable layer: a copy of the
    /// pristine image, made first if there is none. When copying is impossible, mkfs makes
    /// `target` directly, so a writable layer never depends on the pristine image.
    pub async fn make(&self, target: &Path) -> Result<(), WritableError> {
        if let Err(reason) = self.ensure().await {
            tracing::debug!(%reason, "no pristine writable layer; making one with mkfs");
            return create_image(target, WRITABLE_LAYER_BYTES, ImageUse::WritableLayer).await;
        }
        let (source, copy_to) = (self.path.clone(), target.to_path_buf());
        let copied = tokio::task::spawn_blocking(move || copy_sparse(&source, &copy_to))
            .await
            .unwrap_or_else(|e| Err(CopyError::Failed(std::io::Error::other(e))));
        match copied {
            Ok(()) => Ok(()),
            // Never overwrite: the caller's file stays, and so does its error.
            Err(CopyError::Exists(source)) => Err(WritableError::Create {
                path: target.to_path_buf(),
                source,
            }),
            Err(reason) => {
                tracing::debug!(%reason, "cannot copy the pristine writable layer; making one with mkfs");
                let _ = std::fs::remove_file(target);
                create_image(target, WRITABLE_LAYER_BYTES, ImageUse::WritableLayer).await
            }
        }
    }

    /// Makes the pristine image unless a whole one is there.
    async fn ensure(&self) -> Result<(), String> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.len() == WRITABLE_LAYER_BYTES => return Ok(()),
            Ok(_) | Err(_) => {}
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let temporary = self
            .path
            .with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        create_image(&temporary, WRITABLE_LAYER_BYTES, ImageUse::WritableLayer)
            .await
            .map_err(|e| e.to_string())?;
        // Another shim may have renamed its own first: either is a whole image.
        std::fs::rename(&temporary, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            format!("{}: {e}", self.path.display())
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("the target exists")]
    Exists(#[source] std::io::Error),
    #[error("the pristine image holds {bytes} bytes of data, more than an empty ext4")]
    TooMuchData { bytes: u64 },
    #[error(transparent)]
    Failed(#[from] std::io::Error),
}

/// Copies `source`'s data extents into a new sparse file `target` of the same length.
fn copy_sparse(source: &Path, target: &Path) -> Result<(), CopyError> {
    let input = std::fs::File::open(source)?;
    let length = input.metadata()?.len();
    let extents = data_extents(&input, length)?;
    let bytes: u64 = extents.iter().map(|(start, end)| end - start).sum();
    if bytes > MAX_DATA_BYTES {
        return Err(CopyError::TooMuchData { bytes });
    }
    let output = std::fs::File::create_new(target).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => CopyError::Exists(e),
        _ => CopyError::Failed(e),
    })?;
    output.set_len(length)?;
    let mut buffer = vec![0u8; CHUNK];
    for (start, end) in extents {
        let mut offset = start;
        while offset < end {
            let want = ((end - offset) as usize).min(CHUNK);
            let read = input.read_at(&mut buffer[..want], offset)?;
            if read == 0 {
                return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into());
            }
            output.write_all_at(&buffer[..read], offset)?;
            offset += read as u64;
        }
    }
    Ok(())
}

/// The `[start, end)` ranges of `file` that hold data.
fn data_extents(file: &std::fs::File, length: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < length {
        let start = match lseek(file.as_raw_fd(), offset as i64, Whence::SeekData) {
            Ok(start) => start as u64,
            // No data after `offset`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = (lseek(file.as_raw_fd(), start as i64, Whence::SeekHole)? as u64).min(length);
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn each_layer_is_a_sparse_copy_of_one_pristine_image() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = PristineLayer::new(dir.path().join("state/writable-layer.img"));
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        pristine.make(&a).await.unwrap();
        pristine.make(&b).await.unwrap();
        let master = std::fs::File::open(&pristine.path).unwrap();
        let extents = data_extents(&master, WRITABLE_LAYER_BYTES).unwrap();
        let read = |file: &std::fs::File, (start, end): (u64, u64)| {
            let mut bytes = vec![0u8; (end - start) as usize];
            file.read_exact_at(&mut bytes, start).unwrap();
            bytes
        };
        for copy in [&a, &b] {
            let meta = std::fs::metadata(copy).unwrap();
            assert_eq!(meta.len(), WRITABLE_LAYER_BYTES);
            assert!(
                meta.blocks() * 512 < 16 << 20,
                "{} bytes allocated: holes were filled",
                meta.blocks() * 512
            );
            let file = std::fs::File::open(copy).unwrap();
            // Where the master has data the copy has the same; elsewhere both read zeros.
            for &extent in &extents {
                assert!(
                    read(&file, extent) == read(&master, extent),
                    "{copy:?} differs"
                );
            }
            assert_eq!(data_extents(&file, WRITABLE_LAYER_BYTES).unwrap(), extents);
        }
        // The ext4 superblock magic 0xEF53 at offset 1024 + 56.
        assert_eq!(
            read(&master, (1024 + 56, 1024 + 58)),
            0xEF53u16.to_le_bytes()
        );
    }

    #[tokio::test]
    async fn a_truncated_pristine_image_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writable-layer.img");
        std::fs::write(&path, b"half an image").unwrap();
        let pristine = PristineLayer::new(&path);
        pristine.make(&dir.path().join("layer.img")).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            WRITABLE_LAYER_BYTES
        );
    }

    #[tokio::test]
    async fn an_existing_target_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = PristineLayer::new(dir.path().join("writable-layer.img"));
        let target = dir.path().join("taken");
        std::fs::write(&target, "data").unwrap();
        let err = pristine.make(&target).await.unwrap_err();
        assert!(matches!(err, WritableError::Create { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "data");
    }

    #[test]
    fn only_data_extents_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 32 << 20).unwrap();
        let extents = data_extents(&file, 64 << 20).unwrap();
        let bytes: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(bytes < 1 << 20, "{extents:?}");
        assert!(extents
            .iter()
            .any(|&(s, e)| s <= 32 << 20 && e >= (32 << 20) + 4096));
    }
}
