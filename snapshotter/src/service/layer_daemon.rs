//! The layer daemon's side of `daemon.rs`: `spry-snapshotter mount-layer JOB` mounts one
//! remote layer, says it is ready, and serves it until told to stop.

use std::path::Path;
use std::sync::Arc;

use std::path::PathBuf;

use super::daemon::{LayerJob, READY};
use super::remote::RemoteError;
use super::remote::RemoteLayers;
use crate::registry::RegistryClient;

/// Why a layer daemon could not serve its layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerDaemonError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("layer job {path} is malformed")]
    Job {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("failed to set up the registry client's TLS")]
    Tls(#[from] crate::registry::TlsConfigError),
    #[error("failed to open the chunk cache")]
    Cache(#[from] crate::cache::CacheError),
    #[error("failed to mount the layer")]
    Mount(#[from] RemoteError),
    #[error("failed to wait for signals")]
    Signal { source: std::io::Error },
}

/// Daemon side: mounts the layer of `job_path`, says "ready" on stdout,
/// serves until SIGTERM or SIGINT, then unmounts.
pub async fn run(job_path: &Path) -> Result<(), LayerDaemonError> {
    let bytes = std::fs::read(job_path).map_err(|source| LayerDaemonError::Read {
        path: job_path.to_path_buf(),
        source,
    })?;
    let job: LayerJob = serde_json::from_slice(&bytes).map_err(|source| LayerDaemonError::Job {
        path: job_path.to_path_buf(),
        source,
    })?;
    let mut lazy = job.lazy.clone();
    lazy.fuse_daemon = false;
    let remote = Arc::new(RemoteLayers::new(
        Arc::new(RegistryClient::new(job.registry.clone())?),
        Arc::new(job.lazy.open_cache(&job.cache_dir)?),
        lazy,
        tokio::runtime::Handle::current(),
    ));
    let _ = crate::fs::detach(&job.mountpoint);
    remote
        .mount_here(0, &job.source, &job.mountpoint, &job.lowers)
        .await?;
    println!("{READY}");
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|source| LayerDaemonError::Signal { source })?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|source| LayerDaemonError::Signal { source })?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(layer = %job.source.layer_digest, "stopping layer daemon");
    let _ = tokio::task::spawn_blocking(move || remote.unmount_all()).await;
    Ok(())
}
