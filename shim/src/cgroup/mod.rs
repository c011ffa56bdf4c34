//! The pod's cgroup on the host. kubelet (through containerd) names a cgroup for the
//! sandbox under the pod's own (`linux.cgroupsPath` of the sandbox spec); runc puts pause
//! there. Spry puts the processes that do the pod's work there instead: QEMU (all of the
//! pod's containers run inside it) and the pod's file server. So the pod's CPU and memory
//! limits, which kubelet sets on the pod cgroup (the RuntimeClass overhead included),
//! bound the VM, and kubelet's accounting and evictions see what the pod really uses.
//!
//! QEMU's `oom_score_adj` follows the pod: raised to what kubelet gives the pod's QoS
//! (BestEffort 1000) and to the highest its containers get; never lowered (that needs
//! CAP_SYS_RESOURCE, and a VM is one process: its score is the pod's most killable one).
//!
//! Both cgroup v2 and v1 (each of the controllers that account a process's use) are
//! handled; a systemd-driver path (`slice:prefix:name`) is expanded as runc does and the
//! directories made directly.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::sandbox::{PodResource, ResourceError};
use crate::vm::Vm;

/// The v1 controllers a pod's processes join: the ones that limit and account CPU,
/// memory, tasks and I/O. (Not cpuset, devices or freezer: joining those changes what
/// QEMU may use or do, not what is counted.)
pub(crate) const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "blkio"];
/// kubelet's oom_score_adj for BestEffort pods.
const BEST_EFFORT_OOM_SCORE_ADJ: i32 = 1000;
/// How long teardown waits for the pod's processes to leave before giving up a cgroup.
const EMPTY_WAIT: Duration = Duration::from_secs(2);

/// Failure to place the pod's processes in its cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("the sandbox's cgroupsPath {path:?} is not a cgroup path Spry can use")]
    BadPath { path: String },
    #[error("cannot create the cgroup {dir}")]
    Create {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the cgroups of process {pid}")]
    ReadProcess {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move process {pid} into the cgroup {dir}")]
    Join {
        pid: u32,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the pod's processes go, from the sandbox spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// The cgroup relative to each hierarchy's root.
    pub relative: PathBuf,
    /// What QEMU's oom_score_adj is raised to at start (from the pod's QoS).
    pub oom_score_adj: Option<i32>,
}

/// The sandbox's cgroup as kubelet/containerd named it; None when the spec names none
/// (a pod without a cgroup parent: QEMU stays where the shim is).
pub fn plan(spec: &Spec) -> Result<Option<CgroupPlan>, CgroupError> {
    let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) else {
        return Ok(None);
    };
    let text = path.to_string_lossy().into_owned();
    if text.is_empty() {
        return Ok(None);
    }
    let relative = relative_cgroup(&text).ok_or(CgroupError::BadPath { path: text.clone() })?;
    let best_effort = text.to_ascii_lowercase().contains("besteffort");
    Ok(Some(CgroupPlan {
        relative,
        oom_score_adj: best_effort.then_some(BEST_EFFORT_OOM_SCORE_ADJ),
    }))
}

/// A cgroupfs path (`/kubepods/besteffort/pod<uid>/<id>`) as a relative path, or a
/// systemd one (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`) expanded as
/// runc does (`kubepods.slice/kubepods-besteffort.slice/…/cri-containerd-<id>.scope`).
fn relative_cgroup(path: &str) -> Option<PathBuf> {
    let relative = match path.split(':').collect::<Vec<_>>()[..] {
        [slice, prefix, name] if !path.starts_with('/') => {
            let mut dir = expand_slice(slice)?;
            dir.push(format!("{prefix}-{name}.scope"));
            dir
        }
        _ => PathBuf::from(path.trim_start_matches('/')),
    };
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    (plain && relative.components().next().is_some()).then_some(relative)
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice` (systemd's slice nesting).
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.contains('/') {
        return None;
    }
    let mut dir = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        dir.push(format!("{prefix}.slice"));
    }
    Some(dir)
}

/// The cgroup dirs `relative` names under the hierarchies mounted at `root`
/// (`/sys/fs/cgroup`): one on cgroup v2, one per joined controller on v1 (controllers
/// mounted together, e.g. `cpu,cpuacct`, once).
pub(crate) fn cgroup_dirs(root: &Path, relative: &Path) -> Vec<PathBuf> {
    if root.join("cgroup.controllers").exists() {
        return vec![root.join(relative)];
    }
    let mut hierarchies: Vec<PathBuf> = Vec::new();
    for controller in V1_CONTROLLERS {
        let Ok(hierarchy) = std::fs::canonicalize(root.join(controller)) else {
            continue;
        };
        if hierarchy.is_dir() && !hierarchies.contains(&hierarchy) {
            hierarchies.push(hierarchy);
        }
    }
    hierarchies.into_iter().map(|h| h.join(relative)).collect()
}

/// Moves `pid` into each of `dirs`.
pub(crate) fn join(dirs: &[PathBuf], pid: u32) -> Result<(), CgroupError> {
    for dir in dirs {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).map_err(|source| {
            CgroupError::Join {
                pid,
                dir: dir.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Raises process `pid`'s oom_score_adj to `value` when it is lower (under `proc`).
pub fn raise_oom_score_adj(proc: &Path, pid: u32, value: i32) -> std::io::Result<bool> {
    let file = proc.join(pid.to_string()).join("oom_score_adj");
    let current: i32 = std::fs::read_to_string(&file)?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if value <= current {
        return Ok(false);
    }
    std::fs::write(&file, value.clamp(-1000, 1000).to_string())?;
    Ok(true)
}

/// The pod's cgroup as a pod resource: made (where missing) before the pod's VM starts,
/// so QEMU is spawned into it ([`PodCgroup::prepare`]), as the pod's file server is
/// later; joined at setup by a QEMU that started elsewhere (a pooled VM); the dirs it
/// made removed at teardown, once the processes are gone.
#[derive(Debug)]
pub struct PodCgroup {
    plan: CgroupPlan,
    root: PathBuf,
    proc: PathBuf,
    dirs: Vec<PathBuf>,
    /// Dirs this pod made, parents first.
    created: Mutex<Vec<PathBuf>>,
    vm_pid: std::sync::Mutex<Option<u32>>,
}

impl PodCgroup {
    pub fn new(plan: CgroupPlan) -> Self {
        Self::with_roots(plan, Path::new("/sys/fs/cgroup"), Path::new("/proc"))
    }

    fn with_roots(plan: CgroupPlan, root: &Path, proc: &Path) -> Self {
        let dirs = cgroup_dirs(root, &plan.relative);
        Self {
            plan,
            root: root.to_path_buf(),
            proc: proc.to_path_buf(),
            dirs,
            created: Mutex::new(Vec::new()),
            vm_pid: std::sync::Mutex::new(None),
        }
    }

    /// The cgroup a pod whose shim died left: its own dirs (not their parents, which
    /// other pods may share), for [`PodCgroup::remove`] once QEMU, which dies with the
    /// shim, has left them.
    pub fn left_behind(plan: CgroupPlan) -> Self {
        Self::new(plan).owning_existing_dirs()
    }

    fn owning_existing_dirs(self) -> Self {
        let existing = self.dirs.iter().filter(|d| d.is_dir()).cloned().collect();
        Self {
            created: Mutex::new(existing),
            ..self
        }
    }

    /// Makes the dirs (where missing) and names them, for QEMU to be spawned into. Undone
    /// by [`PodCgroup::remove`] (or the teardown) if the pod never starts.
    pub async fn prepare(&self) -> Result<Vec<PathBuf>, CgroupError> {
        if let Err(e) = self.make_dirs().await {
            self.remove_dirs().await;
            return Err(e);
        }
        Ok(self.dirs.clone())
    }

    /// Removes the dirs this pod made (once its processes have left them).
    pub async fn remove(&self) {
        self.remove_dirs().await;
    }

    /// The dirs, one per hierarchy, that the pod's processes are spawned into.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Raises QEMU's oom_score_adj to a container's (kubelet's figure for it).
    pub fn follow_container_oom_score(&self, value: i32) {
        let pid = *self.vm_pid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pid) = pid {
            if let Err(e) = raise_oom_score_adj(&self.proc, pid, value) {
                warn!(pid, value, error = %e, "cannot raise QEMU's oom_score_adj");
            }
        }
    }

    async fn make_dirs(&self) -> Result<(), CgroupError> {
        let mut created = self.created.lock().await;
        for dir in &self.dirs {
            // Parents first, so teardown can remove what it made, children first.
            let mut missing = Vec::new();
            let mut at = dir.as_path();
            while !at.exists() && at.starts_with(&self.root) {
                missing.push(at.to_path_buf());
                match at.parent() {
                    Some(parent) => at = parent,
                    None => break,
                }
            }
            for path in missing.into_iter().rev() {
                match std::fs::create_dir(&path) {
                    Ok(()) => created.push(path),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError::Create { dir: path, source }),
                }
            }
        }
        Ok(())
    }

    async fn remove_dirs(&self) {
        let mut created = self.created.lock().await;
        let deadline = std::time::Instant::now() + EMPTY_WAIT;
        while let Some(dir) = created.pop() {
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // EBUSY: a process of the pod has not left yet.
                    Err(_) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot remove the pod's cgroup");
                        break;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl PodResource for PodCgroup {
    fn name(&self) -> &'static str {
        "cgroup"
    }

    async fn setup(&self, vm: &dyn Vm) -> Result<(), ResourceError> {
        let pid = vm.pid();
        let placed = match self.make_dirs().await {
            Ok(()) => join(&self.dirs, pid),
            Err(e) => Err(e),
        };
        if let Err(e) = placed {
            self.remove_dirs().await;
            return Err(e.into());
        }
        *self.vm_pid.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
        if let Some(value) = self.plan.oom_score_adj {
            self.follow_container_oom_score(value);
        }
        info!(cgroup = %self.plan.relative.display(), pid, "QEMU joined the pod's cgroup");
        Ok(())
    }

    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        self.remove_dirs().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
