//! The one place that waits for child processes.
//!
//! The agent is PID 1 in the VM (and a child subreaper in host test mode), so every orphan
//! ends up as its child. A single SIGCHLD-driven `waitpid(-1, WNOHANG)` loop reaps them all and
//! routes each exit status to whoever registered interest in that pid. Nothing else in the agent
//! may wait for children (no `std::process::Child::wait`, no `tokio::process`): it would race
//! with this loop. Use [`Reaper::spawn`] to start helpers and [`Reaper::watch`] for processes that
//! become our children by reparenting (container inits and execs).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How long the exit of a pid nobody registered is kept, in case the registration is late.
const UNCLAIMED_TTL: Duration = Duration::from_secs(30);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    pub pid: i32,
    /// Exit code, or `None` when killed by a signal.
    pub code: Option<i32>,
    /// The terminating signal, when killed by one.
    pub signal: Option<i32>,
    /// Wall clock at the time the exit was reaped, nanoseconds since the epoch.
    pub at_unix_nanos: i64,
}

impl ProcessExit {
    /// Shell convention: the exit code, or 128 + signal number.
    pub fn shell_code(&self) -> u32 {
        match (self.code, self.signal) {
            (Some(code), _) => code as u32 & 0xff,
            (None, Some(sig)) => 128 + sig as u32,
            (None, None) => 255,
        }
    }
}

/// A handle that resolves when one process exits.
#[derive(Debug, Clone)]
pub struct ExitWatch(watch::Receiver<Option<ProcessExit>>);

impl ExitWatch {
    /// Waits for the exit. Cancel-safe.
    pub async fn wait(&mut self) -> ProcessExit {
        let waited = self.0.wait_for(Option::is_some).await.map(|exit| *exit);
        match waited {
            Ok(exit) => exit.expect("wait_for guarantees Some"),
            // The reaper drops the sender only after publishing the exit.
            Err(_) => self
                .0
                .borrow()
                .expect("exit published before the sender is dropped"),
        }
    }

    /// The exit if it already happened.
    pub fn try_get(&self) -> Option<ProcessExit> {
        *self.0.borrow()
    }
}

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, watch::Sender<Option<ProcessExit>>>,
    unclaimed: HashMap<i32, (ProcessExit, Instant)>,
}

/// The process-wide child reaper.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

static GLOBAL: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper (there is one set of children per process).
    pub fn global() -> &'static Reaper {
        GLOBAL.get_or_init(Reaper::default)
    }

    /// Starts the SIGCHLD loop on the current tokio runtime. Call once, early.
    pub fn start(&'static self) -> io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        tokio::spawn(async move {
            loop {
                self.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the maps inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `command`, registering its pid before the reaper can see its exit.
    /// Never call `wait` on the returned `Child`.
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, ExitWatch)> {
        let mut table = self.lock();
        let child = command.spawn()?;
        let watch = Self::register(&mut table, child.id() as i32);
        Ok((child, watch))
    }

    /// Watches a process that is (or will become, by reparenting) a child of this process.
    pub fn watch(&self, pid: i32) -> ExitWatch {
        let mut table = self.lock();
        Self::register(&mut table, pid)
    }

    fn register(table: &mut Table, pid: i32) -> ExitWatch {
        if let Some(sender) = table.waiters.get(&pid) {
            return ExitWatch(sender.subscribe());
        }
        if let Some((exit, _)) = table.unclaimed.remove(&pid) {
            let (_sender, receiver) = watch::channel(Some(exit));
            return ExitWatch(receiver);
        }
        let (sender, receiver) = watch::channel(None);
        table.waiters.insert(pid, sender);
        ExitWatch(receiver)
    }

    /// Reaps every exited child without blocking.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.publish(pid.as_raw(), Some(code), None),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.publish(pid.as_raw(), None, Some(sig as i32))
                }
                Ok(WaitStatus::StillAlive) => return,
                // Stops and continues are not requested (no WUNTRACED); keep reaping.
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return,
                Err(err) => {
                    tracing::error!(error = %err, "waitpid failed");
                    return;
                }
            }
        }
    }

    fn publish(&self, pid: i32, code: Option<i32>, signal: Option<i32>) {
        let exit = ProcessExit {
            pid,
            code,
            signal,
            at_unix_nanos: now_unix_nanos(),
        };
        let mut table = self.lock();
        let now = Instant::now();
        table
            .unclaimed
            .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
        match table.waiters.remove(&pid) {
            Some(sender) => {
                tracing::debug!(pid, ?code, ?signal, "process exited");
                sender.send_replace(Some(exit));
            }
            None => {
                tracing::trace!(pid, ?code, ?signal, "reaped an unregistered process");
                table.unclaimed.insert(pid, (exit, now));
            }
        }
    }
}

/// Wall clock now, nanoseconds since the Unix epoch.
pub fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_code_follows_the_shell_convention() {
        let exit = |code, signal| ProcessExit {
            pid: 1,
            code,
            signal,
            at_unix_nanos: 0,
        };
        assert_eq!(exit(Some(3), None).shell_code(), 3);
        assert_eq!(exit(None, Some(15)).shell_code(), 143);
        assert_eq!(exit(None, Some(9)).shell_code(), 137);
    }

    #[test]
    fn late_registration_gets_the_recorded_exit() {
        let reaper = Reaper::default();
        reaper.publish(4242, Some(7), None);
        let watch = reaper.watch(4242);
        assert_eq!(watch.try_get().map(|e| e.code), Some(Some(7)));
        // Claimed once: a later registration of a reused pid waits for a new exit.
        assert_eq!(reaper.watch(4242).try_get(), None);
    }

    #[tokio::test]
    async fn registered_waiters_all_see_the_exit() {
        let reaper = Reaper::default();
        let mut first = reaper.watch(77);
        let mut second = reaper.watch(77);
        assert!(first.try_get().is_none());
        reaper.publish(77, None, Some(9));
        assert_eq!(first.wait().await.shell_code(), 137);
        assert_eq!(second.wait().await.signal, Some(9));
    }
}
