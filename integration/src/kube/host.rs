//! What a kubelet changes on the host outside its own directories, recorded before it starts
//! and undone at teardown (even after a failed test): the sysctls it always sets, the fixed
//! paths it writes, the cgroups of its cgroup root, and mounts under its root dir. Also the
//! machine-wide lock: one kubelet per machine at a time.
//!
//! The record is also written into the cluster's dir, so a cluster whose test process was
//! killed is cleaned up by the next one ([`clean_stale_clusters`]): its processes killed,
//! its mounts and cgroups removed, the sysctls it found put back.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use anyhow::{bail, Context, Result};

use crate::system;

/// Sysctls the kubelet sets unconditionally at start.
const KUBELET_SYSCTLS: &[&str] = &[
    "/proc/sys/vm/overcommit_memory",
    "/proc/sys/kernel/panic",
    "/proc/sys/kernel/panic_on_oops",
];
/// Paths the kubelet writes whatever its root dir.
const KUBELET_FIXED_PATHS: &[&str] = &[
    "/var/lib/kubelet/device-plugins",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
];
const LOCK_PATH: &str = "/run/spry-test-kubelet.lock";

/// The machine-wide kubelet lock, held while a cluster exists.
pub struct KubeletLock {
    _flock: Flock<File>,
}

impl KubeletLock {
    pub fn take() -> Result<Self> {
        let lock = File::create(LOCK_PATH).with_context(|| format!("creating {LOCK_PATH}"))?;
        match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => Ok(Self { _flock: flock }),
            Err(_) => bail!("another test cluster's kubelet runs on this machine ({LOCK_PATH} is locked); one kubelet per machine at a time"),
        }
    }
}

/// The file in a cluster's dir that holds its [`HostChanges`].
const RECORD_FILE: &str = "host-changes.json";

/// The host as it was before the cluster, and how to put it back.
#[derive(Serialize, Deserialize)]
pub struct HostChanges {
    sysctls: Vec<(PathBuf, String)>,
    /// Fixed paths that did not exist before (removed at teardown).
    created: Vec<PathBuf>,
    /// `<hierarchy>/<cgroup root>` dirs we made for the kubelet.
    cgroup_roots: Vec<PathBuf>,
    /// The kubelet's root dir: everything mounted under it goes at teardown.
    kubelet_root: PathBuf,
}

impl HostChanges {
    /// Records the host's state (under the lock) into `cluster_dir`, and makes the
    /// kubelet's cgroup root.
    pub fn record(_lock: &KubeletLock, cluster_dir: &Path, cgroup_root: &str) -> Result<Self> {
        let mut sysctls = Vec::new();
        for path in KUBELET_SYSCTLS {
            let value = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
            sysctls.push((PathBuf::from(path), value.trim().to_string()));
        }
        let created = KUBELET_FIXED_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
        let mut changes = Self {
            sysctls,
            created,
            cgroup_roots: Vec::new(),
            kubelet_root: cluster_dir.join("kubelet"),
        };
        // Written before the first change, and again once the cgroups exist.
        changes.save(cluster_dir)?;
        changes.cgroup_roots = make_cgroup_roots(cgroup_root)?;
        changes.save(cluster_dir)?;
        Ok(changes)
    }

    fn save(&self, cluster_dir: &Path) -> Result<()> {
        let path = cluster_dir.join(RECORD_FILE);
        std::fs::write(&path, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Puts everything back; each step runs even when an earlier one failed.
    pub fn restore(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        match system::unmount_under(&self.kubelet_root) {
            Ok(_) => {}
            Err(e) => problems.push(format!("unmounting under the kubelet root: {e:#}")),
        }
        for (path, value) in &self.sysctls {
            if let Err(e) = std::fs::write(path, value) {
                problems.push(format!("restoring {}={value}: {e}", path.display()));
            }
        }
        for path in &self.created {
            if let Err(e) = remove_tree(path) {
                problems.push(format!("removing {}: {e}", path.display()));
            }
        }
        for root in self.cgroup_roots.drain(..) {
            if let Err(e) = remove_cgroup_tree(&root) {
                problems.push(format!("removing cgroup {}: {e}", root.display()));
            }
        }
        problems
    }
}

/// Cleans up after clusters whose test process died: every dir under `parent` holding a
/// host-changes record is one (the caller holds the lock, so no live cluster exists). Their processes are killed,
/// their host changes undone, their dirs removed; returns what was cleaned.
pub fn clean_stale_clusters(_lock: &KubeletLock, parent: &Path) -> Result<Vec<PathBuf>> {
    let mut cleaned = Vec::new();
    for dir in system::list_dir(parent) {
        if !dir.join(RECORD_FILE).is_file() {
            continue;
        }
        let needle = dir.to_string_lossy().into_owned();
        for p in system::processes()? {
            // The components name the dir in their flags; containerd and its shims too.
            if p.cmdline_contains(&needle) && p.pid != std::process::id() as i32 {
                system::terminate_pid(p.pid, std::time::Duration::from_secs(5));
            }
        }
        let record = std::fs::read(dir.join(RECORD_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<HostChanges>(&bytes).ok());
        let mut problems = match record {
            Some(mut changes) => changes.restore(),
            None => Vec::new(),
        };
        if let Err(e) = system::unmount_under(&dir) {
            problems.push(format!("{e:#}"));
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
        if !problems.is_empty() {
            bail!(
                "cleaning the stale test cluster {}: {}",
                dir.display(),
                problems.join("; ")
            );
        }
        cleaned.push(dir);
    }
    Ok(cleaned)
}

/// The kubelet insists its cgroup root exists in every hierarchy (cgroup v1) or in the
/// unified one (v2) before it starts.
fn make_cgroup_roots(cgroup_root: &str) -> Result<Vec<PathBuf>> {
    let base = Path::new("/sys/fs/cgroup");
    let unified = base.join("cgroup.controllers").exists();
    let hierarchies: Vec<PathBuf> = if unified {
        vec![base.to_path_buf()]
    } else {
        system::list_dir(base)
            .into_iter()
            .filter(|p| p.is_dir() && !p.is_symlink())
            .collect()
    };
    let mut made = Vec::new();
    for hierarchy in hierarchies {
        let dir = hierarchy.join(cgroup_root.trim_start_matches('/'));
        if !dir.exists() {
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            made.push(dir);
        }
    }
    Ok(made)
}

/// cgroup dirs go leaves first, with rmdir (their files cannot be unlinked).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for child in system::list_dir(dir) {
        if child.is_dir() {
            remove_cgroup_tree(&child)?;
        }
    }
    std::fs::remove_dir(dir)
}

fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
