//! The pod's network as a [`PodResource`]: each veth joined to its NIC's tap once QEMU
//! runs, the joins taken apart when the sandbox goes (see `crate::network`).

use async_trait::async_trait;

use super::{PodResource, ResourceError};
use crate::network::{join_taps, unjoin_taps, NetworkPlan};
use crate::vm::Vm;

/// The network of one pod VM.
pub struct PodNetwork {
    plan: NetworkPlan,
}

impl PodNetwork {
    pub fn new(plan: NetworkPlan) -> Self {
        Self { plan }
    }

    pub fn plan(&self) -> &NetworkPlan {
        &self.plan
    }
}

#[async_trait]
impl PodResource for PodNetwork {
    fn name(&self) -> &'static str {
        "pod network"
    }

    async fn setup(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        Ok(join_taps(&self.plan).await?)
    }

    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        Ok(unjoin_taps(&self.plan.netns).await?)
    }
}
