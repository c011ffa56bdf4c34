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
//! recreated under the same path gets a new key. Every user holds a shared `flock` on the
//! file; whoever releases it last (an exclusive non-blocking lock succeeds) deletes it.
//! Builds are serialized per key by a lock file and go to a temporary name renamed into
//! place, so a reader never sees a half-written image and pods of one image starting
//! together build it once.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::erofs::{self, ErofsError};

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
}

/// A cached image in use: the shared lock lives as long as this value. Give it back
/// with [`CachedImage::release`].
#[derive(Debug)]
pub struct CachedImage {
    pub path: PathBuf,
    lock: Flock<File>,
}

impl LayerCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache key of a layer chain (overlay lowerdirs, top first).
    pub fn key(lowers: &[PathBuf]) -> Result<String, CacheError> {
        let mut digest = Sha256::new();
        for lower in lowers {
            let meta = std::fs::metadata(lower).map_err(|source| CacheError::Layer {
                path: lower.clone(),
                source,
            })?;
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

    fn image_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.erofs"))
    }

    /// The image for `key`, built from `source_dir` (the layers' merged view) if there is
    /// none. Returns whether it was built now.
    pub async fn get_or_build(
        &self,
        key: &str,
        source_dir: &Path,
    ) -> Result<(CachedImage, bool), CacheError> {
        let path = self.image_path(key);
        if let Some(image) = lock_shared(&path)? {
            return Ok((image, false));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| CacheError::Io {
            path: self.dir.clone(),
            source,
        })?;
        // Pods of one image often start together: one builds, the others wait for it.
        let build_lock = self.build_lock(key).await?;
        if let Some(image) = lock_shared(&path)? {
            return Ok((image, false));
        }
        let built = self.build(key, &path, source_dir).await;
        // Waiters hold the unlinked file and find the image; a newcomer in between
        // builds once more, which wastes time but is still correct (rename is atomic).
        let _ = std::fs::remove_file(self.build_lock_path(key));
        drop(build_lock);
        built?;
        match lock_shared(&path)? {
            Some(image) => Ok((image, true)),
            // Released and deleted by its last user between our rename and our lock:
            // only possible if someone else used it in that instant. Build again.
            None => Box::pin(self.get_or_build(key, source_dir)).await,
        }
    }

    fn build_lock_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!(".{key}.lock"))
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

    /// Builds the image for `key` at `path` (through a temporary name).
    async fn build(&self, key: &str, path: &Path, source_dir: &Path) -> Result<(), CacheError> {
        // Unique per process and call: two containers of one pod may build the same image.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{key}.{}-{n}.tmp", std::process::id()));
        erofs::build_image(source_dir, &tmp).await?;
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
    /// Drops our use of the image; the last user deletes the file (and the cache dir,
    /// once empty).
    pub fn release(self) {
        let CachedImage { path, lock } = self;
        drop(lock);
        delete_if_unused(&path);
    }
}

impl LayerCache {
    /// Deletes every image nobody holds. For a shim that died holding the last use of an
    /// image: the kernel dropped its lock, but nobody deleted the file.
    pub fn remove_unused(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "erofs") {
                delete_if_unused(&path);
            } else if is_orphan_build(&path) {
                // A build whose shim died mid-way.
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// A build's temporary file (`.<key>.<pid>-<n>.tmp`) whose process is gone.
fn is_orphan_build(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    let Some(pid) = stem
        .rsplit('.')
        .next()
        .and_then(|tail| tail.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return false;
    };
    !Path::new("/proc").join(pid.to_string()).exists()
}

/// Deletes the image at `path` if no user holds it, then the cache dir if it is empty.
fn delete_if_unused(path: &Path) {
    let Ok(file) = File::open(path) else {
        return;
    };
    // Only a file that is still the one at `path` may be deleted by us.
    if let Ok(exclusive) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        if same_file(&exclusive, path) {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an unused layer image");
            }
        }
    }
    // A concurrent builder recreates the dir.
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Opens `path` with a shared lock; `None` when there is no such image (or it was deleted
/// while we waited for the lock).
fn lock_shared(path: &Path) -> Result<Option<CachedImage>, CacheError> {
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
    let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, source)| CacheError::Lock {
        path: path.to_path_buf(),
        source,
    })?;
    if !same_file(&lock, path) {
        return Ok(None);
    }
    Ok(Some(CachedImage {
        path: path.to_path_buf(),
        lock,
    }))
}

/// Whether the open `file` is still what `path` names (not unlinked or replaced).
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_builds_of_dead_processes_are_orphans() {
        let mine = format!(".abc123.{}-0.tmp", std::process::id());
        assert!(!is_orphan_build(Path::new(&mine)));
        // PIDs are below 2^22 on Linux: this one cannot be alive.
        assert!(is_orphan_build(Path::new(".abc123.4999999-3.tmp")));
        assert!(!is_orphan_build(Path::new("abc123.erofs")));
        assert!(!is_orphan_build(Path::new(".abc123.lock")));
    }

    fn layer(root: &Path, name: &str, file: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), name).unwrap();
        dir
    }

    #[test]
    fn the_key_follows_paths_order_and_identity() {
        let root = tempfile::tempdir().unwrap();
        let a = layer(root.path(), "a", "x");
        let b = layer(root.path(), "b", "y");
        let ab = LayerCache::key(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(ab, LayerCache::key(&[a.clone(), b.clone()]).unwrap());
        assert_ne!(ab, LayerCache::key(&[b.clone(), a.clone()]).unwrap());
        // A snapshot dir recreated under the same path is a different layer.
        std::fs::remove_dir_all(&b).unwrap();
        let _keep_inode_busy = layer(root.path(), "c", "z");
        layer(root.path(), "b", "y");
        assert_ne!(ab, LayerCache::key(&[a, b]).unwrap());
        let missing = LayerCache::key(&[root.path().join("nope")]).unwrap_err();
        assert!(matches!(missing, CacheError::Layer { .. }), "{missing}");
    }

    #[tokio::test]
    async fn built_once_shared_and_deleted_by_the_last_user() {
        let root = tempfile::tempdir().unwrap();
        let lower = layer(root.path(), "lower", "hello");
        let cache = LayerCache::new(root.path().join("cache"));
        let key = LayerCache::key(std::slice::from_ref(&lower)).unwrap();
        let (first, built) = cache.get_or_build(&key, &lower).await.unwrap();
        assert!(built);
        let (second, built) = cache.get_or_build(&key, &lower).await.unwrap();
        assert!(!built, "the second user reuses the image");
        assert_eq!(first.path, second.path);
        let path = first.path.clone();
        first.release();
        assert!(path.exists(), "still in use by the second user");
        second.release();
        assert!(!path.exists(), "the last user deletes it");
        assert!(
            !root.path().join("cache").exists(),
            "and the empty cache dir"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn containers_starting_together_build_the_image_once() {
        let root = tempfile::tempdir().unwrap();
        let lower = layer(root.path(), "lower", "hello");
        let cache = LayerCache::new(root.path().join("cache"));
        let key = LayerCache::key(std::slice::from_ref(&lower)).unwrap();
        let users: Vec<_> = (0..4)
            .map(|_| {
                let (cache, key, lower) = (cache.clone(), key.clone(), lower.clone());
                tokio::spawn(async move { cache.get_or_build(&key, &lower).await.unwrap() })
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
        let cache = LayerCache::new(root.path().join("cache"));
        let in_use_layer = layer(root.path(), "a", "a");
        let orphan_layer = layer(root.path(), "b", "b");
        let in_use_key = LayerCache::key(std::slice::from_ref(&in_use_layer)).unwrap();
        let orphan_key = LayerCache::key(std::slice::from_ref(&orphan_layer)).unwrap();
        let (in_use, _) = cache
            .get_or_build(&in_use_key, &in_use_layer)
            .await
            .unwrap();
        let (orphan, _) = cache
            .get_or_build(&orphan_key, &orphan_layer)
            .await
            .unwrap();
        let orphan_path = orphan.path.clone();
        // A shim killed while using it: its lock goes with it, the file stays.
        drop(orphan);
        assert!(orphan_path.exists());
        cache.remove_unused();
        assert!(!orphan_path.exists(), "nobody holds it: swept");
        assert!(in_use.path.exists(), "held: kept");
        in_use.release();
        assert!(!root.path().join("cache").exists());
    }
}
