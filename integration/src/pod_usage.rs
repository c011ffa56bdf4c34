//! What a containerd's pods cost the host: while they sit idle, memory (PSS), CPU, and under
//! TCG how much of QEMU's memory is translated guest code; while they start, the whole
//! machine's CPU time.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Result;

use crate::containerd::Containerd;

/// The processes of one containerd's pods: its shims and all their descendants.
pub struct PodProcesses {
    /// (pid, command name)
    processes: Vec<(i32, String)>,
}

impl PodProcesses {
    pub fn of(containerd: &Containerd) -> Result<Self> {
        Ok(Self::trees(
            containerd.shims()?.into_iter().map(|p| p.pid).collect(),
        ))
    }

    /// The processes of the trees rooted at `roots`.
    pub fn trees(roots: Vec<i32>) -> Self {
        let mut stack = roots;
        let mut seen = HashSet::new();
        let mut processes = Vec::new();
        while let Some(pid) = stack.pop() {
            if !seen.insert(pid) {
                continue;
            }
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|n| n.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            processes.push((pid, name));
            stack.extend(children(pid));
        }
        Self { processes }
    }

    /// These processes less `other`'s (e.g. a node's shims less its warm pool's spares).
    pub fn without(self, other: &PodProcesses) -> Self {
        let skip: HashSet<i32> = other.processes.iter().map(|(pid, _)| *pid).collect();
        Self {
            processes: self
                .processes
                .into_iter()
                .filter(|(pid, _)| !skip.contains(pid))
                .collect(),
        }
    }

    /// PSS in MiB, summed by command name.
    pub fn pss_mib_by_name(&self) -> BTreeMap<String, f64> {
        let mut by_name = BTreeMap::new();
        for (pid, name) in &self.processes {
            *by_name.entry(name.clone()).or_insert(0.0) += pss_kib(*pid) as f64 / 1024.0;
        }
        by_name
    }

    /// Resident translated-code cache of the QEMU processes (TCG only), MiB in all. QEMU
    /// maps its code buffer as the one anonymous read-write-execute region.
    pub fn tcg_code_cache_mib(&self) -> f64 {
        self.processes
            .iter()
            .filter(|(_, name)| name.starts_with("qemu"))
            .map(|(pid, _)| rwx_anonymous_rss_kib(*pid) as f64 / 1024.0)
            .sum()
    }

    /// CPU time the processes use over `window`, as a percentage of one core, in all.
    pub fn cpu_percent_over(&self, window: Duration) -> f64 {
        let before: u64 = self.processes.iter().map(|(pid, _)| cpu_ticks(*pid)).sum();
        std::thread::sleep(window);
        let after: u64 = self.processes.iter().map(|(pid, _)| cpu_ticks(*pid)).sum();
        let ticks = after.saturating_sub(before) as f64;
        ticks / clock_ticks_per_second() / window.as_secs_f64() * 100.0
    }
}

/// The machine's busy CPU time (all cores, from `/proc/stat`) at one moment. A benchmark
/// that runs alone on the machine reads what its pods cost from the difference.
#[derive(Clone, Copy)]
pub struct HostCpu {
    busy_ticks: u64,
}

impl HostCpu {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let busy_ticks = busy_ticks(&stat)
            .ok_or_else(|| anyhow::anyhow!("/proc/stat has no readable \"cpu\" line"))?;
        Ok(Self { busy_ticks })
    }

    /// CPU seconds (all cores together) spent since `earlier`.
    pub fn seconds_since(&self, earlier: &HostCpu) -> f64 {
        self.busy_ticks.saturating_sub(earlier.busy_ticks) as f64 / clock_ticks_per_second()
    }
}

/// user + nice + system + irq + softirq of the `cpu` line: not idle, not iowait, and not
/// steal (time the hypervisor gave to other guests is no work of ours).
fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6))
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| field_kib(&t, "Pss:"))
        .unwrap_or(0)
}

fn field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

fn rwx_anonymous_rss_kib(pid: i32) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    rwx_anonymous_rss_in(&smaps)
}

/// Sums `Rss:` of the mappings whose header says `rwxp` and names no file.
fn rwx_anonymous_rss_in(smaps: &str) -> u64 {
    let mut total = 0;
    let mut counting = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: range, perms, offset, dev, inode[, path].
            let perms = words.next().unwrap_or("");
            let path = words.nth(3);
            counting = perms == "rwxp" && path.is_none();
        } else if counting && first == "Rss:" {
            total += words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// utime + stime of a process, in clock ticks (0 once it is gone).
fn cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as f64)
        .unwrap_or(100.0)
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_anonymous_rwx_mappings() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:00 123 /usr/bin/qemu-system-x86_64
Rss:                 900 kB
7f0000000000-7f0040000000 rwxp 00000000 00:00 0 
Rss:               40960 kB
Pss:               40960 kB
7f0040000000-7f0050000000 rw-p 00000000 00:00 0 
Rss:                5000 kB
7f0050000000-7f0050001000 rwxp 00000000 fe:00 77 /tmp/jit
Rss:                   4 kB
";
        assert_eq!(rwx_anonymous_rss_in(smaps), 40960);
    }

    #[test]
    fn busy_time_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 20 30 4000 50 6 7 800 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(busy_ticks(stat), Some(100 + 20 + 30 + 6 + 7));
        assert_eq!(busy_ticks("intr 1 2 3\n"), None);
        let before = HostCpu::now().unwrap();
        assert!(HostCpu::now().unwrap().seconds_since(&before) >= 0.0);
    }

    #[test]
    fn reads_this_process_cpu_time() {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(300) {
            std::hint::black_box(0u64.wrapping_add(1));
        }
        assert!(cpu_ticks(std::process::id() as i32) > 0);
        assert_eq!(cpu_ticks(-1), 0);
    }
}
