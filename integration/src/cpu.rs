//! A process's CPU use and the CPU quota of the cgroup above it (cgroup v1 or v2), for
//! tests that check what a pod's limits hold.

use anyhow::{bail, Context, Result};

/// CPU seconds process `pid` has used (user + system).
pub fn seconds_used(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name in /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64)
}

/// The CPU quota (in CPUs) of the parent of process `pid`'s cpu cgroup: the pod's for a process in a sandbox cgroup.
pub fn parent_cgroup_quota(pid: i32) -> Result<f64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next(), fields.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let pod = |root: &str| {
            std::path::Path::new(root)
                .join(relative)
                .parent()
                .map(|p| p.to_path_buf())
        };
        if controllers.is_empty() {
            if let Some(dir) = pod("/sys/fs/cgroup").filter(|d| d.join("cpu.max").exists()) {
                let max = std::fs::read_to_string(dir.join("cpu.max"))?;
                let mut parts = max.split_whitespace();
                let quota: f64 = parts.next().context("empty cpu.max")?.parse()?;
                let period: f64 = parts.next().context("no period in cpu.max")?.parse()?;
                return Ok(quota / period);
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            let dir = pod(&format!("/sys/fs/cgroup/{controllers}")).context("no pod cgroup")?;
            let read = |name: &str| -> Result<f64> {
                Ok(std::fs::read_to_string(dir.join(name))?.trim().parse()?)
            };
            return Ok(read("cpu.cfs_quota_us")? / read("cpu.cfs_period_us")?);
        }
    }
    bail!("no cpu cgroup for process {pid}:\n{cgroups}")
}
