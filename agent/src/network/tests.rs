use spry_proto::agent::{IpAddress, Neighbour, NetworkInterface, Route};

use super::*;

fn request() -> CreateSandboxRequest {
    let mut request = CreateSandboxRequest::new();
    request.interfaces = vec![NetworkInterface {
        device_mac: "02:53:50:52:59:00".into(),
        name: "eth0".into(),
        mac: "6a:0b:1c:2d:3e:4f".into(),
        mtu: 1450,
        addresses: vec![
            IpAddress {
                address: "10.88.0.7".into(),
                prefix_len: 16,
                ..Default::default()
            },
            IpAddress {
                address: "fd00::7".into(),
                prefix_len: 64,
                ..Default::default()
            },
        ],
        ..Default::default()
    }];
    request.routes = vec![
        Route {
            destination: "0.0.0.0/0".into(),
            gateway: "10.88.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        },
        Route {
            destination: "10.96.0.0/12".into(),
            device: "eth0".into(),
            scope: 253,
            ..Default::default()
        },
    ];
    request.neighbours = vec![Neighbour {
        address: "10.88.0.1".into(),
        mac: "aa:bb:cc:dd:ee:ff".into(),
        device: "eth0".into(),
        ..Default::default()
    }];
    request
}

#[test]
fn a_cni_style_request_parses_with_connected_routes_first() {
    let config = NetworkConfig::from_request(&request()).unwrap();
    let nic = &config.interfaces[0];
    assert_eq!(nic.device_mac, Mac([0x02, 0x53, 0x50, 0x52, 0x59, 0]));
    assert_eq!(nic.mac, Mac([0x6a, 0x0b, 0x1c, 0x2d, 0x3e, 0x4f]));
    assert_eq!(nic.mtu, 1450);
    assert_eq!(
        nic.addresses[1].address,
        "fd00::7".parse::<IpAddr>().unwrap()
    );
    assert_eq!(nic.addresses[1].prefix_len, 64);
    // The gateway route comes after the connected one it depends on.
    assert_eq!(config.routes[0].gateway, None);
    assert_eq!(config.routes[0].scope, 253);
    assert_eq!(config.routes[1].gateway, Some("10.88.0.1".parse().unwrap()));
    assert_eq!(config.routes[1].destination.prefix_len, 0);
    assert_eq!(config.neighbours[0].interface, 0);
    assert_eq!(apply::format_mac(nic.mac), "6a:0b:1c:2d:3e:4f");
}

#[test]
fn no_interfaces_is_an_empty_config() {
    let config = NetworkConfig::from_request(&CreateSandboxRequest::new()).unwrap();
    assert_eq!(config, NetworkConfig::default());
}

#[test]
fn hostile_or_broken_requests_are_refused_with_the_field_named() {
    type Breakage = Box<dyn Fn(&mut CreateSandboxRequest)>;
    let cases: Vec<(Breakage, &str)> = vec![
        (
            Box::new(|r| r.interfaces[0].mac = "6a:0b:1c:2d:3e".into()),
            "not a valid MAC",
        ),
        (
            Box::new(|r| r.interfaces[0].device_mac = "zz:0b:1c:2d:3e:4f".into()),
            "device MAC",
        ),
        (
            Box::new(|r| r.interfaces[0].name = "../../etc".into()),
            "interface name",
        ),
        (
            Box::new(|r| r.interfaces[0].name = "a-very-long-ifname".into()),
            "interface name",
        ),
        (Box::new(|r| r.interfaces[0].mtu = 20), "MTU 20"),
        (
            Box::new(|r| r.interfaces[0].addresses[0].address = "10.88.0".into()),
            "valid IP",
        ),
        (
            Box::new(|r| r.interfaces[0].addresses[0].prefix_len = 33),
            "CIDR",
        ),
        (
            Box::new(|r| r.routes[0].destination = "10.0.0.0".into()),
            "CIDR",
        ),
        (
            Box::new(|r| r.routes[0].gateway = "fd00::1".into()),
            "mixes IPv4 and IPv6",
        ),
        (Box::new(|r| r.routes[1].device = "eth9".into()), "eth9"),
        (Box::new(|r| r.neighbours[0].device = "eth9".into()), "eth9"),
        (
            Box::new(|r| {
                let twin = r.interfaces[0].clone();
                r.interfaces.push(twin)
            }),
            "twice",
        ),
    ];
    for (break_it, expected) in cases {
        let mut broken = request();
        break_it(&mut broken);
        let err = NetworkConfig::from_request(&broken).unwrap_err();
        assert!(
            err.to_string().contains(expected),
            "{err} (wanted {expected:?})"
        );
    }
}
