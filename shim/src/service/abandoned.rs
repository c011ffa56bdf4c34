//! A serving shim containerd gave up on: nobody will ever call it again, and it would keep
//! its VM forever.
//!
//! - containerd runs `delete` for a shim it believes dead, e.g. one it could not load after
//!   its own crash mid-RunPodSandbox (before it recorded how to talk to the shim); if the
//!   serving process is in fact alive, `delete` stops it ([`stop`]).
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

/// Kills the live serving process of shim `id`, if any (never this process), and waits
/// until it is gone; returns its pid.
pub fn stop(id: &str, namespace: &str, address: &str) -> Option<i32> {
    let me = std::process::id() as i32;
    let pid = std::fs::read_dir("/proc")
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
        })?;
    warn!(
        pid,
        id, "containerd gave up on this shim's serving process; stopping it"
    );
    let target = nix::unistd::Pid::from_raw(pid);
    if let Err(e) = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
        warn!(pid, error = %e, "cannot kill the abandoned shim");
        return Some(pid);
    }
    let deadline = Instant::now() + EXIT_WAIT;
    // Not our child: it is gone once /proc no longer lists it (or lists a zombie).
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(pid)
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
}
