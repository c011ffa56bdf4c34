//! The pod file server (`spry fs-serve`) against a hostile guest: a FUSE client that sends
//! what a compromised guest kernel could. It plays the guest's end of the VM's `spry.fs`
//! port over a unix socket, so no VM is needed. Checks: `..` from the share's root is the
//! root, a name with slashes cannot climb out, host files outside the share stay unseen,
//! the server runs under its seccomp filter, and malformed framing ends that server alone,
//! at once; volumes handed over by the shim are served from the server's namespace only.
//! Needs root (the server unshares a mount namespace) and `cargo build -p spry-shim`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::require_root;

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_INIT: u32 = 26;

struct Server {
    child: Child,
    stream: UnixStream,
    unique: u64,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(share: &Path, dir: &Path) -> Result<Server> {
    start_with(share, dir, None)
}

/// `control`: the number of an inherited (not close-on-exec) attach socket.
fn start_with(share: &Path, dir: &Path, control: Option<i32>) -> Result<Server> {
    let socket = dir.join("share.sock");
    let listener = UnixListener::bind(&socket)?;
    let spry = spry_integration::spry::bin_dir("debug").join("spry");
    ensure!(
        spry.is_file(),
        "{} missing: cargo build -p spry-shim",
        spry.display()
    );
    let mut command = Command::new(&spry);
    command
        .arg("fs-serve")
        .arg("--dir")
        .arg(share)
        .arg("--socket")
        .arg(&socket);
    if let Some(fd) = control {
        command.arg("--control-fd").arg(fd.to_string());
    }
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", spry.display()))?;
    let (stream, _) = listener.accept()?;
    let mut ready = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut ready)?;
    ensure!(ready.trim() == "ready", "server said {ready:?}");
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(Server {
        child,
        stream,
        unique: 0,
    })
}

impl Server {
    /// Sends one request; returns (error, payload) of its reply.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<(i32, Vec<u8>)> {
        self.unique += 2;
        let len = 40 + body.len() as u32;
        let mut message = Vec::new();
        message.extend(len.to_le_bytes());
        message.extend(opcode.to_le_bytes());
        message.extend(self.unique.to_le_bytes());
        message.extend(nodeid.to_le_bytes());
        message.extend([0u8; 16]); // uid, gid, pid, extlen + padding
        message.extend(body);
        self.stream.write_all(&message)?;
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[0..4].try_into()?) as usize;
        let error = i32::from_le_bytes(header[4..8].try_into()?);
        let unique = u64::from_le_bytes(header[8..16].try_into()?);
        ensure!(
            unique == self.unique,
            "reply to {unique}, asked {}",
            self.unique
        );
        let mut payload = vec![0u8; len - 16];
        self.stream.read_exact(&mut payload)?;
        Ok((error, payload))
    }

    fn init(&mut self) -> Result<()> {
        let mut body = Vec::new();
        body.extend(7u32.to_le_bytes()); // major
        body.extend(31u32.to_le_bytes()); // minor
        body.extend(0u32.to_le_bytes()); // max_readahead
        body.extend(0u32.to_le_bytes()); // flags
        let (error, _) = self.call(FUSE_INIT, 0, &body)?;
        ensure!(error == 0, "FUSE_INIT failed: {error}");
        Ok(())
    }

    /// The inode number behind `name` in directory `parent`, or the errno.
    fn lookup(&mut self, parent: u64, name: &str) -> Result<std::result::Result<u64, i32>> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (error, payload) = self.call(FUSE_LOOKUP, parent, &body)?;
        if error != 0 {
            return Ok(Err(-error));
        }
        // fuse_entry_out: nodeid, generation, entry_valid, attr_valid (u64 each), two u32
        // nsecs, then fuse_attr starting with ino.
        Ok(Ok(u64::from_le_bytes(payload[40..48].try_into()?)))
    }

    /// The node id of `path` (slash-separated, from the root), or the first errno.
    fn walk(&mut self, path: &str) -> Result<std::result::Result<u64, i32>> {
        let mut node = 1;
        for name in path.split('/') {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            let (error, payload) = self.call(FUSE_LOOKUP, node, &body)?;
            if error != 0 {
                return Ok(Err(-error));
            }
            node = u64::from_le_bytes(payload[0..8].try_into()?);
        }
        Ok(Ok(node))
    }

    fn root_ino(&mut self) -> Result<u64> {
        let (error, payload) = self.call(FUSE_GETATTR, 1, &[0u8; 16])?;
        ensure!(error == 0, "GETATTR of the root failed: {error}");
        // fuse_attr_out: attr_valid u64, attr_valid_nsec u32, dummy u32, then fuse_attr.
        Ok(u64::from_le_bytes(payload[16..24].try_into()?))
    }
}

fn exits_soon(child: &mut Child) -> Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the server did not exit after malformed input");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hostile_guest_cannot_climb_out_of_the_share() -> Result<()> {
    require_root()?;
    let dir = tempfile::tempdir()?;
    let share = dir.path().join("share");
    std::fs::create_dir(&share)?;
    std::fs::write(share.join("inside"), "in")?;
    std::fs::write(dir.path().join("secret"), "host only")?;
    let mut server = start(&share, dir.path())?;
    server.init()?;
    // Confined before it read the guest's first byte: no new privileges, and a seccomp
    // filter (mode 2) that kills it on any call outside its list.
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))?;
    for confined in ["NoNewPrivs:\t1", "Seccomp:\t2"] {
        ensure!(
            status.contains(confined),
            "the file server lacks {confined:?}"
        );
    }

    let root = server.root_ino()?;
    ensure!(
        server.lookup(1, "inside")?.is_ok(),
        "a file in the share is not found"
    );
    match server.lookup(1, "..")? {
        Ok(ino) => ensure!(
            ino == root,
            "`..` of the root is inode {ino}, not the root {root}"
        ),
        Err(errno) => eprintln!("`..` refused with errno {errno}"),
    }
    for escape in [
        "../secret",
        "../../secret",
        "/etc/passwd",
        "../../../etc/passwd",
    ] {
        let found = server.lookup(1, escape)?;
        ensure!(found.is_err(), "{escape:?} resolved to inode {found:?}");
    }
    // A lookup inside an unknown inode is refused, not trusted.
    ensure!(server.lookup(999_999, "x")?.is_err());
    Ok(())
}

#[test]
fn malformed_framing_ends_the_server_at_once() -> Result<()> {
    require_root()?;
    for bad_len in [0u32, 39, u32::MAX] {
        let dir = tempfile::tempdir()?;
        let share = dir.path().join("share");
        std::fs::create_dir(&share)?;
        let mut server = start(&share, dir.path())?;
        let mut message = bad_len.to_le_bytes().to_vec();
        message.resize(64, 0);
        server.stream.write_all(&message)?;
        let status = exits_soon(&mut server.child)?;
        ensure!(!status.success(), "length {bad_len}: exited {status}");
    }
    Ok(())
}

fn is_mountpoint(path: &Path) -> Result<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let path = path.to_str().context("utf-8 path")?;
    Ok(mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(path)))
}

/// Volumes reach the server as the shim hands them over: detached mount trees it attaches
/// in its own namespace. Served there; no mount in the host's namespace; a host mount made
/// later under a HostToContainer (slave) volume's shared source arrives; a hostile request
/// is refused; removing the placeholder on the host takes the volume away from the server.
#[test]
fn volumes_are_handed_to_the_servers_namespace_only() -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use spry_shim::volumes::attach::{pair, AttachRequest, Propagation};
    use std::os::fd::AsRawFd;
    require_root()?;
    let dir = tempfile::tempdir()?;
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("c/0"))?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("later"))?;
    std::fs::write(data.join("precious"), "keep me")?;
    let arriving = dir.path().join("arriving");
    std::fs::create_dir(&arriving)?;
    std::fs::write(arriving.join("flag"), "")?;
    let none = None::<&str>;
    // A shared source, as kubelet's HostToContainer volumes are.
    mount(Some(&data), &data, none, MsFlags::MS_BIND, none)?;
    mount(none, &data, none, MsFlags::MS_SHARED, none)?;
    let cleanup = scopeguard(|| {
        let _ = umount2(&data.join("later"), MntFlags::MNT_DETACH);
        let _ = umount2(&data, MntFlags::MNT_DETACH);
    });

    let (client, server_end) = pair()?;
    fcntl(server_end.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    let mut server = start_with(&share, dir.path(), Some(server_end.as_raw_fd()))?;
    drop(server_end);
    server.init()?;
    ensure!(
        server.walk("c/0/precious")?.is_err(),
        "served before the hand-over"
    );

    let tree = spry_shim::sys::mount::clone_tree(&data, false, false)?;
    let request = AttachRequest {
        path: "c/0".into(),
        propagation: Propagation::Slave,
    };
    client.attach(tree, &request)?;
    ensure!(
        server.walk("c/0/precious")?.is_ok(),
        "the volume is not served"
    );
    ensure!(
        !is_mountpoint(&share.join("c/0"))?,
        "the host has a mount in the share"
    );
    ensure!(
        std::fs::read_dir(share.join("c/0"))?.count() == 0,
        "the placeholder is not empty"
    );

    mount(
        Some(&arriving),
        &data.join("later"),
        none,
        MsFlags::MS_BIND,
        none,
    )?;
    ensure!(
        server.walk("c/0/later/flag")?.is_ok(),
        "a host mount made later under a slave volume did not arrive"
    );

    let tree = spry_shim::sys::mount::clone_tree(&data, false, false)?;
    let hostile = AttachRequest {
        path: "../../etc".into(),
        propagation: Propagation::Private,
    };
    let refused = client.attach(tree, &hostile).unwrap_err();
    ensure!(refused.raw_os_error() == Some(libc::EINVAL), "{refused}");

    std::fs::remove_dir(share.join("c/0"))?;
    ensure!(
        server.walk("c/0")?.is_err(),
        "the volume outlived its placeholder"
    );
    ensure!(std::fs::read_to_string(data.join("precious"))? == "keep me");
    drop(cleanup);
    Ok(())
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
