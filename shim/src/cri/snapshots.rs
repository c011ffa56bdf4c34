//! containerd's snapshots API (not CRI) on the same socket: the mounts of a container's
//! snapshot, which `spry upgrade` reads to build a new container's layer image before
//! the old container stops.

use spry_proto::snapshots::{Mount, MountsRequest, MountsResponse};

use super::{CriClient, CriError, CALL_TIMEOUT};

/// The containerd namespace of CRI's containers and snapshots.
pub const CRI_NAMESPACE: &str = "k8s.io";

impl CriClient {
    /// The mounts of snapshot `key` in `snapshotter` (a CRI container's key is its id).
    pub async fn snapshot_mounts(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Vec<Mount>, CriError> {
        let mut message = MountsRequest::new();
        message.snapshotter = snapshotter.to_owned();
        message.key = key.to_owned();
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(
            "containerd-namespace",
            tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE),
        );
        let reply: MountsResponse = self
            .call_request(
                "Snapshots.Mounts",
                "/containerd.services.snapshots.v1.Snapshots/Mounts",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        Ok(reply.mounts)
    }
}
