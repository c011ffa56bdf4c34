//! Background watchers of a pod's VM: a guest process's exit, the VM's own death (which
//! takes every process with it), and the guest's OOM kills. They report to an
//! [`ExitRecorder`] (the pod), which records each exit exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::{info, info_span, warn, Instrument};

use crate::agent_client::ProcessId;
use crate::sandbox::PodVm;

/// Exit status reported for processes whose VM went away under them.
pub const VM_GONE_EXIT: u32 = 255;
/// Exit status of the sandbox task when its VM stopped (as runc's pause gets SIGKILL).
pub const SANDBOX_KILLED_EXIT: u32 = 137;

/// Where the watchers report.
#[async_trait]
pub trait ExitRecorder: Send + Sync + 'static {
    /// Records that a process exited; a second report for the same process is ignored.
    async fn record_exit(&self, id: &str, exec_id: &str, exit_code: u32);
    /// The processes not yet stopped that a VM's death ends, and their exit codes.
    async fn lost_with_vm(&self, sandbox_code: u32, app_code: u32) -> Vec<(String, String, u32)>;
    async fn oom(&self, container_id: &str);
}

/// Records the exit of a guest process once it happens (or once its VM is gone).
pub fn watch_exit(recorder: Arc<dyn ExitRecorder>, vm: Arc<dyn PodVm>, process: ProcessId) {
    let span =
        info_span!("process", container_id = %process.container_id, exec_id = %process.exec_id);
    tokio::spawn(
        async move {
            let exit_code = match vm.wait_process(&process).await {
                Ok(exit) => {
                    // The OOM event goes out ahead of the exit, so CRI reads the exit as
                    // OOMKilled even when the guest's memory.events watch is late or
                    // missed the kill (the pod's filter drops a second report).
                    if exit.oom_killed {
                        recorder.oom(&process.container_id).await;
                    }
                    exit.code
                }
                Err(e) => {
                    warn!(error = %e, "lost the process: its VM is gone");
                    VM_GONE_EXIT
                }
            };
            recorder
                .record_exit(&process.container_id, &process.exec_id, exit_code)
                .await;
        }
        .instrument(span),
    );
}

/// When the VM goes, every process in it is gone too, and so is what the pod held on the
/// host for it (the network joins, the rootfs disks), without waiting for containerd to
/// stop the sandbox.
pub fn watch_vm(recorder: Arc<dyn ExitRecorder>, vm: &Arc<dyn PodVm>) {
    let mut exit = vm.exit_watch();
    let vm = Arc::clone(vm);
    tokio::spawn(async move {
        let _ = exit.wait_for(|e| e.is_some()).await;
        let reason = exit.borrow().clone();
        if let Some(reason) = reason {
            info!(%reason, "pod VM exited");
        }
        // The VM is gone: nothing to wait for. Idempotent, so the later stop is a no-op.
        if let Err(e) = vm.shutdown(std::time::Duration::ZERO).await {
            warn!(error = %crate::error_chain(&e), "cleaning up after the VM failed");
        }
        let lost = recorder
            .lost_with_vm(SANDBOX_KILLED_EXIT, VM_GONE_EXIT)
            .await;
        for (id, exec_id, code) in lost {
            recorder.record_exit(&id, &exec_id, code).await;
        }
    });
}

/// The fewest milliseconds between two OOM reports taken from the guest: a guest that
/// answers GetOomEvent at once, forever, costs the shim at most 100 calls a second.
const OOM_POLL_GAP: Duration = Duration::from_millis(10);
/// At most one OOM event per container in this window reaches containerd (kubelet only
/// needs to know that a container was OOM-killed, not how often in a second).
pub const OOM_EVENT_WINDOW: Duration = Duration::from_secs(1);

/// Passes the guest's OOM kills on, until the VM is gone. The guest is not trusted: the
/// pod decides which reports become events ([`OomFilter`]).
pub fn watch_oom(recorder: Arc<dyn ExitRecorder>, vm: Arc<dyn PodVm>) {
    tokio::spawn(async move {
        while let Ok(container_id) = vm.next_oom_event().await {
            recorder.oom(&container_id).await;
            tokio::time::sleep(OOM_POLL_GAP).await;
        }
    });
}

/// What the guest's OOM reports may publish: only containers of this pod, each at most
/// once per [`OOM_EVENT_WINDOW`]; a guest naming anything else, or flooding, publishes
/// nothing more (and is logged once a window, not once a report).
#[derive(Debug, Default)]
pub struct OomFilter {
    last_event: HashMap<String, Instant>,
    last_refusal_log: Option<Instant>,
    refused: u64,
}

impl OomFilter {
    /// Whether a report for `container_id` becomes an event now; `known` says whether the
    /// pod has that container.
    pub fn admit(&mut self, container_id: &str, known: bool, now: Instant) -> bool {
        if !known {
            self.refused += 1;
            let quiet = self
                .last_refusal_log
                .is_some_and(|t| now.duration_since(t) < OOM_EVENT_WINDOW);
            if !quiet {
                let shown: String = container_id.chars().take(64).collect();
                warn!(
                    container_id = %shown.escape_debug(),
                    refused = self.refused,
                    "the guest reported an OOM kill of a container this pod does not have; ignored"
                );
                self.last_refusal_log = Some(now);
            }
            return false;
        }
        match self.last_event.get(container_id) {
            Some(last) if now.duration_since(*last) < OOM_EVENT_WINDOW => false,
            _ => {
                self.last_event.insert(container_id.to_string(), now);
                true
            }
        }
    }

    /// Forgets a deleted container.
    pub fn forget(&mut self, container_id: &str) {
        self.last_event.remove(container_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_containers_once_a_window_become_events() {
        let mut filter = OomFilter::default();
        let t0 = Instant::now();
        assert!(!filter.admit("ghost", false, t0));
        assert!(filter.admit("app", true, t0));
        for ms in [0, 10, 500, 999] {
            assert!(!filter.admit("app", true, t0 + Duration::from_millis(ms)));
        }
        assert!(filter.admit("other", true, t0));
        assert!(filter.admit("app", true, t0 + OOM_EVENT_WINDOW));
        filter.forget("app");
        assert!(filter.admit("app", true, t0 + OOM_EVENT_WINDOW));
        assert_eq!(filter.refused, 1);
    }
}
