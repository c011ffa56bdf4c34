//! The new mount API (open_tree, mount_setattr, move_mount), which nix does not wrap.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// `struct mount_attr` of linux/mount.h.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A detached copy of the mount tree at `source` (the mounts under it included), not in any
/// mount namespace until attached (`attach_tree`, here or by another process the fd is
/// passed to). Read-only from the start when `readonly`: every mount of the tree when
/// `recursive` (CRI's recursiveReadOnly), else the top one only, the mounts under it
/// keeping their own flags (as runc's `ro` bind). A bind followed by a read-only remount
/// would not do: remounts do not propagate, so copies elsewhere would stay writable.
pub fn clone_tree(source: &Path, readonly: bool, recursive: bool) -> io::Result<OwnedFd> {
    let source = c_path(source)?;
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree reads the NUL-terminated path and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, source.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    if !readonly {
        return Ok(tree);
    }
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut setattr_flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        setattr_flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    let empty = c"";
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes of `attr`, which lives
    // across the call, and the NUL-terminated empty path; it writes nothing of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            setattr_flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tree)
}

/// Attaches a tree from `clone_tree` at `target` in this process's mount namespace.
pub fn attach_tree(tree: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    let empty = c"";
    // SAFETY: move_mount reads two NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `buffer` with at most one fd attached (SCM_RIGHTS, made
/// close-on-exec); returns its length and the fd. Extra fds are closed.
pub fn recv_with_fd(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> io::Result<(usize, Option<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buffer)];
    let message = recvmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let len = message.bytes;
    let mut received = Vec::new();
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS fds are new in this process and owned by no one else.
            received.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let fd = received.into_iter().next();
    Ok((len, fd))
}
