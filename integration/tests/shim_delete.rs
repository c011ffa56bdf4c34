//! A pod whose VM died, and the `containerd-shim-spry-v2 delete` containerd runs after
//! every task delete (it counts closing a task's connection as the shim's death): a live
//! shim that other tasks still use must survive it. Session 15's fix for abandoned shims
//! killed it, and CI saw `RemovePodSandbox` refuse a container "still running". Needs root,
//! the guest and the test images.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use spry_integration::spry::SpryNode;
use spry_integration::{require_root, system, ContainerConfig, PodConfig};

/// A VM killed under two running containers: once the pod reads not ready, the pod stops
/// and is removed at the first try (no retry while containerd catches up), its containers
/// read exited. containerd deletes the sandbox task as soon as its exit arrives, while the
/// containers' exits may still be on their way, and runs `shim delete` for the sandbox
/// right after: the shim, still serving those containers, must outlive that (it did not:
/// CI saw `RemovePodSandbox` refuse a container "still running"). That `shim delete` is
/// also run by hand while the containers live, which the race only sometimes shows.
#[test]
fn a_pod_whose_vm_died_stops_and_is_removed_at_once() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("fault-vm-died", false)?;
    let leaks = node.leak_check()?;
    let crictl = node
        .containerd
        .crictl()
        .with_timeout(Duration::from_secs(180));
    for round in 0..3 {
        let pod_cfg =
            PodConfig::new(&format!("vm-died-{round}")).write_to(&node.containerd.dir())?;
        let pod = crictl.runp(&pod_cfg, Some("spry"))?;
        let mut ctrs = Vec::new();
        for name in ["first", "second"] {
            let cfg = ContainerConfig::new(name, &node.image)
                .command(&["sleep", "3600"])
                .write_to(&node.containerd.dir())?;
            let id = crictl.create(&pod, &cfg, &pod_cfg)?;
            crictl.start(&id)?;
            ctrs.push(id);
        }
        if round == 0 {
            // What containerd does after each task delete, here for the sandbox task while
            // its containers live: the shim must not take it for abandoned.
            shim_delete_as_containerd_runs_it(&node, &pod)?;
            for id in &ctrs {
                let out = crictl.exec_ok(id, &["echo", "alive"])?;
                ensure!(out == "alive", "after `shim delete`: exec printed {out:?}");
            }
        }
        let vm = format!("spry-{}", &pod[..12]);
        let qemu = node
            .containerd
            .qemus()?
            .into_iter()
            .find(|q| q.cmdline_contains(&vm))
            .context("no QEMU for the pod")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(qemu.pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let not_ready = system::wait_for(Duration::from_secs(30), || {
            let state = crictl.inspectp(&pod)?["status"]["state"].clone();
            Ok((state == "SANDBOX_NOTREADY").then_some(()))
        })?;
        ensure!(
            not_ready.is_some(),
            "the pod still reads ready 30 s after its VM died"
        );
        crictl.stopp(&pod)?;
        for id in &ctrs {
            let state = crictl.container_state(id)?;
            ensure!(
                state == "CONTAINER_EXITED",
                "round {round}: container {id} reads {state} after its pod stopped"
            );
        }
        crictl.rmp(&pod)?;
    }
    leaks.assert_clean()?;
    Ok(())
}

/// `containerd-shim-spry-v2 … -id POD -bundle B delete`, as containerd runs it when it
/// closes a task's connection (with the serving shim's environment, as containerd passes
/// its own to both).
fn shim_delete_as_containerd_runs_it(node: &SpryNode, pod: &str) -> Result<()> {
    let shim = node
        .containerd
        .shims()?
        .into_iter()
        .find(|p| p.cmdline_contains(pod))
        .context("no shim for the pod")?;
    let bundle = node
        .containerd
        .state_dir()
        .join("io.containerd.runtime.v2.task/k8s.io")
        .join(pod);
    ensure!(bundle.is_dir(), "no bundle at {}", bundle.display());
    let environ = std::fs::read(format!("/proc/{}/environ", shim.pid))?;
    let mut cmd = std::process::Command::new(&shim.cmdline[0]);
    cmd.env_clear().current_dir(&bundle);
    for var in environ.split(|b| *b == 0).filter(|v| !v.is_empty()) {
        let var = String::from_utf8_lossy(var);
        if let Some((key, value)) = var.split_once('=') {
            cmd.env(key, value);
        }
    }
    let flag = |name: &str| -> Result<String> {
        let at = shim.cmdline.iter().position(|a| a == name);
        at.and_then(|i| shim.cmdline.get(i + 1))
            .cloned()
            .with_context(|| format!("the shim has no {name}: {:?}", shim.cmdline))
    };
    let out = cmd
        .args([
            "-namespace",
            &flag("-namespace")?,
            "-address",
            &flag("-address")?,
        ])
        .args(["-id", pod, "-bundle"])
        .arg(&bundle)
        .arg("delete")
        .output()?;
    ensure!(
        out.status.success(),
        "shim delete failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
