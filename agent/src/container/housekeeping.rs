//! Background duties and teardown steps of a container.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use super::cgroup::{Cgroup, FileChanges};
use super::{Container, ContainerError, Process, EXITED_EXECS_KEPT, KILL_TIMEOUT, OOM_POLL};

/// SIGKILLs everything in the container's cgroup and waits for the init and the cgroup to
/// empty.
pub(super) async fn kill_and_wait(container: &Container) -> Result<(), ContainerError> {
    let id = &container.id;
    let deadline = tokio::time::Instant::now() + KILL_TIMEOUT;
    loop {
        let _ = container.init.signal(Signal::SIGKILL);
        let pids = container
            .cgroup
            .pids()
            .map_err(|source| ContainerError::Cgroup {
                id: id.clone(),
                source,
            })?;
        if pids.is_empty() && container.init.exited().is_some() {
            return Ok(());
        }
        container
            .cgroup
            .signal_all(Signal::SIGKILL)
            .map_err(|source| ContainerError::Cgroup {
                id: id.clone(),
                source,
            })?;
        if tokio::time::Instant::now() > deadline {
            return Err(ContainerError::Unkillable { id: id.clone() });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// When the container's init exits, SIGKILLs whatever is left in its cgroup, as
/// containerd's runc shim does for a container without a PID namespace of its own (here:
/// one in the pod's, which is the VM's). Left alive, a daemonized child would keep the
/// container's output open, and the host waiting for that output to end. With a PID
/// namespace of its own the kernel has already killed the rest, and this finds nothing.
pub(super) async fn kill_leftovers_on_exit(id: String, init: Arc<Process>, cgroup: Cgroup) {
    init.wait().await;
    // A leftover forking meanwhile may escape one pass; a few passes catch it.
    for _ in 0..LEFTOVER_KILL_PASSES {
        match cgroup.pids() {
            Ok(pids) if pids.is_empty() => return,
            Ok(_) => {}
            // The container is being removed: its teardown kills what is left.
            Err(_) => return,
        }
        if let Err(error) = cgroup.signal_all(Signal::SIGKILL) {
            tracing::warn!(container = %id, %error, "cannot kill what the container's init left");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Passes of [`kill_leftovers_on_exit`] before it leaves the rest to the teardown.
const LEFTOVER_KILL_PASSES: usize = 50;

/// Once an exec has exited, remembers it among the last [`EXITED_EXECS_KEPT`] and forgets
/// older ones.
pub(super) async fn forget_exec_later(
    container: Arc<Container>,
    exec_id: String,
    process: Arc<Process>,
) {
    process.wait().await;
    let mut exited = container
        .exited_execs
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    exited.push_back(exec_id);
    while exited.len() > EXITED_EXECS_KEPT {
        if let Some(old) = exited.pop_front() {
            container
                .execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&old);
        }
    }
}

/// Reports each new OOM kill in the container's memory cgroup. Woken by inotify on
/// `memory.events`; polls only where that cannot be watched (an idle pod should not wake
/// its guest: under emulation each wake-up costs host CPU).
///
/// The watch and the count it starts from are taken before this returns, so a kill that
/// comes right after the container's create is counted even when the returned task first
/// runs later (a busy guest can start the container before then).
pub(super) fn watch_oom(
    id: String,
    cgroup: Cgroup,
    events: mpsc::Sender<String>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let changes = match cgroup.watch_memory_events() {
        Ok(changes) => Some(changes),
        Err(err) => {
            tracing::warn!(container = %id, error = %err, "cannot watch memory.events; polling it for OOM kills");
            None
        }
    };
    let seen = cgroup.oom_kills().unwrap_or(0);
    report_oom_kills(id, cgroup, events, changes, seen)
}

async fn report_oom_kills(
    id: String,
    cgroup: Cgroup,
    events: mpsc::Sender<String>,
    changes: Option<FileChanges>,
    mut seen: u64,
) {
    loop {
        match &changes {
            Some(changes) => {
                if let Err(err) = changes.changed().await {
                    tracing::warn!(container = %id, error = %err, "lost the watch on memory.events; no more OOM events for this container");
                    return;
                }
            }
            None => tokio::time::sleep(OOM_POLL).await,
        }
        let Ok(now) = cgroup.oom_kills() else {
            continue;
        };
        if now > seen {
            tracing::info!(container = %id, oom_kills = now, "container hit its memory limit");
            for _ in seen..now {
                if events.try_send(id.clone()).is_err() {
                    tracing::warn!(container = %id, "OOM event queue full; dropping an event");
                }
            }
            seen = now;
        }
    }
}

/// Removes the agent's files in a container directory (the bundle's config, the files
/// copied from the host under `files/`), then the directory (never recursively: a mount
/// that failed to come off must not lose its contents).
pub(super) fn remove_container_dir(dir: &Path) {
    for own in [dir.join("bundle"), dir.join("files")] {
        remove_plain_files(&own);
        let _ = std::fs::remove_dir(&own);
    }
    remove_plain_files(dir);
    if let Err(err) = std::fs::remove_dir(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %err, "container directory left behind");
        }
    }
}

/// Removes the entries of `dir` that are not directories.
fn remove_plain_files(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| !t.is_dir()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::remove_container_dir;

    #[test]
    fn a_container_directory_goes_with_its_bundle_and_copied_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("c1");
        std::fs::create_dir_all(dir.join("bundle")).unwrap();
        std::fs::create_dir_all(dir.join("files")).unwrap();
        std::fs::write(dir.join("bundle/config.json"), "{}").unwrap();
        for (i, content) in ["127.0.0.1 localhost", "nameserver 10.0.0.10", "pod"]
            .iter()
            .enumerate()
        {
            std::fs::write(dir.join(format!("files/{i}")), content).unwrap();
        }
        std::fs::write(dir.join("pid"), "7").unwrap();
        remove_container_dir(&dir);
        assert!(!dir.exists());
    }

    #[test]
    fn a_directory_that_still_holds_something_else_is_kept_with_its_contents() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("c1");
        // What a mount that did not come off would show: content under a subdirectory.
        std::fs::create_dir_all(dir.join("rootfs/etc")).unwrap();
        std::fs::write(dir.join("rootfs/etc/keep"), "data").unwrap();
        std::fs::create_dir_all(dir.join("files")).unwrap();
        std::fs::write(dir.join("files/0"), "hosts").unwrap();
        remove_container_dir(&dir);
        assert_eq!(
            std::fs::read_to_string(dir.join("rootfs/etc/keep")).unwrap(),
            "data"
        );
        assert!(!dir.join("files").exists());
    }
}
