//! The host side of a pod's file share: a staging directory the shim bind-mounts each
//! container's host volumes into, and the pod's file server process (`spry fs-serve`,
//! `server.rs`), which serves that directory to the guest over the VM's `spry.fs`
//! virtio-serial port.
//!
//! Layout: `<share>/<container id>/<n>` is volume n of that container. The staging dir is
//! a bind mount of itself with shared propagation in a peer group of its own; the server
//! runs in a mount namespace where it is a slave, so binds made here after the server
//! started reach it, and nothing the server does reaches the host.
//!
//! Safety of user data: the staging dir holds mounts of the users' host directories, so it
//! is never removed recursively. Teardown detaches the whole tree first, then removes
//! only what the shim created (empty directories and empty placeholder files).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use spry_proto::agent::{volume_mount, VolumeMount};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{SharedVolume, VolumeError};
use crate::sandbox::{PodResource, ResourceError};
use crate::vm::Vm;

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
    /// Container id → the mountpoints its volumes occupy.
    exported: Mutex<HashMap<String, Vec<PathBuf>>>,
}

impl FileShare {
    pub fn new(config: FileShareConfig) -> Self {
        Self {
            config,
            server: Mutex::new(None),
            exported: Mutex::new(HashMap::new()),
        }
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
        if self.server.lock().await.is_none() {
            return Err(VolumeError::NoShare {
                id: container_id.into(),
            });
        }
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
            if let Err(e) = bind(volume, &target) {
                unbind_all(&mountpoints);
                remove_placeholder(&dir);
                return Err(e);
            }
            mountpoints.push(target);
            mounts.push(VolumeMount {
                destination: volume.destination.display().to_string(),
                source: Some(volume_mount::Source::SharePath(format!(
                    "{container_id}/{index}"
                ))),
                options: volume.options.clone(),
                ..Default::default()
            });
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

    async fn start_server(&self, socket: &Path) -> Result<tokio::process::Child, VolumeError> {
        let program = &self.config.server;
        let mut command = tokio::process::Command::new(program);
        command
            .arg("fs-serve")
            .arg("--dir")
            .arg(&self.config.dir)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        crate::sys::configure_child(
            &mut command,
            crate::sys::ChildSetup {
                netns: crate::sys::ChildNetns::Inherit,
                fds: Vec::new(),
                jail: None,
            },
        )
        .map_err(|source| VolumeError::SpawnServer {
            program: program.clone(),
            source,
        })?;
        let mut child = crate::vm::spawn_long_lived(command)
            .await
            .map_err(|source| VolumeError::SpawnServer {
                program: program.clone(),
                source,
            })?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        let ready = tokio::time::timeout(SERVER_START, stdout.read_line(&mut line)).await;
        if matches!(ready, Ok(Ok(_))) && line.trim() == READY_LINE {
            if let Some(stderr) = child.stderr.take() {
                tokio::spawn(log_server_stderr(stderr));
            }
            return Ok(child);
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
            Ok(child) => {
                info!(dir = %self.config.dir.display(), "pod file share served");
                *self.server.lock().await = Some(child);
                Ok(())
            }
            Err(e) => {
                remove_staging(&self.config.dir);
                Err(e.into())
            }
        }
    }

    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        if let Some(mut child) = self.server.lock().await.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.exported.lock().await.clear();
        remove_staging(&self.config.dir);
        Ok(())
    }
}

/// Creates the staging dir as a mount of its own in a fresh shared peer group.
fn prepare_staging(dir: &Path) -> Result<(), VolumeError> {
    create_dir(dir)?;
    let flag = |flags: MsFlags, what: Option<&Path>| {
        mount(what, dir, None::<&str>, flags, None::<&str>).map_err(|source| VolumeError::Bind {
            source_path: dir.to_path_buf(),
            target: dir.to_path_buf(),
            source,
        })
    };
    let result = flag(MsFlags::MS_BIND, Some(dir))
        .and_then(|()| flag(MsFlags::MS_PRIVATE, None))
        .and_then(|()| flag(MsFlags::MS_SHARED, None));
    if result.is_err() {
        remove_staging(dir);
    }
    result
}

/// Detaches everything under the staging dir, then removes what the shim created there.
/// Also used for what a killed shim left behind.
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

/// Binds one volume at `target` (a placeholder dir or file created here).
fn bind(volume: &SharedVolume, target: &Path) -> Result<(), VolumeError> {
    let prepared = if volume.is_dir {
        std::fs::create_dir(target)
    } else {
        std::fs::File::create(target).map(drop)
    };
    prepared.map_err(|source| VolumeError::Prepare {
        path: target.to_path_buf(),
        source,
    })?;
    let bind_err = |source| VolumeError::Bind {
        source_path: volume.source.clone(),
        target: target.to_path_buf(),
        source,
    };
    if volume.readonly {
        // Read-only on the host too, and from the start (see `bind_readonly`): a guest
        // that ignores its own ro mount still cannot write through the server.
        return crate::sys::mount::bind_readonly(&volume.source, target)
            .map_err(|e| bind_err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))));
    }
    let none = None::<&str>;
    mount(
        Some(&volume.source),
        target,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(bind_err)
}

fn unbind_all(mountpoints: &[PathBuf]) {
    for target in mountpoints {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => {
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
mod tests {
    use super::*;

    fn volume(source: &Path, is_dir: bool, readonly: bool) -> SharedVolume {
        SharedVolume {
            destination: "/v".into(),
            source: source.to_path_buf(),
            is_dir,
            readonly,
            options: Vec::new(),
        }
    }

    fn is_mountpoint(path: &Path) -> bool {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(path))
    }

    fn require_root() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test needs root"
        );
    }

    /// Needs root (mounts).
    #[test]
    fn teardown_detaches_binds_and_never_deletes_the_users_data() {
        require_root();
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("precious"), "keep me").unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, "keep me too").unwrap();
        let share = root.path().join("share");

        prepare_staging(&share).unwrap();
        let container = share.join("c1");
        create_dir(&container).unwrap();
        bind(&volume(&data, true, false), &container.join("0")).unwrap();
        bind(&volume(&file, false, true), &container.join("1")).unwrap();
        assert_eq!(
            std::fs::read_to_string(container.join("0/precious")).unwrap(),
            "keep me"
        );
        // Read-only from the start, on the host as well.
        let err = std::fs::write(container.join("1"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));

        remove_staging(&share);
        assert!(!share.exists(), "the share dir is left");
        assert!(!is_mountpoint(&container.join("0")));
        assert_eq!(
            std::fs::read_to_string(data.join("precious")).unwrap(),
            "keep me"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me too");
    }

    /// Needs root (mounts) and util-linux `unshare`: a namespace that is a slave of the
    /// share (as the file server's is) gets later binds read-only too.
    #[test]
    fn a_read_only_bind_reaches_a_slave_namespace_read_only() {
        require_root();
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let share = root.path().join("share");
        prepare_staging(&share).unwrap();
        let target = share.join("0");
        let marker = root.path().join("slave-ready");
        // The slave namespace exists before the bind, like the server's.
        let script = format!(
            "touch {marker}; while [ ! -e {target}/go ]; do sleep 0.05; done; \
             echo x > {target}/written 2>/dev/null && echo writable || echo readonly",
            marker = marker.display(),
            target = target.display()
        );
        let slave = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "sh", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs");
        while !marker.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(data.join("go"), "").unwrap();
        bind(&volume(&data, true, true), &target).unwrap();
        let out = slave.wait_with_output().unwrap();
        remove_staging(&share);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "readonly");
        assert!(!data.join("written").exists());
    }
}
