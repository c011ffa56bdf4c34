//! Synced volumes, the host side: kubelet's atomic-writer volumes (configMap, secret,
//! projected, downwardAPI; a directory with a `..data` symlink) are copied into the guest
//! rather than shared, and every swap kubelet makes on the host is replayed there
//! (agent/src/volumes/synced.rs). So the guest's readers see one atomic change, as under
//! runc, and inotify watchers in the guest fire, which no shared file system gives for
//! changes made on the host.
//!
//! The watch is inotify on the volume directory: kubelet's last step of an update is the
//! rename of `..data_tmp` over `..data` (IN_MOVED_TO). Each update sends the whole new
//! version (API objects are at most 1 MiB; bigger volumes stay on the file share).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use spry_proto::agent::{snapshot_entry, SnapshotEntry, VolumeSnapshot};
use tokio::sync::Mutex;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::VolumeError;
use crate::agent_client::AgentClient;
use crate::sandbox::{PodResource, ResourceError};
use crate::vm::Vm;

/// Volumes with more payload than this stay on the file share (a copy per version would
/// be too much to send at every update).
pub const MAX_SYNCED_BYTES: u64 = 4 << 20;
const DATA: &str = "..data";

/// A kubelet atomic-writer volume with its payload no bigger than [`MAX_SYNCED_BYTES`].
pub fn is_synced_source(dir: &Path) -> bool {
    let Ok(version) = std::fs::read_link(dir.join(DATA)) else {
        return false;
    };
    payload_bytes(&dir.join(version)).is_some_and(|b| b <= MAX_SYNCED_BYTES)
}

fn payload_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let meta = entry.metadata().ok()?;
        total += if meta.is_dir() {
            payload_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Some(total)
}

/// The current version of the volume at `dir`, as the agent applies it.
pub fn snapshot(dir: &Path, id: &str) -> Result<VolumeSnapshot, VolumeError> {
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VolumeError::Snapshot { path, source }
    };
    let version = std::fs::read_link(dir.join(DATA)).map_err(read(&dir.join(DATA)))?;
    let mut entries = Vec::new();
    let mut budget = MAX_SYNCED_BYTES;
    collect(
        &dir.join(&version),
        Path::new(""),
        &mut entries,
        &mut budget,
    )?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read(dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") {
            names.push(name);
        }
    }
    names.sort();
    Ok(VolumeSnapshot {
        id: id.to_string(),
        version: version.to_string_lossy().into_owned(),
        entries,
        names,
        ..Default::default()
    })
}

fn collect(
    dir: &Path,
    relative: &Path,
    out: &mut Vec<SnapshotEntry>,
    budget: &mut u64,
) -> Result<(), VolumeError> {
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VolumeError::Snapshot { path, source }
    };
    let mut children: Vec<_> = std::fs::read_dir(dir)
        .map_err(read(dir))?
        .flatten()
        .collect();
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let path = child.path();
        let name = relative.join(child.file_name());
        let meta = std::fs::symlink_metadata(&path).map_err(read(&path))?;
        let kind = if meta.is_dir() {
            snapshot_entry::Kind::Dir(true)
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(read(&path))?;
            snapshot_entry::Kind::Symlink(target.to_string_lossy().into_owned())
        } else {
            *budget = budget
                .checked_sub(meta.len())
                .ok_or_else(|| VolumeError::TooBig {
                    path: dir.to_path_buf(),
                })?;
            snapshot_entry::Kind::Content(std::fs::read(&path).map_err(read(&path))?)
        };
        out.push(SnapshotEntry {
            path: name.to_string_lossy().into_owned(),
            mode: meta.permissions().mode() & 0o7777,
            kind: Some(kind),
            ..Default::default()
        });
        if meta.is_dir() {
            collect(&path, &name, out, budget)?;
        }
    }
    Ok(())
}

/// The watches of a pod's synced volumes, by container.
#[derive(Default)]
pub struct VolumeWatches {
    watches: Mutex<HashMap<String, Vec<AbortHandle>>>,
}

impl VolumeWatches {
    /// Watches `volumes` ((id, host dir, version the guest has)) of a container.
    pub async fn watch(
        &self,
        container_id: &str,
        volumes: Vec<(String, PathBuf, String)>,
        agent: AgentClient,
    ) {
        let handles = volumes
            .into_iter()
            .map(|(id, dir, version)| {
                tokio::spawn(keep_in_sync(id, dir, version, agent.clone())).abort_handle()
            })
            .collect();
        if let Some(old) = self
            .watches
            .lock()
            .await
            .insert(container_id.to_string(), handles)
        {
            old.iter().for_each(AbortHandle::abort);
        }
    }

    pub async fn stop(&self, container_id: &str) {
        if let Some(handles) = self.watches.lock().await.remove(container_id) {
            handles.iter().for_each(AbortHandle::abort);
        }
    }
}

#[async_trait]
impl PodResource for VolumeWatches {
    fn name(&self) -> &'static str {
        "synced volume watches"
    }

    async fn setup(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        Ok(())
    }

    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        for (_, handles) in self.watches.lock().await.drain() {
            handles.iter().for_each(AbortHandle::abort);
        }
        Ok(())
    }
}

/// Replays every new version of the volume at `dir` into the guest, until the volume
/// goes away or the task is aborted.
async fn keep_in_sync(id: String, dir: PathBuf, mut version: String, agent: AgentClient) {
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).and_then(|i| {
        i.add_watch(
            &dir,
            AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF,
        )
        .map(|_| i)
    });
    let inotify = match watch
        .map_err(std::io::Error::from)
        .and_then(crate::sys::register_inotify)
    {
        Ok(fd) => fd,
        Err(e) => {
            warn!(volume = %id, dir = %dir.display(), error = %e, "cannot watch a synced volume; it will not update in the guest");
            return;
        }
    };
    // A swap between the snapshot the container was created with and this watch.
    sync_if_new(&id, &dir, &mut version, &agent).await;
    loop {
        let Ok(mut ready) = inotify.readable().await else {
            return;
        };
        let events = match ready.get_inner().inotify().read_events() {
            Ok(events) => events,
            Err(nix::Error::EAGAIN) => {
                ready.clear_ready();
                continue;
            }
            Err(e) => {
                warn!(volume = %id, error = %e, "reading inotify events failed");
                return;
            }
        };
        if events.iter().any(|e| {
            e.mask
                .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF)
        }) {
            return;
        }
        if events
            .iter()
            .any(|e| e.name.as_deref() == Some(DATA.as_ref()))
        {
            sync_if_new(&id, &dir, &mut version, &agent).await;
        }
    }
}

async fn sync_if_new(id: &str, dir: &Path, version: &mut String, agent: &AgentClient) {
    let snapshot = match snapshot(dir, id) {
        Ok(snapshot) if snapshot.version != *version => snapshot,
        Ok(_) => return,
        Err(e) => {
            // kubelet removes the old payload right after the swap; a later event brings
            // the next consistent version.
            debug!(volume = %id, error = %e, "synced volume changed while being read");
            return;
        }
    };
    let new_version = snapshot.version.clone();
    match agent.sync_volume(snapshot).await {
        Ok(()) => {
            debug!(volume = %id, version = %new_version, "synced volume updated in the guest");
            *version = new_version;
        }
        Err(e) => {
            warn!(volume = %id, error = %crate::error_chain(&e), "cannot update a synced volume in the guest")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn kubelet_volume(dir: &Path, version: &str, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir.join(version)).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(version).join(name), content).unwrap();
            let link = dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{name}"), link).unwrap();
            }
        }
        symlink(version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    }

    #[test]
    fn a_kubelet_volume_is_recognised_and_snapshotted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_synced_source(dir.path()));
        kubelet_volume(
            dir.path(),
            "..2026_11_30_01",
            &[("key", "value"), ("other", "x")],
        );
        assert!(is_synced_source(dir.path()));
        let snapshot = snapshot(dir.path(), "c1/s0").unwrap();
        assert_eq!(snapshot.version, "..2026_11_30_01");
        assert_eq!(snapshot.names, ["key", "other"]);
        let paths: Vec<_> = snapshot.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["key", "other"]);
        assert_eq!(
            snapshot.entries[0].kind,
            Some(snapshot_entry::Kind::Content(b"value".to_vec()))
        );
    }

    #[test]
    fn a_volume_over_the_limit_stays_on_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(MAX_SYNCED_BYTES as usize + 1);
        kubelet_volume(dir.path(), "..v1", &[("big", &big)]);
        assert!(!is_synced_source(dir.path()));
        let err = snapshot(dir.path(), "c1/s0").unwrap_err();
        assert!(matches!(err, VolumeError::TooBig { .. }), "{err}");
    }
}
