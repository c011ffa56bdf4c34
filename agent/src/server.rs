//! Wires the service to a transport and serves until shutdown.

use std::path::PathBuf;
use std::sync::Arc;

use spry_proto::agent_ttrpc::create_agent;
use tokio::sync::Notify;
use ttrpc::r#async::Server;

use crate::channel::{AgentChannel, ChannelError};
use crate::container::{ContainerManager, ManagerConfig};
use crate::reaper::Reaper;
use crate::sandbox::SandboxOptions;
use crate::service::{AgentService, PowerAction};
use crate::storage::{SharedFs, StorageManager};

/// The virtio-fs tag of the pod's shared directory.
pub const SHARED_FS_TAG: &str = "spry";

/// Errors of running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to start the child reaper")]
    Reaper { source: std::io::Error },
    #[error("failed to create {path}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to set up the host channel")]
    Channel {
        #[from]
        source: ChannelError,
    },
    #[error("the ttrpc server failed")]
    Server { source: ttrpc::Error },
}

/// How the agent runs.
pub struct AgentConfig {
    /// `/run/spry` in the VM.
    pub run_dir: PathBuf,
    pub shared: SharedFs,
    pub sandbox: SandboxOptions,
    /// Power the VM off on Shutdown (PID 1) or just stop serving (host test mode).
    pub power_off_on_shutdown: bool,
}

/// Serves the agent API on `channel` until Shutdown (host mode) or forever (PID 1).
pub async fn serve(channel: Box<dyn AgentChannel>, config: AgentConfig) -> Result<(), ServeError> {
    Reaper::global()
        .start()
        .map_err(|source| ServeError::Reaper { source })?;
    for dir in [
        config.run_dir.join("containers"),
        config.run_dir.join("libcontainer"),
    ] {
        std::fs::create_dir_all(&dir).map_err(|source| ServeError::RunDir {
            path: dir.clone(),
            source,
        })?;
    }
    // Before the channel is up, so a VM template is saved with spare helpers ready.
    if let Err(err) = tokio::task::spawn_blocking(crate::container::prepare_spare_helpers).await {
        tracing::warn!(error = %err, "starting the spare container helpers failed");
    }
    let mut storage = StorageManager::new(&config.run_dir, config.shared.clone());
    if let Err(err) = storage.listen_for_scsi_probes() {
        tracing::warn!(error = %err, "not hearing disk probes; a hot-plugged disk is used once its block device shows");
    }
    let storage = Arc::new(storage);
    let containers = Arc::new(ContainerManager::new(
        ManagerConfig {
            run_dir: config.run_dir.clone(),
            cgroup_root: "/sys/fs/cgroup".into(),
        },
        storage,
    ));
    let stop = Arc::new(Notify::new());
    let power = if config.power_off_on_shutdown {
        PowerAction::PowerOff
    } else {
        PowerAction::Exit(stop.clone())
    };
    let service = AgentService::new(config.run_dir.clone(), config.sandbox, power, containers);
    let listener = channel.listen()?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(create_agent(Arc::new(service)));
    server
        .start()
        .await
        .map_err(|source| ServeError::Server { source })?;
    tracing::info!("agent ready");
    stop.notified().await;
    tracing::info!("shutting down");
    server
        .shutdown()
        .await
        .map_err(|source| ServeError::Server { source })?;
    Ok(())
}
