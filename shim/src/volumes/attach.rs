//! How the shim hands a volume to the pod's file server: a detached mount tree (an
//! `open_tree` clone of the volume's source, read-only as asked) sent as an fd over a
//! socket pair, which the server attaches in its own mount namespace at the volume's
//! placeholder. So a pod's volumes are mounted only there, as a runc container's are only
//! in the container's namespace: the host's namespace gets no copy (a copy would make
//! every mount under a volume's source a mount point the host cannot remove while the pod
//! runs), and nothing is left on the host if the shim dies (the namespace goes with the
//! server). The server side is in `server.rs`.
//!
//! One request per SEQPACKET message: a propagation byte (`p` private, `s` slave), then the
//! placeholder's path relative to the share; the tree's fd rides along (SCM_RIGHTS). The
//! reply is the errno of the attach as 4 little-endian bytes, 0 when attached.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Longest placeholder path (`<container id>/<n>`; container ids are at most 128 bytes
/// as the agent checks, and so far shorter than this).
pub const MAX_PATH: usize = 255;

/// How long the shim waits for the server to attach a volume.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// How the attached volume follows later host mounts under its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// CRI's None (`rprivate`): it does not.
    Private,
    /// CRI's HostToContainer (`rslave`): host mounts arrive; nothing goes back.
    Slave,
}

impl Propagation {
    /// From a bind mount's OCI options (Bidirectional is refused before this).
    pub fn of(options: &[String]) -> Self {
        if options.iter().any(|o| o == "rslave" || o == "slave") {
            Propagation::Slave
        } else {
            Propagation::Private
        }
    }
}

/// One attach request, as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The placeholder, relative to the share, normal components only.
    pub path: String,
    pub propagation: Propagation,
}

/// A request the server cannot take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttachRequestError {
    #[error("an attach request must be a propagation byte and a path of 1..={MAX_PATH} bytes, not {len} bytes")]
    Length { len: usize },
    #[error("unknown propagation byte {byte:#x}")]
    Propagation { byte: u8 },
    #[error("the placeholder path {path:?} is not a relative path inside the share")]
    Path { path: String },
}

impl AttachRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut message = vec![match self.propagation {
            Propagation::Private => b'p',
            Propagation::Slave => b's',
        }];
        message.extend(self.path.as_bytes());
        message
    }

    pub fn decode(message: &[u8]) -> Result<Self, AttachRequestError> {
        let len = message.len();
        if !(2..=MAX_PATH + 1).contains(&len) {
            return Err(AttachRequestError::Length { len });
        }
        let propagation = match message[0] {
            b'p' => Propagation::Private,
            b's' => Propagation::Slave,
            byte => return Err(AttachRequestError::Propagation { byte }),
        };
        let path = String::from_utf8_lossy(&message[1..]).into_owned();
        let inside = Path::new(&path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !inside || path.contains('\0') {
            return Err(AttachRequestError::Path { path });
        }
        Ok(Self { path, propagation })
    }
}

/// The shim's end of the pair.
pub struct AttachClient {
    socket: OwnedFd,
    /// Set once an exchange failed half-way (no answer in time, a garbled one): a late
    /// answer would otherwise be taken as the next request's.
    broken: AtomicBool,
}

/// A socket pair: the shim's client and the fd the server gets (not close-on-exec in the
/// child only: `configure_child` passes it).
pub fn pair() -> io::Result<(AttachClient, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (client, server) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    nix::sys::socket::setsockopt(
        &client,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(ATTACH_TIMEOUT.as_secs() as i64, 0),
    )
    .map_err(io::Error::from)?;
    Ok((
        AttachClient {
            socket: client,
            broken: AtomicBool::new(false),
        },
        server,
    ))
}

impl AttachClient {
    /// Sends `tree` to be attached as `request` says; blocks until the server answers
    /// (at most [`ATTACH_TIMEOUT`]). An error is the attach's errno, or the channel's.
    pub fn attach(&self, tree: OwnedFd, request: &AttachRequest) -> io::Result<()> {
        if self.broken.load(Ordering::Acquire) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        match self.exchange(tree, request) {
            Ok(0) => Ok(()),
            // The server's answer: the channel is still in step.
            Ok(errno) => Err(io::Error::from_raw_os_error(errno)),
            Err(e) => {
                self.broken.store(true, Ordering::Release);
                Err(e)
            }
        }
    }

    /// One request and its answer: the errno the server sent, or why there was none.
    fn exchange(&self, tree: OwnedFd, request: &AttachRequest) -> io::Result<i32> {
        use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let fds = [tree.as_raw_fd()];
        let message = request.encode();
        sendmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &[io::IoSlice::new(&message)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        drop(tree);
        let mut reply = [0u8; 4];
        let len = recv(
            self.socket.as_fd().as_raw_fd(),
            &mut reply,
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        match (len, i32::from_le_bytes(reply)) {
            (4, errno) if errno >= 0 => Ok(errno),
            (0, _) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => Err(io::Error::from(io::ErrorKind::InvalidData)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_hostile_ones_are_refused() {
        for propagation in [Propagation::Private, Propagation::Slave] {
            let request = AttachRequest {
                path: "c1/0".into(),
                propagation,
            };
            assert_eq!(AttachRequest::decode(&request.encode()).unwrap(), request);
        }
        let long = [b"p".as_slice(), &[b'a'; MAX_PATH + 1]].concat();
        for (message, expected) in [
            (b"".as_slice(), AttachRequestError::Length { len: 0 }),
            (b"p", AttachRequestError::Length { len: 1 }),
            (&long, AttachRequestError::Length { len: MAX_PATH + 2 }),
            (b"xc/0", AttachRequestError::Propagation { byte: b'x' }),
        ] {
            assert_eq!(AttachRequest::decode(message).unwrap_err(), expected);
        }
        for path in ["/etc", "../x", "c/../../x", "./c", "c\0/0"] {
            let message = [b"s".as_slice(), path.as_bytes()].concat();
            assert!(
                matches!(
                    AttachRequest::decode(&message),
                    Err(AttachRequestError::Path { .. })
                ),
                "{path:?}"
            );
        }
    }

    /// A server that answers each request with the next of `replies` (raw bytes).
    fn fake_server(server: OwnedFd, replies: Vec<Vec<u8>>) -> std::thread::JoinHandle<Vec<String>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in replies {
                let mut buffer = [0u8; MAX_PATH + 2];
                let (len, fd) =
                    crate::sys::mount::recv_with_fd(server.as_fd(), &mut buffer).unwrap();
                assert!(fd.is_some(), "the tree's fd came along");
                seen.push(String::from_utf8_lossy(&buffer[1..len]).into_owned());
                nix::sys::socket::send(
                    server.as_raw_fd(),
                    &reply,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .unwrap();
            }
            seen
        })
    }

    #[test]
    fn answers_are_errnos_and_a_garbled_one_breaks_the_channel() {
        let (client, server) = pair().unwrap();
        let server = fake_server(
            server,
            vec![
                0i32.to_le_bytes().to_vec(),
                libc::EACCES.to_le_bytes().to_vec(),
                vec![1, 2],
            ],
        );
        let tree = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let request = |path: &str| AttachRequest {
            path: path.into(),
            propagation: Propagation::Private,
        };
        client.attach(tree(), &request("c/0")).unwrap();
        let refused = client.attach(tree(), &request("c/1")).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EACCES));
        let garbled = client.attach(tree(), &request("c/2")).unwrap_err();
        assert_eq!(garbled.kind(), io::ErrorKind::InvalidData);
        // Nothing more is sent on a channel out of step.
        let broken = client.attach(tree(), &request("c/3")).unwrap_err();
        assert_eq!(broken.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(server.join().unwrap(), ["c/0", "c/1", "c/2"]);
    }

    #[test]
    fn propagation_follows_the_bind_options() {
        let options = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Propagation::of(&options(&["rbind", "rslave"])),
            Propagation::Slave
        );
        assert_eq!(
            Propagation::of(&options(&["rbind", "rprivate"])),
            Propagation::Private
        );
        assert_eq!(Propagation::of(&options(&["rbind"])), Propagation::Private);
    }
}
