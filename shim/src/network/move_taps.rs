//! Moving a running VM's taps into a pod's network namespace: how a pooled VM, restored
//! before its pod existed with its taps in a namespace of its own, joins the pod's
//! network. A tap keeps its queue (QEMU's fd) across namespaces, so the guest's NICs stay
//! as they are; `tc.rs` then joins each tap to its veth as for any VM.

use std::os::fd::AsRawFd;
use std::path::Path;

use super::scan::{dump_links, link_name};
use super::{in_netns, nic_for, NetworkError};

/// Moves the taps of NICs `0..count` from the network namespace at `from` (e.g.
/// `/proc/<QEMU>/ns/net`) into the one at `to`.
pub async fn move_taps(from: &Path, count: usize, to: &Path) -> Result<(), NetworkError> {
    let target = std::fs::File::open(to).map_err(|source| NetworkError::OpenNetns {
        path: to.to_path_buf(),
        source,
    })?;
    in_netns(from, move |handle| async move {
        let links = dump_links(&handle).await?;
        for index in 0..count {
            let tap = nic_for(index).tap;
            let link = links
                .iter()
                .find(|l| link_name(l) == Some(tap.as_str()))
                .ok_or_else(|| NetworkError::MissingTap { tap: tap.clone() })?;
            handle
                .link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(link.header.index)
                        .setns_by_fd(target.as_raw_fd())
                        .build(),
                )
                .execute()
                .await
                .map_err(|source| NetworkError::Netlink {
                    action: "move the tap into the pod's network namespace",
                    link: tap.clone(),
                    source,
                })?;
        }
        Ok(())
    })
    .await
}
