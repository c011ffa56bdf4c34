//! A container's cgroup v2 directory: statistics, limits, member processes and OOM kills.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libcgroups::common::{CgroupManager, ControllerOpt};
use libcgroups::v2::manager::Manager;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use tokio::io::unix::AsyncFd;

/// Errors of reading or changing a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("failed to read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds an unexpected value {value:?}")]
    Parse { path: PathBuf, value: String },
    #[error("failed to apply resource limits to {path}")]
    Apply {
        path: PathBuf,
        source: libcgroups::v2::manager::V2ManagerError,
    },
    #[error("failed to signal process {pid}")]
    Signal { pid: i32, source: nix::Error },
    #[error("failed to watch {path} for changes")]
    Watch { path: PathBuf, source: io::Error },
}

/// Resource usage of a cgroup; values of controllers that are not enabled read as 0.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_nanos: u64,
    pub cpu_user_nanos: u64,
    pub cpu_system_nanos: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub memory_working_set_bytes: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub oom_kills: u64,
    pub memory_anon_bytes: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
}

/// One container's cgroup directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    root: PathBuf,
    relative: PathBuf,
}

impl Cgroup {
    /// `relative` is the spec's cgroupsPath, absolute inside the hierarchy at `root`.
    pub fn new(root: &Path, relative: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            relative: relative.strip_prefix("/").unwrap_or(relative).to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.root.join(&self.relative)
    }

    /// Reads a file; a missing file (controller not enabled) reads as `None`.
    fn read_optional(&self, name: &str) -> Result<Option<String>, CgroupError> {
        let path = self.path().join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    fn single_value(&self, name: &str) -> Result<u64, CgroupError> {
        match self.read_optional(name)? {
            None => Ok(0),
            Some(text) => parse_limit(&text).ok_or_else(|| CgroupError::Parse {
                path: self.path().join(name),
                value: text.trim().to_string(),
            }),
        }
    }

    fn keyed_value(&self, name: &str, key: &str) -> Result<u64, CgroupError> {
        Ok(self
            .read_optional(name)?
            .and_then(|text| flat_keyed(&text, key))
            .unwrap_or(0))
    }

    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let cpu = self.read_optional("cpu.stat")?.unwrap_or_default();
        let usec = |key| flat_keyed(&cpu, key).unwrap_or(0).saturating_mul(1000);
        let memory_usage_bytes = self.single_value("memory.current")?;
        let memory_stat = self.read_optional("memory.stat")?.unwrap_or_default();
        let memory = |key| flat_keyed(&memory_stat, key).unwrap_or(0);
        let inactive_file = memory("inactive_file");
        Ok(CgroupStats {
            cpu_usage_nanos: usec("usage_usec"),
            cpu_user_nanos: usec("user_usec"),
            cpu_system_nanos: usec("system_usec"),
            memory_usage_bytes,
            memory_limit_bytes: self.single_value("memory.max")?,
            memory_working_set_bytes: memory_usage_bytes.saturating_sub(inactive_file),
            pids_current: self.single_value("pids.current")?,
            pids_limit: self.single_value("pids.max")?,
            oom_kills: self.oom_kills()?,
            memory_anon_bytes: memory("anon"),
            page_faults: memory("pgfault"),
            major_page_faults: memory("pgmajfault"),
        })
    }

    /// The OOM kill counter of `memory.events`.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        self.keyed_value("memory.events", "oom_kill")
    }

    /// Wakes on each change of `memory.events` (the kernel notifies inotify watchers of
    /// it), so OOM kills are seen without polling.
    pub fn watch_memory_events(&self) -> Result<FileChanges, CgroupError> {
        FileChanges::watch(&self.path().join("memory.events"))
    }

    /// Every pid in the cgroup and its descendants.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        collect_pids(&self.path(), &mut pids)?;
        pids.sort_unstable();
        Ok(pids)
    }

    /// Sends `signal` to every process in the cgroup.
    pub fn signal_all(&self, signal: Signal) -> Result<(), CgroupError> {
        for pid in self.pids()? {
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(source) => return Err(CgroupError::Signal { pid, source }),
            }
        }
        Ok(())
    }

    /// Applies new limits (OCI LinuxResources).
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let apply_err = |source| CgroupError::Apply {
            path: self.path(),
            source,
        };
        let manager = Manager::new(self.root.clone(), self.relative.clone()).map_err(apply_err)?;
        manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(apply_err)
    }

    pub fn exists(&self) -> bool {
        self.path().join("cgroup.procs").exists()
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = match std::fs::read_to_string(&procs) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: procs,
                source,
            })
        }
    };
    pids.extend(
        text.lines()
            .filter_map(|line| line.trim().parse::<i32>().ok()),
    );
    let entries = std::fs::read_dir(dir).map_err(|source| CgroupError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

/// Parses a single-value cgroup file; "max" (no limit) reads as 0.
pub fn parse_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(0),
        value => value.parse().ok(),
    }
}

/// Looks `key` up in a flat-keyed file (`key value` per line).
pub fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next()? == key).then(|| parts.next()?.parse().ok())?
    })
}

/// Modifications of one file, from inotify, for tokio.
pub struct FileChanges {
    inotify: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl FileChanges {
    fn watch(path: &Path) -> Result<Self, CgroupError> {
        let watch_err = |source: io::Error| CgroupError::Watch {
            path: path.to_path_buf(),
            source,
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| watch_err(e.into()))?;
        inotify
            .add_watch(path, AddWatchFlags::IN_MODIFY)
            .map_err(|e| watch_err(e.into()))?;
        // The duplicate keeps the inotify instance (and its watch) alive once `inotify` drops.
        let fd = inotify.as_fd().try_clone_to_owned().map_err(watch_err)?;
        Ok(Self {
            inotify: crate::sys::register_async_fd(fd).map_err(watch_err)?,
            path: path.to_path_buf(),
        })
    }

    /// Returns after the file changed at least once since the last call.
    pub async fn changed(&self) -> Result<(), CgroupError> {
        let watch_err = |source: io::Error| CgroupError::Watch {
            path: self.path.clone(),
            source,
        };
        // Room for many events; their contents do not matter, only that some arrived.
        let mut events = [0u8; 4096];
        loop {
            let mut ready = self.inotify.readable().await.map_err(watch_err)?;
            match ready.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), &mut events).map_err(io::Error::from)
            }) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(err)) => return Err(watch_err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_flat_keyed_files() {
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n";
        assert_eq!(flat_keyed(cpu, "usage_usec"), Some(1500));
        assert_eq!(flat_keyed(cpu, "system_usec"), Some(500));
        assert_eq!(flat_keyed(cpu, "usage"), None);
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(flat_keyed(events, "oom_kill"), Some(1));
        assert_eq!(flat_keyed(events, "oom"), Some(2));
    }

    #[test]
    fn max_means_unlimited() {
        assert_eq!(parse_limit("max\n"), Some(0));
        assert_eq!(parse_limit("1048576\n"), Some(1_048_576));
        assert_eq!(parse_limit("lots"), None);
    }

    #[test]
    fn stats_come_from_the_cgroup_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spry/c1");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write("cpu.stat", "usage_usec 7\nuser_usec 5\nsystem_usec 2\n");
        write("memory.current", "10000\n");
        write("memory.max", "max\n");
        write(
            "memory.stat",
            "anon 100\ninactive_file 2500\nactive_file 3\npgfault 40\npgmajfault 2\n",
        );
        write("pids.current", "3\n");
        write("pids.max", "64\n");
        write("memory.events", "oom 1\noom_kill 1\n");
        write("cgroup.procs", "12\n7\n");
        let cgroup = Cgroup::new(root.path(), Path::new("/spry/c1"));
        assert_eq!(
            cgroup.stats().unwrap(),
            CgroupStats {
                cpu_usage_nanos: 7000,
                cpu_user_nanos: 5000,
                cpu_system_nanos: 2000,
                memory_usage_bytes: 10000,
                memory_limit_bytes: 0,
                memory_working_set_bytes: 7500,
                pids_current: 3,
                pids_limit: 64,
                oom_kills: 1,
                memory_anon_bytes: 100,
                page_faults: 40,
                major_page_faults: 2,
            }
        );
        assert_eq!(cgroup.pids().unwrap(), vec![7, 12]);
    }

    #[test]
    fn a_garbled_value_names_the_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("c");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.current"), "lots\n").unwrap();
        let err = Cgroup::new(root.path(), Path::new("c"))
            .stats()
            .unwrap_err();
        assert!(
            matches!(err, CgroupError::Parse { ref path, .. } if path.ends_with("memory.current"))
        );
    }

    #[tokio::test]
    async fn file_changes_wake_on_each_modification() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.events");
        std::fs::write(&path, "oom_kill 0\n").unwrap();
        let changes = FileChanges::watch(&path).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        assert!(quiet.is_err(), "woke without a change");
        for round in 1..=2 {
            std::fs::write(&path, format!("oom_kill {round}\n")).unwrap();
            tokio::time::timeout(Duration::from_secs(5), changes.changed())
                .await
                .expect("no wake-up after a change")
                .unwrap();
        }
        let missing = FileChanges::watch(&dir.path().join("absent"));
        assert!(matches!(missing, Err(CgroupError::Watch { .. })));
    }
}
