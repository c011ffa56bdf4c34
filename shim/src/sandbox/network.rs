//! The pod's network as a [`PodResource`]: each veth joined to its NIC's tap once QEMU
//! runs, the joins taken apart when the sandbox goes (see `crate::network`).

use async_trait::async_trait;
use tokio::sync::Mutex;
use tracing::warn;

use super::{PodResource, ResourceError};
use crate::network::{join_taps, unjoin_taps, NetworkPlan, PortForward};
use crate::vm::Vm;

/// The network of one pod VM.
pub struct PodNetwork {
    plan: NetworkPlan,
    port_forward: Mutex<Option<PortForward>>,
}

impl PodNetwork {
    pub fn new(plan: NetworkPlan) -> Self {
        Self {
            plan,
            port_forward: Mutex::new(None),
        }
    }
}

#[async_trait]
impl PodResource for PodNetwork {
    fn name(&self) -> &'static str {
        "pod network"
    }

    async fn setup(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        join_taps(&self.plan).await?;
        match PortForward::start(&self.plan.netns, self.plan.pod_ips()).await {
            Ok(forward) => *self.port_forward.lock().await = Some(forward),
            // The pod works without it; only `kubectl port-forward` to it does not.
            Err(e) => warn!(
                error = %crate::error_chain(&e),
                "port-forward to this pod is unavailable (it needs BPF socket lookup, Linux 5.9+)"
            ),
        }
        Ok(())
    }

    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        self.port_forward.lock().await.take();
        Ok(unjoin_taps(&self.plan.netns).await?)
    }
}
