//! The warm pool (issue 18) through stock containerd 2.x and crictl: a handler with
//! `[pool] size = 1` keeps a spare shim with a VM restored from the template; the next pod
//! takes it (same network, identity and container behaviour as any pod), the pool is
//! topped up, a killed spare leaves nothing and the next pod starts as without a pool, and
//! draining the pool leaves nothing. An idle spare and its QEMU sit in the spares' cgroup
//! at the lowest CPU weight; adopted, they leave it. Needs root, the guest and the test
//! images.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::spry::watch_pod_state;
use spry_integration::{
    require_root, system, ContainerConfig, Containerd, ContainerdOptions, Crictl, PodConfig,
    Registry, SpryHandler,
};
use spry_shim::pool::{SpareCgroups, POOL_CGROUP};

const HANDLER: &str = "spry-pool";
/// A spare restores in about a second under TCG; a template build first takes a few.
const SPARE_READY: Duration = Duration::from_secs(90);

/// What a pod's container saw: its hostname, its eth0 address line, 16 random bytes, and
/// counts of what a pooled VM's network warm-up would have left (addresses, routes,
/// neighbours) followed by the count of all its routes.
#[derive(Debug)]
struct Seen {
    hostname: String,
    eth0: String,
    random_hex: String,
    leftovers: String,
}

struct Node {
    containerd: Containerd,
    crictl: Crictl,
    image: String,
    pool: PathBuf,
}

impl Node {
    /// Ready spares: each has its control socket once its VM answered.
    fn ready_spares(&self) -> Vec<PathBuf> {
        system::list_dir(&self.pool)
            .into_iter()
            .filter(|dir| dir.join("control.sock").exists())
            .collect()
    }

    fn wait_for_spares(&self, count: usize) -> Result<Vec<PathBuf>> {
        let deadline = Instant::now() + SPARE_READY;
        loop {
            let ready = self.ready_spares();
            if ready.len() >= count {
                return Ok(ready);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {count} spares ready after {SPARE_READY:?}; pool dir: {:?}\n{}",
                    ready.len(),
                    system::list_dir(&self.pool),
                    self.containerd.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a pod named `name` with a reporting container; returns the pod id, its IP and
    /// what the container saw. The pod stays up.
    fn pod(&self, name: &str) -> Result<(String, String, Seen)> {
        let dir = self.containerd.dir();
        let pod_cfg = PodConfig::new(name).hostname(name).write_to(&dir)?;
        let pod = self
            .crictl
            .runp(&pod_cfg, Some(HANDLER))
            .with_context(|| self.containerd.log_tail(40))?;
        let ip = self.crictl.inspectp(&pod)?["status"]["network"]["ip"]
            .as_str()
            .context("the pod has no IP")?
            .to_owned();
        let cfg = ContainerConfig::new("report", &self.image)
            .command(&[
                "sh",
                "-c",
                "hostname; ip -4 -o addr show eth0; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                 echo \"$(ip addr show dev eth0 | grep -c -e 169.254. -e fd53:) $(ip route | grep -c 192.0.2.) $(ip neigh | grep -c 169.254.) $(ip route | wc -l)\"",
            ])
            .write_to(&dir)?;
        let ctr = self.crictl.create(&pod, &cfg, &pod_cfg)?;
        self.crictl.start(&ctr)?;
        self.crictl
            .wait_container_state(&ctr, "CONTAINER_EXITED", Duration::from_secs(60))?;
        let logs = self.crictl.logs(&ctr)?;
        let mut lines = logs.lines().map(str::trim);
        let seen = Seen {
            hostname: lines.next().unwrap_or_default().to_owned(),
            eth0: lines.next().unwrap_or_default().to_owned(),
            random_hex: lines.next().unwrap_or_default().to_owned(),
            leftovers: lines.next().unwrap_or_default().to_owned(),
        };
        ensure!(seen.random_hex.len() == 32, "{name}: {logs:?}");
        let counts: Vec<&str> = seen.leftovers.split(' ').collect();
        ensure!(
            counts.len() == 4 && counts[..3] == ["0", "0", "0"] && counts[3] != "0",
            "{name}: the guest network holds warm-up leftovers (addresses, routes, neighbours, all routes): {seen:?}"
        );
        ensure!(seen.hostname == name, "{name}: {seen:?}");
        ensure!(
            seen.eth0.contains(&format!(" {ip}/")),
            "{name}: the guest's eth0 lacks the pod IP {ip}: {seen:?}"
        );
        system::ip_answers(&ip)
            .with_context(|| format!("{name}: the host cannot reach the pod"))?;
        Ok((pod, ip, seen))
    }

    fn remove(&self, pod: &str) -> Result<()> {
        self.crictl.stopp(pod)?;
        self.crictl.rmp(pod)
    }

    fn took_pooled_vms(&self) -> usize {
        self.containerd
            .log()
            .matches("the pod took a pooled VM")
            .count()
    }
}

/// The cgroups of `pid` in the hierarchies a spare moves between.
fn cgroups_of(pid: u32) -> Result<Vec<PathBuf>> {
    Ok(SpareCgroups::host().of_process(pid)?)
}

fn in_pool_cgroup(pid: u32) -> Result<bool> {
    let dirs = cgroups_of(pid)?;
    Ok(!dirs.is_empty() && dirs.iter().all(|d| d.ends_with(POOL_CGROUP)))
}

/// The spare shim of pool dir `dir` and its VM's QEMU (named after the dir).
fn spare_processes(dir: &Path) -> Result<(u32, u32)> {
    let spare = std::fs::read_to_string(dir.join("spare.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("no spare.pid in {}", dir.display()))?;
    let name = dir.file_name().context("a pool dir without a name")?;
    let vm = format!("spry-{},", name.to_string_lossy());
    let qemu = system::processes()?
        .into_iter()
        .find(|p| p.name().starts_with("qemu-system") && p.cmdline_contains(&vm))
        .with_context(|| format!("no QEMU named {vm}"))?;
    Ok((spare, u32::try_from(qemu.pid)?))
}

#[test]
fn pods_take_pooled_vms_and_a_killed_or_drained_pool_leaves_nothing() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-pool-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    let config = state.path().join("config-pool.toml");
    let base = std::fs::read_to_string(&spry.config)?;
    std::fs::write(&config, format!("{base}[pool]\nsize = 1\n"))?;
    let containerd = Containerd::start(spry.register_variant(
        ContainerdOptions::new("spry-pool").registry(&registry),
        HANDLER,
        &config,
    ))?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    let node = Node {
        containerd,
        crictl,
        image,
        pool: state.path().join("run/pool"),
    };

    // The first pod finds no spare: it starts as without a pool, and `start` fills it.
    let (first, _, _) = node.pod("pool-first")?;
    ensure!(node.took_pooled_vms() == 0, "a spare before any was made");
    let ready = node.wait_for_spares(1)?;
    let (spare, spare_qemu) = spare_processes(&ready[0])?;
    for pid in [spare, spare_qemu] {
        ensure!(
            in_pool_cgroup(pid)?,
            "an idle spare's process {pid} is not in the spares' cgroup: {:?}",
            cgroups_of(pid)?
        );
    }
    let weights: Vec<String> = SpareCgroups::host()
        .pool_dirs()
        .iter()
        .flat_map(|dir| ["cpu.weight", "cpu.shares"].map(|file| dir.join(file)))
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .map(|weight| weight.trim().to_owned())
        .collect();
    ensure!(
        weights.len() == 1 && (weights[0] == "1" || weights[0] == "2"),
        "the spares' cgroup is not at the lowest CPU weight: {weights:?}"
    );
    let containerd_pid = node.containerd.pid().context("containerd has no pid")?;
    let containerds = cgroups_of(containerd_pid)?;

    // The next two take pooled VMs, each its own identity, and each adoption refills.
    let (second, ip2, seen2) = node.pod("pool-second")?;
    ensure!(
        node.took_pooled_vms() == 1,
        "the second pod did not take the spare:\n{}",
        node.containerd.log_tail(40)
    );
    // Adopted: the shim back where a spawned shim runs (containerd's cgroups), its QEMU
    // out of the spares' cgroup.
    ensure!(
        cgroups_of(spare)? == containerds,
        "the adopted shim is in {:?}, containerd in {containerds:?}",
        cgroups_of(spare)?
    );
    ensure!(
        !in_pool_cgroup(spare_qemu)?,
        "the pod's QEMU stayed in the spares' cgroup"
    );
    node.wait_for_spares(1)?;
    let (third, ip3, seen3) = node.pod("pool-third")?;
    ensure!(
        node.took_pooled_vms() == 2,
        "{}",
        node.containerd.log_tail(40)
    );
    ensure!(ip2 != ip3, "two pods, one IP: {ip2}");
    // A spare plugs the next writable disk once warmed; a pooled pod's first container
    // has its writable layer put on it (the sandbox's own one, plugged 100 ms after the
    // pod is ready, may also come first).
    let ahead = node
        .containerd
        .log()
        .matches("writable layer on the disk plugged ahead")
        .count();
    ensure!(
        ahead >= 2,
        "{ahead} containers had their writable layer on a disk plugged ahead"
    );
    ensure!(
        seen2.random_hex != seen3.random_hex,
        "two pooled VMs read the same random bytes: {}",
        seen2.random_hex
    );

    // A spare killed: its VM goes with it, and the next pod starts without it.
    let spare = node.wait_for_spares(1)?;
    let pid: i32 = std::fs::read_to_string(spare[0].join("spare.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("no spare.pid in {}", spare[0].display()))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let (fourth, _, _) = node.pod("pool-fourth")?;
    ensure!(
        node.took_pooled_vms() == 2,
        "a pod took a killed spare's VM"
    );

    for pod in [&first, &second, &third, &fourth] {
        node.remove(pod)?;
    }
    // Spares are ended by the containerd they were made for (the quickstart's `stop`).
    let run = state.path().join("run");
    let elsewhere = Path::new("/run/another-containerd/containerd.sock");
    let drained = spry_integration::spry::drain_pool_for(&run, elsewhere)?;
    ensure!(
        drained == 0,
        "{drained} spare(s) ended for another containerd"
    );
    let drained = spry_integration::spry::drain_pool_for(&run, &node.containerd.socket())?;
    ensure!(
        drained >= 1,
        "no spare ended for this containerd: the pool was empty, or its spares were not recorded as this containerd's"
    );
    ensure!(
        system::list_dir(&node.pool).iter().all(|p| !p.is_dir()),
        "spare dirs left: {:?}",
        system::list_dir(&node.pool)
    );
    ensure!(
        SpareCgroups::host().pool_dirs().iter().all(|d| !d.exists()),
        "the spares' cgroup outlived the pool: {:?}",
        SpareCgroups::host().pool_dirs()
    );
    leaks.assert_clean().context("after draining the pool")?;
    Ok(())
}
