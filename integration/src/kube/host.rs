//! What a kubelet changes on the host outside its own directories, recorded before it starts
//! and undone at teardown (even after a failed test): the sysctls it always sets, the fixed
//! paths it writes, the cgroups of its cgroup root, and mounts under its root dir. Also the
//! machine-wide lock: one kubelet per machine at a time.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

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

/// The host as it was before the cluster, and how to put it back.
pub struct HostChanges {
    _lock: Flock<File>,
    sysctls: Vec<(PathBuf, String)>,
    /// Fixed paths that did not exist before (removed at teardown).
    created: Vec<PathBuf>,
    /// `<hierarchy>/<cgroup root>` dirs we made for the kubelet.
    cgroup_roots: Vec<PathBuf>,
    /// The kubelet's root dir: everything mounted under it goes at teardown.
    kubelet_root: PathBuf,
}

impl HostChanges {
    /// Takes the machine-wide kubelet lock and records the host's state.
    pub fn record(kubelet_root: &Path, cgroup_root: &str) -> Result<Self> {
        let lock = File::create(LOCK_PATH).with_context(|| format!("creating {LOCK_PATH}"))?;
        let Ok(lock) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
            bail!("another test cluster's kubelet runs on this machine ({LOCK_PATH} is locked); one kubelet per machine at a time");
        };
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
        let cgroup_roots = make_cgroup_roots(cgroup_root)?;
        Ok(Self {
            _lock: lock,
            sysctls,
            created,
            cgroup_roots,
            kubelet_root: kubelet_root.to_path_buf(),
        })
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
