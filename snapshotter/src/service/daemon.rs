//! Per-layer FUSE daemons: `spry-snapshotter mount-layer JOB` processes that
//! serve one remote layer each. They run in their own process group, so a
//! snapshotter restart leaves the mounts (and running pods) intact; the
//! restarted snapshotter adopts them by pid file (stargz-snapshotter#151).
//!
//! This file is the snapshotter's side (start, adopt, stop); the daemon's own main is
//! `layer_daemon.rs`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::store::RemoteSource;
use crate::config::LazyConfig;
use crate::registry::RegistryConfig;

const JOB_FILE: &str = "layer.json";
const PID_FILE: &str = "fuse.pid";
const LOG_FILE: &str = "fuse.log";
pub(super) const READY: &str = "ready";
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting or adopting a layer daemon (the snapshotter's side).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("layer job {path} is malformed")]
    Job {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("failed to start {exe}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("layer daemon exited before mounting; its log says:\n{log}")]
    Failed { log: String },
}

/// Everything a daemon needs to serve one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerJob {
    pub source: RemoteSource,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub registry: RegistryConfig,
    pub lazy: LazyConfig,
    /// The layers below this one, topmost first (see `fs::LowerLayers`).
    #[serde(default)]
    pub lowers: Vec<PathBuf>,
}

/// Starts a daemon for `job` in snapshot directory `dir`; returns once the
/// layer is mounted. Blocking.
pub fn spawn(exe: &Path, dir: &Path, job: &LayerJob) -> Result<i32, DaemonError> {
    let job_path = dir.join(JOB_FILE);
    let json = serde_json::to_vec_pretty(job).map_err(|source| DaemonError::Job {
        path: job_path.clone(),
        source,
    })?;
    // The job may carry the registry's credentials: root's alone.
    crate::private::write_file(&job_path, &json).map_err(|source| DaemonError::Write {
        path: job_path.clone(),
        source,
    })?;
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| DaemonError::Write {
            path: log_path.clone(),
            source,
        })?;
    let mut child = Command::new(exe)
        .arg("mount-layer")
        .arg(&job_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Own process group: a signal to the snapshotter's group spares it.
        .process_group(0)
        .spawn()
        .map_err(|source| DaemonError::Spawn {
            exe: exe.to_path_buf(),
            source,
        })?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    if line.trim() != READY {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        return Err(DaemonError::Failed {
            log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let pid = child.id() as i32;
    let pid_path = dir.join(PID_FILE);
    std::fs::write(&pid_path, pid.to_string()).map_err(|source| DaemonError::Write {
        path: pid_path,
        source,
    })?;
    // Reap it when it exits, whenever that is, so it never lingers as a zombie.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// The pid of the daemon serving `dir`, if it is alive.
pub fn alive(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let job = dir.join(JOB_FILE);
    (cmdline.contains("mount-layer") && cmdline.contains(&*job.to_string_lossy())).then_some(pid)
}

/// Stops the daemon of `dir` (SIGTERM, then SIGKILL) and removes its mount.
pub fn stop(dir: &Path) {
    if let Some(pid) = alive(dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let started = Instant::now();
        while alive(dir).is_some() && started.elapsed() < STOP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(dir).is_some() {
            tracing::warn!(pid, dir = %dir.display(), "layer daemon ignored SIGTERM; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    // The layer's tree may be two mounts deep: a native mount stacked over the FUSE one
    // once the layer was fetched (`native.rs`); a dead daemon left both.
    crate::fs::detach_stack(&dir.join("fs"));
    let _ = crate::fs::detach(&dir.join(crate::fs::IMAGE_DIR));
    let _ = std::fs::remove_file(dir.join(PID_FILE));
}
