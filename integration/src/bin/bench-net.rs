//! Pod networking benchmark through crictl, on one containerd with one CNI config
//! (bridge + host-local + portmap + loopback, dual stack): runc, Spry booting cold
//! ("spry") and Spry restoring from a VM template ("spry_template"), in the same run:
//! - `tcp_rr_p50_us`: one-byte TCP round trips between two pods of the runtime (p50);
//! - `tcp_stream_mbit_s`: bytes through one TCP connection pod to pod;
//! - `podstart_p50_ms`: runp → first log line of a pod on the network.
//!
//! Every entry of `checks` is probed in this run: host → Spry pod, Spry pod → Spry pod,
//! runc pod → Spry pod, template pods with distinct IPs and MACs, the IP crictl shows is the
//! guest's eth0, crictl port-forward, a hostPort, IPv6 between Spry pods, and leaks.
//! The probe is `netprobe` (src/bin/netprobe.rs) in the `netprobe` test image.
//!
//! Writes target/bench/net.json and .md. Run by scripts/bench-net.sh (root).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use spry_integration::bench::{percentile, round, round2, spry_accelerator, write_report};
use spry_integration::registry::free_port;
use spry_integration::{
    require_root, ContainerConfig, Containerd, ContainerdOptions, Crictl, PodConfig, Registry,
    SpryHandler,
};

const PROBE_PORT: u16 = 5201;

/// A pod running `netprobe serve`.
struct ProbePod {
    pod: String,
    container: String,
    ip: String,
    ip6: Option<String>,
}

struct Settings {
    pods: usize,
    round_trips: usize,
    stream_bytes: u64,
}

fn main() -> Result<()> {
    require_root()?;
    let mut settings = Settings {
        pods: 5,
        round_trips: 1000,
        stream_bytes: 256 << 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--pods" => settings.pods = value()?.parse()?,
            "--round-trips" => settings.round_trips = value()?.parse()?,
            "--stream-mib" => settings.stream_bytes = value()?.parse::<u64>()? << 20,
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(
        settings.pods >= 2,
        "--pods must be at least 2 (a client and a server)"
    );
    let root = spry_integration::paths::repo_root();
    let state = tempfile::Builder::new()
        .prefix("spry-bench-net-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "release", None)?;
    let cold_config = spry.variant("cold", "template = \"off\"")?;
    let template_config = spry.variant("template", "template = \"auto\"")?;
    // What scripts/bench-net.sh builds, no more.
    let registry = Registry::start_with_images(&["pause:1", "netprobe:1"])?;
    let opts = ContainerdOptions::new("bench-net")
        .registry(&registry)
        .dual_stack();
    let opts = spry.register_variant(opts, "spry-cold", &cold_config);
    let opts = spry.register_variant(opts, "spry-template", &template_config);
    let containerd = Containerd::start(spry.register(opts))?;
    // The census also watches Spry's state dir: a pod's VM dir, file share, rootfs images.
    let leaks = spry_integration::spry::watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(300));
    let image = registry.image("netprobe:1");
    crictl
        .pull(&image)
        .context("pulling netprobe:1 (scripts/build-test-images.sh --only netprobe)")?;
    let bench = Bench {
        containerd: &containerd,
        crictl: &crictl,
        image: &image,
    };

    let mut results = serde_json::Map::new();
    let mut checks = serde_json::Map::new();
    let mut runc_pods = Vec::new();
    for (runtime, handler) in [
        ("runc", None),
        ("spry", Some("spry-cold")),
        ("spry_template", Some("spry-template")),
    ] {
        if runtime == "spry_template" {
            // The template is built on first use, outside the measured pods.
            let warmup = bench.start_pod("tpl-warmup", handler, None)?.1;
            bench.remove(&[warmup])?;
        }
        let host_port = (runtime == "spry").then(free_port).transpose()?;
        let mut pods = Vec::new();
        let mut start_ms = Vec::new();
        for i in 0..settings.pods {
            let name = format!("{}-{i}", runtime.replace('_', "-"));
            let (ms, pod) = bench.start_pod(&name, handler, host_port.filter(|_| i == 0))?;
            eprintln!("{runtime} pod {i}: {ms:.0} ms to its first log line");
            start_ms.push(ms);
            pods.push(pod);
        }
        let (server, client) = (&pods[0], &pods[1]);
        let rr = bench.probe(
            client,
            &[
                "rr",
                &server.ip,
                &PROBE_PORT.to_string(),
                &settings.round_trips.to_string(),
            ],
        )?;
        let stream = bench.probe(
            client,
            &[
                "stream",
                &server.ip,
                &PROBE_PORT.to_string(),
                &settings.stream_bytes.to_string(),
            ],
        )?;
        eprintln!("{runtime}: round trips {rr}, stream {stream}");
        results.insert(
            runtime.into(),
            json!({
                "tcp_rr_p50_us": rr["p50_us"],
                "tcp_rr_p90_us": rr["p90_us"],
                "tcp_stream_mbit_s": stream["mbit_s"],
                "podstart_p50_ms": round(percentile(&start_ms, 50.0)),
            }),
        );
        match runtime {
            "runc" => runc_pods = pods,
            "spry" => {
                let host_port = host_port.context("the spry run has a hostPort")?;
                spry_checks(&bench, &pods, &runc_pods[0], host_port, &mut checks)?;
                bench.remove(&pods)?;
            }
            _ => {
                checks.insert(
                    "template_pods_distinct".into(),
                    json!(bench.distinct(&pods)?),
                );
                bench.remove(&pods)?;
            }
        }
    }
    bench.remove(&runc_pods)?;
    checks.insert("leaks".into(), json!(leaks.count_printed()?));

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = json!({
        "machine": {
            "cpus": cpus,
            "accelerator": spry_accelerator(&state.path().join("run")),
            "pods_per_runtime": settings.pods,
            "round_trips": settings.round_trips,
            "stream_mib": settings.stream_bytes >> 20,
            "cni": "bridge + host-local + portmap + loopback, dual stack, MTU 1400",
        },
        "checks": checks,
        "runc": results["runc"],
        "spry": results["spry"],
        "spry_template": results["spry_template"],
    });
    write_report(
        &root.join("target/bench"),
        "net",
        &report,
        &markdown(&report),
    )
}

/// The checks that need a running cold Spry pod (and a runc one).
fn spry_checks(
    bench: &Bench,
    pods: &[ProbePod],
    runc: &ProbePod,
    host_port: u16,
    checks: &mut serde_json::Map<String, Value>,
) -> Result<()> {
    let (server, client) = (&pods[0], &pods[1]);
    let port = PROBE_PORT.to_string();
    checks.insert(
        "host_to_pod".into(),
        json!(echo(&server.ip, PROBE_PORT).is_ok()),
    );
    checks.insert(
        "pod_to_pod".into(),
        json!(bench
            .probe(client, &["rr", &server.ip, &port, "10"])
            .is_ok()),
    );
    checks.insert(
        "runc_to_spry".into(),
        json!(bench.probe(runc, &["rr", &server.ip, &port, "10"]).is_ok()),
    );
    let eth0 = bench.exec(server, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])?;
    checks.insert(
        "inspect_ip_matches_guest".into(),
        json!(eth0.contains(&format!("inet {}/", server.ip))),
    );
    let forwarded = {
        let forward = bench.crictl.port_forward(&server.pod, PROBE_PORT)?;
        (0..4).all(|_| echo("127.0.0.1", forward.local_port).is_ok())
    };
    checks.insert("port_forward".into(), json!(forwarded));
    let gateway = bench.containerd.pod_gateway()?;
    checks.insert("host_port".into(), json!(echo(&gateway, host_port).is_ok()));
    let ipv6 = match &server.ip6 {
        Some(ip6) => bench.probe(client, &["rr", ip6, &port, "10"]).is_ok(),
        None => false,
    };
    checks.insert("ipv6".into(), json!(ipv6));
    Ok(())
}

struct Bench<'a> {
    containerd: &'a Containerd,
    crictl: &'a Crictl,
    image: &'a str,
}

impl Bench<'_> {
    /// runp → create → start of a `netprobe serve` pod, timed to its first log line.
    fn start_pod(
        &self,
        name: &str,
        handler: Option<&str>,
        host_port: Option<u16>,
    ) -> Result<(f64, ProbePod)> {
        let dir = self.containerd.dir();
        let mut pod_cfg = PodConfig::new(name).log_directory(&dir.join("logs").join(name));
        if let Some(host_port) = host_port {
            pod_cfg = pod_cfg.patch(json!({
                "port_mappings": [{ "protocol": 0, "container_port": PROBE_PORT, "host_port": host_port }]
            }));
        }
        let pod_cfg = pod_cfg.write_to(&dir)?;
        let ctr_cfg = ContainerConfig::new(&format!("{name}-probe"), self.image)
            .command(&["netprobe", "serve", &PROBE_PORT.to_string()])
            .log_path("probe.log")
            .write_to(&dir)?;
        let started = Instant::now();
        let pod = self.crictl.runp(&pod_cfg, handler)?;
        let container = self.crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
        self.crictl.start(&container)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while !self.crictl.logs(&container)?.contains("serving") {
            ensure!(Instant::now() < deadline, "{name} never logged");
            std::thread::sleep(Duration::from_millis(20));
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let info = self.crictl.inspectp(&pod)?;
        let network = &info["status"]["network"];
        let ip = network["ip"]
            .as_str()
            .context("pod without an IP")?
            .to_owned();
        let ip6 = network["additionalIps"][0]["ip"]
            .as_str()
            .map(str::to_owned);
        Ok((
            ms,
            ProbePod {
                pod,
                container,
                ip,
                ip6,
            },
        ))
    }

    fn exec(&self, pod: &ProbePod, argv: &[&str]) -> Result<String> {
        let out = self
            .crictl
            .exec_sync(&pod.container, argv, Duration::from_secs(600))?;
        ensure!(out.code == 0, "{argv:?}: {}", out.stderr);
        Ok(out.stdout)
    }

    /// Runs `netprobe ARGS` in `pod`; its JSON line.
    fn probe(&self, pod: &ProbePod, args: &[&str]) -> Result<Value> {
        let mut argv = vec!["netprobe"];
        argv.extend_from_slice(args);
        let out = self.exec(pod, &argv)?;
        serde_json::from_str(out.trim()).with_context(|| format!("netprobe said {out:?}"))
    }

    /// Distinct pod IPs, and distinct guest MACs none of which is a template's boot MAC.
    fn distinct(&self, pods: &[ProbePod]) -> Result<bool> {
        let ips: BTreeSet<&str> = pods.iter().map(|p| p.ip.as_str()).collect();
        let mut macs = BTreeSet::new();
        for pod in pods {
            macs.insert(
                self.exec(pod, &["cat", "/sys/class/net/eth0/address"])?
                    .trim()
                    .to_owned(),
            );
        }
        let boot_mac = macs.iter().any(|m| m.starts_with("02:53:50:52:59"));
        Ok(ips.len() == pods.len() && macs.len() == pods.len() && !boot_mac)
    }

    fn remove(&self, pods: &[ProbePod]) -> Result<()> {
        for pod in pods {
            self.crictl.stopp(&pod.pod)?;
            self.crictl.rmp(&pod.pod)?;
        }
        Ok(())
    }
}

/// One echoed byte through `netprobe serve` at `ip:port`, from the host.
fn echo(ip: &str, port: u16) -> Result<()> {
    let mut stream =
        TcpStream::connect_timeout(&format!("{ip}:{port}").parse()?, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"ex")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    ensure!(&byte == b"x", "echoed {byte:?}");
    Ok(())
}

fn markdown(report: &Value) -> String {
    let runc = &report["runc"];
    let ratio = |runtime: &str, key: &str| match (report[runtime][key].as_f64(), runc[key].as_f64())
    {
        (Some(x), Some(base)) if base > 0.0 => format!("{}", round2(x / base)),
        _ => "n/a".into(),
    };
    let mut md = String::from("# Pod networking: runc vs Spry (cold) vs Spry (template)\n\n");
    md.push_str(&format!(
        "Machine: {} CPUs, Spry accelerator {}; CNI {}; {} pods per runtime, {} round trips, {} MiB streamed.\n\n",
        report["machine"]["cpus"],
        report["machine"]["accelerator"],
        report["machine"]["cni"],
        report["machine"]["pods_per_runtime"],
        report["machine"]["round_trips"],
        report["machine"]["stream_mib"],
    ));
    md.push_str("| runtime | TCP RR p50 (µs) | × runc | TCP stream (Mbit/s) | × runc | pod start p50 (ms) | × runc |\n|---|---|---|---|---|---|---|\n");
    for runtime in ["runc", "spry", "spry_template"] {
        let r = &report[runtime];
        md.push_str(&format!(
            "| {runtime} | {} | {} | {} | {} | {} | {} |\n",
            r["tcp_rr_p50_us"],
            ratio(runtime, "tcp_rr_p50_us"),
            r["tcp_stream_mbit_s"],
            ratio(runtime, "tcp_stream_mbit_s"),
            r["podstart_p50_ms"],
            ratio(runtime, "podstart_p50_ms"),
        ));
    }
    md.push_str("\nChecks (each probed in this run):\n\n");
    if let Some(checks) = report["checks"].as_object() {
        for (name, value) in checks {
            md.push_str(&format!("- {name}: {value}\n"));
        }
    }
    md
}
