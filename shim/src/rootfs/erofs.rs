//! Building erofs images of directory trees: Spry's own packer ([`super::pack`]) first,
//! `mkfs.erofs` (erofs-utils) for the trees it leaves to it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::process::Command;

use super::pack::{self, Packed};

/// Free space kept beyond an image's estimated size: the state dir is usually tmpfs
/// (host RAM) shared by every pod on the node.
const RESERVE_BYTES: u64 = 64 << 20;

/// Failure to build an erofs image.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("cannot run mkfs.erofs (install erofs-utils)")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the rootfs image of {source_dir} needs about {needed_mib} MiB but {dir} has \
         {free_mib} MiB free (host RAM when it is tmpfs): free space there or set \
         state_dir to a disk"
    )]
    NoRoom {
        source_dir: PathBuf,
        dir: PathBuf,
        needed_mib: u64,
        free_mib: u64,
    },
    #[error("mkfs.erofs failed to build {image} from {source_dir}: {stderr}")]
    Failed {
        image: PathBuf,
        source_dir: PathBuf,
        stderr: String,
    },
    #[error("cannot read {path} to pack the rootfs image")]
    ReadTree {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the image {image}")]
    WriteImage {
        image: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Packs `dir` into a read-only erofs image at `image` (replacing it). Timestamps are
/// kept as they are; ownership, modes, xattrs and hard links too, so the container sees
/// the same tree. Refuses when the image's file system lacks room for it; a build that
/// is cancelled (its future dropped) stops and leaves no partial image.
pub async fn build_image(dir: &Path, image: &Path) -> Result<(), ErofsError> {
    let _ = std::fs::remove_file(image);
    let cancel = Arc::new(AtomicBool::new(false));
    let stop_on_drop = CancelOnDrop {
        cancel: cancel.clone(),
        partial: RemoveOnDrop(Some(image.to_path_buf())),
    };
    let (source, target) = (dir.to_path_buf(), image.to_path_buf());
    let packed = tokio::task::spawn_blocking(move || {
        pack::pack(&source, &target, &cancel, |bytes| {
            check_room_for(&source, &target, bytes)
        })
    })
    .await
    .expect("packing an image does not panic")?;
    stop_on_drop.keep();
    match packed {
        Packed::Done => Ok(()),
        Packed::Unsupported(reason) => {
            tracing::info!(dir = %dir.display(), reason, "packing the image with mkfs.erofs");
            build_with_mkfs(dir, image).await
        }
        // Only this function cancels, and only when it is dropped.
        Packed::Cancelled => Err(ErofsError::WriteImage {
            image: image.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::Interrupted),
        }),
    }
}

/// Tells a packing thread to stop when the build's future is dropped, and removes the
/// partial image. The flag is set first (this `drop` runs before its fields'): an image
/// the thread creates after the removal is one it removes itself when it sees the flag.
struct CancelOnDrop {
    cancel: Arc<AtomicBool>,
    partial: RemoveOnDrop,
}

impl CancelOnDrop {
    /// The packing ended on its own: its result (an image or not) stays as it is.
    fn keep(mut self) {
        self.partial.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

async fn build_with_mkfs(dir: &Path, image: &Path) -> Result<(), ErofsError> {
    check_room(dir, image)?;
    let partial = RemoveOnDrop(Some(image.to_path_buf()));
    let output = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(image)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ErofsError::Spawn { source })?;
    if !output.status.success() {
        return Err(ErofsError::Failed {
            image: image.to_path_buf(),
            source_dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    partial.keep();
    Ok(())
}

/// Removes a file when dropped (a build that failed or was cancelled), unless kept.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The image is about the size of the tree's file data; refuse when the file system the
/// image goes to does not have that plus a reserve.
fn check_room(dir: &Path, image: &Path) -> Result<(), ErofsError> {
    check_room_for(dir, image, tree_bytes(dir))
}

fn check_room_for(dir: &Path, image: &Path, needed: u64) -> Result<(), ErofsError> {
    let Some(target_dir) = image.parent() else {
        return Ok(());
    };
    let Ok(stat) = nix::sys::statvfs::statvfs(target_dir) else {
        return Ok(()); // writing the image will say what is wrong with the dir
    };
    let free = stat.blocks_available() * stat.fragment_size();
    if needed + RESERVE_BYTES > free {
        return Err(ErofsError::NoRoom {
            source_dir: dir.to_path_buf(),
            dir: target_dir.to_path_buf(),
            needed_mib: needed.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    Ok(())
}

/// Bytes of file data under `dir` (symlinks not followed, other file systems included,
/// as mkfs.erofs packs them).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
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
    async fn a_tree_larger_than_the_free_space_is_refused_before_writing() {
        // A 1 MiB tmpfs cannot take a 2 MiB tree (the reserve alone is 64 MiB).
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::create_dir(&small).unwrap();
        let mounted = nix::mount::mount(
            Some("tmpfs"),
            &small,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        );
        if mounted.is_err() {
            panic!("this test needs root (to mount a small tmpfs)");
        }
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("big"), vec![7u8; 2 << 20]).unwrap();
        let image = small.join("img.erofs");
        let err = build_image(&root, &image).await.unwrap_err();
        let _ = nix::mount::umount(&small);
        assert!(
            matches!(
                err,
                ErofsError::NoRoom {
                    needed_mib: 2..=3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("state_dir"));
    }

    #[tokio::test]
    async fn a_cancelled_build_leaves_no_partial_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for i in 0..2000 {
            std::fs::write(root.join(format!("f{i}")), vec![i as u8; 4096]).unwrap();
        }
        let image = dir.path().join("img.erofs");
        let build = build_image(&root, &image);
        // Cancelled almost at once: mkfs.erofs is killed and its output removed.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(5), build).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!image.exists(), "a partial image is left");
    }

    #[tokio::test]
    async fn missing_source_is_an_error_and_leaves_no_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img.erofs");
        let err = build_image(Path::new("/nonexistent/rootfs"), &image)
            .await
            .unwrap_err();
        assert!(matches!(err, ErofsError::ReadTree { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/rootfs"), "{err}");
        assert!(!image.exists());
    }
}
