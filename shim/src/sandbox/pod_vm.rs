//! [`PodVm`]: everything the task service may ask of a pod's VM, and its implementation
//! by [`Sandbox`]. The service never sees the agent client or the VM handle, so its whole
//! lifecycle runs against a fake in unit tests.

use std::time::Duration;

use async_trait::async_trait;
use spry_proto::agent as pb;
use tokio::sync::watch;
use tracing::warn;

use super::{AttachError, Sandbox, SandboxError};
use crate::agent_client::{AgentError, OutputStream, ProcessId};
use crate::rootfs::RootfsSource;
use crate::vm::VmExit;
use crate::volumes::GuestVolumes;

/// How a guest process ended, as its agent says (so not trusted beyond this pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessExit {
    pub code: u32,
    /// The agent saw the process die of SIGKILL after an OOM kill in its cgroup.
    pub oom_killed: bool,
}

/// A running pod VM as the task service sees it. Process calls return the agent's own
/// error, whose status code containerd gets unchanged.
#[async_trait]
pub trait PodVm: Send + Sync {
    /// The host process every task of the pod runs in (QEMU's PID).
    fn pid(&self) -> u32;
    /// Becomes `Some` when the VM has exited, for whatever reason.
    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>>;
    fn is_running(&self) -> bool {
        self.exit_watch().borrow().is_none()
    }
    /// Shares the rootfs and the container's host volumes into the VM and creates the
    /// container (not yet started).
    async fn create_container(
        &self,
        container_id: &str,
        spec: &oci_spec::runtime::Spec,
        rootfs: &RootfsSource,
        stdio: pb::StdioConfig,
        volumes: GuestVolumes,
    ) -> Result<(), SandboxError>;
    async fn start_container(&self, container_id: &str) -> Result<(), SandboxError>;
    /// Removes a stopped container from the guest and detaches its rootfs.
    async fn remove_container(&self, container_id: &str) -> Result<(), SandboxError>;
    async fn exec_process(
        &self,
        process: &ProcessId,
        spec_json: Vec<u8>,
        stdio: pb::StdioConfig,
    ) -> Result<(), AgentError>;
    /// Waits for the process to exit; how it exited.
    async fn wait_process(&self, process: &ProcessId) -> Result<ProcessExit, AgentError>;
    async fn signal_process(
        &self,
        process: &ProcessId,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError>;
    async fn stats(&self, container_id: &str) -> Result<pb::ContainerStats, AgentError>;
    async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError>;
    async fn resize_tty(&self, process: &ProcessId, rows: u32, cols: u32)
        -> Result<(), AgentError>;
    /// Up to `max` bytes of a process's output; `None` at its end.
    async fn read_output(
        &self,
        process: &ProcessId,
        stream: OutputStream,
        max: u32,
    ) -> Result<Option<Vec<u8>>, AgentError>;
    async fn write_stdin_all(&self, process: &ProcessId, data: &[u8]) -> Result<(), AgentError>;
    async fn close_stdin(&self, process: &ProcessId) -> Result<(), AgentError>;
    /// The next container the guest saw hit its memory limit.
    async fn next_oom_event(&self) -> Result<String, AgentError>;
    /// Stops the VM and releases every host resource of the pod; idempotent.
    async fn shutdown(&self, timeout: Duration) -> Result<VmExit, SandboxError>;
}

#[async_trait]
impl PodVm for Sandbox {
    fn pid(&self) -> u32 {
        self.vm.pid()
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        Sandbox::exit_watch(self)
    }

    async fn create_container(
        &self,
        container_id: &str,
        spec: &oci_spec::runtime::Spec,
        rootfs: &RootfsSource,
        stdio: pb::StdioConfig,
        volumes: GuestVolumes,
    ) -> Result<(), SandboxError> {
        // The VM is busy from now until the container's start: nothing is plugged ahead
        // meanwhile (one already being plugged is waited for and used).
        self.idle_prep.cancel();
        // kubelet's oom_score_adj for this container: QEMU, which runs it, takes it on
        // when it is the pod's highest.
        if let (Some(cgroup), Some(adj)) = (
            &self.cgroup,
            spec.process().as_ref().and_then(|p| p.oom_score_adj()),
        ) {
            cgroup.follow_container_oom_score(adj);
        }
        let mut mounts = volumes.guest;
        let mut synced = Vec::new();
        for (index, volume) in volumes.synced.iter().enumerate() {
            let id = format!("{container_id}/s{index}");
            let snapshot = crate::volumes::synced_snapshot(&volume.source, &id)?;
            synced.push((id, volume.source.clone(), snapshot.version.clone()));
            mounts.push(pb::VolumeMount {
                destination: volume.destination.display().to_string(),
                source: Some(pb::volume_mount::Source::Synced(snapshot)),
                options: volume.options.clone(),
                ..Default::default()
            });
        }
        mounts.extend(
            self.pod_disks
                .mounts(self.vm.as_ref(), &volumes.pod_local)
                .await?,
        );
        if !volumes.shared.is_empty() {
            let share = self.share.as_ref().ok_or_else(|| {
                SandboxError::Volume(crate::volumes::VolumeError::NoShare {
                    id: container_id.to_string(),
                })
            })?;
            mounts.extend(share.export(container_id, &volumes.shared).await?);
        }
        let block_devices = match self
            .devices
            .attach(self.vm.as_ref(), container_id, &volumes.block_devices)
            .await
        {
            Ok(devices) => devices,
            Err(e) => {
                self.unexport_volumes(container_id).await;
                return Err(e.into());
            }
        };
        // Timed, with the guest's part below: both are on every container start's path.
        let started = std::time::Instant::now();
        let rootfs = self
            .rootfs
            .attach(self.vm.as_ref(), container_id, rootfs)
            .await
            .map_err(|e| match e {
                AttachError::AlreadyAttached { container_id } => SandboxError::ContainerExists {
                    id: self.id.clone(),
                    container_id,
                },
                AttachError::Rootfs(e) => SandboxError::Rootfs(e),
            });
        let rootfs = match rootfs {
            Ok(rootfs) => rootfs,
            Err(e) => {
                self.unexport_volumes(container_id).await;
                return Err(e);
            }
        };
        let spec_json = serde_json::to_vec(spec).expect("an OCI spec always serializes");
        let req = pb::CreateContainerRequest {
            container_id: container_id.to_string(),
            oci_spec_json: spec_json,
            rootfs: Some(rootfs).into(),
            stdio: Some(stdio).into(),
            files: volumes.files,
            volumes: mounts,
            block_devices,
            ..Default::default()
        };
        let attach_ms = started.elapsed().as_millis() as u64;
        if let Err(source) = self.agent.create_container(req).await {
            if let Err(e) = self.rootfs.detach(self.vm.as_ref(), container_id).await {
                warn!(container_id, error = %e, "cannot detach rootfs after a failed create");
            }
            self.unexport_volumes(container_id).await;
            return Err(SandboxError::Container {
                container_id: container_id.to_string(),
                source,
            });
        }
        tracing::info!(
            container_id,
            attach_ms,
            guest_ms = started.elapsed().as_millis() as u64 - attach_ms,
            "container created in the VM"
        );
        self.watches
            .watch(container_id, synced, self.agent.clone())
            .await;
        Ok(())
    }

    async fn start_container(&self, container_id: &str) -> Result<(), SandboxError> {
        self.agent
            .start_container(container_id)
            .await
            .map_err(|source| SandboxError::Container {
                container_id: container_id.to_string(),
                source,
            })?;
        self.prepare_next_container();
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), SandboxError> {
        // Timed: containerd's StopContainer waits for this (its exit handler deletes the
        // task), so it is part of every container stop and in-place swap.
        let started = std::time::Instant::now();
        let removed = self.agent.remove_container(container_id).await;
        let guest_ms = started.elapsed().as_millis() as u64;
        let gone = matches!(&removed, Err(e) if e.code() == Some(ttrpc::Code::NOT_FOUND));
        if let Err(source) = removed {
            if !gone && self.is_running() {
                return Err(SandboxError::Container {
                    container_id: container_id.to_string(),
                    source,
                });
            }
        }
        self.rootfs.detach(self.vm.as_ref(), container_id).await?;
        self.unexport_volumes(container_id).await;
        tracing::info!(
            container_id,
            guest_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "container removed from the VM"
        );
        Ok(())
    }

    async fn exec_process(
        &self,
        process: &ProcessId,
        spec_json: Vec<u8>,
        stdio: pb::StdioConfig,
    ) -> Result<(), AgentError> {
        self.agent.exec_process(process, spec_json, stdio).await
    }

    async fn wait_process(&self, process: &ProcessId) -> Result<ProcessExit, AgentError> {
        let status = self.agent.wait_process(process).await?;
        Ok(ProcessExit {
            code: status.exit_code,
            oom_killed: status.oom_killed,
        })
    }

    async fn signal_process(
        &self,
        process: &ProcessId,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.agent.signal_process(process, signal, all).await
    }

    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        self.agent.list_processes(container_id).await
    }

    async fn stats(&self, container_id: &str) -> Result<pb::ContainerStats, AgentError> {
        self.agent.stats(container_id).await
    }

    async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        self.agent
            .update_container(container_id, resources_json)
            .await
    }

    async fn resize_tty(
        &self,
        process: &ProcessId,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        self.agent.resize_tty(process, rows, cols).await
    }

    async fn read_output(
        &self,
        process: &ProcessId,
        stream: OutputStream,
        max: u32,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        self.agent.read_output(process, stream, max).await
    }

    async fn write_stdin_all(&self, process: &ProcessId, data: &[u8]) -> Result<(), AgentError> {
        self.agent.write_stdin_all(process, data).await
    }

    async fn close_stdin(&self, process: &ProcessId) -> Result<(), AgentError> {
        self.agent.close_stdin(process).await
    }

    async fn next_oom_event(&self) -> Result<String, AgentError> {
        self.agent.next_oom_event().await
    }

    async fn shutdown(&self, timeout: Duration) -> Result<VmExit, SandboxError> {
        Sandbox::shutdown(self, timeout).await
    }
}
