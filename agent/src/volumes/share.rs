//! The guest side of the pod's file share: a FUSE mount whose requests go, unparsed, over
//! the virtio-serial port `spry.fs` to the pod's file server on the host
//! (shim/src/volumes/server.rs), and whose replies come back the same way.
//!
//! Why not virtio-fs: its daemon maps guest RAM, which a VM restored copy-on-write from a
//! template does not share with anyone. virtio-serial is emulated inside QEMU, so it works
//! in every VM. Both ends speak the kernel's FUSE wire format, which frames itself: every
//! request and reply starts with its total length.
//!
//! Two threads pump bytes: /dev/fuse → port and port → /dev/fuse. When the host side goes
//! away (the port reads EOF) the FUSE connection is aborted, so the pod's processes get
//! ENOTCONN instead of hanging on a server that will never answer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::channel::find_port;

/// The port name the host gives the file share.
pub const PORT_NAME: &str = "spry.fs";
/// Largest FUSE message either way: the kernel's default max_pages (256 × 4 KiB) of data
/// plus headers. The host server never negotiates more.
const MAX_MESSAGE: usize = (1 << 20) + 8192;
/// A FUSE reply header: len (u32), error (i32), unique (u64).
const OUT_HEADER: usize = 16;
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Errors of mounting the share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("the VM has no virtio-serial port named {name:?} (in {dir})")]
    PortNotFound { name: String, dir: PathBuf },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot mount the pod's file share at {target}")]
    Mount { target: PathBuf, source: nix::Error },
    #[error("cannot start the file share's pump threads")]
    Thread { source: std::io::Error },
}

/// Where the virtio-serial ports are.
pub struct SharePort {
    pub ports_dir: PathBuf,
    pub dev_dir: PathBuf,
}

impl Default for SharePort {
    fn default() -> Self {
        Self {
            ports_dir: "/sys/class/virtio-ports".into(),
            dev_dir: "/dev".into(),
        }
    }
}

/// Mounts the share at `target` (created if missing) and starts its pumps.
pub fn mount_share(port: &SharePort, target: &Path) -> Result<(), ShareError> {
    let name = find_port(&port.ports_dir, PORT_NAME).ok_or_else(|| ShareError::PortNotFound {
        name: PORT_NAME.into(),
        dir: port.ports_dir.clone(),
    })?;
    let port_path = port.dev_dir.join(name);
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ShareError::Open {
                path: path.to_path_buf(),
                source,
            })
    };
    let port_file = open(&port_path)?;
    let fuse = open(Path::new("/dev/fuse"))?;
    std::fs::create_dir_all(target).map_err(|source| ShareError::Open {
        path: target.to_path_buf(),
        source,
    })?;
    // default_permissions: the guest kernel checks modes against the caller, as on a
    // local filesystem; the host server then acts with the caller's uid/gid.
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={}",
        fuse.as_raw_fd(),
        1 << 20
    );
    mount(
        Some("spry-share"),
        target,
        Some("fuse"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|source| ShareError::Mount {
        target: target.to_path_buf(),
        source,
    })?;
    // Not stat(): that would wait for the server, whose pumps are not running yet.
    let connection = connection_minor(target);
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|source| ShareError::Thread { source })
    };
    let clone = |f: &File| {
        f.try_clone().map_err(|source| ShareError::Open {
            path: port_path.clone(),
            source,
        })
    };
    let (fuse_in, port_out) = (clone(&fuse)?, clone(&port_file)?);
    let started = spawn(
        "share-requests",
        Box::new(move || pump_requests(fuse_in, port_out)),
    )
    .and_then(|_| {
        spawn(
            "share-replies",
            Box::new(move || {
                pump_replies(port_file, fuse);
                if let Some(minor) = connection {
                    abort_connection(minor);
                }
            }),
        )
    });
    if let Err(e) = started {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(e);
    }
    tracing::info!(target = %target.display(), port = %port_path.display(), "pod file share mounted");
    Ok(())
}

/// /dev/fuse → port: each read returns exactly one request, which frames itself.
fn pump_requests(mut fuse: File, mut port: File) {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        match fuse.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = port.write_all(&buffer[..n]) {
                    tracing::error!(error = %e, "file share: cannot forward a request to the host");
                    break;
                }
            }
            // ENOENT: the request was interrupted before we read it.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) => {}
            // ENODEV: unmounted or aborted.
            Err(e) => {
                if e.raw_os_error() != Some(libc::ENODEV) {
                    tracing::error!(error = %e, "file share: reading /dev/fuse failed");
                }
                break;
            }
        }
    }
}

/// Port → /dev/fuse: one whole reply per write, as the kernel demands.
fn pump_replies(mut port: File, mut fuse: File) {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        match read_reply(&mut port, &mut buffer) {
            Ok(Some(len)) => {
                if let Err(e) = fuse.write(&buffer[..len]) {
                    // ENOENT: the request was interrupted and is gone; anything else is a
                    // reply the kernel refused, which is the server's bug, not ours.
                    if e.raw_os_error() == Some(libc::ENODEV) {
                        break;
                    }
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        tracing::warn!(error = %e, "file share: the kernel refused a reply");
                    }
                }
            }
            Ok(None) => {
                tracing::error!("file share: the host's file server went away");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "file share: bad reply stream from the host");
                break;
            }
        }
    }
}

/// Reads one reply into `buffer`; None at EOF.
fn read_reply(port: &mut impl Read, buffer: &mut [u8]) -> io::Result<Option<usize>> {
    let mut header = [0u8; OUT_HEADER];
    let mut got = 0;
    while got < OUT_HEADER {
        match port.read(&mut header[got..]) {
            Ok(0) => return Ok(None),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(OUT_HEADER..=buffer.len()).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply length {len} is out of range"),
        ));
    }
    buffer[..OUT_HEADER].copy_from_slice(&header);
    port.read_exact(&mut buffer[OUT_HEADER..len])?;
    Ok(Some(len))
}

/// The FUSE connection number (the device minor) of the mount at `target`, from
/// /proc/self/mountinfo ("id parent major:minor root mountpoint ...").
fn connection_minor(target: &Path) -> Option<u64> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    minor_in_mountinfo(&mountinfo, target)
}

fn minor_in_mountinfo(mountinfo: &str, target: &Path) -> Option<u64> {
    let target = target.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4) != Some(&target) {
            return None;
        }
        fields.get(2)?.split_once(':')?.1.parse().ok()
    })
}

/// Aborts FUSE connection `minor` through fusectl (mounted on demand).
fn abort_connection(minor: u64) {
    let abort = Path::new(FUSECTL).join(minor.to_string()).join("abort");
    if !abort.exists() {
        let _ = mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        );
    }
    if let Err(e) = std::fs::write(&abort, "1") {
        tracing::error!(path = %abort.display(), error = %e, "cannot abort the file share's connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(len: u32, body: &[u8]) -> Vec<u8> {
        let mut message = len.to_le_bytes().to_vec();
        message.extend_from_slice(&0i32.to_le_bytes());
        message.extend_from_slice(&7u64.to_le_bytes());
        message.extend_from_slice(body);
        message
    }

    #[test]
    fn the_connection_is_the_minor_of_the_last_mount_at_the_target() {
        let mountinfo = "22 1 0:21 / /proc rw - proc proc rw\n\
                         40 30 0:50 / /run/spry/share rw - fuse spry-share rw\n\
                         41 30 0:52 / /run/spry/share rw - fuse spry-share rw\n";
        let target = Path::new("/run/spry/share");
        assert_eq!(minor_in_mountinfo(mountinfo, target), Some(52));
        assert_eq!(minor_in_mountinfo(mountinfo, Path::new("/x")), None);
    }

    #[test]
    fn replies_are_framed_by_their_length() {
        let mut stream = reply(20, b"abcd");
        stream.extend(reply(16, b""));
        let mut input = stream.as_slice();
        let mut buffer = vec![0u8; 64];
        assert_eq!(read_reply(&mut input, &mut buffer).unwrap(), Some(20));
        assert_eq!(&buffer[16..20], b"abcd");
        assert_eq!(read_reply(&mut input, &mut buffer).unwrap(), Some(16));
        assert_eq!(read_reply(&mut input, &mut buffer).unwrap(), None);
    }

    #[test]
    fn a_length_outside_the_buffer_or_below_the_header_is_refused() {
        let mut buffer = vec![0u8; 64];
        for len in [0u32, 15, 65, u32::MAX] {
            let stream = reply(len, &[0; 80]);
            let err = read_reply(&mut stream.as_slice(), &mut buffer).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "len {len}");
        }
    }
}
