//! Joining a veth and its tap with tc: an ingress qdisc on each, and on each a u32 filter
//! that matches every frame and redirects it (mirred egress redirect) out of the other.
//! What arrives on the veth leaves through the tap into the guest, and what the guest sends
//! leaves through the veth, untouched by the namespace's own IP stack.

use std::path::Path;

use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};

use super::scan::{dump_links, link_kind, link_name};
use super::{in_netns, nic_for, NetworkError, NetworkPlan, PodInterface};

/// `protocol all` as tc carries it: ETH_P_ALL in network byte order.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// Joins `veth` and the tap QEMU created as `tap`; the tap gets the veth's MTU. Whatever an
/// earlier VM of the pod left on the veth is replaced.
async fn connect(handle: &Handle, veth: &PodInterface, tap: &str) -> Result<(), NetworkError> {
    let links = dump_links(handle).await?;
    let tap_index = links
        .iter()
        .find(|l| link_name(l) == Some(tap))
        .map(|l| l.header.index)
        .ok_or_else(|| NetworkError::MissingTap {
            tap: tap.to_owned(),
        })?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(veth.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink("bring the tap up", tap))?;
    remove_ingress(handle, veth.index, &veth.name).await?;
    remove_ingress(handle, tap_index, tap).await?;
    for (from, from_name, to) in [
        (veth.index, veth.name.as_str(), tap_index),
        (tap_index, tap, veth.index),
    ] {
        let from = i32::try_from(from).unwrap_or(i32::MAX);
        handle
            .qdisc()
            .add(from)
            .ingress()
            .execute()
            .await
            .map_err(netlink("add an ingress qdisc", from_name))?;
        handle
            .traffic_filter(from)
            .add()
            .parent(INGRESS_HANDLE)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map_err(netlink("build a redirect filter", from_name))?
            .execute()
            .await
            .map_err(netlink("add a redirect filter", from_name))?;
    }
    Ok(())
}

/// Removes a link's ingress qdisc and with it the redirect filter (a tap's go with the tap
/// when QEMU exits). A qdisc or link that is gone already is fine.
async fn remove_ingress(handle: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    let mut request = handle.qdisc().del(i32::try_from(index).unwrap_or(i32::MAX));
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    match request.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(message))
            if [libc::ENOENT, libc::EINVAL, libc::ENODEV].contains(&-message.raw_code()) =>
        {
            Ok(())
        }
        Err(source) => Err(NetworkError::Netlink {
            action: "remove the ingress qdisc",
            link: name.to_owned(),
            source,
        }),
    }
}

fn netlink(action: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let link = link.to_owned();
    move |source| NetworkError::Netlink {
        action,
        link,
        source,
    }
}

/// Joins every veth of `plan` to its NIC's tap (QEMU must be running in the netns).
pub async fn join_taps(plan: &NetworkPlan) -> Result<(), NetworkError> {
    let interfaces = plan.interfaces.clone();
    in_netns(&plan.netns, move |handle| async move {
        for (index, veth) in interfaces.iter().enumerate() {
            connect(&handle, veth, &nic_for(index).tap).await?;
        }
        Ok(())
    })
    .await
}

/// Undoes [`join_taps`] for every veth in the netns at `netns`: what a running shim does at
/// teardown and what `delete` does after a shim died. A netns that is gone already
/// (containerd removed it, and all it held, after the CNI teardown) is fine.
pub async fn unjoin_taps(netns: &Path) -> Result<(), NetworkError> {
    let result = in_netns(netns, |handle| async move {
        for link in dump_links(&handle).await? {
            if link_kind(&link) == Some(&InfoKind::Veth) {
                let name = link_name(&link).unwrap_or_default().to_owned();
                remove_ingress(&handle, link.header.index, &name).await?;
            }
        }
        Ok(())
    })
    .await;
    match result {
        Err(NetworkError::OpenNetns { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}
