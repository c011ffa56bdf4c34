//! Starting a pod's VM for the task service: the one place the shim turns a pod's spec and
//! containerd's runtime options into a [`Host`] and a started sandbox.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use oci_spec::runtime::Spec;
use tokio::task::JoinHandle;

use super::error::ShimError;
use super::spec::{self, PodNetns, TaskKind};
use crate::config::Config;
use crate::host::Host;
use crate::network;
use crate::sandbox::{PodVm, SandboxIdentity};
use crate::template;
use crate::vm::{NetNamespace, VmConfig};

/// A started pod VM and what the pod must keep of its start.
pub struct Launched {
    pub vm: Arc<dyn PodVm>,
    /// Where the VM's state lives (the handler's config may name its own state dir).
    pub state_dir: PathBuf,
    /// A template rebuild this start set off; aborted if the pod ends first.
    pub rebuild: Option<JoinHandle<()>>,
}

/// Starts pod VMs.
#[async_trait]
pub trait SandboxLauncher: Send + Sync {
    /// Starts the VM of the pod whose sandbox task is `id`.
    async fn launch(
        &self,
        id: &str,
        spec: &Spec,
        options: Option<&Any>,
    ) -> Result<Launched, ShimError>;
}

/// The real launcher: QEMU through the composition root, from a template when possible.
pub struct HostLauncher {
    /// The shim's own config; a runtime handler's options may name another.
    config: Config,
}

impl HostLauncher {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl SandboxLauncher for HostLauncher {
    async fn launch(
        &self,
        id: &str,
        spec: &Spec,
        options: Option<&Any>,
    ) -> Result<Launched, ShimError> {
        let config = match super::options::config_from_options(options)? {
            Some(config) => config,
            None => self.config.clone(),
        };
        crate::log_filter::apply_config_level(&config.log_level);
        let state_dir = config.state_dir.clone();
        let name = super::state_name(id);
        let network = match spec::pod_netns(spec) {
            PodNetns::Path(path) => {
                Some(
                    network::scan(&path)
                        .await
                        .map_err(|source| ShimError::Network {
                            id: id.to_owned(),
                            source: Box::new(source),
                        })?,
                )
            }
            PodNetns::Unnamed => None,
            PodNetns::Host if spec::task_kind(spec) == TaskKind::Sandbox => {
                return Err(ShimError::HostNetwork { id: id.to_owned() });
            }
            PodNetns::Host => None,
        };
        let host = Host::new(config);
        let vm_config = VmConfig {
            netns: network
                .as_ref()
                .map(|plan| NetNamespace::Join(plan.netns.clone()))
                .unwrap_or_default(),
            nics: network.as_ref().map(|plan| plan.nics()).unwrap_or_default(),
            ..host.vm_config(&name)
        };
        let identity = SandboxIdentity {
            hostname: spec
                .hostname()
                .clone()
                .unwrap_or_else(|| id.chars().take(12).collect()),
            network,
            file_share: Some(host.file_share(&name)),
            shm_size_bytes: spec::shm_size(spec).unwrap_or(0),
            sysctls: spec::sysctls(spec),
            cgroup: crate::cgroup::plan(spec).map_err(|source| ShimError::Cgroup {
                id: id.to_owned(),
                source,
            })?,
            ..Default::default()
        };
        let make_share = host.rootfs_share_factory(&name);
        let request = host.launch_request(vm_config, identity);
        let launch = template::start_sandbox(request, &make_share).await?;
        Ok(Launched {
            vm: Arc::new(launch.sandbox),
            state_dir,
            rebuild: launch.rebuild,
        })
    }
}
