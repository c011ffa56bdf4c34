//! One process the host can wait for and talk to: a container's init or an exec.

use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::cgroup::Cgroup;
use super::stdio::ProcessIo;
use crate::reaper::{ExitWatch, ProcessExit};

/// How a process ended, as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub exit: ProcessExit,
    /// Killed by SIGKILL while the container's memory cgroup recorded a new OOM kill.
    pub oom_killed: bool,
}

/// A running or finished process.
pub struct Process {
    pub pid: i32,
    pub io: ProcessIo,
    exit: watch::Receiver<Option<ExitInfo>>,
}

impl Process {
    /// Tracks `pid`: when it exits, records whether the OOM killer did it.
    pub fn track(pid: i32, io: ProcessIo, mut exit_watch: ExitWatch, cgroup: Cgroup) -> Arc<Self> {
        let baseline = cgroup.oom_kills().unwrap_or(0);
        let (sender, receiver) = watch::channel(None);
        tokio::spawn(async move {
            let exit = exit_watch.wait().await;
            let oom_killed = exit.signal == Some(Signal::SIGKILL as i32)
                && cgroup.oom_kills().is_ok_and(|now| now > baseline);
            sender.send_replace(Some(ExitInfo { exit, oom_killed }));
        });
        Arc::new(Self {
            pid,
            io,
            exit: receiver,
        })
    }

    /// The exit, if the process has ended.
    pub fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits for the process to end. Cancel-safe.
    pub async fn wait(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        let waited = exit.wait_for(Option::is_some).await.map(|info| *info);
        match waited {
            Ok(info) => info.expect("wait_for guarantees Some"),
            Err(_) => exit
                .borrow()
                .expect("the exit is published before the sender is dropped"),
        }
    }

    /// Signals the process; `Ok(false)` when it has already ended.
    pub fn signal(&self, signal: Signal) -> Result<bool, nix::Error> {
        if self.exited().is_some() {
            return Ok(false);
        }
        match kill(Pid::from_raw(self.pid), signal) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ESRCH) => Ok(false),
            Err(err) => Err(err),
        }
    }
}
