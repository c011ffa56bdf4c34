//! The host side of a pod's file share: a staging directory of placeholders, and the pod's
//! file server process (`spry fs-serve`, `server.rs`), which serves that directory to the
//! guest over the VM's `spry.fs` virtio-serial port.
//!
//! Layout: `<share>/<container id>/<n>` is volume n of that container: on the host an
//! empty placeholder dir or file; in the server's own mount namespace, the volume, which
//! the shim hands over as a detached mount tree (`attach.rs`). The host's namespace holds
//! no mount of Spry's under a user's directory, as under runc.
//!
//! Safety of user data: the staging dir is never removed recursively, only what the shim
//! created in it (empty directories and empty placeholder files); removing a placeholder
//! detaches the server's mount of the volume, never touches the volume's content.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::mount::{umount2, MntFlags};
use spry_proto::agent::{volume_mount, VolumeMount};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::attach::{self, AttachClient, AttachRequest, Propagation};
use super::{submounts, ReadOnly, SharedVolume, VolumeError};
use crate::sandbox::{PodResource, ResourceError};
use crate::vm::Vm;

/// The number the server gets its end of the attach socket at.
const CONTROL_FD: i32 = 3;
/// How long the file server may take to connect and confine itself.
const SERVER_START: Duration = Duration::from_secs(10);
/// What the server prints once it serves.
pub const READY_LINE: &str = "ready";

/// Where a pod's share lives and which program serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileShareConfig {
    /// The staging dir (`<state>/shares/<vm>`).
    pub dir: PathBuf,
    /// The `spry` binary, run as `spry fs-serve`.
    pub server: PathBuf,
}

/// A pod's file share.
pub struct FileShare {
    config: FileShareConfig,
    server: Mutex<Option<tokio::process::Child>>,
    /// Our end of the server's attach socket while it runs.
    client: Mutex<Option<Arc<AttachClient>>>,
    /// Container id → the mountpoints its volumes occupy.
    exported: Mutex<HashMap<String, Vec<PathBuf>>>,
    /// Cgroup dirs the server is spawned into (the pod's); empty: the shim's.
    cgroup: Vec<PathBuf>,
}

impl FileShare {
    pub fn new(config: FileShareConfig) -> Self {
        Self {
            config,
            server: Mutex::new(None),
            client: Mutex::new(None),
            exported: Mutex::new(HashMap::new()),
            cgroup: Vec::new(),
        }
    }

    /// The server is spawned into these cgroup dirs (existing by the time the share is
    /// set up), so all it allocates is charged to the pod.
    pub fn spawned_in(self, cgroup: Vec<PathBuf>) -> Self {
        Self { cgroup, ..self }
    }

    /// Binds `volumes` into the share; returns what the agent mounts for each, in order.
    pub async fn export(
        &self,
        container_id: &str,
        volumes: &[SharedVolume],
    ) -> Result<Vec<VolumeMount>, VolumeError> {
        if volumes.is_empty() {
            return Ok(Vec::new());
        }
        if container_id.is_empty()
            || container_id.contains('/')
            || container_id == "."
            || container_id == ".."
        {
            return Err(VolumeError::BadContainerId {
                id: container_id.into(),
            });
        }
        let Some(client) = self.client.lock().await.clone() else {
            return Err(VolumeError::NoShare {
                id: container_id.into(),
            });
        };
        let mut exported = self.exported.lock().await;
        if let Some(previous) = exported.remove(container_id) {
            // A create that failed after exporting, retried under the same id.
            unbind_all(&previous);
        }
        let dir = self.config.dir.join(container_id);
        create_dir(&dir)?;
        let mut mountpoints = Vec::new();
        let mut mounts = Vec::new();
        for (index, volume) in volumes.iter().enumerate() {
            let target = dir.join(index.to_string());
            let share_path = format!("{container_id}/{index}");
            let request = AttachRequest {
                path: share_path.clone(),
                propagation: Propagation::of(&volume.options),
            };
            let attached = match place(volume, &target) {
                Ok(()) => {
                    mountpoints.push(target.clone());
                    hand_over(&client, volume, &target, request).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = attached {
                unbind_all(&mountpoints);
                remove_placeholder(&dir);
                return Err(e);
            }
            if volume.is_dir && volume.readonly == ReadOnly::TopMount {
                mounts.extend(submount_binds(volume, &share_path));
            } else {
                mounts.push(volume_bind(
                    &volume.destination,
                    share_path,
                    volume.options.clone(),
                ));
            }
        }
        exported.insert(container_id.to_string(), mountpoints);
        Ok(mounts)
    }

    /// Removes a container's volumes from the share (after the guest let go of them).
    pub async fn unexport(&self, container_id: &str) {
        if let Some(mountpoints) = self.exported.lock().await.remove(container_id) {
            unbind_all(&mountpoints);
            remove_placeholder(&self.config.dir.join(container_id));
        }
    }

    async fn start_server(
        &self,
        socket: &Path,
    ) -> Result<(tokio::process::Child, AttachClient), VolumeError> {
        let program = &self.config.server;
        let spawn_err = |source| VolumeError::SpawnServer {
            program: program.clone(),
            source,
        };
        let (client, server_end) = attach::pair().map_err(spawn_err)?;
        let mut command = tokio::process::Command::new(program);
        command
            .arg("fs-serve")
            .arg("--dir")
            .arg(&self.config.dir)
            .arg("--socket")
            .arg(socket)
            .arg("--control-fd")
            .arg(CONTROL_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let cgroups =
            crate::sys::open_cgroup_procs(&self.cgroup).map_err(|(_, source)| spawn_err(source))?;
        crate::sys::configure_child(
            &mut command,
            crate::sys::ChildSetup {
                netns: crate::sys::ChildNetns::Inherit,
                fds: vec![(server_end.as_raw_fd(), CONTROL_FD)],
                jail: None,
                cgroups: cgroups.iter().map(AsRawFd::as_raw_fd).collect(),
            },
        )
        .map_err(spawn_err)?;
        let spawned = crate::vm::spawn_long_lived(command).await;
        drop(server_end);
        let mut child = spawned.map_err(spawn_err)?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        let ready = tokio::time::timeout(SERVER_START, stdout.read_line(&mut line)).await;
        if matches!(ready, Ok(Ok(_))) && line.trim() == READY_LINE {
            if let Some(stderr) = child.stderr.take() {
                tokio::spawn(log_server_stderr(stderr));
            }
            return Ok((child, client));
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        Err(VolumeError::ServerFailed {
            detail: match ready {
                Err(_) => format!("no answer within {SERVER_START:?}; {}", stderr.trim()),
                _ => stderr.trim().to_string(),
            },
        })
    }
}

/// How the server ended, when it did before the pod's teardown: at the VM's hang-up it
/// exits 0 (the VM stops first); anything else stopped the guest's file share early.
fn report_early_end(status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    if status.signal() == Some(libc::SIGSYS) {
        warn!(
            "the pod's file server was killed by its seccomp filter: it made a system call \
             outside its list (the kernel's audit log names it); the guest's file share \
             stopped working then"
        );
    } else if !status.success() {
        warn!(%status, "the pod's file server failed before the pod ended; the guest's file share stopped working then");
    }
}

async fn log_server_stderr(stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        warn!(server = "fs-serve", "{line}");
    }
}

impl FileShare {
    /// The file server's PID while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.try_lock().ok()?.as_ref()?.id()
    }
}

#[async_trait]
impl PodResource for FileShare {
    fn name(&self) -> &'static str {
        "file share"
    }

    async fn setup(&self, vm: &dyn Vm) -> Result<(), ResourceError> {
        prepare_staging(&self.config.dir)?;
        match self.start_server(vm.share_socket()).await {
            Ok((child, client)) => {
                info!(dir = %self.config.dir.display(), "pod file share served");
                *self.server.lock().await = Some(child);
                *self.client.lock().await = Some(Arc::new(client));
                Ok(())
            }
            Err(e) => {
                remove_staging(&self.config.dir);
                Err(e.into())
            }
        }
    }

    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        self.client.lock().await.take();
        if let Some(mut child) = self.server.lock().await.take() {
            if let Ok(Some(status)) = child.try_wait() {
                report_early_end(status);
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.exported.lock().await.clear();
        remove_staging(&self.config.dir);
        Ok(())
    }
}

/// Creates the staging dir: placeholders only on the host; the volumes are mounted in the
/// server's namespace alone.
fn prepare_staging(dir: &Path) -> Result<(), VolumeError> {
    create_dir(dir)
}

/// Removes what the shim created under the staging dir (removing a placeholder detaches
/// what the server has mounted there). Also used for what a killed shim left behind; the
/// staging dir is detached first, for state of versions that bound volumes on the host.
pub fn remove_staging(dir: &Path) {
    loop {
        match umount2(dir, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => break,
            Err(e) => {
                warn!(path = %dir.display(), error = %e, "cannot detach the pod's file share");
                return;
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            remove_placeholder(&entry.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %dir.display(), error = %e, "cannot remove the pod's file share dir");
        }
    }
}

/// Removes a container's dir of placeholders: empty files and empty dirs only, so that
/// nothing of a volume that is somehow still mounted can be deleted.
fn remove_placeholder(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {
                    let _ = std::fs::remove_dir(&path);
                }
                Ok(meta) if meta.is_file() && meta.len() == 0 => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => warn!(path = %path.display(), "leaving an unexpected entry in the file share"),
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn create_dir(dir: &Path) -> Result<(), VolumeError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| VolumeError::Prepare {
            path: dir.to_path_buf(),
            source,
        })
}

/// Creates a volume's placeholder at `target`: a dir or an empty file.
fn place(volume: &SharedVolume, target: &Path) -> Result<(), VolumeError> {
    let prepared = if volume.is_dir {
        std::fs::create_dir(target)
    } else {
        std::fs::File::create(target).map(drop)
    };
    prepared.map_err(|source| VolumeError::Prepare {
        path: target.to_path_buf(),
        source,
    })
}

/// Has the server mount a copy of the volume's source (read-only from the start as asked,
/// so a guest that ignores its own ro mount still cannot write through the server) at the
/// placeholder `target`.
async fn hand_over(
    client: &Arc<AttachClient>,
    volume: &SharedVolume,
    target: &Path,
    request: AttachRequest,
) -> Result<(), VolumeError> {
    let bind_err = |e: std::io::Error| VolumeError::Bind {
        source_path: volume.source.clone(),
        target: target.to_path_buf(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    };
    let readonly = volume.readonly != ReadOnly::No;
    let recursive = volume.readonly == ReadOnly::Recursive;
    let tree =
        crate::sys::mount::clone_tree(&volume.source, readonly, recursive).map_err(bind_err)?;
    let client = Arc::clone(client);
    tokio::task::spawn_blocking(move || client.attach(tree, &request))
        .await
        .map_err(|_| bind_err(std::io::Error::from_raw_os_error(libc::EIO)))?
        .map_err(bind_err)
}

fn volume_bind(destination: &Path, share_path: String, options: Vec<String>) -> VolumeMount {
    VolumeMount {
        destination: destination.display().to_string(),
        source: Some(volume_mount::Source::SharePath(share_path)),
        options,
        ..Default::default()
    }
}

/// The guest's binds for a plain read-only volume: the volume, then each
/// mount under it with its own flag (see `submounts`), so that they stay writable in the
/// guest where they are on the host. Only the volume itself when there are too many.
fn submount_binds(volume: &SharedVolume, share_path: &str) -> Vec<VolumeMount> {
    let mut binds = vec![volume_bind(
        &volume.destination,
        share_path.to_string(),
        volume.options.clone(),
    )];
    let mountinfo = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => text,
        Err(e) => {
            warn!(error = %e, "cannot read /proc/self/mountinfo: mounts under a read-only volume are read-only in the guest");
            return binds;
        }
    };
    // The tree handed over is a copy of what is mounted under the source now.
    let Some(submounts) = submounts::under(&mountinfo, &volume.source) else {
        warn!(
            source = %volume.source.display(),
            max = submounts::MAX_SUBMOUNTS,
            "too many mounts under a read-only volume: they are all read-only in the guest"
        );
        return binds;
    };
    for submount in submounts {
        let mut options: Vec<String> = volume
            .options
            .iter()
            .filter(|o| !matches!(o.as_str(), "ro" | "rw"))
            .cloned()
            .collect();
        options.push(if submount.readonly { "ro" } else { "rw" }.into());
        binds.push(volume_bind(
            &volume.destination.join(&submount.relative),
            format!("{share_path}/{}", submount.relative.display()),
            options,
        ));
    }
    binds
}

/// Removes volumes from the share. Their placeholders are empty on the host; removing one
/// detaches the server's mount there too (the kernel lazily unmounts what other
/// namespaces have on a removed dentry). One mounted here (by an older version) is
/// unmounted first; one that cannot be is left in place, never removed with its content.
fn unbind_all(mountpoints: &[PathBuf]) {
    for target in mountpoints {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) => {
                let _ = std::fs::remove_dir(target).or_else(|_| remove_empty_file(target));
            }
            Err(e) => {
                warn!(path = %target.display(), error = %e, "cannot unmount a volume from the file share")
            }
        }
    }
}

fn remove_empty_file(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && meta.len() == 0 => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[path = "share_tests.rs"]
mod tests;
