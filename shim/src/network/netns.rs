//! Doing work inside another network namespace.
//!
//! A socket belongs to the namespace it was created in, and `setns` moves only the calling
//! thread. So the work runs on a short-lived thread of its own that enters the namespace,
//! creates its sockets there and hands back what it made; the shim's other threads never
//! change namespace.

use std::future::Future;
use std::path::Path;

use nix::sched::CloneFlags;
use rtnetlink::Handle;

use super::NetworkError;

/// Runs `work` on a thread inside the network namespace `netns` (a netns file, as
/// `/var/run/netns/cni-…`). `work` also gets the namespace's file.
pub async fn on_netns_thread<F, T>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(&std::fs::File) -> Result<T, NetworkError> + Send + 'static,
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
            let entered = nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetworkError::EnterNetns {
                    path: thread_path,
                    source,
                }
            });
            let _ = sender.send(entered.and_then(|()| work(&file)));
        })
        .map_err(|source| NetworkError::Thread {
            path: path.clone(),
            source,
        })?;
    receiver
        .await
        .map_err(|_| NetworkError::ThreadDied { path })?
}

/// Runs `work` with a netlink handle inside the network namespace `netns`, driven by a
/// one-thread runtime on the namespace's thread.
pub async fn in_netns<F, Fut, T>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send + 'static,
{
    let path = netns.to_path_buf();
    on_netns_thread(netns, move |_| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| NetworkError::Thread {
                path: path.clone(),
                source,
            })?;
        runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(|source| NetworkError::Connect {
                    path: path.clone(),
                    source,
                })?;
            let connection = tokio::spawn(connection);
            let result = work(handle).await;
            connection.abort();
            result
        })
    })
    .await
}
