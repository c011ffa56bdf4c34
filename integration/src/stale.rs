//! Cleanup of harness instances whose test process died without tearing down (SIGKILL, abort, CI
//! timeout). Every instance's directories are named `<name>-<pid>-<tag>-<random>`; when `<pid>` is gone,
//! its containerd, shims, mounts, hostPort rules, bridge and directories are removed before a new
//! instance starts.

use crate::{paths, system};
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The env var (set on containerd, inherited by its shims) that marks this instance's processes.
pub const INSTANCE_ENV: &str = "SPRY_IT_INSTANCE";

/// Identity of one harness instance: in its directory names, marker env var and bridge name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId {
    pub name: String,
    pub pid: u32,
    pub tag: u32,
}

impl InstanceId {
    pub fn new(name: &str, tag: u32) -> Self {
        InstanceId {
            name: name.to_string(),
            pid: std::process::id(),
            tag,
        }
    }

    /// An instance of this process with a random tag.
    pub fn fresh(name: &str) -> Self {
        Self::new(name, random_u32())
    }

    /// `<name>-<pid>-<tag as 8 hex>`: the prefix of the instance's directories.
    pub fn id(&self) -> String {
        format!("{}-{}-{:08x}", self.name, self.pid, self.tag)
    }

    /// `SPRY_IT_INSTANCE=<id>`, set on containerd and inherited by its shims.
    pub fn marker(&self) -> String {
        format!("{INSTANCE_ENV}={}", self.id())
    }

    /// Linux bridge names are at most 15 bytes.
    pub fn bridge(&self) -> String {
        format!("spryit{:08x}", self.tag)
    }

    /// Parses a directory name `<name>-<pid>-<tag>-<random>` (`name` may contain dashes).
    pub fn parse_dir_name(dir_name: &str) -> Option<Self> {
        let mut parts = dir_name.rsplitn(4, '-');
        let _random = parts.next()?;
        let tag = u32::from_str_radix(parts.next()?, 16).ok()?;
        let pid = parts.next()?.parse().ok()?;
        let name = parts.next()?.to_string();
        Some(InstanceId { name, pid, tag })
    }
}

/// Removes every instance whose owning test process is gone, saying what it removed; a
/// failure is said and does not stop the caller (a new instance does not need the sweep).
pub fn sweep() {
    match clean_stale_instances() {
        Ok(cleaned) if !cleaned.is_empty() => {
            eprintln!("spry-integration: removed stale instances {cleaned:?}")
        }
        Ok(_) => {}
        Err(e) => eprintln!("spry-integration: cleaning stale instances: {e:#}"),
    }
}

/// Removes every instance whose owning test process is gone; returns what it removed.
pub fn clean_stale_instances() -> Result<Vec<String>> {
    let mut cleaned = Vec::new();
    for parent in [paths::harness_run_dir(), paths::harness_dir()] {
        for dir in system::list_dir(&parent) {
            let Some(id) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(InstanceId::parse_dir_name)
            else {
                continue;
            };
            if system::process_alive(id.pid as i32) {
                continue;
            }
            clean_instance(&id, &dir)?;
            cleaned.push(dir.display().to_string());
        }
    }
    for network in crate::portmap_rules::remove_orphaned_portmap_rules()? {
        cleaned.push(format!("hostPort rules of {network}"));
    }
    Ok(cleaned)
}

fn clean_instance(id: &InstanceId, dir: &Path) -> Result<()> {
    let marker = id.marker();
    // containerd first, so it does not restart shims; then the shims it left.
    for want_shim in [false, true] {
        for p in system::processes()? {
            let is_shim = p.name().starts_with("containerd-shim");
            if is_shim == want_shim && p.environ_contains(&marker) {
                system::terminate_pid(p.pid, Duration::from_secs(5));
            }
        }
    }
    system::unmount_under(dir)?;
    let bridge = id.bridge();
    crate::portmap_rules::remove_portmap_rules(&crate::portmap_rules::network_of_bridge(&bridge))?;
    if Path::new("/sys/class/net").join(&bridge).exists() {
        system::run_checked(Command::new("ip").args(["link", "del", &bridge]))?;
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing stale {}", dir.display()))
}

/// Random bits without a rand dependency: the kernel's boot-id-style UUID generator.
fn random_u32() -> u32 {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .ok()
        .and_then(|u| u32::from_str_radix(&u.replace('-', "")[..8], 16).ok())
        .unwrap_or_else(|| std::process::id() ^ Instant::now().elapsed().subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_round_trip() {
        let id = InstanceId {
            name: "my-test".into(),
            pid: 42,
            tag: 0xdeadbeef,
        };
        let dir_name = format!("{}-Ab12Cd", id.id());
        assert_eq!(InstanceId::parse_dir_name(&dir_name), Some(id.clone()));
        assert_eq!(id.marker(), "SPRY_IT_INSTANCE=my-test-42-deadbeef");
        assert!(id.bridge().len() <= 15);
        assert_eq!(InstanceId::parse_dir_name("random-dir"), None);
    }
}
