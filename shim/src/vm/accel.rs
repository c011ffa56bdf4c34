//! Choosing the accelerator. `Auto` boots a probe guest under KVM with a
//! short deadline: on some hosts /dev/kvm exists but guests crash or crawl,
//! and only booting one tells. The verdict is cached per host boot.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Once;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cmdline::{qemu_args, StatePaths};
use super::{Accel, AccelChoice, AgentChannelKind, GuestMemory, NetNamespace, VmConfig};

/// The warning logged (once per process) when Auto falls back to TCG.
pub const KVM_UNUSABLE_WARNING: &str = "using TCG software emulation: expect ~10x slower VMs";

/// The kernel prints this just before running /init: reaching it within the
/// deadline proves KVM runs a guest at full speed.
const PROBE_MARKER: &str = "Run /init as init process";
const PROBE_DEADLINE: Duration = Duration::from_secs(3);
const PROBE_CACHE_FILE: &str = "accel-probe.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeRecord {
    key: String,
    accel: Accel,
    /// Why KVM was rejected.
    reason: Option<String>,
}

/// Picks the accelerator for `config`; probes (or reads the probe cache in
/// `state_root`) when the choice is Auto.
pub async fn resolve(config: &VmConfig, state_root: &Path) -> Accel {
    match config.accel {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => {
            let key = probe_key(config).await;
            let cache = state_root.join(PROBE_CACHE_FILE);
            let record = match read_cache(&cache, &key) {
                Some(record) => record,
                None => {
                    let record = probe(config, state_root, key).await;
                    write_cache(&cache, &record);
                    record
                }
            };
            if let Some(reason) = &record.reason {
                static WARN_ONCE: Once = Once::new();
                WARN_ONCE.call_once(|| {
                    tracing::warn!("KVM unusable ({reason}), {KVM_UNUSABLE_WARNING}")
                });
            }
            record.accel
        }
    }
}

/// What the verdict depends on: this boot of the host, this QEMU and this
/// kernel (by path, size and mtime: hashing 50 MB, or running `qemu --version`,
/// on every pod start would cost more than it protects).
async fn probe_key(config: &VmConfig) -> String {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    // A missing file gives an empty identity: the probe then fails and says why.
    let identity = |what, path| super::snapshot::file_identity(what, path).unwrap_or_default();
    let mut hasher = Sha256::new();
    for part in [
        boot_id.trim(),
        &identity("qemu", &config.qemu),
        &identity("kernel", &config.kernel),
    ] {
        hasher.update(part.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

fn read_cache(path: &Path, key: &str) -> Option<ProbeRecord> {
    let text = std::fs::read_to_string(path).ok()?;
    let record: ProbeRecord = serde_json::from_str(&text).ok()?;
    (record.key == key).then_some(record)
}

fn write_cache(path: &Path, record: &ProbeRecord) {
    let Ok(json) = serde_json::to_string(record) else {
        return;
    };
    let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::write(&temporary, json).and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        tracing::warn!(path = %path.display(), %error, "cannot cache the KVM probe result");
    }
}

async fn probe(config: &VmConfig, state_root: &Path, key: String) -> ProbeRecord {
    let started = Instant::now();
    let reason = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(error) => Some(format!("cannot open /dev/kvm: {error}")),
        Ok(_) => match tokio::task::spawn_blocking(super::tsc::host_tsc_khz).await {
            Ok(Ok(tsc_khz)) => boot_probe_guest(config, state_root, tsc_khz).await.err(),
            Ok(Err(error)) => Some(format!("cannot measure the TSC: {error}")),
            Err(error) => Some(format!("cannot measure the TSC: {error}")),
        },
    };
    let accel = if reason.is_none() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    tracing::info!(%accel, elapsed_ms = started.elapsed().as_millis() as u64, "KVM probe done");
    ProbeRecord { key, accel, reason }
}

/// Boots the VM's kernel and initramfs under KVM without devices and waits
/// for the kernel to reach /init. Err carries why KVM is unusable.
async fn boot_probe_guest(
    config: &VmConfig,
    state_root: &Path,
    tsc_khz: u64,
) -> Result<(), String> {
    let dir = ProbeDir::create(state_root)
        .map_err(|error| format!("cannot create the probe dir: {error}"))?;
    let paths = StatePaths::new(&dir.0);
    let console = paths.console_log.clone();
    let mut child = tokio::process::Command::new(&config.qemu)
        .args(qemu_args(
            &probe_config(config, &dir.0),
            Accel::Kvm,
            tsc_khz,
            &paths,
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot spawn {}: {error}", config.qemu.display()))?;
    let deadline = Instant::now() + PROBE_DEADLINE;
    let verdict = loop {
        if std::fs::read_to_string(&console).is_ok_and(|text| text.contains(PROBE_MARKER)) {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = pipe.read_to_string(&mut stderr).await;
            }
            let first_line = stderr
                .lines()
                .next()
                .unwrap_or("no error output")
                .to_owned();
            break Err(format!(
                "a probe guest made QEMU exit with {status}: {first_line}"
            ));
        }
        if Instant::now() >= deadline {
            break Err(format!(
                "a probe guest did not reach /init within {} s",
                PROBE_DEADLINE.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    verdict
}

/// The probe guest: the VM's own machine (same command-line builder), one CPU, booted
/// fresh, with the kernel's informational messages on so the marker reaches the console.
fn probe_config(config: &VmConfig, dir: &Path) -> VmConfig {
    let mut extra_cmdline = config.extra_cmdline.clone();
    // After `quiet` on the command line, so it wins.
    extra_cmdline.push("loglevel=7".to_owned());
    VmConfig {
        id: "kvm-probe".to_owned(),
        state_dir: dir.to_path_buf(),
        cpus: 1,
        memory_mib: super::DEFAULT_MEMORY_MIB,
        extra_cmdline,
        netns: NetNamespace::Inherit,
        nics: Vec::new(),
        // A vsock CID could collide with a running VM's.
        agent_channel: AgentChannelKind::VirtioSerial,
        tcg_cache_mib: 0,
        memory: GuestMemory::Anonymous,
        restore: None,
        ..config.clone()
    }
}

/// A scratch dir for the probe guest, removed on every path.
struct ProbeDir(PathBuf);

impl ProbeDir {
    fn create(state_root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_root)?;
        let dir = tempfile::Builder::new()
            .prefix("kvm-probe-")
            .tempdir_in(state_root)?;
        Ok(Self(dir.keep()))
    }
}

impl Drop for ProbeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_boots_the_vms_machine_fresh_and_loud() {
        let config = VmConfig {
            id: "pod-vm".into(),
            state_dir: "/run/spry/vms/pod-vm".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.img".into(),
            cpus: 4,
            agent_channel: AgentChannelKind::Vsock { cid: 7 },
            restore: Some("/t/state".into()),
            memory: GuestMemory::PrivateFile {
                path: "/t/mem".into(),
            },
            ..Default::default()
        };
        let dir = Path::new("/run/spry/kvm-probe-x");
        let args: Vec<String> = qemu_args(
            &probe_config(&config, dir),
            Accel::Kvm,
            2_000_000,
            &StatePaths::new(dir),
        )
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(after("-accel"), "kvm");
        assert_eq!(after("-smp"), "1");
        assert_eq!(after("-kernel"), "/k/vmlinux");
        assert!(after("-append").ends_with("quiet spry.agent_channel=virtio-serial loglevel=7"));
        assert!(!args
            .iter()
            .any(|a| a == "-incoming" || a.contains("vhost-vsock")));
        assert!(!args.iter().any(|a| a.contains("memory-backend")));
        assert!(args
            .iter()
            .any(|a| a.contains("/run/spry/kvm-probe-x/console.log")));
    }

    #[test]
    fn cache_hits_only_on_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PROBE_CACHE_FILE);
        let record = ProbeRecord {
            key: "k1".into(),
            accel: Accel::Tcg,
            reason: Some("crashed".into()),
        };
        write_cache(&path, &record);
        assert_eq!(read_cache(&path, "k1"), Some(record));
        assert_eq!(read_cache(&path, "k2"), None);
        std::fs::write(&path, "{garbage").unwrap();
        assert_eq!(read_cache(&path, "k1"), None);
    }

    #[tokio::test]
    async fn the_key_follows_qemu_and_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"one").unwrap();
        let config = VmConfig {
            id: "probe".into(),
            state_dir: dir.path().join("vm"),
            kernel: kernel.clone(),
            initramfs: dir.path().join("initramfs.img"),
            cpus: 1,
            memory_mib: 128,
            accel: AccelChoice::Auto,
            qemu: "/bin/true".into(),
            agent_channel: super::super::AgentChannelKind::VirtioSerial,
            extra_cmdline: vec![],
            ..Default::default()
        };
        let first = probe_key(&config).await;
        assert_eq!(first, probe_key(&config).await);
        std::fs::write(&kernel, b"a different kernel").unwrap();
        let second = probe_key(&config).await;
        assert_ne!(first, second);
        let other_qemu = VmConfig {
            qemu: "/bin/false".into(),
            ..config
        };
        assert_ne!(second, probe_key(&other_qemu).await);
    }

    #[tokio::test]
    async fn explicit_choices_skip_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = VmConfig {
            id: "x".into(),
            state_dir: dir.path().join("vm"),
            kernel: "/nonexistent".into(),
            initramfs: "/nonexistent".into(),
            cpus: 1,
            memory_mib: 128,
            accel: AccelChoice::Tcg,
            qemu: "/nonexistent".into(),
            agent_channel: super::super::AgentChannelKind::VirtioSerial,
            extra_cmdline: vec![],
            ..Default::default()
        };
        assert_eq!(resolve(&config, dir.path()).await, Accel::Tcg);
        config.accel = AccelChoice::Kvm;
        assert_eq!(resolve(&config, dir.path()).await, Accel::Kvm);
        assert!(!dir.path().join(PROBE_CACHE_FILE).exists());
    }
}
