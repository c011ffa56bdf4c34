//! One pod's tasks inside one shim: the sandbox task (the VM itself) and the app
//! containers and execs that run in it.
//!
//! Process state lives in a `watch` channel per process, so `Wait` is a subscription and
//! the exit is recorded exactly once, by the task that watched the guest process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oci_spec::runtime::Spec;
use spry_proto::agent as pb;
use tokio::sync::{watch, Mutex, RwLock};
use tracing::{info, info_span, warn, Instrument};

use super::error::ShimError;
use super::events::EventSink;
use super::io::{IoPumps, StdioPaths};
use super::spec::{self, TaskKind};
use crate::agent_client::ProcessId;
use crate::config::Config;
use crate::host::Host;
use crate::rootfs::RootfsSource;
use crate::sandbox::{Sandbox, SandboxIdentity, DEFAULT_BOOT_TIMEOUT};
use crate::template;
use crate::vm::VmConfig;
use containerd_shim::protos::protobuf::well_known_types::any::Any;

/// Exit status reported for processes whose VM went away under them.
const VM_GONE_EXIT: u32 = 255;
/// Exit status of the sandbox task when we stopped its VM (as runc's pause gets SIGKILL).
const SANDBOX_KILLED_EXIT: u32 = 137;
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exit event waits for the process's last output to reach the FIFOs.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    Created,
    Running,
    Stopped {
        exit_code: u32,
        exited_at: SystemTime,
    },
}

impl ProcessStatus {
    pub fn name(&self) -> &'static str {
        match self {
            ProcessStatus::Created => "created",
            ProcessStatus::Running => "running",
            ProcessStatus::Stopped { .. } => "stopped",
        }
    }
}

/// A process as containerd sees it.
struct Process {
    stdio: StdioPaths,
    status: watch::Sender<ProcessStatus>,
    /// OCI Process JSON of an exec, kept from Exec until Start.
    exec_spec: Vec<u8>,
    pumps: Option<IoPumps>,
}

impl Process {
    fn new(stdio: StdioPaths) -> Self {
        Self {
            stdio,
            status: watch::channel(ProcessStatus::Created).0,
            exec_spec: Vec::new(),
            pumps: None,
        }
    }
}

struct Task {
    kind: TaskKind,
    bundle: PathBuf,
    /// We mounted containerd's rootfs mounts at `<bundle>/rootfs` and must unmount them.
    rootfs_mounted: bool,
    init: Process,
    execs: HashMap<String, Process>,
}

/// A snapshot of one process for the State call.
pub struct ProcessState {
    pub bundle: PathBuf,
    pub pid: u32,
    pub status: ProcessStatus,
    pub stdio: StdioPaths,
}

/// Everything one shim manages.
pub struct Pod {
    config: Config,
    events: Arc<EventSink>,
    sandbox: RwLock<Option<Arc<Sandbox>>>,
    tasks: Mutex<HashMap<String, Task>>,
    /// A template rebuild this pod started after its template proved bad.
    template_rebuild: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The state dir of the pod's VM (its handler's config may name its own).
    state_dir: std::sync::OnceLock<PathBuf>,
}

impl Pod {
    pub fn new(config: Config, events: EventSink) -> Arc<Self> {
        Arc::new(Self {
            config,
            events: Arc::new(events),
            sandbox: RwLock::new(None),
            tasks: Mutex::new(HashMap::new()),
            template_rebuild: std::sync::Mutex::new(None),
            state_dir: std::sync::OnceLock::new(),
        })
    }

    /// QEMU's PID: every task of the pod runs inside it.
    pub async fn vm_pid(&self) -> u32 {
        self.sandbox
            .read()
            .await
            .as_ref()
            .map(|s| s.vm().pid())
            .unwrap_or(0)
    }

    async fn running_sandbox(&self, id: &str) -> Result<Arc<Sandbox>, ShimError> {
        self.sandbox
            .read()
            .await
            .clone()
            .ok_or_else(|| ShimError::NoSandbox { id: id.to_string() })
    }

    pub async fn create(
        self: &Arc<Self>,
        id: &str,
        bundle: &Path,
        rootfs: &[containerd_shim::protos::api::Mount],
        stdio: StdioPaths,
        options: Option<&Any>,
    ) -> Result<u32, ShimError> {
        if self.tasks.lock().await.contains_key(id) {
            return Err(ShimError::ContainerExists { id: id.to_string() });
        }
        let spec = spec::load(bundle)?;
        let kind = spec::task_kind(&spec);
        // A task without CRI annotations (e.g. `ctr run`) is a pod of its own.
        let own_vm = kind == TaskKind::Sandbox
            || (spec::sandbox_id(&spec).is_none() && self.sandbox.read().await.is_none());
        if own_vm {
            self.boot_sandbox(id, &spec, options).await?;
        }
        let mut task = Task {
            kind,
            bundle: bundle.to_path_buf(),
            rootfs_mounted: false,
            init: Process::new(stdio),
            execs: HashMap::new(),
        };
        if kind == TaskKind::App {
            if let Err(e) = self.create_app(id, &spec, rootfs, &mut task).await {
                if own_vm {
                    self.stop_sandbox().await;
                }
                return Err(e);
            }
        }
        self.tasks.lock().await.insert(id.to_string(), task);
        if let Some(state_dir) = self.state_dir.get() {
            super::record_state_dir(bundle, state_dir);
        }
        let pid = self.vm_pid().await;
        self.events.create(id, &bundle.to_string_lossy(), pid).await;
        Ok(pid)
    }

    async fn boot_sandbox(
        self: &Arc<Self>,
        id: &str,
        spec: &Spec,
        options: Option<&Any>,
    ) -> Result<(), ShimError> {
        let mut slot = self.sandbox.write().await;
        if slot.is_some() {
            return Err(ShimError::ContainerExists { id: id.to_string() });
        }
        // The runtime handler's own config, when containerd's options name one.
        let config = match super::options::config_from_options(options)? {
            Some(config) => config,
            None => self.config.clone(),
        };
        crate::log_filter::apply_config_level(&config.log_level);
        let _ = self.state_dir.set(config.state_dir.clone());
        let name = super::state_name(id);
        let host = Host::new(config);
        let vm_config = VmConfig {
            netns: spec::network_namespace(spec),
            ..host.vm_config(&name)
        };
        let identity = SandboxIdentity {
            hostname: spec
                .hostname()
                .clone()
                .unwrap_or_else(|| id.chars().take(12).collect()),
            ..Default::default()
        };
        let make_share = host.rootfs_share_factory(&name);
        let request = host.launch_request(vm_config, identity, DEFAULT_BOOT_TIMEOUT);
        let launch = template::start_sandbox(request, &make_share).await?;
        if let Some(rebuild) = launch.rebuild {
            *self
                .template_rebuild
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(rebuild);
        }
        let sandbox = Arc::new(launch.sandbox);
        self.watch_vm(&sandbox);
        self.watch_oom(&sandbox);
        *slot = Some(sandbox);
        Ok(())
    }

    async fn create_app(
        &self,
        id: &str,
        spec: &Spec,
        rootfs: &[containerd_shim::protos::api::Mount],
        task: &mut Task,
    ) -> Result<(), ShimError> {
        let sandbox = self.running_sandbox(id).await?;
        let rootfs_dir = task.bundle.join("rootfs");
        mount_rootfs(id, rootfs, &rootfs_dir).await?;
        task.rootfs_mounted = !rootfs.is_empty();
        let (guest_spec, files) = spec::for_guest(spec.clone(), id);
        let mounts: Vec<(&str, &[String])> = rootfs
            .iter()
            .map(|m| (m.type_.as_str(), m.options.as_slice()))
            .collect();
        let source = RootfsSource::for_mounts(&mounts, &rootfs_dir);
        let stdio = pb::StdioConfig {
            terminal: task.init.stdio.terminal,
            stdin: !task.init.stdio.stdin.is_empty(),
            ..Default::default()
        };
        let created = async {
            sandbox
                .create_container_with_files(id, &guest_spec, &source, stdio, files)
                .await?;
            match IoPumps::start(sandbox.agent(), &ProcessId::init(id), &task.init.stdio) {
                Ok(pumps) => Ok(pumps),
                Err(e) => {
                    let _ = sandbox.remove_container(id).await;
                    Err(e)
                }
            }
        }
        .await;
        match created {
            Ok(pumps) => {
                task.init.pumps = Some(pumps);
                Ok(())
            }
            Err(e) => {
                if task.rootfs_mounted {
                    unmount_rootfs(&rootfs_dir);
                }
                Err(e)
            }
        }
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let pid = self.vm_pid().await;
        let mut tasks = self.tasks.lock().await;
        let task = tasks
            .get_mut(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
        let kind = task.kind;
        let process = lookup_mut(task, id, exec_id)?;
        let status = *process.status.borrow();
        if status != ProcessStatus::Created {
            return Err(wrong_state(id, exec_id, status, "created"));
        }
        match (kind, exec_id.is_empty()) {
            (TaskKind::Sandbox, true) => {}
            (_, true) => {
                let sandbox = self.running_sandbox(id).await?;
                sandbox.start_container(id).await?;
                self.watch_exit(&sandbox, id, exec_id);
            }
            (_, false) => {
                let sandbox = self.running_sandbox(id).await?;
                let agent = sandbox.agent();
                let process_id = ProcessId::exec(id, exec_id);
                let stdio = pb::StdioConfig {
                    terminal: process.stdio.terminal,
                    stdin: !process.stdio.stdin.is_empty(),
                    ..Default::default()
                };
                agent
                    .exec_process(&process_id, process.exec_spec.clone(), stdio)
                    .await?;
                process.pumps = Some(IoPumps::start(agent, &process_id, &process.stdio)?);
                self.watch_exit(&sandbox, id, exec_id);
            }
        }
        process.status.send_replace(ProcessStatus::Running);
        drop(tasks);
        if exec_id.is_empty() {
            self.events.start(id, pid).await;
        } else {
            self.events.exec_started(id, exec_id, pid).await;
        }
        Ok(pid)
    }

    /// Records the exit of a guest process once it happens (or once its VM is gone).
    fn watch_exit(self: &Arc<Self>, sandbox: &Arc<Sandbox>, id: &str, exec_id: &str) {
        let pod = Arc::clone(self);
        let sandbox = Arc::clone(sandbox);
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        let span = info_span!("process", container_id = %id, exec_id = %exec_id);
        tokio::spawn(
            async move {
                let process_id = ProcessId {
                    container_id: id.clone(),
                    exec_id: exec_id.clone(),
                };
                let exit_code = match sandbox.agent().wait_process(&process_id).await {
                    Ok(status) => status.exit_code,
                    Err(e) => {
                        warn!(error = %e, "lost the process: its VM is gone");
                        VM_GONE_EXIT
                    }
                };
                pod.record_exit(&id, &exec_id, exit_code).await;
            }
            .instrument(span),
        );
    }

    async fn record_exit(&self, id: &str, exec_id: &str, exit_code: u32) {
        let mut pumps = {
            let mut tasks = self.tasks.lock().await;
            let Some(process) = tasks
                .get_mut(id)
                .and_then(|t| lookup_mut(t, id, exec_id).ok())
            else {
                return;
            };
            if matches!(*process.status.borrow(), ProcessStatus::Stopped { .. }) {
                return;
            }
            process.pumps.take()
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
        {
            let tasks = self.tasks.lock().await;
            let Some(process) = tasks.get(id).and_then(|t| lookup(t, id, exec_id).ok()) else {
                return;
            };
            process.status.send_replace(ProcessStatus::Stopped {
                exit_code,
                exited_at,
            });
        }
        info!(container_id = id, exec_id, exit_code, "process exited");
        let event_id = if exec_id.is_empty() { id } else { exec_id };
        self.events
            .exit(id, event_id, self.vm_pid().await, exit_code, exited_at)
            .await;
    }

    /// When the VM goes, every process in it is gone too.
    fn watch_vm(self: &Arc<Self>, sandbox: &Arc<Sandbox>) {
        let pod = Arc::clone(self);
        let mut exit = sandbox.exit_watch();
        tokio::spawn(async move {
            let _ = exit.wait_for(|e| e.is_some()).await;
            let reason = exit.borrow().clone();
            let mut stopped = Vec::new();
            for (id, task) in pod.tasks.lock().await.iter() {
                let sandbox_code = if task.kind == TaskKind::Sandbox {
                    SANDBOX_KILLED_EXIT
                } else {
                    VM_GONE_EXIT
                };
                if !matches!(*task.init.status.borrow(), ProcessStatus::Stopped { .. }) {
                    stopped.push((id.clone(), String::new(), sandbox_code));
                }
                for (exec_id, p) in &task.execs {
                    if matches!(*p.status.borrow(), ProcessStatus::Running) {
                        stopped.push((id.clone(), exec_id.clone(), VM_GONE_EXIT));
                    }
                }
            }
            if let Some(reason) = reason {
                info!(%reason, "pod VM exited");
            }
            for (id, exec_id, code) in stopped {
                pod.record_exit(&id, &exec_id, code).await;
            }
        });
    }

    fn watch_oom(self: &Arc<Self>, sandbox: &Arc<Sandbox>) {
        let events = Arc::clone(&self.events);
        let agent = sandbox.agent().clone();
        tokio::spawn(async move {
            while let Ok(container_id) = agent.next_oom_event().await {
                events.oom(&container_id).await;
            }
        });
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec_json: Vec<u8>,
    ) -> Result<(), ShimError> {
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec_json).map_err(|source| {
            ShimError::ExecSpec {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                source,
            }
        })?;
        {
            let mut tasks = self.tasks.lock().await;
            let task = tasks
                .get_mut(id)
                .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
            if task.execs.contains_key(exec_id) {
                return Err(ShimError::ProcessExists {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            let status = *task.init.status.borrow();
            if status != ProcessStatus::Running {
                return Err(wrong_state(id, "", status, "running"));
            }
            let mut process = Process::new(stdio);
            process.exec_spec = spec_json;
            task.execs.insert(exec_id.to_string(), process);
        }
        self.events.exec_added(id, exec_id).await;
        Ok(())
    }

    pub async fn kill(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ShimError> {
        let kind = {
            let tasks = self.tasks.lock().await;
            let task = tasks
                .get(id)
                .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
            let status = *lookup(task, id, exec_id)?.status.borrow();
            if let ProcessStatus::Stopped { .. } = status {
                // containerd treats NotFound as "already finished".
                return Err(ShimError::ProcessNotFound {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            task.kind
        };
        if kind == TaskKind::Sandbox && exec_id.is_empty() {
            // The sandbox task is the VM: any kill stops it (CRI sends SIGKILL).
            self.stop_sandbox().await;
            return Ok(());
        }
        let sandbox = self.running_sandbox(id).await?;
        let process = ProcessId {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        sandbox
            .agent()
            .signal_process(&process, signal, all)
            .await?;
        Ok(())
    }

    async fn stop_sandbox(&self) {
        let sandbox = self.sandbox.read().await.clone();
        if let Some(sandbox) = sandbox {
            if sandbox.is_running() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), sandbox.agent().shutdown()).await;
                if let Err(e) = sandbox.vm().stop(SHUTDOWN_TIMEOUT).await {
                    warn!(error = %e, "VM did not stop cleanly");
                }
            }
        }
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<(u32, SystemTime), ShimError> {
        let mut status = {
            let tasks = self.tasks.lock().await;
            let task = tasks
                .get(id)
                .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
            lookup(task, id, exec_id)?.status.subscribe()
        };
        let stopped = status
            .wait_for(|s| matches!(s, ProcessStatus::Stopped { .. }))
            .await
            .map(|s| *s);
        match stopped {
            Ok(ProcessStatus::Stopped {
                exit_code,
                exited_at,
            }) => Ok((exit_code, exited_at)),
            // The process entry was deleted while we waited.
            _ => Err(ShimError::ProcessNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
        }
    }

    pub async fn state(&self, id: &str, exec_id: &str) -> Result<ProcessState, ShimError> {
        let pid = self.vm_pid().await;
        let tasks = self.tasks.lock().await;
        let task = tasks
            .get(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
        let process = lookup(task, id, exec_id)?;
        let status = *process.status.borrow();
        Ok(ProcessState {
            bundle: task.bundle.clone(),
            pid,
            status,
            stdio: process.stdio.clone(),
        })
    }

    /// Deletes an exec, or a whole container (its init must not be running).
    pub async fn delete(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(u32, u32, SystemTime), ShimError> {
        let pid = self.vm_pid().await;
        let mut tasks = self.tasks.lock().await;
        let task = tasks
            .get_mut(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
        let status = *lookup(task, id, exec_id)?.status.borrow();
        if status == ProcessStatus::Running {
            return Err(wrong_state(id, exec_id, status, "stopped"));
        }
        let (exit_code, exited_at) = match status {
            ProcessStatus::Stopped {
                exit_code,
                exited_at,
            } => (exit_code, exited_at),
            _ => (0, SystemTime::now()),
        };
        if !exec_id.is_empty() {
            task.execs.remove(exec_id);
            return Ok((pid, exit_code, exited_at));
        }
        let task = tasks.remove(id).expect("looked up above");
        drop(tasks);
        match task.kind {
            TaskKind::Sandbox => {
                self.stop_sandbox().await;
                if let Some(sandbox) = self.sandbox.write().await.take() {
                    if let Ok(sandbox) = Arc::try_unwrap(sandbox) {
                        let _ = sandbox.shutdown(SHUTDOWN_TIMEOUT).await;
                    }
                }
            }
            TaskKind::App => {
                if let Some(sandbox) = self.sandbox.read().await.clone() {
                    if let Err(e) = sandbox.remove_container(id).await {
                        warn!(container_id = id, error = %e, "cannot remove the container from the VM");
                    }
                }
                if task.rootfs_mounted {
                    unmount_rootfs(&task.bundle.join("rootfs"));
                }
            }
        }
        self.events.delete(id, pid, exit_code, exited_at).await;
        Ok((pid, exit_code, exited_at))
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, ShimError> {
        let kind = self.kind_of(id).await?;
        let sandbox = self.running_sandbox(id).await?;
        if kind == TaskKind::Sandbox {
            return Ok(vec![sandbox.vm().pid()]);
        }
        Ok(sandbox.agent().list_processes(id).await?)
    }

    pub async fn stats(&self, id: &str) -> Result<pb::ContainerStats, ShimError> {
        self.kind_of(id).await?;
        let sandbox = self.running_sandbox(id).await?;
        Ok(sandbox.agent().stats(id).await?)
    }

    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), ShimError> {
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources_json).map_err(
            |source| ShimError::Resources {
                id: id.to_string(),
                source,
            },
        )?;
        if self.kind_of(id).await? == TaskKind::Sandbox {
            // Pod-level resources are the VM's size; nothing runs in the sandbox task.
            return Ok(());
        }
        let sandbox = self.running_sandbox(id).await?;
        Ok(sandbox.agent().update_container(id, resources_json).await?)
    }

    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ShimError> {
        self.kind_of(id).await?;
        let sandbox = self.running_sandbox(id).await?;
        let process = ProcessId {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        Ok(sandbox.agent().resize_tty(&process, rows, cols).await?)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        self.kind_of(id).await?;
        let sandbox = self.running_sandbox(id).await?;
        let process = ProcessId {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        Ok(sandbox.agent().close_stdin(&process).await?)
    }

    async fn kind_of(&self, id: &str) -> Result<TaskKind, ShimError> {
        let tasks = self.tasks.lock().await;
        Ok(tasks
            .get(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?
            .kind)
    }

    pub async fn is_empty(&self) -> bool {
        self.tasks.lock().await.is_empty()
    }

    /// Last-resort cleanup when the shim exits: the VM must not outlive it.
    pub async fn shutdown(&self) {
        let rebuild = self
            .template_rebuild
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rebuild) = rebuild {
            // Dropping the build kills its VM and removes its files; the next pod that
            // needs the template builds it again.
            rebuild.abort();
            let _ = rebuild.await;
        }
        self.stop_sandbox().await;
        let tasks: Vec<Task> = self.tasks.lock().await.drain().map(|(_, t)| t).collect();
        for task in tasks {
            if task.rootfs_mounted {
                unmount_rootfs(&task.bundle.join("rootfs"));
            }
        }
        if let Some(sandbox) = self.sandbox.write().await.take() {
            if let Ok(sandbox) = Arc::try_unwrap(sandbox) {
                let _ = sandbox.shutdown(SHUTDOWN_TIMEOUT).await;
            }
        }
    }
}

fn lookup<'a>(task: &'a Task, id: &str, exec_id: &str) -> Result<&'a Process, ShimError> {
    if exec_id.is_empty() {
        return Ok(&task.init);
    }
    task.execs
        .get(exec_id)
        .ok_or_else(|| ShimError::ProcessNotFound {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        })
}

fn lookup_mut<'a>(
    task: &'a mut Task,
    id: &str,
    exec_id: &str,
) -> Result<&'a mut Process, ShimError> {
    if exec_id.is_empty() {
        return Ok(&mut task.init);
    }
    task.execs
        .get_mut(exec_id)
        .ok_or_else(|| ShimError::ProcessNotFound {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        })
}

fn wrong_state(id: &str, exec_id: &str, status: ProcessStatus, wanted: &'static str) -> ShimError {
    ShimError::WrongState {
        id: id.to_string(),
        exec_id: exec_id.to_string(),
        state: status.name(),
        wanted,
    }
}

/// Mounts containerd's rootfs mounts (usually one overlay) at `target`.
async fn mount_rootfs(
    id: &str,
    mounts: &[containerd_shim::protos::api::Mount],
    target: &Path,
) -> Result<(), ShimError> {
    for m in mounts {
        containerd_shim::asynchronous::util::mount_rootfs(m, target)
            .await
            .map_err(|source| ShimError::MountRootfs {
                id: id.to_string(),
                target: target.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

fn unmount_rootfs(target: &Path) {
    if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        warn!(target = %target.display(), error = %e, "cannot unmount container rootfs");
    }
}
