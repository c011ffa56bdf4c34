//! The warm pool: VMs restored from the template before any pod asks, each held by a
//! spare shim that becomes the next pod's shim.
//!
//! A pod's shim is its own process and its VM is QEMU, a child of that process (it dies
//! with it). So the pool keeps *spare shims*: `containerd-shim-spry-v2 spare <dir>`
//! processes, each with a VM already restored from the handler's template and its agent
//! answering, idle at low CPU priority. When containerd runs `start` for a new sandbox of a
//! handler whose config asks for a pool (`[pool] size`), `start` asks a spare of that
//! config to take the pod ([`adopt`]): the spare binds the pod's task socket and `start`
//! hands that address to containerd instead of spawning a shim. The spare is then the
//! pod's shim in every respect; at the sandbox task's Create it gives its VM to the pod if
//! the pod fits it (same config, one veth), moving the VM's tap into the pod's network
//! namespace and QEMU into the pod's cgroup, and handing the guest the pod's identity as
//! for any template clone; otherwise it stops that VM and starts the pod's as usual.
//! `start` then tops the pool up ([`refill`]).
//!
//! A spare VM never served another pod: it was restored from the template and has run
//! only Spry's agent. It shares with other pods what any template clone shares (the
//! template's memory pages, copy-on-write). `template = "off"` keeps no pool.
//!
//! Each spare has a dir `<state_dir>/pool/<key>-<n>/` (`key`: a digest of its config)
//! holding its config, its control socket and a lock it holds while alive: a dir whose
//! lock is free is a dead spare's and is removed. A spare exits, stopping its VM, when
//! its dir is removed, on SIGTERM, or when its VM dies; so removing the state dir (or
//! [`drain`]) ends the pool. Spares outlive a containerd restart (the next `start` finds
//! them); one that stops a containerd for good (the quickstart's `stop`) ends the spares
//! made for it with [`drain_for_containerd`].

mod adopt;
mod cgroup;
mod protocol;
mod spare;
mod warm;

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub use adopt::{adopt, drain, drain_for_containerd, refill};
pub use cgroup::{SpareCgroups, POOL_CGROUP};
pub use protocol::{AdoptReply, AdoptRequest};
pub use spare::{wait_for_pod, Adopted, Spare, SPARE_NICE};

use crate::config::Config;

/// NICs of a pooled VM: a pod with another number of veths does not fit it.
pub const NICS: usize = 1;

/// In a pod's bundle: the name of the pod's VM when it came from the pool (it is not the
/// one the pod's id gives), for `delete`'s cleanup after a crash.
pub const VM_NAME_MARKER: &str = "spry-vm-name";
/// In a pod's bundle: the pid of the spare shim that serves the pod.
pub const SHIM_PID_MARKER: &str = "spry-shim-pid";

const CONFIG_FILE: &str = "config.toml";
/// containerd's address, as the `start` that made the spare was given it: which
/// containerd's pods the spare was made for ([`drain_for_containerd`]).
const CONTAINERD_FILE: &str = "containerd";
const CONTROL_SOCKET: &str = "control.sock";
const LOCK_FILE: &str = "lock";
const PID_FILE: &str = "spare.pid";

/// Failure of the pool's machinery. None reaches a pod: a pod without a spare starts as
/// it would without a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the spare's control connection failed")]
    Control(#[source] std::io::Error),
    #[error("a control message was cut short or too long")]
    Truncated,
    #[error("cannot encode a control message")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode a control message")]
    Decode(#[source] serde_json::Error),
    #[error("cannot encode the handler's config for a spare")]
    EncodeConfig(#[source] toml::ser::Error),
    #[error(transparent)]
    Config(#[from] Box<crate::config::ConfigError>),
    #[error("the spare's VM did not start")]
    Boot(#[source] Box<crate::sandbox::SandboxError>),
    #[error("no VM template to restore spares from (template = \"off\", or it cannot be built)")]
    NoTemplate,
    #[error("another spare holds {0}")]
    Locked(PathBuf),
    #[error("the spare was stopped before a pod took it")]
    Stopped,
    #[error("warming the spare's VM failed: {0}")]
    Warm(String),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PoolError {
    let path = path.to_path_buf();
    move |source| PoolError::Io {
        action,
        path,
        source,
    }
}

/// Which spares serve `config`: a digest of it, so a changed config never gets an old
/// spare (the sandbox Create checks the whole config again).
fn config_key(config_text: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(config_text.as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The config as a spare reads it.
fn config_text(config: &Config) -> Result<String, PoolError> {
    toml::to_string(config).map_err(PoolError::EncodeConfig)
}

/// The spare dirs of `pool` whose name starts with `key`.
fn spare_dirs(pool: &Path, key: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pool) else {
        return Vec::new();
    };
    let prefix = format!("{key}-");
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// Takes a spare dir's lock (making its file), held for the spare's life; `None` when a
/// live spare holds it. Only for the spare itself: see [`probe_lock`] for everyone else.
fn try_lock(dir: &Path) -> Result<Option<Flock<File>>, PoolError> {
    lock_file(dir, true)
}

/// Tries the lock of a spare dir someone else made: `Some` when its spare is dead, `None`
/// while a live spare holds it. A dir without a lock file is an error here, never a dead
/// spare's: it is being made (its spawner waits for the spare to lock it) or being removed
/// (a spare a pod just took leaves the pool, its lock file among the first to go, while
/// its VM is now the pod's). Making the file there would take a lock nobody holds, and
/// the sweep would then remove the pod's VM state.
fn probe_lock(dir: &Path) -> Result<Option<Flock<File>>, PoolError> {
    lock_file(dir, false)
}

fn lock_file(dir: &Path, create: bool) -> Result<Option<Flock<File>>, PoolError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(create)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(PoolError::Io {
            action: "lock",
            path,
            source: errno.into(),
        }),
    }
}

/// Whether a live spare holds `dir`; a dead spare's dir is removed (`remove_dead`).
fn is_live(dir: &Path) -> bool {
    match probe_lock(dir) {
        Ok(None) => true,
        Ok(Some(_lock)) => {
            remove_dead(dir);
            false
        }
        Err(_) => false,
    }
}

/// Removes a dead spare's dir and, first, what its VM left in the state dir (the VM is
/// named after the dir): a killed spare never ran its own cleanup, and no containerd
/// knows of it to run `delete`.
fn remove_dead(dir: &Path) {
    let state_dir = dir.parent().and_then(Path::parent);
    if let (Some(state_dir), Some(name)) = (state_dir, dir.file_name()) {
        let config = Config {
            state_dir: state_dir.to_path_buf(),
            ..Config::default()
        };
        crate::host::Host::new(config).remove_leftovers(&name.to_string_lossy());
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The VM name a pod's bundle records (see [`VM_NAME_MARKER`]).
pub fn recorded_vm_name(bundle: &Path) -> Option<String> {
    let name = std::fs::read_to_string(bundle.join(VM_NAME_MARKER)).ok()?;
    let name = name.trim();
    (!name.is_empty() && !name.contains('/') && name != "..").then(|| name.to_owned())
}

/// The pid of the spare shim serving the pod of `bundle`, if it is alive and a spare.
pub fn recorded_shim_pid(bundle: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(bundle.join(SHIM_PID_MARKER))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    let program = args.next()?;
    let ours = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(program))
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim-spry"));
    (ours && args.next() == Some(b"spare".as_slice())).then_some(pid)
}

#[cfg(test)]
mod tests;
