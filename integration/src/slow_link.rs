//! A registry behind a slow link: a second docker-registry serving the same storage in
//! its own network namespace, reached over a veth pair whose rate tc can limit (both
//! directions, token bucket). The benchmarks use it for "the image comes over 100 Mbit/s".

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

const NS_ADDR: &str = "10.213.0.2";
const HOST_ADDR: &str = "10.213.0.1";
const NS_PORT: u16 = 5000;

fn sh(cmd: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    ensure!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The namespace, its veth pair and its registry; all removed on drop.
pub struct SlowLink {
    ns: String,
    veth: String,
    peer: String,
    registry: Option<Child>,
    _dir: tempfile::TempDir,
}

impl SlowLink {
    /// Serves the registry storage `storage` at [`SlowLink::addr`], unthrottled until
    /// [`SlowLink::set_rate`].
    pub fn start(storage: &Path) -> Result<Self> {
        let id = std::process::id() % 100_000;
        let (ns, veth, peer) = (
            format!("spry-bench-{id}"),
            format!("sbh{id}"),
            format!("sbn{id}"),
        );
        sh(&format!("ip netns add {ns}"))?;
        let mut link = SlowLink {
            ns: ns.clone(),
            veth: veth.clone(),
            peer: peer.clone(),
            registry: None,
            _dir: tempfile::tempdir()?,
        };
        sh(&format!(
            "ip link add {veth} type veth peer name {peer} && ip link set {peer} netns {ns}"
        ))?;
        sh(&format!(
            "ip addr add {HOST_ADDR}/30 dev {veth} && ip link set {veth} up"
        ))?;
        sh(&format!(
            "ip netns exec {ns} sh -c 'ip addr add {NS_ADDR}/30 dev {peer} && ip link set {peer} up && ip link set lo up'"
        ))?;
        let config = link._dir.path().join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {NS_ADDR}:{NS_PORT}\n",
                storage.display()
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "docker-registry", "serve"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        link.registry = Some(child);
        let started = Instant::now();
        while crate::registry::http_status(&link.addr(), "/v2/").ok() != Some(200) {
            ensure!(
                started.elapsed() < Duration::from_secs(15),
                "netns registry did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(link)
    }

    /// host:port of the registry behind the link.
    pub fn addr(&self) -> String {
        format!("{NS_ADDR}:{NS_PORT}")
    }

    /// Limits both directions to `rate` (e.g. "100mbit"), or lifts the limit.
    pub fn set_rate(&self, rate: Option<&str>) -> Result<()> {
        let (ns, veth, peer) = (&self.ns, &self.veth, &self.peer);
        let _ = sh(&format!("tc qdisc del dev {veth} root 2>/dev/null; ip netns exec {ns} tc qdisc del dev {peer} root 2>/dev/null"));
        if let Some(rate) = rate {
            let qdisc = format!("root tbf rate {rate} burst 256kb latency 50ms");
            sh(&format!("tc qdisc add dev {veth} {qdisc}"))?;
            sh(&format!(
                "ip netns exec {ns} tc qdisc add dev {peer} {qdisc}"
            ))?;
        }
        Ok(())
    }

    /// Tells the containerd whose registry config dir is `certs_dir` to pull from the
    /// link's registry over plain HTTP.
    pub fn trust_from(&self, certs_dir: &Path) -> Result<()> {
        let hosts_dir = certs_dir.join(self.addr());
        std::fs::create_dir_all(&hosts_dir)?;
        std::fs::write(
            hosts_dir.join("hosts.toml"),
            format!(
                "server = \"http://{0}\"\n[host.\"http://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                self.addr()
            ),
        )?;
        Ok(())
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        if let Some(mut child) = self.registry.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = sh(&format!(
            "ip link del {} 2>/dev/null; ip netns del {}",
            self.veth, self.ns
        ));
    }
}
