//! Saving a VM to a file and restoring it, with QEMU migration.
//!
//! A template VM's RAM is a shared memory file, so only device state goes through the
//! migration stream (`x-ignore-shared` skips RAM blocks backed by a shared file): the stream
//! is tens of KiB and is written in milliseconds. A clone maps the same memory file
//! privately and loads the stream; both sides must set the capability, since it changes the
//! stream's layout.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::cmdline::qemu_args;
use super::qmp::{QmpClient, QmpError};
use super::{Accel, GuestMemory, NetNamespace, VmConfig, VmError, VmExit};

/// Loading a few hundred KiB of device state takes milliseconds; a loaded TCG host is slow.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);
const RESTORE_POLL: Duration = Duration::from_millis(2);
const SAVE_POLL: Duration = Duration::from_millis(10);
/// Bump when the way templates are made changes in a way the fingerprint does not see.
const SNAPSHOT_FORMAT: &str = "spry-snapshot-1";

fn ignore_shared() -> Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Hands the open state file to QEMU (its jail holds no such path) and returns the
/// migration URI naming it, with the fd set to drop afterwards.
async fn hand_over(qmp: &QmpClient, file: &std::fs::File) -> Result<(String, u64), QmpError> {
    use std::os::fd::AsFd;
    let fdset = qmp.add_fd(file.as_fd()).await?;
    Ok((format!("file:/dev/fdset/{fdset}"), fdset))
}

/// Where a migration stands, from `query-migrate`.
enum Progress {
    Running,
    Completed,
    Failed(String),
}

async fn progress(qmp: &QmpClient) -> Result<Progress, super::qmp::QmpError> {
    let reply = qmp.execute("query-migrate", None).await?;
    Ok(match reply["status"].as_str().unwrap_or("") {
        "completed" => Progress::Completed,
        "failed" | "cancelled" => Progress::Failed(
            reply["error-desc"]
                .as_str()
                .unwrap_or("migration failed without a reason")
                .to_owned(),
        ),
        _ => Progress::Running,
    })
}

/// Loads `state` into a QEMU started with `-incoming defer -S`, then resumes the guest.
/// Any failure while loading is a [`VmError::Restore`] naming the file: QEMU usually exits
/// on a stream it cannot parse, and then says why only on its stderr.
pub async fn restore(
    qmp: &QmpClient,
    id: &str,
    state: &Path,
    exit: &watch::Receiver<Option<VmExit>>,
) -> Result<(), VmError> {
    let failed = |detail: String| VmError::Restore {
        id: id.to_owned(),
        state: state.to_path_buf(),
        detail,
    };
    if !state.is_file() {
        return Err(failed("the state file does not exist".into()));
    }
    match load(qmp, state, exit).await {
        Ok(()) => {}
        Err(Loading::Failed(detail)) => return Err(failed(detail)),
        Err(Loading::TimedOut) => {
            return Err(VmError::MigrationTimeout {
                id: id.to_owned(),
                state: state.to_path_buf(),
                seconds: RESTORE_TIMEOUT.as_secs(),
            })
        }
        Err(Loading::Qmp(source)) => {
            // QMP hung up: most likely QEMU is exiting; give the exit watch a moment.
            let mut exit = exit.clone();
            let exited =
                tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().map(|e| e.clone()))
                    .flatten();
            return Err(failed(match exited {
                Some(exit) => format!("QEMU exited while loading it ({exit})"),
                None => format!("QMP failed while loading it: {source}"),
            }));
        }
    }
    qmp.execute("cont", None)
        .await
        .map_err(|source| VmError::Qmp {
            id: id.to_owned(),
            source,
        })?;
    Ok(())
}

enum Loading {
    Failed(String),
    TimedOut,
    Qmp(super::qmp::QmpError),
}

async fn load(
    qmp: &QmpClient,
    state: &Path,
    exit: &watch::Receiver<Option<VmExit>>,
) -> Result<(), Loading> {
    qmp.execute("migrate-set-capabilities", Some(ignore_shared()))
        .await
        .map_err(Loading::Qmp)?;
    let file = std::fs::File::open(state)
        .map_err(|error| Loading::Failed(format!("cannot open it: {error}")))?;
    let (uri, fdset) = hand_over(qmp, &file).await.map_err(Loading::Qmp)?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await
        .map_err(Loading::Qmp)?;
    let _ = qmp.remove_fdset(fdset).await;
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    loop {
        if let Some(exit) = exit.borrow().clone() {
            return Err(Loading::Failed(format!(
                "QEMU exited while loading it ({exit})"
            )));
        }
        match progress(qmp).await.map_err(Loading::Qmp)? {
            Progress::Completed => return Ok(()),
            Progress::Failed(detail) => return Err(Loading::Failed(detail)),
            Progress::Running => {}
        }
        if Instant::now() >= deadline {
            return Err(Loading::TimedOut);
        }
        tokio::time::sleep(RESTORE_POLL).await;
    }
}

/// Pauses the guest and writes its device state to `state`.
pub async fn save(qmp: &QmpClient, id: &str, state: &Path) -> Result<(), VmError> {
    let qmp_error = |source| VmError::Qmp {
        id: id.to_owned(),
        source,
    };
    // Paused first, so the memory file and the device state describe the same instant.
    qmp.execute("stop", None).await.map_err(qmp_error)?;
    qmp.execute("migrate-set-capabilities", Some(ignore_shared()))
        .await
        .map_err(qmp_error)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(state)
        .map_err(|error| VmError::Snapshot {
            id: id.to_owned(),
            state: state.to_path_buf(),
            detail: format!("cannot create it: {error}"),
        })?;
    let (uri, fdset) = hand_over(qmp, &file).await.map_err(qmp_error)?;
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .await
        .map_err(qmp_error)?;
    let _ = qmp.remove_fdset(fdset).await;
    let deadline = Instant::now() + SAVE_TIMEOUT;
    loop {
        match progress(qmp).await.map_err(qmp_error)? {
            Progress::Completed => return Ok(()),
            Progress::Failed(detail) => {
                return Err(VmError::Snapshot {
                    id: id.to_owned(),
                    state: state.to_path_buf(),
                    detail,
                })
            }
            Progress::Running => {}
        }
        if Instant::now() >= deadline {
            return Err(VmError::MigrationTimeout {
                id: id.to_owned(),
                state: state.to_path_buf(),
                seconds: SAVE_TIMEOUT.as_secs(),
            });
        }
        tokio::time::sleep(SAVE_POLL).await;
    }
}

/// Identifies a file's content cheaply: a replaced or rewritten file gets a new inode or
/// mtime. Hashing a 50 MiB kernel on every pod start would cost more than the restore.
pub(super) fn file_identity(what: &'static str, path: &Path) -> Result<String, VmError> {
    let meta = std::fs::metadata(path).map_err(|source| VmError::FileIdentity {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!(
        "{what}={} dev={} ino={} size={} mtime={}.{}",
        path.display(),
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// See [`super::Hypervisor::snapshot_fingerprint`]. The machine is QEMU's own command line
/// for a canonical VM, so any device or option change makes a new fingerprint.
pub fn fingerprint(config: &VmConfig, accel: Accel) -> Result<String, VmError> {
    let canonical = VmConfig {
        id: "template".into(),
        state_dir: PathBuf::from("/template"),
        netns: NetNamespace::Inherit,
        memory: GuestMemory::SharedFile {
            path: PathBuf::from("/template/memory"),
        },
        restore: None,
        ..config.clone()
    };
    // The TSC rate is measured per process and may wobble; a clone keeps the template's.
    let args = qemu_args(&canonical, accel, 0);
    let mut hash = Sha256::new();
    hash.update(SNAPSHOT_FORMAT);
    for arg in &args {
        hash.update(arg.as_encoded_bytes());
        hash.update([0]);
    }
    for (what, path) in [
        ("qemu", &config.qemu),
        ("kernel", &config.kernel),
        ("initramfs", &config.initramfs),
    ] {
        hash.update(file_identity(what, path)?);
        hash.update([0]);
    }
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> VmConfig {
        for name in ["qemu", "vmlinux", "initramfs"] {
            std::fs::write(dir.join(name), name).unwrap();
        }
        VmConfig {
            id: "pod-a".into(),
            state_dir: dir.join("vms/pod-a"),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs"),
            qemu: dir.join("qemu"),
            ..Default::default()
        }
    }

    #[test]
    fn fingerprint_ignores_per_vm_details_but_sees_size_and_assets() {
        let dir = tempfile::tempdir().unwrap();
        let base = config(dir.path());
        let same = fingerprint(&base, Accel::Tcg).unwrap();
        let other_vm = VmConfig {
            id: "pod-b".into(),
            state_dir: dir.path().join("vms/pod-b"),
            netns: NetNamespace::Join("/run/netns/x".into()),
            memory: GuestMemory::PrivateFile {
                path: "/t/memory".into(),
            },
            restore: Some("/t/state".into()),
            ..base.clone()
        };
        assert_eq!(fingerprint(&other_vm, Accel::Tcg).unwrap(), same);

        let bigger = VmConfig {
            memory_mib: 1024,
            ..base.clone()
        };
        assert_ne!(fingerprint(&bigger, Accel::Tcg).unwrap(), same);
        assert_ne!(fingerprint(&base, Accel::Kvm).unwrap(), same);

        // A rebuilt kernel (new file in its place) is a new template.
        std::fs::remove_file(&base.kernel).unwrap();
        std::fs::write(&base.kernel, "a newer kernel").unwrap();
        assert_ne!(fingerprint(&base, Accel::Tcg).unwrap(), same);
    }

    #[test]
    fn fingerprint_of_a_missing_kernel_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = config(dir.path());
        std::fs::remove_file(&base.kernel).unwrap();
        let err = fingerprint(&base, Accel::Tcg).unwrap_err();
        assert!(
            matches!(err, VmError::FileIdentity { what: "kernel", .. }),
            "{err}"
        );
    }
}
