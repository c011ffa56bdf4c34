//! The few raw syscalls this crate needs that nix does not wrap (or wraps
//! with allocations that cannot run between fork and exec).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `lgetxattr(2)`: the value of extended attribute `name` of `path`.
pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let cpath =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and outlive the call; `buf`
    // is valid for writes of `buf.len()` bytes.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `lsetxattr(2)`, for tests that build lower layers.
#[cfg(test)]
pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let cpath =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; `value` is valid for
    // reads of `value.len()` bytes.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `llistxattr(2)`: the names of `path`'s extended attributes.
pub fn listxattr(path: &Path) -> io::Result<Vec<String>> {
    let cpath =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; 65536];
    // SAFETY: `cpath` is NUL-terminated and outlives the call; `buf` is valid for writes of
    // `buf.len()` bytes.
    let n = unsafe { libc::llistxattr(cpath.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect())
}

/// A fanotify group (notification class, non-blocking) that reports opens
/// and reads of files on one mount.
pub struct MountWatch {
    fd: OwnedFd,
}

impl MountWatch {
    /// `fanotify_init(2)` + `fanotify_mark(2)` with `FAN_MARK_MOUNT` on the
    /// mount that holds `path`.
    pub fn new(path: &Path) -> io::Result<Self> {
        let cpath =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: fanotify_init takes no pointers; a non-negative result is a
        // new file descriptor that nothing else owns.
        let raw = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by fanotify_init and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is a live fanotify descriptor and `cpath` is a
        // NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::fanotify_mark(
                fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT,
                libc::FAN_OPEN | libc::FAN_ACCESS,
                libc::AT_FDCWD,
                cpath.as_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(MountWatch { fd })
    }

    /// Reads the queued events and appends the path of each event's file, as
    /// the calling thread sees it, to `out`. Returns how many events there
    /// were (0: none queued) and whether the kernel's queue overflowed.
    pub fn read_paths(&self, out: &mut Vec<PathBuf>) -> io::Result<(usize, bool)> {
        let mut buf = [0u8; 16 * 1024];
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes and `self.fd` is open.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok((0, false)),
                _ => Err(err),
            };
        }
        let buf = &buf[..n as usize];
        let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
        let (mut off, mut events, mut overflow) = (0usize, 0usize, false);
        while off + meta_len <= buf.len() {
            // SAFETY: `off + meta_len <= buf.len()`, so the read stays inside
            // `buf`; read_unaligned copes with the byte buffer's alignment and
            // every bit pattern is a valid fanotify_event_metadata.
            let meta: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
            if meta.vers != libc::FANOTIFY_METADATA_VERSION || (meta.event_len as usize) < meta_len
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected fanotify event metadata version",
                ));
            }
            off += meta.event_len as usize;
            events += 1;
            if meta.mask & libc::FAN_Q_OVERFLOW != 0 {
                overflow = true;
            }
            if meta.fd < 0 {
                continue;
            }
            // SAFETY: the kernel opened this descriptor for us with the event;
            // we own it and close it when `file` drops.
            let file = unsafe { OwnedFd::from_raw_fd(meta.fd) };
            if let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
                out.push(path);
            }
        }
        Ok((events, overflow))
    }
}

impl AsFd for MountWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What a recorded workload's child process does between fork and exec:
/// enter its root, mount a fresh /proc there (best effort), create and
/// change to its working directory and drop to its user. Strings are
/// prepared beforehand because nothing may allocate after fork.
pub struct ChildSetup {
    pub root: CString,
    /// The working directory and, before it, each of its parents.
    pub cwd_and_parents: Vec<CString>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Makes `cmd`'s child run `setup` before exec; it also dies with SIGKILL
/// when the thread that spawned it exits.
pub fn set_child_setup(cmd: &mut Command, setup: ChildSetup) {
    let pre_exec = move || -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: each call gets NUL-terminated strings that live in `setup`
        // (moved into this closure) or are static, and none of them
        // allocates, so they are safe between fork and exec.
        unsafe {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            check(libc::chroot(setup.root.as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            // The child is PID 1 of a new PID namespace: give it its own /proc
            // if the image has a /proc directory (nothing there is recorded).
            let _ = libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            );
            for dir in &setup.cwd_and_parents {
                let _ = libc::mkdir(dir.as_ptr(), 0o755);
            }
            if let Some(cwd) = setup.cwd_and_parents.last() {
                check(libc::chdir(cwd.as_ptr()))?;
            }
            check(libc::setgroups(1, &setup.gid))?;
            check(libc::setgid(setup.gid))?;
            check(libc::setuid(setup.uid))?;
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls on data
    // it owns (see above), as pre_exec requires of code running after fork.
    unsafe {
        cmd.pre_exec(pre_exec);
    }
}

/// Makes `cmd`'s child die with SIGKILL when the thread that spawned it exits (a runtime
/// worker: in practice, when the snapshotter dies), so that a tool it runs in the
/// background never outlives it.
pub fn die_with_spawner(cmd: &mut tokio::process::Command) {
    let pre_exec = || -> io::Result<()> {
        // SAFETY: prctl with integer arguments touches no memory and is async-signal-safe.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure makes one async-signal-safe system call and allocates nothing,
    // as code running between fork and exec must.
    unsafe {
        cmd.pre_exec(pre_exec);
    }
}

/// The size of a page of the page cache.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(4096)
}

/// Which pages of `file` (`len` bytes long) are in the page cache: `mincore` over a
/// read-only shared mapping, as fincore(1) does. Mapping does not fault anything in.
pub fn resident_pages(file: &std::fs::File, len: u64) -> io::Result<Vec<bool>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a fresh read-only shared mapping of an open file, chosen by the kernel; no
    // Rust reference into it is ever made, and it is unmapped below on every path.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; len.div_ceil(page_size() as usize)];
    // SAFETY: `addr` is the page-aligned start of the `len`-byte mapping made above and
    // `vec` holds one byte per page of it, as mincore(2) requires.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above, which nothing refers to.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(err);
    }
    Ok(vec.iter().map(|b| b & 1 == 1).collect())
}
