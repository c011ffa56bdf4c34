//! Shared by the lazy-pull tests and the benchmark: the snapshotter process,
//! a byte-counting (and outage-simulating) TCP proxy, image preparation.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::{paths, require_tool, Registry};

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

/// A running `spry-snapshotter serve`; stopped (SIGTERM) on drop.
pub struct Snapshotter {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    config: PathBuf,
}

impl Snapshotter {
    pub fn start(extra_config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spry-snap-it-")
            .tempdir_in("/var/tmp")?;
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "root = {:?}\nsocket = {:?}\n{extra_config}\n",
                dir.path().join("root"),
                dir.path().join("snapshotter.sock")
            ),
        )?;
        let mut s = Snapshotter {
            child: None,
            dir,
            config,
        };
        s.spawn()?;
        Ok(s)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(snapshotter_bin()?)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
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
        self.dir.path().join("snapshotter.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("snapshotter.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Mounts (FUSE layers, overlays) still present under our state dir.
    pub fn mounts_left(&self) -> Vec<String> {
        let root = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&root))
            .map(String::from)
            .collect()
    }
}

impl Snapshotter {
    pub fn daemon_logs(&self) -> String {
        let Ok(dirs) = std::fs::read_dir(self.dir.path().join("root/snapshots")) else {
            return String::new();
        };
        dirs.flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("fuse.log")).ok())
            .collect()
    }

    /// Pids of the layer daemons this snapshotter started.
    pub fn layer_daemons(&self) -> Vec<i32> {
        let Ok(dirs) = std::fs::read_dir(self.dir.path().join("root/snapshots")) else {
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

/// Copies an image from the OCI layouts `scripts/build-test-images.sh` made.
pub fn push_layout(registry: &Registry, name: &str) -> Result<()> {
    let skopeo = require_tool(Path::new("skopeo"))?;
    let layout = paths::repo_root().join("build/images").join(name);
    ensure!(
        layout.join("index.json").exists(),
        "{} is missing: run scripts/build-test-images.sh",
        layout.display()
    );
    let out = Command::new(skopeo)
        .args(["copy", "--dest-tls-verify=false", "--insecure-policy"])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{}", registry.image(&format!("{name}:1"))))
        .output()?;
    ensure!(
        out.status.success(),
        "skopeo copy {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `spry-snapshotter convert` of a test image's OCI layout into `<name>:estargz`.
pub fn convert(registry: &Registry, name: &str, prioritized: &[&str]) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let list = dir.path().join("prioritized.txt");
    std::fs::write(&list, prioritized.join("\n"))?;
    let layout = paths::repo_root().join("build/images").join(name);
    let mut cmd = Command::new(snapshotter_bin()?);
    cmd.arg("convert")
        .arg(format!("oci:{}:1", layout.display()))
        .arg(registry.image(&format!("{name}:estargz")));
    if !prioritized.is_empty() {
        cmd.arg("--prioritized-files").arg(&list);
    }
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "convert {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A TCP proxy in front of the registry that counts the bytes it sends
/// back: the snapshotter reaches the registry only through it.
pub struct CountingProxy {
    pub addr: String,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// While set, connections are closed at once: the registry is unreachable.
    down: Arc<AtomicBool>,
    /// Open client connections, to cut when going down.
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl CountingProxy {
    pub fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        listener.set_nonblocking(true)?;
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (served2, stop2, down2, open2) =
            (served.clone(), stop.clone(), down.clone(), open.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if down2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                if let Ok(clone) = client.try_clone() {
                    open2.lock().unwrap().push(clone);
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_read, mut c_write) = (client.try_clone().unwrap(), client);
                let (mut s_read, mut s_write) = (server.try_clone().unwrap(), server);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let served = served2.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 * 1024];
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        served.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(CountingProxy {
            addr,
            served,
            stop,
            down,
            open,
        })
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for conn in self.open.lock().unwrap().drain(..) {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
