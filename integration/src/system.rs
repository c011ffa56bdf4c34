//! Host inspection and cleanup: processes, mounts, network namespaces, tap devices, child processes.

use anyhow::{Context, Result};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A process seen in /proc.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub pid: i32,
    /// Argument vector; empty for kernel threads and processes that just exited.
    pub cmdline: Vec<String>,
}

impl ProcessInfo {
    /// The executable's file name (from argv\[0\]).
    pub fn name(&self) -> &str {
        self.cmdline
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or("")
    }

    /// Whether the process environment holds `needle` (e.g. `SPRY_IT_INSTANCE=...`). Unreadable → false.
    pub fn environ_contains(&self, needle: &str) -> bool {
        fs::read(format!("/proc/{}/environ", self.pid))
            .map(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
            .unwrap_or(false)
    }

    pub fn cmdline_contains(&self, needle: &str) -> bool {
        self.cmdline.iter().any(|a| a.contains(needle))
    }

    pub fn describe(&self) -> String {
        format!("pid {}: {}", self.pid, self.cmdline.join(" "))
    }
}

/// All user-space processes (kernel threads have an empty cmdline and are left out).
pub fn processes() -> Result<Vec<ProcessInfo>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Processes may exit while we look: a missing cmdline is not an error.
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !cmdline.is_empty() {
            out.push(ProcessInfo { pid, cmdline });
        }
    }
    Ok(out)
}

/// One line of /proc/self/mountinfo, the parts we use.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

impl MountInfo {
    pub fn describe(&self) -> String {
        format!(
            "{} on {} type {}",
            self.source,
            self.mount_point.display(),
            self.fs_type
        )
    }
}

pub fn mounts() -> Result<Vec<MountInfo>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// Format: `id parent major:minor root mount_point options [optional...] - fs_type source super_options`.
fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fs_type = right.next()?.to_string();
    let source = unescape_mountinfo(right.next().unwrap_or(""));
    Some(MountInfo {
        mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
        fs_type,
        source,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const MAX_STACKED_MOUNTS: usize = 32;

/// Lazily unmounts every mount at or below `prefix`, deepest first. Returns what it unmounted.
pub fn unmount_under(prefix: &Path) -> Result<Vec<PathBuf>> {
    let mut targets: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(prefix))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    targets.dedup();
    let mut done = Vec::new();
    for target in targets {
        // Stacked mounts on one point need one umount each; stop when it is no longer a mount. Bounded,
        // so a mount that keeps coming back (propagation) is an error rather than a hang.
        let mut attempts = 0;
        while mounts()?.iter().any(|m| m.mount_point == target) {
            attempts += 1;
            if attempts > MAX_STACKED_MOUNTS {
                anyhow::bail!(
                    "{} is still mounted after {MAX_STACKED_MOUNTS} unmounts",
                    target.display()
                );
            }
            umount2(&target, MntFlags::MNT_DETACH)
                .with_context(|| format!("unmounting {}", target.display()))?;
        }
        done.push(target);
    }
    Ok(done)
}

/// Entries of `/var/run/netns` (named network namespaces, as `ip netns` and CNI tools create them).
pub fn named_netns() -> Vec<PathBuf> {
    list_dir(Path::new("/var/run/netns"))
}

/// The cgroup dirs, in every mounted hierarchy, of the sandboxes a containerd logging to
/// `log` started, under containerd's default parent (`k8s.io/<sandbox id>`).
pub fn sandbox_cgroups(log: &Path) -> Vec<PathBuf> {
    const MARK: &str = "returns sandbox id \\\"";
    let log = fs::read_to_string(log).unwrap_or_default();
    let ids: BTreeSet<&str> = log
        .match_indices(MARK)
        .filter_map(|(at, _)| log.get(at + MARK.len()..at + MARK.len() + 64))
        .filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = if root.join("cgroup.controllers").exists() {
        vec![root.to_path_buf()]
    } else {
        list_dir(root)
    };
    hierarchies
        .iter()
        .flat_map(|h| ids.iter().map(move |id| h.join("k8s.io").join(id)))
        .filter(|dir| dir.is_dir())
        .collect()
}

/// Network interfaces that are tun/tap devices.
pub fn tap_devices() -> Vec<String> {
    list_dir(Path::new("/sys/class/net"))
        .into_iter()
        .filter(|p| p.join("tun_flags").exists())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// Directory entries (paths); a missing directory has none.
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Every path below `dir`, down to `depth` levels (1 = direct children). Symlinks are not followed.
pub fn list_tree(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if depth == 0 {
        return out;
    }
    for path in list_dir(dir) {
        let is_dir = path.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false);
        out.push(path.clone());
        if is_dir {
            out.extend(list_tree(&path, depth - 1));
        }
    }
    out
}

pub fn process_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'))
            .unwrap_or(false)
}

/// SIGTERM, wait up to `grace`, then SIGKILL, for a process that is not our child.
pub fn terminate_pid(pid: i32, grace: Duration) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while process_alive(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    if process_alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// SIGTERM our child, wait up to `grace`, then SIGKILL and reap it.
pub fn terminate_child(child: &mut Child, grace: Duration) -> Result<()> {
    if child.try_wait().context("checking child status")?.is_some() {
        return Ok(());
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().context("waiting for child")?.is_some() {
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    child.kill().context("killing child")?;
    child.wait().context("reaping child")?;
    Ok(())
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every 100 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        sleep(Duration::from_millis(100));
    }
}

/// Whether the host reaches a VM at `ip`: a connection to its closed port 9 is refused by
/// the guest's kernel (a VM off the network times out instead, after 5 s).
pub fn ip_answers(ip: &str) -> Result<()> {
    let probe =
        std::net::TcpStream::connect_timeout(&format!("{ip}:9").parse()?, Duration::from_secs(5));
    match probe {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        other => anyhow::bail!("{ip} does not answer (a connection to port 9: {other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let line = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 shared:2 - overlay over\\134lay rw,lowerdir=/x";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m.fs_type, "overlay");
        assert_eq!(m.source, "over\\lay");
    }

    #[test]
    fn sees_our_own_process_and_root_mount() {
        let me = std::process::id() as i32;
        assert!(processes().unwrap().iter().any(|p| p.pid == me));
        assert!(mounts()
            .unwrap()
            .iter()
            .any(|m| m.mount_point == Path::new("/")));
        assert!(process_alive(me));
    }

    #[test]
    fn unmounts_nested_and_stacked_mounts_under_prefix() {
        crate::require_root().unwrap();
        use nix::mount::{mount, MsFlags};
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("a");
        fs::create_dir(&top).unwrap();
        let tmpfs = |target: &Path| {
            mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap()
        };
        tmpfs(&top);
        tmpfs(&top); // stacked on the same point
        fs::create_dir(top.join("b")).unwrap();
        tmpfs(&top.join("b")); // nested
        let done = unmount_under(dir.path()).unwrap();
        assert_eq!(done, vec![top.join("b"), top.clone()]);
        assert!(!mounts()
            .unwrap()
            .iter()
            .any(|m| m.mount_point.starts_with(dir.path())));
    }

    #[test]
    fn list_tree_respects_depth() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b/c")).unwrap();
        assert_eq!(list_tree(dir.path(), 1), vec![dir.path().join("a")]);
        assert_eq!(list_tree(dir.path(), 2).len(), 2);
        assert_eq!(list_tree(dir.path(), 5).len(), 3);
    }
}
