//! CRI port-forward into a Spry pod, with no change to containerd.
//!
//! containerd (2.x) serves `crictl port-forward` / `kubectl port-forward` by dialling
//! `localhost:PORT` from inside the pod's network namespace. Here that namespace's
//! loopback is steered (`sk_lookup.rs`) to two listeners of the shim's, one per address
//! family, created inside the namespace. Each accepted connection still carries the PORT
//! it asked for; the shim connects to the pod IP on that PORT from the host's namespace,
//! the path kubelet's HTTP probes take (veth → tc → tap → guest), and copies both ways.
//!
//! What it reaches: a server listening on the pod IP or on all addresses, in any of the
//! pod's containers (most servers; for a server bound to the guest's 127.0.0.1 only,
//! port-forward fails, as it does for Kata). Many connections at once are independent
//! tasks. Everything goes away with the forwarder, and with the shim process: the BPF link
//! and the listeners are its file descriptors.

use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::netns::on_netns_thread;
use super::sk_lookup::LoopbackSteering;
use super::NetworkError;

/// How long one connect to the pod may take before the next pod IP is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Port-forward for one pod; stops when dropped.
pub struct PortForward {
    accept_loops: Vec<JoinHandle<()>>,
    _steering: LoopbackSteering,
}

impl PortForward {
    /// Starts forwarding connections to the loopback of the netns at `netns` to `pod_ips`.
    pub async fn start(netns: &Path, pod_ips: Vec<IpAddr>) -> Result<Self, NetworkError> {
        let path = netns.to_path_buf();
        let (v4, v6, steering) = on_netns_thread(netns, move |file| {
            let listen_error = |source| NetworkError::PortForward {
                path: path.clone(),
                source,
            };
            let v4 = StdListener::bind("127.0.0.1:0").map_err(listen_error)?;
            // A namespace without IPv6 still forwards IPv4.
            let v6 = StdListener::bind("[::1]:0").ok();
            let steering =
                LoopbackSteering::attach(file, &v4, v6.as_ref()).map_err(listen_error)?;
            Ok((v4, v6, steering))
        })
        .await?;
        let mut accept_loops = Vec::new();
        for listener in std::iter::once(v4).chain(v6) {
            let listener = listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
                .map_err(|source| NetworkError::PortForward {
                    path: netns.to_path_buf(),
                    source,
                })?;
            accept_loops.push(tokio::spawn(accept_loop(listener, pod_ips.clone())));
        }
        info!(?pod_ips, "port-forward ready in the pod network namespace");
        Ok(Self {
            accept_loops,
            _steering: steering,
        })
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        // Each loop owns its connections (a JoinSet): aborting it ends them too.
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, pod_ips: Vec<IpAddr>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(forward(client, pod_ips.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "port-forward accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Copies between a client's connection (to loopback PORT in the pod netns) and the pod's
/// PORT, until both sides are done.
async fn forward(mut client: TcpStream, pod_ips: Vec<IpAddr>) {
    let port = match client.local_addr() {
        Ok(addr) => addr.port(),
        Err(e) => {
            warn!(error = %e, "port-forward connection without a local address");
            return;
        }
    };
    let mut pod = None;
    for ip in &pod_ips {
        let target = SocketAddr::new(*ip, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                pod = Some(stream);
                break;
            }
            Ok(Err(e)) => debug!(%target, error = %e, "port-forward connect failed"),
            Err(_) => debug!(%target, "port-forward connect timed out"),
        }
    }
    let Some(mut pod) = pod else {
        // Closing the client makes containerd report the port-forward as failed.
        info!(
            port,
            ?pod_ips,
            "port-forward: nothing accepts connections on this port in the pod"
        );
        return;
    };
    let _ = pod.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut pod).await {
        debug!(port, error = %e, "port-forward connection ended with an error");
    }
}
