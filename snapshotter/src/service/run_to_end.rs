//! The service as containerd reaches it: calls that change snapshots run to their end.
//!
//! tonic drops a call's future when its client goes away (containerd killed or restarted
//! in the middle of a pull or a removal). A Prepare of a lazy layer cut there could leave
//! the layer mounted and its daemon running with no record (until containerd's next
//! Cleanup), and a Remove cut after its record went left the snapshot's dir; here each
//! such call runs on a task of its own and finishes, and only its answer is lost, as
//! when containerd dies just after a reply. Reads are answered in place.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use containerd_snapshots::{api::types::Mount, Info, Snapshotter, Usage};

use super::{ServiceError, SprySnapshotter};

/// [`SprySnapshotter`] served to containerd.
pub struct RunToEnd(Arc<SprySnapshotter>);

impl RunToEnd {
    pub fn new(snapshotter: Arc<SprySnapshotter>) -> Self {
        Self(snapshotter)
    }
}

/// Runs `work` on a task of its own and waits for its answer; dropping the wait does not
/// stop the work.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::spawn(work)
        .await
        .map_err(|source| ServiceError::Join { source })?
}

#[tonic::async_trait]
impl Snapshotter for RunToEnd {
    type Error = ServiceError;
    type InfoStream = <SprySnapshotter as Snapshotter>::InfoStream;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        self.0.stat(key).await
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        let s = Arc::clone(&self.0);
        detached(async move { s.update(info, fieldpaths).await }).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        self.0.usage(key).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        self.0.mounts(key).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        let s = Arc::clone(&self.0);
        detached(async move { s.prepare(key, parent, labels).await }).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        let s = Arc::clone(&self.0);
        detached(async move { s.view(key, parent, labels).await }).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        let s = Arc::clone(&self.0);
        detached(async move { s.commit(name, key, labels).await }).await
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let s = Arc::clone(&self.0);
        detached(async move { s.remove(key).await }).await
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        let s = Arc::clone(&self.0);
        detached(async move { s.clear().await }).await
    }

    async fn list(
        &self,
        snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        self.0.list(snapshotter, filters).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn work_goes_on_when_its_caller_stops_waiting() {
        let go = Arc::new(tokio::sync::Notify::new());
        let done = Arc::new(AtomicBool::new(false));
        let (go2, done2) = (Arc::clone(&go), Arc::clone(&done));
        let call = tokio::spawn(detached(async move {
            go2.notified().await;
            done2.store(true, Ordering::SeqCst);
            Ok(())
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // containerd goes away: tonic drops the call's future.
        call.abort();
        let _ = call.await;
        go.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done.load(Ordering::SeqCst) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the work stopped with its caller"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
