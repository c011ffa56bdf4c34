//! virtio-serial transport: the port named `spry.agent`, one host connection at a time.
//!
//! The port is a character device that stays open for the agent's lifetime. While the host
//! side (QEMU's chardev) has no client, poll reports POLLHUP and reads return 0.
//!
//! ttrpc does not get the port itself: two pump threads copy bytes between the port (blocking
//! reads after a level-triggered `poll`) and one end of a socketpair, and ttrpc serves the
//! other end. Registering the port with tokio's edge-triggered epoll made an idle, connected
//! guest spin a vCPU at 100% (measured: ~100 host CPU ticks per second per idle pod); the
//! pumps sleep in the kernel instead. A connection ends when the host hangs up (the reader
//! sees POLLHUP and closes its side, so ttrpc sees EOF) or when ttrpc drops it (the writer
//! sees EOF and stops the reader); then the listener waits for the host to come back and
//! yields a new one, so a restarted shim, or the shim of a VM restored from a template,
//! can connect.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;
use ttrpc::r#async::transport::{Listener, Socket};

use super::{AgentChannel, ChannelError};

/// The port name the host gives the agent's channel.
pub const PORT_NAME: &str = "spry.agent";
const PORT_WAIT: Duration = Duration::from_secs(10);
/// How often the agent checks for a host while none is connected: a VM restored from a
/// template waits here for its shim, so this is start latency.
const RECONNECT_POLL: Duration = Duration::from_millis(10);
const PUMP_BUFFER: usize = 64 * 1024;

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
            .custom_flags(nix::fcntl::OFlag::O_CLOEXEC.bits())
            .open(&path)
            .map_err(open_err)?;
        let port = Arc::new(OwnedFd::from(fd));
        tracing::info!(path = %path.display(), "listening on virtio-serial");
        let connections = stream::unfold((port, None::<Pumps>), |(port, previous)| async move {
            if let Some(previous) = previous {
                previous.finished().await;
            }
            wait_for_host(&port).await;
            let connection = Pumps::start(Arc::clone(&port)).map(|(socket, pumps)| {
                let socket = tokio::net::UnixStream::from_std(socket)?;
                Ok::<_, io::Error>((Socket::new(socket), pumps))
            });
            match connection.and_then(|c| c) {
                Ok((socket, pumps)) => Some((Ok(socket), (port, Some(pumps)))),
                Err(e) => Some((Err(e), (port, None))),
            }
        });
        Ok(Listener::new(connections))
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// True when the host side of the port is open (no POLLHUP).
fn host_connected(port: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

async fn wait_for_host(port: &OwnedFd) {
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

/// The two threads serving one host connection.
struct Pumps {
    reader_done: oneshot::Receiver<()>,
    writer_done: oneshot::Receiver<()>,
}

impl Pumps {
    /// Starts the pumps; returns ttrpc's end of the socketpair.
    fn start(port: Arc<OwnedFd>) -> io::Result<(UnixStream, Pumps)> {
        let (ours, theirs) = UnixStream::pair()?;
        theirs.set_nonblocking(true)?;
        let to_ttrpc = ours.try_clone()?;
        // The writer tells the reader to stop through an eventfd rather than a flag the
        // reader polls for: an idle pod's guest then has no periodic wake-up here (each one
        // costs host CPU under emulation).
        let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?);
        let (reader_tx, reader_done) = oneshot::channel();
        let (writer_tx, writer_done) = oneshot::channel();
        {
            let port = Arc::clone(&port);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("port-reader".into())
                .spawn(move || {
                    pump_from_port(&port, to_ttrpc, &stop);
                    let _ = reader_tx.send(());
                })?;
        }
        std::thread::Builder::new()
            .name("port-writer".into())
            .spawn(move || {
                pump_to_port(ours, &port);
                // ttrpc is done with this connection: the reader must stop taking bytes
                // that belong to the next one.
                let _ = stop.write(1);
                let _ = writer_tx.send(());
            })?;
        Ok((
            theirs,
            Pumps {
                reader_done,
                writer_done,
            },
        ))
    }

    async fn finished(self) {
        let _ = self.reader_done.await;
        let _ = self.writer_done.await;
    }
}

/// Host → ttrpc, until the host hangs up, ttrpc goes away or `stop` becomes readable.
fn pump_from_port(port: &OwnedFd, mut to_ttrpc: UnixStream, stop: &EventFd) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let mut fds = [
            PollFd::new(port.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(_) => break,
        }
        // Stop first: bytes still waiting in the port belong to the host's next connection.
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            break;
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.contains(PollFlags::POLLHUP) && !revents.contains(PollFlags::POLLIN) {
            break;
        }
        match nix::unistd::read(port.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to_ttrpc.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(nix::Error::EINTR | nix::Error::EAGAIN) => continue,
            Err(_) => break,
        }
    }
    // ttrpc sees EOF and drops the connection.
    let _ = to_ttrpc.shutdown(std::net::Shutdown::Write);
}

/// ttrpc → host, until ttrpc closes its end or the port fails.
fn pump_to_port(mut from_ttrpc: UnixStream, port: &OwnedFd) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let n = match from_ttrpc.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            match nix::unistd::write(port, data) {
                Ok(written) => data = &data[written..],
                Err(nix::Error::EINTR) => {}
                Err(_) => return,
            }
        }
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
