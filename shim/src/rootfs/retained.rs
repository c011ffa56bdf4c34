//! What becomes of a layer image no container uses any more: kept, within a bound, so the
//! next container of the same image (kubelet restarting a crashed one, a recreated pod,
//! `spry upgrade`'s rollback) finds it packed instead of packing it again (python's
//! 256 MB tree: 0.2-0.35 s on the pod's critical path), or deleted.
//!
//! Images live in the state dir, usually tmpfs, so a kept image is memory (charged to the
//! cgroup of the process that packed it: a shim, in containerd's). The bound is the
//! config's `[rootfs] keep_unused_mib`; the least recently released go first. An image
//! whose layers containerd has removed (its image deleted or garbage-collected) can never
//! serve again and goes at once. A shim trims when it makes an image unused and when it
//! cleans up after a dead shim; `spry uninstall` deletes every unused image.
//!
//! Deleting takes the image's exclusive lock, its list of layers first and the image
//! last: a container taking the image at that moment either holds it first (and the trim
//! leaves it) or finds it gone and builds it again, list included.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

use super::layer_key;

/// The lock file serializing builds of `key`'s image.
pub(super) fn build_lock_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!(".{key}.lock"))
}

/// After a user released the image at `path`: if nobody holds it now, it is marked as
/// released now (the eviction order); then the cache is trimmed to `keep` bytes.
pub(super) fn released(path: &Path, keep: u64) {
    let Some(dir) = path.parent() else {
        return;
    };
    if keep > 0 {
        if let Some(unused) = lock_unused(path) {
            if let Err(error) = unused.set_modified(SystemTime::now()) {
                tracing::debug!(image = %path.display(), %error, "cannot mark a layer image released; it is evicted as if released when built");
            }
        }
    }
    trim(dir, keep);
}

/// An image nobody uses, held exclusively while the trim decides.
struct Unused {
    key: String,
    path: PathBuf,
    bytes: u64,
    released: SystemTime,
    _lock: Flock<File>,
}

/// Deletes the images in `dir` nobody holds beyond `keep` bytes (the least recently
/// released first) and, whatever the bound, those whose layers are gone; then what dead
/// builds left, lists of layers without their image, and `dir` once empty.
pub(super) fn trim(dir: &Path, keep: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut unused = Vec::new();
    let mut lists = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(key) = name.strip_suffix(".erofs") {
            let Some(lock) = lock_unused(&path) else {
                continue;
            };
            if !layer_key::layers_unchanged(dir, key) {
                delete(dir, key, &path, "its layers are gone");
                continue;
            }
            let Ok(meta) = lock.metadata() else {
                continue;
            };
            unused.push(Unused {
                key: key.to_owned(),
                bytes: meta.blocks() * 512,
                released: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                path,
                _lock: lock,
            });
        } else if let Some(key) = name.strip_suffix(".lowers") {
            lists.push(key.to_owned());
        } else if is_orphan_build(&path) {
            // A build whose shim died mid-way.
            let _ = std::fs::remove_file(&path);
        }
    }
    // Newest first: they stay while they fit.
    unused.sort_by_key(|image| std::cmp::Reverse(image.released));
    let mut kept = 0u64;
    for image in unused {
        if kept + image.bytes <= keep {
            kept += image.bytes;
        } else {
            delete(
                dir,
                &image.key,
                &image.path,
                "over the bound of unused images",
            );
        }
    }
    // A list outliving its image (a build that died after writing it). One being built
    // right now may be taken for such: its image then counts as stale once unused and
    // is packed again, a lost cache entry and nothing worse.
    for key in lists {
        let image = dir.join(format!("{key}.erofs"));
        if !image.exists() && !build_lock_path(dir, &key).exists() {
            let _ = std::fs::remove_file(layer_key::lowers_path(dir, &key));
        }
    }
    // A concurrent builder recreates the dir.
    let _ = std::fs::remove_dir(dir);
}

/// Deletes `key`'s image at `path` (held exclusively by the caller) and its list.
fn delete(dir: &Path, key: &str, path: &Path, why: &'static str) {
    let _ = std::fs::remove_file(layer_key::lowers_path(dir, key));
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(image = %path.display(), why, "unused layer image deleted"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(image = %path.display(), %error, "cannot remove an unused layer image")
        }
    }
}

/// The image at `path`, locked exclusively, when nobody else holds it and it is still
/// the file `path` names.
fn lock_unused(path: &Path) -> Option<Flock<File>> {
    let file = File::open(path).ok()?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
    same_file(&lock, path).then_some(lock)
}

/// Whether the open `file` is still what `path` names (not unlinked or replaced).
pub(super) fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
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
}
