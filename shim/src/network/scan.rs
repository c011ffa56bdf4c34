//! Reading the pod's network namespace: its veths, their addresses, the routes and the
//! static neighbours CNI set up.

use std::net::IpAddr;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use tracing::debug;

use super::{
    in_netns, NetworkError, NetworkPlan, PodInterface, PodNeighbour, PodRoute, MAX_INTERFACES,
    TAP_PREFIX,
};

/// Reads the pod netns at `netns`. Fails, naming the link, on anything but veths (and
/// loopback); a netns that does not exist fails naming the path.
pub async fn scan(netns: &Path) -> Result<NetworkPlan, NetworkError> {
    let (links, addresses, routes, neighbours) = in_netns(netns, |handle| async move {
        let links = dump_links(&handle).await?;
        let addresses: Vec<AddressMessage> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("list addresses"))?;
        let mut routes: Vec<RouteMessage> = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let query = match version {
                IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            };
            let mut found: Vec<RouteMessage> = handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("list routes"))?;
            routes.append(&mut found);
        }
        let neighbours: Vec<NeighbourMessage> = handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("list neighbours"))?;
        Ok((links, addresses, routes, neighbours))
    })
    .await?;
    let interfaces = interfaces_of(&links, &addresses)?;
    let plan = NetworkPlan {
        netns: netns.to_path_buf(),
        routes: routes
            .iter()
            .filter_map(|route| route_of(route, &interfaces))
            .collect(),
        neighbours: neighbours
            .iter()
            .filter_map(|n| neighbour_of(n, &interfaces))
            .collect(),
        interfaces,
    };
    debug!(?plan, "pod network namespace read");
    Ok(plan)
}

pub(super) async fn dump_links(handle: &Handle) -> Result<Vec<LinkMessage>, NetworkError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list links"))
}

pub(super) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

pub(super) fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

fn interfaces_of(
    links: &[LinkMessage],
    addresses: &[AddressMessage],
) -> Result<Vec<PodInterface>, NetworkError> {
    let mut interfaces = Vec::new();
    for link in links {
        let name = link_name(link).unwrap_or_default().to_owned();
        if link.header.link_layer_type == LinkLayerType::Loopback {
            continue;
        }
        if name.starts_with(TAP_PREFIX) {
            // Ours, from a VM of this pod that is still going away.
            continue;
        }
        match link_kind(link) {
            Some(InfoKind::Veth) => {}
            Some(kind) => {
                return Err(NetworkError::UnsupportedLink {
                    name,
                    kind: kind.to_string(),
                })
            }
            None => {
                return Err(NetworkError::UnsupportedLink {
                    name,
                    kind: "physical or unknown".into(),
                })
            }
        }
        let mut mac = None;
        let mut mtu = 1500;
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                LinkAttribute::Mtu(value) => mtu = *value,
                _ => {}
            }
        }
        let Some(mac) = mac else {
            return Err(NetworkError::UnsupportedLink {
                name,
                kind: "veth without an Ethernet address".into(),
            });
        };
        let index = link.header.index;
        interfaces.push(PodInterface {
            index,
            name,
            mac,
            mtu,
            addresses: addresses
                .iter()
                .filter(|a| a.header.index == index)
                .filter_map(address_of)
                .collect(),
        });
    }
    if interfaces.len() > MAX_INTERFACES {
        return Err(NetworkError::TooManyInterfaces {
            count: interfaces.len(),
            max: MAX_INTERFACES,
        });
    }
    Ok(interfaces)
}

fn address_of(message: &AddressMessage) -> Option<(IpAddr, u8)> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
    // point-to-point link and the same as IFA_LOCAL otherwise (IPv6 has only IFA_ADDRESS).
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => address = Some(*ip),
            AddressAttribute::Address(ip) if address.is_none() => address = Some(*ip),
            _ => {}
        }
    }
    let address = address?;
    let link_local = match address {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    (!link_local && !address.is_loopback()).then_some((address, message.header.prefix_len))
}

fn route_address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The routes the guest needs: main-table unicast routes through one of the veths that the
/// kernel did not derive from an address (the guest's kernel derives those itself).
fn route_of(message: &RouteMessage, interfaces: &[PodInterface]) -> Option<PodRoute> {
    let RouteHeader {
        table,
        protocol,
        kind,
        scope,
        address_family,
        destination_prefix_length,
        ..
    } = message.header;
    if kind != RouteType::Unicast || protocol == RouteProtocol::Kernel {
        return None;
    }
    let mut table = u32::from(table);
    let mut destination = None;
    let mut gateway = None;
    let mut device = None;
    let mut source = None;
    let mut metric = 0;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(a) => destination = route_address(a),
            RouteAttribute::Gateway(a) => gateway = route_address(a),
            RouteAttribute::Oif(index) => {
                device = interfaces.iter().find(|i| i.index == *index);
            }
            RouteAttribute::PrefSource(a) => source = route_address(a),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let destination = destination.unwrap_or(match address_family {
        rtnetlink::packet_route::AddressFamily::Inet6 => {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        }
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    });
    if let IpAddr::V6(v6) = destination {
        // Link-local and multicast routes come with every IPv6 link.
        if v6.segments()[0] & 0xffc0 == 0xfe80 || v6.is_multicast() {
            return None;
        }
    }
    Some(PodRoute {
        destination,
        prefix_len: destination_prefix_length,
        gateway,
        device: device?.name.clone(),
        source,
        scope: u8::from(scope),
        metric,
    })
}

fn neighbour_of(message: &NeighbourMessage, interfaces: &[PodInterface]) -> Option<PodNeighbour> {
    if message.header.state != NeighbourState::Permanent {
        return None;
    }
    let device = interfaces
        .iter()
        .find(|i| i.index == message.header.ifindex)?;
    let mut address = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                address = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                address = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok()
            }
            _ => {}
        }
    }
    Some(PodNeighbour {
        address: address?,
        mac: mac?,
        device: device.name.clone(),
    })
}

fn netlink(action: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    move |source| NetworkError::Netlink {
        action,
        link: "pod network namespace".into(),
        source,
    }
}
