//! Shared fixtures for the VM tests: guest assets, a busybox rootfs, sandboxes with
//! their own state dirs, and the leak check every test ends with.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use spry_shim::rootfs::ErofsBlockShare;
use spry_shim::sandbox::{Sandbox, SandboxIdentity, DEFAULT_BOOT_TIMEOUT};
use spry_shim::vm::{AccelChoice, AgentChannelKind, QemuHypervisor, VmConfig};
use tempfile::TempDir;

pub use spry_shim::error_chain as chain;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// These tests boot VMs and mount filesystems: without root they must fail, not skip.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the VM tests need root (QEMU, mounts); run them as root via scripts/test.sh"
    );
}

/// The guest kernel and initramfs built by scripts/build-guest.sh.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("SPRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/guest/current"));
    assert!(
        dir.join("vmlinux").is_file() && dir.join("initramfs.img").is_file(),
        "guest assets missing in {}: run scripts/build-guest.sh first",
        dir.display()
    );
    dir
}

pub fn spry_bin() -> PathBuf {
    let dir = std::env::var_os("SPRY_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    let bin = dir.join("spry");
    assert!(
        bin.is_file(),
        "{} missing: run cargo build -p spry-shim",
        bin.display()
    );
    bin
}

/// A minimal busybox root filesystem (from Debian's busybox-static).
/// A minimal busybox root filesystem (from Debian's busybox-static).
pub fn busybox_rootfs() -> TempDir {
    spry_integration::rootfs::busybox_rootfs().expect("busybox rootfs")
}

/// Where the accelerator probe caches its result: shared by all tests so that the
/// probe runs once per host boot, as it does for users.
pub fn shared_state_root() -> PathBuf {
    PathBuf::from("/run/spry-tests")
}

/// A per-test area: VM state dirs and rootfs images live under it.
pub struct TestArea {
    pub dir: TempDir,
}

impl TestArea {
    pub fn new() -> Self {
        require_root();
        Self {
            dir: tempfile::Builder::new()
                .prefix("spry-test-")
                .tempdir_in("/run")
                .unwrap(),
        }
    }

    pub fn vm_config(&self, id: &str) -> VmConfig {
        let guest = guest_dir();
        VmConfig {
            id: id.to_string(),
            state_dir: self.dir.path().join("vms").join(id),
            kernel: guest.join("vmlinux"),
            initramfs: guest.join("initramfs.img"),
            cpus: 1,
            memory_mib: 256,
            accel: AccelChoice::Auto,
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            agent_channel: AgentChannelKind::VirtioSerial,
            extra_cmdline: Vec::new(),
            ..Default::default()
        }
    }

    pub async fn sandbox(&self, id: &str) -> Sandbox {
        self.sandbox_with(self.vm_config(id)).await
    }

    pub async fn sandbox_with(&self, config: VmConfig) -> Sandbox {
        let id = config.id.clone();
        let hypervisor = QemuHypervisor::new(shared_state_root());
        let share = ErofsBlockShare::new(self.dir.path().join("rootfs").join(&id));
        let identity = SandboxIdentity {
            hostname: format!("host-{id}"),
            ..Default::default()
        };
        Sandbox::start(
            &hypervisor,
            config,
            identity,
            Box::new(share),
            DEFAULT_BOOT_TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("sandbox {id} did not start: {}", chain(&e)))
    }

    /// Fails if anything of this test is left: QEMU processes, VM state dirs, rootfs
    /// images, or mounts under the test area.
    pub fn assert_no_leaks(&self) {
        assert_no_leaks_matching(
            &self.dir.path().to_string_lossy(),
            &[self.dir.path().join("vms"), self.dir.path().join("rootfs")],
        );
    }
}

/// Fails if a QEMU process or mount mentions `needle`, or if any of `dirs` has entries.
pub fn assert_no_leaks_matching(needle: &str, dirs: &[PathBuf]) {
    let mut leaks = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(needle) {
            leaks.push(format!(
                "QEMU process {}: {:.160}",
                entry.file_name().to_string_lossy(),
                cmdline
            ));
        }
    }
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                leaks.push(format!("left behind: {}", entry.path().display()));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    for line in mounts.lines().filter(|l| l.contains(needle)) {
        leaks.push(format!("mount: {line}"));
    }
    assert!(leaks.is_empty(), "leaks:\n{}", leaks.join("\n"));
}

/// Writes a config file for the CLI that points at the shared state root (so the
/// accelerator probe is cached) and the built guest assets.
pub fn cli_config(area: &TestArea) -> PathBuf {
    let guest = guest_dir();
    let path = area.dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"{}\"\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
            shared_state_root().display(),
            guest.join("vmlinux").display(),
            guest.join("initramfs.img").display()
        ),
    )
    .unwrap();
    path
}

pub const SHORT: Duration = Duration::from_secs(10);
