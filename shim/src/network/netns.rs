//! Doing netlink work inside another network namespace.
//!
//! A netlink socket talks to the namespace it was created in, and `setns` moves only the
//! calling thread. So the work runs on a short-lived thread of its own that enters the
//! namespace, opens the socket there and drives the future on a one-thread runtime; the
//! shim's other threads never change namespace.

use std::future::Future;
use std::path::Path;

use nix::sched::CloneFlags;
use rtnetlink::Handle;

use super::NetworkError;

/// Runs `work` with a netlink handle inside the network namespace `netns` (a netns file,
/// as `/var/run/netns/cni-…`).
pub async fn in_netns<F, Fut, T>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send + 'static,
{
    let path = netns.to_path_buf();
    let file = std::fs::File::open(&path).map_err(|source| NetworkError::OpenNetns {
        path: path.clone(),
        source,
    })?;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("spry-netns".into())
        .spawn(move || {
            let result = run_inside(&file, &thread_path, work);
            let _ = sender.send(result);
        })
        .map_err(|source| NetworkError::Thread {
            path: path.clone(),
            source,
        })?;
    receiver
        .await
        .map_err(|_| NetworkError::ThreadDied { path })?
}

fn run_inside<F, Fut, T>(netns: &std::fs::File, path: &Path, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    nix::sched::setns(netns, CloneFlags::CLONE_NEWNET).map_err(|source| {
        NetworkError::EnterNetns {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| NetworkError::Thread {
            path: path.to_path_buf(),
            source,
        })?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetworkError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let connection = tokio::spawn(connection);
        let result = work(handle).await;
        connection.abort();
        result
    })
}
