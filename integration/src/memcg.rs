//! What a process's memory cgroup (v1 or v2) has been charged, next to what the process
//! holds: tests that check a pod's memory is counted where the pod's limits are.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The memory cgroup dir process `pid` is in (`/sys/fs/cgroup/...` on v2,
/// `/sys/fs/cgroup/memory/...` on v1).
pub fn memory_cgroup(pid: i32) -> Result<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading the cgroups of process {pid}"))?;
    let root = Path::new("/sys/fs/cgroup");
    let v2 = root.join("cgroup.controllers").exists();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if v2 && controllers.is_empty() {
            return Ok(root.join(relative));
        }
        if !v2 && controllers.split(',').any(|c| c == "memory") {
            return Ok(root.join("memory").join(relative));
        }
    }
    bail!("process {pid} is in no memory cgroup:\n{cgroups}")
}

/// Bytes charged to the memory cgroup `dir` (its processes' and its children's).
pub fn charged_bytes(dir: &Path) -> Result<u64> {
    for file in ["memory.current", "memory.usage_in_bytes"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
            return Ok(text.trim().parse()?);
        }
    }
    bail!("{} has no memory usage file", dir.display())
}

/// The anonymous memory process `pid` has resident (`RssAnon`), in bytes: memory that is
/// charged to whichever cgroup the process was in when it touched each page.
pub fn anon_rss_bytes(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no RssAnon in /proc/PID/status")?
        .parse()?;
    Ok(kib * 1024)
}
