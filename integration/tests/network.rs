//! Pod networking through stock containerd 2.x, crictl and the CNI reference plugins
//! (bridge + host-local + portmap + loopback): a Spry pod's IP lives in its VM. Servers in
//! cold and template Spry pods are reached by IP from the host, a runc pod and each other,
//! and reach them back; the guest has the veth's address, MAC and MTU; no tc join or tap
//! outlives a VM killed under the pod. Needs root, scripts/install-deps.sh,
//! scripts/build-guest.sh and scripts/build-test-images.sh; fails (never skips) without them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::containerd_config::POD_MTU;
use spry_integration::registry::free_port;
use spry_integration::spry::watch_pod_state;
use spry_integration::{
    require_root, ContainerConfig, Containerd, ContainerdOptions, Crictl, PodConfig, Registry,
    SpryHandler,
};

/// A pod running a busybox HTTP server on port 8080 that answers `/` with its name.
struct ServerPod {
    name: String,
    pod: String,
    container: String,
    ip: String,
    /// The IPv6 address, on a dual-stack network.
    ip6: Option<String>,
}

fn start_server_pod(
    containerd: &Containerd,
    crictl: &Crictl,
    image: &str,
    name: &str,
    runtime: Option<&str>,
    host_port: Option<u16>,
) -> Result<ServerPod> {
    let mut pod_cfg = PodConfig::new(name).hostname(name);
    if let Some(host_port) = host_port {
        pod_cfg = pod_cfg.patch(serde_json::json!({
            "port_mappings": [{ "protocol": 0, "container_port": 8080, "host_port": host_port }]
        }));
    }
    let pod_cfg = pod_cfg.write_to(&containerd.dir())?;
    let pod = crictl
        .runp(&pod_cfg, runtime)
        .with_context(|| format!("runp {name}: {}", containerd.log_tail(30)))?;
    let script =
        format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www");
    let ctr_cfg = ContainerConfig::new(&format!("{name}-http"), image)
        .command(&["sh", "-c", &script])
        .write_to(&containerd.dir())?;
    let container = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    crictl.start(&container)?;
    let info = crictl.inspectp(&pod)?;
    let ip = info["status"]["network"]["ip"]
        .as_str()
        .filter(|ip| !ip.is_empty())
        .with_context(|| format!("pod {name} has no IP: {}", info["status"]))?
        .to_owned();
    let ip6 = info["status"]["network"]["additionalIps"][0]["ip"]
        .as_str()
        .map(str::to_owned);
    Ok(ServerPod {
        name: name.to_owned(),
        pod,
        container,
        ip,
        ip6,
    })
}

/// The pod's network namespace on the host, from its runtime spec.
fn netns_of(crictl: &Crictl, pod: &str) -> Result<PathBuf> {
    let info = crictl.inspectp(pod)?;
    info["info"]["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|all| all.iter().find(|ns| ns["type"] == "network"))
        .and_then(|ns| ns["path"].as_str())
        .map(PathBuf::from)
        .with_context(|| format!("no network namespace in {pod}'s spec"))
}

/// `TOOL ARGS` (ip, tc) run inside the netns file `netns` (containerd keeps its own netns
/// dir, so `ip -n NAME` would not find it).
fn in_netns(tool: &str, netns: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(tool)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "{tool} {args:?} in {}: {}",
        netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// HTTP GET from the host, retried while the server comes up.
fn host_get(ip: &str, port: u16) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> Result<String> {
            let mut stream = TcpStream::connect_timeout(
                &format!("{ip}:{port}").parse()?,
                Duration::from_secs(5),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        match attempt {
            Ok(reply) => return Ok(reply),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("GET {ip}:{port}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// An HTTP GET from inside `from`'s container (busybox `nc`); returns the reply.
fn pod_get(crictl: &Crictl, from: &ServerPod, ip: &str, port: u16) -> Result<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} {port}");
    let out = crictl.exec_sync(
        &from.container,
        &["sh", "-c", &script],
        Duration::from_secs(30),
    )?;
    ensure!(
        out.code == 0,
        "GET {ip}:{port} from {} failed ({}): {}",
        from.name,
        out.code,
        out.stderr
    );
    Ok(out.stdout)
}

fn kill(pid: i32) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

/// Waits until the pod netns holds no tap of ours and no tc join on its veth.
fn wait_netns_clean(netns: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let links = in_netns("ip", netns, &["-o", "link"])?;
        let qdiscs = in_netns("tc", netns, &["qdisc", "show", "dev", "eth0"])?;
        if !links.contains("spry-tap") && !qdiscs.contains("ingress") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pod netns still has: {links}\n{qdiscs}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Deletes a host link on drop.
struct DeleteLink(String);

impl Drop for DeleteLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// A host HTTP server on the pods' gateway address answering "host".
fn host_server(gateway: &str) -> Result<u16> {
    let listener = TcpListener::bind(format!("{gateway}:0"))?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhost\n");
        }
    });
    Ok(port)
}

fn guest(crictl: &Crictl, pod: &ServerPod, argv: &[&str]) -> Result<String> {
    let out = crictl.exec_sync(&pod.container, argv, Duration::from_secs(30))?;
    ensure!(out.code == 0, "{argv:?} in {}: {}", pod.name, out.stderr);
    Ok(out.stdout.trim().to_owned())
}

#[test]
fn spry_pods_are_reachable_by_their_pod_ip_cold_and_from_a_template() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-net-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    let cold = spry.variant("cold", "template = \"off\"")?;
    let opts = spry.register(ContainerdOptions::new("spry-net").registry(&registry));
    let containerd =
        Containerd::start(spry.register_variant(opts.dual_stack(), "spry-cold", &cold))?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(240));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;

    let host_port = free_port()?;
    let a = start_server_pod(
        &containerd,
        &crictl,
        &image,
        "net-cold",
        Some("spry-cold"),
        Some(host_port),
    )?;
    let b = start_server_pod(&containerd, &crictl, &image, "net-tpl", Some("spry"), None)?;
    let r = start_server_pod(&containerd, &crictl, &image, "net-runc", None, None)?;

    for pod in [&a, &b] {
        // The guest took over the veth: its address, MAC and MTU.
        let addr = guest(
            &crictl,
            pod,
            &["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
        )?;
        ensure!(
            addr.contains(&format!("inet {}/", pod.ip)),
            "{}: crictl says {}, the guest's eth0 has {addr}",
            pod.name,
            pod.ip
        );
        let mtu = guest(&crictl, pod, &["cat", "/sys/class/net/eth0/mtu"])?;
        ensure!(mtu == POD_MTU.to_string(), "{}: guest MTU {mtu}", pod.name);
        let netns = netns_of(&crictl, &pod.pod)?;
        let veth = in_netns("ip", &netns, &["-o", "link", "show", "eth0"])?;
        let mac = guest(&crictl, pod, &["cat", "/sys/class/net/eth0/address"])?;
        ensure!(
            veth.contains(&mac),
            "{}: guest MAC {mac}, veth {veth}",
            pod.name
        );
        let route = guest(&crictl, pod, &["ip", "route", "show", "default"])?;
        ensure!(
            route.contains("via"),
            "{}: no default route: {route}",
            pod.name
        );
    }

    // Host → each pod, and each pod → every other pod and the host.
    let gateway = containerd.pod_gateway()?;
    let host_server_port = host_server(&gateway)?;
    for target in [&a, &b, &r] {
        let reply = host_get(&target.ip, 8080)?;
        ensure!(
            reply.contains(&target.name),
            "host → {}: {reply}",
            target.name
        );
    }
    for from in [&a, &b, &r] {
        for to in [&a, &b, &r] {
            if from.name == to.name {
                continue;
            }
            let reply = pod_get(&crictl, from, &to.ip, 8080)?;
            ensure!(
                reply.contains(&to.name),
                "{} → {}: {reply:?}",
                from.name,
                to.name
            );
        }
        let reply = pod_get(&crictl, from, &gateway, host_server_port)?;
        ensure!(reply.contains("host"), "{} → host: {reply:?}", from.name);
    }

    // IPv6 (dual stack), Spry pod to Spry pod and runc pod to Spry pod.
    for (from, to) in [(&a, &b), (&b, &a), (&r, &a)] {
        let ip6 = to
            .ip6
            .as_deref()
            .context("no IPv6 address on a dual-stack network")?;
        let reply = pod_get(&crictl, from, ip6, 8080)?;
        ensure!(
            reply.contains(&to.name),
            "{} → {} over IPv6: {reply:?}",
            from.name,
            to.name
        );
    }

    // hostPort (CNI portmap): the node's address and port reach the Spry pod.
    let reply = host_get(&gateway, host_port)?;
    ensure!(reply.contains(&a.name), "hostPort {host_port}: {reply:?}");

    // CRI port-forward to each Spry pod: many connections, request in, page out.
    for pod in [&a, &b] {
        let forward = crictl.port_forward(&pod.pod, 8080)?;
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let local = forward.local_port;
                std::thread::spawn(move || host_get("127.0.0.1", local))
            })
            .collect();
        for client in clients {
            let reply = client.join().expect("client thread")?;
            ensure!(
                reply.contains(&pod.name),
                "port-forward to {}: {reply:?}",
                pod.name
            );
        }
    }

    // QEMU killed under a pod: its tap goes with it, and the shim takes the tc join down.
    let qemu = spry_integration::system::processes()?
        .into_iter()
        .find(|p| p.name().starts_with("qemu-system") && p.cmdline_contains(&a.pod[..12]))
        .context("no QEMU for the cold pod")?;
    kill(qemu.pid)?;
    wait_netns_clean(&netns_of(&crictl, &a.pod)?)?;
    // The shim itself killed: QEMU dies with it, and `containerd-shim-spry-v2 delete`
    // (which containerd runs for a dead shim) takes the join down. The app container goes
    // first: containerd reports only the sandbox task of a dead grouped shim as exited, so
    // an app container would stay "running" in CRI (a reliability matter of its own).
    crictl.stop(&b.container, 10)?;
    crictl.rm(&b.container)?;
    let shim = containerd
        .shims()?
        .into_iter()
        .find(|p| p.cmdline_contains(&b.pod))
        .context("no shim for the template pod")?;
    kill(shim.pid)?;
    wait_netns_clean(&netns_of(&crictl, &b.pod)?)?;

    for pod in [&a, &b, &r] {
        crictl.stopp(&pod.pod)?;
        crictl.rmp(&pod.pod)?;
    }
    leaks.assert_clean()?;
    Ok(())
}

#[test]
fn host_network_pods_are_refused_with_the_reason() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-hostnet-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    let containerd = Containerd::start(
        spry.register(ContainerdOptions::new("spry-hostnet").registry(&registry)),
    )?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(120));
    let pod_cfg = PodConfig::new("hostnet")
        .host_network(true)
        .write_to(&containerd.dir())?;
    let err = match crictl.runp(&pod_cfg, Some("spry")) {
        Ok(pod) => bail!("a hostNetwork pod started: {pod}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(err.contains("hostNetwork") && err.contains("runc"), "{err}");
    crictl.rmp_all_force()?;
    leaks.assert_clean()?;
    Ok(())
}

#[test]
fn ten_template_pods_started_at_once_have_their_own_address_and_reach_each_other() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-net10-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    let containerd =
        Containerd::start(spry.register(ContainerdOptions::new("spry-net10").registry(&registry)))?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(300));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    // The template first, so that all ten restore from it.
    let first = start_server_pod(&containerd, &crictl, &image, "tpl-0", Some("spry"), None)?;
    let pods: Vec<ServerPod> = std::thread::scope(|scope| {
        let starts: Vec<_> = (1..10)
            .map(|i| {
                let (containerd, crictl, image) = (&containerd, &crictl, &image);
                scope.spawn(move || {
                    start_server_pod(
                        containerd,
                        crictl,
                        image,
                        &format!("tpl-{i}"),
                        Some("spry"),
                        None,
                    )
                })
            })
            .collect();
        starts
            .into_iter()
            .map(|s| s.join().expect("start thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    let pods: Vec<ServerPod> = std::iter::once(first).chain(pods).collect();

    let mut ips = std::collections::BTreeSet::new();
    let mut macs = std::collections::BTreeSet::new();
    for pod in &pods {
        ips.insert(pod.ip.clone());
        macs.insert(guest(
            &crictl,
            pod,
            &["cat", "/sys/class/net/eth0/address"],
        )?);
    }
    ensure!(
        ips.len() == 10 && macs.len() == 10,
        "IPs {ips:?}, MACs {macs:?}"
    );
    ensure!(
        !macs.iter().any(|m| m.starts_with("02:53:50:52:59")),
        "a pod kept the template's boot MAC: {macs:?}"
    );
    // Each pod asks every other one for its page, in one exec.
    for from in &pods {
        let script: String = pods
            .iter()
            .filter(|to| to.name != from.name)
            .map(|to| {
                format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {} 8080 | grep -q {} || echo {};",
                    to.ip, to.name, to.name
                )
            })
            .collect();
        let unreachable = guest(&crictl, from, &["sh", "-c", &script])?;
        ensure!(
            unreachable.is_empty(),
            "{} cannot reach: {unreachable}",
            from.name
        );
    }
    for pod in &pods {
        crictl.stopp(&pod.pod)?;
        crictl.rmp(&pod.pod)?;
    }
    leaks.assert_clean()?;
    Ok(())
}

#[test]
fn a_netns_holding_a_link_spry_cannot_mirror_fails_runp_naming_it() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-hostdev-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    // CNI's host-device plugin moves a host link into the pod's namespace as its eth0: here
    // an ifb, a link kind Spry refuses. Back on the host after the CNI teardown.
    let device = format!("spryifb{}", std::process::id() % 100_000);
    let status = Command::new("ip")
        .args(["link", "add", &device, "type", "ifb"])
        .status()?;
    ensure!(status.success(), "ip link add {device} type ifb failed");
    let _device = DeleteLink(device.clone());
    let opts = ContainerdOptions::new("spry-hostdev")
        .registry(&registry)
        .main_cni_plugin(serde_json::json!({
            "type": "host-device",
            "device": device,
            "ipam": { "type": "static", "addresses": [{ "address": "10.99.0.2/24" }] }
        }));
    let containerd = Containerd::start(spry.register(opts))?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(120));
    let pod_cfg = PodConfig::new("vrf").write_to(&containerd.dir())?;
    let err = match crictl.runp(&pod_cfg, Some("spry")) {
        Ok(pod) => bail!("a pod with a VRF link started: {pod}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("interface eth0 ") && err.contains("ifb link"),
        "{err}"
    );
    crictl.rmp_all_force()?;
    leaks.assert_clean()?;
    Ok(())
}
