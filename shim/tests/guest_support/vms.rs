//! Helpers of the real-VM tests: the test guest, a state root, waiting on the console
//! and on QEMU, and talking to the test init over the agent port.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use spry_shim::vm::{AccelChoice, AgentChannelKind, Vm, VmConfig, DEFAULT_QEMU};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Under TCG on a loaded 2-core host a boot takes seconds; leave room.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub initramfs: PathBuf,
    pub images: PathBuf,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the real-VM tests need root"
        );
        assert!(
            Path::new(DEFAULT_QEMU).exists(),
            "the real-VM tests need {DEFAULT_QEMU}"
        );
        let dir = tempfile::tempdir().unwrap();
        let initramfs = super::test_initramfs(dir.path());
        let images = dir.path().to_owned();
        Fixture {
            _dir: dir,
            initramfs,
            images,
        }
    })
}

/// A short state root: unix socket paths must stay under 108 bytes.
pub fn state_root() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("spry-vmt-")
        .tempdir_in("/tmp")
        .unwrap()
}

pub fn config(root: &Path, id: &str) -> VmConfig {
    VmConfig {
        id: id.into(),
        state_dir: root.join(id),
        kernel: super::kernel().vmlinux.clone(),
        initramfs: fixture().initramfs.clone(),
        cpus: 1,
        memory_mib: 256,
        accel: AccelChoice::Tcg,
        agent_channel: AgentChannelKind::VirtioSerial,
        ..VmConfig::default()
    }
}

/// Polls the console log until a line contains `needle`; returns that line.
pub async fn wait_console(vm: &dyn Vm, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        // Only whole lines: the guest may be halfway through writing the one wanted.
        let written = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
        if let Some(line) = written.lines().find(|l| l.contains(needle)) {
            return line.trim_end().to_owned();
        }
        assert!(
            vm.is_running(),
            "the VM died waiting for {needle:?}: {:?}",
            *vm.exit_watch().borrow()
        );
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the console within {timeout:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a state root holds beyond the (empty) dir of jail uid locks.
pub fn left_behind(root: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name == "jail-uids" {
            let held: Vec<_> = std::fs::read_dir(root.join(&name)).unwrap().collect();
            if held.is_empty() {
                continue;
            }
        }
        left.push(name);
    }
    left
}

/// A uid is let go when QEMU has been reaped, a moment after a VM is dropped.
pub async fn wait_no_uids_held(root: &Path) {
    let locks = root.join("jail-uids");
    for _ in 0..100 {
        let held = std::fs::read_dir(&locks)
            .map(|dir| dir.count())
            .unwrap_or(0);
        if held == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn process_exists(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; only a reaped process is gone.
    Path::new(&format!("/proc/{pid}")).exists()
}

pub async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_exists(pid) {
        assert!(Instant::now() < deadline, "QEMU (pid {pid}) is still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The test init's end of the agent port: one line asked, one line answered.
pub struct TestAgent {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl TestAgent {
    pub async fn connect(socket: &Path) -> Self {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (read_half, writer) = stream.into_split();
        Self {
            lines: BufReader::new(read_half).lines(),
            writer,
        }
    }

    /// Sends `line` until the guest answers (it may open its port after we connect).
    pub async fn ask(&mut self, line: &str) -> String {
        tokio::time::timeout(BOOT_TIMEOUT, async {
            loop {
                self.writer
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .unwrap();
                if let Ok(Ok(Some(answer))) =
                    tokio::time::timeout(Duration::from_millis(500), self.lines.next_line()).await
                {
                    return answer;
                }
            }
        })
        .await
        .expect("the guest never answered on the agent port")
    }
}
