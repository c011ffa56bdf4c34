//! One pod's lifecycle inside one shim: the sandbox task (the VM itself) and the app
//! containers and execs that run in it, over the [`PodVm`] trait. The task table is in
//! `tasks.rs`, the background watchers in `watchers.rs`, the VM's start in `launcher.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use oci_spec::runtime::Spec;
use spry_proto::agent as pb;
use tokio::sync::{Mutex, RwLock};
use tracing::warn;

use super::bundle_rootfs;
use super::error::ShimError;
use super::events::EventSink;
use super::io::{IoPumps, StdioPaths};
use super::launcher::SandboxLauncher;
use super::spec::{self, TaskKind};
use super::tasks::{Deleted, Process, ProcessStatus, Task, TaskTable};
use super::watchers::{self, ExitRecorder, OomFilter};
use crate::agent_client::ProcessId;
use crate::rootfs::{await_served_images, RootfsSource};
use crate::sandbox::PodVm;

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exit event waits for the process's last output to reach the FIFOs.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A snapshot of one process for the State call.
pub struct ProcessState {
    pub bundle: std::path::PathBuf,
    pub pid: u32,
    pub status: ProcessStatus,
    pub stdio: StdioPaths,
}

/// What Delete reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeletedProcess {
    pub pid: u32,
    pub exit_code: u32,
    pub exited_at: SystemTime,
}

/// Everything one shim manages.
pub struct Pod {
    launcher: Box<dyn SandboxLauncher>,
    events: EventSink,
    vm: RwLock<Option<Arc<dyn PodVm>>>,
    tasks: Mutex<TaskTable>,
    /// A template rebuild this pod started after its template proved bad.
    template_rebuild: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The config the pod's VM runs under (its handler's may name its own state dir).
    config: std::sync::OnceLock<crate::config::Config>,
    /// The bundle of the task whose VM this is: the one a dead shim's cleanup gets.
    owner_bundle: std::sync::OnceLock<std::path::PathBuf>,
    /// Which of the guest's OOM reports become events.
    oom_filter: std::sync::Mutex<OomFilter>,
    /// Woken by each exec Delete (see [`Pod::wait_for_exec_deletes`]).
    exec_deleted: tokio::sync::Notify,
}

impl Pod {
    pub fn new(launcher: Box<dyn SandboxLauncher>, events: EventSink) -> Arc<Self> {
        Arc::new(Self {
            launcher,
            events,
            vm: RwLock::new(None),
            tasks: Mutex::new(TaskTable::default()),
            template_rebuild: std::sync::Mutex::new(None),
            config: std::sync::OnceLock::new(),
            owner_bundle: std::sync::OnceLock::new(),
            oom_filter: std::sync::Mutex::default(),
            exec_deleted: tokio::sync::Notify::new(),
        })
    }

    /// QEMU's PID: every task of the pod runs inside it.
    pub async fn vm_pid(&self) -> u32 {
        self.vm
            .read()
            .await
            .as_ref()
            .map(|vm| vm.pid())
            .unwrap_or(0)
    }

    async fn running_vm(&self, id: &str) -> Result<Arc<dyn PodVm>, ShimError> {
        self.vm
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
        if self.tasks.lock().await.contains(id) {
            return Err(ShimError::ContainerExists { id: id.to_string() });
        }
        let spec = spec::load(bundle)?;
        let kind = spec::task_kind(&spec);
        // A task without CRI annotations (e.g. `ctr run`) is a pod of its own.
        let own_vm = kind == TaskKind::Sandbox
            || (spec::sandbox_id(&spec).is_none() && self.vm.read().await.is_none());
        if own_vm {
            self.boot_vm(id, &spec, options).await?;
            let _ = self.owner_bundle.set(bundle.to_path_buf());
        }
        let mut task = Task::new(kind, bundle.to_path_buf(), stdio);
        let created = match kind {
            TaskKind::App => self.create_app(id, &spec, rootfs, &mut task).await,
            TaskKind::Sandbox => Ok(()),
        };
        let inserted = match created {
            // containerd serializes calls per id; the check above stands.
            Ok(()) => self.tasks.lock().await.insert(id, task),
            Err(e) => Err(e),
        };
        if let Err(e) = inserted {
            if own_vm {
                self.stop_vm().await;
            }
            return Err(e);
        }
        if let Some(config) = self.config.get() {
            super::record_config(bundle, config);
        }
        let pid = self.vm_pid().await;
        self.events.create(id, &bundle.to_string_lossy(), pid).await;
        Ok(pid)
    }

    async fn boot_vm(
        self: &Arc<Self>,
        id: &str,
        spec: &Spec,
        options: Option<&Any>,
    ) -> Result<(), ShimError> {
        let mut slot = self.vm.write().await;
        if slot.is_some() {
            return Err(ShimError::ContainerExists { id: id.to_string() });
        }
        let launched = self.launcher.launch(id, spec, options).await?;
        let _ = self.config.set(launched.config);
        if let Some(rebuild) = launched.rebuild {
            *self
                .template_rebuild
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(rebuild);
        }
        watchers::watch_vm(self.recorder(), &launched.vm);
        watchers::watch_oom(self.recorder(), Arc::clone(&launched.vm));
        *slot = Some(launched.vm);
        Ok(())
    }

    fn recorder(self: &Arc<Self>) -> Arc<dyn ExitRecorder> {
        Arc::clone(self) as Arc<dyn ExitRecorder>
    }

    async fn create_app(
        &self,
        id: &str,
        spec: &Spec,
        rootfs: &[containerd_shim::protos::api::Mount],
        task: &mut Task,
    ) -> Result<(), ShimError> {
        let vm = self.running_vm(id).await?;
        let rootfs_dir = task.rootfs_dir();
        let owner_bundle = self.owner_bundle.get().unwrap_or(&task.bundle);
        task.rootfs = bundle_rootfs::mount(id, rootfs, &rootfs_dir, owner_bundle).await?;
        let created = async {
            let (guest_spec, volumes) =
                spec::for_guest(spec.clone()).map_err(|source| ShimError::Volume {
                    id: id.to_string(),
                    source: Box::new(source),
                })?;
            let kinds = bundle_rootfs::kinds(rootfs);
            await_served_images(&kinds).await;
            let source = RootfsSource::for_mounts(&kinds, &rootfs_dir);
            let stdio = guest_stdio(&task.init.stdio);
            vm.create_container(id, &guest_spec, &source, stdio, volumes)
                .await?;
            IoPumps::start(&vm, &ProcessId::init(id), &task.init.stdio).inspect_err(|_| {
                // Not awaited inline: the error is what matters; the removal is best effort.
                let vm = Arc::clone(&vm);
                let id = id.to_string();
                tokio::spawn(async move { vm.remove_container(&id).await });
            })
        }
        .await;
        match created {
            Ok(pumps) => {
                task.init.pumps = Some(pumps);
                Ok(())
            }
            Err(e) => {
                if let Some(mounted) = task.rootfs.take() {
                    mounted.unmount();
                }
                Err(e)
            }
        }
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let pid = self.vm_pid().await;
        let (kind, exec_spec, stdio) = {
            let mut tasks = self.tasks.lock().await;
            let (kind, process) = tasks.startable(id, exec_id)?;
            process.starting = true;
            (kind, process.exec_spec.clone(), process.stdio.clone())
        };
        // The guest is asked without the pod's task lock: a guest that stalls must not
        // hold up Kill, Delete, State or Wait of the pod's tasks.
        let in_guest = (kind, exec_id.is_empty()) != (TaskKind::Sandbox, true);
        let started = if in_guest {
            self.start_in_guest(id, exec_id, exec_spec, &stdio)
                .await
                .map(Some)
        } else {
            Ok(None)
        };
        let mut tasks = self.tasks.lock().await;
        let process = tasks.process_mut(id, exec_id)?;
        process.starting = false;
        // The VM may have died meanwhile and its watcher recorded the process as gone.
        let still_created = process.status() == ProcessStatus::Created;
        match started {
            Ok(Some((vm, pumps))) if still_created => {
                // An init's pumps started with its create; an exec's start now.
                if pumps.is_some() {
                    process.pumps = pumps;
                }
                process.exec_spec = Vec::new();
                process.set_running();
                // Under the lock: the exit it records waits for `set_running`.
                watchers::watch_exit(self.recorder(), vm, ProcessId::exec(id, exec_id));
            }
            Ok(None) if still_created => process.set_running(),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        drop(tasks);
        if exec_id.is_empty() {
            self.events.start(id, pid).await;
        } else {
            self.events.exec_started(id, exec_id, pid).await;
        }
        Ok(pid)
    }

    /// Starts a container's init or an exec in the guest; the exec's output pumps.
    async fn start_in_guest(
        &self,
        id: &str,
        exec_id: &str,
        exec_spec: Vec<u8>,
        stdio: &StdioPaths,
    ) -> Result<(Arc<dyn PodVm>, Option<IoPumps>), ShimError> {
        let vm = self.running_vm(id).await?;
        if exec_id.is_empty() {
            vm.start_container(id).await?;
            return Ok((vm, None));
        }
        let process_id = ProcessId::exec(id, exec_id);
        vm.exec_process(&process_id, exec_spec, guest_stdio(stdio))
            .await?;
        let pumps = IoPumps::start(&vm, &process_id, stdio)?;
        Ok((vm, Some(pumps)))
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
        let mut process = Process::new(stdio);
        process.exec_spec = spec_json;
        self.tasks.lock().await.add_exec(id, exec_id, process)?;
        self.events.exec_added(id, exec_id).await;
        Ok(())
    }

    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ShimError> {
        let kind = self.tasks.lock().await.killable(id, exec_id)?;
        if kind == TaskKind::Sandbox && exec_id.is_empty() {
            // The sandbox task is the VM: any kill stops it (CRI sends SIGKILL).
            self.stop_vm().await;
            return Ok(());
        }
        let vm = self.running_vm(id).await?;
        vm.signal_process(&ProcessId::exec(id, exec_id), signal, all)
            .await?;
        Ok(())
    }

    /// Stops the pod's VM and releases its resources; the watchers then record every
    /// process as exited.
    async fn stop_vm(&self) {
        let vm = self.vm.read().await.clone();
        if let Some(vm) = vm {
            if let Err(e) = vm.shutdown(SHUTDOWN_TIMEOUT).await {
                warn!(error = %crate::error_chain(&e), "the pod VM did not stop cleanly");
            }
        }
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<(u32, SystemTime), ShimError> {
        let mut status = self.tasks.lock().await.process(id, exec_id)?.subscribe();
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
        let process = tasks.process(id, exec_id)?;
        Ok(ProcessState {
            // An exec that outlived its deleted container has no bundle left to report;
            // containerd asks its state before it deletes it.
            bundle: tasks.task(id).map(|t| t.bundle.clone()).unwrap_or_default(),
            pid,
            status: process.status(),
            stdio: process.stdio.clone(),
        })
    }

    /// Deletes an exec, or a whole container (its init must not be running).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<DeletedProcess, ShimError> {
        let pid = self.vm_pid().await;
        let Deleted {
            exit_code,
            exited_at,
            task,
        } = self.tasks.lock().await.delete(id, exec_id)?;
        let deleted = DeletedProcess {
            pid,
            exit_code,
            exited_at,
        };
        let Some(task) = task else {
            self.exec_deleted.notify_waiters();
            return Ok(deleted);
        };
        self.oom_filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(id);
        match task.kind {
            TaskKind::Sandbox => {
                self.stop_vm().await;
                self.vm.write().await.take();
            }
            TaskKind::App => {
                if let Some(vm) = self.vm.read().await.clone() {
                    if let Err(e) = vm.remove_container(id).await {
                        warn!(container_id = id, error = %crate::error_chain(&e), "cannot remove the container from the VM");
                    }
                }
                if let Some(mounted) = &task.rootfs {
                    mounted.unmount();
                }
            }
        }
        self.events.delete(id, pid, exit_code, exited_at).await;
        self.wait_for_exec_deletes(id).await;
        Ok(deleted)
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, ShimError> {
        let (kind, init_alive) = {
            let tasks = self.tasks.lock().await;
            let task = tasks.task(id)?;
            let stopped = matches!(task.init.status(), ProcessStatus::Stopped { .. });
            (task.kind, !stopped)
        };
        let vm = self.running_vm(id).await?;
        if kind == TaskKind::Sandbox {
            return Ok(vec![vm.pid()]);
        }
        let pids = vm.list_processes(id).await?;
        // The guest's cgroup empties as its init dies, a moment before the exit reaches
        // us. A restarted containerd deletes a task whose list is empty and, refused (the
        // init still counts as running here), forgets a task this shim keeps: its rootfs
        // stayed mounted and the shim outlived the pod. Until the exit is in, the init
        // counts, as the VM pid State reports for it (read before the guest is asked, so
        // an init that dies in between still counts, which only delays a delete).
        if pids.is_empty() && init_alive {
            return Ok(vec![vm.pid()]);
        }
        Ok(pids)
    }

    pub async fn stats(&self, id: &str) -> Result<pb::ContainerStats, ShimError> {
        self.kind_of(id).await?;
        Ok(self.running_vm(id).await?.stats(id).await?)
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
        let vm = self.running_vm(id).await?;
        Ok(vm.update_container(id, resources_json).await?)
    }

    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ShimError> {
        self.tasks.lock().await.process(id, exec_id)?;
        let vm = self.running_vm(id).await?;
        Ok(vm
            .resize_tty(&ProcessId::exec(id, exec_id), rows, cols)
            .await?)
    }

    /// containerd's CloseIO: through the stdin pump when there is one, so what containerd
    /// wrote before is not overtaken.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let pumped = {
            let mut tasks = self.tasks.lock().await;
            let process = tasks.process_mut(id, exec_id)?;
            process.pumps.as_mut().is_some_and(|p| p.close_stdin())
        };
        if pumped {
            return Ok(());
        }
        let vm = self.running_vm(id).await?;
        Ok(vm.close_stdin(&ProcessId::exec(id, exec_id)).await?)
    }

    async fn kind_of(&self, id: &str) -> Result<TaskKind, ShimError> {
        Ok(self.tasks.lock().await.task(id)?.kind)
    }

    pub async fn is_empty(&self) -> bool {
        self.tasks.lock().await.is_empty()
    }

    /// Execs of deleted containers that containerd has not deleted yet.
    pub async fn leftover_execs(&self) -> usize {
        self.tasks.lock().await.leftover_execs()
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
        self.stop_vm().await;
        let tasks = self.tasks.lock().await.drain();
        for task in tasks {
            if let Some(mounted) = &task.rootfs {
                mounted.unmount();
            }
        }
        self.vm.write().await.take();
    }
}

// What the watchers report (exits, a dead VM, OOM kills), in a file of its own.
#[path = "pod_exec_deletes.rs"]
mod exec_deletes;
#[path = "pod_exits.rs"]
mod exits;

fn guest_stdio(stdio: &StdioPaths) -> pb::StdioConfig {
    pb::StdioConfig {
        terminal: stdio.terminal,
        stdin: !stdio.stdin.is_empty(),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "pod_tests/mod.rs"]
mod tests;
