//! The pod as the watchers' [`ExitRecorder`]: a process's exit is recorded once, after
//! its last output reached the FIFO; OOM reports from the guest pass the pod's filter.

use async_trait::async_trait;
use std::time::SystemTime;
use tracing::{info, warn};

use super::{Pod, OUTPUT_DRAIN_TIMEOUT};
use crate::service::watchers::ExitRecorder;

#[async_trait]
impl ExitRecorder for Pod {
    async fn record_exit(&self, id: &str, exec_id: &str, exit_code: u32) {
        let Some(mut pumps) = self.tasks.lock().await.claim_exit(id, exec_id) else {
            return;
        };
        if let Some(pumps) = pumps.as_mut() {
            pumps.stop_stdin();
            if tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, pumps.drain_outputs())
                .await
                .is_err()
            {
                warn!(
                    container_id = id,
                    exec_id, "output not drained before the exit event"
                );
            }
        }
        let exited_at = SystemTime::now();
        if !self
            .tasks
            .lock()
            .await
            .record_exit(id, exec_id, exit_code, exited_at)
        {
            return;
        }
        info!(container_id = id, exec_id, exit_code, "process exited");
        let event_id = if exec_id.is_empty() { id } else { exec_id };
        self.events
            .exit(id, event_id, self.vm_pid().await, exit_code, exited_at)
            .await;
    }

    async fn lost_with_vm(&self, sandbox_code: u32, app_code: u32) -> Vec<(String, String, u32)> {
        self.tasks.lock().await.lost_with_vm(sandbox_code, app_code)
    }

    async fn oom(&self, container_id: &str) {
        let known = self.tasks.lock().await.contains(container_id);
        let admitted = self
            .oom_filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(container_id, known, std::time::Instant::now());
        if admitted {
            self.events.oom(container_id).await;
        }
    }
}
