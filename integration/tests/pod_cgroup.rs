//! A Spry pod's VM is the pod's in the host's cgroups from its first page: QEMU is spawned
//! into the sandbox's cgroup, so the memory a cold boot or a template restore touches is
//! charged where the pod's limits and kubelet's accounting look (a process that joins
//! later leaves what it touched before charged to the shim's cgroup, i.e. containerd's:
//! 176 of a cold VM's 206 MiB were, before). So is the pod's file server. The cgroup
//! goes with the pod.

use anyhow::{ensure, Context, Result};
use spry_integration::{memcg, require_root, spry::SpryNode, ContainerConfig, PodConfig};

#[test]
fn a_pods_vm_memory_is_charged_to_the_pods_cgroup_cold_and_restored() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-memcg", true)?;
    let leaks = node.leak_check()?;
    for runtime in ["spry-cold", "spry"] {
        check_pod(&node, runtime).with_context(|| format!("runtime {runtime}"))?;
    }
    leaks.assert_clean()?;
    Ok(())
}

fn check_pod(node: &SpryNode, runtime: &str) -> Result<()> {
    let crictl = node.containerd.crictl();
    let pod_cfg = PodConfig::new(&format!("memcg-{runtime}")).write_to(&node.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some(runtime))?;
    let cfg = ContainerConfig::new(&format!("memcg-{runtime}-c"), &node.image)
        .command(&["sleep", "3600"])
        .write_to(&node.containerd.dir())?;
    let ctr = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&ctr)?;
    ensure!(crictl.exec_ok(&ctr, &["echo", "up"])? == "up");

    let vm = format!("spry-{}-", &pod[..12]);
    let qemu = node
        .containerd
        .qemus()?
        .into_iter()
        .find(|q| q.cmdline_contains(&vm))
        .with_context(|| format!("no QEMU named {vm}"))?;
    let cgroup = memcg::memory_cgroup(qemu.pid)?;
    ensure!(
        cgroup.to_string_lossy().contains(&pod),
        "QEMU is in {}, not the sandbox's cgroup",
        cgroup.display()
    );
    // The pod's file server too, spawned there.
    let server = spry_integration::system::processes()?
        .into_iter()
        .find(|p| p.cmdline_contains("fs-serve") && p.cmdline_contains(&pod[..12]))
        .context("no file server of the pod")?;
    ensure!(
        memcg::memory_cgroup(server.pid)? == cgroup,
        "the pod's file server is not in its cgroup {}",
        cgroup.display()
    );
    // Every anonymous page QEMU holds was touched in the pod's cgroup, so the pod's
    // cgroup is charged at least that much (plus its page cache and the file server's).
    let charged = memcg::charged_bytes(&cgroup)?;
    let anon = memcg::anon_rss_bytes(qemu.pid)?;
    println!(
        "{runtime}: the pod's cgroup is charged {} MiB; QEMU holds {} MiB anonymous",
        charged >> 20,
        anon >> 20
    );
    ensure!(
        charged >= anon,
        "the pod's cgroup {} is charged {} MiB, less than the {} MiB QEMU holds: the VM's memory is counted elsewhere",
        cgroup.display(),
        charged >> 20,
        anon >> 20
    );

    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    ensure!(
        !cgroup.exists(),
        "the pod's cgroup {} outlived the pod",
        cgroup.display()
    );
    Ok(())
}
