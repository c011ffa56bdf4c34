//! Building a Spry container's layer image before the old container stops.
//!
//! A Spry container's rootfs reaches its VM as an erofs image of its image's layers,
//! built on first use and shared through the layer cache (`rootfs/cache.rs`). containerd
//! creates the task, so the shim sees the container, only at StartContainer: after the
//! old container stopped. For a new image that build (~0.5 s for a 90 MB Debian+python
//! image) would be downtime. So `spry upgrade`, once CRI has created the new container,
//! reads its snapshot's mounts from containerd, builds the image into the same cache
//! under the same key the shim will compute, and holds it (a shared lock, as a user)
//! until the new container has started: the shim then finds it and only hot-plugs it.
//! Anything that keeps the build from happening is said and skipped: the shim builds
//! at start, as without it.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::cri::{ContainerDetails, CriClient, CriError};
use crate::rootfs::{CacheError, CachedImage, LayerCache, RootfsSource};
use crate::service::RUNTIME_ID;

/// Where Spry's shims keep layer images (from Spry's config).
#[derive(Debug, Clone)]
pub struct LayerPrebuild {
    pub cache: LayerCache,
}

/// Why a layer image was not built ahead (never fatal to the upgrade).
#[derive(Debug, thiserror::Error)]
pub enum PrebuildError {
    #[error("containerd does not say which snapshot the new container has")]
    NoSnapshot,
    #[error("cannot read the new container's snapshot {key} from containerd")]
    Mounts {
        key: String,
        #[source]
        source: CriError,
    },
    #[error("the new container's rootfs is not image layers under one overlay")]
    NotLayers,
    #[error("cannot make a read-only view of the new container's layers at {path}")]
    View {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl LayerPrebuild {
    /// Whether `container` (the new one, created) runs under Spry's runtime.
    pub fn applies_to(&self, container: &ContainerDetails) -> bool {
        container.runtime_type.as_deref() == Some(RUNTIME_ID)
    }

    /// Builds (or finds) the layer image of `container` and holds it; give it back with
    /// [`CachedImage::release`] once the container has started. Returns whether it was
    /// built now; `None` when its layers need no image (the lazy-pulling snapshotter
    /// serves one per layer).
    pub async fn run(
        &self,
        cri: &CriClient,
        container: &ContainerDetails,
    ) -> Result<Option<(CachedImage, bool)>, PrebuildError> {
        let (Some(snapshotter), Some(key)) = (&container.snapshotter, &container.snapshot_key)
        else {
            return Err(PrebuildError::NoSnapshot);
        };
        let mounts = cri
            .snapshot_mounts(snapshotter, key)
            .await
            .map_err(|source| PrebuildError::Mounts {
                key: key.clone(),
                source,
            })?;
        let kinds: Vec<(&str, &[String])> = mounts
            .iter()
            .map(|m| (m.type_.as_str(), m.options.as_slice()))
            .collect();
        // What the shim will make of these mounts (the merged path is not needed here),
        // once the snapshotter's images of a just-pulled image's layers are there.
        crate::rootfs::await_served_images(&kinds).await;
        let lowers = match RootfsSource::for_mounts(&kinds, Path::new("/")) {
            RootfsSource::Layers { lowers, .. } => lowers,
            RootfsSource::Served { .. } => return Ok(None),
            RootfsSource::Directory(_) => return Err(PrebuildError::NotLayers),
        };
        let view = LayersView::mount(&lowers)?;
        let built = self.cache.get_or_build(&lowers, view.path()).await;
        drop(view);
        Ok(Some(built?))
    }
}

/// The merged view of read-only layers, which is what the shim packs (its rootfs mount,
/// whose writable layer is still empty, shows the same tree): the layer itself when
/// there is one, else a read-only overlay of them, unmounted on drop.
enum LayersView {
    Single(PathBuf),
    Overlay(tempfile::TempDir),
}

impl LayersView {
    fn mount(lowers: &[PathBuf]) -> Result<Self, PrebuildError> {
        if let [single] = lowers {
            return Ok(Self::Single(single.clone()));
        }
        let dir = tempfile::Builder::new()
            .prefix("spry-upgrade-layers-")
            .tempdir()
            .map_err(|source| PrebuildError::View {
                path: std::env::temp_dir(),
                source,
            })?;
        let lowerdir = lowers
            .iter()
            .map(|l| l.to_string_lossy())
            .collect::<Vec<_>>()
            .join(":");
        mount(
            Some("overlay"),
            dir.path(),
            Some("overlay"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            Some(format!("lowerdir={lowerdir}").as_str()),
        )
        .map_err(|errno| PrebuildError::View {
            path: dir.path().to_path_buf(),
            source: errno.into(),
        })?;
        Ok(Self::Overlay(dir))
    }

    fn path(&self) -> &Path {
        match self {
            Self::Single(path) => path,
            Self::Overlay(dir) => dir.path(),
        }
    }
}

impl Drop for LayersView {
    fn drop(&mut self) {
        if let Self::Overlay(dir) = self {
            if let Err(error) = umount2(dir.path(), MntFlags::MNT_DETACH) {
                tracing::warn!(path = %dir.path().display(), %error, "cannot unmount the layers view");
            }
        }
    }
}
