//! The pod's file server (`spry fs-serve`): serves a pod's share directory to the guest's
//! FUSE mount (agent/src/volumes/share.rs) over the VM's `spry.fs` virtio-serial port.
//!
//! The guest is hostile, so the server is its own process, confined before it reads a byte
//! from the guest: a private mount namespace whose root is the share directory (so no path
//! the guest makes up can name anything outside it; `..` of the root is the root), with
//! no_new_privs and a seccomp filter (`server_filter.rs`). The pod's volumes are attached in that namespace only, as the shim hands
//! them over (`attach.rs`). The FUSE protocol itself is fuse-backend-rs's passthrough file system,
//! the one Dragonball and nydus serve to guests. Requests come in one at a time and frame
//! themselves (each starts with its length); every reply leaves in one write.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader, Writer};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::socket::MsgFlags;

use super::attach::{AttachRequest, Propagation, MAX_PATH as MAX_ATTACH_PATH};

/// A FUSE request header: len, opcode, unique, nodeid, uid, gid, pid, extlen, padding.
const IN_HEADER: usize = 40;
/// Largest request: a 1 MiB write (what the server negotiates) plus headers.
const MAX_REQUEST: usize = (1 << 20) + 4096;
/// Largest reply: a 1 MiB read plus its header.
const MAX_REPLY: usize = (1 << 20) + 4096;
/// How long the guest may cache names and attributes: a host-side change shows in the
/// guest within this (what virtio-fs's default `cache=auto` does).
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// Failures of the file server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to the VM's share port {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot confine the file server ({step})")]
    Confine {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open the share {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot confine the file server")]
    Filter(#[source] super::server_filter::FilterError),
    #[error("the control socket the shim passed is not usable")]
    Control(#[source] io::Error),
    #[error("reading requests from the guest failed")]
    Read(#[source] io::Error),
    #[error("the guest sent a request of {len} bytes (allowed: {IN_HEADER}..={MAX_REQUEST})")]
    BadLength { len: usize },
}

/// Connects to the VM, confines itself to `dir`, calls `ready`, and serves until the VM
/// hangs up; attaches the volumes the shim sends over `control` (see `attach.rs`) meanwhile.
pub fn serve(
    dir: &Path,
    socket: &Path,
    control: Option<OwnedFd>,
    ready: impl FnOnce(),
) -> Result<(), ServerError> {
    let stream = UnixStream::connect(socket).map_err(|source| ServerError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let fs = confine(dir)?;
    if let Some(control) = control {
        // After the confinement: the thread shares our namespace and root, so the paths
        // it attaches at are the share's.
        std::thread::spawn(move || serve_attach(control));
    }
    // Last, on every thread, before the first byte from the guest.
    super::server_filter::install().map_err(ServerError::Filter)?;
    ready();
    let server = Server::new(fs);
    let mut input = stream.try_clone().map_err(ServerError::Read)?;
    let mut request = vec![0u8; MAX_REQUEST];
    let mut reply = vec![0u8; MAX_REPLY];
    while let Some(len) = read_request(&mut input, &mut request)? {
        let reader = Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut request[..len]))
            .expect("a reader over a buffer cannot fail");
        let writer = FuseDevWriter::<()>::new(stream.as_raw_fd(), &mut reply)
            .expect("a writer over a buffer cannot fail");
        if let Err(e) = server.handle_message(reader, Writer::FuseDev(writer), None, None) {
            // A malformed request from the guest: it gets no reply; we go on serving.
            tracing::warn!(error = %e, "file server: request failed");
        }
    }
    Ok(())
}

/// Enters a private mount namespace rooted at `dir` and opens the file system there.
fn confine(dir: &Path) -> Result<Vfs, ServerError> {
    let step = |step| move |source| ServerError::Confine { step, source };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(step("unshare"))?;
    // Slave: nothing we mount reaches the host (the volumes we attach are made slaves or
    // private in turn).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step("make / a slave"))?;
    // The passthrough file system needs /proc/self/fd: it opens it now, before /proc
    // goes out of reach. Its root, "/", it opens after the pivot: the share.
    let config = Config {
        root_dir: "/".into(),
        cache_policy: CachePolicy::Auto,
        attr_timeout: CACHE_TIMEOUT,
        entry_timeout: CACHE_TIMEOUT,
        do_import: false,
        ..Default::default()
    };
    let fs = PassthroughFs::<()>::new(config).map_err(|source| ServerError::Open {
        path: "/proc/self/fd".into(),
        source,
    })?;
    // pivot_root needs a mount point: a bind of the share onto itself, in our namespace only.
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step("bind the share onto itself"))?;
    nix::unistd::chdir(dir).map_err(step("chdir"))?;
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("no_new_privs"))?;
    let open = |source| ServerError::Open {
        path: dir.to_path_buf(),
        source,
    };
    fs.import().map_err(open)?;
    // Served through the Vfs layer for the INIT options passthrough alone leaves out:
    // big writes (1 MiB requests, not 4 KiB) and parallel, asynchronous requests. Left
    // out here: anything that lets the guest cache past a host-side change (writeback,
    // open-less files, cached symlinks).
    let out_opts = VfsOptions::default().out_opts
        - (FsOptions::WRITEBACK_CACHE
            | FsOptions::ZERO_MESSAGE_OPEN
            | FsOptions::ZERO_MESSAGE_OPENDIR
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::EXPLICIT_INVAL_DATA
            | FsOptions::PERFILE_DAX
            | FsOptions::HANDLE_KILLPRIV_V2);
    let vfs = Vfs::new(VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        killpriv_v2: false,
        out_opts,
        ..Default::default()
    });
    vfs.mount(Box::new(fs), "/")
        .map_err(|e| ServerError::Open {
            path: dir.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
    Ok(vfs)
}

/// Attaches the trees the shim sends, answering each with its errno, until the shim
/// closes its end. A request it cannot read is answered EINVAL.
fn serve_attach(control: OwnedFd) {
    let mut buffer = [0u8; MAX_ATTACH_PATH + 2];
    loop {
        let (len, tree) = match crate::sys::mount::recv_with_fd(control.as_fd(), &mut buffer) {
            Ok((0, _)) => return,
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let errno = match (AttachRequest::decode(&buffer[..len]), tree) {
            (Ok(request), Some(tree)) => match attach(&request, tree) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::warn!(path = %request.path, error = %e, "cannot attach a volume");
                    e.raw_os_error().unwrap_or(libc::EIO)
                }
            },
            _ => libc::EINVAL,
        };
        let reply = errno.to_le_bytes();
        if nix::sys::socket::send(control.as_raw_fd(), &reply, MsgFlags::MSG_NOSIGNAL).is_err() {
            return;
        }
    }
}

/// Attaches `tree` at the request's placeholder with the request's propagation: a slave
/// of the source's peers (HostToContainer) or private, never shared, so nothing mounted
/// here could reach the host.
fn attach(request: &AttachRequest, tree: OwnedFd) -> io::Result<()> {
    let target = Path::new("/").join(&request.path);
    crate::sys::mount::attach_tree(tree.as_fd(), &target)?;
    let propagation = match request.propagation {
        Propagation::Private => MsFlags::MS_PRIVATE,
        Propagation::Slave => MsFlags::MS_SLAVE,
    };
    let none = None::<&str>;
    if let Err(e) = mount(none, &target, none, propagation | MsFlags::MS_REC, none) {
        let _ = umount2(&target, MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    Ok(())
}

/// Reads one request into `buffer`; None when the VM hung up.
fn read_request(input: &mut impl Read, buffer: &mut [u8]) -> Result<Option<usize>, ServerError> {
    let mut got = 0;
    while got < IN_HEADER {
        match input.read(&mut buffer[got..IN_HEADER]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ServerError::Read(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ServerError::Read(e)),
        }
    }
    let len = u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
    if !(IN_HEADER..=MAX_REQUEST.min(buffer.len())).contains(&len) {
        return Err(ServerError::BadLength { len });
    }
    input
        .read_exact(&mut buffer[IN_HEADER..len])
        .map_err(ServerError::Read)?;
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(len: u32) -> Vec<u8> {
        let mut message = len.to_le_bytes().to_vec();
        message.resize(len.max(IN_HEADER as u32) as usize, 7);
        message
    }

    #[test]
    fn requests_are_framed_by_their_length_and_eof_ends_the_stream() {
        let mut stream = request(48);
        stream.extend(request(40));
        let mut input = stream.as_slice();
        let mut buffer = vec![0u8; 128];
        assert_eq!(read_request(&mut input, &mut buffer).unwrap(), Some(48));
        assert_eq!(read_request(&mut input, &mut buffer).unwrap(), Some(40));
        assert_eq!(read_request(&mut input, &mut buffer).unwrap(), None);
    }

    #[test]
    fn hostile_lengths_and_torn_requests_are_refused() {
        let mut buffer = vec![0u8; 128];
        for len in [0u32, 39, 129, u32::MAX] {
            let stream = request(len.min(200));
            let mut bytes = stream.clone();
            bytes[..4].copy_from_slice(&len.to_le_bytes());
            let err = read_request(&mut bytes.as_slice(), &mut buffer).unwrap_err();
            assert!(matches!(err, ServerError::BadLength { .. }), "{len}: {err}");
        }
        let torn = &request(64)[..50];
        let err = read_request(&mut &torn[..], &mut buffer).unwrap_err();
        assert!(matches!(err, ServerError::Read(_)), "{err}");
    }
}
