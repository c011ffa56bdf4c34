//! `spry-snapshotter serve` for tests: started from this workspace's binary or from an
//! installed command line, stopped with its layer daemons and their mounts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::instance_dirs::make_temp_dir;
use crate::paths;
use crate::stale::{self, InstanceId};

/// The `spry-snapshotter` binary built from this workspace.
pub fn snapshotter_bin() -> Result<PathBuf> {
    let path = std::env::var_os("SPRY_SNAPSHOTTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("target/debug/spry-snapshotter"));
    ensure!(
        path.exists(),
        "{} is missing: run `cargo build -p spry-snapshotter` first",
        path.display()
    );
    Ok(path)
}

/// A running `spry-snapshotter serve` with its state under one dir (`root/`, the socket,
/// its log); on drop it and its layer daemons are stopped and their mounts detached.
pub struct Snapshotter {
    child: Option<Child>,
    dir: PathBuf,
    /// Owns `dir` when the snapshotter made it.
    _temp: Option<tempfile::TempDir>,
    config: PathBuf,
    /// Program and arguments of `serve`.
    command: Vec<String>,
    /// The harness instance `serve` (and the layer daemons it starts) is marked with
    /// ([`stale::INSTANCE_ENV`]), so a later test's sweep ends them if this test died.
    instance: Option<InstanceId>,
}

impl Snapshotter {
    /// This workspace's snapshotter in a temp dir, `extra_config` appended to its config.
    pub fn start(extra_config: &str) -> Result<Self> {
        stale::sweep();
        // A harness instance dir (on disk: passthrough and native mounts need a plain
        // filesystem under the snapshotter's root), swept once this process is gone.
        let instance = InstanceId::fresh("snapshotter");
        let temp = make_temp_dir(&paths::harness_dir(), &instance)?;
        let dir = temp.path().to_path_buf();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!("{}{extra_config}\n", Self::state_config(&dir)),
        )?;
        let command = vec![
            snapshotter_bin()?.display().to_string(),
            "--config".to_string(),
            config.display().to_string(),
            "serve".to_string(),
        ];
        let mut s = Snapshotter {
            child: None,
            dir,
            _temp: Some(temp),
            config,
            command,
            instance: Some(instance),
        };
        s.spawn()?;
        Ok(s)
    }

    /// The config lines that keep a snapshotter's state (root, socket) under `dir`.
    pub fn state_config(dir: &Path) -> String {
        format!(
            "root = {:?}\nsocket = {:?}\n",
            dir.join("root"),
            dir.join("snapshotter.sock")
        )
    }

    /// Runs `command` (an installed `serve` command line, as its service unit has it),
    /// whose config is `config` and starts with [`Snapshotter::state_config`] of `dir`.
    pub fn start_command(dir: &Path, config: &Path, command: Vec<String>) -> Result<Self> {
        ensure!(!command.is_empty(), "no snapshotter command");
        let mut s = Snapshotter {
            child: None,
            dir: dir.to_path_buf(),
            _temp: None,
            config: config.to_path_buf(),
            command,
            instance: None,
        };
        s.spawn()?;
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = Command::new(&self.command[0]);
        if let Some(instance) = &self.instance {
            command.env(stale::INSTANCE_ENV, instance.id());
        }
        let child = command
            .args(&self.command[1..])
            .env("SPRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting spry-snapshotter")?;
        self.child = Some(child);
        let started = Instant::now();
        while !self.socket().exists() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "spry-snapshotter did not create its socket; log:\n{}",
                    self.log()
                );
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("spry-snapshotter exited ({status}); log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The `serve` process's pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILLs `serve` (its layer daemons live on) and reaps it; its socket file stays, as
    /// after a crash, and is removed so [`Snapshotter::spawn`] waits for the new one.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        match std::fs::remove_file(self.socket()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            let started = Instant::now();
            while child.try_wait()?.is_none() {
                if started.elapsed() > Duration::from_secs(20) {
                    child.kill()?;
                    child.wait()?;
                    bail!("spry-snapshotter ignored SIGTERM; log:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.as_path().join("snapshotter.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.as_path().join("snapshotter.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Mounts (FUSE layers, overlays) still present under our state dir.
    pub fn mounts_left(&self) -> Vec<String> {
        let root = self.dir.as_path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&root))
            .map(String::from)
            .collect()
    }

    /// The layers mounted natively (erofs images) under our state dir.
    pub fn native_mounts(&self) -> Vec<String> {
        self.mounts_left()
            .into_iter()
            .filter(|l| l.contains(" - erofs "))
            .collect()
    }
}

impl Snapshotter {
    pub fn daemon_logs(&self) -> String {
        let Ok(dirs) = std::fs::read_dir(self.dir.as_path().join("root/snapshots")) else {
            return String::new();
        };
        dirs.flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("fuse.log")).ok())
            .collect()
    }

    /// Waits (up to `timeout`) until no unpacked layer's image is still being built (no
    /// `erofs/layer.erofs.pending` under the snapshots); returns how long that took.
    pub fn await_layer_images(&self, timeout: std::time::Duration) -> Result<std::time::Duration> {
        let started = std::time::Instant::now();
        loop {
            let pending = std::fs::read_dir(self.dir.as_path().join("root/snapshots"))
                .map(|dirs| {
                    dirs.flatten()
                        .filter(|d| d.path().join("erofs/layer.erofs.pending").exists())
                        .count()
                })
                .unwrap_or(0);
            if pending == 0 {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "{pending} layer images still pending after {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Pids of the layer daemons this snapshotter started.
    pub fn layer_daemons(&self) -> Vec<i32> {
        let Ok(dirs) = std::fs::read_dir(self.dir.as_path().join("root/snapshots")) else {
            return Vec::new();
        };
        dirs.flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("fuse.pid")).ok())
            .filter_map(|p| p.trim().parse().ok())
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .collect()
    }
}

impl Snapshotter {
    /// Stops the snapshotter and its layer daemons (each logs how its files were served
    /// when it unmounts) and returns the daemons' logs.
    pub fn shut_down(&mut self) -> String {
        self.stop_all();
        self.daemon_logs()
    }

    fn stop_all(&mut self) {
        let _ = self.stop();
        for pid in self.layer_daemons() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let started = Instant::now();
        while !self.layer_daemons().is_empty() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for line in self.mounts_left() {
            if let Some(mp) = line.split_whitespace().nth(4) {
                let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop_all();
    }
}
