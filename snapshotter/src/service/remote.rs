//! Remote snapshots: eStargz layers mounted over FUSE instead of being
//! downloaded, driven by the labels containerd's CRI plugin passes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;

use super::store::RemoteSource;
use crate::cache::ChunkCache;
use crate::config::LazyConfig;
use crate::erofs::ErofsImage;
use crate::estargz::TOC_DIGEST_ANNOTATION;
use crate::fs::{
    error_chain, AccessRecorder, FsError, ImageMount, LayerMount, LowerLayers, Tree, IMAGE_DIR,
};
use crate::layer::{LayerError, RemoteLayer, RetryPolicy};
use crate::registry::{Reference, RegistryBlob, RegistryClient, RegistryError};

/// Label with the chain ID containerd wants the committed snapshot to have.
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// Image reference of the layer being unpacked.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// Digest of the layer being unpacked.
pub const LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";

/// Errors mounting a remote layer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("image reference of the layer is invalid")]
    Reference { source: RegistryError },
    #[error("failed to open layer {digest}")]
    Open { digest: String, source: LayerError },
    #[error("failed to mount layer {digest}")]
    Mount { digest: String, source: FsError },
    #[error("a blocking task failed")]
    Join { source: tokio::task::JoinError },
    #[error("refused to serve layer {digest}")]
    Native {
        digest: String,
        source: super::native::NativeError,
    },
    #[error("failed to run the layer daemon")]
    Daemon {
        source: Box<super::daemon::DaemonError>,
    },
}

/// A Prepare that asks for a remote snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRequest {
    pub target: String,
    pub source: RemoteSource,
}

/// The remote request in a Prepare's labels, if they carry everything needed.
pub fn remote_request(labels: &HashMap<String, String>) -> Option<RemoteRequest> {
    Some(RemoteRequest {
        target: labels.get(TARGET_LABEL)?.clone(),
        source: RemoteSource {
            image_ref: labels.get(IMAGE_REF_LABEL)?.clone(),
            layer_digest: labels.get(LAYER_DIGEST_LABEL)?.clone(),
            toc_digest: labels.get(TOC_DIGEST_ANNOTATION)?.clone(),
            chain_id: labels.get(TARGET_LABEL)?.clone(),
            parent_chain: String::new(),
        },
    })
}

enum Mounted {
    InProcess {
        layer: Arc<RemoteLayer>,
        mount: LayerMount,
        /// The layer's erofs image for VMs (`vm_images`).
        image: Option<Box<ImageMount>>,
    },
    Daemon {
        dir: PathBuf,
    },
    /// Mounted by the kernel from its image (`native.rs`).
    Native {
        dir: PathBuf,
        /// Bytes and inodes of its files, when mounted by this process (not adopted).
        usage: Option<(i64, i64)>,
    },
}

/// All mounted remote layers of this process.
pub struct RemoteLayers {
    client: Arc<RegistryClient>,
    cache: Arc<ChunkCache>,
    config: LazyConfig,
    runtime: Handle,
    mounted: Mutex<HashMap<u64, Mounted>>,
}

impl RemoteLayers {
    pub fn new(
        client: Arc<RegistryClient>,
        cache: Arc<ChunkCache>,
        config: LazyConfig,
        runtime: Handle,
    ) -> Self {
        RemoteLayers {
            client,
            cache,
            config,
            runtime,
            mounted: Mutex::new(HashMap::new()),
        }
    }

    /// Mounts the layer of `source` at `<snapshot_dir>/fs`, over the layers served from
    /// `lowers` (topmost first): in a layer daemon when so configured, else in this process.
    pub async fn mount(
        self: &Arc<Self>,
        id: u64,
        source: &RemoteSource,
        snapshot_dir: &Path,
        lowers: &[PathBuf],
    ) -> Result<(), RemoteError> {
        let native = self.config.native_mounts && !self.config.record_accesses;
        if native && self.mount_native(id, source, snapshot_dir, lowers).await? {
            return Ok(());
        }
        if !self.config.fuse_daemon {
            let path = snapshot_dir.join("fs");
            return self.mount_here(id, source, &path, lowers).await;
        }
        let job = self.daemon_job(source, snapshot_dir, lowers)?;
        let dir = snapshot_dir.to_path_buf();
        let exe = std::env::current_exe().map_err(|source| RemoteError::Daemon {
            source: Box::new(super::daemon::DaemonError::Spawn {
                exe: PathBuf::from("/proc/self/exe"),
                source,
            }),
        })?;
        let d = dir.clone();
        let pid = tokio::task::spawn_blocking(move || super::daemon::spawn(&exe, &d, &job))
            .await
            .map_err(|source| RemoteError::Join { source })?
            .map_err(|source| RemoteError::Daemon {
                source: Box::new(source),
            })?;
        tracing::info!(id, pid, layer = %source.layer_digest, "layer daemon serving");
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Mounted::Daemon { dir });
        Ok(())
    }

    /// Mounts the layer natively when it is fully cached and verified (`native.rs`);
    /// `Ok(false)` when it is to be served over FUSE instead, `Err` when the layer must not
    /// be served at all (its verified diffID contradicts its image's claim).
    async fn mount_native(
        self: &Arc<Self>,
        id: u64,
        source: &RemoteSource,
        snapshot_dir: &Path,
        lowers: &[PathBuf],
    ) -> Result<bool, RemoteError> {
        let this = self.clone();
        let source = source.clone();
        let dir = snapshot_dir.to_path_buf();
        let lowers = LowerLayers::new(lowers.to_vec());
        let digest = source.layer_digest.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let native = |err| RemoteError::Native {
                digest: source.layer_digest.clone(),
                source: err,
            };
            // No network unless the layer's diffID is already verified.
            super::native::check_claim(&this.cache, &source).map_err(native)?;
            let layer = this.open_layer(&source)?;
            let started = std::time::Instant::now();
            super::native::mount(&layer, lowers, &dir, super::native::ImagePlace::ForVms)
                .map_err(native)?;
            // As for a FUSE layer: removing the image frees its chunks.
            if let Err(err) = super::chunks::write_list(&dir, layer.index()) {
                tracing::warn!(layer = %source.layer_digest, error = %err, "cannot record the layer's chunks; removing its image will leave them cached");
            }
            tracing::info!(id, layer = %source.layer_digest, elapsed_ms = started.elapsed().as_millis() as u64, "mounted fully fetched layer natively");
            Ok(index_usage(&layer))
        })
        .await
        .map_err(|source| RemoteError::Join { source })?;
        use super::native::NativeError;
        match outcome {
            Ok(usage) => {
                let dir = snapshot_dir.to_path_buf();
                let usage = Some(usage);
                self.mounted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, Mounted::Native { dir, usage });
                Ok(true)
            }
            Err(RemoteError::Native { source, .. }) if source.is_refusal() => {
                Err(RemoteError::Native { digest, source })
            }
            Err(RemoteError::Native { source, .. }) if source.is_expected() => {
                tracing::debug!(id, layer = %digest, reason = %source, "serving the layer over FUSE");
                Ok(false)
            }
            Err(RemoteError::Native {
                source: err @ NativeError::Mount { .. },
                ..
            }) => {
                super::native::warn_unsupported_once(&err);
                Ok(false)
            }
            Err(err) => {
                tracing::warn!(id, layer = %digest, error = %error_chain(&err), "cannot mount the fully fetched layer natively; serving it over FUSE");
                Ok(false)
            }
        }
    }

    /// What a layer daemon for `source` gets: only the settings (and credentials) of the
    /// layer's own registry, never another host's.
    pub(super) fn daemon_job(
        &self,
        source: &RemoteSource,
        snapshot_dir: &Path,
        lowers: &[PathBuf],
    ) -> Result<super::daemon::LayerJob, RemoteError> {
        let reference = Reference::parse(&source.image_ref)
            .map_err(|source| RemoteError::Reference { source })?;
        Ok(super::daemon::LayerJob {
            source: source.clone(),
            mountpoint: snapshot_dir.join("fs"),
            cache_dir: self.cache.dir().to_path_buf(),
            registry: self.client.config().only_host(&reference.host),
            lazy: self.config.clone(),
            lowers: lowers.to_vec(),
        })
    }

    /// After a restart: adopts a live layer daemon, or mounts again.
    pub async fn restore(
        self: &Arc<Self>,
        id: u64,
        source: &RemoteSource,
        snapshot_dir: &Path,
        lowers: &[PathBuf],
    ) -> Result<(), RemoteError> {
        // A live daemon first: it may serve running containers below a native mount it
        // stacked once the layer was fetched, and stopping it takes both down.
        if self.config.fuse_daemon {
            if let Some(pid) = super::daemon::alive(snapshot_dir) {
                tracing::info!(id, pid, "adopted running layer daemon");
                let dir = snapshot_dir.to_path_buf();
                self.mounted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, Mounted::Daemon { dir });
                return Ok(());
            }
        }
        if super::native::is_mounted(snapshot_dir) {
            tracing::info!(id, "adopted native layer mount");
            let dir = snapshot_dir.to_path_buf();
            self.mounted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, Mounted::Native { dir, usage: None });
            return Ok(());
        }
        self.mount(id, source, snapshot_dir, lowers).await
    }

    /// Whether snapshot `id` is served by a layer daemon of this snapshotter that has died
    /// (killed, crashed): its mount answers ENOTCONN from then on.
    pub fn daemon_died(&self, id: u64) -> bool {
        let mounted = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        matches!(mounted.get(&id), Some(Mounted::Daemon { dir }) if super::daemon::alive(dir).is_none())
    }

    /// Serves snapshot `id` again after its layer daemon died: the dead mounts are detached
    /// and a new daemon mounts the layer. Containers started on it later read it; those
    /// already running keep the dead mount (FUSE cannot hand a live session to a new
    /// daemon here) and get I/O errors for what they had not read.
    pub async fn revive(
        self: &Arc<Self>,
        id: u64,
        source: &RemoteSource,
        snapshot_dir: &Path,
        lowers: &[PathBuf],
    ) -> Result<(), RemoteError> {
        tracing::warn!(id, layer = %source.layer_digest, "the layer daemon died; mounting the layer again");
        let dir = snapshot_dir.to_path_buf();
        tokio::task::spawn_blocking(move || super::daemon::stop(&dir))
            .await
            .map_err(|source| RemoteError::Join { source })?;
        self.mount(id, source, snapshot_dir, lowers).await
    }

    /// Opens (verifying the TOC) and mounts the layer of `source` at `path`
    /// in this process, then starts prefetch and background fetching.
    pub async fn mount_here(
        self: &Arc<Self>,
        id: u64,
        source: &RemoteSource,
        path: &Path,
        lowers: &[PathBuf],
    ) -> Result<(), RemoteError> {
        let reference = Reference::parse(&source.image_ref)
            .map_err(|source| RemoteError::Reference { source })?;
        let this = self.clone();
        let source = source.clone();
        let path = path.to_path_buf();
        let lowers = LowerLayers::new(lowers.to_vec());
        tokio::task::spawn_blocking(move || {
            this.mount_blocking(id, reference, source, path, lowers)
        })
        .await
        .map_err(|source| RemoteError::Join { source })?
    }

    fn mount_blocking(
        &self,
        id: u64,
        reference: Reference,
        source: RemoteSource,
        path: PathBuf,
        lowers: LowerLayers,
    ) -> Result<(), RemoteError> {
        let digest = source.layer_digest.clone();
        let layer = Arc::new(self.open_blocking(reference, &source)?);
        if let Some(snapshot_dir) = path.parent() {
            if let Err(err) = super::chunks::write_list(snapshot_dir, layer.index()) {
                tracing::warn!(layer = %digest, error = %err, "cannot record the layer's chunks; removing its image will leave them cached");
            }
        }
        let recorder = if self.config.record_accesses {
            // Next to the mountpoint: <snapshot dir>/accessed.txt and accessed-ranges.txt.
            let file = path.with_file_name("accessed.txt");
            match AccessRecorder::create(&file, &path.with_file_name("accessed-ranges.txt")) {
                Ok(r) => Some(Arc::new(r)),
                Err(err) => {
                    tracing::warn!(path = %file.display(), error = %err, "cannot record file accesses");
                    None
                }
            }
        } else {
            None
        };
        let options = crate::fs::ServeOptions {
            // Reads served by passthrough never reach the recorder.
            passthrough: self.config.passthrough && recorder.is_none(),
            readahead: self.config.readahead_kib.saturating_mul(1024),
            recorder,
            lowers: lowers.clone(),
        };
        let image = self
            .config
            .vm_images
            .then(|| mount_image(&layer, &path, &digest, &options))
            .flatten()
            .map(Box::new);
        let mount =
            LayerMount::mount_with(layer.clone(), &path, &digest, options).map_err(|source| {
                RemoteError::Mount {
                    digest: digest.clone(),
                    source,
                }
            })?;
        tracing::info!(id, layer = %digest, path = %path.display(), "mounted remote layer");
        self.start_fetching(
            layer.clone(),
            source,
            path.parent().map(Path::to_path_buf),
            lowers,
        );
        let old = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Mounted::InProcess {
                    layer,
                    mount,
                    image,
                },
            );
        drop(old);
        Ok(())
    }

    /// Opens the layer of `source`: fetches and verifies its TOC. Blocking.
    fn open_layer(&self, source: &RemoteSource) -> Result<RemoteLayer, RemoteError> {
        let reference = Reference::parse(&source.image_ref)
            .map_err(|source| RemoteError::Reference { source })?;
        self.open_blocking(reference, source)
    }

    fn open_blocking(
        &self,
        reference: Reference,
        source: &RemoteSource,
    ) -> Result<RemoteLayer, RemoteError> {
        let blob = RegistryBlob::new(
            self.client.clone(),
            reference,
            source.layer_digest.clone(),
            self.runtime.clone(),
        );
        let retry = RetryPolicy {
            attempts: self.config.fetch_attempts,
            backoff: Duration::from_millis(self.config.fetch_backoff_ms),
            deadline: Duration::from_millis(self.config.read_deadline_ms),
            cooldown: Duration::from_millis(self.config.unresponsive_cooldown_ms),
        };
        RemoteLayer::open(
            Arc::new(blob),
            self.cache.clone(),
            &source.toc_digest,
            retry,
        )
        .map_err(|err| RemoteError::Open {
            digest: source.layer_digest.clone(),
            source: err,
        })
    }

    fn start_fetching(
        &self,
        layer: Arc<RemoteLayer>,
        source: RemoteSource,
        snapshot_dir: Option<PathBuf>,
        lowers: LowerLayers,
    ) {
        let digest = source.layer_digest.clone();
        let cache = self.cache.clone();
        let native = self.config.native_mounts && !self.config.record_accesses;
        let (prefetch, background) = (self.config.prefetch, self.config.background_fetch);
        if !prefetch && !background {
            return;
        }
        std::thread::Builder::new()
            .name("spry-fetch".into())
            .spawn(move || {
                if prefetch {
                    match layer.prefetch() {
                        Ok(bytes) => tracing::info!(layer = %digest, bytes, "prefetched"),
                        Err(err) => tracing::warn!(layer = %digest, error = %error_chain(&err), "prefetch failed"),
                    }
                }
                if background {
                    match layer.fetch_all(&mut |_, _| {}) {
                        Ok(bytes) => {
                            tracing::info!(layer = %digest, bytes, "layer fully fetched");
                            if let Some(dir) = &snapshot_dir {
                                let verified = super::verify::check_claim(&layer, &source, dir, &cache);
                                if native && verified == Some(true) {
                                    switch_to_native(&layer, lowers, dir, &digest);
                                }
                            }
                        }
                        Err(LayerError::Cancelled) => {}
                        Err(err) => tracing::warn!(layer = %digest, error = %error_chain(&err), "background fetch failed; reads fetch on demand"),
                    }
                }
            })
            .map(drop)
            .unwrap_or_else(|err| tracing::warn!(error = %err, "failed to start the background fetcher"));
    }

    /// Unmounts the layer of snapshot `id` (stopping its daemon).
    pub fn unmount(&self, id: u64) {
        let mounted = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match mounted {
            Some(Mounted::InProcess {
                layer,
                mount,
                image,
            }) => {
                layer.cancel();
                if let Some(dir) = mount.path().parent() {
                    super::native::unmount_over_fuse(dir);
                }
                if let Some(image) = image {
                    if let Err(err) = image.unmount() {
                        tracing::warn!(id, error = %error_chain(&err), "failed to unmount a remote layer's image");
                    }
                }
                if let Err(err) = mount.unmount() {
                    tracing::warn!(id, error = %error_chain(&err), "failed to unmount remote layer");
                }
            }
            Some(Mounted::Daemon { dir }) => super::daemon::stop(&dir),
            Some(Mounted::Native { dir, .. }) => super::native::unmount(&dir),
            None => {}
        }
    }

    /// The chunk cache the layers fill.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The layer of snapshot `id`, when served by this process.
    pub fn layer(&self, id: u64) -> Option<Arc<RemoteLayer>> {
        match self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            Some(Mounted::InProcess { layer, .. }) => Some(layer.clone()),
            _ => None,
        }
    }

    /// Bytes and inodes of the files of snapshot `id`'s layer, when this process knows its
    /// index (else the caller measures its tree).
    pub fn usage(&self, id: u64) -> Option<(i64, i64)> {
        match self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            Some(Mounted::InProcess { layer, .. }) => Some(index_usage(layer)),
            Some(Mounted::Native { usage, .. }) => *usage,
            _ => None,
        }
    }

    /// Shutdown: unmounts layers served by this process. Layer daemons keep
    /// running, and with them the containers that use their layers.
    pub fn unmount_all(&self) {
        let all: Vec<u64> = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, m)| matches!(m, Mounted::InProcess { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in all {
            self.unmount(id);
        }
    }
}

/// Stacks the layer's native mount over its FUSE mount once it is fetched and verified:
/// containers created from now on read it natively, those running keep the FUSE mount
/// (and the daemon serves them until the layer is removed).
pub(super) fn switch_to_native(layer: &RemoteLayer, lowers: LowerLayers, dir: &Path, digest: &str) {
    use super::native::{ImagePlace, NativeError};
    let started = std::time::Instant::now();
    match super::native::mount(layer, lowers, dir, ImagePlace::Beside) {
        Ok(()) => {
            tracing::info!(layer = %digest, elapsed_ms = started.elapsed().as_millis() as u64, "fully fetched layer mounted natively for new containers")
        }
        Err(err @ NativeError::Mount { .. }) => super::native::warn_unsupported_once(&err),
        Err(err) => {
            tracing::warn!(layer = %digest, error = %error_chain(&err), "cannot mount the fetched layer natively; new containers read it over FUSE")
        }
    }
}

fn index_usage(layer: &RemoteLayer) -> (i64, i64) {
    let index = layer.index();
    (index.content_size() as i64, index.entries.len() as i64)
}

/// Serves `layer`'s erofs image at `<snapshot>/erofs/` (beside its tree mount `fs_path`),
/// with the tree the FUSE mount shows (the same lower layers' directory attributes), its
/// readahead and recorder (`options`, the tree mount's). A
/// layer erofs cannot hold is said and skipped: a VM then packs its rootfs as for any
/// other image.
fn mount_image(
    layer: &Arc<RemoteLayer>,
    fs_path: &Path,
    digest: &str,
    options: &crate::fs::ServeOptions,
) -> Option<ImageMount> {
    let dir = fs_path.with_file_name(IMAGE_DIR);
    let image = ErofsImage::build(&Tree::build_over(layer.index(), options.lowers.clone()))
        .map_err(|err| err.to_string())
        .and_then(|image| {
            std::fs::create_dir_all(&dir).map_err(|err| err.to_string())?;
            ImageMount::mount(layer.clone(), image, &dir, digest, options)
                .map_err(|err| error_chain(&err))
        });
    match image {
        Ok(image) => Some(image),
        Err(error) => {
            tracing::warn!(layer = %digest, %error, "no erofs image of the layer for VMs");
            None
        }
    }
}
