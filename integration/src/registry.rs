//! A private instance of Debian's `docker-registry` (distribution 2.8) serving the test images over plain
//! HTTP on 127.0.0.1. Its storage defaults to `build/registry-data`, filled once per machine by
//! `scripts/build-test-images.sh`, so tests never rebuild images.

use crate::{paths, require, system};
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Images `scripts/build-test-images.sh` pushes; [`Registry::start`] checks they are present.
pub const TEST_IMAGES: &[&str] = &["pause:1", "busybox:1", "python:1"];

pub struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    /// Holds config.yml and registry.log; removed on drop.
    dir: TempDir,
}

impl Registry {
    /// Serves [`paths::registry_data`]; fails if any of the test images has not been built.
    pub fn start() -> Result<Self> {
        Self::start_with_images(TEST_IMAGES)
    }

    /// Serves [`paths::registry_data`]; fails if one of `images` (the caller's needs, e.g.
    /// the quickstart's `pause:1` and `busybox:1`) has not been built.
    pub fn start_with_images(images: &[&str]) -> Result<Self> {
        let storage = paths::registry_data();
        require::require_test_images(&storage, images)?;
        Self::start_with_storage(&storage)
    }

    /// Serves `storage` (created if missing), e.g. an empty temp dir for push tests.
    pub fn start_with_storage(storage: &Path) -> Result<Self> {
        let bin = require::require_tool(&paths::registry_bin())?;
        fs::create_dir_all(storage)
            .with_context(|| format!("creating registry storage {}", storage.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("spry-registry-")
            .tempdir()
            .context("creating registry temp dir")?;
        let port = free_port()?;
        let config = dir.path().join("config.yml");
        let log_path = dir.path().join("registry.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        // The one registry starter, shared with scripts/lib/oci.sh; it execs the registry.
        let child = Command::new(paths::repo_root().join("scripts/lib/registry-serve.sh"))
            .arg(storage)
            .arg(port.to_string())
            .arg(&config)
            .env("SPRY_REGISTRY_BIN", &bin)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut registry = Registry {
            child,
            port,
            storage: storage.to_path_buf(),
            dir,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr = self.addr();
        let child = &mut self.child;
        let ready = system::wait_for(Duration::from_secs(15), || {
            if let Some(status) = child.try_wait().context("checking docker-registry")? {
                bail!("docker-registry exited ({status}) during start-up");
            }
            Ok(http_status(&addr, "/v2/").ok().filter(|s| *s == 200))
        });
        match ready {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(anyhow::anyhow!(
                "docker-registry did not answer GET /v2/ on {addr} within 15s"
            )),
            Err(e) => Err(e),
        }
        .with_context(|| format!("registry log:\n{}", self.log()))
    }

    /// `127.0.0.1:PORT`: what to connect to.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `localhost:PORT`: the registry host in image references.
    pub fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Full reference of a test image, e.g. `image("busybox:1")` → `localhost:PORT/busybox:1`.
    pub fn image(&self, name_tag: &str) -> String {
        format!("{}/{}", self.host(), name_tag)
    }

    pub fn storage(&self) -> &Path {
        &self.storage
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Err(e) = system::terminate_child(&mut self.child, Duration::from_secs(5)) {
            eprintln!("spry-integration: stopping docker-registry: {e:#}");
        }
    }
}

/// A port that was free a moment ago (the registry binds it itself; the race is harmless in practice).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener.local_addr().context("reading probe port")?.port())
}

/// Minimal HTTP/1.0 GET returning the status code; enough for readiness probes without an HTTP crate.
pub fn http_status(addr: &str, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .with_context(|| format!("reading response from {addr}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed HTTP response from {addr}: {line:?}"))
}
