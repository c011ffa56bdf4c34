//! A pod sandbox: one VM, its agent, and the pod's resources (see `resources.rs`).
//!
//! This is the layer the shim's task service and `spry vm run` stand on; the task service
//! sees it only through the [`PodVm`] trait (`pod_vm.rs`). It owns the order of operations
//! that keeps the host clean: a rootfs is attached before the agent creates the container
//! and detached after the agent removed it, a sandbox that fails half-way through starting
//! stops its VM before returning the error, and shutdown (in one place, any number of
//! calls) stops the VM and then tears the resources down.

mod idle_prep;
mod network;
mod pod_vm;
mod resources;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spry_proto::agent as pb;
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};

use crate::agent_client::{
    AgentClient, AgentError, AgentTransport, VirtioSerialTransport, VsockTransport,
};
use crate::cgroup::PodCgroup;
use crate::network::NetworkPlan;
use crate::rootfs::{RootfsError, RootfsShare};
use crate::vm::{AgentEndpoint, Hypervisor, Vm, VmConfig, VmError, VmExit};
use crate::volumes::{ContainerDevices, FileShare, FileShareConfig, PodLocalDisks, VolumeWatches};
use idle_prep::IdlePreparation;

pub use network::PodNetwork;
pub use pod_vm::{PodVm, ProcessExit};
pub use resources::{AttachError, PodResource, PodResources, ResourceError, RootfsDisks};

/// How long to wait for a booted VM's agent to answer. Generous: under TCG on a loaded
/// 2-core host a boot that normally takes 2 s can take many times that.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Failure of a sandbox operation.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start the VM of sandbox {id}")]
    StartVm {
        id: String,
        #[source]
        source: VmError,
    },
    #[error("the VM of sandbox {id} exited before its agent answered ({exit}); console tail:\n{console_tail}")]
    DiedDuringBoot {
        id: String,
        exit: String,
        console_tail: String,
    },
    #[error("the agent of sandbox {id} did not come up")]
    Agent {
        id: String,
        #[source]
        source: AgentError,
    },
    #[error("container {container_id}")]
    Container {
        container_id: String,
        #[source]
        source: AgentError,
    },
    #[error("container {container_id} already exists in sandbox {id}")]
    ContainerExists { id: String, container_id: String },
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Volume(#[from] crate::volumes::VolumeError),
    #[error("cannot stop the VM of sandbox {id}")]
    StopVm {
        id: String,
        #[source]
        source: VmError,
    },
}

/// Pod identity given to the guest after boot (never baked into the VM image, so VMs
/// restored from a shared template each get their own).
#[derive(Debug, Clone, Default)]
pub struct SandboxIdentity {
    pub hostname: String,
    pub dns_nameservers: Vec<String>,
    pub dns_searches: Vec<String>,
    pub dns_options: Vec<String>,
    /// The pod's network namespace as CNI left it; the VM must have been given
    /// [`NetworkPlan::nics`] in that namespace. None: a VM without NICs.
    pub network: Option<NetworkPlan>,
    /// Where the VM's taps are when not yet in the pod's namespace (a pooled VM's, made
    /// before its pod): moved from there as the network is set up.
    pub taps_in: Option<std::path::PathBuf>,
    /// The pod's file share for its host volumes; None: containers get none.
    pub file_share: Option<FileShareConfig>,
    /// Size of the pod's /dev/shm; 0: the agent's default.
    pub shm_size_bytes: u64,
    /// The pod's sysctls, set in the guest (whose namespaces are the pod's).
    pub sysctls: std::collections::HashMap<String, String>,
    /// The pod's host cgroup (its dirs made before the VM starts, see
    /// [`PodCgroup::prepare`]), which QEMU and the file server join; None: they stay in
    /// the shim's.
    pub cgroup: Option<Arc<PodCgroup>>,
}

/// A running pod VM with a connected agent.
pub struct Sandbox {
    id: String,
    /// Shared only with [`IdlePreparation`]'s task, which ends without it.
    vm: Arc<dyn Vm>,
    agent: AgentClient,
    rootfs: Arc<RootfsDisks>,
    share: Option<Arc<FileShare>>,
    cgroup: Option<Arc<PodCgroup>>,
    watches: Arc<VolumeWatches>,
    /// emptyDir disks, plugged for the pod's life.
    pod_disks: PodLocalDisks,
    /// Host block devices, plugged per container.
    devices: ContainerDevices,
    resources: PodResources,
    idle_prep: IdlePreparation,
}

/// A running VM whose agent answered, not yet any pod's: what a pod's start makes first,
/// and what a warm pool keeps ready (`crate::pool`).
pub struct BootedVm {
    vm: Box<dyn Vm>,
    agent: AgentClient,
}

impl BootedVm {
    /// Starts the VM and waits for its agent; on failure the VM is stopped.
    pub async fn boot(
        hypervisor: &dyn Hypervisor,
        vm_config: VmConfig,
        boot_timeout: Duration,
    ) -> Result<Self, SandboxError> {
        let id = vm_config.id.clone();
        let vm = hypervisor
            .start(vm_config)
            .await
            .map_err(|source| SandboxError::StartVm {
                id: id.clone(),
                source,
            })?;
        match connect_agent(vm.as_ref(), boot_timeout).await {
            Ok(agent) => Ok(Self { vm, agent }),
            Err(err) => {
                stop_quietly(vm.as_ref()).await;
                Err(err)
            }
        }
    }

    pub fn vm(&self) -> &dyn Vm {
        self.vm.as_ref()
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Stops the VM (it was never given to a pod).
    pub async fn stop(self) {
        stop_quietly(self.vm.as_ref()).await;
    }
}

impl Sandbox {
    /// Boots the VM, waits for its agent and hands it the pod identity. On any failure
    /// the VM is stopped and its state removed before the error is returned.
    pub async fn start(
        hypervisor: &dyn Hypervisor,
        vm_config: VmConfig,
        identity: SandboxIdentity,
        rootfs_share: Box<dyn RootfsShare>,
        boot_timeout: Duration,
    ) -> Result<Self, SandboxError> {
        let span = info_span!("sandbox", sandbox_id = %vm_config.id);
        async move {
            // QEMU is spawned into the pod's cgroup, so a boot's or a restore's memory
            // is the pod's from the first page (a process that moves later leaves what
            // it allocated before charged where it was).
            let vm_config = match &identity.cgroup {
                Some(cgroup) => VmConfig {
                    cgroup: cgroup.prepare().await.map_err(ResourceError::from)?,
                    ..vm_config
                },
                None => vm_config,
            };
            let booted = match BootedVm::boot(hypervisor, vm_config, boot_timeout).await {
                Ok(booted) => booted,
                Err(e) => {
                    if let Some(cgroup) = &identity.cgroup {
                        cgroup.remove().await;
                    }
                    return Err(e);
                }
            };
            Self::attach_here(booted, identity, rootfs_share).await
        }
        .instrument(span)
        .await
    }

    /// Makes a booted VM the pod's: sets the pod's resources up (cgroup, network, file
    /// share) and hands the guest the pod identity. On failure the VM is stopped and
    /// what was set up is torn down.
    pub async fn attach(
        booted: BootedVm,
        identity: SandboxIdentity,
        rootfs_share: Box<dyn RootfsShare>,
    ) -> Result<Self, SandboxError> {
        let span = info_span!("sandbox", sandbox_id = %booted.vm.id());
        Self::attach_here(booted, identity, rootfs_share)
            .instrument(span)
            .await
    }

    /// [`Self::attach`] in the caller's span.
    async fn attach_here(
        booted: BootedVm,
        identity: SandboxIdentity,
        rootfs_share: Box<dyn RootfsShare>,
    ) -> Result<Self, SandboxError> {
        let BootedVm { vm, agent } = booted;
        let id = vm.id().to_owned();
        let rootfs = Arc::new(RootfsDisks::new(rootfs_share));
        // Set up together; torn down in reverse of this order, so the cgroup goes last,
        // once every process in it (QEMU, the file server) is gone.
        let mut items: Vec<Arc<dyn PodResource>> = Vec::new();
        let cgroup = identity.cgroup.clone();
        if let Some(cgroup) = &cgroup {
            items.push(cgroup.clone());
        }
        if let Some(plan) = &identity.network {
            let network = PodNetwork::new(plan.clone()).with_taps_in(identity.taps_in.clone());
            items.push(Arc::new(network));
        }
        let share = identity.file_share.clone().map(|config| {
            let pod_cgroup = cgroup.as_ref().map(|c| c.dirs().to_vec());
            Arc::new(FileShare::new(config).spawned_in(pod_cgroup.unwrap_or_default()))
        });
        if let Some(share) = &share {
            items.push(share.clone());
        }
        let watches = Arc::new(VolumeWatches::default());
        items.push(watches.clone());
        items.push(rootfs.clone());
        let resources = PodResources::new(items);
        let sandbox = Sandbox {
            id: id.clone(),
            vm: Arc::from(vm),
            agent,
            rootfs,
            share,
            cgroup,
            watches,
            pod_disks: PodLocalDisks::default(),
            devices: ContainerDevices::default(),
            resources,
            idle_prep: IdlePreparation::default(),
        };
        if let Err(e) = sandbox.resources.setup(sandbox.vm.as_ref()).await {
            stop_quietly(sandbox.vm.as_ref()).await;
            return Err(e.into());
        }
        if let Err(source) = sandbox
            .agent
            .create_sandbox(identity_request(&id, identity))
            .await
        {
            let _ = sandbox.shutdown(Duration::from_secs(1)).await;
            return Err(SandboxError::Agent { id, source });
        }
        info!(
            accel = ?sandbox.vm.accel(),
            kernel = %sandbox.agent.info.kernel_release,
            "sandbox ready"
        );
        Ok(sandbox)
    }

    /// Gets the VM ready for a container to come, once it has idled a moment. Not when the
    /// sandbox is ready: its first container comes right after (crictl, kubelet with the
    /// image on the node) and the guest's probe of the disk would land in that container's
    /// create. A pooled VM has its disk from its spare's idle time.
    fn prepare_next_container(&self) {
        self.idle_prep
            .schedule(Arc::clone(&self.vm), Arc::clone(&self.rootfs));
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Takes a container's volumes out of the pod's file share, stops syncing its synced
    /// volumes and unplugs its block devices (the guest is done with them).
    async fn unexport_volumes(&self, container_id: &str) {
        self.devices.detach(self.vm.as_ref(), container_id).await;
        self.watches.stop(container_id).await;
        if let Some(share) = &self.share {
            share.unexport(container_id).await;
        }
    }

    pub fn vm(&self) -> &dyn Vm {
        self.vm.as_ref()
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Fires when the VM exits, for whatever reason.
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.vm.exit_watch()
    }

    pub fn is_running(&self) -> bool {
        self.vm.exit_watch().borrow().is_none()
    }

    /// Asks the guest to power off, waits up to `timeout`, then forces the VM down and
    /// tears the pod's resources down. Every host resource of the sandbox is gone when
    /// this returns, error or not; later calls only report how the VM ended.
    pub async fn shutdown(&self, timeout: Duration) -> Result<VmExit, SandboxError> {
        let span = info_span!("sandbox", sandbox_id = %self.id);
        async move {
            self.idle_prep.cancel();
            if self.is_running() {
                // The reply may never come (the guest powers off first); the VM's exit
                // is what we wait for.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.agent.shutdown()).await;
            }
            let exit = self.vm.stop(timeout).await;
            self.resources.teardown(self.vm.as_ref()).await;
            exit.map_err(|source| SandboxError::StopVm {
                id: self.id.clone(),
                source,
            })
        }
        .instrument(span)
        .await
    }
}

fn transport_for(endpoint: AgentEndpoint) -> Box<dyn AgentTransport> {
    match endpoint {
        AgentEndpoint::VirtioSerial { socket } => Box::new(VirtioSerialTransport { socket }),
        AgentEndpoint::Vsock { cid, port } => Box::new(VsockTransport { cid, port }),
    }
}

/// Connects to the agent, giving up early if the VM dies while we wait.
pub async fn connect_agent(vm: &dyn Vm, timeout: Duration) -> Result<AgentClient, SandboxError> {
    let id = vm.id().to_string();
    let transport = transport_for(vm.agent_endpoint());
    let mut exit = vm.exit_watch();
    tokio::select! {
        result = AgentClient::connect(transport.as_ref(), timeout) => {
            result.map_err(|source| SandboxError::Agent { id, source })
        }
        exit = exit.wait_for(|e| e.is_some()) => {
            let exit = exit.ok().and_then(|e| e.clone()).unwrap_or(VmExit { code: None, signal: None, console_tail: String::new() });
            Err(SandboxError::DiedDuringBoot {
                id,
                exit: exit.to_string(),
                console_tail: exit.console_tail.clone(),
            })
        }
    }
}

async fn stop_quietly(vm: &dyn Vm) {
    if let Err(e) = vm.stop(Duration::from_secs(1)).await {
        warn!(error = %e, "cannot stop VM after a failed start");
    }
}

fn identity_request(id: &str, identity: SandboxIdentity) -> pb::CreateSandboxRequest {
    let entropy = host_entropy();
    let network = identity
        .network
        .as_ref()
        .map(NetworkPlan::guest_request)
        .unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default();
    pb::CreateSandboxRequest {
        sandbox_id: id.to_string(),
        hostname: identity.hostname,
        dns_nameservers: identity.dns_nameservers,
        dns_searches: identity.dns_searches,
        dns_options: identity.dns_options,
        entropy,
        clock_unix_nanos: now,
        interfaces: network.interfaces,
        routes: network.routes,
        neighbours: network.neighbours,
        file_share: identity.file_share.is_some(),
        shm_size_bytes: identity.shm_size_bytes,
        sysctls: identity.sysctls,
        ..Default::default()
    }
}

/// 64 bytes from the host's CSPRNG for the guest to mix in. Without it, VMs cloned from
/// one template would produce the same "random" numbers.
fn host_entropy() -> Vec<u8> {
    use std::io::Read;
    let mut entropy = vec![0u8; 64];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut entropy)) {
        Ok(()) => entropy,
        Err(e) => {
            // The guest still seeds itself from virtio-rng; this only weakens clones.
            warn!(error = %e, "cannot read host entropy for the guest");
            Vec::new()
        }
    }
}
