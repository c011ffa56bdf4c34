//! Shared by the lazy-pull tests and the benchmark: the snapshotter process,
//! a byte-counting (and outage-simulating) TCP proxy, image preparation.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use spry_integration::{paths, require_tool, Registry};

pub use spry_integration::snapshotter::{snapshotter_bin, Snapshotter};

mod edge;
mod layout;
// Used by some of the binaries that include this module.
#[allow(unused_imports)]
pub use edge::{check_edge_listing, edge_layers, EDGE_LIST};
#[allow(unused_imports)]
pub use layout::{busybox_with_file, image_with_layers, noise};

/// Copies an image from the OCI layouts `scripts/build-test-images.sh` made.
pub fn push_layout(registry: &Registry, name: &str) -> Result<()> {
    push_layout_dir(
        registry,
        &paths::repo_root().join("build/images").join(name),
        name,
    )
}

/// Copies the OCI layout `layout` (tag `1`) to `<name>:1` in the registry.
pub fn push_layout_dir(registry: &Registry, layout: &Path, name: &str) -> Result<()> {
    let skopeo = require_tool(Path::new("skopeo"))?;
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
    let args: &[&std::ffi::OsStr] = if prioritized.is_empty() {
        &[]
    } else {
        &["--prioritized-files".as_ref(), list.as_os_str()]
    };
    convert_as(registry, name, "estargz", args)
}

/// Converts `name`'s layout to `<name>:<tag>` with extra `convert` arguments; returns what
/// the converter printed.
pub fn convert_as(
    registry: &Registry,
    name: &str,
    tag: &str,
    args: &[&std::ffi::OsStr],
) -> Result<serde_json::Value> {
    let layout = paths::repo_root().join("build/images").join(name);
    convert_layout(registry, &layout, &format!("{name}:{tag}"), args)
}

/// Converts the OCI layout `layout` (tag `1`) to `target` (`name:tag`) in the registry.
pub fn convert_layout(
    registry: &Registry,
    layout: &Path,
    target: &str,
    args: &[&std::ffi::OsStr],
) -> Result<serde_json::Value> {
    let out = Command::new(snapshotter_bin()?)
        .arg("convert")
        .arg(format!("oci:{}:1", layout.display()))
        .arg(registry.image(target))
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "convert {}: {}",
        layout.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The reads a snapshotter with `lazy.record_accesses` served, all layers together: the
/// `convert --prefetch-ranges` input.
pub fn recorded_reads(snapshotter: &Snapshotter) -> Result<String> {
    let mut reads = String::new();
    for dir in std::fs::read_dir(snapshotter.dir().join("root/snapshots"))?.flatten() {
        if let Ok(list) = std::fs::read_to_string(dir.path().join("accessed-ranges.txt")) {
            reads.push_str(&list);
        }
    }
    Ok(reads)
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
