//! Applying a [`NetworkConfig`] to the VM's network stack over rtnetlink.
//!
//! Order matters: addresses go on while the NIC is down, so that bringing it up makes the
//! kernel announce them (`arp_notify`, `ndisc_notify`: peers and the bridge learn that the
//! pod IP now answers from this MAC); routes come after the link is up (a gateway must be
//! reachable), directly connected ones first. Every step replaces rather than adds, so a
//! repeated CreateSandbox of the same pod applies cleanly.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::{Mac, NetworkConfig, NetworkError};

/// Sysctls that make the kernel announce an address when its link comes up.
const ANNOUNCE_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/conf/all/arp_notify",
    "/proc/sys/net/ipv6/conf/all/ndisc_notify",
];

/// Brings loopback up and configures every NIC `config` names.
pub async fn apply(config: &NetworkConfig) -> Result<(), NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetworkError::Connect { source })?;
    let connection = tokio::spawn(connection);
    let result = apply_with(&handle, config).await;
    connection.abort();
    result
}

pub(super) async fn apply_with(
    handle: &Handle,
    config: &NetworkConfig,
) -> Result<(), NetworkError> {
    let links = links(handle).await?;
    // Each netlink round trip is a few ms of a pod's start in a TCG guest: what is
    // already as wanted is left alone.
    if let Some(lo) = links.iter().find(|l| l.name == "lo" && !l.up) {
        set_link(
            handle,
            "lo",
            LinkUnspec::new_with_index(lo.index).up().build(),
        )
        .await?;
    }
    if config.interfaces.is_empty() {
        return Ok(());
    }
    for path in ANNOUNCE_SYSCTLS {
        std::fs::write(path, "1").map_err(|source| NetworkError::Sysctl {
            path: path.to_owned(),
            source,
        })?;
    }
    // NIC i of the request, found by its boot MAC (or, when this is a repeat, by the MAC
    // it already took over).
    let mut nics: Vec<&Link> = Vec::new();
    for nic in &config.interfaces {
        let link = links
            .iter()
            .find(|l| l.mac == Some(nic.device_mac) || l.mac == Some(nic.mac))
            .ok_or_else(|| NetworkError::NoSuchNic {
                name: nic.name.clone(),
                device_mac: format_mac(nic.device_mac),
            })?;
        nics.push(link);
    }
    let indexes: Vec<u32> = nics.iter().map(|l| l.index).collect();
    if needs_temporary_names(config, &nics, &links) {
        // Temporary names first: the guest's eth1 may have to become eth0 while eth0
        // still holds that name.
        for (i, (nic, index)) in config.interfaces.iter().zip(&indexes).enumerate() {
            let message = LinkUnspec::new_with_index(*index)
                .down()
                .name(format!("spry-nic{i}"))
                .build();
            set_link(handle, &nic.name, message).await?;
        }
    } else {
        // A NIC's MAC changes only while it is down (a restored VM's are).
        for (nic, link) in config.interfaces.iter().zip(&nics) {
            if link.up {
                let message = LinkUnspec::new_with_index(link.index).down().build();
                set_link(handle, &nic.name, message).await?;
            }
        }
    }
    for (nic, index) in config.interfaces.iter().zip(&indexes) {
        let message = LinkUnspec::new_with_index(*index)
            .name(nic.name.clone())
            .address(nic.mac.0.to_vec())
            .mtu(nic.mtu)
            .build();
        set_link(handle, &nic.name, message).await?;
        for cidr in &nic.addresses {
            let mut request = handle
                .address()
                .add(*index, cidr.address, cidr.prefix_len)
                .replace();
            if cidr.address.is_ipv6() {
                // Duplicate address detection would hold the address back for a second or
                // more; the CNI plugin already owns it.
                request
                    .message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            request
                .execute()
                .await
                .map_err(netlink_error("add an address", &nic.name))?;
        }
        set_link(
            handle,
            &nic.name,
            LinkUnspec::new_with_index(*index).up().build(),
        )
        .await?;
    }
    for route in &config.routes {
        let name = &config.interfaces[route.interface].name;
        let message = route_message(route, indexes[route.interface]).ok_or_else(|| {
            NetworkError::BadRoute {
                destination: format!(
                    "{}/{}",
                    route.destination.address, route.destination.prefix_len
                ),
            }
        })?;
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(netlink_error("add a route", name))?;
    }
    for neighbour in &config.neighbours {
        let name = &config.interfaces[neighbour.interface].name;
        handle
            .neighbours()
            .add(indexes[neighbour.interface], neighbour.address)
            .link_layer_address(&neighbour.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(netlink_error("add a neighbour", name))?;
    }
    Ok(())
}

/// Whether some NIC's new name is held by another link now (the guest's eth1 becoming
/// eth0, say): then every NIC takes a temporary name first.
fn needs_temporary_names(config: &NetworkConfig, nics: &[&Link], links: &[Link]) -> bool {
    config.interfaces.iter().zip(nics).any(|(nic, own)| {
        links
            .iter()
            .any(|l| l.name == nic.name && l.index != own.index)
    })
}

fn route_message(
    route: &super::RouteConfig,
    index: u32,
) -> Option<rtnetlink::packet_route::route::RouteMessage> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination.address, route.destination.prefix_len)
        .ok()?
        .output_interface(index)
        .scope(RouteScope::from(route.scope));
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway).ok()?;
    }
    if let Some(source) = route.source {
        builder = builder.pref_source(source).ok()?;
    }
    if route.metric != 0 {
        builder = builder.priority(route.metric);
    }
    Some(builder.build())
}

pub(super) struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
    pub up: bool,
}

pub(super) async fn links(handle: &Handle) -> Result<Vec<Link>, NetworkError> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink_error("list links", "*"))?;
    Ok(messages
        .into_iter()
        .map(|message| {
            let mut link = Link {
                index: message.header.index,
                name: String::new(),
                mac: None,
                mtu: None,
                up: message.header.flags.contains(LinkFlags::Up),
            };
            for attribute in message.attributes {
                match attribute {
                    LinkAttribute::IfName(name) => link.name = name,
                    LinkAttribute::Address(bytes) => {
                        link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(Mac);
                    }
                    LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
                    _ => {}
                }
            }
            link
        })
        .collect())
}

pub(super) async fn set_link(
    handle: &Handle,
    name: &str,
    message: LinkMessage,
) -> Result<(), NetworkError> {
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(netlink_error("configure the link", name))
}

pub(super) fn netlink_error(
    action: &'static str,
    name: &str,
) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let name = name.to_owned();
    move |source| NetworkError::Netlink {
        action,
        name,
        source,
    }
}

pub(super) fn format_mac(mac: Mac) -> String {
    let m = mac.0;
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::InterfaceConfig;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            mac: Some(Mac([2, 0, 0, 0, 0, index as u8])),
            mtu: Some(1500),
            up: false,
        }
    }

    fn wanted(names: &[&str]) -> NetworkConfig {
        NetworkConfig {
            interfaces: names
                .iter()
                .enumerate()
                .map(|(i, name)| InterfaceConfig {
                    device_mac: Mac([2, 0, 0, 0, 0, i as u8 + 2]),
                    name: (*name).into(),
                    mac: Mac([6, 0, 0, 0, 0, i as u8]),
                    mtu: 1500,
                    addresses: Vec::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn temporary_names_only_when_a_new_name_is_taken_by_another_nic() {
        let links = [link(1, "lo"), link(2, "eth0"), link(3, "eth1")];
        let nics = [&links[1], &links[2]];
        assert!(!needs_temporary_names(
            &wanted(&["eth0", "eth1"]),
            &nics,
            &links
        ));
        assert!(!needs_temporary_names(
            &wanted(&["net0", "net1"]),
            &nics,
            &links
        ));
        assert!(
            needs_temporary_names(&wanted(&["eth1", "eth0"]), &nics, &links),
            "a swap needs them"
        );
        assert!(needs_temporary_names(&wanted(&["lo"]), &nics[..1], &links));
    }
}
