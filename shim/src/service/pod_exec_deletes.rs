//! A container's Delete waits for the Deletes of the execs that ended with it.
//!
//! containerd sends an exec's Delete on its container's task connection and closes that
//! connection as soon as the container's own Delete is answered. When a container and its
//! execs end together (its VM died, or its init exited and took them along), CRI's exit
//! handler deletes the container while crictl's exec handler deletes the exec: answered
//! first, the container's Delete cut the exec's off ("Failed to delete exec process ...
//! ttrpc: closed"), and the exec, never deleted, kept the emptied shim lingering.

use std::time::Duration;

use super::Pod;

/// How long a container's Delete waits for containerd to delete its ended execs: their
/// Deletes are already on their way (milliseconds); one nobody sends costs this once.
const EXEC_DELETE_WAIT: Duration = Duration::from_secs(2);

impl Pod {
    /// Returns once every exec of deleted container `id` is deleted too, or after
    /// [`EXEC_DELETE_WAIT`].
    pub(super) async fn wait_for_exec_deletes(&self, id: &str) {
        let deadline = tokio::time::Instant::now() + EXEC_DELETE_WAIT;
        loop {
            // Registered before the check, so a Delete between the two is not missed.
            let deleted = self.exec_deleted.notified();
            tokio::pin!(deleted);
            deleted.as_mut().enable();
            if self.tasks.lock().await.leftover_execs_of(id) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, deleted).await.is_err() {
                return;
            }
        }
    }
}
