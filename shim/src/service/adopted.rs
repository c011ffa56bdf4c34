//! Serving a pod a spare shim took (`crate::pool`): what the containerd-shim crate's `run`
//! does for a shim `start` spawned, for a process that was running before its pod existed.

use std::sync::Arc;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::Shim;
use containerd_shim::protos::shim_async::{create_task, Task};
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::Error as ShimCrateError;
use tracing::info;

use super::{launcher::HostLauncher, SpryShim};
use crate::pool::Adopted;

/// Serves the pod's tasks on the socket the spare bound for it, until the pod is gone.
pub async fn serve_adopted(adopted: Adopted) -> Result<(), ShimCrateError> {
    let Adopted {
        request,
        listener,
        spare,
    } = adopted;
    std::env::set_current_dir(&request.bundle).map_err(|err| ShimCrateError::IoError {
        context: format!("enter the pod's bundle {}", request.bundle.display()),
        err,
    })?;
    let shim = SpryShim {
        id: request.id.clone(),
        namespace: request.namespace.clone(),
        address: request.address.clone(),
        bundle: request.bundle.clone(),
        exit: Arc::default(),
        pod: std::sync::OnceLock::new(),
    };
    let publisher = RemotePublisher::new(&request.ttrpc_address).await?;
    let task = shim.task_service(publisher, Box::new(HostLauncher::with_spare(spare)));
    let task: Box<dyn Task + Send + Sync> = Box::new(task);
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|err| ShimCrateError::IoError {
            context: "serve the pod's task socket".into(),
            err,
        })?;
    let listener = Listener::from(listener);
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(create_task(Arc::from(task)));
    server.start().await?;
    info!(id = %request.id, "spare shim serving its pod");
    let mut shim = shim;
    shim.wait().await;
    server.shutdown().await.unwrap_or_default();
    let socket = request.socket.trim_start_matches("unix://");
    let _ = std::fs::remove_file(socket);
    Ok(())
}
