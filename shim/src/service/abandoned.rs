//! A serving shim containerd gave up on: nobody will ever call it again, and it would keep
//! its VM forever.
//!
//! - containerd runs `delete` for a shim it believes dead, e.g. one it could not load after
//!   its own crash mid-RunPodSandbox (before it recorded how to talk to the shim); if the
//!   serving process is in fact alive, `delete` stops it ([`stop`]). But containerd also runs
//!   `delete` after every task delete (closing a task's connection counts as the shim's
//!   death), so a serving shim that other live tasks of containerd's still use is left alone
//!   ([`serves_other_tasks`]): a pod whose VM died has its sandbox task deleted while its app
//!   containers' exits are still on their way.
//! - containerd runs no `delete` when `start` itself fails, e.g. killed after it spawned the
//!   serving process; it removes the task's bundle. A serving shim whose bundle is gone
//!   before it ever held a task exits ([`exit_if_never_used`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::ExitSignal;
use tracing::warn;

use super::pod::Pod;

/// How often a serving shim without tasks looks for its bundle.
const BUNDLE_CHECK: Duration = Duration::from_secs(1);

/// Until the pod first holds a task: if `bundle` disappears meanwhile, the shim exits (the
/// pod's last-resort shutdown stops any VM it was booting for a Create containerd abandoned).
pub fn exit_if_never_used(bundle: PathBuf, pod: Arc<Pod>, exit: Arc<ExitSignal>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(BUNDLE_CHECK).await;
            if !pod.is_empty().await {
                return;
            }
            if !bundle.exists() {
                warn!(bundle = %bundle.display(), "containerd removed this shim's bundle before it held a task; exiting");
                exit.signal();
                return;
            }
        }
    });
}

/// How long `delete` waits for a killed serving shim to be gone (its QEMU dies with it).
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long `delete` lets a serving shim exit by itself before it kills it.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// containerd's record of how it talks to a task's shim: `bootstrap.json` (containerd 2.x)
/// or the older `address` file, in the task's bundle.
#[derive(serde::Deserialize)]
struct Bootstrap {
    address: String,
}

fn shim_address_of(bundle: &Path) -> Option<String> {
    if let Ok(raw) = std::fs::read(bundle.join("bootstrap.json")) {
        if let Ok(bootstrap) = serde_json::from_slice::<Bootstrap>(&raw) {
            return Some(bootstrap.address);
        }
    }
    let address = std::fs::read_to_string(bundle.join("address")).ok()?;
    Some(address.trim().to_string())
}

/// Whether another task bundle next to `bundle` (containerd keeps one per live task of the
/// namespace) talks to the same shim: then containerd still uses that shim, which exits by
/// itself once its last task is deleted.
pub fn serves_other_tasks(bundle: &Path) -> bool {
    let Some(ours) = shim_address_of(bundle).filter(|a| !a.is_empty()) else {
        return false;
    };
    let (Some(parent), Some(own_name)) = (bundle.parent(), bundle.file_name()) else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return false;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name() != own_name)
        .any(|entry| {
            shim_address_of(&entry.path()).is_some_and(|a| strip_scheme(&a) == strip_scheme(&ours))
        })
}

/// `ttrpc+unix:///x`, `unix:///x` and `/x` name the same socket.
fn strip_scheme(address: &str) -> &str {
    let address = address.split_once('+').map_or(address, |(_, rest)| rest);
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Whether `cmdline` is the serving process of shim `id` for containerd `address` in
/// `namespace`: this binary, those flags, and no action word (`start`, `delete`).
pub fn is_serving_shim(cmdline: &[String], id: &str, namespace: &str, address: &str) -> bool {
    let Some((program, args)) = cmdline.split_first() else {
        return false;
    };
    let ours = Path::new(program)
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with("containerd-shim-spry"));
    let flag = |name: &str| {
        args.windows(2)
            .find(|pair| pair[0] == name)
            .map(|pair| pair[1].as_str())
    };
    let action = args.iter().any(|arg| arg == "start" || arg == "delete");
    ours && !action
        && flag("-id") == Some(id)
        && flag("-namespace") == Some(namespace)
        && flag("-address") == Some(address)
}

/// The live serving process of shim `id`, if any (never this process).
pub fn serving_pid(id: &str, namespace: &str, address: &str) -> Option<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            (pid != me && is_serving_shim(&cmdline, id, namespace, address)).then_some(pid)
        })
}

/// Kills a serving shim containerd gave up on and waits until it is gone (its QEMU dies
/// with it).
pub fn stop(pid: i32, id: &str) {
    // containerd also runs `delete` right after a shim it told to shut down answered: that
    // one is exiting by itself (after its last-resort cleanup), and is let finish.
    if gone_within(pid, EXIT_GRACE) {
        return;
    }
    warn!(
        pid,
        id, "containerd gave up on this shim's serving process; stopping it"
    );
    let target = nix::unistd::Pid::from_raw(pid);
    if let Err(e) = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
        warn!(pid, error = %e, "cannot kill the abandoned shim");
        return;
    }
    gone_within(pid, EXIT_WAIT);
}

/// Whether process `pid` (not our child) is gone within `limit`: /proc no longer lists it,
/// or lists a zombie.
fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn only_the_serving_process_of_that_shim_matches() {
        let serving = "/usr/local/bin/containerd-shim-spry-v2 -namespace k8s.io -id abc \
                       -address /run/containerd/containerd.sock -socket unix:///run/containerd/s/x";
        let ok = |line: &str| {
            is_serving_shim(
                &args(line),
                "abc",
                "k8s.io",
                "/run/containerd/containerd.sock",
            )
        };
        assert!(ok(serving));
        assert!(
            !ok(&format!("{serving} delete")),
            "the delete action itself"
        );
        assert!(!ok(&format!("{serving} start")));
        assert!(!ok(&serving.replace("-id abc", "-id abcd")));
        assert!(!ok(&serving.replace("k8s.io", "moby")));
        assert!(!ok(&serving.replace("containerd.sock", "other.sock")));
        assert!(!ok(
            &serving.replace("containerd-shim-spry-v2", "containerd-shim-runc-v2")
        ));
        assert!(!ok(""));
    }

    fn task(dir: &Path, name: &str, file: &str, body: &str) -> PathBuf {
        let bundle = dir.join(name);
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join(file), body).unwrap();
        bundle
    }

    #[test]
    fn a_shim_other_live_tasks_talk_to_is_still_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let boot = |socket: &str| {
            format!(
                r#"{{"version":2,"address":"unix:///run/containerd/s/{socket}","protocol":"ttrpc"}}"#
            )
        };
        let sandbox = task(dir.path(), "sandbox", "bootstrap.json", &boot("aa"));
        // Alone: containerd gave up on it.
        assert!(!serves_other_tasks(&sandbox));
        // A task of another pod's shim does not keep it.
        task(dir.path(), "other-pod", "bootstrap.json", &boot("bb"));
        assert!(!serves_other_tasks(&sandbox));
        // An app container of the same pod, recorded either way, does.
        let app = task(dir.path(), "app", "address", "/run/containerd/s/aa\n");
        assert!(serves_other_tasks(&sandbox));
        std::fs::remove_dir_all(&app).unwrap();
        task(dir.path(), "app2", "bootstrap.json", &boot("aa"));
        assert!(serves_other_tasks(&sandbox));
        // A bundle that names no shim (or is gone) proves nothing.
        assert!(!serves_other_tasks(&dir.path().join("gone")));
        let garbage = task(dir.path(), "garbage", "bootstrap.json", "{not json");
        assert!(!serves_other_tasks(&garbage));
    }
}
