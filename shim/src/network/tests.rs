//! Against real network namespaces (root, iproute2): what CNI's bridge plugin leaves in a
//! pod netns, read back; and the tc joins made and undone.

use std::process::Command;

use super::*;

/// A named netns (`ip netns add`), deleted on drop.
struct TestNetns(String);

impl TestNetns {
    fn new(tag: &str) -> Self {
        let name = format!("spry-nt-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        Self(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    fn tc(&self, args: &[&str]) -> String {
        let out = Command::new("tc")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("the test needs tc (iproute2)");
        assert!(out.status.success(), "tc {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("the test needs ip (iproute2) and root");
    assert!(
        status.success(),
        "ip {args:?} failed (these tests need root)"
    );
}

/// A pod netns as the bridge + host-local plugins leave it (the bridge end lives in `peer`).
fn cni_like_pod(pod: &TestNetns, peer: &TestNetns) {
    pod.ip(&[
        "link",
        "add",
        "eth0",
        "address",
        "6a:0b:1c:2d:3e:4f",
        "mtu",
        "1450",
        "type",
        "veth",
        "peer",
        "name",
        "veth-host",
        "netns",
        &peer.0,
    ]);
    pod.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    pod.ip(&["-6", "addr", "add", "fd77::2/64", "dev", "eth0", "nodad"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["link", "set", "lo", "up"]);
    pod.ip(&["route", "add", "default", "via", "10.77.0.1", "dev", "eth0"]);
    pod.ip(&[
        "route",
        "add",
        "10.96.0.0/12",
        "via",
        "10.77.0.1",
        "metric",
        "5",
    ]);
    pod.ip(&[
        "-6", "route", "add", "default", "via", "fd77::1", "dev", "eth0",
    ]);
    pod.ip(&[
        "neigh",
        "add",
        "10.77.0.9",
        "lladdr",
        "aa:bb:cc:dd:ee:ff",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
}

#[tokio::test]
async fn a_cni_pod_netns_is_read_back_as_the_guest_needs_it() {
    let pod = TestNetns::new("scan");
    let peer = TestNetns::new("scanpeer");
    cni_like_pod(&pod, &peer);
    let plan = scan(&pod.path()).await.unwrap();

    assert_eq!(plan.interfaces.len(), 1, "{plan:?}");
    let eth0 = &plan.interfaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mac, [0x6a, 0x0b, 0x1c, 0x2d, 0x3e, 0x4f]);
    assert_eq!(eth0.mtu, 1450);
    assert_eq!(
        eth0.addresses,
        [
            ("10.77.0.2".parse().unwrap(), 24),
            ("fd77::2".parse().unwrap(), 64)
        ],
        "link-local addresses are left to the guest"
    );
    let route = |dest: &str| {
        plan.routes
            .iter()
            .find(|r| r.destination.to_string() == dest)
    };
    let default = route("0.0.0.0").expect("IPv4 default route");
    assert_eq!(default.prefix_len, 0);
    assert_eq!(default.gateway, Some("10.77.0.1".parse().unwrap()));
    assert_eq!(default.device, "eth0");
    assert_eq!(route("10.96.0.0").unwrap().metric, 5);
    assert!(route("::").is_some(), "IPv6 default route: {plan:?}");
    assert!(
        route("10.77.0.0").is_none(),
        "the kernel's own subnet route is the guest kernel's business"
    );
    assert_eq!(
        plan.neighbours,
        [PodNeighbour {
            address: "10.77.0.9".parse().unwrap(),
            mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
            device: "eth0".into(),
        }]
    );

    // What the agent gets: the boot MAC to find the NIC by, the veth's identity to give it.
    let nics = plan.nics();
    assert_eq!(nics, [nic_for(0)]);
    let guest = plan.guest_request();
    assert_eq!(guest.interfaces[0].device_mac, "02:53:50:52:59:00");
    assert_eq!(guest.interfaces[0].mac, "6a:0b:1c:2d:3e:4f");
    assert_eq!(guest.interfaces[0].addresses[0].address, "10.77.0.2");
    assert!(guest
        .routes
        .iter()
        .any(|r| r.destination == "0.0.0.0/0" && r.gateway == "10.77.0.1" && r.device == "eth0"));
    assert_eq!(guest.neighbours[0].mac, "aa:bb:cc:dd:ee:ff");
}

#[tokio::test]
async fn other_link_types_and_missing_namespaces_are_refused_by_name() {
    let pod = TestNetns::new("odd");
    pod.ip(&["link", "add", "br7", "type", "bridge"]);
    let err = scan(&pod.path()).await.unwrap_err();
    assert!(
        matches!(&err, NetworkError::UnsupportedLink { name, kind } if name == "br7" && kind == "bridge"),
        "{err}"
    );
    assert!(err.to_string().contains("br7"), "{err}");

    let missing = PathBuf::from("/run/netns/spry-no-such-netns");
    let err = scan(&missing).await.unwrap_err();
    assert!(matches!(err, NetworkError::OpenNetns { .. }), "{err}");
    assert!(err.to_string().contains("spry-no-such-netns"), "{err}");
}

#[tokio::test]
async fn taps_are_joined_to_their_veth_both_ways_and_unjoined() {
    let pod = TestNetns::new("tc");
    let peer = TestNetns::new("tcpeer");
    cni_like_pod(&pod, &peer);
    let plan = scan(&pod.path()).await.unwrap();
    // A stand-in for QEMU's tap: any link by the tap's name will do for tc.
    pod.ip(&[
        "link",
        "add",
        "spry-tap0",
        "type",
        "veth",
        "peer",
        "name",
        "tap-peer",
        "netns",
        &peer.0,
    ]);

    join_taps(&plan).await.unwrap();
    let veth_filters = pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        veth_filters.contains("protocol all")
            && veth_filters.contains("Redirect to device spry-tap0"),
        "{veth_filters}"
    );
    let tap_filters = pod.tc(&["filter", "show", "dev", "spry-tap0", "ingress"]);
    assert!(
        tap_filters.contains("Redirect to device eth0"),
        "{tap_filters}"
    );
    // A second VM of the pod (a cold boot after a failed restore) replaces the join.
    join_taps(&plan).await.unwrap();
    let again = pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert_eq!(again.matches("Redirect").count(), 1, "{again}");

    unjoin_taps(&plan.netns).await.unwrap();
    let qdiscs = pod.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    // Twice, and after containerd removed the namespace: nothing to do, no error.
    unjoin_taps(&plan.netns).await.unwrap();
    drop(pod);
    unjoin_taps(&plan.netns).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_carries_many_connections_from_the_pod_netns_loopback() {
    use std::io::{Read, Write};
    let pod = TestNetns::new("pf");
    pod.ip(&["link", "set", "lo", "up"]);
    // The "pod": an echo server with a greeting, reached from the host's namespace the way
    // the forwarder reaches a pod IP. Here the pod IP is the host's loopback.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in server.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.write_all(b"hello ");
                let mut buf = [0u8; 65536];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let forward = PortForward::start(&pod.path(), vec!["127.0.0.1".parse().unwrap()])
        .await
        .unwrap();

    // What containerd does: dial localhost:PORT from inside the pod's namespace, here ten
    // times at once, each sending 1 MiB through and reading it back.
    let replies = netns::on_netns_thread(&pod.path(), move |_| {
        let clients: Vec<_> = (0..10u8)
            .map(|n| {
                std::thread::spawn(move || {
                    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                    let payload = vec![n; 1 << 20];
                    let mut writer = stream.try_clone().unwrap();
                    let sent = payload.clone();
                    let sender = std::thread::spawn(move || writer.write_all(&sent).unwrap());
                    let mut reply = vec![0u8; 6 + payload.len()];
                    stream.read_exact(&mut reply).unwrap();
                    sender.join().unwrap();
                    reply[..6] == *b"hello " && reply[6..] == payload[..]
                })
            })
            .collect();
        Ok(clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .collect::<Vec<bool>>())
    })
    .await
    .unwrap();
    assert_eq!(replies, vec![true; 10]);

    // Stopped: the namespace's loopback is its own again (nothing listens there).
    drop(forward);
    let refused = netns::on_netns_thread(&pod.path(), move |_| {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
    })
    .await
    .unwrap();
    assert!(refused, "the steering outlived the forwarder");
}
