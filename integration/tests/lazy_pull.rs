//! Lazy pulling end to end: containerd 2.x with `spry-snapshotter` as a proxy
//! snapshotter, crictl and runc, against a real docker-registry. Needs root,
//! the Go-built tools (scripts/install-deps.sh), the test images
//! (scripts/build-test-images.sh) and `cargo build -p spry-snapshotter`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::containerd_config::proxy_snapshotter_toml;
use spry_integration::{paths, require_root, require_tool, ContainerConfig, Containerd, ContainerdOptions, PodConfig, Registry};

/// The `spry-snapshotter` binary built from this workspace.
fn snapshotter_bin() -> Result<PathBuf> {
    let path = std::env::var_os("SPRY_SNAPSHOTTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("target/debug/spry-snapshotter"));
    ensure!(path.exists(), "{} is missing: run `cargo build -p spry-snapshotter` first", path.display());
    Ok(path)
}

/// A running `spry-snapshotter serve`; stopped (SIGTERM) on drop.
struct Snapshotter {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Snapshotter {
    fn start(extra_config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("spry-snap-it-").tempdir_in("/var/tmp")?;
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "root = {:?}\nsocket = {:?}\n{extra_config}\n",
                dir.path().join("root"),
                dir.path().join("snapshotter.sock")
            ),
        )?;
        let mut s = Snapshotter { child: None, dir, config };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
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
                bail!("spry-snapshotter did not create its socket; log:\n{}", self.log());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("spry-snapshotter exited ({status}); log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
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

    fn socket(&self) -> PathBuf {
        self.dir.path().join("snapshotter.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("snapshotter.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Mounts (FUSE layers, overlays) still present under our state dir.
    fn mounts_left(&self) -> Vec<String> {
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
    fn daemon_logs(&self) -> String {
        let Ok(dirs) = std::fs::read_dir(self.dir.path().join("root/snapshots")) else { return String::new() };
        dirs.flatten().filter_map(|d| std::fs::read_to_string(d.path().join("fuse.log")).ok()).collect()
    }

    /// Pids of the layer daemons this snapshotter started.
    fn layer_daemons(&self) -> Vec<i32> {
        let Ok(dirs) = std::fs::read_dir(self.dir.path().join("root/snapshots")) else { return Vec::new() };
        dirs.flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("fuse.pid")).ok())
            .filter_map(|p| p.trim().parse().ok())
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .collect()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.stop();
        for pid in self.layer_daemons() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
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

/// Copies an image from the OCI layouts `scripts/build-test-images.sh` made.
fn push_layout(registry: &Registry, name: &str) -> Result<()> {
    let skopeo = require_tool(Path::new("skopeo"))?;
    let layout = paths::repo_root().join("build/images").join(name);
    ensure!(layout.join("index.json").exists(), "{} is missing: run scripts/build-test-images.sh", layout.display());
    let out = Command::new(skopeo)
        .args(["copy", "--dest-tls-verify=false", "--insecure-policy"])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{}", registry.image(&format!("{name}:1"))))
        .output()?;
    ensure!(out.status.success(), "skopeo copy {name}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// `spry-snapshotter convert` of a test image's OCI layout into `<name>:estargz`.
fn convert(registry: &Registry, name: &str, prioritized: &[&str]) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let list = dir.path().join("prioritized.txt");
    std::fs::write(&list, prioritized.join("\n"))?;
    let layout = paths::repo_root().join("build/images").join(name);
    let mut cmd = Command::new(snapshotter_bin()?);
    cmd.arg("convert").arg(format!("oci:{}:1", layout.display())).arg(registry.image(&format!("{name}:estargz")));
    if !prioritized.is_empty() {
        cmd.arg("--prioritized-files").arg(&list);
    }
    let out = cmd.output()?;
    ensure!(out.status.success(), "convert {name}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A TCP proxy in front of the registry that counts the bytes it sends
/// back: the snapshotter reaches the registry only through it.
struct CountingProxy {
    addr: String,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// While set, connections are closed at once: the registry is unreachable.
    down: Arc<AtomicBool>,
    /// Open client connections, to cut when going down.
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl CountingProxy {
    fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        listener.set_nonblocking(true)?;
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (served2, stop2, down2, open2) = (served.clone(), stop.clone(), down.clone(), open.clone());
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
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
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
        Ok(CountingProxy { addr, served, stop, down, open })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for conn in self.open.lock().unwrap().drain(..) {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Lists every file of the root filesystem with its metadata and checksum.
/// Lists every file of the root filesystem with its metadata and checksum.
/// Directory mtimes are left out: runc creates mount points in them.
const TREE_SCRIPT: &str = "cat /spry/hello.txt; \
    X='! -path /etc/hostname ! -path /etc/hosts ! -path /etc/resolv.conf ! -path /dev/termination-log'; \
    find / -xdev -mindepth 1 $X ! -type d -exec stat -c '%n %a %u %g %s %F %Y' {} + | sort; \
    find / -xdev -mindepth 1 -type d -exec stat -c '%n %a %u %g %F' {} + | sort; \
    find / -xdev -type f $X -exec sha256sum {} + | sort; \
    find / -xdev -type l -exec readlink {} + | sort | uniq -c";

// Fields drop in this order: pods and containerd first, the registry last.
struct Cluster {
    containerd: Containerd,
    snapshotter: Snapshotter,
    proxy: CountingProxy,
    registry: Registry,
    _storage: tempfile::TempDir,
}

fn cluster(name: &str, snapshotter_config: &str) -> Result<Cluster> {
    require_root()?;
    let storage = tempfile::Builder::new().prefix("spry-lazy-reg-").tempdir_in("/var/tmp")?;
    let registry = Registry::start_with_storage(storage.path())?;
    push_layout(&registry, "pause")?;
    let proxy = CountingProxy::start(registry.addr())?;
    let hosts = format!(
        "[registry.hosts.{:?}]\ninsecure = true\nendpoint = {:?}\n",
        registry.host(),
        proxy.addr
    );
    let snapshotter = Snapshotter::start(&format!("{snapshotter_config}\n{hosts}"))?;
    let containerd = Containerd::start(
        ContainerdOptions::new(name)
            .registry(&registry)
            .snapshotter("spry")
            .extra_toml(&proxy_snapshotter_toml("spry", &snapshotter.socket())),
    )?;
    Ok(Cluster { containerd, snapshotter, proxy, registry, _storage: storage })
}

/// Runs TREE_SCRIPT in a container of `image` inside `pod`; returns its log.
fn run_tree(c: &Cluster, pod: &str, pod_cfg: &Path, name: &str, image: &str) -> Result<String> {
    let crictl = c.containerd.crictl();
    let cfg = ContainerConfig::new(name, image).command(&["sh", "-c", TREE_SCRIPT]).write_to(&c.containerd.dir())?;
    let id = crictl.create(pod, &cfg, pod_cfg)?;
    crictl.start(&id)?;
    crictl.wait_container_state(&id, "CONTAINER_EXITED", Duration::from_secs(120))?;
    let logs = crictl.logs(&id)?;
    crictl.rm(&id)?;
    Ok(logs)
}

#[test]
fn estargz_busybox_starts_lazily_and_matches_the_normal_pull() -> Result<()> {
    let c = cluster("lazy-busybox", "[lazy]\nbackground_fetch = false\nprefetch = false\n")?;
    push_layout(&c.registry, "busybox")?;
    let converted = convert(&c.registry, "busybox", &[])?;
    let layer_size = converted["layers"][0]["size"].as_u64().context("no layer size")?;

    let crictl = c.containerd.crictl();
    let lazy_image = c.registry.image("busybox:estargz");
    crictl.pull(&lazy_image)?;
    let pod_cfg = PodConfig::new("lazy").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let cfg = ContainerConfig::new("hello", &lazy_image).command(&["cat", "/spry/hello.txt"]).write_to(&c.containerd.dir())?;
    let hello = crictl.create(&pod, &cfg, &pod_cfg)?;
    let before_start = c.proxy.served();
    eprintln!("{before_start} bytes fetched by the snapshotter before start; layer is {layer_size} bytes");
    let fuse_mounts = c.snapshotter.mounts_left().iter().filter(|l| l.contains(" - fuse spry:")).count();
    ensure!(
        fuse_mounts == 1 && before_start > 0,
        "the layer was not mounted lazily ({fuse_mounts} FUSE mounts, {before_start} bytes fetched); snapshotter log:\n{}",
        c.snapshotter.log()
    );
    ensure!(
        before_start * 10 < layer_size,
        "pull+create fetched {before_start} of {layer_size} bytes: not lazy; snapshotter log:\n{}",
        c.snapshotter.log()
    );
    crictl.start(&hello)?;
    crictl.wait_container_state(&hello, "CONTAINER_EXITED", Duration::from_secs(60))?;
    let out = crictl.logs(&hello)?;
    ensure!(out.contains("hello from spry busybox image"), "unexpected output: {out}");
    crictl.rm(&hello)?;

    // The whole tree, lazily vs. through the normal-layers (overlayfs) path.
    let lazy_tree = run_tree(&c, &pod, &pod_cfg, "tree-lazy", &lazy_image)?;
    let normal_image = c.registry.image("busybox:1");
    crictl.pull(&normal_image)?;
    let normal_tree = run_tree(&c, &pod, &pod_cfg, "tree-normal", &normal_image)?;
    ensure!(lazy_tree.lines().count() > 100, "tree listing too short:\n{lazy_tree}");
    if lazy_tree != normal_tree {
        let diff: Vec<String> = lazy_tree
            .lines()
            .zip(normal_tree.lines())
            .filter(|(a, b)| a != b)
            .take(20)
            .map(|(a, b)| format!("lazy:   {a}\nnormal: {b}"))
            .collect();
        bail!("lazy tree differs from the normal pull:\n{}", diff.join("\n"));
    }
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

#[test]
fn running_pods_survive_a_snapshotter_restart_and_registry_outages_give_eio() -> Result<()> {
    let mut c = cluster("lazy-restart", "[lazy]\nbackground_fetch = false\nprefetch = false\nfetch_attempts = 2\nfetch_backoff_ms = 100\n[registry]\nrequest_timeout_ms = 3000\n")?;
    push_layout(&c.registry, "busybox")?;
    convert(&c.registry, "busybox", &[])?;
    let crictl = c.containerd.crictl();
    let image = c.registry.image("busybox:estargz");
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("restart").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let cfg = ContainerConfig::new("sleeper", &image).command(&["sleep", "3600"]).write_to(&c.containerd.dir())?;
    let sleeper = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&sleeper)?;
    crictl.wait_container_state(&sleeper, "CONTAINER_RUNNING", Duration::from_secs(60))?;
    ensure!(!c.snapshotter.layer_daemons().is_empty(), "no layer daemon; log:\n{}", c.snapshotter.log());

    // Registry unreachable: a read of a file not fetched yet fails with EIO, boundedly.
    c.proxy.set_down(true);
    let started = Instant::now();
    let out = crictl.exec_sync(&sleeper, &["cat", "/spry/hello.txt"], Duration::from_secs(60))?;
    let took = started.elapsed();
    c.proxy.set_down(false);
    ensure!(
        out.code != 0 && out.stderr.contains("Input/output error") && out.stderr.contains("cat: read error"),
        "read during the outage: {out:?}; layer daemon log:\n{}",
        c.snapshotter.daemon_logs()
    );
    ensure!(took < Duration::from_secs(30), "read during the outage took {took:?}");
    let out = crictl.exec_sync(&sleeper, &["cat", "/spry/hello.txt"], Duration::from_secs(30))?;
    ensure!(out.code == 0 && out.stdout.contains("hello from spry"), "read after the outage: {out:?}");

    // Snapshotter down: with the kernel's caches dropped, reads go to the
    // layer daemon, which keeps serving the running container.
    c.snapshotter.stop()?;
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    let out = crictl.exec_sync(&sleeper, &["sh", "-c", "cat /spry/hello.txt && ls /bin | wc -l"], Duration::from_secs(30))?;
    ensure!(out.code == 0 && out.stdout.contains("hello from spry"), "read with the snapshotter down failed: {out:?}");
    c.snapshotter.spawn()?;
    let cfg = ContainerConfig::new("after-restart", &image).command(&["cat", "/etc/group"]).write_to(&c.containerd.dir())?;
    // containerd reconnects to the proxy plugin with gRPC backoff; retry like kubelet does.
    let started = Instant::now();
    let after = loop {
        match crictl.create(&pod, &cfg, &pod_cfg) {
            Ok(id) => break id,
            Err(e) if started.elapsed() < Duration::from_secs(60) && format!("{e:#}").contains("Unavailable") => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    crictl.start(&after)?;
    crictl.wait_container_state(&after, "CONTAINER_EXITED", Duration::from_secs(60))?;
    ensure!(crictl.logs(&after)?.contains("root"), "container after restart printed: {}", crictl.logs(&after)?);
    let logs = c.snapshotter.daemon_logs();
    ensure!(logs.contains("read failed"), "the EIO was not logged:\n{logs}");

    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}
