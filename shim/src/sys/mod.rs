//! Raw syscalls and unsafe code, kept small and explained.

pub mod bpf;
mod child;
pub mod mount;
mod tap;
pub mod xattr;

pub use child::{
    configure_child, open_cgroup_procs, ChildNetns, ChildSetup, Jail, JailEntry, PARK_FDS_AT,
};
pub use tap::open_tap;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Reads the CPU's time-stamp counter.
#[cfg(target_arch = "x86_64")]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU implements it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Opens a pidfd for a child we have not reaped yet, so that later signals
/// can never hit a recycled PID.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process behind `pidfd`. ESRCH (already exited) is
/// reported as an error like any other; callers decide if it matters.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is a valid pidfd we own; info is NULL (the kernel fills
    // in a default siginfo) and flags are 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of an fd our parent passed at a number it told us (say, in an
/// argument), after checking it is open and a socket; makes it close-on-exec.
pub fn take_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the stat buffer we own and reads nothing else of ours.
    if unsafe { libc::fstat(fd, &mut stat) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
    }
    // SAFETY: as above, integers only.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (fstat succeeded) and was passed to this process for this
    // use alone, so nothing else here owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the nice value of thread `tid` (0: the calling thread). Threads a thread creates,
/// and processes it forks, start with its value.
pub fn set_thread_nice(tid: libc::pid_t, nice: libc::c_int) -> io::Result<()> {
    // SAFETY: setpriority takes plain integers; PRIO_PROCESS with a tid acts on that one
    // thread (Linux keeps nice values per thread). No memory is shared with the kernel.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the nice value of every thread of process `pid`.
pub fn set_process_nice(pid: u32, nice: libc::c_int) -> io::Result<()> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = entry?.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        match set_thread_nice(tid, nice) {
            // A thread that ended meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            other => other?,
        }
    }
    Ok(())
}

/// An inotify instance tokio can wait on.
pub struct AsyncInotify(nix::sys::inotify::Inotify);

impl AsRawFd for AsyncInotify {
    fn as_raw_fd(&self) -> RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl AsyncInotify {
    pub fn inotify(&self) -> &nix::sys::inotify::Inotify {
        &self.0
    }
}

/// Registers a non-blocking inotify instance with tokio's reactor.
pub fn register_inotify(
    inotify: nix::sys::inotify::Inotify,
) -> io::Result<tokio::io::unix::AsyncFd<AsyncInotify>> {
    // SAFETY: the `AsyncFd` owns the inotify instance, so the descriptor stays open and
    // is not reused while registered, and is deregistered before it is closed.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(AsyncInotify(inotify)) }?)
}

/// The (rows, cols) of the terminal behind `fd`, or None when it is not a
/// terminal.
pub fn terminal_size(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the valid, exclusively
    // borrowed struct; the fd is borrowed for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0)
        .then(|| (u32::from(size.ws_row), u32::from(size.ws_col)))
}

/// Opens `path` (relative) under the directory `root`, refusing any symlink on the way
/// and any escape from `root` (openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): what
/// a tree walk found at that path, or an error, never something elsewhere.
pub fn open_beneath(
    root: BorrowedFd<'_>,
    path: &std::path::Path,
    flags: nix::fcntl::OFlag,
) -> io::Result<OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(flags | nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = nix::fcntl::openat2(root.as_raw_fd(), path, how)?;
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_moves_forward() {
        let a = rdtsc();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(rdtsc() > a);
    }

    #[test]
    fn a_pipe_has_no_terminal_size() {
        let (read, _write) = nix::unistd::pipe().unwrap();
        assert_eq!(terminal_size(std::os::fd::AsFd::as_fd(&read)), None);
    }

    #[test]
    fn only_an_open_socket_is_taken_as_inherited() {
        use std::os::fd::IntoRawFd;
        let (ours, passed) = std::os::unix::net::UnixStream::pair().unwrap();
        let taken = take_inherited_socket(passed.into_raw_fd()).unwrap();
        let flags = nix::fcntl::fcntl(taken.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        drop(ours);
        let (read, _write) = nix::unistd::pipe().unwrap();
        let err = take_inherited_socket(read.as_raw_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
        for bad in [0, 2, 1_000_000] {
            assert!(take_inherited_socket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pidfd_signals_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep must exist");
        let pidfd = pidfd_open(child.id()).unwrap();
        pidfd_send_signal(&pidfd, libc::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
