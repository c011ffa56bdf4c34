//! The QEMU microvm implementation of [`Hypervisor`] and [`Vm`].

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::Instrument;

use super::cmdline::StatePaths;
use super::console;
use super::launch::{launch, Launched};
use super::qmp::{QmpClient, QmpError};
use super::scsi_slots::{ScsiSlots, Unplug};
use super::startup::{connect_qmp, exit_from, wait_exit};
use super::validate::{require_boot_files, validate};
use super::{
    accel, snapshot, tsc, Accel, AgentChannelKind, AgentEndpoint, HostRelease, Hypervisor,
    ScsiAddr, Vm, VmConfig, VmError, VmExit, AGENT_VSOCK_PORT,
};
use crate::sys;
use block_nodes::{device_id, node_name};
use empty_disk::EmptyDisks;

mod block_nodes;
mod empty_disk;

const QUIT_GRACE: Duration = Duration::from_secs(3);
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Under the state root: the locks of the uids jailed QEMUs run as.
pub const JAIL_UID_DIR: &str = "jail-uids";

/// Starts QEMU microvm guests. `state_root` holds shared state (the KVM probe
/// cache and probe guests); each VM's own dir is `VmConfig::state_dir`.
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    state_root: PathBuf,
}

impl QemuHypervisor {
    pub fn new(state_root: impl Into<PathBuf>) -> Self {
        Self {
            state_root: state_root.into(),
        }
    }
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    async fn start(&self, config: VmConfig) -> Result<Box<dyn Vm>, VmError> {
        let span = tracing::info_span!("vm", vm_id = %config.id);
        Ok(Box::new(
            QemuVm::start(config, &self.state_root)
                .instrument(span)
                .await?,
        ))
    }

    async fn snapshot_fingerprint(&self, config: &VmConfig) -> Result<String, VmError> {
        require_boot_files(config)?;
        let accel = accel::resolve(config, &self.state_root).await;
        snapshot::fingerprint(config, accel)
    }
}

/// A running QEMU. Dropping it kills QEMU and removes the state dir.
pub struct QemuVm {
    id: String,
    pid: u32,
    accel: Accel,
    paths: StatePaths,
    agent_endpoint: AgentEndpoint,
    cleanup: Cleanup,
    qmp: Arc<QmpClient>,
    exit: watch::Receiver<Option<VmExit>>,
    scsi_slots: ScsiSlots,
    empty_disks: EmptyDisks,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("accel", &self.accel)
            .finish()
    }
}

/// Everything a VM leaves on the host, released in `Drop` on every path:
/// QEMU (SIGKILL through a pidfd, so a recycled PID is never hit) and the
/// state dir.
struct Cleanup {
    state_dir: PathBuf,
    qemu: Option<(OwnedFd, watch::Receiver<Option<VmExit>>)>,
}

impl Cleanup {
    fn run(&mut self) {
        if let Some((pidfd, exit)) = self.qemu.take() {
            if exit.borrow().is_none() {
                // ESRCH means it already died: nothing to do.
                let _ = sys::pidfd_send_signal(&pidfd, libc::SIGKILL);
            }
        }
        match fs::remove_dir_all(&self.state_dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.state_dir.display(), %error, "cannot remove VM state dir")
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

impl QemuVm {
    async fn start(config: VmConfig, state_root: &Path) -> Result<Self, VmError> {
        let started = Instant::now();
        validate(&config)?;
        let paths = StatePaths::new(&config.state_dir);
        // Only a booting kernel needs the TSC rate (a restored one keeps its own), and
        // measuring it costs 50 ms where the kernel does not export it.
        let tsc_khz = if config.restore.is_some() {
            0
        } else {
            tokio::task::spawn_blocking(tsc::host_tsc_khz)
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("TSC measurement panicked")))
                .map_err(|source| VmError::TscFrequency { source })?
        };
        let accel = accel::resolve(&config, state_root).await;
        // The parent (e.g. <state_root>/vms) is shared by all VMs; the VM's own dir must be new.
        let created = match config.state_dir.parent() {
            Some(parent) => {
                fs::create_dir_all(parent).and_then(|()| fs::create_dir(&config.state_dir))
            }
            None => fs::create_dir(&config.state_dir),
        };
        match created {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(VmError::StateDirExists {
                    path: config.state_dir.clone(),
                });
            }
            Err(source) => {
                return Err(VmError::StateDir {
                    path: config.state_dir.clone(),
                    source,
                })
            }
        }
        let mut cleanup = Cleanup {
            state_dir: config.state_dir.clone(),
            qemu: None,
        };

        let Launched { mut child, lease } = launch(
            &config,
            accel,
            tsc_khz,
            &paths,
            &state_root.join(JAIL_UID_DIR),
        )
        .await?;
        let pid = child.id().unwrap_or_default();
        // Until the child is reaped its PID cannot be reused, so this pidfd
        // is QEMU's.
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(source) => {
                let _ = child.start_kill();
                return Err(VmError::Signal { pid, source });
            }
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        cleanup.qemu = Some((pidfd, exit_rx.clone()));
        let console_log = paths.console_log.clone();
        let console_trimmer = tokio::spawn(console::keep_bounded(console_log.clone()));
        tokio::spawn(
            async move {
                let status = child.wait().await;
                // QEMU is gone: its uid may serve another VM.
                drop(lease);
                console_trimmer.abort();
                let exit = exit_from(status.ok(), &console_log);
                tracing::info!(%exit, "QEMU exited");
                let _ = exit_tx.send(Some(exit));
            }
            .in_current_span(),
        );

        let qmp = match connect_qmp(&config.id, &paths, exit_rx.clone()).await {
            Ok(qmp) => qmp,
            Err(error) => {
                cleanup.run();
                return Err(error);
            }
        };
        if let Some(state) = &config.restore {
            if let Err(error) = snapshot::restore(&qmp, &config.id, state, &exit_rx).await {
                cleanup.run();
                return Err(error);
            }
        }
        let agent_endpoint = match config.agent_channel {
            AgentChannelKind::VirtioSerial => AgentEndpoint::VirtioSerial {
                socket: paths.agent_socket.clone(),
            },
            AgentChannelKind::Vsock { cid } => AgentEndpoint::Vsock {
                cid,
                port: AGENT_VSOCK_PORT,
            },
        };
        tracing::info!(
            pid,
            %accel,
            cpus = config.cpus,
            memory_mib = config.memory_mib,
            restored = config.restore.is_some(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "VM started"
        );
        Ok(Self {
            id: config.id,
            pid,
            accel,
            paths,
            agent_endpoint,
            cleanup,
            qmp: Arc::new(qmp),
            exit: exit_rx,
            scsi_slots: ScsiSlots::default(),
            empty_disks: EmptyDisks::default(),
        })
    }

    fn qmp_error(&self, source: QmpError) -> VmError {
        VmError::Qmp {
            id: self.id.clone(),
            source,
        }
    }

    fn exited(&self) -> Option<VmError> {
        let exit = self.exit.borrow().clone()?;
        Some(VmError::Exited {
            id: self.id.clone(),
            exit,
        })
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn console_log(&self) -> &Path {
        &self.paths.console_log
    }

    fn agent_endpoint(&self) -> AgentEndpoint {
        self.agent_endpoint.clone()
    }

    fn share_socket(&self) -> &Path {
        &self.paths.share_socket
    }

    async fn hotplug_disk(&self, image: &Path, read_only: bool) -> Result<ScsiAddr, VmError> {
        if let Some(error) = self.exited() {
            return Err(error);
        }
        // QEMU runs in the state dir: hand it an absolute path, and fail here
        // with the file's name rather than in QMP.
        let image = fs::canonicalize(image).map_err(|source| VmError::DiskImage {
            path: image.to_owned(),
            source,
        })?;
        // A file image, or a host block device (CRI devices): QEMU's `file` driver refuses
        // block devices, `host_device` takes them.
        let file_driver = match fs::metadata(&image) {
            Ok(meta) if meta.is_file() => "file",
            Ok(meta) if meta.file_type().is_block_device() => "host_device",
            _ => {
                let source = std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file or a block device",
                );
                return Err(VmError::DiskImage {
                    path: image,
                    source,
                });
            }
        };
        let addr = self.reserve_target()?;
        let started = Instant::now();
        let node = node_name(addr);
        let added = self
            .add_block_node(&image, file_driver, &node, read_only)
            .await;
        if let Err(error) = added {
            self.scsi_slots.cancel(addr);
            return Err(error);
        }
        self.add_scsi_device(addr, &node).await?;
        tracing::info!(
            image = %image.display(),
            target = addr.target,
            lun = addr.lun,
            read_only,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "disk hot-plugged"
        );
        Ok(addr)
    }

    async fn plug_empty_disk(&self, bytes: u64) -> Result<ScsiAddr, VmError> {
        self.plug_empty(bytes).await
    }

    async fn fill_disk(&self, addr: ScsiAddr, image: &Path) -> Result<(), VmError> {
        self.fill(addr, image).await
    }

    async fn unplug_disk(&self, addr: ScsiAddr, release: HostRelease) -> Result<(), VmError> {
        if !self.scsi_slots.is_plugged(addr) {
            return Err(VmError::UnknownDisk {
                id: self.id.clone(),
                addr,
            });
        }
        if let Some(error) = self.exited() {
            return Err(error);
        }
        let unplug = Unplug {
            vm_id: self.id.clone(),
            qmp: self.qmp.clone(),
            exit: self.exit.clone(),
            slots: self.scsi_slots.clone(),
            addr,
            device_id: device_id(addr),
            node_name: node_name(addr),
            file_node: self.empty_disks.unplugging(addr),
        };
        unplug.run(release).await
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }

    async fn save_snapshot(&self, state: &Path) -> Result<(), VmError> {
        if let Some(error) = self.exited() {
            return Err(error);
        }
        let started = Instant::now();
        snapshot::save(&self.qmp, &self.id, state).await?;
        tracing::info!(
            state = %state.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "VM saved"
        );
        Ok(())
    }

    async fn stop(&self, timeout: Duration) -> Result<VmExit, VmError> {
        let mut exit = self.exit.clone();
        let mut result = wait_exit(&mut exit, timeout).await;
        if result.is_none() {
            tracing::info!("VM did not exit on its own; asking QEMU to quit");
            // The reply may never come: QEMU exits while answering.
            let _ = tokio::time::timeout(QUIT_GRACE, self.qmp.execute("quit", None)).await;
            result = wait_exit(&mut exit, QUIT_GRACE).await;
        }
        if result.is_none() {
            tracing::warn!("QEMU ignored quit; killing it");
            if let Some((pidfd, _)) = &self.cleanup.qemu {
                sys::pidfd_send_signal(pidfd, libc::SIGKILL).map_err(|source| VmError::Signal {
                    pid: self.pid,
                    source,
                })?;
            }
            result = wait_exit(&mut exit, KILL_GRACE).await;
        }
        let exit = result.ok_or_else(|| VmError::StopTimeout {
            id: self.id.clone(),
        })?;
        match fs::remove_dir_all(&self.cleanup.state_dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VmError::StateDir {
                    path: self.cleanup.state_dir.clone(),
                    source,
                })
            }
        }
        Ok(exit)
    }
}
