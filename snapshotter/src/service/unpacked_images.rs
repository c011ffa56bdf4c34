//! erofs images of unpacked layers, for Spry's VMs (`lazy.vm_images`).
//!
//! A layer containerd unpacked (anything not served lazily) is a plain tree at
//! `<snapshot>/fs`. Spry's shim attaches layers to a VM as erofs images; without one per
//! layer it packs the container's whole layer chain when the container is created, on the
//! critical path of the pod's start or of an in-place image swap (the 256 MB python image:
//! ~0.6-1.2 s). So when containerd commits an unpacked layer, its image is built in the
//! background (`mkfs.erofs`, one layer at a time) into `<snapshot>/erofs/layer.erofs`,
//! where the shim looks for a layer's image, as for a lazy one (nydus-snapshotter's tarfs
//! mode does the same for Kata's guests). Until it is there, `layer.erofs.pending` says a
//! build is coming: the shim waits a while for it rather than packing the same bytes.
//!
//! What goes in is what containerd wrote: overlay whiteouts (0/0 character devices and
//! `trusted.overlay.opaque`), and no other `trusted.*` xattr (containerd refuses admin
//! xattrs from archives), so the image says exactly what the host's overlay lower says.
//! A committed layer never changes, so its image never goes stale; it goes with its
//! snapshot, a build still running is stopped first. The cost is a second copy of the
//! layer on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::process::Command;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::fs::{IMAGE_DIR, IMAGE_FILE};

/// Beside [`IMAGE_FILE`] while its build is queued or running. Spry's shim knows the name.
pub const PENDING_FILE: &str = "layer.erofs.pending";
/// What `mkfs.erofs` writes, renamed to [`IMAGE_FILE`] once complete.
const PARTIAL_FILE: &str = "layer.erofs.partial";
/// Free space left on the snapshotter's file system after an image: below it, no image
/// (the shim packs the layers itself, in its own state dir).
const RESERVE_BYTES: u64 = 512 << 20;

/// Why a layer got no image.
#[derive(Debug, thiserror::Error)]
pub enum UnpackedImageError {
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run mkfs.erofs (install erofs-utils)")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.erofs failed on {tree}: {stderr}")]
    Failed { tree: PathBuf, stderr: String },
    #[error(
        "{dir} has {free_mib} MiB free, too little for a {needed_mib} MiB layer image and \
         the {reserve_mib} MiB kept free; Spry's shim packs this layer itself"
    )]
    NoRoom {
        dir: PathBuf,
        needed_mib: u64,
        free_mib: u64,
        reserve_mib: u64,
    },
}

/// The background builds, by snapshot id.
pub struct UnpackedImages {
    builds: Mutex<HashMap<u64, JoinHandle<()>>>,
    /// One build at a time: they follow a pull's layers, and the node has pods to run.
    turn: Arc<Semaphore>,
}

impl UnpackedImages {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            builds: Mutex::default(),
            turn: Arc::new(Semaphore::new(1)),
        })
    }

    fn builds(&self) -> std::sync::MutexGuard<'_, HashMap<u64, JoinHandle<()>>> {
        self.builds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the image of the committed, unpacked layer at `snapshot` (its tree holding
    /// about `size` bytes). Marks it pending before returning, so that a container created
    /// right after the commit waits for the image rather than packing the layer again.
    pub fn queue(self: &Arc<Self>, id: u64, snapshot: PathBuf, size: u64) {
        let dir = snapshot.join(IMAGE_DIR);
        if dir.join(IMAGE_FILE).exists() {
            return;
        }
        let marked = ensure_dir(&dir).and_then(|()| {
            std::fs::write(dir.join(PENDING_FILE), b"").map_err(|source| UnpackedImageError::Io {
                path: dir.join(PENDING_FILE),
                source,
            })
        });
        if let Err(err) = marked {
            tracing::warn!(id, error = %crate::fs::error_chain(&err), "no VM image for the layer");
            return;
        }
        let this = Arc::clone(self);
        let mut builds = self.builds();
        let task = tokio::spawn(async move {
            let turn = this.turn.clone().acquire_owned().await;
            let started = std::time::Instant::now();
            let built = build(&snapshot, size).await;
            drop(turn);
            let _ = std::fs::remove_file(dir.join(PENDING_FILE));
            match built {
                Ok(()) => tracing::info!(
                    id,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "built the layer's VM image"
                ),
                Err(err) => {
                    tracing::warn!(id, error = %crate::fs::error_chain(&err), "no VM image for the layer")
                }
            }
            this.builds().remove(&id);
        });
        builds.insert(id, task);
    }

    /// Stops the build of snapshot `id`'s image, if one is queued or running, before the
    /// snapshot's directory goes (`mkfs.erofs` is killed with its task).
    pub async fn cancel(&self, id: u64) {
        let task = self.builds().remove(&id);
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Waits for every build queued so far (tests).
    pub async fn settle(&self) {
        loop {
            let next = self.builds().keys().next().copied();
            let Some(id) = next else {
                return;
            };
            let task = self.builds().remove(&id);
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }

    /// After a restart: drops what a build cut short left, and queues the images that
    /// committed unpacked layers (`(id, snapshot dir, size)`) still lack.
    pub fn resume(self: &Arc<Self>, layers: Vec<(u64, PathBuf, u64)>) {
        for (id, snapshot, size) in layers {
            let dir = snapshot.join(IMAGE_DIR);
            for stale in [PARTIAL_FILE, PENDING_FILE] {
                let _ = std::fs::remove_file(dir.join(stale));
            }
            self.queue(id, snapshot, size);
        }
    }
}

fn ensure_dir(dir: &Path) -> Result<(), UnpackedImageError> {
    // Not create_dir_all: a snapshot removed meanwhile must not come back as a stray dir.
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(UnpackedImageError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Builds `<snapshot>/erofs/layer.erofs` from `<snapshot>/fs`; never leaves a partial image.
async fn build(snapshot: &Path, size: u64) -> Result<(), UnpackedImageError> {
    let dir = snapshot.join(IMAGE_DIR);
    check_room(&dir, size)?;
    let partial = RemoveOnDrop(dir.join(PARTIAL_FILE));
    let tree = snapshot.join("fs");
    let mut mkfs = Command::new("mkfs.erofs");
    mkfs.arg("--quiet")
        .arg(&partial.0)
        .arg(&tree)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    crate::sys::die_with_spawner(&mut mkfs);
    let output = mkfs
        .output()
        .await
        .map_err(|source| UnpackedImageError::Spawn { source })?;
    if !output.status.success() {
        return Err(UnpackedImageError::Failed {
            tree,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnpackedImageError::Io { path, source }
    };
    // On disk before it is named: a VM must never attach an image a crash cut short.
    std::fs::File::open(&partial.0)
        .and_then(|f| f.sync_all())
        .map_err(io(&partial.0))?;
    // Once renamed, the guard finds nothing to remove.
    std::fs::rename(&partial.0, dir.join(IMAGE_FILE)).map_err(io(&partial.0))
}

fn check_room(dir: &Path, size: u64) -> Result<(), UnpackedImageError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| UnpackedImageError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    // erofs stores data uncompressed here; metadata is a few percent on top.
    let needed = size + size / 16;
    if free < needed + RESERVE_BYTES {
        return Err(UnpackedImageError::NoRoom {
            dir: dir.to_path_buf(),
            needed_mib: needed >> 20,
            free_mib: free >> 20,
            reserve_mib: RESERVE_BYTES >> 20,
        });
    }
    Ok(())
}

/// Removes a file when dropped (a build that failed or was cancelled).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
