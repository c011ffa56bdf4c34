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
use crate::estargz::TOC_DIGEST_ANNOTATION;
use crate::fs::{error_chain, FsError, LayerMount};
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
        },
    })
}

struct Mounted {
    layer: Arc<RemoteLayer>,
    mount: LayerMount,
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

    /// Opens (verifying the TOC) and mounts the layer of `source` at `path`,
    /// then starts prefetch and background fetching.
    pub async fn mount(
        self: &Arc<Self>,
        id: u64,
        source: &RemoteSource,
        path: &Path,
    ) -> Result<(), RemoteError> {
        let reference = Reference::parse(&source.image_ref)
            .map_err(|source| RemoteError::Reference { source })?;
        let this = self.clone();
        let source = source.clone();
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || this.mount_blocking(id, reference, source, path))
            .await
            .map_err(|source| RemoteError::Join { source })?
    }

    fn mount_blocking(
        &self,
        id: u64,
        reference: Reference,
        source: RemoteSource,
        path: PathBuf,
    ) -> Result<(), RemoteError> {
        let digest = source.layer_digest.clone();
        let blob = RegistryBlob::new(
            self.client.clone(),
            reference,
            digest.clone(),
            self.runtime.clone(),
        );
        let retry = RetryPolicy {
            attempts: self.config.fetch_attempts,
            backoff: Duration::from_millis(self.config.fetch_backoff_ms),
        };
        let layer = RemoteLayer::open(
            Arc::new(blob),
            self.cache.clone(),
            &source.toc_digest,
            retry,
        )
        .map_err(|source| RemoteError::Open {
            digest: digest.clone(),
            source,
        })?;
        let layer = Arc::new(layer);
        let mount = LayerMount::mount(layer.clone(), &path, &digest).map_err(|source| {
            RemoteError::Mount {
                digest: digest.clone(),
                source,
            }
        })?;
        tracing::info!(id, layer = %digest, path = %path.display(), "mounted remote layer");
        self.start_fetching(layer.clone(), digest);
        let old = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Mounted { layer, mount });
        drop(old);
        Ok(())
    }

    fn start_fetching(&self, layer: Arc<RemoteLayer>, digest: String) {
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
                        Ok(bytes) => tracing::info!(layer = %digest, bytes, "layer fully fetched"),
                        Err(LayerError::Cancelled) => {}
                        Err(err) => tracing::warn!(layer = %digest, error = %error_chain(&err), "background fetch failed; reads fetch on demand"),
                    }
                }
            })
            .map(drop)
            .unwrap_or_else(|err| tracing::warn!(error = %err, "failed to start the background fetcher"));
    }

    /// Unmounts the layer of snapshot `id`, if mounted here.
    pub fn unmount(&self, id: u64) {
        let mounted = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(m) = mounted {
            m.layer.cancel();
            if let Err(err) = m.mount.unmount() {
                tracing::warn!(id, error = %error_chain(&err), "failed to unmount remote layer");
            }
        }
    }

    /// The layer of snapshot `id`.
    pub fn layer(&self, id: u64) -> Option<Arc<RemoteLayer>> {
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|m| m.layer.clone())
    }

    /// Unmounts everything (shutdown).
    pub fn unmount_all(&self) {
        let all: Vec<u64> = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for id in all {
            self.unmount(id);
        }
    }
}
