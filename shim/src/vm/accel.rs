//! Choosing the accelerator. `Auto` boots a probe guest under KVM with a
//! short deadline: on some hosts /dev/kvm exists but guests crash or crawl,
//! and only booting one tells. Verdicts differ in how long they hold:
//! - KVM works, or is unusable (no /dev/kvm, QEMU or the guest fails under it): cached
//!   for this host boot;
//! - the guest was slow (the deadline missed): maybe a busy node, maybe a crawling KVM:
//!   cached for [`SLOW_RETRY_AFTER`], then probed again, so a node busy at boot does not
//!   stay on TCG until reboot (and a crawling KVM costs one 3 s probe per period);
//! - the probe could not run for another reason (a missing kernel, no QEMU, no probe
//!   dir): not cached and not blamed on KVM.
//!
//! Production nodes should set `accelerator = "kvm"`, which never falls back.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cmdline::StatePaths;
use super::launch::launch;
use super::{Accel, AccelChoice, AgentChannelKind, GuestMemory, NetNamespace, VmConfig, VmError};

/// The warning logged (once per process) when Auto falls back to TCG.
pub const KVM_UNUSABLE_WARNING: &str = "using TCG software emulation: expect ~10x slower VMs";

/// The kernel prints this just before running /init: reaching it within the
/// deadline proves KVM runs a guest at full speed.
const PROBE_MARKER: &str = "Run /init as init process";
const PROBE_DEADLINE: Duration = Duration::from_secs(3);
/// How long a "slow" verdict holds before KVM is probed again.
pub const SLOW_RETRY_AFTER: Duration = Duration::from_secs(600);
const PROBE_CACHE_FILE: &str = "accel-probe.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeRecord {
    key: String,
    accel: Accel,
    /// Why KVM was rejected.
    reason: Option<String>,
    /// Seconds since the epoch after which the record no longer holds (None: this boot).
    #[serde(default)]
    expires_unix: Option<u64>,
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Kvm,
    /// KVM cannot run guests here.
    Unusable(String),
    /// The guest did not reach /init in time.
    Slow(String),
    /// The probe itself could not run; says nothing about KVM.
    Inconclusive(String),
}

impl Verdict {
    /// The record to cache, if any, at `now_unix`.
    fn record(&self, key: String, now_unix: u64) -> Option<ProbeRecord> {
        let (accel, reason, expires_unix) = match self {
            Verdict::Kvm => (Accel::Kvm, None, None),
            Verdict::Unusable(reason) => (Accel::Tcg, Some(reason.clone()), None),
            Verdict::Slow(reason) => (
                Accel::Tcg,
                Some(reason.clone()),
                Some(now_unix + SLOW_RETRY_AFTER.as_secs()),
            ),
            Verdict::Inconclusive(_) => return None,
        };
        Some(ProbeRecord {
            key,
            accel,
            reason,
            expires_unix,
        })
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            let (accel, reason) = match read_cache(&cache, &key, now_unix()) {
                Some(record) => (record.accel, record.reason),
                None => {
                    let verdict = probe(config, state_root).await;
                    if let Some(record) = verdict.record(key, now_unix()) {
                        write_cache(&cache, &record);
                    }
                    match verdict {
                        Verdict::Kvm => (Accel::Kvm, None),
                        Verdict::Unusable(r) | Verdict::Slow(r) => (Accel::Tcg, Some(r)),
                        Verdict::Inconclusive(r) => (
                            Accel::Tcg,
                            Some(format!("the KVM probe could not run: {r}")),
                        ),
                    }
                }
            };
            if let Some(reason) = &reason {
                static WARN_ONCE: Once = Once::new();
                WARN_ONCE.call_once(|| {
                    tracing::warn!(
                        "KVM unusable ({reason}), {KVM_UNUSABLE_WARNING}; set accelerator = \"kvm\" to refuse TCG"
                    )
                });
            }
            accel
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

fn read_cache(path: &Path, key: &str, now_unix: u64) -> Option<ProbeRecord> {
    let text = std::fs::read_to_string(path).ok()?;
    let record: ProbeRecord = serde_json::from_str(&text).ok()?;
    let live = record.expires_unix.is_none_or(|t| now_unix < t);
    (record.key == key && live).then_some(record)
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

async fn probe(config: &VmConfig, state_root: &Path) -> Verdict {
    let started = Instant::now();
    let verdict = probe_inner(config, state_root).await;
    tracing::info!(
        ?verdict,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "KVM probe done"
    );
    verdict
}

async fn probe_inner(config: &VmConfig, state_root: &Path) -> Verdict {
    for (what, path) in [
        ("QEMU", &config.qemu),
        ("guest kernel", &config.kernel),
        ("initramfs", &config.initramfs),
    ] {
        if !path.is_file() {
            return Verdict::Inconclusive(format!("the {what} {} is missing", path.display()));
        }
    }
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Verdict::Unusable(format!("cannot open /dev/kvm: {error}"));
    }
    let tsc_khz = match tokio::task::spawn_blocking(super::tsc::host_tsc_khz).await {
        Ok(Ok(tsc_khz)) => tsc_khz,
        Ok(Err(error)) => return Verdict::Inconclusive(format!("cannot measure the TSC: {error}")),
        Err(error) => return Verdict::Inconclusive(format!("cannot measure the TSC: {error}")),
    };
    boot_probe_guest(config, state_root, tsc_khz).await
}

/// Boots the VM's kernel and initramfs under KVM without devices and waits for the
/// kernel to reach /init.
async fn boot_probe_guest(config: &VmConfig, state_root: &Path, tsc_khz: u64) -> Verdict {
    let dir = match ProbeDir::create(state_root) {
        Ok(dir) => dir,
        Err(error) => {
            return Verdict::Inconclusive(format!("cannot create the probe dir: {error}"))
        }
    };
    let paths = StatePaths::new(&dir.0);
    let console = paths.console_log.clone();
    let uid_dir = state_root.join(super::qemu::JAIL_UID_DIR);
    let probe = probe_config(config, &dir.0);
    let mut child = match launch(&probe, Accel::Kvm, tsc_khz, &paths, &uid_dir).await {
        Ok(launched) => launched.child,
        Err(VmError::KvmUnavailable { source }) => {
            return Verdict::Unusable(format!("cannot open /dev/kvm: {source}"))
        }
        Err(error) => return Verdict::Inconclusive(format!("cannot start a probe guest: {error}")),
    };
    let give_up = Instant::now() + PROBE_DEADLINE;
    let verdict = loop {
        if std::fs::read_to_string(&console).is_ok_and(|text| text.contains(PROBE_MARKER)) {
            break Verdict::Kvm;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = std::fs::read_to_string(&paths.qemu_stderr).unwrap_or_default();
            let first_line = stderr
                .lines()
                .next()
                .unwrap_or("no error output")
                .to_owned();
            break Verdict::Unusable(format!(
                "a probe guest made QEMU exit with {status}: {first_line}"
            ));
        }
        if Instant::now() >= give_up {
            break Verdict::Slow(format!(
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
    use super::super::cmdline::qemu_args;
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
        let args: Vec<String> = qemu_args(&probe_config(&config, dir), Accel::Kvm, 2_000_000)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(after("-accel"), "kvm,device=/dev/fdset/2");
        assert_eq!(after("-smp"), "1");
        assert_eq!(after("-kernel"), "/k/vmlinux");
        assert!(after("-append")
            .ends_with("spry.agent_channel=virtio-serial rcupdate.rcu_expedited=1 loglevel=7"));
        assert!(!args
            .iter()
            .any(|a| a == "-incoming" || a.contains("vhost-vsock")));
        assert!(!args.iter().any(|a| a.contains("memory-backend")));
        assert!(args
            .iter()
            .any(|a| a == "file,id=console,path=/dev/fdset/1"));
    }

    #[test]
    fn cache_hits_only_on_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PROBE_CACHE_FILE);
        let record = Verdict::Unusable("crashed".into())
            .record("k1".into(), 100)
            .unwrap();
        write_cache(&path, &record);
        assert_eq!(read_cache(&path, "k1", 100), Some(record.clone()));
        assert_eq!(
            read_cache(&path, "k1", u64::MAX),
            Some(record),
            "holds for the boot"
        );
        assert_eq!(read_cache(&path, "k2", 100), None);
        std::fs::write(&path, "{garbage").unwrap();
        assert_eq!(read_cache(&path, "k1", 100), None);
    }

    #[test]
    fn a_slow_guest_is_retried_later_and_a_probe_that_could_not_run_is_never_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PROBE_CACHE_FILE);
        let slow = Verdict::Slow("busy".into())
            .record("k".into(), 1000)
            .unwrap();
        assert_eq!(slow.accel, Accel::Tcg);
        write_cache(&path, &slow);
        assert!(read_cache(&path, "k", 1000 + SLOW_RETRY_AFTER.as_secs() - 1).is_some());
        assert!(read_cache(&path, "k", 1000 + SLOW_RETRY_AFTER.as_secs()).is_none());
        assert!(Verdict::Inconclusive("no kernel".into())
            .record("k".into(), 1000)
            .is_none());
        assert_eq!(
            Verdict::Kvm.record("k".into(), 1).unwrap().expires_unix,
            None
        );
    }

    #[tokio::test]
    async fn a_missing_kernel_is_not_blamed_on_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let config = VmConfig {
            id: "x".into(),
            state_dir: dir.path().join("vm"),
            kernel: dir.path().join("no-such-vmlinux"),
            initramfs: dir.path().join("no-such-initramfs"),
            accel: AccelChoice::Auto,
            qemu: "/bin/true".into(),
            ..Default::default()
        };
        let verdict = probe(&config, dir.path()).await;
        assert!(
            matches!(&verdict, Verdict::Inconclusive(r) if r.contains("no-such-vmlinux")),
            "{verdict:?}"
        );
        assert_eq!(resolve(&config, dir.path()).await, Accel::Tcg);
        assert!(!dir.path().join(PROBE_CACHE_FILE).exists(), "cached");
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
