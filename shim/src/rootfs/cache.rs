//! erofs images of image layers, built once and shared by every container (in any pod)
//! that runs on the same read-only layers.
//!
//! Why: packing a container's whole rootfs into an erofs image costs time and memory on
//! every start (a 256 MB Debian+python image: 1.2 s of `mkfs.erofs` and a 239 MB file in
//! the state dir, which is tmpfs). containerd's snapshot directories for committed layers
//! never change, so the image of a layer chain can be reused while it is in use.
//!
//! An image is `<cache>/<key>.erofs`, the key a digest of the layer directories' paths
//! and identities (device, inode, mtime), so a snapshot directory that is deleted and
//! recreated under the same path gets a new key; `<key>.lowers` lists those directories.
//! Every user holds a shared `flock` on the file; an image nobody holds (an exclusive
//! non-blocking lock succeeds) is kept within the config's bound or deleted
//! (`retained.rs`). Builds are serialized per key by a lock file and go to a temporary
//! name renamed into place, so a reader never sees a half-written image and pods of one
//! image starting together build it once.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::erofs::{self, ErofsError};
use super::{layer_key, retained};

/// Failure to find or build a cached layer image.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read layer directory {path}")]
    Layer {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer image cache {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock cached layer image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Build(#[from] ErofsError),
}

/// The shared image cache under one directory (Spry's state dir).
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
    /// Bytes of images nobody uses that may stay (`[rootfs] keep_unused_mib`).
    keep_unused: u64,
}

/// A cached image in use: the shared lock lives as long as this value. Give it back
/// with [`CachedImage::release`].
#[derive(Debug)]
pub struct CachedImage {
    pub path: PathBuf,
    lock: Flock<File>,
    keep_unused: u64,
}

impl LayerCache {
    /// The cache in `dir`, keeping up to `keep_unused` bytes of images no container uses.
    pub fn new(dir: impl Into<PathBuf>, keep_unused: u64) -> Self {
        Self {
            dir: dir.into(),
            keep_unused,
        }
    }

    /// The cache key of a layer chain (overlay lowerdirs, top first).
    fn key(lowers: &[PathBuf]) -> Result<String, CacheError> {
        layer_key::chain_key(lowers).map_err(|(path, source)| CacheError::Layer { path, source })
    }

    fn image_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.erofs"))
    }

    /// The image of the layer chain `lowers` (overlay lowerdirs, top first), built from
    /// `source_dir` (the layers' merged view) if there is none. Returns whether it was
    /// built now.
    pub async fn get_or_build(
        &self,
        lowers: &[PathBuf],
        source_dir: &Path,
    ) -> Result<(CachedImage, bool), CacheError> {
        let key = &Self::key(lowers)?;
        let path = self.image_path(key);
        if let Some(image) = self.lock_shared(&path)? {
            return Ok((image, false));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| CacheError::Io {
            path: self.dir.clone(),
            source,
        })?;
        // Pods of one image often start together: one builds, the others wait for it.
        let build_lock = self.build_lock(key).await?;
        if let Some(image) = self.lock_shared(&path)? {
            return Ok((image, false));
        }
        let built = self.build(key, lowers, &path, source_dir).await;
        // Waiters hold the unlinked file and find the image; a newcomer in between
        // builds once more, which wastes time but is still correct (rename is atomic).
        let _ = std::fs::remove_file(self.build_lock_path(key));
        drop(build_lock);
        built?;
        match self.lock_shared(&path)? {
            Some(image) => Ok((image, true)),
            // Released and deleted by its last user between our rename and our lock:
            // only possible if someone else used it in that instant. Build again.
            None => Box::pin(self.get_or_build(lowers, source_dir)).await,
        }
    }

    fn build_lock_path(&self, key: &str) -> PathBuf {
        retained::build_lock_path(&self.dir, key)
    }

    async fn build_lock(&self, key: &str) -> Result<Flock<File>, CacheError> {
        let path = self.build_lock_path(key);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| CacheError::Io {
                path: path.clone(),
                source,
            })?;
        tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, source)| CacheError::Lock { path, source })
        })
        .await
        .expect("the lock task does not panic")
    }

    /// Builds the image for `key` at `path` (through a temporary name), its list of
    /// layers first: an image is never in place without it.
    async fn build(
        &self,
        key: &str,
        lowers: &[PathBuf],
        path: &Path,
        source_dir: &Path,
    ) -> Result<(), CacheError> {
        // Unique per process and call: two containers of one pod may build the same image.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{key}.{}-{n}.tmp", std::process::id()));
        erofs::build_image(source_dir, &tmp).await?;
        if let Err(source) = layer_key::write_lowers(&self.dir, key, lowers) {
            let _ = std::fs::remove_file(&tmp);
            return Err(CacheError::Io {
                path: layer_key::lowers_path(&self.dir, key),
                source,
            });
        }
        std::fs::rename(&tmp, path).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            CacheError::Io {
                path: path.to_path_buf(),
                source,
            }
        })
    }
}

impl CachedImage {
    /// Drops our use of the image. The last user leaves it to the cache's bound of
    /// unused images (`retained.rs`): kept for the next container of the same layers,
    /// or deleted (with the cache dir, once empty).
    pub fn release(self) {
        let CachedImage {
            path,
            lock,
            keep_unused,
        } = self;
        drop(lock);
        retained::released(&path, keep_unused);
    }
}

impl LayerCache {
    /// Deletes the images nobody holds beyond the bound, and those whose layers are gone.
    /// For a shim that died holding the last use of an image (the kernel dropped its
    /// lock, nobody else looked at it) and for `spry uninstall` (with a bound of 0).
    pub fn trim(&self) {
        retained::trim(&self.dir, self.keep_unused);
    }

    /// Opens `path` with a shared lock; `None` when there is no such image (or it was
    /// deleted while we waited for the lock).
    fn lock_shared(&self, path: &Path) -> Result<Option<CachedImage>, CacheError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let lock =
            Flock::lock(file, FlockArg::LockShared).map_err(|(_, source)| CacheError::Lock {
                path: path.to_path_buf(),
                source,
            })?;
        if !retained::same_file(&lock, path) {
            return Ok(None);
        }
        Ok(Some(CachedImage {
            path: path.to_path_buf(),
            lock,
            keep_unused: self.keep_unused,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(root: &Path, name: &str, file: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), name).unwrap();
        dir
    }

    /// Builds (or finds) the image of the one-layer chain `lower` in `cache`.
    async fn image_of(cache: &LayerCache, lower: &Path) -> (CachedImage, bool) {
        let lowers = [lower.to_path_buf()];
        cache.get_or_build(&lowers, lower).await.unwrap()
    }

    fn bytes_of(image: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(image).unwrap().blocks() * 512
    }

    #[tokio::test]
    async fn a_layer_that_cannot_be_read_is_named() {
        let root = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(root.path().join("cache"), 0);
        let nope = root.path().join("nope");
        let missing = cache
            .get_or_build(std::slice::from_ref(&nope), &nope)
            .await
            .unwrap_err();
        assert!(matches!(missing, CacheError::Layer { .. }), "{missing}");
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[tokio::test]
    async fn built_once_shared_and_deleted_by_the_last_user() {
        let root = tempfile::tempdir().unwrap();
        let lower = layer(root.path(), "lower", "hello");
        let cache = LayerCache::new(root.path().join("cache"), 0);
        let (first, built) = image_of(&cache, &lower).await;
        assert!(built);
        let (second, built) = image_of(&cache, &lower).await;
        assert!(!built, "the second user reuses the image");
        assert_eq!(first.path, second.path);
        let path = first.path.clone();
        first.release();
        assert!(path.exists(), "still in use by the second user");
        second.release();
        assert!(!path.exists(), "the last user deletes it (nothing kept)");
        assert!(
            !root.path().join("cache").exists(),
            "and its list of layers and the empty cache dir"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn containers_starting_together_build_the_image_once() {
        let root = tempfile::tempdir().unwrap();
        let lower = layer(root.path(), "lower", "hello");
        let cache = LayerCache::new(root.path().join("cache"), 0);
        let users: Vec<_> = (0..4)
            .map(|_| {
                let (cache, lower) = (cache.clone(), lower.clone());
                tokio::spawn(async move { image_of(&cache, &lower).await })
            })
            .collect();
        let mut built = 0;
        let mut images = Vec::new();
        for user in users {
            let (image, was_built) = user.await.unwrap();
            built += usize::from(was_built);
            images.push(image);
        }
        assert_eq!(built, 1, "one build for four users");
        for image in images {
            image.release();
        }
        assert!(!root.path().join("cache").exists(), "nothing left behind");
    }

    #[tokio::test]
    async fn images_left_by_a_dead_user_are_swept_and_images_in_use_kept() {
        let root = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(root.path().join("cache"), 0);
        let (in_use, _) = image_of(&cache, &layer(root.path(), "a", "a")).await;
        let (orphan, _) = image_of(&cache, &layer(root.path(), "b", "b")).await;
        let orphan_path = orphan.path.clone();
        // A shim killed while using it: its lock goes with it, the file stays.
        drop(orphan);
        assert!(orphan_path.exists());
        cache.trim();
        assert!(!orphan_path.exists(), "nobody holds it: swept");
        assert!(in_use.path.exists(), "held: kept");
        in_use.release();
        assert!(!root.path().join("cache").exists());
    }

    #[tokio::test]
    async fn an_unused_image_is_kept_for_the_next_container_of_its_layers() {
        let root = tempfile::tempdir().unwrap();
        let lower = layer(root.path(), "lower", "hello");
        let cache = LayerCache::new(root.path().join("cache"), 1 << 30);
        let (first, built) = image_of(&cache, &lower).await;
        assert!(built);
        let path = first.path.clone();
        first.release();
        assert!(path.exists(), "kept within the bound");
        let (again, built) = image_of(&cache, &lower).await;
        assert!(!built, "the next container finds it packed");
        assert_eq!(again.path, path);
        again.release();
        // Uninstall: a bound of 0 deletes every unused image.
        LayerCache::new(root.path().join("cache"), 0).trim();
        assert!(!root.path().join("cache").exists());
    }

    #[tokio::test]
    async fn the_least_recently_released_go_first_and_held_ones_stay() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        let roomy = LayerCache::new(&dir, 1 << 30);
        let mut images = Vec::new();
        for name in ["a", "b", "c", "held"] {
            images.push(image_of(&roomy, &layer(root.path(), name, name)).await.0);
        }
        let held = images.pop().unwrap();
        let paths: Vec<PathBuf> = images.iter().map(|i| i.path.clone()).collect();
        for image in images {
            image.release();
            // Release times an mtime apart.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(paths.iter().all(|p| p.exists()));
        // Room for the last two released; the held one counts for nothing.
        let room = bytes_of(&paths[1]) + bytes_of(&paths[2]);
        LayerCache::new(&dir, room).trim();
        assert!(!paths[0].exists(), "released first: deleted first");
        assert!(paths[1].exists() && paths[2].exists());
        assert!(held.path.exists());
        LayerCache::new(&dir, 0).trim();
        assert!(paths.iter().all(|p| !p.exists()));
        assert!(held.path.exists(), "a held image is never deleted");
        held.release();
    }

    #[tokio::test]
    async fn an_image_whose_layers_are_gone_goes_at_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        let cache = LayerCache::new(&dir, 1 << 30);
        let gone = layer(root.path(), "gone", "x");
        let stays = layer(root.path(), "stays", "y");
        let (a, _) = image_of(&cache, &gone).await;
        let (b, _) = image_of(&cache, &stays).await;
        let (gone_image, stays_image) = (a.path.clone(), b.path.clone());
        a.release();
        b.release();
        // containerd removed the image: its snapshot directories go.
        std::fs::remove_dir_all(&gone).unwrap();
        cache.trim();
        assert!(!gone_image.exists(), "it can never serve again");
        assert!(!gone_image.with_extension("lowers").exists());
        assert!(stays_image.exists() && stays_image.with_extension("lowers").exists());
        // A list of layers without its image (its build died after writing it).
        let stray = dir.join("0123.lowers");
        std::fs::write(&stray, b"/nowhere\0").unwrap();
        cache.trim();
        assert!(!stray.exists());
        assert!(stays_image.exists());
    }
}
