//! Where spares run: a cgroup of their own, `spry-pool` under each hierarchy's root, at
//! the lowest CPU weight (cgroup v2 `cpu.weight` 1, v1 `cpu.shares` 2). A spare enters it
//! before restoring its VM, so QEMU starts there too: idle spares and their refills yield
//! the CPU to every pod, and their memory is counted apart from the containerd that
//! spawned them, under a name an operator can find (and limit). Adopted, the spare moves
//! itself and QEMU back to the cgroup it was spawned in (containerd's, where any shim a
//! `start` spawns runs); the sandbox's Create then moves QEMU into the pod's cgroup as for
//! any pod. The last user of the pool removes its cgroup once it is empty ([`drain`]).
//!
//! [`drain`]: super::drain

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use tracing::{debug, warn};

use crate::cgroup::{cgroup_dirs, join, CgroupError, V1_CONTROLLERS};

/// The spares' cgroup, under each hierarchy's root.
pub const POOL_CGROUP: &str = "spry-pool";
/// The lowest weights: a spare gets CPU time only when no pod wants it.
const CPU_WEIGHTS: [(&str, &str); 2] = [("cpu.weight", "1"), ("cpu.shares", "2")];

/// The host's cgroup hierarchies as a spare uses them.
#[derive(Debug, Clone)]
pub struct SpareCgroups {
    root: PathBuf,
    proc: PathBuf,
}

impl SpareCgroups {
    pub fn host() -> Self {
        Self::with_roots(Path::new("/sys/fs/cgroup"), Path::new("/proc"))
    }

    pub(super) fn with_roots(root: &Path, proc: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            proc: proc.to_path_buf(),
        }
    }

    /// The pool's cgroup dirs: one on cgroup v2, one per joined controller's hierarchy on v1.
    pub fn pool_dirs(&self) -> Vec<PathBuf> {
        cgroup_dirs(&self.root, Path::new(POOL_CGROUP))
    }

    /// Makes the pool's cgroup where missing, at the lowest CPU weight, and moves `pid`
    /// into it.
    pub fn enter_pool(&self, pid: u32) -> Result<(), CgroupError> {
        let dirs = self.pool_dirs();
        for dir in &dirs {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(CgroupError::Create {
                        dir: dir.clone(),
                        source,
                    })
                }
            }
            // Only the hierarchy with the cpu controller has one of these files.
            for (file, value) in CPU_WEIGHTS {
                let path = dir.join(file);
                if path.exists() {
                    if let Err(e) = std::fs::write(&path, value) {
                        warn!(path = %path.display(), error = %e, "cannot lower the spares' CPU weight");
                    }
                }
            }
        }
        join(&dirs, pid)
    }

    /// The cgroup dirs process `pid` is in, in the hierarchies [`Self::enter_pool`] moves
    /// a process in: where to move a spare back to.
    pub fn of_process(&self, pid: u32) -> Result<Vec<PathBuf>, CgroupError> {
        let file = self.proc.join(pid.to_string()).join("cgroup");
        let text = std::fs::read_to_string(&file)
            .map_err(|source| CgroupError::ReadProcess { pid, source })?;
        let v2 = self.root.join("cgroup.controllers").exists();
        let mut dirs: Vec<PathBuf> = Vec::new();
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let hierarchy = if v2 {
                (id == "0" && controllers.is_empty()).then(|| self.root.clone())
            } else {
                controllers
                    .split(',')
                    .find(|c| V1_CONTROLLERS.contains(c))
                    .and_then(|c| std::fs::canonicalize(self.root.join(c)).ok())
            };
            let Some(hierarchy) = hierarchy else {
                continue;
            };
            let relative = Path::new(path.trim_start_matches('/'));
            if !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
            {
                return Err(CgroupError::BadPath {
                    path: path.to_string(),
                });
            }
            let dir = hierarchy.join(relative);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        Ok(dirs)
    }

    /// Moves each of `pids` into `dirs` (what [`Self::of_process`] gave).
    pub fn move_to(&self, pids: &[u32], dirs: &[PathBuf]) -> Result<(), CgroupError> {
        pids.iter().try_for_each(|pid| join(dirs, *pid))
    }

    /// Removes the pool's cgroup once the spares that ended have left it, waiting up to
    /// `wait` (zero: one try): a spare's lock is free as its process exits, a moment
    /// before the kernel takes the process out of its cgroups. Kept (logged) while
    /// spares are still in it (EBUSY).
    pub async fn remove_pool(&self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        for dir in self.pool_dirs() {
            loop {
                match remove_cgroup(&dir) {
                    Ok(()) => break,
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        debug!(dir = %dir.display(), error = %e, "the spares' cgroup stays");
                        break;
                    }
                }
            }
        }
    }
}

/// Removes cgroup `dir`; gone already counts as removed.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => {
            debug!(dir = %dir.display(), "removed the spares' cgroup");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_with(cgroup: &str) -> tempfile::TempDir {
        let proc = tempfile::tempdir().unwrap();
        std::fs::create_dir(proc.path().join("42")).unwrap();
        std::fs::write(proc.path().join("42/cgroup"), cgroup).unwrap();
        proc
    }

    #[test]
    fn on_cgroup_v2_a_spare_enters_the_pool_at_the_lowest_weight_and_finds_its_way_back() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory").unwrap();
        let pool = root.path().join(POOL_CGROUP);
        std::fs::create_dir(&pool).unwrap();
        std::fs::write(pool.join("cpu.weight"), "100").unwrap();
        let proc = proc_with("0::/system.slice/containerd.service\n");
        let cgroups = SpareCgroups::with_roots(root.path(), proc.path());

        let home = cgroups.of_process(42).unwrap();
        assert_eq!(
            home,
            vec![root.path().join("system.slice/containerd.service")]
        );
        cgroups.enter_pool(42).unwrap();
        assert_eq!(
            std::fs::read_to_string(pool.join("cgroup.procs")).unwrap(),
            "42"
        );
        assert_eq!(
            std::fs::read_to_string(pool.join("cpu.weight")).unwrap(),
            "1"
        );

        std::fs::create_dir_all(&home[0]).unwrap();
        cgroups.move_to(&[42, 43], &home).unwrap();
        // The fake cgroup.procs keeps the last write; a real one takes each pid.
        assert_eq!(
            std::fs::read_to_string(home[0].join("cgroup.procs")).unwrap(),
            "43"
        );
    }

    #[test]
    fn on_cgroup_v1_only_the_hierarchies_of_the_joined_controllers_count() {
        let root = tempfile::tempdir().unwrap();
        let cpu = root.path().join("cpu,cpuacct");
        std::fs::create_dir(&cpu).unwrap();
        std::os::unix::fs::symlink(&cpu, root.path().join("cpu")).unwrap();
        std::os::unix::fs::symlink(&cpu, root.path().join("cpuacct")).unwrap();
        std::fs::create_dir(root.path().join("memory")).unwrap();
        std::fs::create_dir(root.path().join("freezer")).unwrap();
        let proc =
            proc_with("5:freezer:/f\n4:memory:/m/n\n3:cpu,cpuacct:/c\n1:name=systemd:/s\n0::/u\n");
        let cgroups = SpareCgroups::with_roots(root.path(), proc.path());
        let real = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(
            cgroups.of_process(42).unwrap(),
            vec![
                real(&root.path().join("memory")).join("m/n"),
                real(&cpu).join("c")
            ]
        );

        std::fs::create_dir(cpu.join(POOL_CGROUP)).unwrap();
        std::fs::write(cpu.join(POOL_CGROUP).join("cpu.shares"), "1024").unwrap();
        cgroups.enter_pool(7).unwrap();
        assert_eq!(
            std::fs::read_to_string(cpu.join(POOL_CGROUP).join("cpu.shares")).unwrap(),
            "2"
        );
        let memory_pool = root.path().join("memory").join(POOL_CGROUP);
        assert_eq!(
            std::fs::read_to_string(memory_pool.join("cgroup.procs")).unwrap(),
            "7"
        );
        assert!(!root.path().join("freezer").join(POOL_CGROUP).exists());
    }

    #[test]
    fn a_path_that_climbs_out_is_refused_and_an_unreadable_process_named() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let proc = proc_with("0::/a/../../etc\n");
        let cgroups = SpareCgroups::with_roots(root.path(), proc.path());
        assert!(matches!(
            cgroups.of_process(42),
            Err(CgroupError::BadPath { .. })
        ));
        assert!(matches!(
            cgroups.of_process(41),
            Err(CgroupError::ReadProcess { pid: 41, .. })
        ));
    }

    #[tokio::test]
    async fn removing_the_pool_cgroup_waits_for_its_last_process_to_leave() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let cgroups = SpareCgroups::with_roots(root.path(), Path::new("/proc"));
        cgroups.enter_pool(42).unwrap();
        let procs = root.path().join(POOL_CGROUP).join("cgroup.procs");
        let left = procs.clone();
        let leaving = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::remove_file(left).unwrap();
        });
        cgroups.remove_pool(Duration::from_secs(5)).await;
        leaving.join().unwrap();
        assert!(!root.path().join(POOL_CGROUP).exists());
        // Still busy when the wait runs out: kept.
        cgroups.enter_pool(42).unwrap();
        cgroups.remove_pool(Duration::from_millis(50)).await;
        assert!(procs.exists());
    }

    #[tokio::test]
    async fn the_pool_cgroup_goes_only_when_empty() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let cgroups = SpareCgroups::with_roots(root.path(), Path::new("/proc"));
        cgroups.enter_pool(42).unwrap();
        // A plain directory with a file stands in for a cgroup with a process in it.
        cgroups.remove_pool(Duration::ZERO).await;
        assert!(root.path().join(POOL_CGROUP).exists());
        std::fs::remove_file(root.path().join(POOL_CGROUP).join("cgroup.procs")).unwrap();
        cgroups.remove_pool(Duration::ZERO).await;
        assert!(!root.path().join(POOL_CGROUP).exists());
        cgroups.remove_pool(Duration::ZERO).await;
    }
}
