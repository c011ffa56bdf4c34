//! virtio-serial transport: the port named `spry.agent`, one host connection at a time.
//!
//! The port is a character device that stays open for the agent's lifetime. While the host
//! side (QEMU's chardev) has no client, poll reports POLLHUP and reads return 0. The listener
//! yields a connection when the host is connected and, once ttrpc drops it (the host went
//! away: read returned 0 or write failed), waits for the host to come back and yields a new
//! one, so a restarted shim can reconnect.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures::stream;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use ttrpc::r#async::transport::Listener;

use super::{AgentChannel, ChannelError};

/// The port name the host gives the agent's channel.
pub const PORT_NAME: &str = "spry.agent";
const PORT_WAIT: Duration = Duration::from_secs(10);
const RECONNECT_POLL: Duration = Duration::from_millis(50);

/// The virtio-serial channel.
pub struct VirtioSerial {
    pub ports_dir: PathBuf,
    pub dev_dir: PathBuf,
    pub name: String,
}

impl Default for VirtioSerial {
    fn default() -> Self {
        Self {
            ports_dir: "/sys/class/virtio-ports".into(),
            dev_dir: "/dev".into(),
            name: PORT_NAME.into(),
        }
    }
}

/// Finds the `vportNpM` whose `name` file says `name`.
pub fn find_port(ports_dir: &Path, name: &str) -> Option<String> {
    std::fs::read_dir(ports_dir)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
            (port_name.trim() == name).then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

impl AgentChannel for VirtioSerial {
    fn listen(self: Box<Self>) -> Result<Listener, ChannelError> {
        let started = Instant::now();
        let port = loop {
            if let Some(port) = find_port(&self.ports_dir, &self.name) {
                break port;
            }
            if started.elapsed() > PORT_WAIT {
                return Err(ChannelError::PortNotFound {
                    name: self.name,
                    dir: self.ports_dir,
                });
            }
            std::thread::sleep(RECONNECT_POLL);
        };
        let path = self.dev_dir.join(&port);
        let open_err = |source| ChannelError::Open {
            path: path.clone(),
            source,
        };
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags((OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
            .open(&path)
            .map_err(open_err)?;
        let port = Arc::new(crate::sys::register_async_fd(OwnedFd::from(fd)).map_err(open_err)?);
        tracing::info!(path = %path.display(), "listening on virtio-serial");
        let connections = stream::unfold(
            (port, None::<oneshot::Receiver<()>>),
            |(port, previous)| async move {
                if let Some(previous) = previous {
                    // Wait until ttrpc is done with the last connection.
                    let _ = previous.await;
                }
                wait_for_host(&port).await;
                let (done, done_rx) = oneshot::channel();
                let connection = PortConnection {
                    port: port.clone(),
                    _done: done,
                };
                Some((Ok::<_, io::Error>(connection), (port, Some(done_rx))))
            },
        );
        Ok(Listener::new(connections))
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// True when the host side of the port is open (no POLLHUP).
fn host_connected(port: &AsyncFd<OwnedFd>) -> bool {
    let mut fds = [PollFd::new(port.get_ref().as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

async fn wait_for_host(port: &AsyncFd<OwnedFd>) {
    let mut logged = false;
    while !host_connected(port) {
        if !logged {
            tracing::info!("waiting for the host to connect");
            logged = true;
        }
        tokio::time::sleep(RECONNECT_POLL).await;
    }
    tracing::info!("host connected");
}

/// One host session on the port. Dropping it lets the listener wait for the next one.
struct PortConnection {
    port: Arc<AsyncFd<OwnedFd>>,
    _done: oneshot::Sender<()>,
}

impl AsyncRead for PortConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.port.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled)?)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.port.poll_write_ready(cx))?;
            match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), data)?)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in [
            ("vport0p0", "org.qemu.guest_agent.0"),
            ("vport1p1", "spry.agent"),
        ] {
            std::fs::create_dir_all(dir.path().join(port)).unwrap();
            std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(dir.path(), "spry.agent").as_deref(),
            Some("vport1p1")
        );
        assert_eq!(find_port(dir.path(), "other"), None);
    }

    #[tokio::test]
    async fn yields_a_new_connection_after_the_previous_one_is_dropped() {
        use futures::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A socketpair stands in for the port: never hung up, so the "host" is connected.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ports/vport0p1")).unwrap();
        std::fs::write(dir.path().join("ports/vport0p1/name"), "spry.agent\n").unwrap();
        std::fs::create_dir_all(dir.path().join("dev")).unwrap();
        let fifo = dir.path().join("dev/vport0p1");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let channel = Box::new(VirtioSerial {
            ports_dir: dir.path().join("ports"),
            dev_dir: dir.path().join("dev"),
            name: PORT_NAME.into(),
        });
        let mut listener = channel.listen().unwrap();
        let mut first = listener.next().await.unwrap().unwrap();
        first.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        first.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let second = tokio::time::timeout(Duration::from_millis(200), listener.next()).await;
        assert!(
            second.is_err(),
            "no second connection while the first is alive"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(2), listener.next()).await;
        assert!(matches!(second, Ok(Some(Ok(_)))));
    }
}
