//! Starting a pod's VM for the task service: the one place the shim turns a pod's spec and
//! containerd's runtime options into a [`Host`] and a started sandbox.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use oci_spec::runtime::Spec;
use tokio::task::JoinHandle;
use tracing::info;

use super::error::ShimError;
use super::spec::{self, PodNetns, TaskKind};
use crate::cgroup::PodCgroup;
use crate::config::Config;
use crate::host::Host;
use crate::network::{self, NetworkPlan};
use crate::pool::{Spare, NICS};
use crate::sandbox::{PodVm, Sandbox, SandboxIdentity};
use crate::template;
use crate::vm::{NetNamespace, VmConfig};

/// A started pod VM and what the pod must keep of its start.
pub struct Launched {
    pub vm: Arc<dyn PodVm>,
    /// The config the pod runs under (a handler's own, through its options, or the
    /// shim's): its state dir and what cleaning up after the shim needs.
    pub config: Config,
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
    /// A spare shim's pooled VM, for its first pod if the pod fits it (`crate::pool`).
    spare: std::sync::Mutex<Option<Spare>>,
}

impl HostLauncher {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            spare: std::sync::Mutex::new(None),
        }
    }

    /// A launcher whose first pod gets `spare`'s VM if it fits.
    pub fn with_spare(spare: Spare) -> Self {
        Self {
            config: spare.config.clone(),
            spare: std::sync::Mutex::new(Some(spare)),
        }
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
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
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
        let host = Host::new(config.clone());
        let (spare, name) = match spare {
            Some(spare) if fits(&spare.config, &config, network.as_ref()) => {
                let name = spare.name.clone();
                (Some(spare), name)
            }
            Some(spare) => {
                info!("the pod does not fit the pooled VM (another config, or not one veth); starting its own");
                spare.booted.stop().await;
                (None, super::state_name(id))
            }
            None => (None, super::state_name(id)),
        };
        let cgroup = crate::cgroup::plan(spec)
            .map_err(|source| ShimError::Cgroup {
                id: id.to_owned(),
                source,
            })?
            .map(|plan| Arc::new(PodCgroup::new(plan)));
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
            cgroup,
            ..Default::default()
        };
        if let Some(spare) = spare {
            let vm = adopt_spare(id, spare, identity).await?;
            return Ok(Launched {
                vm: Arc::new(vm),
                config,
                rebuild: None,
            });
        }
        let make_share = host.rootfs_share_factory(&name);
        let request = host.launch_request(vm_config, identity);
        let launch = template::start_sandbox(request, &make_share).await?;
        Ok(Launched {
            vm: Arc::new(launch.sandbox),
            config,
            rebuild: launch.rebuild,
        })
    }
}

/// Whether a pod with `config` and `network` can have the VM of a spare restored for
/// `spare_config`: the same config (so the same VM and template) and one veth for its NIC.
fn fits(spare_config: &Config, config: &Config, network: Option<&NetworkPlan>) -> bool {
    spare_config == config && network.is_some_and(|plan| plan.interfaces.len() == NICS)
}

/// Makes the pooled VM the pod's: the sandbox is attached as any restored VM is (cgroup,
/// tc, file share, identity), its taps first moved from QEMU's network namespace into the
/// pod's.
async fn adopt_spare(
    id: &str,
    spare: Spare,
    identity: SandboxIdentity,
) -> Result<Sandbox, ShimError> {
    if identity.network.is_none() {
        spare.booted.stop().await;
        return Err(ShimError::HostNetwork { id: id.to_owned() });
    }
    let identity = SandboxIdentity {
        taps_in: Some(PathBuf::from(format!(
            "/proc/{}/ns/net",
            spare.booted.vm().pid()
        ))),
        ..identity
    };
    let sandbox = Sandbox::attach(spare.booted, identity, spare.share).await?;
    info!(vm = %spare.name, "the pod took a pooled VM");
    Ok(sandbox)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::PodInterface;

    fn plan(veths: usize) -> NetworkPlan {
        NetworkPlan {
            interfaces: (0..veths)
                .map(|i| PodInterface {
                    index: i as u32 + 2,
                    name: format!("eth{i}"),
                    mac: [2, 0, 0, 0, 0, i as u8],
                    mtu: 1500,
                    addresses: Vec::new(),
                })
                .collect(),
            netns: "/run/netns/pod".into(),
            routes: Vec::new(),
            neighbours: Vec::new(),
        }
    }

    #[test]
    fn only_a_pod_of_the_same_config_with_one_veth_fits_a_pooled_vm() {
        let config = Config::default();
        assert!(fits(&config, &config, Some(&plan(1))));
        assert!(
            !fits(&config, &config, Some(&plan(2))),
            "two veths, one NIC"
        );
        assert!(!fits(&config, &config, Some(&plan(0))));
        assert!(!fits(&config, &config, None), "no pod network namespace");
        let mut bigger = config.clone();
        bigger.vm.memory_mib *= 2;
        assert!(!fits(&config, &bigger, Some(&plan(1))), "another config");
    }
}
