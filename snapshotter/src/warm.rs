//! `warm`: fetch an image's prioritized files (or everything) into the
//! node's chunk cache ahead of time.

use std::sync::Arc;

use crate::cache::ChunkCache;
use crate::convert::{estargz_layers, ImageConvertError};
use crate::layer::{LayerError, RemoteLayer, RetryPolicy};
use crate::registry::{Reference, RegistryBlob, RegistryClient};

/// Errors warming an image.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("failed to read the image manifest")]
    Manifest(#[from] ImageConvertError),
    #[error("failed to fetch layer {digest}")]
    Layer { digest: String, source: LayerError },
    #[error("a blocking task failed")]
    Join { source: tokio::task::JoinError },
}

/// How much to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmScope {
    Prioritized,
    All,
}

/// Totals of a warm-up.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WarmReport {
    pub layers: usize,
    pub skipped_non_estargz: usize,
    pub bytes_fetched: u64,
}

/// Warms `image` into `cache`; `progress` gets human-readable lines.
pub async fn warm_image(
    client: Arc<RegistryClient>,
    cache: Arc<ChunkCache>,
    image: &Reference,
    scope: WarmScope,
    progress: Arc<dyn Fn(String) + Send + Sync>,
) -> Result<WarmReport, WarmError> {
    let layers = estargz_layers(&client, image).await?;
    let mut report = WarmReport::default();
    let total = layers.len();
    for (n, (digest, toc)) in layers.into_iter().enumerate() {
        let Some(toc) = toc else {
            progress(format!(
                "layer {}/{total} {digest}: not eStargz, skipped",
                n + 1
            ));
            report.skipped_non_estargz += 1;
            continue;
        };
        let blob = RegistryBlob::new(
            client.clone(),
            image.clone(),
            digest.clone(),
            tokio::runtime::Handle::current(),
        );
        let cache = cache.clone();
        let progress = progress.clone();
        let digest_of_blob = digest.clone();
        let label = format!("layer {}/{total} {digest}", n + 1);
        let fetched = tokio::task::spawn_blocking(move || -> Result<u64, LayerError> {
            let layer =
                RemoteLayer::open(Arc::new(blob), cache.clone(), &toc, RetryPolicy::default())?;
            let fetched = match scope {
                WarmScope::Prioritized => {
                    let bytes = layer.prefetch()?;
                    progress(format!("{label}: prefetched {bytes} compressed bytes"));
                    bytes
                }
                WarmScope::All => {
                    let bytes = layer.fetch_all(&mut |done, all| {
                        progress(format!(
                            "{label}: {done}/{all} bytes ({}%)",
                            (done * 100).checked_div(all).unwrap_or(100)
                        ))
                    })?;
                    // The whole layer is here: its diffID verified now lets the snapshotter
                    // mount it natively (`service/native.rs`) instead of over FUSE. That
                    // streams the blob once more.
                    let digests = layer.digests()?;
                    if crate::service::verify::record_diff_id(&cache, &digest_of_blob, &digests) {
                        progress(format!("{label}: diffID {} verified", digests.diff_id));
                    } else {
                        progress(format!(
                            "{label}: diffID not recorded (the warning above says why): the layer will be served over FUSE"
                        ));
                    }
                    bytes
                }
            };
            tracing::debug!(layer = %label, fetched, "warmed");
            // Count everything fetched, TOC and footer included.
            Ok(layer
                .stats()
                .bytes_fetched
                .load(std::sync::atomic::Ordering::Relaxed))
        })
        .await
        .map_err(|source| WarmError::Join { source })?
        .map_err(|source| WarmError::Layer {
            digest: digest.clone(),
            source,
        })?;
        report.layers += 1;
        report.bytes_fetched += fetched;
    }
    Ok(report)
}
