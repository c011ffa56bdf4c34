//! The pod's containers: lifecycle through libcontainer (in a helper process), stdio, cgroups.

mod cgroup;
mod error;
pub mod helper;
mod housekeeping;
mod process;
pub mod spec;
mod stdio;

pub use helper::prepare_spares as prepare_spare_helpers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use oci_spec::runtime::LinuxResources;
use spry_proto::agent::{GuestFile, Rootfs, StdioConfig};
use tokio::sync::{mpsc, Mutex};
use tokio::task::AbortHandle;
use tracing::Instrument;

use cgroup::Cgroup;
pub use cgroup::{CgroupError, CgroupStats};
pub use error::ContainerError;
use helper::{HelperError, HelperRequest};
use housekeeping::{forget_exec_later, kill_and_wait, remove_container_dir, watch_oom};
pub use process::{ExitInfo, Process};
use spec::{GuestSettings, SpecError};
use stdio::ProcessIo;
pub use stdio::StdioError;

use crate::storage::{MountedRootfs, StorageManager};
use crate::volumes::{GuestDevice, ResolvedVolume};

/// How often memory.events is read for new OOM kills where it cannot be watched.
const OOM_POLL: Duration = Duration::from_millis(100);
/// How long teardown waits for killed processes to go away.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Exited execs kept per container for late WaitProcess/Read calls (the protocol has no
/// "delete exec"); older ones are forgotten.
const EXITED_EXECS_KEPT: usize = 128;
const PTY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
}

/// One container.
pub struct Container {
    id: String,
    dir: PathBuf,
    cgroup: Cgroup,
    rootfs: StdMutex<MountedRootfs>,
    /// Mount destinations of the spec (their contents are unknown before they are mounted).
    mount_destinations: Vec<PathBuf>,
    init: Arc<Process>,
    phase: StdMutex<Phase>,
    execs: StdMutex<HashMap<String, Arc<Process>>>,
    exited_execs: StdMutex<VecDeque<String>>,
    oom_watch: AbortHandle,
}

impl Container {
    fn state_name(&self) -> &'static str {
        if self.init.exited().is_some() {
            "stopped"
        } else if *self.phase.lock().unwrap_or_else(|p| p.into_inner()) == Phase::Created {
            "created"
        } else {
            "running"
        }
    }
}

/// Paths and roots the manager works with.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// `/run/spry` in the VM.
    pub run_dir: PathBuf,
    /// Root of the cgroup v2 hierarchy libcontainer uses (always /sys/fs/cgroup).
    pub cgroup_root: PathBuf,
}

/// All containers of the pod.
pub struct ContainerManager {
    config: ManagerConfig,
    storage: Arc<StorageManager>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: StdMutex<HashSet<String>>,
    oom_sender: mpsc::Sender<String>,
    oom_receiver: Mutex<mpsc::Receiver<String>>,
}

impl ContainerManager {
    pub fn new(config: ManagerConfig, storage: Arc<StorageManager>) -> Self {
        let (oom_sender, oom_receiver) = mpsc::channel(256);
        Self {
            config,
            storage,
            containers: Mutex::default(),
            creating: StdMutex::default(),
            oom_sender,
            oom_receiver: Mutex::new(oom_receiver),
        }
    }

    fn state_root(&self) -> PathBuf {
        self.config.run_dir.join("libcontainer")
    }

    fn cgroups_path(id: &str) -> PathBuf {
        Path::new("/spry").join(id)
    }

    pub fn storage(&self) -> &StorageManager {
        &self.storage
    }

    pub async fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound { id: id.to_string() })
    }

    /// The init (empty `exec_id`) or an exec of a container.
    pub async fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        let container = self.get(id).await?;
        if exec_id.is_empty() {
            return Ok(container.init.clone());
        }
        let execs = container.execs.lock().unwrap_or_else(|p| p.into_inner());
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })
    }

    /// OCI create: mounts the rootfs and creates the init process, stopped before exec.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &Rootfs,
        stdio: &StdioConfig,
        pod: PodMounts<'_>,
    ) -> Result<(), ContainerError> {
        spec::validate_id(id).map_err(|source| ContainerError::Spec {
            id: id.to_string(),
            source,
        })?;
        {
            let containers = self.containers.lock().await;
            let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            if containers.contains_key(id) || !creating.insert(id.to_string()) {
                return Err(ContainerError::AlreadyExists { id: id.to_string() });
            }
        }
        let span = tracing::info_span!("create", container = id);
        let result = self
            .create_inner(id, spec_json, rootfs, stdio, pod)
            .instrument(span)
            .await;
        self.creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let container = result?;
        self.containers
            .lock()
            .await
            .insert(id.to_string(), container);
        Ok(())
    }

    async fn create_inner(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &Rootfs,
        stdio: &StdioConfig,
        pod: PodMounts<'_>,
    ) -> Result<Arc<Container>, ContainerError> {
        // A spec that does not even parse (e.g. an unknown namespace type) is refused
        // before any storage is mounted for it.
        serde_json::from_slice::<oci_spec::runtime::Spec>(spec_json).map_err(|source| {
            ContainerError::Spec {
                id: id.to_string(),
                source: SpecError::Parse { source },
            }
        })?;
        let dir = self.config.run_dir.join("containers").join(id);
        std::fs::create_dir_all(&dir).map_err(|source| ContainerError::Io {
            path: dir.clone(),
            source,
        })?;
        let file_mounts = match write_guest_files(&dir, pod.files) {
            Ok(mounts) => mounts,
            Err(source) => {
                remove_container_dir(&dir);
                return Err(ContainerError::Io {
                    path: dir.join("files"),
                    source,
                });
            }
        };
        let started = Instant::now();
        let mut mounted = match self.storage.mount(id, rootfs).await {
            Ok(mounted) => mounted,
            Err(source) => {
                remove_container_dir(&dir);
                return Err(ContainerError::Storage {
                    id: id.to_string(),
                    source,
                });
            }
        };
        let mount_ms = started.elapsed().as_millis() as u64;
        match self
            .create_process(
                id,
                &dir,
                &mounted,
                spec_json,
                stdio,
                ExtraMounts {
                    resolv_conf: pod.resolv_conf,
                    files: &file_mounts,
                    volumes: pod.volumes,
                    devices: pod.devices,
                },
            )
            .await
        {
            Ok((init, mount_destinations)) => {
                tracing::info!(
                    mount_ms,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "container created"
                );
                let cgroup = Cgroup::new(&self.config.cgroup_root, &Self::cgroups_path(id));
                let oom_watch = tokio::spawn(watch_oom(
                    id.to_string(),
                    cgroup.clone(),
                    self.oom_sender.clone(),
                ));
                tokio::spawn(housekeeping::kill_leftovers_on_exit(
                    id.to_string(),
                    Arc::clone(&init),
                    cgroup.clone(),
                ));
                Ok(Arc::new(Container {
                    id: id.to_string(),
                    dir,
                    cgroup,
                    rootfs: StdMutex::new(mounted),
                    mount_destinations,
                    init,
                    phase: StdMutex::new(Phase::Created),
                    execs: StdMutex::default(),
                    exited_execs: StdMutex::default(),
                    oom_watch: oom_watch.abort_handle(),
                }))
            }
            Err(err) => {
                let _ = helper::run(
                    &HelperRequest::Delete {
                        id: id.to_string(),
                        state_root: self.state_root(),
                    },
                    Vec::new(),
                )
                .await;
                if let Err(unmount) = self.storage.unmount(&mut mounted) {
                    tracing::error!(error = %unmount, "unmounting after a failed create");
                }
                remove_container_dir(&dir);
                Err(err)
            }
        }
    }

    async fn create_process(
        &self,
        id: &str,
        dir: &Path,
        mounted: &MountedRootfs,
        spec_json: &[u8],
        stdio: &StdioConfig,
        extra: ExtraMounts<'_>,
    ) -> Result<(Arc<Process>, Vec<PathBuf>), ContainerError> {
        let spec_err = |source| ContainerError::Spec {
            id: id.to_string(),
            source,
        };
        let cgroups_path = Self::cgroups_path(id);
        let spec = spec::prepare_container_spec(
            spec_json,
            &GuestSettings {
                rootfs: &mounted.rootfs,
                readonly_rootfs: mounted.readonly,
                terminal: stdio.terminal,
                cgroups_path: &cgroups_path,
                resolv_conf: extra.resolv_conf,
                files: extra.files,
                volumes: extra.volumes,
                devices: extra.devices,
            },
        )
        .map_err(spec_err)?;
        let mount_destinations: Vec<PathBuf> = spec
            .mounts()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|m| m.destination().clone())
            .collect();
        let process = spec
            .process()
            .as_ref()
            .ok_or(SpecError::NoProcess)
            .map_err(spec_err)?;
        spec::check_process(&mounted.rootfs, process, &mount_destinations).map_err(spec_err)?;
        let bundle = dir.join("bundle");
        std::fs::create_dir_all(&bundle).map_err(|source| ContainerError::Io {
            path: bundle.clone(),
            source,
        })?;
        let config_path = bundle.join("config.json");
        let config = serde_json::to_vec(&spec).expect("a parsed spec serializes");
        std::fs::write(&config_path, config).map_err(|source| ContainerError::Io {
            path: config_path,
            source,
        })?;

        let cgroup = Cgroup::new(&self.config.cgroup_root, &cgroups_path);
        let init = self
            .spawn_with_stdio(id, stdio, cgroup, |console_socket| HelperRequest::Create {
                id: id.to_string(),
                state_root: self.state_root(),
                bundle: bundle.clone(),
                console_socket,
            })
            .await?;
        Ok((init, mount_destinations))
    }

    /// Prepares stdio, runs the helper request built by `request` (given the console socket
    /// path for terminals) and tracks the resulting process.
    async fn spawn_with_stdio(
        &self,
        id: &str,
        stdio: &StdioConfig,
        cgroup: Cgroup,
        request: impl FnOnce(Option<PathBuf>) -> HelperRequest,
    ) -> Result<Arc<Process>, ContainerError> {
        let stdio_err = |source| ContainerError::Stdio {
            id: id.to_string(),
            source,
        };
        let runtime_err = |source| ContainerError::Runtime {
            id: id.to_string(),
            source,
        };
        if stdio.terminal {
            // Not under `dir`: container and exec ids are up to 64 characters each, which
            // would overflow a unix socket path (108 bytes).
            static CONSOLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let seq = CONSOLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let consoles = self.config.run_dir.join("consoles");
            std::fs::create_dir_all(&consoles).map_err(|source| ContainerError::Io {
                path: consoles.clone(),
                source,
            })?;
            let socket_path = consoles.join(format!("{seq}.sock"));
            let listener = stdio::bind_console_socket(&socket_path).map_err(stdio_err)?;
            let pty = tokio::spawn(stdio::receive_pty_master(listener));
            let outcome = helper::run(&request(Some(socket_path.clone())), Vec::new()).await;
            let _ = std::fs::remove_file(&socket_path);
            let (pid, exit) = match outcome.and_then(|o| o.process.ok_or(HelperError::NoPid)) {
                Ok(process) => process,
                Err(err) => {
                    pty.abort();
                    return Err(runtime_err(err));
                }
            };
            let master = match tokio::time::timeout(PTY_TIMEOUT, pty).await {
                Ok(Ok(Ok(master))) => master,
                Ok(Ok(Err(err))) => return Err(stdio_err(err)),
                _ => return Err(ContainerError::PtyTimeout { id: id.to_string() }),
            };
            let rows = u16::try_from(stdio.rows).unwrap_or(u16::MAX);
            let cols = u16::try_from(stdio.cols).unwrap_or(u16::MAX);
            let io =
                ProcessIo::from_terminal(master, rows, cols, stdio.stdin).map_err(stdio_err)?;
            Ok(Process::track(pid, io, exit, cgroup))
        } else {
            let (pending, child_fds) = stdio::pipes(stdio.stdin).map_err(stdio_err)?;
            let (pid, exit) = helper::run(&request(None), child_fds)
                .await
                .and_then(|o| o.process.ok_or(HelperError::NoPid))
                .map_err(runtime_err)?;
            let io = ProcessIo::from_pipes(pending).map_err(stdio_err)?;
            Ok(Process::track(pid, io, exit, cgroup))
        }
    }

    /// OCI start.
    #[tracing::instrument(skip_all, fields(container = %id))]
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        if container.state_name() != "created" {
            return Err(ContainerError::WrongState {
                id: id.to_string(),
                action: "start",
                state: container.state_name(),
            });
        }
        let started = Instant::now();
        self.lifecycle(HelperRequest::Start {
            id: id.to_string(),
            state_root: self.state_root(),
        })
        .await?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "container started"
        );
        *container.phase.lock().unwrap_or_else(|p| p.into_inner()) = Phase::Running;
        Ok(())
    }

    /// OCI exec: starts another process in a running container.
    #[tracing::instrument(skip_all, fields(container = %id, exec = %exec_id))]
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &StdioConfig,
    ) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        let spec_err = |source| ContainerError::Spec {
            id: id.to_string(),
            source,
        };
        spec::validate_id(exec_id).map_err(spec_err)?;
        if container.state_name() != "running" {
            return Err(ContainerError::WrongState {
                id: id.to_string(),
                action: "exec in",
                state: container.state_name(),
            });
        }
        let process = spec::prepare_exec_process(process_json, stdio.terminal).map_err(spec_err)?;
        let container_root = PathBuf::from(format!("/proc/{}/root", container.init.pid));
        spec::check_process(&container_root, &process, &container.mount_destinations)
            .map_err(spec_err)?;
        {
            let execs = container.execs.lock().unwrap_or_else(|p| p.into_inner());
            if execs.contains_key(exec_id) {
                return Err(ContainerError::ExecAlreadyExists {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
        }
        let process_path = container.dir.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process).expect("a parsed process serializes");
        std::fs::write(&process_path, json).map_err(|source| ContainerError::Io {
            path: process_path.clone(),
            source,
        })?;
        let result = self
            .spawn_with_stdio(id, stdio, container.cgroup.clone(), |console_socket| {
                HelperRequest::Exec {
                    id: id.to_string(),
                    state_root: self.state_root(),
                    process_json: process_path.clone(),
                    console_socket,
                }
            })
            .await;
        let _ = std::fs::remove_file(&process_path);
        let process = result?;
        let mut execs = container.execs.lock().unwrap_or_else(|p| p.into_inner());
        if execs.contains_key(exec_id) {
            // A concurrent exec with the same id won; ours still runs and is tracked by the reaper.
            return Err(ContainerError::ExecAlreadyExists {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        }
        execs.insert(exec_id.to_string(), process.clone());
        drop(execs);
        tokio::spawn(forget_exec_later(
            container.clone(),
            exec_id.to_string(),
            process,
        ));
        Ok(())
    }

    /// Signals one process, or every process of the container with `all`.
    #[tracing::instrument(skip_all, fields(container = %id, exec = %exec_id, ?signal))]
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: Signal,
        all: bool,
    ) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        let process = self.process(id, exec_id).await?;
        if all {
            container
                .cgroup
                .signal_all(signal)
                .map_err(|source| ContainerError::Cgroup {
                    id: id.to_string(),
                    source,
                })?;
            let _ = process.signal(signal);
            return Ok(());
        }
        match process.signal(signal) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ContainerError::ProcessExited { pid: process.pid }),
            Err(source) => Err(ContainerError::Signal {
                pid: process.pid,
                source,
            }),
        }
    }

    pub async fn stats(&self, id: &str) -> Result<CgroupStats, ContainerError> {
        let container = self.get(id).await?;
        container
            .cgroup
            .stats()
            .map_err(|source| ContainerError::Cgroup {
                id: id.to_string(),
                source,
            })
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<i32>, ContainerError> {
        let container = self.get(id).await?;
        container
            .cgroup
            .pids()
            .map_err(|source| ContainerError::Cgroup {
                id: id.to_string(),
                source,
            })
    }

    /// Applies OCI LinuxResources JSON to the container's cgroup.
    #[tracing::instrument(skip_all, fields(container = %id))]
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(|source| ContainerError::Resources {
                id: id.to_string(),
                source,
            })?;
        container
            .cgroup
            .apply(&resources)
            .map_err(|source| ContainerError::Cgroup {
                id: id.to_string(),
                source,
            })
    }

    /// Removes a stopped container: its cgroup, libcontainer state, storage and directory.
    #[tracing::instrument(skip_all, fields(container = %id))]
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        if container.init.exited().is_none() {
            return Err(ContainerError::WrongState {
                id: id.to_string(),
                action: "remove",
                state: container.state_name(),
            });
        }
        let container = {
            let mut containers = self.containers.lock().await;
            match containers.remove(id) {
                Some(container) => container,
                None => return Err(ContainerError::NotFound { id: id.to_string() }),
            }
        };
        let result = self.teardown(&container).await;
        if result.is_err() {
            // Keep it visible so the host can retry the removal.
            self.containers
                .lock()
                .await
                .insert(id.to_string(), container);
        }
        result
    }

    /// Runs a start/delete request in the libcontainer helper, without stdio.
    async fn lifecycle(&self, request: HelperRequest) -> Result<(), ContainerError> {
        let id = match &request {
            HelperRequest::Start { id, .. } | HelperRequest::Delete { id, .. } => id.clone(),
            HelperRequest::Create { id, .. } | HelperRequest::Exec { id, .. } => id.clone(),
        };
        helper::run(&request, Vec::new())
            .await
            .map(drop)
            .map_err(|source| ContainerError::Runtime { id, source })
    }

    async fn teardown(&self, container: &Container) -> Result<(), ContainerError> {
        let id = &container.id;
        let started = Instant::now();
        // Without a pid namespace, processes can outlive the init: kill whatever is left.
        kill_and_wait(container).await?;
        let killed_ms = started.elapsed().as_millis() as u64;
        self.lifecycle(HelperRequest::Delete {
            id: id.clone(),
            state_root: self.state_root(),
        })
        .await?;
        let deleted_ms = started.elapsed().as_millis() as u64;
        container.oom_watch.abort();
        {
            let mut rootfs = container.rootfs.lock().unwrap_or_else(|p| p.into_inner());
            self.storage
                .unmount(&mut rootfs)
                .map_err(|source| ContainerError::Storage {
                    id: id.clone(),
                    source,
                })?;
        }
        let unmounted_ms = started.elapsed().as_millis() as u64;
        remove_container_dir(&container.dir);
        tracing::info!(
            killed_ms,
            deleted_ms,
            unmounted_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "container torn down"
        );
        Ok(())
    }

    /// Kills every container and removes it (DestroySandbox, Shutdown). Reports the first
    /// failure after trying all.
    pub async fn destroy_all(&self) -> Result<(), ContainerError> {
        let containers: Vec<Arc<Container>> = self
            .containers
            .lock()
            .await
            .drain()
            .map(|(_, c)| c)
            .collect();
        let mut first_error = None;
        for container in containers {
            let _ = container.init.signal(Signal::SIGKILL);
            if let Err(err) = self.teardown(&container).await {
                tracing::error!(container = %container.id, error = %err, "destroying container");
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The next OOM kill in any container (long poll).
    pub async fn next_oom_event(&self) -> Option<String> {
        self.oom_receiver.lock().await.recv().await
    }
}

/// Mounts the agent adds to a container's spec.
/// What the pod mounts into a container besides its rootfs.
#[derive(Debug, Clone, Copy)]
pub struct PodMounts<'a> {
    /// The pod's resolv.conf, when the spec mounts none.
    pub resolv_conf: Option<&'a Path>,
    /// Small files copied from the host.
    pub files: &'a [GuestFile],
    /// The pod's volumes this container mounts.
    pub volumes: &'a [ResolvedVolume],
    /// Host block devices plugged for this container.
    pub devices: &'a [GuestDevice],
}

struct ExtraMounts<'a> {
    /// The pod's resolv.conf, when the spec mounts none.
    resolv_conf: Option<&'a Path>,
    /// Files copied from the host: (destination, file in the guest, read-only).
    files: &'a [(PathBuf, PathBuf, bool)],
    /// The pod's volumes this container mounts.
    volumes: &'a [ResolvedVolume],
    /// Host block devices plugged for this container.
    devices: &'a [GuestDevice],
}

/// Writes the files copied from the host under `<dir>/files/`; returns their mounts as
/// (destination, file, read-only).
fn write_guest_files(
    dir: &Path,
    files: &[GuestFile],
) -> std::io::Result<Vec<(PathBuf, PathBuf, bool)>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let files_dir = dir.join("files");
    std::fs::create_dir_all(&files_dir)?;
    let mut mounts = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let path = files_dir.join(index.to_string());
        std::fs::write(&path, &file.content)?;
        mounts.push((PathBuf::from(&file.destination), path, file.readonly));
    }
    Ok(mounts)
}
