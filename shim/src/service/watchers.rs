//! Background watchers of a pod's VM: a guest process's exit, the VM's own death (which
//! takes every process with it), and the guest's OOM kills. They report to an
//! [`ExitRecorder`] (the pod), which records each exit exactly once.

use std::sync::Arc;

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
                Ok(code) => code,
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

/// Passes the guest's OOM kills on, until the VM is gone.
pub fn watch_oom(recorder: Arc<dyn ExitRecorder>, vm: Arc<dyn PodVm>) {
    tokio::spawn(async move {
        while let Ok(container_id) = vm.next_oom_event().await {
            recorder.oom(&container_id).await;
        }
    });
}
