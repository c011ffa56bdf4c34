//! Before/after comparison of what a test may leave behind: VM and shim processes, mounts, network
//! namespaces, tap devices and entries in state directories.
//!
//! A [`LeakScope`] narrows processes and mounts to one test's (its containerd's marker env var and
//! directories), so that other tests running on the same machine don't show up as leaks. Named netns and
//! tap devices have no owner to scope by; they are compared host-wide.

use crate::system::{self, MountInfo, ProcessInfo};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Processes whose leaking matters. `containerd` itself is excluded on purpose: the harness owns it.
const WATCHED_PROCESS_PREFIXES: &[&str] = &["qemu-system", "containerd-shim", "virtiofsd", "spry"];
/// Mount types checked host-wide when the check has no scope.
const WATCHED_FS_TYPES: &[&str] = &["overlay", "fuse", "erofs", "virtiofs"];

#[derive(Debug, Clone, Default)]
pub struct LeakScope {
    /// Processes carrying this exact `KEY=VALUE` in their environment are ours.
    pub marker: Option<String>,
    /// Processes mentioning these paths in their argv, and mounts under them, are ours.
    pub paths: Vec<PathBuf>,
    /// A containerd's log: the cgroups of the sandboxes it started are ours.
    pub sandboxes_of: Option<PathBuf>,
}

impl LeakScope {
    /// No scope: every new watched process / mount on the host counts.
    pub fn host_wide() -> Self {
        LeakScope::default()
    }

    pub fn marker(mut self, marker: &str) -> Self {
        self.marker = Some(marker.to_string());
        self
    }

    pub fn path(mut self, path: &Path) -> Self {
        self.paths.push(path.to_path_buf());
        self
    }

    /// Also count the cgroups (containerd's default `k8s.io/<sandbox id>`) of the
    /// sandboxes the containerd logging to `log` starts.
    pub fn sandbox_cgroups_of(mut self, log: &Path) -> Self {
        self.sandboxes_of = Some(log.to_path_buf());
        self
    }

    fn is_scoped(&self) -> bool {
        self.marker.is_some() || !self.paths.is_empty()
    }

    fn owns_process(&self, p: &ProcessInfo) -> bool {
        if !self.is_scoped() {
            return true;
        }
        self.marker
            .as_deref()
            .is_some_and(|m| p.environ_contains(m))
            || self
                .paths
                .iter()
                .any(|dir| p.cmdline_contains(&dir.to_string_lossy()))
    }

    fn owns_mount(&self, m: &MountInfo) -> bool {
        if !self.is_scoped() {
            return WATCHED_FS_TYPES.iter().any(|t| m.fs_type.starts_with(t))
                || m.mount_point.to_string_lossy().contains("spry");
        }
        self.paths.iter().any(|dir| m.mount_point.starts_with(dir))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Snapshot {
    /// pid → description (pid and argv; a reused pid with a new argv counts as new).
    processes: BTreeMap<i32, String>,
    mounts: BTreeSet<String>,
    netns: BTreeSet<PathBuf>,
    taps: BTreeSet<String>,
    dir_entries: BTreeSet<PathBuf>,
    cgroups: BTreeSet<PathBuf>,
}

pub struct LeakCheck {
    scope: LeakScope,
    watched_dirs: Vec<(PathBuf, usize)>,
    settle: Duration,
    before: Snapshot,
}

impl LeakCheck {
    /// Records the current state. Take it before the test creates anything.
    pub fn capture(scope: LeakScope) -> Result<Self> {
        let mut check = LeakCheck {
            scope,
            watched_dirs: Vec::new(),
            settle: Duration::from_secs(15),
            before: Snapshot::default(),
        };
        check.before = check.snapshot()?;
        Ok(check)
    }

    /// Also compare the entries of `dir` down to `depth` levels (e.g. the shim's state root). Re-captures.
    pub fn watch_dir(mut self, dir: &Path, depth: usize) -> Result<Self> {
        self.watched_dirs.push((dir.to_path_buf(), depth));
        self.before = self.snapshot()?;
        Ok(self)
    }

    /// How long `assert_clean` waits for asynchronous teardown to finish (default 15 s).
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let processes = system::processes()?
            .into_iter()
            .filter(|p| {
                WATCHED_PROCESS_PREFIXES
                    .iter()
                    .any(|prefix| p.name().starts_with(prefix))
            })
            .filter(|p| self.scope.owns_process(p))
            .map(|p| (p.pid, p.describe()))
            .collect();
        let mounts = system::mounts()?
            .iter()
            .filter(|m| self.scope.owns_mount(m))
            .map(MountInfo::describe)
            .collect();
        let dir_entries = self
            .watched_dirs
            .iter()
            .flat_map(|(dir, depth)| system::list_tree(dir, *depth))
            .collect();
        Ok(Snapshot {
            processes,
            mounts,
            netns: system::named_netns().into_iter().collect(),
            taps: system::tap_devices().into_iter().collect(),
            dir_entries,
            cgroups: self
                .scope
                .sandboxes_of
                .as_deref()
                .map(system::sandbox_cgroups)
                .unwrap_or_default()
                .into_iter()
                .collect(),
        })
    }

    /// What exists now that did not before, one line per leak.
    /// How many leaks there are now, each printed to stderr (benchmarks record the count
    /// as a check).
    pub fn count_printed(&self) -> Result<usize> {
        Ok(print_leaks(&self.leaks()?))
    }

    pub fn leaks(&self) -> Result<Vec<String>> {
        let now = self.snapshot()?;
        let before = &self.before;
        let mut leaks = Vec::new();
        leaks.extend(
            now.processes
                .iter()
                .filter(|(pid, desc)| before.processes.get(pid) != Some(desc))
                .map(|(_, desc)| format!("process {desc}")),
        );
        leaks.extend(
            now.mounts
                .difference(&before.mounts)
                .map(|m| format!("mount {m}")),
        );
        leaks.extend(
            now.netns
                .difference(&before.netns)
                .map(|n| format!("netns {}", n.display())),
        );
        leaks.extend(
            now.taps
                .difference(&before.taps)
                .map(|t| format!("tap device {t}")),
        );
        leaks.extend(
            now.dir_entries
                .difference(&before.dir_entries)
                .map(|p| format!("state entry {}", p.display())),
        );
        leaks.extend(
            now.cgroups
                .difference(&before.cgroups)
                .map(|c| format!("cgroup {}", c.display())),
        );
        Ok(leaks)
    }

    /// What is left once the settle time has passed or the host is back to the captured
    /// state, whichever comes first (teardown that finishes asynchronously is not a leak).
    fn settled_leaks(&self) -> Result<Vec<String>> {
        let mut last = Vec::new();
        system::wait_for(self.settle, || {
            last = self.leaks()?;
            Ok(last.is_empty().then_some(()))
        })?;
        Ok(last)
    }

    /// As [`LeakCheck::count_printed`], after waiting up to the settle time for what is
    /// still being torn down (a drained warm pool's VMs).
    pub fn settled_count_printed(&self) -> Result<usize> {
        Ok(print_leaks(&self.settled_leaks()?))
    }

    /// Waits up to the settle time for the host to be back to the captured state; fails listing each leak.
    pub fn assert_clean(&self) -> Result<()> {
        let last = self.settled_leaks()?;
        if !last.is_empty() {
            bail!(
                "leaked after the test ({} item(s), waited {:?}):\n  {}",
                last.len(),
                self.settle,
                last.join("\n  ")
            );
        }
        Ok(())
    }
}

/// Prints each leak to stderr; how many there are.
fn print_leaks(leaks: &[String]) -> usize {
    for leak in leaks {
        eprintln!("leak: {leak}");
    }
    leaks.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn reports_new_state_dir_entries_and_clears_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let check = LeakCheck::capture(LeakScope::host_wide().path(dir.path()))
            .unwrap()
            .watch_dir(dir.path(), 2)
            .unwrap()
            .settle(Duration::from_millis(200));
        check.assert_clean().unwrap();
        fs::create_dir(dir.path().join("sandbox-1")).unwrap();
        let err = check.assert_clean().unwrap_err().to_string();
        assert!(
            err.contains("state entry") && err.contains("sandbox-1"),
            "{err}"
        );
        fs::remove_dir(dir.path().join("sandbox-1")).unwrap();
        check.assert_clean().unwrap();
    }

    #[test]
    fn scoped_process_matching_uses_argv_paths() {
        let scope = LeakScope::host_wide().path(Path::new("/run/spry-it/t1"));
        let ours = ProcessInfo {
            pid: 1,
            cmdline: vec![
                "qemu-system-x86_64".into(),
                "-chardev".into(),
                "socket,path=/run/spry-it/t1/x".into(),
            ],
        };
        let theirs = ProcessInfo {
            pid: 2,
            cmdline: vec!["qemu-system-x86_64".into(), "/run/spry-it/t2/x".into()],
        };
        assert!(scope.owns_process(&ours));
        assert!(!scope.owns_process(&theirs));
        assert!(LeakScope::host_wide().owns_process(&theirs));
    }
}
