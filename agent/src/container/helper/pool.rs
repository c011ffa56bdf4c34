//! Starting container helper processes, and keeping two spare helpers ready.
//!
//! Why spares: in a VM restored from a template, everything the guest does runs through a
//! cold TCG translation cache, and fork + exec + start-up of the helper cost ~200 ms of a
//! container's creation there (~20 ms once warm). The agent starts spare helpers at boot,
//! so the template holds helpers already blocked on their control sockets, and starts
//! replacements in the background, at idle priority, whenever a spare is taken. A helper
//! carries no pod identity: it reads everything from its request, and its only randomness
//! (std's hash seeds) never leaves the process.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::sys::socket::{
    recvmsg, setsockopt, socketpair, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;

use super::protocol::{HelperError, HELPER_SUBCOMMAND, HELPER_TIMEOUT, READY};
use crate::reaper::{ExitWatch, Reaper};

/// A helper process blocked on its control socket, waiting for one request.
pub(super) struct HelperProcess {
    pub pid: i32,
    pub exit: ExitWatch,
    /// The agent's end of the helper's `SOCK_SEQPACKET` control pair.
    pub control: OwnedFd,
}

impl HelperProcess {
    /// Spawns a helper and waits (blocking) for its ready message.
    pub fn start() -> Result<Self, HelperError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|source| HelperError::Channel { source })?;
        setsockopt(
            &ours,
            sockopt::ReceiveTimeout,
            &TimeVal::from(libc::timeval {
                tv_sec: HELPER_TIMEOUT.as_secs() as libc::time_t,
                tv_usec: 0,
            }),
        )
        .map_err(|source| HelperError::Channel { source })?;
        let exe = std::env::current_exe().map_err(|source| HelperError::Spawn { source })?;
        let mut command = Command::new(exe);
        command
            .arg(HELPER_SUBCOMMAND)
            .current_dir("/")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let (child, exit) = Reaper::global()
            .spawn(&mut command)
            .map_err(|source| HelperError::Spawn { source })?;
        // `command` holds a copy of the helper's end; close it so a dying helper reads as EOF.
        drop(command);
        let helper = Self {
            pid: child.id() as i32,
            exit,
            control: ours,
        };
        let mut buf = [0u8; 16];
        match helper.receive(&mut buf) {
            Ok(len) if buf[..len] == *READY => Ok(helper),
            Ok(_) => {
                helper.kill();
                Err(HelperError::NoReply)
            }
            Err(source) => {
                helper.kill();
                Err(HelperError::Channel { source })
            }
        }
    }

    /// Receives one message from the helper into `buf` (blocking, up to the helper
    /// timeout); returns its length, 0 when the helper is gone.
    pub fn receive(&self, buf: &mut [u8]) -> nix::Result<usize> {
        loop {
            let mut iov = [IoSliceMut::new(&mut *buf)];
            match recvmsg::<()>(self.control.as_raw_fd(), &mut iov, None, MsgFlags::empty()) {
                // A socket call with a receive timeout is never restarted after a signal
                // handler ran (signal(7)), and SIGCHLD arrives whenever any child exits.
                Err(nix::errno::Errno::EINTR) => continue,
                other => return other.map(|msg| msg.bytes),
            }
        }
    }

    pub fn kill(&self) {
        kill(self.pid);
    }
}

pub(super) fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Two spares: a pod's first container needs one helper for create and one for start,
/// and the two calls come too close together for a refill in between.
const SPARES: usize = 2;
/// Refills run at the lowest priority: on a one-vCPU VM they must not slow down the
/// container operation that just took a spare, only use the idle time after it.
const REFILL_NICE: i32 = 19;

static READY_SPARES: Mutex<Vec<HelperProcess>> = Mutex::new(Vec::new());
static REFILLING: AtomicBool = AtomicBool::new(false);

fn spares() -> std::sync::MutexGuard<'static, Vec<HelperProcess>> {
    READY_SPARES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts spare helpers until there are enough (blocking). Failure only costs speed: a
/// request with no spare starts its own helper.
pub fn prepare_spares() {
    while spares().len() < SPARES {
        match HelperProcess::start() {
            Ok(helper) => spares().push(helper),
            Err(err) => {
                tracing::warn!(error = %err, "no spare container helper");
                return;
            }
        }
    }
}

/// A spare helper, if one is ready. Call [`refill_spares`] once the request is served.
pub(super) fn take_spare() -> Option<HelperProcess> {
    spares().pop()
}

/// Starts replacements for taken spares in the background, once the request that took
/// one is served: on a one-vCPU VM a refill running during it (fork, exec and the new
/// helper's start-up) took ~10 ms of a container create under TCG.
pub(super) fn refill_spares() {
    if spares().len() >= SPARES {
        return;
    }
    if !REFILLING.swap(true, Ordering::AcqRel) {
        let refill = std::thread::Builder::new()
            .name("helper-refill".into())
            .spawn(|| {
                // The helpers started here inherit the priority; each resets it to normal
                // when its request arrives, before any container process exists.
                if let Err(err) = crate::sys::set_thread_nice(REFILL_NICE) {
                    tracing::debug!(error = %err, "cannot lower the helper refill's priority");
                }
                prepare_spares();
                REFILLING.store(false, Ordering::Release);
            });
        if let Err(err) = refill {
            tracing::warn!(error = %err, "cannot start the helper refill thread");
            REFILLING.store(false, Ordering::Release);
        }
    }
}
