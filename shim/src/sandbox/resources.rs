//! What a pod holds on the host besides its VM, as units with their own setup and
//! teardown.
//!
//! Today that is the containers' rootfs disks; the pod's network, volumes and cgroup join
//! as further [`PodResource`]s, so a new feature is a new resource here rather than new
//! branches in the task service. Resources are set up all at once, once the VM runs (none
//! needs another's setup, and a pod's start then waits for the slowest of them, not for
//! their sum: moving a pooled VM's tap, QEMU's cgroup migration and the file server's
//! start each cost 10-25 ms), and torn down exactly once in reverse order when the sandbox
//! shuts down (or when one fails to set up), whether the VM is still alive or not.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use spry_proto::agent as pb;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::network::NetworkError;
use crate::rootfs::{AttachedRootfs, RootfsError, RootfsShare, RootfsSource};
use crate::vm::Vm;
use crate::volumes::VolumeError;

/// Failure of one pod resource; each resource brings its own error type.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// One unit of host-side state a pod owns.
#[async_trait]
pub trait PodResource: Send + Sync {
    /// Names the resource in logs.
    fn name(&self) -> &'static str;
    /// Prepares the resource for the running VM (hot-plug, host plumbing).
    async fn setup(&self, vm: &dyn Vm) -> Result<(), ResourceError>;
    /// Releases everything the resource holds. Called once; the VM may be gone already.
    async fn teardown(&self, vm: &dyn Vm) -> Result<(), ResourceError>;
}

/// A pod's resources, in the reverse of their teardown order.
pub struct PodResources {
    items: Vec<Arc<dyn PodResource>>,
    /// How many of `items` (from the front) are set up and not yet torn down.
    set_up: Mutex<usize>,
}

impl PodResources {
    pub fn new(items: Vec<Arc<dyn PodResource>>) -> Self {
        Self {
            items,
            set_up: Mutex::new(0),
        }
    }

    /// Sets up every resource not yet set up, concurrently. When any fails, every one set
    /// up is torn down (reverse order) before the first failure (in item order) is
    /// returned.
    pub async fn setup(&self, vm: &dyn Vm) -> Result<(), ResourceError> {
        let mut set_up = self.set_up.lock().await;
        let start = *set_up;
        let results = futures::future::join_all(
            self.items[start..]
                .iter()
                .map(|resource| resource.setup(vm)),
        )
        .await;
        let mut done = Vec::new();
        let mut failed = None;
        for (resource, result) in self.items[start..].iter().zip(results) {
            match result {
                Ok(()) => done.push(Arc::clone(resource)),
                Err(e) => {
                    warn!(
                        resource = resource.name(),
                        error = %crate::error_chain(&e),
                        "pod resource setup failed; undoing the others"
                    );
                    failed.get_or_insert(e);
                }
            }
        }
        let Some(e) = failed else {
            *set_up = self.items.len();
            return Ok(());
        };
        for resource in done.iter().rev() {
            teardown_one(resource.as_ref(), vm).await;
        }
        teardown_first(&self.items, &mut set_up, vm).await;
        Err(e)
    }

    /// Tears down every resource that is set up, in reverse order, going on past
    /// failures (each is logged). A second call does nothing.
    pub async fn teardown(&self, vm: &dyn Vm) {
        let mut set_up = self.set_up.lock().await;
        teardown_first(&self.items, &mut set_up, vm).await;
    }
}

async fn teardown_first(items: &[Arc<dyn PodResource>], set_up: &mut usize, vm: &dyn Vm) {
    while *set_up > 0 {
        *set_up -= 1;
        teardown_one(items[*set_up].as_ref(), vm).await;
    }
}

async fn teardown_one(resource: &dyn PodResource, vm: &dyn Vm) {
    if let Err(e) = resource.teardown(vm).await {
        warn!(
            resource = resource.name(),
            error = %crate::error_chain(&e),
            "cannot tear down a pod resource"
        );
    }
}

/// The containers' rootfs disks: attached per container, all detached at teardown.
pub struct RootfsDisks {
    share: Box<dyn RootfsShare>,
    attached: Mutex<HashMap<String, AttachedRootfs>>,
}

/// Failure to attach a container's rootfs.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("container {container_id} already has a rootfs in this VM")]
    AlreadyAttached { container_id: String },
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
}

impl RootfsDisks {
    pub fn new(share: Box<dyn RootfsShare>) -> Self {
        Self {
            share,
            attached: Mutex::new(HashMap::new()),
        }
    }

    /// Shares the container's rootfs into the VM; returns what the agent mounts.
    pub async fn attach(
        &self,
        vm: &dyn Vm,
        container_id: &str,
        source: &RootfsSource,
    ) -> Result<pb::Rootfs, AttachError> {
        let mut attached = self.attached.lock().await;
        if attached.contains_key(container_id) {
            return Err(AttachError::AlreadyAttached {
                container_id: container_id.to_string(),
            });
        }
        let disk = self.share.attach(vm, container_id, source).await?;
        let rootfs = disk.rootfs.clone();
        attached.insert(container_id.to_string(), disk);
        Ok(rootfs)
    }

    /// Gets the next container's rootfs disks ready ahead of it; best effort (an attach
    /// without them plugs what it needs).
    pub async fn prepare_next(&self, vm: &dyn Vm) {
        if let Err(e) = self.share.prepare_next(vm).await {
            debug!(error = %crate::error_chain(&e), "cannot prepare the next container's rootfs disks");
        }
    }

    /// Detaches the container's rootfs, if it has one.
    pub async fn detach(&self, vm: &dyn Vm, container_id: &str) -> Result<(), RootfsError> {
        let disk = self.attached.lock().await.remove(container_id);
        match disk {
            Some(disk) => self.share.detach(vm, disk).await,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl PodResource for RootfsDisks {
    fn name(&self) -> &'static str {
        "rootfs disks"
    }

    async fn setup(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        // Disks come and go with containers.
        Ok(())
    }

    async fn teardown(&self, vm: &dyn Vm) -> Result<(), ResourceError> {
        let disks: Vec<AttachedRootfs> =
            self.attached.lock().await.drain().map(|(_, d)| d).collect();
        let mut first_error = None;
        for disk in disks {
            if let Err(e) = self.share.detach(vm, disk).await {
                warn!(error = %crate::error_chain(&e), "cannot detach a rootfs disk");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
