//! `start`'s side of the pool: hand a new pod to a spare, top the pool up, empty it.

use std::path::Path;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixStream;
use tracing::{debug, info};

use super::protocol::{read_line, write_line};
use super::{
    config_key, config_text, io_error, is_live, probe_lock, remove_dead, spare_dirs, AdoptReply,
    AdoptRequest, PoolError, CONFIG_FILE, CONTAINERD_FILE, CONTROL_SOCKET, LOCK_FILE,
};
use crate::config::Config;
use crate::state_dir::StateDir;
use crate::template::TemplatePolicy;

/// How long `start` waits for a spare's answer. Binding a socket takes microseconds; a
/// spare slower than this is stuck and skipped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `refill` waits for a new spare to hold its lock.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`drain`] waits for the spares to be gone.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How often [`drain`] looks whether an ended spare is gone.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How long [`drain`] waits for ended spares to leave their cgroup before keeping it.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(2);

fn pooled(config: &Config) -> bool {
    config.pool.size > 0 && config.template != TemplatePolicy::Off
}

/// Asks the live spares of `config`'s pool, in turn, to take the pod; the socket the one
/// that did serves it on. None: no pool, no spare, or none could (the pod's own shim is
/// started as without a pool).
pub async fn adopt(config: &Config, request: &AdoptRequest) -> Option<String> {
    if !pooled(config) {
        return None;
    }
    let key = config_key(&config_text(config).ok()?);
    let pool = StateDir::new(config.state_dir.clone()).pool();
    for dir in spare_dirs(&pool, &key) {
        if !is_live(&dir) {
            continue;
        }
        match ask(&dir, request).await {
            Ok(AdoptReply::Serving) => {
                info!(spare = %dir.display(), "a spare shim with a pooled VM serves the pod");
                return Some(request.socket.clone());
            }
            Ok(AdoptReply::Refused { reason }) => {
                info!(spare = %dir.display(), %reason, "a spare refused the pod");
            }
            // A spare still restoring its VM has no control socket yet.
            Err(e) => {
                debug!(spare = %dir.display(), error = %crate::error_chain(&e), "spare not ready")
            }
        }
    }
    None
}

async fn ask(dir: &Path, request: &AdoptRequest) -> Result<AdoptReply, PoolError> {
    let path = dir.join(CONTROL_SOCKET);
    let exchange = async {
        let mut stream = UnixStream::connect(&path)
            .await
            .map_err(io_error("connect to", &path))?;
        write_line(&mut stream, request).await?;
        read_line(&mut stream).await
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| PoolError::Control(std::io::ErrorKind::TimedOut.into()))?
}

/// Starts spares until `config`'s pool holds `[pool] size` live ones (restoring or
/// ready), recording that they were made for the pods of the containerd at `containerd`;
/// returns how many it started.
pub async fn refill(config: &Config, containerd: &str) -> Result<usize, PoolError> {
    if !pooled(config) {
        return Ok(0);
    }
    let text = config_text(config)?;
    let key = config_key(&text);
    let pool = StateDir::new(config.state_dir.clone()).pool();
    std::fs::create_dir_all(&pool).map_err(io_error("create", &pool))?;
    // One refill at a time, or two `start`s would both see the pool short.
    let guard_path = pool.join(".refill.lock");
    let guard = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&guard_path)
        .map_err(io_error("open", &guard_path))?;
    let _guard = tokio::task::spawn_blocking(move || Flock::lock(guard, FlockArg::LockExclusive))
        .await
        .map_err(|e| PoolError::Control(std::io::Error::other(e)))?
        .map_err(|(_, errno)| PoolError::Io {
            action: "lock",
            path: guard_path.clone(),
            source: errno.into(),
        })?;
    let live = spare_dirs(&pool, &key)
        .iter()
        .filter(|dir| is_live(dir))
        .count();
    let missing = (config.pool.size as usize).saturating_sub(live);
    for _ in 0..missing {
        spawn_spare(&pool, &key, &text, containerd).await?;
    }
    Ok(missing)
}

/// Starts one spare shim and returns once it holds its dir's lock.
async fn spawn_spare(
    pool: &Path,
    key: &str,
    config_text: &str,
    containerd: &str,
) -> Result<(), PoolError> {
    let dir = pool.join(format!("{key}-{}", unique_suffix()));
    std::fs::create_dir(&dir).map_err(io_error("create", &dir))?;
    for (name, text) in [(CONFIG_FILE, config_text), (CONTAINERD_FILE, containerd)] {
        let path = dir.join(name);
        if let Err(source) = std::fs::write(&path, text) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(PoolError::Io {
                action: "write",
                path,
                source,
            });
        }
    }
    let exe = std::env::current_exe().map_err(io_error("find", Path::new("/proc/self/exe")))?;
    let mut child = tokio::process::Command::new(&exe)
        .arg("spare")
        .arg(&dir)
        // Not the bundle of the pod whose `start` this is: that pod may be long gone.
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(io_error("start a spare shim", &exe))?;
    // The spare says so once it holds its lock: from then on its dir counts as live.
    let stdout = child.stdout.take();
    let locked = async {
        let mut line = String::new();
        if let Some(stdout) = stdout {
            tokio::io::BufReader::new(stdout)
                .read_line(&mut line)
                .await
                .map_err(PoolError::Control)?;
        }
        Ok::<_, PoolError>(line)
    };
    match tokio::time::timeout(SPAWN_TIMEOUT, locked).await {
        Ok(Ok(line)) if line.trim() == "locked" => Ok(()),
        _ => {
            let _ = child.start_kill();
            let _ = std::fs::remove_dir_all(&dir);
            Err(PoolError::Locked(dir.join(LOCK_FILE)))
        }
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:05x}{nanos:08x}", std::process::id() & 0xfffff)
}

/// Ends every spare under `state_dir` (a removed dir ends its spare, which stops its VM)
/// and waits until they are gone; returns how many there were.
pub async fn drain(state_dir: &Path) -> Result<usize, PoolError> {
    drain_where(state_dir, |_| true).await
}

/// Ends the spares under `state_dir` made for the pods of the containerd at `containerd`
/// (its `-address`, a `unix://` prefix or not), as [`drain`] does; others stay.
pub async fn drain_for_containerd(state_dir: &Path, containerd: &str) -> Result<usize, PoolError> {
    let wanted = containerd.trim_start_matches("unix://");
    drain_where(state_dir, |dir| {
        std::fs::read_to_string(dir.join(CONTAINERD_FILE))
            .is_ok_and(|made_for| made_for.trim_start_matches("unix://") == wanted)
    })
    .await
}

async fn drain_where(state_dir: &Path, ends: impl Fn(&Path) -> bool) -> Result<usize, PoolError> {
    let pool = StateDir::new(state_dir.to_path_buf()).pool();
    let Ok(entries) = std::fs::read_dir(&pool) else {
        return Ok(0);
    };
    let mut locks = Vec::new();
    let mut dead = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || !ends(&dir) {
            continue;
        }
        if let Ok(Some(_free)) = probe_lock(&dir) {
            // Dead already: nothing to wait for, but its VM's leftovers to remove.
            remove_dead(&dir);
            dead += 1;
            continue;
        }
        // Opened before the dir goes: the lock is free again once its spare has exited.
        if let Ok(file) = std::fs::File::open(dir.join(LOCK_FILE)) {
            locks.push(file);
        }
        match std::fs::remove_dir_all(&dir) {
            // Removed meanwhile: by the spare leaving the pool for a pod, or another drain.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            removed => removed.map_err(io_error("remove", &dir))?,
        }
    }
    let count = locks.len() + dead;
    // Each lock is free once its spare (and with it its VM) is gone. Polled, not a
    // blocking lock: a spare that never ends must not keep the caller waiting past the
    // timeout (a blocked thread would also hold up the runtime's shutdown).
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    for mut file in locks {
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(_gone) => break,
                Err((held, _)) if tokio::time::Instant::now() < deadline => {
                    file = held;
                    tokio::time::sleep(DRAIN_POLL).await;
                }
                Err(_) => {
                    return Err(PoolError::Control(std::io::ErrorKind::TimedOut.into()));
                }
            }
        }
    }
    // The spares that ended were the last in their cgroup, unless others still run.
    super::SpareCgroups::host()
        .remove_pool(CGROUP_EMPTY_WAIT)
        .await;
    Ok(count)
}
