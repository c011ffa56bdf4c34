//! Warming the pod network's code paths in a VM no pod has yet (the host's warm pool).
//!
//! Under TCG a VM restored from a template translates each guest code path the first time
//! it runs (the translations live in QEMU, not in the template), and the pod's network is
//! applied on the critical path of every pod start: about a dozen netlink round trips
//! through rtnetlink and the kernel's virtio-net, link, address, route and neighbour code,
//! ~100 ms the first time in a fresh clone. A spare VM runs the same [`apply_with`] on
//! its own NICs with a throwaway config ([`warm_config`]: link-local and documentation
//! addresses, a changed MAC) and then puts every NIC back as it booted: down (which drops
//! the routes and neighbours on it), no addresses, its boot MAC and MTU. The pod's
//! CreateSandbox then finds its NICs exactly as in any restored VM, with its paths warm.

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec};

use super::apply::{apply_with, links, netlink_error, set_link, Link};
use super::{
    Cidr, InterfaceConfig, Mac, NeighbourConfig, NetworkConfig, NetworkError, RouteConfig,
};

/// A route through each NIC's throwaway gateway: TEST-NET-1, never a real destination.
const WARM_ROUTE: [u8; 4] = [192, 0, 2, 0];
/// RT_SCOPE_UNIVERSE, as a route through a gateway has.
const SCOPE_UNIVERSE: u8 = 0;
/// RT_SCOPE_LINK, as the directly connected route CNI plugins add.
const SCOPE_LINK: u8 = 253;

/// Runs the pod network's paths on every NIC of the VM and restores the NICs.
pub async fn warm_up() -> Result<(), NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetworkError::Connect { source })?;
    let connection = tokio::spawn(connection);
    let result = warm_up_with(&handle).await;
    connection.abort();
    result
}

async fn warm_up_with(handle: &Handle) -> Result<(), NetworkError> {
    let nics: Vec<Link> = links(handle)
        .await?
        .into_iter()
        .filter(|link| link.name != "lo" && link.mac.is_some())
        .collect();
    let config = warm_config(&nics);
    let applied = apply_with(handle, &config).await;
    // Restored whether or not the throwaway config went on completely.
    let restored = restore(handle, &nics).await;
    applied.and(restored)
}

/// The throwaway config: each NIC under its own name, with a changed MAC, a link-local
/// IPv4 and a unique-local IPv6 address, a directly connected route and a route through a
/// gateway, and that gateway as a static neighbour.
fn warm_config(nics: &[Link]) -> NetworkConfig {
    let mut config = NetworkConfig::default();
    for (i, nic) in nics.iter().enumerate() {
        let device_mac = nic.mac.unwrap_or(Mac([0; 6]));
        let mut mac = device_mac.0;
        mac[0] |= 0x02;
        mac[5] ^= 0x80;
        let subnet = 240u8.saturating_add(i as u8);
        let own = std::net::Ipv4Addr::new(169, 254, subnet, 1);
        let gateway = std::net::Ipv4Addr::new(169, 254, subnet, 2);
        config.interfaces.push(InterfaceConfig {
            device_mac,
            name: nic.name.clone(),
            mac: Mac(mac),
            mtu: nic.mtu.unwrap_or(1500),
            addresses: vec![
                Cidr {
                    address: own.into(),
                    prefix_len: 30,
                },
                Cidr {
                    address: std::net::Ipv6Addr::new(0xfd53, 0x7072, 0x7900, i as u16, 0, 0, 0, 1)
                        .into(),
                    prefix_len: 64,
                },
            ],
        });
        config.routes.push(RouteConfig {
            destination: Cidr {
                address: std::net::Ipv4Addr::new(169, 254, subnet, 0).into(),
                prefix_len: 30,
            },
            gateway: None,
            interface: i,
            source: Some(own.into()),
            scope: SCOPE_LINK,
            metric: 0,
        });
        config.neighbours.push(NeighbourConfig {
            address: gateway.into(),
            mac: Mac([0x0a, 0x53, 0x50, 0x52, 0x59, i as u8]),
            interface: i,
        });
    }
    // One route through a gateway (several NICs would fight over one destination).
    if !nics.is_empty() {
        config.routes.push(RouteConfig {
            destination: Cidr {
                address: std::net::Ipv4Addr::from(WARM_ROUTE).into(),
                prefix_len: 24,
            },
            gateway: Some(std::net::Ipv4Addr::new(169, 254, 240, 2).into()),
            interface: 0,
            source: None,
            scope: SCOPE_UNIVERSE,
            metric: 0,
        });
    }
    config
}

/// Puts each NIC back as it booted: down (the kernel then drops its routes, neighbours
/// and IPv6 addresses), without addresses, with its boot name, MAC and MTU.
async fn restore(handle: &Handle, nics: &[Link]) -> Result<(), NetworkError> {
    for nic in nics {
        set_link(
            handle,
            &nic.name,
            LinkUnspec::new_with_index(nic.index).down().build(),
        )
        .await?;
        let addresses: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(nic.index)
            .execute()
            .try_collect()
            .await
            .map_err(netlink_error("list addresses", &nic.name))?;
        for address in addresses {
            handle
                .address()
                .del(address)
                .execute()
                .await
                .map_err(netlink_error("remove an address", &nic.name))?;
        }
        let mut message = LinkUnspec::new_with_index(nic.index).name(nic.name.clone());
        if let Some(mac) = nic.mac {
            message = message.address(mac.0.to_vec());
        }
        if let Some(mtu) = nic.mtu {
            message = message.mtu(mtu);
        }
        set_link(handle, &nic.name, message.build()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(index: u32, name: &str, last: u8) -> Link {
        Link {
            index,
            name: name.into(),
            mac: Some(Mac([0x02, 0x53, 0x50, 0x52, 0x59, last])),
            mtu: Some(1500),
            up: false,
        }
    }

    #[test]
    fn the_throwaway_config_changes_every_nic_and_touches_no_routable_address() {
        let config = warm_config(&[nic(2, "eth0", 0), nic(3, "eth1", 1)]);
        assert_eq!(config.interfaces.len(), 2);
        for (i, interface) in config.interfaces.iter().enumerate() {
            assert_eq!(interface.name, format!("eth{i}"), "each NIC keeps its name");
            assert_ne!(interface.mac, interface.device_mac, "the MAC path runs too");
            assert_eq!(interface.device_mac.0[5], i as u8);
            for cidr in &interface.addresses {
                let private = match cidr.address {
                    std::net::IpAddr::V4(v4) => v4.is_link_local(),
                    std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
                };
                assert!(private, "{cidr:?} could be someone's address");
            }
        }
        // Directly connected routes come before the one through a gateway, as in a pod's.
        let gateways: Vec<bool> = config.routes.iter().map(|r| r.gateway.is_some()).collect();
        assert_eq!(gateways, vec![false, false, true]);
        assert_eq!(config.neighbours.len(), 2);
    }

    #[test]
    fn a_vm_without_nics_warms_nothing() {
        assert_eq!(warm_config(&[]), NetworkConfig::default());
    }
}
