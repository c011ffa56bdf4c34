//! A fully fetched lazy layer mounted by the kernel: its erofs image (`crate::erofs`, the
//! same bytes Spry's VMs read), written out once from verified chunk reads and mounted
//! file-backed (Linux >= 6.12) at `<snapshot>/fs`. No daemon, no FUSE round trip per
//! lookup, open or read: the layer reads at the speed of a local file system (measured:
//! at least as fast as the same tree extracted on ext4). The file is
//! `<snapshot>/erofs/layer.erofs`, where Spry's shim looks for a layer's image, so VMs
//! attach it directly too.
//!
//! Only a layer whose every chunk is cached and whose diffID is already verified goes this
//! way: a FUSE layer is poisoned (its reads fail) when its diffID turns out false after the
//! fetch, a native mount cannot be. The diffID comes from the cache's verified facts
//! (`cache/diff_ids.rs`), so deciding costs no network. Layers still being fetched stay on
//! FUSE (with passthrough for the files already cached).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::mount::MsFlags;

use super::store::RemoteSource;
use crate::cache::ChunkCache;
use crate::erofs::{ErofsError, ErofsImage};
use crate::fs::{LowerLayers, Tree, IMAGE_DIR, IMAGE_FILE};
use crate::layer::{chain_id, LayerError, RemoteLayer};

/// erofs's superblock magic, which statfs reports as the file system type.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// Largest piece of a file read and written at once.
const PIECE: usize = 1 << 20;

/// Why a layer is not mounted natively.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("the layer's diffID is not verified yet (it is once the layer was fetched whole)")]
    Unverified,
    #[error("not every chunk of the layer is cached")]
    NotCached,
    #[error(
        "layer {layer} has diffID {diff_id} (chain {actual}), but its image commits it as chain \
         {claimed}: the image claims another layer's identity; remove the image"
    )]
    ClaimMismatch {
        layer: String,
        diff_id: String,
        actual: String,
        claimed: String,
    },
    #[error("the layer has no erofs image")]
    Image { source: ErofsError },
    #[error("failed to read the layer's files")]
    Read { source: LayerError },
    #[error("failed to write the layer's image {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the kernel did not mount the erofs image {path} (file-backed erofs needs Linux >= 6.12 \
         with CONFIG_EROFS_FS_BACKED_BY_FILE)"
    )]
    Mount { path: PathBuf, source: nix::Error },
}

impl NativeError {
    /// Whether the layer must not be served at all (rather than served over FUSE).
    pub fn is_refusal(&self) -> bool {
        matches!(self, NativeError::ClaimMismatch { .. })
    }

    /// Whether this is the ordinary case of a layer not fetched (or verified) yet.
    pub fn is_expected(&self) -> bool {
        matches!(self, NativeError::Unverified | NativeError::NotCached)
    }
}

/// Checks the layer of `source` against its image's claim with the diffID recorded for its
/// blob: `Unverified` when none is, `ClaimMismatch` when the claim is false.
pub fn check_claim(cache: &ChunkCache, source: &RemoteSource) -> Result<(), NativeError> {
    let diff_id = cache
        .diff_id_of(&source.layer_digest)
        .ok_or(NativeError::Unverified)?;
    let actual = chain_id(&source.parent_chain, &diff_id);
    if actual != source.chain_id {
        return Err(NativeError::ClaimMismatch {
            layer: source.layer_digest.clone(),
            diff_id,
            actual,
            claimed: source.chain_id.clone(),
        });
    }
    Ok(())
}

/// Where a native layer's image file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePlace {
    /// `<snapshot>/erofs/layer.erofs`, where Spry's shim finds a layer's image for VMs.
    ForVms,
    /// `<snapshot>/native.erofs`: the layer is switched while served over FUSE, whose
    /// own image for VMs (`fs/image.rs`) may be mounted at `<snapshot>/erofs`.
    Beside,
}

impl ImagePlace {
    fn path(self, snapshot_dir: &Path) -> PathBuf {
        match self {
            ImagePlace::ForVms => snapshot_dir.join(IMAGE_DIR).join(IMAGE_FILE),
            ImagePlace::Beside => snapshot_dir.join(BESIDE_FILE),
        }
    }
}

const BESIDE_FILE: &str = "native.erofs";

/// Writes `layer`'s image over `lowers` (the tree its FUSE mount would show) to `place`
/// and mounts it read-only at `<snapshot_dir>/fs` (over a FUSE mount there, if any: new
/// containers then get the native mount, those already running keep the FUSE one).
/// Every byte comes through the layer's verified reads: a corrupted cached chunk is
/// fetched again, never written. Leaves nothing behind when it fails.
pub fn mount(
    layer: &RemoteLayer,
    lowers: LowerLayers,
    snapshot_dir: &Path,
    place: ImagePlace,
) -> Result<(), NativeError> {
    if !layer.fully_cached() {
        return Err(NativeError::NotCached);
    }
    let image = ErofsImage::build(&Tree::build_over(layer.index(), lowers))
        .map_err(|source| NativeError::Image { source })?;
    let path = write_image(layer, &image, &place.path(snapshot_dir))?;
    let fs = snapshot_dir.join("fs");
    // As the FUSE layer mounts: devices and setuid bits in an image mean nothing on the
    // host's own path to the layer (containers see them through their overlay mount).
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    // Buffered, not `directio`: reading the image through the host's page cache (its
    // readahead) was 620 MiB/s against 280-360 with direct I/O, sequential reads of a python
    // image's /usr/lib, page cache dropped.
    if let Err(source) = nix::mount::mount(Some(&path), &fs, Some("erofs"), flags, None::<&str>) {
        let _ = std::fs::remove_file(&path);
        return Err(NativeError::Mount { path, source });
    }
    if place == ImagePlace::ForVms {
        // An image an earlier daemon switched to (its mounts are gone, or they hold it open).
        let _ = std::fs::remove_file(ImagePlace::Beside.path(snapshot_dir));
    }
    Ok(())
}

/// Whether `<snapshot_dir>/fs` is a native (erofs) mount.
pub fn is_mounted(snapshot_dir: &Path) -> bool {
    nix::sys::statfs::statfs(&snapshot_dir.join("fs"))
        .is_ok_and(|s| s.filesystem_type().0 as u32 == EROFS_MAGIC)
}

/// Detaches the native mount of `snapshot_dir`, and a dead FUSE mount below it if a daemon
/// had stacked it there (containers still using them keep them until they end). The image
/// file goes with the snapshot directory.
pub fn unmount(snapshot_dir: &Path) {
    if crate::fs::detach_stack(&snapshot_dir.join("fs")) == 0 {
        tracing::warn!(dir = %snapshot_dir.display(), "a native layer was not mounted when it was removed");
    }
}

/// Detaches a native mount stacked over the layer's FUSE mount, if there is one: the FUSE
/// mount below can then be unmounted by its session.
pub fn unmount_over_fuse(snapshot_dir: &Path) {
    if is_mounted(snapshot_dir) {
        if let Err(err) = crate::fs::detach(&snapshot_dir.join("fs")) {
            tracing::warn!(dir = %snapshot_dir.display(), error = %crate::fs::error_chain(&err), "failed to unmount a native layer over its FUSE mount");
        }
    }
}

/// Says once per process that this kernel cannot mount erofs images from files.
pub fn warn_unsupported_once(err: &NativeError) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(error = %crate::fs::error_chain(err), "fully fetched layers are served over FUSE instead of natively");
    }
}

/// The image as a sparse file, under a temporary name until complete (a crash leaves no
/// half image under the name the shim looks for).
fn write_image(
    layer: &RemoteLayer,
    image: &ErofsImage,
    path: &Path,
) -> Result<PathBuf, NativeError> {
    let part = path.with_extension("erofs.part");
    let write_error = |source| NativeError::Write {
        path: part.clone(),
        source,
    };
    let written = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write_error)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // Image content, read by the shim for VMs; nobody writes it after this.
            .mode(0o444)
            .open(&part)
            .map_err(write_error)?;
        file.set_len(image.size()).map_err(write_error)?;
        image.write_with(
            PIECE,
            |entry, at, len| {
                layer
                    .read_file(entry, at, len)
                    .map_err(|source| NativeError::Read { source })
            },
            |offset, bytes| file.write_all_at(bytes, offset).map_err(write_error),
        )?;
        file.sync_all().map_err(write_error)?;
        std::fs::rename(&part, path).map_err(write_error)
    })();
    match written {
        Ok(()) => Ok(path.to_path_buf()),
        Err(err) => {
            let _ = std::fs::remove_file(&part);
            Err(err)
        }
    }
}
