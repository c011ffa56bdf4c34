//! The pod's network as a [`PodResource`]: each veth joined to its NIC's tap once QEMU
//! runs (a pooled VM's taps first moved in from the namespace they were made in), the
//! joins taken apart when the sandbox goes (see `crate::network`).

use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tracing::warn;

use super::{PodResource, ResourceError};
use crate::network::{join_taps, move_taps, unjoin_taps, NetworkPlan, PortForward};
use crate::vm::Vm;

/// The network of one pod VM.
pub struct PodNetwork {
    plan: NetworkPlan,
    /// The network namespace the taps are in, when not the pod's.
    taps_in: Option<PathBuf>,
    port_forward: Mutex<Option<PortForward>>,
}

impl PodNetwork {
    pub fn new(plan: NetworkPlan) -> Self {
        Self {
            plan,
            taps_in: None,
            port_forward: Mutex::new(None),
        }
    }

    /// The taps are in the network namespace at `taps_in` (if any) until setup.
    pub fn with_taps_in(self, taps_in: Option<PathBuf>) -> Self {
        Self { taps_in, ..self }
    }
}

#[async_trait]
impl PodResource for PodNetwork {
    fn name(&self) -> &'static str {
        "pod network"
    }

    async fn setup(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        if let Some(from) = &self.taps_in {
            move_taps(from, self.plan.interfaces.len(), &self.plan.netns).await?;
        }
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
