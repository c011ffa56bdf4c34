//! A one-node Kubernetes cluster for end-to-end tests: etcd, kube-apiserver,
//! kube-controller-manager (Deployments, ReplicaSets, service-account tokens), kube-scheduler
//! and a kubelet, all built by `scripts/build-k8s.sh`, on a private containerd whose Spry
//! handler `spry install` wrote, with the RuntimeClass `spry install` printed applied as is
//! (with [`NodeSetup::lazy_snapshotter`], `spry install --snapshotter`: its snapshotter
//! started as the unit it wrote says, serving the `spry` handler's images).
//!
//! Certificates come from openssl; the apiserver authorizes everything (`AlwaysAllow`); every
//! port is a free one. Every host change the kubelet makes is recorded first and undone at
//! teardown, even when a test failed (`host.rs`); one cluster per machine at a time.

mod component;
mod flags;
mod host;
mod install;
mod kubelet;
pub mod manifests;
mod pki;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::containerd::{Containerd, ContainerdOptions};
use crate::registry::{free_port, http_status, Registry};
use crate::snapshotter::Snapshotter;
use crate::{paths, require, system};
use component::Component;
use flags::{Flags, NODE_NAME};
use host::{HostChanges, KubeletLock};
use kubelet::KubeletSettings;
use pki::Pki;

/// Where the kubelet puts pod cgroups, in every hierarchy.
const CGROUP_ROOT: &str = "/spry-test-kubelet";
const START_TIMEOUT: Duration = Duration::from_secs(90);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// How the node is set up beyond `spry install`'s defaults.
#[derive(Debug, Default)]
pub struct NodeSetup<'a> {
    /// More Spry handlers: `(handler, config lines)` (see [`Cluster::start_with_variants`]).
    pub variants: &'a [(&'a str, &'a str)],
    /// `spry install --snapshotter`: the lazy-pulling snapshotter, its service started as
    /// its unit says, serves the `spry` handler; the kubelet passes RuntimeClasses to
    /// image pulls (`RuntimeClassInImageCriApi`).
    pub lazy_snapshotter: bool,
}

pub struct Cluster {
    /// Held until Drop's teardown has run: the cluster is gone before another may start.
    _lock: KubeletLock,
    dir: PathBuf,
    containerd: Option<Containerd>,
    /// `spry install --snapshotter`'s service, when asked for; stopped after containerd.
    snapshotter: Option<Snapshotter>,
    /// In start order; stopped in reverse.
    components: Vec<Component>,
    host: HostChanges,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    runtime_class: String,
    spry_state: PathBuf,
    torn_down: bool,
}

impl Cluster {
    /// Starts the whole cluster; on any failure, what was started is torn down again.
    pub fn start(name: &str, registry: &Registry) -> Result<Self> {
        Self::start_with_variants(name, registry, &[])
    }

    /// Like [`Cluster::start`], with more Spry handlers beside `spry`: each `(handler,
    /// config lines)` gets the installed shim with those top-level lines added to its config
    /// (e.g. `template = "off"`), and a RuntimeClass like the installed one under its name.
    pub fn start_with_variants(
        name: &str,
        registry: &Registry,
        variants: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_with(
            name,
            registry,
            &NodeSetup {
                variants,
                lazy_snapshotter: false,
            },
        )
    }

    /// A cluster whose node is set up as `setup` says.
    pub fn start_with(name: &str, registry: &Registry, setup: &NodeSetup) -> Result<Self> {
        require::require_root()?;
        let bin = paths::deps_bin_dir();
        for tool in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kubectl",
        ] {
            require::require_tool(&bin.join(tool))
                .with_context(|| format!("{tool} missing: run scripts/build-k8s.sh as root"))?;
        }
        let node_ip = node_ip()?;
        let lock = KubeletLock::take()?;
        std::fs::create_dir_all(paths::harness_dir())?;
        let stale = host::clean_stale_clusters(&lock, &paths::harness_dir())?;
        if !stale.is_empty() {
            eprintln!("spry-integration: cleaned up after dead test clusters {stale:?}");
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("k8s-cluster-{name}-"))
            .tempdir_in(paths::harness_dir())
            .context("creating the cluster dir")?
            .keep();
        let host = match HostChanges::record(&lock, &dir, CGROUP_ROOT) {
            Ok(host) => host,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut cluster = Cluster {
            _lock: lock,
            kubeconfig: dir.join("admin.kubeconfig"),
            kubectl: bin.join("kubectl"),
            spry_state: dir.join("spry-state"),
            dir,
            containerd: None,
            snapshotter: None,
            components: Vec::new(),
            host,
            runtime_class: String::new(),
            torn_down: false,
        };
        // From here on, Drop undoes whatever the boot got to.
        if let Err(e) = cluster.boot(name, registry, node_ip, setup) {
            let logs = cluster.log_tails(15);
            return Err(e.context(format!("starting the test cluster\n{logs}")));
        }
        Ok(cluster)
    }

    fn boot(
        &mut self,
        name: &str,
        registry: &Registry,
        node_ip: Ipv4Addr,
        setup: &NodeSetup,
    ) -> Result<()> {
        let started = Instant::now();
        let bin = paths::deps_bin_dir();
        let pki = Pki::create(&self.dir.join("pki"), NODE_NAME, node_ip)?;
        let dir = self.dir.clone();
        let flags = Flags {
            dir: &dir,
            pki: &pki,
            node_ip,
        };
        let mut handler_toml = self.install_spry(setup.lazy_snapshotter)?;
        handler_toml.push_str(&self.add_variants(setup.variants)?);
        let containerd = Containerd::start(
            ContainerdOptions::new(name)
                .registry(registry)
                .extra_toml(&handler_toml)
                .env("SPRY_CONFIG", &self.dir.join("spry.toml").to_string_lossy()),
        )?;
        let runtime_socket = containerd.socket();
        self.containerd = Some(containerd);

        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        self.spawn("etcd", &bin.join("etcd"), &flags.etcd(&etcd_url, &peer_url))?;
        self.wait_until("etcd healthy", |_| {
            Ok(http_status(&format!("127.0.0.1:{etcd_port}"), "/health").ok() == Some(200))
        })?;

        let api_port = free_port()?;
        let server = format!("https://{node_ip}:{api_port}");
        self.spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &flags.apiserver(&etcd_url, api_port),
        )?;
        std::fs::write(&self.kubeconfig, pki.kubeconfig(&server, "admin"))?;
        self.wait_until("kube-apiserver ready", |c| {
            Ok(c.kubectl(&["get", "--raw", "/readyz"]).is_ok())
        })?;

        self.spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            &flags.controller_manager(&self.kubeconfig),
        )?;
        self.spawn(
            "kube-scheduler",
            &bin.join("kube-scheduler"),
            &flags.scheduler(&self.kubeconfig),
        )?;

        let kubelet_config = self.dir.join("kubelet-config.yaml");
        let pod_logs = self.dir.join("pod-logs");
        std::fs::create_dir_all(&pod_logs)?;
        std::fs::write(
            &kubelet_config,
            kubelet::config_yaml(&KubeletSettings {
                node_ip,
                port: free_port()?,
                runtime_socket: &runtime_socket,
                cgroup_root: CGROUP_ROOT,
                pod_logs: &pod_logs,
                ca_cert: &pki.ca_cert(),
                tls_cert: &pki.cert("kubelet"),
                tls_key: &pki.key("kubelet"),
                runtime_class_in_image_pulls: setup.lazy_snapshotter,
            }),
        )?;
        let kubelet_kubeconfig = self.dir.join("kubelet.kubeconfig");
        std::fs::write(&kubelet_kubeconfig, pki.kubeconfig(&server, "kubelet"))?;
        self.spawn(
            "kubelet",
            &bin.join("kubelet"),
            &flags.kubelet(&kubelet_config, &kubelet_kubeconfig),
        )?;
        self.wait_until("the node Ready", |c| {
            let ready = c.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            Ok(ready.is_ok_and(|s| s.trim() == "True"))
        })?;
        self.wait_until("the default service account", |c| {
            Ok(c.kubectl(&["get", "serviceaccount", "default"]).is_ok())
        })?;
        self.apply(&self.runtime_class.clone())
            .context("applying the RuntimeClass `spry install` printed")?;
        eprintln!(
            "spry-integration: cluster ready in {:.1} s (apiserver {server}, node {NODE_NAME})",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn spawn(&mut self, name: &'static str, binary: &Path, args: &[String]) -> Result<()> {
        let log_dir = self.dir.join("logs");
        std::fs::create_dir_all(&log_dir)?;
        self.components
            .push(Component::start(name, binary, args, &log_dir)?);
        Ok(())
    }

    /// Polls `ready` until it holds; fails early when a component died.
    fn wait_until(&mut self, what: &str, ready: impl Fn(&Self) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(self)? {
                return Ok(());
            }
            for component in &mut self.components {
                component.check_alive()?;
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {} s", START_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `kubectl ARGS` against the cluster; its stdout, or its stderr as the error.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        system::run_checked(&mut self.kubectl_command(args))
    }

    /// kubectl on this cluster with `args`, for a caller that runs it itself (a
    /// long-running `port-forward`).
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.kubectl);
        command.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        command
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.kubectl_with_stdin(&["apply", "-f", "-"], yaml.as_bytes(), KUBECTL_TIMEOUT)
            .map(drop)
            .with_context(|| format!("applying:\n{yaml}"))
    }

    /// `kubectl ARGS` with `input` on its stdin (closed after it), killed after `timeout`.
    pub fn kubectl_with_stdin(
        &self,
        args: &[&str],
        input: &[u8],
        timeout: Duration,
    ) -> Result<String> {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        let mut stdin = child.stdin.take().context("kubectl stdin")?;
        stdin.write_all(input)?;
        drop(stdin);
        let finished = system::wait_for(timeout, || Ok(child.try_wait()?))?;
        if finished.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed ({}): {}; stdout: {stdout}",
                if finished.is_none() {
                    "timed out".to_string()
                } else {
                    out.status.to_string()
                },
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// One field of an object, by JSONPath (`{.status.phase}`).
    pub fn get(&self, object: &str, jsonpath: &str) -> Result<String> {
        Ok(self
            .kubectl(&["get", object, "-o", &format!("jsonpath={jsonpath}")])?
            .trim()
            .to_string())
    }

    /// Waits until `kubectl wait --for=CONDITION OBJECT` succeeds.
    pub fn wait_for(&self, object: &str, condition: &str, timeout: Duration) -> Result<()> {
        self.kubectl(&[
            "wait",
            &format!("--for={condition}"),
            object,
            &format!("--timeout={}s", timeout.as_secs()),
        ])
        .map(drop)
        .with_context(|| {
            let describe = self.kubectl(&["describe", object]).unwrap_or_default();
            format!("{object} did not reach {condition}\n{describe}")
        })
    }

    /// The admin kubeconfig (`KUBECONFIG=` it to use the cluster's own kubectl).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The cluster's directory (certificates, configs, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The RuntimeClass `spry install` printed (and the variants', after `---` lines).
    pub fn runtime_class(&self) -> &str {
        &self.runtime_class
    }

    pub fn containerd(&self) -> &Containerd {
        self.containerd
            .as_ref()
            .expect("containerd runs while the cluster does")
    }

    /// Where Spry keeps its VMs' state in this cluster.
    pub fn spry_state(&self) -> &Path {
        &self.spry_state
    }

    /// Deletes every Deployment and pod of the default namespace and waits until their
    /// VMs are gone.
    pub fn delete_workloads(&self) -> Result<()> {
        self.kubectl(&[
            "delete",
            "deployments,pods",
            "--all",
            "--grace-period=1",
            "--wait=true",
            "--timeout=120s",
        ])?;
        let gone = system::wait_for(Duration::from_secs(60), || {
            Ok(self.vm_pids()?.is_empty().then_some(()))
        })?;
        gone.context("the pods' VMs did not stop within 60 s of their pods' deletion")
    }

    /// PIDs of the QEMU processes of this cluster's Spry pods.
    pub fn vm_pids(&self) -> Result<Vec<i32>> {
        let Some(containerd) = &self.containerd else {
            return Ok(Vec::new());
        };
        Ok(containerd.qemus()?.iter().map(|p| p.pid).collect())
    }

    /// The last `lines` of every component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        self.components
            .iter()
            .map(|c| format!("--- {} ---\n{}", c.name, c.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Deletes every workload, stops the components (kubelet first), containerd and its
    /// pods, and undoes the kubelet's host changes. Runs every step; reports all failures.
    pub fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut problems = Vec::new();
        let running = |name: &str| self.components.iter().any(|c| c.name == name);
        if running("kube-apiserver") && running("kubelet") {
            // Through the API first, so the kubelet stops pods the way it always does.
            if let Err(e) = self.delete_workloads() {
                problems.push(format!("deleting workloads: {e:#}"));
            }
        }
        while let Some(mut component) = self.components.pop() {
            if let Err(e) = component.stop() {
                problems.push(format!("{e:#}"));
            }
        }
        if let Some(mut containerd) = self.containerd.take() {
            if let Err(e) = containerd.cleanup() {
                problems.push(format!("{e:#}"));
            }
        }
        // With its layer daemons and their mounts.
        drop(self.snapshotter.take());
        problems.extend(self.host.restore());
        if let Err(e) = system::unmount_under(&self.dir) {
            problems.push(format!("unmounting under {}: {e:#}", self.dir.display()));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            problems.push(format!("removing {}: {e}", self.dir.display()));
        }
        if !problems.is_empty() {
            bail!("test cluster teardown: {}", problems.join("; "));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("spry-integration: {e:#}");
        }
    }
}

/// The machine's first global IPv4 address: the kubelet refuses a loopback node IP.
fn node_ip() -> Result<Ipv4Addr> {
    let out = system::run_checked(
        Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]),
    )?;
    out.lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .context("this machine has no global IPv4 address for the kubelet's node IP (it refuses loopback)")
}
