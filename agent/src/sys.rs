//! The agent's only home for `unsafe`: raw ioctls, priorities and adopting received file
//! descriptors.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)` from `<linux/random.h>`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Makes the kernel's CRNG reseed from its input pool now (requires CAP_SYS_ADMIN). After
/// [`add_entropy`], this is what makes a VM restored from a shared template stop producing
/// the template's random stream: without it the CRNG would only reseed on its own schedule.
pub fn reseed_crng(random: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is a live /dev/random.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `data` into the kernel RNG behind `random` (an open `/dev/random`) and credits
/// `8 * data.len()` bits of entropy (requires CAP_SYS_ADMIN).
pub fn add_entropy(random: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    let Ok(len) = libc::c_int::try_from(data.len()) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let bits = len.saturating_mul(8);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut request = Vec::with_capacity(8 + data.len() + 4);
    request.extend_from_slice(&bits.to_ne_bytes());
    request.extend_from_slice(&len.to_ne_bytes());
    request.extend_from_slice(data);
    // `buf` is declared as __u32[]: pad so the kernel never reads past our allocation.
    request.resize(request.len().next_multiple_of(4), 0);
    // SAFETY: `request` is a live, correctly laid out `rand_pool_info` whose `buf_size` matches
    // the bytes that follow the header; the kernel only reads from it during the call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, request.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the nice value of the calling thread (on Linux, `PRIO_PROCESS` with id 0 means the
/// calling thread, and the threads and processes it starts inherit the value).
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    set_nice(0, nice)
}

/// Sets the nice value of thread `tid` (a single-threaded process's pid names its thread).
pub fn set_nice(tid: i32, nice: i32) -> io::Result<()> {
    let Ok(who) = libc::id_t::try_from(tid) else {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    };
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the window size of the terminal behind `tty` (a pty master or slave).
pub fn set_window_size(tty: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points at a live local.
    let rc = unsafe {
        libc::ioctl(
            tty.as_raw_fd(),
            libc::TIOCSWINSZ,
            &size as *const libc::winsize,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of descriptors the kernel just installed in this process through an
/// `SCM_RIGHTS` message.
pub fn adopt_received_fds(fds: &[RawFd]) -> Vec<OwnedFd> {
    fds.iter()
        .map(|&fd| {
            // SAFETY: the kernel created each descriptor for this process while receiving the
            // message; nothing else owns them, so each is adopted exactly once here.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect()
}

/// Registers an owned descriptor with the tokio reactor.
pub fn register_async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns a valid open descriptor, and the `AsyncFd` takes ownership of it:
    // nothing can close or replace the descriptor while it stays registered.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}

/// Restores the default disposition of every signal this process may have inherited as
/// ignored. Ignored signals survive exec: the Rust runtime ignores SIGPIPE, and whoever
/// started the agent may ignore others (a shell ignores SIGQUIT for background jobs). Without
/// this, container processes started from the helper would inherit them (`yes | head -1`
/// would spin on EPIPE instead of dying of SIGPIPE).
pub fn restore_default_signals() {
    let realtime = libc::SIGRTMIN()..=libc::SIGRTMAX();
    for signal in (1..32).chain(realtime) {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no code in signal context and this single-threaded
        // helper has no handler that anything relies on. Failures (signals glibc reserves)
        // leave the disposition as it was.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
}
