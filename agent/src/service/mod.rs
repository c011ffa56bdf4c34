//! The ttrpc `Agent` service: thin handlers over the sandbox and container modules.

mod error;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use spry_proto::agent::*;
use spry_proto::agent_ttrpc::Agent;
use tokio::sync::{Mutex, Notify};
use ttrpc::r#async::TtrpcContext;

pub use error::AgentError;

use crate::container::{ContainerManager, PodMounts};
use crate::network::{self, NetworkConfig};
use crate::sandbox::{self, Sandbox, SandboxOptions};
use crate::volumes::PodVolumes;

/// Largest chunk returned by one ReadStdout/ReadStderr.
const MAX_READ: usize = 1024 * 1024;

/// What Shutdown does once everything is torn down.
#[derive(Clone)]
pub enum PowerAction {
    /// Power the VM off (PID 1 in the guest).
    PowerOff,
    /// Tell the serving loop to stop (host test mode).
    Exit(Arc<Notify>),
}

/// The service and the state it owns.
pub struct AgentService {
    run_dir: PathBuf,
    options: SandboxOptions,
    power: PowerAction,
    sandbox: Mutex<Option<Sandbox>>,
    /// The pod's /dev/shm and file share, set up by the first CreateSandbox.
    volumes: Mutex<Option<PodVolumes>>,
    containers: Arc<ContainerManager>,
}

type Reply<T> = ttrpc::Result<T>;

impl AgentService {
    pub fn new(
        run_dir: PathBuf,
        options: SandboxOptions,
        power: PowerAction,
        containers: Arc<ContainerManager>,
    ) -> Self {
        Self {
            run_dir,
            options,
            power,
            sandbox: Mutex::new(None),
            volumes: Mutex::new(None),
            containers,
        }
    }

    /// ReadStdout/ReadStderr: blocks until the stream has data or ends.
    async fn read_stream(
        &self,
        req: ReadStreamRequest,
        which: OutputStream,
    ) -> Reply<ReadStreamResponse> {
        let target = req.process.clone().unwrap_or_default();
        let process = self
            .containers
            .process(&target.container_id, &target.exec_id)
            .await
            .map_err(AgentError::from)?;
        let stream = match which {
            OutputStream::Stdout => &process.io.stdout,
            OutputStream::Stderr => &process.io.stderr,
        };
        Ok(stream_reply(stream.read(read_size(req.max_bytes)).await))
    }

    /// The pod's resolv.conf; `None` before CreateSandbox.
    async fn resolv_conf(&self) -> Option<Option<PathBuf>> {
        let sandbox = self.sandbox.lock().await;
        sandbox.as_ref().map(|sandbox| sandbox.resolv_conf.clone())
    }

    /// Kills everything, unmounts and syncs (DestroySandbox and Shutdown).
    async fn teardown(&self) -> Result<(), AgentError> {
        let result = self.containers.destroy_all().await;
        nix::unistd::sync();
        Ok(result?)
    }
}

fn signal_from(number: u32) -> Result<Signal, AgentError> {
    i32::try_from(number)
        .ok()
        .and_then(|n| Signal::try_from(n).ok())
        .ok_or(AgentError::BadSignal { signal: number })
}

fn exit_status(info: crate::container::ExitInfo) -> ExitStatus {
    let mut status = ExitStatus::new();
    status.exit_code = info.exit.shell_code();
    status.signal = info.exit.signal.unwrap_or(0) as u32;
    status.oom_killed = info.oom_killed;
    status.exited_at_unix_nanos = info.exit.at_unix_nanos;
    status
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> Reply<CheckResponse> {
        let supported = ProtocolVersion::PROTOCOL_VERSION_CURRENT as u32;
        if req.protocol_version != supported {
            return Err(AgentError::ProtocolVersion {
                requested: req.protocol_version,
                supported,
            }
            .into());
        }
        let mut response = CheckResponse::new();
        response.protocol_version = supported;
        response.agent_version = env!("CARGO_PKG_VERSION").to_string();
        response.kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(response)
    }

    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: CreateSandboxRequest) -> Reply<Empty> {
        let mut current = self.sandbox.lock().await;
        // Checked before anything is applied, so a bad request changes nothing.
        let network = NetworkConfig::from_request(&req).map_err(AgentError::from)?;
        let started = std::time::Instant::now();
        let applied = sandbox::apply(&req, current.as_ref(), &self.run_dir, self.options)
            .map_err(AgentError::from)?;
        let identity_ms = started.elapsed().as_millis() as u64;
        if self.options.own_network {
            network::apply(&network).await.map_err(AgentError::from)?;
        } else if !network.interfaces.is_empty() {
            tracing::warn!("not in a VM: the pod network is not applied");
        }
        let network_ms = started.elapsed().as_millis() as u64 - identity_ms;
        let mut volumes = self.volumes.lock().await;
        if volumes.is_none() {
            *volumes = Some(
                PodVolumes::setup(
                    &self.run_dir,
                    req.shm_size_bytes,
                    req.file_share,
                    self.options.pod_mounts,
                )
                .map_err(AgentError::from)?,
            );
        }
        tracing::info!(
            sandbox = %applied.id,
            hostname = %applied.hostname,
            identity_ms,
            network_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sandbox created"
        );
        *current = Some(applied);
        Ok(Empty::new())
    }

    async fn warm_network(&self, _ctx: &TtrpcContext, _req: Empty) -> Reply<Empty> {
        // Held throughout, so no CreateSandbox can configure the NICs meanwhile.
        let current = self.sandbox.lock().await;
        if current.is_some() {
            return Err(AgentError::SandboxExists.into());
        }
        if !self.options.own_network {
            tracing::warn!("not in a VM: the NICs are not the agent's to warm");
            return Ok(Empty::new());
        }
        let started = std::time::Instant::now();
        network::warm_up().await.map_err(AgentError::from)?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pod network paths warmed"
        );
        Ok(Empty::new())
    }

    async fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: Empty) -> Reply<Empty> {
        self.teardown().await?;
        Ok(Empty::new())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> Reply<Empty> {
        if let Err(err) = self.teardown().await {
            tracing::error!(error = %err.message(), "teardown before shutdown failed; shutting down anyway");
        }
        self.containers.storage().unmount_shared().await;
        nix::unistd::sync();
        let power = self.power.clone();
        // Give the reply a moment to leave before the VM (or the test server) goes away.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match power {
                PowerAction::PowerOff => crate::init::power_off(),
                PowerAction::Exit(notify) => notify.notify_one(),
            }
        });
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> Reply<Empty> {
        let sandbox = self.resolv_conf().await;
        // Before CreateSandbox, only a container that asks for nothing of a pod: the warm
        // pool's warm-up, run in a VM no pod has yet.
        let podless =
            req.volumes.is_empty() && req.block_devices.is_empty() && req.files.is_empty();
        let Some(resolv_conf) = sandbox.or_else(|| podless.then_some(None)) else {
            return Err(AgentError::NoSandbox.into());
        };
        let storage = self.containers.storage();
        let (volumes, devices) = match self.volumes.lock().await.as_mut() {
            Some(pod) => (
                pod.resolve(&req.volumes, storage)
                    .await
                    .map_err(AgentError::from)?,
                pod.block_devices(&req.block_devices, storage)
                    .await
                    .map_err(AgentError::from)?,
            ),
            None if podless => (Vec::new(), Vec::new()),
            None => return Err(AgentError::NoSandbox.into()),
        };
        let stdio = req.stdio.clone().unwrap_or_default();
        let rootfs = req.rootfs.clone().unwrap_or_default();
        self.containers
            .create(
                &req.container_id,
                &req.oci_spec_json,
                &rootfs,
                &stdio,
                PodMounts {
                    resolv_conf: resolv_conf.as_deref(),
                    files: &req.files,
                    volumes: &volumes,
                    devices: &devices,
                },
            )
            .await
            .map_err(AgentError::from)?;
        Ok(Empty::new())
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        self.containers
            .start(&req.container_id)
            .await
            .map_err(AgentError::from)?;
        Ok(Empty::new())
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        self.containers
            .remove(&req.container_id)
            .await
            .map_err(AgentError::from)?;
        if let Some(pod) = self.volumes.lock().await.as_ref() {
            pod.forget(&req.container_id);
        }
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> Reply<Empty> {
        self.containers
            .update(&req.container_id, &req.resources_json)
            .await
            .map_err(AgentError::from)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> Reply<ContainerStats> {
        let stats = self
            .containers
            .stats(&req.container_id)
            .await
            .map_err(AgentError::from)?;
        let mut reply = ContainerStats::new();
        reply.cpu_usage_nanos = stats.cpu_usage_nanos;
        reply.cpu_user_nanos = stats.cpu_user_nanos;
        reply.cpu_system_nanos = stats.cpu_system_nanos;
        reply.memory_usage_bytes = stats.memory_usage_bytes;
        reply.memory_limit_bytes = stats.memory_limit_bytes;
        reply.memory_working_set_bytes = stats.memory_working_set_bytes;
        reply.pids_current = stats.pids_current;
        reply.pids_limit = stats.pids_limit;
        reply.oom_kills = stats.oom_kills;
        reply.memory_anon_bytes = stats.memory_anon_bytes;
        reply.page_faults = stats.page_faults;
        reply.major_page_faults = stats.major_page_faults;
        reply.timestamp_nanos = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| Duration::from(t).as_nanos() as u64)
            .unwrap_or(0);
        Ok(reply)
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> Reply<ListProcessesResponse> {
        let pids = self
            .containers
            .pids(&req.container_id)
            .await
            .map_err(AgentError::from)?;
        let mut reply = ListProcessesResponse::new();
        reply.pids = pids.into_iter().map(|p| p as u32).collect();
        Ok(reply)
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> Reply<Empty> {
        let process = req.process.clone().unwrap_or_default();
        let stdio = req.stdio.clone().unwrap_or_default();
        self.containers
            .exec(
                &process.container_id,
                &process.exec_id,
                &req.oci_process_json,
                &stdio,
            )
            .await
            .map_err(AgentError::from)?;
        Ok(Empty::new())
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> Reply<Empty> {
        let process = req.process.clone().unwrap_or_default();
        let signal = signal_from(req.signal)?;
        self.containers
            .signal(&process.container_id, &process.exec_id, signal, req.all)
            .await
            .map_err(AgentError::from)?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: ProcessRef) -> Reply<ExitStatus> {
        let process = self
            .containers
            .process(&req.container_id, &req.exec_id)
            .await
            .map_err(AgentError::from)?;
        Ok(exit_status(process.wait().await))
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> Reply<WriteStdinResponse> {
        let target = req.process.clone().unwrap_or_default();
        let process = self
            .containers
            .process(&target.container_id, &target.exec_id)
            .await
            .map_err(AgentError::from)?;
        let written = process.io.write_stdin(&req.data).await.map_err(|source| {
            AgentError::from(crate::container::ContainerError::Stdio {
                id: target.container_id.clone(),
                source,
            })
        })?;
        let mut reply = WriteStdinResponse::new();
        reply.written = written as u32;
        Ok(reply)
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRef) -> Reply<Empty> {
        let process = self
            .containers
            .process(&req.container_id, &req.exec_id)
            .await
            .map_err(AgentError::from)?;
        process.io.close_stdin().await.map_err(|source| {
            AgentError::from(crate::container::ContainerError::Stdio {
                id: req.container_id.clone(),
                source,
            })
        })?;
        Ok(Empty::new())
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Reply<ReadStreamResponse> {
        self.read_stream(req, OutputStream::Stdout).await
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Reply<ReadStreamResponse> {
        self.read_stream(req, OutputStream::Stderr).await
    }

    async fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> Reply<Empty> {
        let target = req.process.clone().unwrap_or_default();
        let process = self
            .containers
            .process(&target.container_id, &target.exec_id)
            .await
            .map_err(AgentError::from)?;
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        process
            .io
            .resize(clamp(req.rows), clamp(req.cols))
            .map_err(|source| {
                AgentError::from(crate::container::ContainerError::Stdio {
                    id: target.container_id.clone(),
                    source,
                })
            })?;
        Ok(Empty::new())
    }

    async fn sync_volume(&self, _ctx: &TtrpcContext, req: VolumeSnapshot) -> Reply<Empty> {
        let volumes = self.volumes.lock().await;
        let pod = volumes.as_ref().ok_or(AgentError::NoSandbox)?;
        pod.sync(&req).map_err(AgentError::from)?;
        tracing::debug!(volume = %req.id, version = %req.version, "synced volume swapped");
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> Reply<OomEvent> {
        let mut event = OomEvent::new();
        match self.containers.next_oom_event().await {
            Some(id) => event.container_id = id,
            // The sender lives as long as the manager, so this only happens at shutdown.
            None => std::future::pending::<()>().await,
        }
        Ok(event)
    }
}

fn read_size(max_bytes: u32) -> usize {
    match max_bytes {
        0 => MAX_READ,
        n => (n as usize).min(MAX_READ),
    }
}

/// Which output stream of a process a read is for.
#[derive(Clone, Copy)]
enum OutputStream {
    Stdout,
    Stderr,
}

fn stream_reply((data, eof): (Vec<u8>, bool)) -> ReadStreamResponse {
    let mut reply = ReadStreamResponse::new();
    reply.data = data;
    reply.eof = eof;
    reply
}
