//! The pod's network inside the VM.
//!
//! The host mirrors each CNI veth of the pod's network namespace into a guest NIC (see the
//! shim's `network` module); CreateSandbox hands the agent what the veth had: its name,
//! MAC, MTU, addresses, routes and static neighbours. Here that request is checked and
//! turned into typed values ([`NetworkConfig::from_request`], pure), then applied over
//! rtnetlink (`apply.rs`). The guest NICs are told apart by the MAC the host booted them
//! with (`device_mac`), which is the same in a template and every clone of it, so a
//! restored VM is configured exactly like a cold one.

mod apply;
mod warm;

use std::net::IpAddr;

use spry_proto::agent::CreateSandboxRequest;

pub use apply::apply;
pub use warm::warm_up;

/// Errors of reading or applying the pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{field} {value:?} is not a valid MAC address")]
    BadMac { field: &'static str, value: String },
    #[error("{field} {value:?} is not a valid IP address")]
    BadIp { field: &'static str, value: String },
    #[error("{value:?} is not a valid CIDR (address/prefix length)")]
    BadCidr { value: String },
    #[error(
        "interface name {name:?} is not valid (1 to 15 characters, no '/', ':' or whitespace)"
    )]
    BadName { name: String },
    #[error("MTU {mtu} of interface {name} is out of range (68 to 65535)")]
    BadMtu { name: String, mtu: u32 },
    #[error(
        "route to {destination} names interface {device:?}, which the request does not configure"
    )]
    UnknownDevice { destination: String, device: String },
    #[error("route to {destination} mixes IPv4 and IPv6 addresses")]
    BadRoute { destination: String },
    #[error("the request configures interface {name} twice")]
    DuplicateInterface { name: String },
    #[error("the VM has no NIC with MAC {device_mac} (for interface {name})")]
    NoSuchNic { name: String, device_mac: String },
    #[error("cannot open a netlink socket")]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {action} (interface {name})")]
    Netlink {
        action: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot write {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    fn parse(field: &'static str, text: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::BadMac {
            field,
            value: text.to_owned(),
        };
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(bytes))
    }
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    fn new(address: IpAddr, prefix_len: u32, text: &str) -> Result<Self, NetworkError> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(NetworkError::BadCidr {
                value: text.to_owned(),
            });
        }
        Ok(Self {
            address,
            prefix_len: prefix_len as u8,
        })
    }

    fn parse(text: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::BadCidr {
            value: text.to_owned(),
        };
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        let prefix: u32 = prefix.parse().map_err(|_| bad())?;
        Self::new(address, prefix, text)
    }
}

/// One guest NIC and what it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub device_mac: Mac,
    pub name: String,
    pub mac: Mac,
    pub mtu: u32,
    pub addresses: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub destination: Cidr,
    pub gateway: Option<IpAddr>,
    /// Index into [`NetworkConfig::interfaces`].
    pub interface: usize,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub metric: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourConfig {
    pub address: IpAddr,
    pub mac: Mac,
    pub interface: usize,
}

/// The pod's network, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    pub interfaces: Vec<InterfaceConfig>,
    /// Directly connected routes first: a gateway must be reachable when its route is added.
    pub routes: Vec<RouteConfig>,
    pub neighbours: Vec<NeighbourConfig>,
}

impl NetworkConfig {
    pub fn from_request(request: &CreateSandboxRequest) -> Result<Self, NetworkError> {
        let mut interfaces: Vec<InterfaceConfig> = Vec::new();
        for nic in &request.interfaces {
            check_name(&nic.name)?;
            if interfaces.iter().any(|i| i.name == nic.name) {
                return Err(NetworkError::DuplicateInterface {
                    name: nic.name.clone(),
                });
            }
            if !(68..=65535).contains(&nic.mtu) {
                return Err(NetworkError::BadMtu {
                    name: nic.name.clone(),
                    mtu: nic.mtu,
                });
            }
            let addresses = nic
                .addresses
                .iter()
                .map(|a| {
                    let ip = parse_ip("address", &a.address)?;
                    Cidr::new(ip, a.prefix_len, &format!("{}/{}", a.address, a.prefix_len))
                })
                .collect::<Result<_, _>>()?;
            interfaces.push(InterfaceConfig {
                device_mac: Mac::parse("device MAC", &nic.device_mac)?,
                name: nic.name.clone(),
                mac: Mac::parse("MAC", &nic.mac)?,
                mtu: nic.mtu,
                addresses,
            });
        }
        let index_of = |device: &str, destination: &str| {
            interfaces
                .iter()
                .position(|i| i.name == device)
                .ok_or_else(|| NetworkError::UnknownDevice {
                    destination: destination.to_owned(),
                    device: device.to_owned(),
                })
        };
        let mut routes = Vec::new();
        for route in &request.routes {
            let parsed = RouteConfig {
                destination: Cidr::parse(&route.destination)?,
                gateway: optional_ip("gateway", &route.gateway)?,
                interface: index_of(&route.device, &route.destination)?,
                source: optional_ip("route source", &route.source)?,
                scope: u8::try_from(route.scope).unwrap_or(u8::MAX),
                metric: route.metric,
            };
            let v4 = parsed.destination.address.is_ipv4();
            let mixed = [parsed.gateway, parsed.source]
                .iter()
                .flatten()
                .any(|ip| ip.is_ipv4() != v4);
            if mixed {
                return Err(NetworkError::BadRoute {
                    destination: route.destination.clone(),
                });
            }
            routes.push(parsed);
        }
        routes.sort_by_key(|r| r.gateway.is_some());
        let mut neighbours = Vec::new();
        for neighbour in &request.neighbours {
            neighbours.push(NeighbourConfig {
                address: parse_ip("neighbour", &neighbour.address)?,
                mac: Mac::parse("neighbour MAC", &neighbour.mac)?,
                interface: index_of(&neighbour.device, &neighbour.address)?,
            });
        }
        Ok(Self {
            interfaces,
            routes,
            neighbours,
        })
    }
}

fn parse_ip(field: &'static str, text: &str) -> Result<IpAddr, NetworkError> {
    text.parse().map_err(|_| NetworkError::BadIp {
        field,
        value: text.to_owned(),
    })
}

fn optional_ip(field: &'static str, text: &str) -> Result<Option<IpAddr>, NetworkError> {
    match text {
        "" => Ok(None),
        text => parse_ip(field, text).map(Some),
    }
}

/// What the kernel accepts as an interface name (IFNAMSIZ is 16 with the NUL).
fn check_name(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(NetworkError::BadName {
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
