//! The pod's network: the veths CNI put in the pod's network namespace, mirrored into the
//! VM.
//!
//! containerd's CRI plugin creates the pod netns and runs the CNI plugins before the
//! sandbox task starts, so at that point the netns holds the pod's interfaces (a veth per
//! network, with the pod IP, routes and maybe static neighbours). QEMU runs inside that
//! netns. For each veth:
//! - the guest gets a virtio-net NIC backed by a tap `spry-tapN` that QEMU creates in the
//!   netns (and that goes away with QEMU: nothing to leak when the VM dies);
//! - tc joins veth and tap: an ingress qdisc on each with a filter redirecting every frame
//!   to the other (what Kata's and Kuasar's `tcfilter` model does). The host side of the
//!   netns never sees the pod's traffic; the veth keeps its address only as a record;
//! - the agent gives the NIC the veth's name, MAC, MTU, addresses, routes and neighbours
//!   (CreateSandbox), and the kernel announces the addresses when the link comes up.
//!
//! NIC i always boots with the MAC [`nic_for`]`(i)` gives, in a template and in every clone
//! of it, and the agent finds the NIC by that MAC before giving it the veth's. So a template
//! only has to match a pod's NIC count, and no two pods ever end up with one MAC.
//!
//! `scan.rs` reads the netns, `tc.rs` joins veth and tap, `port_forward.rs` (with
//! `sk_lookup.rs`) makes CRI port-forward reach the guest; the sandbox's `PodNetwork`
//! resource calls them for a running VM.

mod move_taps;
mod netns;
mod port_forward;
mod scan;
mod sk_lookup;
mod tc;

use std::net::IpAddr;
use std::path::PathBuf;

use spry_proto::agent as pb;

use crate::vm::cmdline::format_mac;
use crate::vm::Nic;

pub use move_taps::move_taps;
use netns::in_netns;
pub use port_forward::PortForward;
pub use scan::scan;
pub use tc::{join_taps, unjoin_taps};

/// Taps are named this plus the NIC's index.
pub const TAP_PREFIX: &str = "spry-tap";

/// Most NICs a pod may have: NIC MACs end in the index byte, tap names stay short.
pub const MAX_INTERFACES: usize = 16;

/// NIC `index`'s tap and boot MAC (locally administered, unicast: 02:53:50:52:59 is "SPRY").
pub fn nic_for(index: usize) -> Nic {
    Nic {
        tap: format!("{TAP_PREFIX}{index}"),
        mac: [0x02, 0x53, 0x50, 0x52, 0x59, index as u8],
    }
}

/// Failure of reading or plumbing a pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot open the pod's network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the pod's network namespace {path}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start a thread to work in network namespace {path}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread working in network namespace {path} died")]
    ThreadDied { path: PathBuf },
    #[error("cannot open a netlink socket in network namespace {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {name} in the pod's network namespace is a {kind} link; Spry pods support \
         veth links only (what the bridge, ptp, calico, cilium and flannel CNI plugins create)"
    )]
    UnsupportedLink { name: String, kind: String },
    #[error("the pod's network namespace has {count} interfaces; Spry pods support up to {max}")]
    TooManyInterfaces { count: usize, max: usize },
    #[error("cannot {action} ({link})")]
    Netlink {
        action: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("tap {tap} of the VM is missing from its network namespace")]
    MissingTap { tap: String },
    #[error("cannot set up port-forward in network namespace {path}")]
    PortForward {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A veth of the pod netns, as CNI left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Global and site addresses with their prefix lengths (link-local ones are not copied:
    /// the guest derives the same ones from the same MAC).
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route of the pod netns's main table that CNI (not the kernel) put there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub metric: u32,
}

/// A permanent neighbour entry of the pod netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNeighbour {
    pub address: IpAddr,
    pub mac: [u8; 6],
    pub device: String,
}

/// What the pod's network namespace holds, read once before the VM starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    pub netns: PathBuf,
    pub interfaces: Vec<PodInterface>,
    pub routes: Vec<PodRoute>,
    pub neighbours: Vec<PodNeighbour>,
}

impl NetworkPlan {
    /// The pod's addresses, IPv4 first (what port-forward connects to).
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .interfaces
            .iter()
            .flat_map(|i| i.addresses.iter().map(|(ip, _)| *ip))
            .collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips
    }

    /// The VM's NICs, one per interface, in order.
    pub fn nics(&self) -> Vec<Nic> {
        (0..self.interfaces.len()).map(nic_for).collect()
    }

    /// What the agent applies in the guest (CreateSandbox's network fields).
    pub fn guest_request(&self) -> GuestNetwork {
        let interfaces = self
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, veth)| pb::NetworkInterface {
                device_mac: format_mac(&nic_for(i).mac),
                name: veth.name.clone(),
                mac: format_mac(&veth.mac),
                mtu: veth.mtu,
                addresses: veth
                    .addresses
                    .iter()
                    .map(|(ip, prefix)| pb::IpAddress {
                        address: ip.to_string(),
                        prefix_len: u32::from(*prefix),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|route| pb::Route {
                destination: format!("{}/{}", route.destination, route.prefix_len),
                gateway: route.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: route.device.clone(),
                source: route.source.map(|s| s.to_string()).unwrap_or_default(),
                scope: u32::from(route.scope),
                metric: route.metric,
                ..Default::default()
            })
            .collect();
        let neighbours = self
            .neighbours
            .iter()
            .map(|n| pb::Neighbour {
                address: n.address.to_string(),
                mac: format_mac(&n.mac),
                device: n.device.clone(),
                ..Default::default()
            })
            .collect();
        GuestNetwork {
            interfaces,
            routes,
            neighbours,
        }
    }
}

/// The network fields of CreateSandbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestNetwork {
    pub interfaces: Vec<pb::NetworkInterface>,
    pub routes: Vec<pb::Route>,
    pub neighbours: Vec<pb::Neighbour>,
}

#[cfg(test)]
mod tests;
